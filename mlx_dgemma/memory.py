"""What a checkpoint costs: parameters, bytes on disk, and peak memory for a context.

Everything here reads `config.json` and safetensors headers only, never tensor
data, so `dgemma info` and the check before loading are instant even for a
50 GB checkpoint.

Peak memory for a context of N tokens is estimated as

    weights                      tensors as stored, the vision tower's included (under CUDA the dense
                                 layers dequantized at load add `dequantized_dense_bytes`)
  + KV cache at N                per layer 2 (K, V) x kv_heads x head_dim x positions x dtype bytes,
                                 positions = min(N, window - 1) on sliding layers, N on full layers
  + vocabulary-wide arrays       6 x canvas x vocab x 4 bytes (float32 logits, tempered logits,
                                 Gumbel noise, softmax, entropy terms, self-conditioning input)
  + attention scores             query heads x Q x (N + Q) x 4 bytes, Q = max(canvas, prefill chunk)
  + one layer's KV copy          the decoder attends over [cache, canvas], a concatenated copy

A server keeps several caches (`caches`: its running requests' and its prompt
cache's) and may denoise several canvases as one batch (`rows`): the KV cache
counts once per cache; the vocabulary-wide arrays, the decoder's attention
scores and the layer copy once per row, and a batch of rows also holds a
stacked copy of its rows' caches.

The default context of a model with a vision tower holds one image besides the
text: `IMAGE_PROMPT_TOKENS` more positions.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .backends.cuda import CudaOptions

from .config import VISION_PREFIXES, ModelConfig
from .generate import PREFILL_CHUNK

# The context the pre-load check assumes when none is given: a long chat, not the model's maximum.
DEFAULT_CONTEXT = 4096
# One image's tokens in a prompt at the image processor's default budget: 280 soft tokens between <boi> and <eoi>.
IMAGE_PROMPT_TOKENS = 280 + 2
# Float32 arrays of canvas x vocab alive at once in a denoising step (see the module docstring).
VOCAB_ARRAYS = 6
FLOAT32_BYTES = 4
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip
_DTYPE_NAMES = {"float32": 4, "float16": 2, "bfloat16": 2, "F32": 4, "F16": 2, "BF16": 2}


class InsufficientMemoryError(RuntimeError):
    """The model cannot fit this machine's memory; the message is one line."""


# ----------------------------------------------------------------- parameters


@dataclass(frozen=True)
class _Tensor:
    module: str  # module path, as config.json's quantization overrides name it
    numel: int
    group: str  # embeddings, attention, dense_mlp, router, experts, self_conditioning, norms_and_scalars, vision
    matrix: bool  # a weight matrix that quantization may pack
    active_fraction: float = 1.0  # share used per token (experts: top_k / num_experts; the vision tower: none)
    in_features: int = 0  # a matrix's last dimension, which quantization groups split


def _tensors(config: ModelConfig) -> Iterator[_Tensor]:
    """Every parameter of the model, by module, as the loader builds it."""
    yield from _text_tensors(config)
    if config.vision is not None:
        yield from _vision_tensors(config)


def _vision_tensors(config: ModelConfig) -> Iterator[_Tensor]:
    """The vision tower and its projection: float in every conversion (never quantized), run once per image and
    not per token."""
    vision = config.vision
    hidden, heads, kv_heads, head_dim = (
        vision.hidden_size,
        vision.num_attention_heads,
        vision.num_key_value_heads,
        vision.head_dim,
    )
    prefix = "model.encoder.vision_tower"

    def tensor(module: str, numel: int) -> _Tensor:
        return _Tensor(module, numel, "vision", False, 0.0)

    yield tensor(f"{prefix}.patch_embedder.input_proj", vision.patch_dim * hidden)
    yield tensor(f"{prefix}.patch_embedder.position_embedding_table", 2 * vision.position_embedding_size * hidden)
    linears = {
        "self_attn.q_proj": heads * head_dim * hidden,
        "self_attn.k_proj": kv_heads * head_dim * hidden,
        "self_attn.v_proj": kv_heads * head_dim * hidden,
        "self_attn.o_proj": hidden * heads * head_dim,
        "mlp.gate_proj": vision.intermediate_size * hidden,
        "mlp.up_proj": vision.intermediate_size * hidden,
        "mlp.down_proj": hidden * vision.intermediate_size,
    }
    for index in range(vision.num_hidden_layers):
        layer = f"{prefix}.encoder.layers.{index}"
        for name, numel in linears.items():
            # Clipped linears store four scalar ranges each.
            yield tensor(f"{layer}.{name}", numel + (4 if vision.use_clipped_linears else 0))
        yield tensor(f"{layer}.norms", 2 * head_dim + 4 * hidden)
    if vision.standardize:
        yield tensor(f"{prefix}.standardization", 2 * hidden)
    yield tensor("model.encoder.embed_vision.embedding_projection", hidden * config.text.hidden_size)


