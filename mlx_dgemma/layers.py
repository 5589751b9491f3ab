"""Building blocks of a DiffusionGemma transformer layer."""

from __future__ import annotations

import math
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import host_kernels
from .cache import LayerCache
from .config import LayerShape, RopeConfig, TextConfig
from .cpu import RowBlocks, cpu_cores, exp, on_cpu
from .host_kernels import PackedLinear
from .kernels import on_cuda

# gelu's tanh approximation as a logistic: 0.5·(1 + tanh(z)) = 1 / (1 + e^(-2z)), z = √(2/π)·(x + 0.044715x³).
_GELU_TANH_SCALE = -2 * math.sqrt(2 / math.pi)


def gelu_tanh(x: mx.array) -> mx.array:
    """gelu's tanh approximation (PyTorch's "tanh" gelu).

    In float32 on the CPU it is written as x / (1 + e^(−2z)) with the CPU's
    fast `exp` (its argument held within float32's range), three fused
    kernels: MLX's CPU `tanh` is its slowest elementwise op, and this form is 5×
    faster there than `nn.gelu_approx`, to float32 rounding. (In bf16 every step
    of it would round.) The `exp` kernel is traced once per shape; the experts'
    stacks change shape with the routing, and cycling through 30 shapes it
    still takes 0.67 ms a call at their size against 1.3 ms for the same
    logistic on MLX's `power`.
    """
    if not on_cpu() or x.dtype != mx.float32:
        return nn.gelu_approx(x)
    return _over_one_plus(x, exp(_minus_two_z(x), saturate=True))


@partial(mx.compile, shapeless=True)
def _minus_two_z(x: mx.array) -> mx.array:
    return x * (1 + 0.044715 * x * x) * _GELU_TANH_SCALE


@partial(mx.compile, shapeless=True)
def _over_one_plus(x: mx.array, e: mx.array) -> mx.array:
    return x / (1 + e)


def soft_cap(x: mx.array, cap: float, divisor: mx.array | None = None) -> mx.array:
    """cap · tanh(x / cap), then divided by `divisor` when given.

    In float32 on the CPU, without MLX's slow CPU `tanh`: cap · (1 − e) / (1 + e)
    with e = exp(−2|x| / cap) ≤ 1 (the CPU's fast `exp`), the sign put back
    after, and the division in the same fused pass: 2.4× faster there, within
    1e-5 absolute.
    """
    scale = -2 / cap
    cap = mx.array(cap, dtype=x.dtype)
    divisor = mx.array(1, dtype=x.dtype) if divisor is None else divisor  # x / 1 is x exactly
    if not on_cpu() or x.dtype != mx.float32:  # one fused kernel on a GPU
        return _tanh_cap_over(x, cap, divisor)
    return _signed_tanh_ratio_over(x, exp(mx.abs(x) * scale), cap, divisor)


@mx.compile
def _tanh_cap_over(x: mx.array, cap: mx.array, divisor: mx.array) -> mx.array:
    return mx.tanh(x / cap) * cap / divisor


@mx.compile
def _signed_tanh_ratio_over(x: mx.array, e: mx.array, cap: mx.array, divisor: mx.array) -> mx.array:
    return (cap * (1 - e) / (1 + e)) * mx.sign(x) / divisor


ACTIVATIONS = {
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_new": gelu_tanh,
    "gelu": nn.gelu,
    "silu": nn.silu,
    "relu": nn.relu,
}


class RMSNorm(nn.Module):
    """RMS norm whose weight multiplies directly (Gemma 4 stores w, not w - 1).

    MLX's fused norm, row by row, on every device. (On the CPU a matmul against
    a column of 1/n sums the squares faster, but a BLAS's matrix-vector product
    rounds some rows differently by how many rows it is given, and so by how
    many row blocks a step has: the same seed gave other tokens with 3 cores
    than with 2.)
    """

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight, self.eps)


def rms_normalize(x: mx.array, eps: float) -> mx.array:
    """Scale-free RMS norm (value states, router input, self-conditioning output), as RMSNorm computes it."""
    return mx.fast.rms_norm(x, None, eps)


