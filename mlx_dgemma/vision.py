"""The Gemma 4 vision tower and its projection into the text model, as DiffusionGemma's encoder uses them.

An image comes as patches (Gemma 4's image processor cuts and pads them): each
patch is projected, gets a learned embedding of its column and of its row, and
the patches attend to each other both ways through a stack of layers that
rotate half of each head by the column and half by the row. Each k x k cell of
patches is then averaged into one soft token, scaled by sqrt(hidden) and, where
the checkpoint says so, standardized. The embedder normalizes the soft tokens
and projects them to the text model's width: they take the places of the
prompt's image tokens.

The module tree mirrors the checkpoint's key names under `model.encoder.vision_tower.*` and
`model.encoder.embed_vision.*` (Google's layout, kept as they are by the MLX conversions).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .activations import GATES
from .config import VisionConfig


def _input_dtype(linear: nn.Module) -> mx.Dtype:
    """The float dtype a (possibly quantized) linear layer computes in."""
    return linear.scales.dtype if isinstance(linear, nn.QuantizedLinear) else linear.weight.dtype


class ClippableLinear(nn.Module):
    """A bias-free linear layer, nested under `.linear` as the checkpoint stores it. Checkpoints made with clipped
    linears also store the ranges its input and output are clamped to."""

    def __init__(self, in_features: int, out_features: int, clipped: bool):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        if clipped:
            self.input_min = mx.array(-math.inf)
            self.input_max = mx.array(math.inf)
            self.output_min = mx.array(-math.inf)
            self.output_max = mx.array(math.inf)

    def __call__(self, x: mx.array) -> mx.array:
        if "input_min" not in self:
            return self.linear(x)
        x = mx.clip(x, self.input_min.astype(x.dtype), self.input_max.astype(x.dtype))
        y = self.linear(x)
        return mx.clip(y, self.output_min.astype(y.dtype), self.output_max.astype(y.dtype))


class PatchEmbedder(nn.Module):
    """Pixels in [0, 1] mapped to [-1, 1] and projected, plus a learned embedding of the patch's column and one of
    its row."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.input_proj = nn.Linear(config.patch_dim, config.hidden_size, bias=False)
        # [0]: one row per column index x, [1]: one row per row index y.
        self.position_embedding_table = mx.ones((2, config.position_embedding_size, config.hidden_size))

    def __call__(self, pixels: mx.array, positions: mx.array) -> mx.array:
        """`pixels` (patches, patch_dim), `positions` (patches, 2) as (x, y): (patches, hidden)."""
        patches = self.input_proj((2 * (pixels - 0.5)).astype(_input_dtype(self.input_proj)))
        table = self.position_embedding_table
        return patches + (table[0][positions[:, 0]] + table[1][positions[:, 1]])


class AxialRotaryEmbedding(nn.Module):
    """RoPE over two axes: the first half of each head rotates by the patch's column, the second half by its row,
    each half in the rotate-half layout with the same frequencies (theta^(-4i/head_dim))."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        quarter = config.head_dim // 4
        exponents = mx.arange(0, 2 * quarter, 2, dtype=mx.float32) / (config.head_dim // 2)
        # Not a parameter (leading underscore), as the text model's RoPE wavelengths.
        self._inv_freq = 1.0 / mx.power(mx.array(config.rope_theta, dtype=mx.float32), exponents)

    def angles(self, positions: mx.array, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
        """cos and sin (patches, head_dim) for `positions` (patches, 2), laid out column, column, row, row."""
        angles = positions.astype(mx.float32)[:, :, None] * self._inv_freq  # (patches, 2, head_dim / 4)
        columns, rows = angles[:, 0], angles[:, 1]
        layout = mx.concatenate([columns, columns, rows, rows], axis=-1)
        return mx.cos(layout).astype(dtype), mx.sin(layout).astype(dtype)

    @staticmethod
    def rotate(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        """`x` (batch, patches, heads, head_dim) rotated by `cos`/`sin` (patches, head_dim)."""
        cos, sin = cos[:, None], sin[:, None]
        halves = []
        for part, part_cos, part_sin in zip(
            mx.split(x, 2, axis=-1), mx.split(cos, 2, axis=-1), mx.split(sin, 2, axis=-1)
        ):
            first, second = mx.split(part, 2, axis=-1)
            halves.append(part * part_cos + mx.concatenate([-second, first], axis=-1) * part_sin)
        return mx.concatenate(halves, axis=-1)


class VisionAttention(nn.Module):
    """Bidirectional attention over one image's patches: q/k norms, two-axis RoPE, scale-free normed values,
    attention scale 1."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        hidden, clipped = config.hidden_size, config.use_clipped_linears
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.eps = config.head_dim, config.rms_norm_eps
        self.q_proj = ClippableLinear(hidden, self.num_heads * self.head_dim, clipped)
        self.k_proj = ClippableLinear(hidden, self.num_kv_heads * self.head_dim, clipped)
        self.v_proj = ClippableLinear(hidden, self.num_kv_heads * self.head_dim, clipped)
        self.o_proj = ClippableLinear(self.num_heads * self.head_dim, hidden, clipped)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=self.eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=self.eps)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        batch, length, _ = x.shape
        queries = self.q_proj(x).reshape(batch, length, self.num_heads, self.head_dim)
        keys = self.k_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim)
        values = self.v_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim)
        queries = AxialRotaryEmbedding.rotate(self.q_norm(queries), cos, sin).transpose(0, 2, 1, 3)
        keys = AxialRotaryEmbedding.rotate(self.k_norm(keys), cos, sin).transpose(0, 2, 1, 3)
        values = mx.fast.rms_norm(values, None, self.eps).transpose(0, 2, 1, 3)
        out = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=1.0)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))


