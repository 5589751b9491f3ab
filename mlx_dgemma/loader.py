"""Find a checkpoint, read its weights and build the model.

Reads Google's Hugging Face layout as released and MLX conversions (ours and
the community's, written by mlx-vlm), quantized or not.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from . import host_kernels
from .config import ConfigError, ModelConfig
from .cpu import on_cpu, one_blas_thread, reuse_freed_memory
from .kernels import on_cuda
from .layers import Attention, GatedMLP
from .model import Model
from .moe import Experts
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


def load_model(path: str | Path, revision: str | None = None, dense_weights: str = "auto") -> Model:
    """Build the model from a checkpoint directory (or hub repo id); `dense_weights` see DENSE_WEIGHTS."""
    dense_weights_here(dense_weights)  # a bad value fails before the reading
    path = resolve_model_path(path, revision)
    reuse_freed_memory()
    one_blas_thread()
    try:
        config = ModelConfig.from_path(path)
    except ConfigError as error:
        raise LoadError(str(error)) from None
    weights = sanitize(read_weights(path))
    model = Model(config)
    quantized = {key.removesuffix(".scales") for key in weights if key.endswith(".scales")}
    nn.quantize(model, class_predicate=lambda p, m: _quantization_params(config, p) if p in quantized else False)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as error:
        raise LoadError(f"{path}: weights do not match config.json: {_first_line(error)}") from None
    try:
        model.generation_settings = SamplerSettings.from_checkpoint(path, config.text)
    except ValueError as error:
        raise LoadError(f"{path}: generation_config.json: {error}") from None
    mx.eval(model.parameters())
    del weights  # the model holds them now: what replaces a layer's weights below frees them
    place_dense_layers(model, dense_weights)
    place_for_host_kernels(model)
    model.eval()
    return model


# How the quantized dense layers (attention, the dense MLPs, self-conditioning's MLP) run: "quantized", as stored;
# "dequantized", turned into float weights once at load (+1.5 GB at the released shape) for plain matmuls, with
# projections of one input merged. "auto": dequantized under CUDA, where MLX's quantized matmul is slow at a
# canvas's 256 rows (a step of 21.6 against 26.6 ms on the H200, bench/RESULTS.md); quantized elsewhere (Metal is
# unmeasured, and keeps the memory).
DENSE_WEIGHTS = ("auto", "quantized", "dequantized")


def dense_weights_here(dense_weights: str = "auto") -> str:
    """ "auto" resolved for this device: "dequantized" under CUDA, else "quantized"."""
    if dense_weights not in DENSE_WEIGHTS:
        raise ValueError(f"dense weights {dense_weights!r}: choose from {', '.join(DENSE_WEIGHTS)}")
    if dense_weights == "auto":
        return "dequantized" if on_cuda() else "quantized"
    return dense_weights


def place_dense_layers(model: nn.Module, dense_weights: str = "auto") -> None:
    """Dequantize the model's quantized dense layers when `dense_weights` (resolved here) says so.

    One module's layers at a time: each quantized layer is freed as its twin comes in, so memory never holds
    both sets whole.
    """
    if dense_weights_here(dense_weights) == "dequantized":
        for twins in _dequantized_by_owner(model):
            swap_modules(model, twins)


def place_for_host_kernels(model: Model) -> int:
    """On the CPU, hold the float32 experts, dense MLPs, attention projections and embedding table packed for the
    C kernels (host_kernels); returns how many parts were packed."""
    if not on_cpu() or host_kernels.library() is None:
        return 0
    # Only the blocks are kept in hand (model.modules() lists their weights too, which would outlive the packing).
    blocks = [module for module in model.modules() if isinstance(module, (Attention, Experts, GatedMLP))]
    packed = sum(module.pack_for_host() for module in blocks)
    decoder = model.model.decoder
    if host_kernels.embedding_packable(decoder.embed_tokens, host_kernels.panel_width()):
        decoder.embed_tokens = host_kernels.PackedEmbedding(decoder.embed_tokens, host_kernels.panel_width())
        mx.eval(decoder.embed_tokens.packed)  # the unpacked table is freed here
        packed += 1
    return packed


# Projections that read the same input, merged into one matmul among the float twins: (the parts, the merged name).
FUSED_PROJECTIONS = ((("q_proj", "k_proj", "v_proj"), "fused_qkv"), (("gate_proj", "up_proj"), "fused_gate_up"))


def dequantized_dense_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Float twins of the model's quantized dense linears (attention, dense MLPs), by module path.

    Each holds its weights dequantized to the scales' dtype. Projections of one input are also merged into one
    linear (`fused_qkv` beside an attention's q/k/v projections, `fused_gate_up` beside a gated MLP's), whose
    weight the separate twins then view: a step makes a third fewer matmuls, and the host, which sets a GPU
    step's pace, queues fewer ops. The experts and the embedding are left out: the experts have kernels of
    their own, and the tied embedding stays quantized for the head and for self-conditioning.
    """
    return {path: twin for twins in _dequantized_by_owner(model) for path, twin in twins.items()}