class RotaryEmbedding(nn.Module):
    """RoPE over the whole head, in the rotate-half layout.

    "proportional" RoPE rotates only the first `partial_rotary_factor` of the
    frequency pairs; the others get an infinite wavelength, i.e. no rotation.
    """

    def __init__(self, head_dim: int, rope: RopeConfig):
        super().__init__()
        self.head_dim = head_dim
        self.base: float | None = rope.theta
        self.scale = 1.0
        self._freqs = None
        self._last_rotations: tuple[tuple[int, int], mx.array] | None = None
        if rope.rope_type == "linear":
            self.scale = 1.0 / rope.factor
        elif rope.rope_type == "proportional":
            rotated = int(rope.partial_rotary_factor * head_dim // 2)
            exponents = mx.arange(0, 2 * rotated, 2, dtype=mx.float32) / head_dim
            wavelengths = rope.factor * mx.power(rope.theta, exponents)
            unrotated = mx.full((head_dim // 2 - rotated,), mx.inf)
            self._freqs = mx.concatenate([wavelengths, unrotated])
            self.base = None

    def __call__(self, x: mx.array, offset: int | mx.array) -> mx.array:
        return mx.fast.rope(
            x, self.head_dim, traditional=False, base=self.base, scale=self.scale, offset=offset, freqs=self._freqs
        )

    def rotations(self, offset: int, length: int) -> mx.array:
        """(length, head_dim): for positions offset.., the cos then the sin of each angle, as this RoPE turns by.

        RoPE of (1, ..., 1, 0, ..., 0) is exactly that. The last table is kept: a canvas's steps ask for the same.
        """
        if self._last_rotations is None or self._last_rotations[0] != (offset, length):
            half = self.head_dim // 2
            basis = mx.concatenate([mx.ones((length, half)), mx.zeros((length, half))], axis=-1)
            self._last_rotations = ((offset, length), self(basis[None, None], offset)[0, 0])
        return self._last_rotations[1]


class Attention(nn.Module):
    """Self-attention with q/k norms, normed values and attention scale 1.

    Full-attention layers have no value projection: their values are the raw
    key projection, before the key norm and RoPE.

    On the CPU, a float32 attention whose heads fill the C kernels' panels
    runs in C at one host read (`_on_host`, host_kernels.attention), or as
    part of its whole layer there (TransformerLayer): MLX's ops spent 9 ms a
    layer at the bench's shape, half of it in elementwise passes and packing,
    where the kernels take about 5.
    """

    def __init__(self, config: TextConfig, shape: LayerShape):
        super().__init__()
        heads, kv_heads, head_dim = config.num_attention_heads, shape.num_key_value_heads, shape.head_dim
        bias = config.attention_bias
        self.num_heads, self.num_kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.eps = config.rms_norm_eps
        self.q_proj = nn.Linear(config.hidden_size, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_heads * head_dim, bias=bias)
        if shape.is_sliding:
            self.v_proj = nn.Linear(config.hidden_size, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, config.hidden_size, bias=bias)
        self.q_norm = RMSNorm(head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(head_dim, config.rms_norm_eps)
        self.rope = RotaryEmbedding(head_dim, shape.rope)
        self._host_views = host_kernels.HostViews(lambda views: host_kernels.AttentionWeights(*views, self.eps))

    def _heads(self, x: mx.array, count: int) -> mx.array:
        batch, length, _ = x.shape
        return x.reshape(batch, length, count, self.head_dim)

    def keys_and_values(self, x: mx.array, offset: int | mx.array) -> tuple[mx.array, mx.array]:
        """Keys and values of `x`, shaped (batch, kv_heads, length, head_dim)."""
        return self._states(self.k_proj(x), self.v_proj(x) if "v_proj" in self else None, offset)

    def _states(self, keys: mx.array, values: mx.array | None, offset: int | mx.array) -> tuple[mx.array, mx.array]:
        # Full-attention layers have no value projection: their values are the raw keys.
        raw_keys = self._heads(keys, self.num_kv_heads)
        raw_values = raw_keys if values is None else self._heads(values, self.num_kv_heads)
        keys = self.rope(self.k_norm(raw_keys).transpose(0, 2, 1, 3), offset)
        values = rms_normalize(raw_values, self.eps).transpose(0, 2, 1, 3)
        return keys, values

    def states(self, blocks: RowBlocks, xs: list[mx.array], offset: int) -> tuple[mx.array, mx.array]:
        """Keys and values of every block's positions, put together (batch, kv_heads, length, head_dim)."""
        if self.runs_on_host(xs[0].dtype):
            views, rotations, _, _ = self.host_inputs(xs, None, offset, [])
            keys, values = host_kernels.attention_states(views, blocks.starts, rotations, self.host_weights())
            return mx.array(keys), mx.array(values)
        states = blocks.map(lambda x, start: self.keys_and_values(x, offset + start), xs, blocks.starts)
        return blocks.join([k for k, _ in states], axis=2), blocks.join([v for _, v in states], axis=2)

    def _queries(self, queries: mx.array, offset: int | mx.array) -> mx.array:
        return self.rope(self.q_norm(self._heads(queries, self.num_heads)).transpose(0, 2, 1, 3), offset)

    def projected(self, x: mx.array, offset: int | mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Queries, keys and values of `x`, each (batch, heads, length, head_dim)."""
        if "fused_qkv" in self:  # the three projections as one matmul (loader.dequantized_dense_layers)
            queries, keys, *values = mx.split(self.fused_qkv(x), self.qkv_splits, axis=-1)
            return self._queries(queries, offset), *self._states(keys, values[0] if values else None, offset)
        return self._queries(self.q_proj(x), offset), *self.keys_and_values(x, offset)

    @property
    def qkv_splits(self) -> list[int]:
        """Where queries end (and keys, before values) in the merged projection's output."""
        queries = self.num_heads * self.head_dim
        return [queries, queries + self.num_kv_heads * self.head_dim] if "v_proj" in self else [queries]

    def __call__(
        self,
        blocks: RowBlocks,
        xs: list[mx.array],
        cache: LayerCache,
        offset: int,
        masks: list[mx.array | None],
        store: bool,
    ) -> list[mx.array]:
        """Attend over the cached states and every block's; `store` appends the new states (encoder).

        `xs` are the positions in row blocks (batch, block, hidden), `offset` the
        position of the first; each block gets its rows of the output.
        """
        if self.runs_on_host(xs[0].dtype):
            return self._on_host(blocks, xs, cache, offset, masks, store)
        projected = blocks.map(lambda x, start: self.projected(x, offset + start), xs, blocks.starts)
        keys = blocks.join([k for _, k, _ in projected], axis=2)
        values = blocks.join([v for _, _, v in projected], axis=2)
        keys, values = cache.extended(keys, values)
        queries = [q for q, _, _ in projected]
        if store:
            cache.commit()
        return blocks.map(lambda q, mask: self.merged_heads(attend(q, keys, values, mask)), queries, masks)

    def runs_on_host(self, dtype: mx.Dtype) -> bool:
        """Whether the CPU's C kernels run this layer: packed at load (`pack_for_host`), float32 inputs."""
        return isinstance(self.o_proj, PackedLinear) and dtype == mx.float32 and on_cpu()

    def pack_for_host(self) -> bool:
        """Hold the projections packed for the CPU's C kernels (host_kernels), if they can run this attention
        (its heads fill whole panels); returns whether it did. MLX's ops still run it (`PackedLinear` unpacks
        on use)."""
        lib = host_kernels.library()
        names = tuple(name for name in ("q_proj", "k_proj", "v_proj", "o_proj") if name in self)
        if lib is None or self.head_dim % lib.panel_width():
            return False
        if not host_kernels.packed_in_place(self, names, PackedLinear):
            return False
        self.pop("fused_qkv", None)  # dequantized at load, merged for MLX's matmuls: the kernels read the parts
        return True

    def host_weights(self) -> host_kernels.AttentionWeights:
        """The weights as the C kernels read them: host views, made again only when a weight is replaced."""
        arrays = [self.q_proj.packed, self.k_proj.packed, self.v_proj.packed if "v_proj" in self else None]
        return self._host_views([*arrays, self.o_proj.packed, self.q_norm.weight, self.k_norm.weight])

    def host_inputs(
        self, xs: list[mx.array], cache: LayerCache | None, offset: int, masks: list[mx.array | None]
    ) -> tuple[list[np.ndarray], np.ndarray, tuple[np.ndarray, np.ndarray] | None, list[np.ndarray | None]]:
        """What host_kernels.attention reads besides the weights, evaluated (the layer's host read) and viewed from
        the host: the row blocks, RoPE's table for their positions, the cached keys and values (None with no cache
        or an empty one), the masks."""
        # The C kernels turn by MLX's own RoPE angles.
        rotations = self.rope.rotations(offset, sum(x.shape[1] for x in xs))
        cached = (cache.keys, cache.values) if cache is not None and cache.length else None
        mx.eval(xs, rotations, cached, [mask for mask in masks if mask is not None])
        return (
            [np.asarray(x) for x in xs],
            np.asarray(rotations),
            None if cached is None else tuple(np.asarray(states) for states in cached),
            [None if mask is None else np.asarray(mask) for mask in masks],
        )

    def _on_host(
        self,
        blocks: RowBlocks,
        xs: list[mx.array],
        cache: LayerCache,
        offset: int,
        masks: list[mx.array | None],
        store: bool,
    ) -> list[mx.array]:
        """`__call__` in C (host_kernels.attention), every row block in one pass: the layer's first host read."""
        xs, rotations, cached, masks = self.host_inputs(xs, cache, offset, masks)
        outs, keys, values = host_kernels.attention(
            xs, blocks.starts, rotations, cached, masks, self.host_weights(), cpu_cores()
        )
        if store:
            cache.append(mx.array(keys), mx.array(values))
        return [mx.array(out) for out in outs]

    def merged_heads(self, out: mx.array) -> mx.array:
        """The output projection of attention's output (batch, heads, length, head_dim)."""
        batch, _, length, _ = out.shape
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))


def attend(queries: mx.array, keys: mx.array, values: mx.array, mask: mx.array | None) -> mx.array:
    """softmax(q·kᵀ) v with scale 1, grouped-query, under a boolean mask (batch|1, 1, queries|1, keys).

    Metal takes MLX's fused kernel. MLX's CUDA backend has none for these head
    sizes (256 and 512) and composes the same from stock ops, repeating each KV
    head across its query heads; `grouped_attention` gives the queries of a KV
    head to one matmul instead, in fewer ops (on the H200, 0.5 ms a step less).
    On the CPU the fused kernel spends most of its time in `exp`; grouping the
    query heads per KV head and using the CPU's fast `exp` is faster there, to
    float32 rounding (see `keys_major_attention` for float32). (Splitting the
    KV heads over CPU streams, as the sampler does with its rows, measured no
    faster: these matmuls already keep both cores busy.)
    """
    if on_cuda():
        return grouped_attention(queries, keys, values, mask)
    if not on_cpu():
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=1.0, mask=mask)
    if values.dtype == mx.float32:
        return keys_major_attention(queries, keys, values, mask)
    batch, heads, length, dim = queries.shape
    kv_heads = keys.shape[1]
    grouped = queries.reshape(batch, kv_heads, heads // kv_heads, length, dim)
    # The softmax runs in float32 whatever the model's dtype, as the fused kernel's does.
    scores = (grouped @ keys[:, :, None].swapaxes(-1, -2)).astype(mx.float32)
    if mask is not None:
        scores = mx.where(mask[:, :, None], scores, -mx.inf)
    weights = exp(scores - scores.max(axis=-1, keepdims=True))
    # The reference's order for a reduced-precision model: the weights normalised, rounded, then multiplied.
    weights = (weights / weights.sum(axis=-1, keepdims=True)).astype(values.dtype)
    return (weights @ values[:, :, None]).reshape(batch, heads, length, values.shape[-1])


def keys_major_attention(queries: mx.array, keys: mx.array, values: mx.array, mask: mx.array | None) -> mx.array:
    """`attend` in float32 on the CPU, its scores laid out (keys, queries) per KV head.

    MLX's CPU reductions over the last axis are not vectorised (about 1 ns an
    element); over an inner axis they run along the rows at once, so the
    softmax's maximum is taken over the keys as the second-last axis. The
    weights are normalised after they meet the values: one matmul against the
    values with a column of ones appended gives both Σ e·v and Σ e, so the sum
    and the division never pass over the weights. One block and layer at the
    bench's shape: 4.5 against 4.9 ms for the queries-major layout.
    """
    batch, heads, length, dim = queries.shape
    kv_heads, positions, value_dim = keys.shape[1], keys.shape[2], values.shape[-1]
    group = heads // kv_heads
    # Each KV head's queries side by side: (batch, kv_heads, keys, group · queries).
    scores = keys @ queries.reshape(batch, kv_heads, group * length, dim).swapaxes(-1, -2)
    if mask is not None:
        visible = mask.swapaxes(-1, -2)[..., None, :]  # (batch|1, 1, keys, 1, queries|1)
        scores = mx.where(visible, scores.reshape(batch, kv_heads, positions, group, length), -mx.inf)
        scores = scores.reshape(batch, kv_heads, positions, group * length)
    weights = exp(scores - scores.max(axis=-2, keepdims=True))
    ones = mx.ones((*values.shape[:-1], 1), dtype=mx.float32)
    summed = weights.swapaxes(-1, -2) @ mx.concatenate([values, ones], axis=-1)
    return (summed[..., :value_dim] / summed[..., value_dim:]).reshape(batch, heads, length, value_dim)


def grouped_attention(queries: mx.array, keys: mx.array, values: mx.array, mask: mx.array | None) -> mx.array:
    """`attend` as two matmuls over each KV head's queries stacked, the softmax between them in float32 (as MLX's
    composed attention computes it), the output in the queries' dtype."""
    batch, heads, length, dim = queries.shape
    kv_heads, positions = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    scores = queries.reshape(batch, kv_heads, group * length, dim) @ keys.swapaxes(-1, -2)
    if mask is not None:
        lowest = mx.array(mx.finfo(scores.dtype).min, dtype=scores.dtype)
        grouped = scores.reshape(batch, kv_heads, group, length, positions)
        scores = mx.where(mask[:, :, None], grouped, lowest).reshape(scores.shape)
    weights = mx.softmax(scores, axis=-1, precise=True)
    return (weights @ values).reshape(batch, heads, length, dim)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): the dense feed-forward block."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act = ACTIVATIONS[activation]

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = gate_and_up(self, x)
        return self.down_proj(self.act(gate) * up)

    def runs_on_host(self, dtype: mx.Dtype) -> bool:
        """Whether the CPU's C kernels run this MLP: packed at load (`pack_for_host`), float32 inputs, gelu."""
        packed = all(isinstance(self.get(name), PackedLinear) for name in ("gate_proj", "up_proj", "down_proj"))
        return packed and dtype == mx.float32 and self.act is gelu_tanh

    def pack_for_host(self) -> bool:
        """Hold the weights packed for the CPU's C kernels (host_kernels), if they can run them; returns whether
        it did. MLX's matmuls still run it (`PackedLinear` unpacks on use)."""
        names = ("gate_proj", "up_proj", "down_proj")
        if self.act is not gelu_tanh or not host_kernels.packed_in_place(self, names, PackedLinear):
            return False
        self.pop("fused_gate_up", None)  # dequantized at load, merged for MLX's matmuls: the kernels read the parts
        return True


def gate_and_up(mlp: nn.Module, x: mx.array) -> tuple[mx.array, mx.array]:
    """A gated MLP's two input projections; one matmul where they are merged (loader.dequantized_dense_layers)."""
    if "fused_gate_up" in mlp:
        gate, up = mx.split(mlp.fused_gate_up(x), 2, axis=-1)
        return gate, up
    return mlp.gate_proj(x), mlp.up_proj(x)


class SelfConditioning(GatedMLP):
    """Mixes the previous step's soft prediction into the canvas embeddings: a gated MLP of the normed soft
    embeddings, added to the canvas's own. On the CPU, packed at load (`pack_for_host`), it runs in C with the
    embedding lookup (host_kernels.conditioned_embeddings)."""

    def __init__(self, config: TextConfig):
        super().__init__(config.hidden_size, config.intermediate_size, config.hidden_activation)
        self.pre_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eps = config.rms_norm_eps
        self._host_views = host_kernels.HostViews(lambda views: host_kernels.ConditioningWeights(*views, self.eps))

    def __call__(self, embeddings: mx.array, soft_embeddings: mx.array | None) -> mx.array:
        # With no previous prediction the signal is zero and the MLP of zero is
        # zero (no biases), so only the output norm remains.
        if soft_embeddings is not None:
            normed = self.pre_norm(soft_embeddings)
            gate, up = gate_and_up(self, normed)
            embeddings = embeddings + self.down_proj(self.act(gate) * up)
        return rms_normalize(embeddings, self.eps)

    def host_weights(self) -> host_kernels.ConditioningWeights:
        """The weights as the C kernels read them: host views, made again only when a weight is replaced."""
        return self._host_views(
            [self.pre_norm.weight, self.gate_proj.packed, self.up_proj.packed, self.down_proj.packed]
        )


def embedding_scale(hidden_size: int, dtype: mx.Dtype) -> mx.array:
    """sqrt(hidden), rounded to the embedding dtype as the reference does."""
    return mx.array(math.sqrt(hidden_size), dtype=dtype)
