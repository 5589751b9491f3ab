"""Find a checkpoint, read its weights and build the model.

Reads Google's Hugging Face layout as released and MLX conversions (ours and
the community's, written by mlx-vlm), quantized or not.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .config import ConfigError, ModelConfig
from .cpu import one_blas_thread, reuse_freed_memory
from .model import Model
from .sampler import SamplerSettings

# Tensors a text runtime does not use: the vision tower and its projection, the
# encoder's copies of tied weights (the released checkpoint stores none), a
# head tied to the embeddings, and RoPE tables recomputed from the config.
_IGNORED_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class LoadError(RuntimeError):
    """A model that cannot be loaded; the message is one line."""


def resolve_model_path(path_or_repo: str | Path, revision: str | None = None) -> Path:
    """A local checkpoint directory, downloading a hub repo id into the HF cache if needed."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_repo)
    if path.exists() or not _REPO_ID.match(text):
        raise LoadError(f"no model directory at {text} (and it is not a Hugging Face repo id)")
    return _download(text, revision)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.jinja", "*.model", "tokenizer*", "*.txt"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except RepositoryNotFoundError:
        raise LoadError(f"no model {repo_id!r} on the Hugging Face hub (or it needs a login)") from None
    except Exception as error:  # offline, unreachable, refused: whatever the transport raised, one line
        offline = os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0")
        reason = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else type(error).__name__
        raise LoadError(
            f"cannot fetch {repo_id!r} ({reason}); pass --model PATH to a local checkpoint"
            " or unset HF_HUB_OFFLINE once online"
        ) from None


def read_weights(path: Path) -> dict[str, mx.array]:
    files = sorted(glob.glob(str(path / "*.safetensors")))
    if not files:
        raise LoadError(f"no *.safetensors weights in {path}")
    weights: dict[str, mx.array] = {}
    for file in files:
        try:
            weights.update(mx.load(file))
        except Exception as error:  # MLX raises bare RuntimeError/ValueError on bad files
            raise LoadError(f"cannot read {file}: {error}") from None
    return weights


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Map checkpoint keys onto the model's parameter names."""
    out = {}
    for key, value in weights.items():
        if key.startswith(_IGNORED_PREFIXES) or "rotary_emb" in key or key == "lm_head.weight":
            continue
        if key.startswith("model.encoder.language_model.") and not key.endswith(".layer_scalar"):
            continue
        # Hugging Face stores expert stacks as bare tensors; MLX layers call them `.weight`.
        if key.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            key += ".weight"
        out[key] = value
    return out


def _quantization_params(config: ModelConfig, path: str) -> dict[str, Any]:
    quantization = config.quantization
    if not quantization:
        raise LoadError(f"{path} is stored quantized but config.json has no 'quantization' block")
    mode = quantization.get("mode", "affine")
    specific = quantization.get(path)
    if isinstance(specific, dict):
        return {"group_size": specific["group_size"], "bits": specific["bits"], "mode": specific.get("mode", mode)}
    return {"group_size": quantization["group_size"], "bits": quantization["bits"], "mode": mode}


def load_model(path: str | Path, revision: str | None = None) -> Model:
    """Build the model from a checkpoint directory (or hub repo id)."""
    path = resolve_model_path(path, revision)
    reuse_freed_memory()
    one_blas_thread()
    try:
        config = ModelConfig.from_path(path)
    except ConfigError as error:
        raise LoadError(str(error)) from None
    weights = sanitize(read_weights(path))
    model = Model(config)
    nn.quantize(
        model,
        class_predicate=lambda p, m: _quantization_params(config, p) if f"{p}.scales" in weights else False,
    )
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as error:
        raise LoadError(f"{path}: weights do not match config.json: {_first_line(error)}") from None
    try:
        model.generation_settings = SamplerSettings.from_checkpoint(path, config.text)
    except ValueError as error:
        raise LoadError(f"{path}: generation_config.json: {error}") from None
    mx.eval(model.parameters())
    model.eval()
    return model


def dequantized_dense_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Float twins of the model's quantized dense linears (attention, dense MLPs), by module path.

    Each holds its weights dequantized to the scales' dtype (+1.5 GB at the released shape). The experts and the
    embedding are left out: the experts have kernels of their own, and the tied embedding stays quantized for
    the head and for self-conditioning. A GPU may multiply floats faster than MLX's quantized matmul at a
    canvas's 256 rows; whether it does is for `python -m bench.step --dense` to say (bench/README.md).
    """
    twins = {}
    for path, module in _quantized_dense(model):
        twin = nn.Linear(1, 1, bias="bias" in module)  # its shapes come with the weights below
        twin.weight = DequantizingLinear(module).dequantized()
        if "bias" in module:
            twin.bias = module.bias
        mx.eval(twin.parameters())
        twins[path] = twin
    return twins


def dequantizing_dense_layers(model: nn.Module) -> dict[str, DequantizingLinear]:
    """The same dense linears, kept quantized but dequantized at every call before a plain matmul (no memory
    held beyond the passing copy); `python -m bench.step --dense dequantizing`."""
    return {path: DequantizingLinear(module) for path, module in _quantized_dense(model)}


def _quantized_dense(model: nn.Module) -> list[tuple[str, nn.QuantizedLinear]]:
    return [(path, module) for path, module in model.named_modules() if isinstance(module, nn.QuantizedLinear)]


class DequantizingLinear(nn.Module):
    """A quantized linear layer whose weights are dequantized to the scales' dtype at each call, then multiplied."""

    def __init__(self, linear: nn.QuantizedLinear):
        super().__init__()
        self.weight, self.scales = linear.weight, linear.scales
        self.biases = linear.get("biases")
        if "bias" in linear:
            self.bias = linear.bias
        self.group_size, self.bits, self.mode = linear.group_size, linear.bits, linear.mode

    def dequantized(self) -> mx.array:
        weight = mx.dequantize(
            self.weight, self.scales, self.biases, group_size=self.group_size, bits=self.bits, mode=self.mode
        )
        return weight.astype(self.scales.dtype)

    def __call__(self, x: mx.array) -> mx.array:
        y = x @ self.dequantized().T
        return y + self.bias if "bias" in self else y


def swap_modules(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Put each module at its dotted path in `model`; returns the ones it replaced, by path."""
    replaced = {}
    for path, module in modules.items():
        *parents, name = path.split(".")
        parent: Any = model
        for part in parents:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        replaced[path] = parent[name]
        setattr(parent, name, module)
    return replaced


def load(path_or_repo: str | Path, revision: str | None = None) -> tuple[Model, Any]:
    """The model and its tokenizer (mlx-lm's TokenizerWrapper) from a checkpoint."""
    from .tokenizer import load_tokenizer

    path = resolve_model_path(path_or_repo, revision)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise LoadError(f"no tokenizer in {path}: expected one of {', '.join(TOKENIZER_FILES)}")
    return load_model(path), load_tokenizer(path)


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
