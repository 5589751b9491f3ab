"""DiffusionGemma in MLX: one set of layer weights, two roles.

The encoder runs the layers causally over the prompt (later, each committed
canvas) and appends their keys and values to the cache. The decoder runs the
same layers bidirectionally over a canvas, attending to [cached, canvas]
without changing the cache, and returns soft-capped float32 logits.

The module tree mirrors the checkpoint's key names (`model.decoder.layers.N...`,
`model.encoder.language_model.layers.N.layer_scalar`), so weights load as they
are stored and quantization paths match the community MLX conversions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.gemma4_text import logit_softcap
from mlx_lm.models.switch_layers import SwitchLinear, _gather_sort, _scatter_unsort

from .activations import GATES
from .cache import EncoderCache, LayerCache
from .config import LayerShape, ModelConfig, RopeConfig, TextConfig, VisionConfig
from .vision import ImageEmbedder, VisionTower, real_patches


def embedding_scale(hidden_size: int, dtype: mx.Dtype) -> mx.array:
    """sqrt(hidden), rounded to the embedding dtype as the reference does."""
    return mx.array(math.sqrt(hidden_size), dtype=dtype)


def rms_normalize(x: mx.array, eps: float) -> mx.array:
    """Scale-free RMS norm (values, router input, self-conditioning output)."""
    return mx.fast.rms_norm(x, None, eps)


class RotaryEmbedding(nn.Module):
    """RoPE over the whole head, in the rotate-half layout.

    The wavelengths are computed as the reference computes its frequencies
    (float32 theta^(2i/d), times the factor for "linear" and "proportional"),
    and handed to MLX's kernel: its own from `base` round differently, enough to
    show at positions of a few hundred. "proportional" RoPE rotates only the
    first `partial_rotary_factor` of the pairs; the others get an infinite
    wavelength, i.e. no rotation.
    """

    def __init__(self, head_dim: int, rope: RopeConfig):
        super().__init__()
        self.head_dim = head_dim
        pairs = head_dim // 2
        rotated = int(rope.partial_rotary_factor * pairs) if rope.rope_type == "proportional" else pairs
        factor = rope.factor if rope.rope_type in ("linear", "proportional") else 1.0
        exponents = mx.arange(0, 2 * rotated, 2, dtype=mx.float32) / head_dim
        wavelengths = factor * mx.power(mx.array(rope.theta, dtype=mx.float32), exponents)
        self._wavelengths = mx.concatenate([wavelengths, mx.full((pairs - rotated,), mx.inf)])

    def __call__(self, x: mx.array, offset: int | mx.array) -> mx.array:
        """`x` (batch, heads, length, head_dim) rotated for positions offset, offset + 1, ... (`offset` one for
        every row, or (batch,) one per row); or, with `offset` a (batch, length) array, for each row's own positions
        (a fast-mode step's live canvas positions)."""
        if isinstance(offset, mx.array) and offset.ndim == 2:
            return self._at(x, offset)
        return mx.fast.rope(
            x, self.head_dim, traditional=False, base=None, scale=1.0, offset=offset, freqs=self._wavelengths
        )

    def _at(self, x: mx.array, positions: mx.array) -> mx.array:
        # The kernel takes one offset per leading index: each (row, position) becomes a sequence of length one.
        batch, heads, length, dim = x.shape
        single = x.transpose(0, 2, 1, 3).reshape(batch * length, heads, 1, dim)
        rotated = mx.fast.rope(
            single,
            self.head_dim,
            traditional=False,
            base=None,
            scale=1.0,
            offset=positions.reshape(-1),
            freqs=self._wavelengths,
        )
        return rotated.reshape(batch, length, heads, dim).transpose(0, 2, 1, 3)


class Attention(nn.Module):
    """Self-attention with q/k norms, normed values and attention scale 1.

    Full-attention layers have no value projection: their values are the raw
    key projection, before the key norm and RoPE.
    """

    def __init__(self, config: TextConfig, shape: LayerShape):
        super().__init__()
        hidden, bias = config.hidden_size, config.attention_bias
        self.num_heads, self.num_kv_heads = config.num_attention_heads, shape.num_key_value_heads
        self.head_dim = shape.head_dim
        self.eps = config.rms_norm_eps
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        if shape.is_sliding:
            self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=self.eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=self.eps)
        self.rope = RotaryEmbedding(self.head_dim, shape.rope)

    def _heads(self, x: mx.array, count: int) -> mx.array:
        batch, length, _ = x.shape
        return x.reshape(batch, length, count, -1)

    def projections(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array | None]:
        """The query, key and value projections of `x` (None: no value projection)."""
        values = self.v_proj(x) if "v_proj" in self else None
        return self.q_proj(x), self.k_proj(x), values

    def keys_and_values(
        self, keys: mx.array, values: mx.array | None, offset: int | mx.array
    ) -> tuple[mx.array, mx.array]:
        """Projected keys and values as the cache holds them: (batch, kv_heads, length, head_dim)."""
        raw_keys = self._heads(keys, self.num_kv_heads)
        raw_values = raw_keys if values is None else self._heads(values, self.num_kv_heads)
        keys = self.rope(self.k_norm(raw_keys).transpose(0, 2, 1, 3), offset)
        return keys, rms_normalize(raw_values, self.eps).transpose(0, 2, 1, 3)

    def attend(self, queries: mx.array, keys: mx.array, values: mx.array, mask: mx.array | None) -> mx.array:
        """softmax(q·kᵀ) v with scale 1, grouped-query, under a boolean mask (batch|1, 1, queries|1, keys)."""
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=1.0, mask=mask)

    def __call__(
        self,
        x: mx.array,
        cache: LayerCache,
        offset: int | mx.array,
        mask: mx.array | None,
        store: bool,
        positions: mx.array | None = None,
    ) -> mx.array:
        """Attend over the cached states and `x`'s own; `store` keeps `x`'s states in the cache (encoder).

        With `positions` (batch, length), `x` holds only those positions of the canvas the last pass wrote after
        the cache (a fast-mode step): their states replace the ones there, and they attend over the whole canvas.
        """
        batch, length, _ = x.shape
        queries, keys, values = self.projections(x)
        if positions is not None:  # canvas positions after each row's offset
            offset = positions + (offset[:, None] if isinstance(offset, mx.array) else offset)
        queries = self.rope(self.q_norm(self._heads(queries, self.num_heads)).transpose(0, 2, 1, 3), offset)
        states = self.keys_and_values(keys, values, offset)
        keys, values = cache.extended(*states) if positions is None else cache.rewritten(*states, positions)
        if store:
            cache.commit()
        out = self.attend(queries, keys, values, mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)): the dense feed-forward block."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.gate = GATES[activation]

    def gate_and_up(self, x: mx.array) -> tuple[mx.array, mx.array]:
        return self.gate_proj(x), self.up_proj(x)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.gate(*self.gate_and_up(x)))