def _text_tensors(config: ModelConfig) -> Iterator[_Tensor]:
    """Every text parameter of the model, by module, as the loader builds it."""
    text = config.text
    hidden, heads = text.hidden_size, text.num_attention_heads
    experts, top_k, moe = text.num_experts, text.top_k_experts, text.moe_intermediate_size
    dense = text.intermediate_size
    yield _Tensor("model.decoder.embed_tokens", text.vocab_size * hidden, "embeddings", True, 1.0, hidden)
    for index, shape in enumerate(text.layers):
        prefix = f"model.decoder.layers.{index}"
        q_width, kv_width = heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim
        # name -> (output width, input width)
        projections = {"q_proj": (q_width, hidden), "k_proj": (kv_width, hidden), "o_proj": (hidden, q_width)}
        if shape.is_sliding:  # full layers use their keys as values: no v_proj
            projections["v_proj"] = (kv_width, hidden)
        for name, (width, inputs) in projections.items():
            yield _Tensor(f"{prefix}.self_attn.{name}", width * inputs, "attention", True, 1.0, inputs)
            if text.attention_bias:
                yield _Tensor(f"{prefix}.self_attn.{name}.bias", width, "attention", False)
        yield _Tensor(f"{prefix}.self_attn.q_norm", shape.head_dim, "norms_and_scalars", False)
        yield _Tensor(f"{prefix}.self_attn.k_norm", shape.head_dim, "norms_and_scalars", False)
        for name in ("gate_proj", "up_proj", "down_proj"):
            yield _Tensor(f"{prefix}.mlp.{name}", hidden * dense, "dense_mlp", True, 1.0, _in(name, hidden, dense))
        yield _Tensor(f"{prefix}.router.proj", hidden * experts, "router", True, 1.0, hidden)
        yield _Tensor(f"{prefix}.router.scale", hidden, "router", False)
        yield _Tensor(f"{prefix}.router.per_expert_scale", experts, "router", False)
        share = top_k / experts
        yield _Tensor(f"{prefix}.experts.gate_up_proj", experts * 2 * moe * hidden, "experts", True, share, hidden)
        yield _Tensor(f"{prefix}.experts.down_proj", experts * hidden * moe, "experts", True, share, moe)
        # Seven norms around attention, the dense MLP and the MoE; the decoder's
        # and the encoder's per-layer scalars.
        yield _Tensor(f"{prefix}.norms", 7 * hidden, "norms_and_scalars", False)
        yield _Tensor(f"{prefix}.layer_scalar", 1, "norms_and_scalars", False)
        yield _Tensor(f"model.encoder.language_model.layers.{index}.layer_scalar", 1, "norms_and_scalars", False)
    yield _Tensor("model.decoder.norm", hidden, "norms_and_scalars", False)
    yield _Tensor("model.decoder.self_conditioning.pre_norm", hidden, "self_conditioning", False)
    for name in ("gate_proj", "up_proj", "down_proj"):
        inputs = _in(name, hidden, dense)
        yield _Tensor(f"model.decoder.self_conditioning.{name}", hidden * dense, "self_conditioning", True, 1.0, inputs)


def _in(name: str, hidden: int, inner: int) -> int:
    """Input width of a gated MLP's projection."""
    return inner if name == "down_proj" else hidden


@dataclass(frozen=True)
class ParameterCount:
    total: int
    active: int  # used for one token: all but the top_k / num_experts share of the experts
    groups: dict[str, int]