class VisionMLP(nn.Module):
    """down(act(gate(x)) * up(x))."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        hidden, inner, clipped = config.hidden_size, config.intermediate_size, config.use_clipped_linears
        self.gate_proj = ClippableLinear(hidden, inner, clipped)
        self.up_proj = ClippableLinear(hidden, inner, clipped)
        self.down_proj = ClippableLinear(inner, hidden, clipped)
        self.gate = GATES[config.hidden_activation]

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.gate(self.gate_proj(x), self.up_proj(x)))


class VisionLayer(nn.Module):
    """Attention then the MLP, each between a pre-norm and a post-norm, each added to the residual stream."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = VisionAttention(config)
        self.mlp = VisionMLP(config)
        self.input_layernorm = nn.RMSNorm(hidden, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(hidden, eps=eps)
        self.pre_feedforward_layernorm = nn.RMSNorm(hidden, eps=eps)
        self.post_feedforward_layernorm = nn.RMSNorm(hidden, eps=eps)

    def __call__(self, h: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), cos, sin))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class VisionLayers(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = [VisionLayer(config) for _ in range(config.num_hidden_layers)]


class SoftTokenPooling:
    """Which soft token each patch averages into: cell (x // k, y // k) of the patch grid, numbered row by row,
    as the reference numbers them (worked out on the host from the patches' positions)."""

    def __init__(self, positions: np.ndarray, kernel: int):
        cells_x, cells_y = positions[:, 0] // kernel, positions[:, 1] // kernel
        cells = cells_x + (int(positions[:, 0].max()) + 1) // kernel * cells_y
        used = np.unique(cells)
        # The reference keeps the cells some patch falls in, in their order: renumber them 0, 1, ...
        self.cells = mx.array(np.searchsorted(used, cells).astype(np.int32))
        self.count = len(used)
        self.divisor = kernel * kernel

    def __call__(self, h: mx.array) -> mx.array:
        """(patches, hidden) averaged into (soft tokens, hidden), in float32, rounded to `h`'s dtype."""
        pooled = mx.zeros((self.count, h.shape[-1]), dtype=mx.float32).at[self.cells].add(h.astype(mx.float32))
        return (pooled / self.divisor).astype(h.dtype)


class VisionTower(nn.Module):
    """Gemma 4's vision encoder: one image's patches in, its soft tokens out (vision width)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embedder = PatchEmbedder(config)
        self.encoder = VisionLayers(config)
        self.rope = AxialRotaryEmbedding(config)
        if config.standardize:
            self.std_bias = mx.zeros((config.hidden_size,))
            self.std_scale = mx.ones((config.hidden_size,))

    def __call__(self, pixels: mx.array, positions: np.ndarray) -> mx.array:
        """`pixels` (patches, patch_dim) and host `positions` (patches, 2) of one image's real patches (no
        padding): its soft tokens (patches / k², hidden)."""
        grid = mx.array(positions.astype(np.int32))
        h = self.patch_embedder(pixels, grid)[None]
        cos, sin = self.rope.angles(grid, h.dtype)
        for layer in self.encoder.layers:
            h = layer(h, cos, sin)
        pooled = SoftTokenPooling(positions, self.config.pooling_kernel_size)(h[0])
        # Scaled (and standardized) in float32, as the reference does: the scale can overflow float16.
        soft = pooled.astype(mx.float32) * math.sqrt(self.config.hidden_size)
        if "std_bias" in self:
            soft = (soft - self.std_bias.astype(mx.float32)) * self.std_scale.astype(mx.float32)
        return soft.astype(h.dtype)


class ImageEmbedder(nn.Module):
    """Soft tokens into the text model: a scale-free RMS norm, then a projection to the text width."""

    def __init__(self, config: VisionConfig, text_hidden_size: int):
        super().__init__()
        self.eps = config.rms_norm_eps
        self.embedding_projection = nn.Linear(config.hidden_size, text_hidden_size, bias=False)

    def __call__(self, soft_tokens: mx.array) -> mx.array:
        return self.embedding_projection(mx.fast.rms_norm(soft_tokens, None, self.eps))


def real_patches(pixel_values: mx.array, position_ids: np.ndarray) -> tuple[mx.array, np.ndarray]:
    """One image's patches without the padding ones (position (-1, -1)) the processor appends to fill its
    budget: padding is masked out of attention and pooling, so leaving it out changes nothing but the cost."""
    real = ~(position_ids == -1).all(axis=-1)
    if real.all():
        return pixel_values, position_ids
    if not real.any():
        raise ValueError("an image with no patches: every position is padding (-1, -1)")
    index = np.flatnonzero(real)
    return pixel_values[mx.array(index.astype(np.int32))], position_ids[index]