class Router(nn.Module):
    """Picks each token's top-k experts from the un-normed residual stream, with their weights."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.proj = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.scale = mx.ones((config.hidden_size,))
        self.per_expert_scale = mx.ones((config.num_experts,))
        self.top_k = config.top_k_experts
        self.eps = config.rms_norm_eps
        self.root_size = config.hidden_size**-0.5

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        # One fused norm with the router's scale as its weight.
        scores = self.proj(mx.fast.rms_norm(x, self.scale * self.root_size, self.eps)).astype(mx.float32)
        # Which experts is a choice, not a function to differentiate (training reads the weights' gradients).
        indices = mx.stop_gradient(mx.argpartition(-scores, kth=self.top_k - 1, axis=-1)[..., : self.top_k])
        # Softmax over the chosen scores equals the full softmax renormalised over the top k, as the reference has it.
        weights = mx.softmax(mx.take_along_axis(scores, indices, axis=-1), axis=-1)
        return indices, weights * self.per_expert_scale[indices].astype(mx.float32)


class Experts(nn.Module):
    """The experts' gated feed-forward blocks, stacked (experts, out, in), gate and up fused as stored.

    Like mlx-lm's SwitchGLU, with the checkpoint's gate|up stack as one gathered matmul.
    """

    def __init__(self, config: TextConfig):
        super().__init__()
        hidden, inner, count = config.hidden_size, config.moe_intermediate_size, config.num_experts
        self.gate_up_proj = SwitchLinear(hidden, 2 * inner, count, bias=False)
        self.down_proj = SwitchLinear(inner, hidden, count, bias=False)
        self.gate = GATES[config.hidden_activation]

    def __call__(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        """x (batch, length, hidden) routed by indices and weights (batch, length, k): (batch, length, hidden)."""
        x = mx.expand_dims(x, (-2, -3))
        # Rows sorted by expert read each expert's weights in one run (as SwitchGLU does past 64 entries).
        ordered = indices.size >= 64
        experts = indices
        if ordered:
            x, experts, inverse = _gather_sort(x, indices)
        gate, up = mx.split(self.gate_up_proj(x, experts, sorted_indices=ordered), 2, axis=-1)
        out = self.down_proj(self.gate(gate, up), experts, sorted_indices=ordered)
        if ordered:
            out = _scatter_unsort(out, inverse, indices.shape)
        out = out.squeeze(-2)
        return (out * weights[..., None].astype(out.dtype)).sum(axis=-2)


class DecoderLayer(nn.Module):
    """Attention, then a dense MLP and a mixture of experts side by side, then the layer's scalar."""

    def __init__(self, config: TextConfig, shape: LayerShape):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config, shape)
        self.mlp = MLP(hidden, config.intermediate_size, config.hidden_activation)
        self.router = Router(config)
        self.experts = Experts(config)
        self.input_layernorm = nn.RMSNorm(hidden, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(hidden, eps=eps)
        self.pre_feedforward_layernorm = nn.RMSNorm(hidden, eps=eps)
        self.post_feedforward_layernorm = nn.RMSNorm(hidden, eps=eps)
        self.post_feedforward_layernorm_1 = nn.RMSNorm(hidden, eps=eps)
        self.pre_feedforward_layernorm_2 = nn.RMSNorm(hidden, eps=eps)
        self.post_feedforward_layernorm_2 = nn.RMSNorm(hidden, eps=eps)
        self.layer_scalar = mx.ones((1,))

    def __call__(
        self,
        h: mx.array,
        cache: LayerCache,
        offset: int | mx.array,
        mask: mx.array | None,
        store: bool,
        layer_scalar: mx.array,
        positions: mx.array | None = None,
    ) -> mx.array:
        """The layer over the residual stream `h`; the encoder passes its own `layer_scalar` and `store`, a fast-mode
        step the canvas `positions` that `h` holds (see Attention)."""
        attention = self.self_attn(self.input_layernorm(h), cache, offset, mask, store, positions)
        h = h + self.post_attention_layernorm(attention)
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(h)))
        # The router reads the residual stream itself; the experts its normed copy.
        indices, weights = self.router(h)
        experts = self.post_feedforward_layernorm_2(self.experts(self.pre_feedforward_layernorm_2(h), indices, weights))
        return (h + self.post_feedforward_layernorm(dense + experts)) * layer_scalar