def _dequantized_by_owner(model: nn.Module) -> Iterator[dict[str, nn.Module]]:
    """For each module that holds quantized linears: their float twins and merged projections, by path."""
    owners = [(path, module) for path, module in model.named_modules() if _quantized_children(module)]
    for path, owner in owners:
        prefix = f"{path}." if path else ""
        twins = {name: _float_twin(child) for name, child in _quantized_children(owner).items()}
        for names, merged_name in FUSED_PROJECTIONS:
            parts = [twins[name] for name in names if name in twins]
            if len(parts) >= 2 and len(parts) == sum(name in owner for name in names) and _alike(parts):
                twins[merged_name] = _merged(parts)
        yield {prefix + name: twin for name, twin in twins.items()}


def _quantized_children(module: nn.Module) -> dict[str, nn.QuantizedLinear]:
    return {name: child for name, child in module.items() if isinstance(child, nn.QuantizedLinear)}


def _alike(parts: list[nn.Linear]) -> bool:
    return len({("bias" in part, part.weight.dtype) for part in parts}) == 1


def _float_twin(module: nn.QuantizedLinear) -> nn.Linear:
    twin = nn.Linear(1, 1, bias="bias" in module)  # its shapes come with the weights below
    weight = mx.dequantize(
        module.weight,
        module.scales,
        module.get("biases"),
        group_size=module.group_size,
        bits=module.bits,
        mode=module.mode,
    )
    twin.weight = weight.astype(module.scales.dtype)
    if "bias" in module:
        twin.bias = module.bias
    mx.eval(twin.parameters())
    return twin


def _merged(parts: list[nn.Linear]) -> nn.Linear:
    """One linear computing the parts' outputs side by side; each part's weight becomes a view of its rows."""
    merged = nn.Linear(1, 1, bias="bias" in parts[0])
    merged.weight = mx.concatenate([part.weight for part in parts])
    if "bias" in parts[0]:
        merged.bias = mx.concatenate([part.bias for part in parts])
    mx.eval(merged.parameters())
    start = 0
    for part in parts:
        rows = slice(start, start + part.weight.shape[0])
        part.weight = merged.weight[rows]
        if "bias" in part:
            part.bias = merged.bias[rows]
        mx.eval(part.parameters())
        start = rows.stop
    return merged


def swap_modules(model: nn.Module, modules: dict[str, nn.Module | None]) -> dict[str, nn.Module | None]:
    """Put each module at its dotted path in `model` (None: remove it); returns what was there, by path (None:
    nothing), which swaps back."""
    replaced = {}
    for path, module in modules.items():
        *parents, name = path.split(".")
        parent: Any = model
        for part in parents:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        replaced[path] = parent.get(name)
        if module is None:
            parent.pop(name, None)
        else:
            setattr(parent, name, module)
    return replaced


def load(path_or_repo: str | Path, revision: str | None = None, dense_weights: str = "auto") -> tuple[Model, Any]:
    """The model and its tokenizer (mlx-lm's TokenizerWrapper) from a checkpoint."""
    from .tokenizer import load_tokenizer

    path = resolve_model_path(path_or_repo, revision)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise LoadError(f"no tokenizer in {path}: expected one of {', '.join(TOKENIZER_FILES)}")
    return load_model(path, dense_weights=dense_weights), load_tokenizer(path)


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