def count_parameters(config: ModelConfig) -> ParameterCount:
    """Parameters from the config alone (the embedding is tied to the output head: counted once); active per token
    leaves out the unused experts' share and the vision tower, which runs once per image."""
    groups: dict[str, int] = {}
    total = active = 0.0
    for tensor in _tensors(config):
        groups[tensor.group] = groups.get(tensor.group, 0) + tensor.numel
        total += tensor.numel
        active += tensor.numel * tensor.active_fraction
    return ParameterCount(int(total), int(round(active)), groups)


# ----------------------------------------------------------------- bytes


def _safetensors_files(path: Path) -> list[Path]:
    return sorted(Path(path).glob("*.safetensors"))


def model_bytes(path: str | Path) -> int:
    """Size on disk of the checkpoint's weights (every *.safetensors file)."""
    return sum(file.stat().st_size for file in _safetensors_files(Path(path)))


class WeightsFileError(ValueError):
    """A *.safetensors file that is not one, or is cut short; the message is one line."""


# Real headers are a few MB at most; a larger length field is random bytes or corruption.
MAX_HEADER_BYTES = 100_000_000


def read_safetensors_header(file: Path) -> dict[str, Any]:
    """name -> {dtype, shape, data_offsets} of a safetensors file, checked against the file's size.

    The format: an 8-byte little-endian header length, that many bytes of JSON,
    then the tensors' data, which each entry's data_offsets locate. Raises
    `WeightsFileError` when the file is not safetensors or its data is cut short.
    """
    size = file.stat().st_size
    with file.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise WeightsFileError(f"cannot read {file}: {size} bytes, too short for a safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise WeightsFileError(
                f"cannot read {file}: not a safetensors file, or cut short (a {length}-byte header in {size} bytes)"
            )
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except ValueError:  # bad JSON, or bytes that are not UTF-8
        header = None
    if not isinstance(header, dict):
        raise WeightsFileError(f"cannot read {file}: not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    data_end = max((_data_end(file, name, entry) for name, entry in header.items()), default=0)
    if 8 + length + data_end > size:
        raise WeightsFileError(
            f"cannot read {file}: cut short, {size} bytes on disk where its header needs {8 + length + data_end}"
        )
    return header


def _data_end(file: Path, name: str, entry: Any) -> int:
    """Where a header entry's data ends (relative to the data section), once the entry is checked."""
    try:
        shape = [int(size) for size in entry["shape"]]
        begin, end = (int(offset) for offset in entry["data_offsets"])
        dtype = entry["dtype"]
    except (TypeError, KeyError, ValueError):
        raise WeightsFileError(f"cannot read {file}: a malformed header entry for tensor {name}") from None
    count = 1
    for size in shape:
        count *= size
    itemsize = _DTYPE_BYTES.get(dtype)
    # Dtypes this table lacks (newer float formats) are left to the loader; offsets must still be in order.
    if min(shape, default=0) < 0 or not 0 <= begin <= end or (itemsize and end - begin != count * itemsize):
        raise WeightsFileError(
            f"cannot read {file}: tensor {name}'s data offsets {begin}..{end} do not match its shape {shape}"
        )
    return end


def check_weights(path: str | Path) -> list[Path]:
    """The checkpoint's *.safetensors files, each header checked (`read_safetensors_header`); raises
    `WeightsFileError` for none or a broken one. Reads headers only: instant even for 50 GB."""
    files = _safetensors_files(Path(path))
    if not files:
        raise WeightsFileError(f"no *.safetensors weights in {path}")
    for file in files:
        read_safetensors_header(file)
    return files


def _all_tensor_headers(path: Path) -> dict[str, dict[str, Any]] | None:
    """name -> {dtype, shape} for every stored tensor, or None when a header is unreadable."""
    tensors: dict[str, dict[str, Any]] = {}
    try:
        for file in _safetensors_files(path):
            tensors.update(read_safetensors_header(file))
    except (OSError, ValueError):
        return None  # the loader reports a broken file with a better message
    return tensors


def _text_tensor_headers(path: Path) -> dict[str, dict[str, Any]] | None:
    """The text model's tensors: all but the vision tower and its projection."""
    tensors = _all_tensor_headers(path)
    if tensors is None:
        return None
    return {name: info for name, info in tensors.items() if not name.startswith(VISION_PREFIXES)}


def _loaded_tensor_headers(path: Path, config: ModelConfig) -> dict[str, dict[str, Any]] | None:
    """The tensors the loader keeps: the text model's, and the vision tower's when config.json describes one."""
    return _all_tensor_headers(path) if config.has_vision else _text_tensor_headers(path)


def vision_bytes(path: str | Path) -> int:
    """Bytes of the vision tower's tensors (and its projection's)."""
    tensors = _all_tensor_headers(Path(path)) or {}
    return sum(_tensor_bytes(info) for name, info in tensors.items() if name.startswith(VISION_PREFIXES))


def default_context(config: ModelConfig) -> int:
    """The context the estimates assume when none is given: a long chat, with one image where the model reads
    images; never beyond the model's context."""
    images = IMAGE_PROMPT_TOKENS if config.has_vision else 0
    return min(DEFAULT_CONTEXT + images, config.text.max_position_embeddings)


def _tensor_bytes(info: dict[str, Any]) -> int:
    count = 1
    for size in info.get("shape", []):
        count *= int(size)
    return count * _DTYPE_BYTES.get(info.get("dtype", ""), 2)


def _activation_bytes_per_value(config: ModelConfig, headers: dict[str, dict[str, Any]] | None) -> int:
    """Bytes of one activation (and KV entry): the embedding's float dtype, as the model computes in it."""
    if headers:
        for name in ("model.decoder.embed_tokens.scales", "model.decoder.embed_tokens.weight"):
            dtype = headers.get(name, {}).get("dtype")
            if dtype in _DTYPE_NAMES:
                return _DTYPE_NAMES[dtype]
    dtype = config.raw.get("dtype") or config.raw.get("torch_dtype") or config.raw.get("text_config", {}).get("dtype")
    return _DTYPE_NAMES.get(str(dtype), 2)


def _quantized_as(config: ModelConfig, tensor: _Tensor) -> tuple[int, int] | None:
    """(bits, group size) a matrix is likely stored with according to config.json, or None for float."""
    quantization = config.quantization
    if not quantization or not tensor.matrix:
        return None
    specific = quantization.get(tensor.module)
    if specific is False:
        return None
    if isinstance(specific, dict):
        return int(specific["bits"]), int(specific["group_size"])
    group = int(quantization["group_size"])
    # Converters leave a matrix float when the group size does not divide its rows.
    return (int(quantization["bits"]), group) if tensor.in_features % group == 0 else None


def config_weight_bytes(config: ModelConfig, value_bytes: int = 2) -> int:
    """Weight bytes from the config alone: quantized matrices at their bits plus a scale and bias per group."""
    total = 0.0
    for tensor in _tensors(config):
        quantized = _quantized_as(config, tensor)
        total += tensor.numel * value_bytes if quantized is None else _packed_bytes(tensor, *quantized, value_bytes)
    return int(total)


def _packed_bytes(tensor: _Tensor, bits: int, group: int, value_bytes: int) -> float:
    """A quantized matrix's bytes: its codes plus a scale and a bias per group."""
    return tensor.numel * bits / 8 + 2 * tensor.numel / group * value_bytes


# What the CUDA plug-in dequantizes at load (backends/cuda.py, dequantize_dense): every quantized linear but the
# experts and the embedding.
DEQUANTIZED_GROUPS = ("attention", "dense_mlp", "router", "self_conditioning")


def dequantized_dense_bytes(path_or_config: str | Path | ModelConfig) -> int:
    """What dequantizing the quantized dense layers at load adds to the weights (0 for a float checkpoint).

    For a checkpoint directory its safetensors headers say what is stored; for a config alone, its
    quantization block does (every matrix it does not exempt counts as quantized: an upper bound).
    """
    if isinstance(path_or_config, ModelConfig):
        config, headers = path_or_config, None
    else:
        config = ModelConfig.from_path(path_or_config)
        headers = _text_tensor_headers(Path(path_or_config))
    value_bytes = _activation_bytes_per_value(config, headers)
    extra = 0.0
    for tensor in _tensors(config):
        if tensor.group not in DEQUANTIZED_GROUPS or not tensor.matrix:
            continue
        if headers is not None:
            parts = [headers.get(f"{tensor.module}.{name}") for name in ("weight", "scales", "biases")]
            if parts[1] is not None:  # quantized as stored
                extra += tensor.numel * value_bytes - sum(_tensor_bytes(info) for info in parts if info)
            continue
        quantized = _quantized_as(config, tensor)
        if quantized is not None:
            extra += tensor.numel * value_bytes - _packed_bytes(tensor, *quantized, value_bytes)
    return int(extra)


def kv_cache_bytes(config: ModelConfig, context: int, value_bytes: int = 2) -> int:
    """Keys and values the encoder cache holds after `context` tokens."""
    return sum(_layer_kv_bytes(config, shape, context, value_bytes) for shape in config.text.layers)


def _layer_kv_bytes(config: ModelConfig, shape: Any, context: int, value_bytes: int) -> int:
    positions = min(context, config.text.sliding_window - 1) if shape.is_sliding else context
    return 2 * shape.num_key_value_heads * shape.head_dim * positions * value_bytes


@dataclass(frozen=True)
class MemoryEstimate:
    context: int
    weights: int
    kv_cache: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations


def config_and_weights(path_or_config: str | Path | ModelConfig) -> tuple[ModelConfig, int, int]:
    """The config, the weights' bytes as loaded (from the safetensors headers; from the config when there are no
    weights) and the bytes of one activation value."""
    if isinstance(path_or_config, ModelConfig):
        config = path_or_config
        value_bytes = _activation_bytes_per_value(config, None)
        return config, config_weight_bytes(config, value_bytes), value_bytes
    path = Path(path_or_config)
    config = ModelConfig.from_path(path)
    headers = _loaded_tensor_headers(path, config)
    value_bytes = _activation_bytes_per_value(config, headers)
    if headers:
        weights = sum(_tensor_bytes(info) for info in headers.values())
    elif _safetensors_files(path):
        weights = model_bytes(path)
    else:
        weights = config_weight_bytes(config, value_bytes)
    return config, weights, value_bytes


def estimate_memory(
    path_or_config: str | Path | ModelConfig, context: int, caches: int = 1, rows: int = 1
) -> MemoryEstimate:
    """The estimate's parts for a context of `context` tokens, `caches` caches of it kept and `rows` canvases
    denoised as one batch (see the module docstring)."""
    if context < 1:
        raise ValueError(f"context must be a positive number of tokens, got {context}")
    config, weights, value_bytes = config_and_weights(path_or_config)
    text = config.text
    canvas = config.canvas_length
    vocab_wide = rows * VOCAB_ARRAYS * canvas * text.vocab_size * FLOAT32_BYTES
    # The larger of a batch's canvases attending over their caches and a prefill chunk over its own.
    score_values = max(rows * canvas * (context + canvas), PREFILL_CHUNK * (context + PREFILL_CHUNK))
    scores = text.num_attention_heads * score_values * FLOAT32_BYTES
    layer_copy = rows * max(_layer_kv_bytes(config, shape, context + canvas, value_bytes) for shape in text.layers)
    one_cache = kv_cache_bytes(config, context, value_bytes)
    stacked = rows * one_cache if rows > 1 else 0
    return MemoryEstimate(context, weights, caches * one_cache, vocab_wide + scores + layer_copy + stacked)


def estimate_peak_bytes(path_or_config: str | Path | ModelConfig, context: int) -> int:
    """Estimated peak memory, in bytes, to serve a context of `context` tokens."""
    return estimate_memory(path_or_config, context).total


# ----------------------------------------------------------------- the machine


def available_memory() -> tuple[int, str]:
    """Bytes the model may use here, and where that figure comes from."""
    import mlx.core as mx

    # Unified memory on a Mac: Metal's recommended working set, the figure
    # mlx-lm's wired_limit also uses. On CUDA: the GPU's memory.
    try:
        if mx.metal.is_available():
            return int(mx.device_info()["max_recommended_working_set_size"]), "Metal's recommended working set"
        if mx.cuda.is_available():
            info = mx.device_info()
            size = info.get("total_memory") or info.get("memory_size")
            if size:
                return int(size), "GPU memory"
    except (AttributeError, KeyError, RuntimeError, TypeError, ValueError):
        pass  # fall back to the RAM figure
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical RAM"


def available_bytes() -> int:
    """Memory this machine offers a model, in bytes."""
    return available_memory()[0]


def check_fits(path: str | Path, context: int | None = None) -> MemoryEstimate:
    """The estimate for `path` at `context` tokens (capped at the model's context; None: `default_context`);
    raises when it cannot fit."""
    config = ModelConfig.from_path(path)
    context = default_context(config) if context is None else min(context, config.text.max_position_embeddings)
    estimate = estimate_memory(path, context)
    available, source = available_memory()
    if estimate.total > available:
        raise InsufficientMemoryError(
            f"{path} needs about {format_bytes(estimate.total)} for a {context}-token context "
            f"(weights {format_bytes(estimate.weights)}), more than this machine's {format_bytes(available)} "
            f"({source}); use a smaller quantization (dgemma convert --bits 4) or a machine with more memory"
        )
    return estimate


def cuda_options_that_fit(path: str | Path, estimate: MemoryEstimate) -> tuple[CudaOptions | None, int]:
    """`load_model`'s cuda_options for a checkpoint that fits as stored (`estimate`), and the bytes the CUDA
    plug-in adds: None (its defaults) where it does not run or its dequantized dense layers fit, else options
    that keep those layers quantized (adding none)."""
    from .backends import cuda

    if not cuda.available():
        return None, 0
    extra = dequantized_dense_bytes(path)
    if estimate.total + extra <= available_memory()[0]:
        return None, extra
    return cuda.CudaOptions(dequantize_dense=False), 0


# ----------------------------------------------------------------- descriptions


def format_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def format_count(count: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(count) < 1000:
            return f"{count:.0f}" if unit == "" else f"{count:.2f}{unit}"
        count /= 1000
    return f"{count:.2f}T"


def _module_kind(module: str) -> str:
    """`model.decoder.layers.12.self_attn.q_proj` -> `self_attn.q_proj`."""
    parts = module.split(".")
    if "layers" in parts:
        index = parts.index("layers")
        return ".".join(parts[index + 2 :])
    return ".".join(parts[2:]) if module.startswith("model.decoder.") else module


def quantization_summary(config: ModelConfig, headers_dtype: str | None = None) -> str:
    """`4-bit affine, group size 64; 8-bit g64: embed_tokens, mlp.down_proj, ... (N modules)`, or the dtype."""
    quantization = config.quantization
    if not quantization:
        dtype = config.raw.get("dtype") or config.raw.get("torch_dtype") or headers_dtype or "unknown dtype"
        return f"none ({dtype})"
    mode = quantization.get("mode", "affine")
    parts = [f"{quantization.get('bits')}-bit {mode}, group size {quantization.get('group_size')}"]
    overrides: dict[str, set[str]] = {}
    counts: dict[str, int] = {}
    for module, value in quantization.items():
        if module in ("bits", "group_size", "mode"):
            continue
        if value is False:
            key = "float"
        elif isinstance(value, dict):
            key = f"{value.get('bits')}-bit g{value.get('group_size')}"
            if value.get("mode", mode) != mode:
                key += f" {value['mode']}"
        else:
            continue
        overrides.setdefault(key, set()).add(_module_kind(module))
        counts[key] = counts.get(key, 0) + 1
    for key in sorted(overrides):
        kinds = ", ".join(sorted(overrides[key]))
        parts.append(f"{key}: {kinds} ({counts[key]} modules)")
    return "; ".join(parts)


def checkpoint_dtype(path: str | Path) -> str | None:
    """The float dtype most text tensors are stored in, from the headers."""
    headers = _text_tensor_headers(Path(path)) or {}
    counts: dict[str, int] = {}
    for info in headers.values():
        dtype = info.get("dtype", "")
        if dtype in ("F32", "F16", "BF16"):
            counts[dtype] = counts.get(dtype, 0) + 1
    if not counts:
        return None
    return {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[max(counts, key=counts.__getitem__)]