class SelfConditioning(MLP):
    """Mixes the previous step's soft prediction into the canvas embeddings: a gated MLP of the normed soft
    embeddings, added to the canvas's own, then a scale-free norm."""

    def __init__(self, config: TextConfig):
        super().__init__(config.hidden_size, config.intermediate_size, config.hidden_activation)
        self.pre_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.eps = config.rms_norm_eps

    def __call__(self, embeddings: mx.array, soft_embeddings: mx.array | None) -> mx.array:
        # With no previous prediction the signal is zero, and so is the MLP of zero (no biases).
        if soft_embeddings is not None:
            embeddings = embeddings + super().__call__(self.pre_norm(soft_embeddings))
        return rms_normalize(embeddings, self.eps)


class Decoder(nn.Module):
    """The shared weights: embeddings, layers, final norm, self-conditioning."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config, shape) for shape in config.layers]
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_conditioning = SelfConditioning(config)


class EncoderLayerScalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer_scalar = mx.ones((1,))


class EncoderLanguageModel(nn.Module):
    """The encoder's only weights of its own: a per-layer output scalar."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.layers = [EncoderLayerScalar() for _ in config.layers]


class Encoder(nn.Module):
    """The encoder's own weights: its layer scalars and, in checkpoints that keep them, the vision tower and the
    projection of its soft tokens into the text model."""

    def __init__(self, config: TextConfig, vision: VisionConfig | None = None):
        super().__init__()
        self.language_model = EncoderLanguageModel(config)
        if vision is not None:
            self.vision_tower = VisionTower(vision)
            self.embed_vision = ImageEmbedder(vision, config.hidden_size)


