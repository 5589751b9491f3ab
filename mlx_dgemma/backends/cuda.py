"""The CUDA plug-in: what only MLX's CUDA backend needs, applied to a loaded model once (`apply`).

The model and sampler run one MLX graph on every backend, the graph a Mac
runs. On CUDA some of MLX's stock ops are slow at a canvas's shapes, and the
host that queues a step's ops sets its pace; each option here replaces one
piece with what measured faster on an H200 (bench/RESULTS.md):

- `fused_experts`: the experts' 4-bit matmuls through our tile kernels
  (backends/cuda_kernels.py) instead of sorted `gather_qmm`;
- `router_kernel`: each token's top-k experts in one launch instead of a
  dozen stock ops;
- `dequantize_dense`: the quantized dense layers (attention, dense MLPs,
  self-conditioning's MLP) dequantized once at load, with projections of one
  input merged into one matmul (MLX's CUDA quantized matmul is slow at 256
  rows; costs memory: `memory.dequantized_dense_bytes`);
- `grouped_attention`: each KV head's queries as one matmul (MLX's CUDA
  attention has no fused kernel for head sizes 256 and 512 and repeats KV
  heads instead);
- `ops_per_graph`: how many ops MLX records per CUDA graph.

Each replacement subclasses a core module and computes the same thing; tests
hold the pure-MLX ones to the core's logits on any backend.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..model import MLP, Attention, Experts, Model, Router
from . import cuda_kernels


@dataclass(frozen=True)
class CudaOptions:
    """Which CUDA replacements `apply` makes (all on by default; `enabled=False`: none)."""

    enabled: bool = True
    fused_experts: bool = True
    router_kernel: bool = True
    dequantize_dense: bool = True
    grouped_attention: bool = True
    # MLX's default is 20; a step is a few thousand ops and the host's queueing sets its time.
    ops_per_graph: int = 100


def available() -> bool:
    """Whether MLX's default device is a CUDA GPU."""
    cuda = getattr(mx, "cuda", None)
    return mx.default_device().type == mx.gpu and cuda is not None and cuda.is_available()


def prepare(options: CudaOptions) -> None:
    """Settings MLX reads at its first launch: called before any weight is read (an explicit
    MLX_MAX_OPS_PER_BUFFER wins)."""
    os.environ.setdefault("MLX_MAX_OPS_PER_BUFFER", str(options.ops_per_graph))


def apply(model: Model, options: CudaOptions) -> None:
    """Replace the model's pieces as `options` says, in place."""
    for layer in model.layers:
        if options.grouped_attention:
            _become(layer.self_attn, GroupedAttention)
        if options.router_kernel and cuda_kernels.available():
            _become(layer.router, KernelRouter)
        if options.fused_experts:
            _become(layer.experts, FusedExperts)
            layer.experts.activation = model.text_config.hidden_activation
    if options.dequantize_dense:
        for module in list(model.modules()):
            if isinstance(module, Attention):
                _dequantize(module, ("q_proj", "k_proj", "v_proj"), "fused_qkv", MergedQKV)
            elif isinstance(module, MLP):
                _dequantize(module, ("gate_proj", "up_proj"), "fused_gate_up", MergedGateUp)


def _become(module: nn.Module, kind: type) -> None:
    """Make `module` a `kind`: a subclass (or a mixin over its class) computing the same from the same weights;
    only methods change."""
    if not issubclass(kind, type(module)):
        kind = _mixed(kind, type(module))
    module.__class__ = kind


_MIXED: dict[tuple[type, type], type] = {}


def _mixed(mixin: type, base: type) -> type:
    if (mixin, base) not in _MIXED:
        _MIXED[mixin, base] = type(f"{mixin.__name__}{base.__name__}", (mixin, base), {})
    return _MIXED[mixin, base]


