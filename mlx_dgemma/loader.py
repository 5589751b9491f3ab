"""Find a checkpoint, read its weights and build the model.

Reads Google's Hugging Face layout as released and MLX conversions (ours and
the community's, written by mlx-vlm), quantized or not.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from . import backends
from .backends import cuda
from .config import VISION_PREFIXES, ConfigError, ModelConfig, VisionConfig
from .images import VisionSettings
from .model import Model
from .sampler import SamplerSettings

# The ranges of clipped linear layers, meaningful only when the vision config asks for clipping.
_CLIP_RANGES = (".input_min", ".input_max", ".output_min", ".output_max")
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
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.jinja", "*.model", "tokenizer*", "*.txt"]
    # Only names that are not local paths get here, and a mistyped path ("ck/q4x") reads as a repo id:
    # say both. The hint names no option: commands take the model as --model or as an argument.
    nowhere = f"there is no local directory {repo_id}"
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except RepositoryNotFoundError:
        raise LoadError(f"{nowhere}, and no model {repo_id!r} on the Hugging Face hub (or it needs a login)") from None
    except Exception as error:  # offline, unreachable, refused: whatever the transport raised, one line
        offline = os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0")
        if offline:
            reason, way_out = "HF_HUB_OFFLINE is set and it is not in the local cache", ", or unset HF_HUB_OFFLINE"
        elif isinstance(error, LocalEntryNotFoundError):  # the hub unreachable, nothing cached
            reason, way_out = "the hub cannot be reached and it is not in the local cache", ", or retry online"
        else:
            reason, way_out = " ".join(str(error).split())[:200] or "the download failed", ""
        raise LoadError(
            f"{nowhere}, and {repo_id!r} cannot be fetched from the Hugging Face hub ({reason}); "
            f"pass a local checkpoint directory{way_out}"
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


def sanitize(weights: dict[str, mx.array], vision: VisionConfig | None = None) -> dict[str, mx.array]:
    """Map checkpoint keys onto the model's parameter names.

    Dropped: the encoder's copies of tied weights (the released checkpoint stores none), a head tied to the
    embeddings, RoPE tables recomputed from the config, a vision tower config.json does not describe, and
    clipping ranges a vision tower without clipping ignores.
    """
    out = {}
    for key, value in weights.items():
        if "rotary_emb" in key or key == "lm_head.weight":
            continue
        if key.startswith(VISION_PREFIXES):
            if vision is not None and (vision.use_clipped_linears or not key.endswith(_CLIP_RANGES)):
                out[key] = value
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


def load_model(
    path: str | Path,
    revision: str | None = None,
    cuda_options: cuda.CudaOptions | None = None,
    adapter_path: str | Path | None = None,
) -> Model:
    """Build the model from a checkpoint directory (or hub repo id).

    The default device's plug-in, if any, is applied (backends/): under MLX's CUDA backend the CUDA plug-in with
    `cuda_options` (None: its defaults; `CudaOptions(enabled=False)`: none of it). `adapter_path`: a LoRA adapter
    directory (`dgemma lora`) put on the model first (lora.apply_adapter; its AdapterError is one line).
    """
    path = resolve_model_path(path, revision)
    options = cuda_options or cuda.CudaOptions()
    backends.prepare(options)
    try:
        config = ModelConfig.from_path(path)
    except ConfigError as error:
        raise LoadError(str(error)) from None
    weights = sanitize(read_weights(path), config.vision)
    if config.vision is not None and not any(key.startswith(VISION_PREFIXES) for key in weights):
        # A conversion that kept vision_config but not the tower: text only.
        config = dataclasses.replace(config, vision=None)
    model = Model(config)
    quantized = {key.removesuffix(".scales") for key in weights if key.endswith(".scales")}
    nn.quantize(model, class_predicate=lambda p, m: _quantization_params(config, p) if p in quantized else False)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as error:
        raise LoadError(f"{path}: weights do not match config.json: {_weights_mismatch(error)}") from None
    try:
        model.generation_settings = SamplerSettings.from_checkpoint(path, config.text)
    except ValueError as error:
        raise LoadError(f"{path}: generation_config.json: {error}") from None
    if config.vision is not None:
        try:
            model.vision_settings = VisionSettings.from_checkpoint(path, config.raw)
        except ValueError as error:
            raise LoadError(str(error)) from None
    mx.eval(model.parameters())
    del weights  # the model holds them now: what the plug-in replaces is freed as it goes
    if adapter_path is not None:
        from .lora.adapters import apply_adapter

        apply_adapter(model, adapter_path)  # before the plug-in, which leaves adapted layers as they are
    backends.apply(model, options)
    model.eval()
    return model


def load(
    path_or_repo: str | Path,
    revision: str | None = None,
    cuda_options: cuda.CudaOptions | None = None,
    adapter_path: str | Path | None = None,
) -> tuple[Model, Any]:
    """The model and its tokenizer (mlx-lm's TokenizerWrapper) from a checkpoint, with the LoRA adapter at
    `adapter_path` if given."""
    from .tokenizer import load_tokenizer

    path = resolve_model_path(path_or_repo, revision)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise LoadError(f"no tokenizer in {path}: expected one of {', '.join(TOKENIZER_FILES)}")
    return load_model(path, cuda_options=cuda_options, adapter_path=adapter_path), load_tokenizer(path)


def _weights_mismatch(error: Exception) -> str:
    """MLX's load_weights error on one line, the missing or unexpected names included (its message puts them on
    the lines after "Missing N parameters:")."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return " ".join(lines) if lines else type(error).__name__