class Backbone(nn.Module):
    def __init__(self, config: TextConfig, vision: VisionConfig | None = None):
        super().__init__()
        self.decoder = Decoder(config)
        self.encoder = Encoder(config, vision)


def expected_embedding(embed: nn.Embedding | nn.QuantizedEmbedding, probs: mx.array) -> mx.array:
    """probs @ E for the (possibly quantized) embedding table E, in the table's dtype."""
    if isinstance(embed, nn.QuantizedEmbedding):
        return mx.quantized_matmul(
            probs.astype(embed.scales.dtype),
            embed.weight,
            embed.scales,
            embed.get("biases"),
            transpose=False,
            group_size=embed.group_size,
            bits=embed.bits,
            mode=embed.mode,
        )
    return probs.astype(embed.weight.dtype) @ embed.weight


class Model(nn.Module):
    """DiffusionGemma for block diffusion: `encode` fills a cache, `denoise` reads it."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.text_config = config.text
        self.model = Backbone(config.text, config.vision)

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.decoder.layers

    @property
    def embed_tokens(self) -> nn.Embedding | nn.QuantizedEmbedding:
        return self.model.decoder.embed_tokens

    @property
    def embedding_dtype(self) -> mx.Dtype:
        """The dtype the reference rounds self-conditioning's logits to: the embedding table's."""
        embed = self.embed_tokens
        return embed.scales.dtype if isinstance(embed, nn.QuantizedEmbedding) else embed.weight.dtype

    def make_cache(self) -> EncoderCache:
        return EncoderCache(self.text_config.sliding_window, [shape.is_sliding for shape in self.text_config.layers])

    def embed(self, ids: mx.array) -> mx.array:
        """Token embeddings as the layers read them: scaled by √hidden."""
        embeddings = self.embed_tokens(ids)
        return embeddings * embedding_scale(self.text_config.hidden_size, embeddings.dtype)

    def self_conditioning_signal(self, self_conditioning_logits: mx.array) -> mx.array:
        """The previous prediction as the self-conditioning block reads it: softmax(logits) @ embeddings, scaled
        as token embeddings are."""
        probs = mx.softmax(self_conditioning_logits.astype(mx.float32), axis=-1)
        soft = expected_embedding(self.embed_tokens, probs)
        return soft * embedding_scale(self.text_config.hidden_size, soft.dtype)

    def encode(
        self,
        input_ids: mx.array,
        cache: EncoderCache,
        attention_mask: mx.array | None = None,
        image_features: mx.array | Sequence[mx.array] | None = None,
    ) -> None:
        """Append the keys and values of `input_ids` (batch, length) to `cache`.

        `attention_mask` (batch, length) marks real tokens with 1 and left
        padding with 0; padded positions are never attended to afterwards.

        `image_features`: the soft tokens of the images whose tokens (`image_token_id`) this chunk holds, as
        `image_features` returns them: one array (all images' soft tokens one after another) or one array per
        image. They take the image tokens' places in order, row by row, unscaled (the reference scales only token
        embeddings); with `use_bidirectional_attention: "vision"` the tokens of one image (one contiguous run of
        image tokens) see each other both ways, on sliding-window layers too, while text stays causal. An image
        is encoded in one call: a run of image tokens at either end of the chunk is refused (ValueError), as is a
        count of soft tokens that differs from the image tokens'.
        """
        batch, length = input_ids.shape
        cache.check_batch(batch)
        offset = cache.rope_offset
        h = self.embed(input_ids)
        blocks = None
        if image_features is not None:
            h, blocks = self._place_images(input_ids, h, image_features)
        masks = self.encoder_masks(cache, batch, length, attention_mask, blocks)
        scalars = self.model.encoder.language_model.layers
        *layers, last = list(zip(self.layers, cache.layers, scalars))
        for layer, layer_cache, scalar in layers:
            h = layer(h, layer_cache, offset, masks[layer_cache.keep], True, scalar.layer_scalar)
        # The encoder's output is never read, only its cache: the last layer needs its keys and values alone.
        layer, layer_cache, _ = last
        attention = layer.self_attn
        _, keys, values = attention.projections(layer.input_layernorm(h))
        layer_cache.append(*attention.keys_and_values(keys, values, offset))
        cache.append_validity(attention_mask, length, batch)

    def image_features(self, pixel_values: mx.array | np.ndarray, position_ids: mx.array | np.ndarray) -> mx.array:
        """The soft tokens of one image, or of a batch of images, in the text model's width.

        Takes what transformers' Gemma 4 image processor returns: for one image `pixel_values` (patches, 3·p·p)
        float pixels in [0, 1] and `position_ids` (patches, 2) integer (x, y) patch positions, padding patches at
        (-1, -1) (the processor pads every image to its patch budget); for a batch, the same with a leading
        image axis. Returns (soft tokens, hidden) float in the embedding dtype, one soft token per k x k cell of
        real patches (k = `pooling_kernel_size`), numbered row by row: as many as the processor's
        `num_soft_tokens_per_image`, hence as many as that image's image tokens in the prompt. A batch's images
        come one after another, in the order the prompt's image tokens take them. Raises ValueError when the
        checkpoint has no vision tower or the arrays do not fit it.
        """
        encoder = self.model.encoder
        if "vision_tower" not in encoder:
            raise ValueError("this conversion has no vision tower (made with --text-only?): it cannot read images")
        tower: VisionTower = encoder.vision_tower
        positions = np.asarray(position_ids)
        pixels = pixel_values if isinstance(pixel_values, mx.array) else mx.array(np.asarray(pixel_values))
        patch_dim = tower.config.patch_dim
        if pixels.ndim not in (2, 3) or pixels.shape[-1] != patch_dim:
            raise ValueError(
                f"pixel_values must be (patches, {patch_dim}) or (images, patches, {patch_dim}), "
                f"got {tuple(pixels.shape)}"
            )
        if positions.shape != (*pixels.shape[:-1], 2) or not np.issubdtype(positions.dtype, np.integer):
            raise ValueError(
                f"position_ids must be integer (x, y) pairs of shape {(*pixels.shape[:-1], 2)}, "
                f"got {positions.dtype} {positions.shape}"
            )
        if pixels.ndim == 2:
            pixels, positions = pixels[None], positions[None]
        dtype = self.embedding_dtype
        soft = [tower(*real_patches(image, grid)) for image, grid in zip(pixels, positions)]
        features = encoder.embed_vision(mx.concatenate(soft) if len(soft) > 1 else soft[0])
        return features.astype(dtype)

    def _place_images(
        self, input_ids: mx.array, h: mx.array, image_features: mx.array | Sequence[mx.array]
    ) -> tuple[mx.array, mx.array | None]:
        """`h` with the image tokens' embeddings replaced by the images' soft tokens, and the (batch, length)
        image number of each position (-1: text) when images attend both ways, else None."""
        ids = np.array(input_ids)
        is_image = ids == self.config.image_token_id
        starts = is_image & ~np.pad(is_image, ((0, 0), (1, 0)))[:, :-1]
        runs = np.cumsum(starts.reshape(-1)).reshape(ids.shape) - 1
        run_lengths = np.bincount(runs[is_image], minlength=int(starts.sum()))
        if is_image[:, 0].any() or is_image[:, -1].any():
            raise ValueError(
                "an image's tokens reach an end of this chunk: encode each image in one call, with the tokens around it"
            )
        one_array = isinstance(image_features, mx.array)
        per_image = [image_features] if one_array else list(image_features)
        counts = [int(features.shape[0]) for features in per_image]
        if sum(counts) != int(is_image.sum()):
            raise ValueError(f"{sum(counts)} image soft tokens for {int(is_image.sum())} image tokens in the prompt")
        if not one_array and counts != run_lengths.tolist():
            raise ValueError(f"images of {counts} soft tokens for runs of {run_lengths.tolist()} image tokens")
        features = mx.concatenate(per_image) if len(per_image) > 1 else per_image[0]
        hidden = h.shape[-1]
        flat = h.reshape(-1, hidden)
        flat[mx.array(np.flatnonzero(is_image).astype(np.int32))] = features.astype(h.dtype)
        h = flat.reshape(h.shape)
        if self.text_config.use_bidirectional_attention != "vision":
            return h, None
        return h, mx.array(np.where(is_image, runs, -1).astype(np.int32))

    def denoise(
        self,
        canvas_ids: mx.array,
        cache: EncoderCache,
        self_conditioning_logits: mx.array | None = None,
        positions: mx.array | None = None,
    ) -> mx.array:
        """Float32 soft-capped logits (batch, canvas, vocab) for a canvas; the cache is unchanged.

        `self_conditioning_logits` is the previous step's prediction (processed logits), None on a first step.

        With `positions` (batch, n), a fast-mode step: `canvas_ids` and `self_conditioning_logits` hold only
        those positions of the canvas, and only they run through the layers; the canvas's other positions take
        part in attention through the keys and values the passes before left after the cache (the canvas whole
        the first time). The logits are those positions' (batch, n, vocab).
        """
        batch, length = canvas_ids.shape
        cache.check_batch(batch)
        soft = None if self_conditioning_logits is None else self.self_conditioning_signal(self_conditioning_logits)
        h = self.model.decoder.self_conditioning(self.embed(canvas_ids), soft)
        canvas = length if positions is None else cache.layers[0].written
        offset = cache.rope_offset
        # Layers keeping the same number of cached positions share one mask.
        masks = {kept: self._decoder_mask(cache, kept, canvas) for kept in {lc.length for lc in cache.layers}}
        for layer, layer_cache in zip(self.layers, cache.layers):
            h = layer(h, layer_cache, offset, masks[layer_cache.length], False, layer.layer_scalar, positions)
        return self.logits(self.model.decoder.norm(h))

    def logits(self, hidden: mx.array) -> mx.array:
        """The tied head in float32, soft-capped."""
        logits = self.embed_tokens.as_linear(hidden).astype(mx.float32)
        cap = self.text_config.final_logit_softcapping
        return logit_softcap(mx.array(cap, dtype=mx.float32), logits) if cap else logits

    def encoder_masks(
        self,
        cache: EncoderCache,
        batch: int,
        length: int,
        attention_mask: mx.array | None,
        blocks: mx.array | None = None,
    ) -> dict[int | None, mx.array]:
        """Boolean masks (batch|1, 1, length, keys) for `length` new positions after `cache`'s, one per kind of
        layer cache (keyed by what it keeps: `LayerCache.keep`).

        `blocks` (batch, length) numbers each image's tokens (-1: text): a block's tokens also see each other.
        """
        offset = cache.offset
        new_valid = None if attention_mask is None else attention_mask.astype(mx.bool_)
        masks = {}
        for layer_cache in cache.layers:
            if layer_cache.keep in masks:
                continue
            cached = layer_cache.length
            query_pos = mx.arange(offset, offset + length)[:, None]
            key_pos = mx.arange(offset - cached, offset + length)[None, :]
            allowed = key_pos <= query_pos
            if layer_cache.keep is not None:
                allowed = allowed & (key_pos > query_pos - self.text_config.sliding_window)
            allowed = allowed[None]
            if blocks is not None:
                same_image = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)
                allowed = allowed | mx.pad(same_image, [(0, 0), (0, 0), (cached, 0)])
            old_valid = cache.validity_of_last(cached)
            if new_valid is None and old_valid is None:
                masks[layer_cache.keep] = allowed[:, None]
                continue
            valid = mx.concatenate(
                [
                    old_valid if old_valid is not None else mx.ones((batch, cached), dtype=mx.bool_),
                    new_valid if new_valid is not None else mx.ones((batch, length), dtype=mx.bool_),
                ],
                axis=1,
            )
            # A padded query may see no real key; letting it see itself keeps its (never read) output finite.
            masks[layer_cache.keep] = ((allowed & valid[:, None, :]) | (key_pos == query_pos)[None])[:, None]
        return masks

    def _decoder_mask(self, cache: EncoderCache, cached: int, canvas: int) -> mx.array | None:
        """The canvas sees every real cached position and the whole canvas."""
        valid = cache.validity_of_last(cached)
        if valid is None:
            return None
        canvas_valid = mx.ones((valid.shape[0], canvas), dtype=mx.bool_)
        return mx.concatenate([valid, canvas_valid], axis=1)[:, None, None, :]