class GroupedAttention(Attention):
    """Attention as two matmuls over each KV head's queries stacked, the softmax between them in float32."""

    def attend(self, queries: mx.array, keys: mx.array, values: mx.array, mask: mx.array | None) -> mx.array:
        batch, heads, length, dim = queries.shape
        kv_heads, positions = keys.shape[1], keys.shape[2]
        group = heads // kv_heads
        scores = queries.reshape(batch, kv_heads, group * length, dim) @ keys.swapaxes(-1, -2)
        if mask is not None:
            lowest = mx.array(mx.finfo(scores.dtype).min, dtype=scores.dtype)
            grouped = scores.reshape(batch, kv_heads, group, length, positions)
            scores = mx.where(mask[:, :, None], grouped, lowest).reshape(scores.shape)
        weights = mx.softmax(scores, axis=-1, precise=True)
        return (weights @ values).reshape(batch, heads, length, values.shape[-1])


class MergedQKV:
    """Mixin for Attention: the q, k and v projections as one matmul (`fused_qkv`)."""

    def projections(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array | None]:
        queries = self.num_heads * self.head_dim
        splits = [queries, queries + self.num_kv_heads * self.head_dim] if "v_proj" in self else [queries]
        queries, keys, *values = mx.split(self.fused_qkv(x), splits, axis=-1)
        return queries, keys, values[0] if values else None


class MergedGateUp:
    """Mixin for a gated MLP: the gate and up projections as one matmul (`fused_gate_up`)."""

    def gate_and_up(self, x: mx.array) -> tuple[mx.array, mx.array]:
        gate, up = mx.split(self.fused_gate_up(x), 2, axis=-1)
        return gate, up


class KernelRouter(Router):
    """The router with its top-k and weights in one kernel launch."""

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        scores = self.proj(mx.fast.rms_norm(x, self.scale * self.root_size, self.eps))
        flat = scores.reshape(-1, scores.shape[-1])
        indices, weights = cuda_kernels.top_k_routes(flat, self.per_expert_scale, self.top_k)
        return indices.reshape(*x.shape[:-1], -1), weights.reshape(*x.shape[:-1], -1)


# Rows per tile of the fused kernels.
TILE_ROWS = 16


class FusedExperts(Experts):
    """The experts through our tile kernels where they apply (4-bit, groups of 64, bf16), else the core's path."""

    activation: str

    def __call__(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        if not cuda_kernels.fused_supports(self.gate_up_proj, self.down_proj, x.dtype, self.activation):
            return super().__call__(x, indices, weights)
        flat = x.reshape(-1, x.shape[-1])
        tokens = flat.shape[0]
        out = cuda_kernels.fused_experts(
            flat,
            indices.reshape(tokens, -1),
            weights.reshape(tokens, -1),
            self.gate_up_proj,
            self.down_proj,
            self.activation,
            TILE_ROWS,
        )
        return out.reshape(x.shape)


def _dequantize(owner: nn.Module, merged_names: tuple[str, ...], merged_name: str, merger: type) -> None:
    """Replace `owner`'s quantized linears by float ones; merge those of `merged_names` it has into one linear
    whose rows the separate ones then view, called through the `merger` mixin."""
    quantized = [name for name, child in owner.items() if isinstance(child, nn.QuantizedLinear)]
    for name in quantized:
        setattr(owner, name, _dequantized(owner[name]))  # each quantized layer freed as its twin comes in
    present = [name for name in merged_names if name in owner]
    parts = [owner[name] for name in present]
    mergeable = len(parts) >= 2 and all(name in quantized for name in present)
    if not mergeable or len({("bias" in part, part.weight.dtype) for part in parts}) != 1:
        return
    merged = nn.Linear(1, 1, bias="bias" in parts[0])
    merged.weight = mx.concatenate([part.weight for part in parts])
    if "bias" in parts[0]:
        merged.bias = mx.concatenate([part.bias for part in parts])
    start = 0
    for part in parts:
        rows = slice(start, start + part.weight.shape[0])
        part.weight = merged.weight[rows]
        if "bias" in part:
            part.bias = merged.bias[rows]
        start = rows.stop
    setattr(owner, merged_name, merged)
    mx.eval(owner.parameters())
    _become(owner, merger)


def _dequantized(module: nn.QuantizedLinear) -> nn.Linear:
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
