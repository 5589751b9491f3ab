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

from collections.abc import Callable, Hashable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import host_kernels, kernels, moe
from .cache import EncoderCache, LayerCache
from .config import LayerShape, ModelConfig, TextConfig
from .cpu import RowBlocks, cpu_cores, even_cuts, on_cpu
from .host_kernels import PackedEmbedding
from .host_vocab import in_parallel
from .layers import Attention, GatedMLP, RMSNorm, SelfConditioning, attend, embedding_scale, soft_cap
from .moe import Experts, Router

# Whether a decoder pass runs each layer as two compiled graphs (`mx.compile`) around its attention: the input
# norm, projections, q/k/v norms and RoPE; then the output projection, residual, dense MLP, router and experts.
# The cache and attention between them change shape with every canvas, and stay as they are. On CUDA a step's
# time is the host's, building and queueing its ops; the graphs halve the building (Python) and queue a little
# slower: 21.6 against 22.1 ms a step on the H200 (bench/RESULTS.md). None: on under CUDA, off elsewhere (Metal
# is unmeasured; the CPU's row blocks run on several streams, which one graph cannot).
COMPILE_LAYERS: bool | None = None


def compiles_layers(blocks: RowBlocks) -> bool:
    """Whether the decoder layers take their compiled graphs for these row blocks."""
    wanted = COMPILE_LAYERS if COMPILE_LAYERS is not None else kernels.on_cuda()
    # The CPU's dispatches read back to the host (the grouped one its padded width, "host" the tokens and their
    # routes), which a compiled graph cannot.
    return bool(wanted) and len(blocks) == 1 and moe.moe_dispatch() not in moe.HOST_READING


class CompiledGraphs:
    """`mx.compile(function)`, traced again for every key (the settings that shape the graph)."""

    def __init__(self, function: Callable):
        self.function = function
        self.graphs: dict[Hashable, Callable] = {}

    def get(self, key: Hashable) -> Callable:
        if key not in self.graphs:
            # MLX keeps traces per function object: each key compiles a function of its own, or every key would
            # share the first key's trace.
            self.graphs[key] = mx.compile(lambda *args: self.function(*args))
        return self.graphs[key]


class TransformerLayer(nn.Module):
    """Attention, then a dense MLP and a mixture of experts side by side.

    On the CPU, a float32 layer the C kernels can run whole takes them (`_on_host`); otherwise its attention,
    its feed-forward, or neither, as each can.
    """

    def __init__(self, config: TextConfig, shape: LayerShape):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config, shape)
        self.mlp = GatedMLP(hidden, config.intermediate_size, config.hidden_activation)
        self.router = Router(config)
        self.experts = Experts(config)
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps)
        self.post_feedforward_layernorm = RMSNorm(hidden, eps)
        self.post_feedforward_layernorm_1 = RMSNorm(hidden, eps)
        self.pre_feedforward_layernorm_2 = RMSNorm(hidden, eps)
        self.post_feedforward_layernorm_2 = RMSNorm(hidden, eps)
        self.layer_scalar = mx.ones((1,))
        self._host_views = host_kernels.HostViews(self._layer_weights)
        self._input_graphs = CompiledGraphs(self._attention_inputs)
        self._output_graphs = CompiledGraphs(self._attention_outputs)

    def __call__(
        self,
        blocks: RowBlocks,
        hs: list[mx.array],
        cache: LayerCache,
        offset: int,
        masks: list[mx.array | None],
        store: bool,
        layer_scalar: mx.array,
    ) -> list[mx.array]:
        """The layer over the residual stream in row blocks (batch, block, hidden), each block on its stream."""
        if not store and compiles_layers(blocks):
            # Decoder passes only: their shapes are the canvas's, where the encoder's vary with every prompt
            # (a new trace each).
            return [self._compiled_pass(hs[0], cache, offset, masks[0], layer_scalar)]
        if self.runs_on_host(hs[0].dtype):
            return self._on_host(blocks, hs, cache, offset, masks, store, layer_scalar)
        normed = blocks.map(self.input_layernorm, hs)
        attended = self.self_attn(blocks, normed, cache, offset, masks, store)
        return self.feed_forward(blocks, hs, attended, layer_scalar)

    def _compiled_pass(
        self, h: mx.array, cache: LayerCache, offset: int, mask: mx.array | None, layer_scalar: mx.array
    ) -> mx.array:
        """A decoder pass: compiled graphs before and after attention, the cache and attention between them."""
        # One trace per MoE setting (the dispatch is chosen while tracing) and per set of dense layers (a trace
        # holds the weights it read); the position goes in as an array, so a new canvas needs no new trace.
        key = (moe.dispatch_settings(), *(id(module) for module in self._dense_layers()))
        queries, keys, values = self._input_graphs.get(key)(h, mx.array(offset, dtype=mx.int32))
        keys, values = cache.extended(keys, values)
        return self._output_graphs.get(key)(h, attend(queries, keys, values, mask), layer_scalar)

    def _dense_layers(self) -> tuple[nn.Module, ...]:
        return tuple(child for owner in (self.self_attn, self.mlp) for child in owner.children().values())

    def _attention_inputs(self, h: mx.array, offset: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        return self.self_attn.projected(self.input_layernorm(h), offset)

    def _attention_outputs(self, h: mx.array, attention: mx.array, layer_scalar: mx.array) -> mx.array:
        attended = self.self_attn.merged_heads(attention)
        return self.feed_forward(RowBlocks.whole(h.shape[1]), [h], [attended], layer_scalar)[0]

    def feed_forward(
        self, blocks: RowBlocks, hs: list[mx.array], attended: list[mx.array], layer_scalar: mx.array
    ) -> list[mx.array]:
        """The residual stream plus attention's output, then the dense MLP and the experts side by side."""
        hs = blocks.map(lambda h, a: h + self.post_attention_layernorm(a), hs, attended)
        dense_inputs = blocks.map(self.pre_feedforward_layernorm, hs)
        # The router reads the residual stream itself; the experts its normed copy.
        flat = blocks.map(lambda h: h.reshape(-1, h.shape[-1]), hs)
        routes = blocks.map(self.router, flat)
        normed = blocks.map(self.pre_feedforward_layernorm_2, flat)
        indices, weights = [i for i, _ in routes], [w for _, w in routes]
        if self._feed_forwards_on_host(hs[0].dtype):
            # Both blocks in C in one pass, at the experts' host read (moe.Experts.on_host).
            experts, dense = self.experts.on_host(blocks, normed, indices, weights, (self.mlp, dense_inputs))
        else:
            dense = blocks.map(self.mlp, dense_inputs)
            experts = self.experts(blocks, normed, indices, weights)

        def output(h: mx.array, dense_out: mx.array, experts_out: mx.array) -> mx.array:
            mixed = self.post_feedforward_layernorm_1(dense_out) + self.post_feedforward_layernorm_2(
                experts_out.reshape(h.shape)
            )
            return (h + self.post_feedforward_layernorm(mixed)) * layer_scalar

        return blocks.map(output, hs, dense, experts)

    def _feed_forwards_on_host(self, dtype: mx.Dtype) -> bool:
        return moe.moe_dispatch() == "host" and self.experts.runs_on_host(dtype) and self.mlp.runs_on_host(dtype)

    def runs_on_host(self, dtype: mx.Dtype) -> bool:
        """Whether the CPU's C kernels run the whole layer (`_on_host`): its attention and feed-forward can, and its
        router is a float32 linear."""
        router = self.router.proj
        plain_router = type(router) is nn.Linear and "bias" not in router and router.weight.dtype == mx.float32
        return plain_router and self.self_attn.runs_on_host(dtype) and self._feed_forwards_on_host(dtype)

    def _on_host(
        self,
        blocks: RowBlocks,
        hs: list[mx.array],
        cache: LayerCache,
        offset: int,
        masks: list[mx.array | None],
        store: bool,
        layer_scalar: mx.array,
    ) -> list[mx.array]:
        """`__call__` in C (host_kernels.decoder_layer), every row block at the layer's one host read."""
        attention = self.self_attn
        xs, rotations, cached, host_masks = attention.host_inputs(hs, cache, offset, masks)
        out, keys, values = host_kernels.decoder_layer(
            xs,
            blocks.starts,
            rotations,
            cached,
            host_masks,
            attention.host_weights(),
            self._host_weights(),
            float(layer_scalar.item()),
            cpu_cores(),
        )
        if store:
            cache.append(mx.array(keys), mx.array(values))
        edges = np.cumsum([0, *(h.size // h.shape[-1] for h in hs)])
        return [mx.array(out[a:b]).reshape(h.shape) for a, b, h in zip(edges, edges[1:], hs)]

    def _host_weights(self) -> host_kernels.LayerWeights:
        """The layer's weights besides attention's as the C kernels read them: host views, made again only when
        one is replaced."""
        norms = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm")
        norms += ("pre_feedforward_layernorm_2", "post_feedforward_layernorm", "post_feedforward_layernorm_1")
        norms += ("post_feedforward_layernorm_2",)
        router, mlp = self.router, self.mlp
        arrays = [self[name].weight for name in norms] + [router.proj.weight, router.scale, router.per_expert_scale]
        arrays += [self.experts.gate_up_proj.packed, self.experts.down_proj.packed]
        return self._host_views([*arrays, mlp.gate_proj.packed, mlp.up_proj.packed, mlp.down_proj.packed])

    def _layer_weights(self, views: list[np.ndarray]) -> host_kernels.LayerWeights:
        """`_host_weights`' views as LayerWeights: the router's scale times hidden^-½, as moe.Router scales its
        input."""
        router = self.router
        router_scale = np.asarray(router.scale * router.root_size)
        return host_kernels.LayerWeights(
            *views[:8], router_scale, views[9], router.top_k, *views[10:], router.eps
        )  # fmt: skip


class Decoder(nn.Module):
    """Holds the shared weights: embeddings, layers, final norm, self-conditioning."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [TransformerLayer(config, shape) for shape in config.layers]
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
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
    def __init__(self, config: TextConfig):
        super().__init__()
        self.language_model = EncoderLanguageModel(config)


class Backbone(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.decoder = Decoder(config)
        self.encoder = Encoder(config)


# How self-conditioning's probs @ E (canvas × vocabulary × hidden) runs on a GPU when the tied embedding E is
# quantized: "quantized", MLX's quantized matmul on the table as stored; "quantized:N", the same in N vocabulary
# slices whose products are summed in float32 (one matmul sums down the whole vocabulary in few output tiles);
# "dequantized:N", N slices each dequantized just before a plain matmul (a passing copy of 1/N of the table).
# None: "quantized:8" under CUDA, where on the H200 it took 3.2 ms against 5.2 ms for one matmul and 3.8 ms
# dequantized in 8 slices (bench/RESULTS.md), "quantized" elsewhere (Metal is unmeasured). The CPU always
# takes "quantized". The head's hidden @ Eᵀ stays one quantized matmul: in slices it measured slower.
SELF_CONDITIONING_PRODUCT: str | None = None
PRODUCT_KINDS = ("quantized", "dequantized")


def self_conditioning_product() -> str:
    """How self-conditioning's product runs here (see SELF_CONDITIONING_PRODUCT)."""
    if on_cpu():
        return "quantized"
    if SELF_CONDITIONING_PRODUCT is not None:
        return SELF_CONDITIONING_PRODUCT
    return "quantized:8" if kernels.on_cuda() else "quantized"


def parse_product(how: str) -> tuple[str, int]:
    """ "dequantized:8" -> ("dequantized", 8); "quantized" -> ("quantized", 1)."""
    kind, _, count = str(how).partition(":")
    if kind not in PRODUCT_KINDS or not (count == "" or (count.isdigit() and int(count) > 0)):
        raise ValueError(f"{how!r}: expected quantized, quantized:N or dequantized:N (N > 0 slices)")
    return kind, int(count or 1)


def embedding_product(probs: mx.array, embed: nn.QuantizedEmbedding, how: str) -> mx.array:
    """probs @ E for a quantized table E (vocabulary, hidden), as `how` says (see SELF_CONDITIONING_PRODUCT)."""
    kind, slices = parse_product(how)
    vocab = embed.weight.shape[0]
    step = -(-vocab // slices)
    quantization = {"group_size": embed.group_size, "bits": embed.bits, "mode": embed.mode}

    def product(rows: slice) -> mx.array:
        biases = embed.get("biases")
        weight, scales, biases = embed.weight[rows], embed.scales[rows], None if biases is None else biases[rows]
        if kind == "quantized":
            return mx.quantized_matmul(probs[..., rows], weight, scales, biases, transpose=False, **quantization)
        return probs[..., rows] @ mx.dequantize(weight, scales, biases, **quantization)

    parts = [product(slice(start, start + step)) for start in range(0, vocab, step)]
    if len(parts) == 1:
        return parts[0]
    return sum(part.astype(mx.float32) for part in parts).astype(parts[0].dtype)


class Model(nn.Module):
    """DiffusionGemma for block diffusion: `encode` fills a cache, `denoise` reads it."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.text_config = config.text
        self.model = Backbone(config.text)

    @property
    def layers(self) -> list[TransformerLayer]:
        return self.model.decoder.layers

    @property
    def embed_tokens(self) -> nn.Module:
        return self.model.decoder.embed_tokens

    def make_cache(self) -> EncoderCache:
        return EncoderCache(self.text_config.sliding_window, [shape.is_sliding for shape in self.text_config.layers])

    def _embed(self, ids: mx.array) -> mx.array:
        embeddings = self.embed_tokens(ids)
        return embeddings * embedding_scale(self.text_config.hidden_size, embeddings.dtype)

    def encode(self, input_ids: mx.array, cache: EncoderCache, attention_mask: mx.array | None = None) -> None:
        """Append the keys and values of `input_ids` (batch, length) to `cache`.

        `attention_mask` (batch, length) marks real tokens with 1 and left
        padding with 0; padded positions are never attended to afterwards.
        """
        batch, length = input_ids.shape
        cache.check_batch(batch)
        offset = cache.offset
        blocks = RowBlocks(length)
        masks = self._encoder_masks(cache, batch, length, attention_mask)
        hs = blocks.map(self._embed, blocks.split(input_ids))
        scalars = self.model.encoder.language_model.layers
        last = len(self.layers) - 1
        for index, (layer, layer_cache) in enumerate(zip(self.layers, cache.layers)):
            if index == last:
                # The encoder's output is never read, only its cache: the last
                # layer needs its keys and values and nothing more.
                normed = blocks.map(layer.input_layernorm, hs)
                layer_cache.append(*layer.self_attn.states(blocks, normed, offset))
                break
            # Each block's queries see their own rows of the causal mask.
            block_masks = blocks.split(masks[layer_cache.keep], axis=2)
            hs = layer(blocks, hs, layer_cache, offset, block_masks, True, scalars[index].layer_scalar)
        cache.append_validity(attention_mask, length, batch)

    def denoise(
        self,
        canvas_ids: mx.array,
        cache: EncoderCache,
        self_conditioning_logits: mx.array | None = None,
        *,
        self_conditioning_probs: mx.array | None = None,
    ) -> mx.array:
        """Float32 soft-capped logits (batch, canvas, vocab) for a canvas; the cache is unchanged.

        The previous prediction comes as logits (softmax taken here) or, when the
        caller has them already, as `self_conditioning_probs`.
        """
        hidden = self.denoise_hidden(
            canvas_ids, cache, self_conditioning_logits, self_conditioning_probs=self_conditioning_probs
        )
        return self.logits(RowBlocks.join(hidden))

    def denoise_hidden(
        self,
        canvas_ids: mx.array,
        cache: EncoderCache,
        self_conditioning_logits: mx.array | list[mx.array] | None = None,
        *,
        self_conditioning_probs: mx.array | list[mx.array] | None = None,
    ) -> list[mx.array]:
        """The decoder's normed output before the head, in row blocks (see RowBlocks): (batch, block, hidden) each.

        The previous prediction may come whole or in row blocks along the canvas
        axis, as the sampler keeps it.
        """
        batch, length = canvas_ids.shape
        cache.check_batch(batch)
        offset = cache.offset
        blocks = RowBlocks(length)
        probs = None
        if self_conditioning_logits is not None:
            probs = self._block_probs(blocks, self_conditioning_logits, from_logits=True)
        elif self_conditioning_probs is not None:
            probs = self._block_probs(blocks, self_conditioning_probs, from_logits=False)
        if self._conditions_on_host(probs):
            hs = self._conditioned_on_host(blocks, canvas_ids, probs)
        else:
            embeddings = blocks.map(self._embed, blocks.split(canvas_ids))
            soft = [None] * len(blocks) if probs is None else self._soft_embeddings(blocks, probs)
            hs = blocks.map(self.model.decoder.self_conditioning, embeddings, soft)
        # Layers keeping the same number of cached positions share one mask; it spans every query.
        masks = {cached: self._decoder_mask(cache, cached, length) for cached in {lc.length for lc in cache.layers}}
        for layer, layer_cache in zip(self.layers, cache.layers):
            block_masks = [masks[layer_cache.length]] * len(blocks)
            hs = layer(blocks, hs, layer_cache, offset, block_masks, False, layer.layer_scalar)
        return blocks.map(self.model.decoder.norm, hs)

    def logits(self, hidden: mx.array, temperature: mx.array | None = None) -> mx.array:
        """The tied head, in float32, soft-capped; divided by `temperature` when given (in the same pass)."""
        logits = self.head(hidden)
        cap = self.text_config.final_logit_softcapping
        if cap:
            return soft_cap(logits, cap, temperature)
        return logits if temperature is None else logits / temperature

    def head(self, hidden: mx.array) -> mx.array:
        """The tied head's float32 logits, before the soft-cap."""
        table = self.host_embedding(hidden.dtype)
        if table is None:
            return self.embed_tokens.as_linear(hidden).astype(mx.float32)
        mx.eval(hidden)
        rows = np.asarray(hidden).reshape(-1, hidden.shape[-1])
        logits = np.empty((len(rows), self.text_config.vocab_size), dtype=np.float32)
        edges = even_cuts(len(rows), cpu_cores())
        in_parallel(lambda a, b: table.head(rows[a:b], logits[a:b]), edges[:-1], edges[1:])
        return mx.array(logits).reshape(*hidden.shape[:-1], -1)

    def host_embedding(self, dtype: mx.Dtype) -> PackedEmbedding | None:
        """The embedding table packed for the CPU's C kernels, when they run the head and self-conditioning for
        inputs of `dtype` here."""
        table = self.embed_tokens
        return table if isinstance(table, PackedEmbedding) and dtype == mx.float32 and on_cpu() else None

    def _block_probs(
        self, blocks: RowBlocks, prediction: mx.array | list[mx.array], from_logits: bool
    ) -> list[mx.array]:
        """The previous prediction as probabilities per row block (the softmax taken here when it comes as logits)."""
        if isinstance(prediction, list) and len(prediction) != len(blocks):
            prediction = RowBlocks.join(prediction)
        if not isinstance(prediction, list):
            prediction = blocks.split(prediction)
        if from_logits:
            prediction = blocks.map(lambda block: mx.softmax(block.astype(mx.float32), axis=-1), prediction)
        return prediction

    def _soft_embeddings(self, blocks: RowBlocks, probs: list[mx.array]) -> list[mx.array]:
        """probs @ embeddings × scale, per row block."""
        table = self.host_embedding(probs[0].dtype)
        if table is None:
            return blocks.map(self._expected_embedding, probs)
        # In C, a thread per block (on the CPU, the probabilities are in host memory already).
        mx.eval(probs)
        scale = embedding_scale(self.text_config.hidden_size, mx.float32)
        sums = in_parallel(
            lambda block: table.expected_embedding(np.asarray(block).reshape(-1, block.shape[-1])), probs
        )
        return [mx.array(out).reshape(*block.shape[:-1], -1) * scale for out, block in zip(sums, probs)]

    def _conditions_on_host(self, probs: list[mx.array] | None) -> bool:
        """Whether the C kernels make the decoder's input here: the embedding table and self-conditioning's MLP
        packed for them, float32 probabilities."""
        dtype = mx.float32 if probs is None else probs[0].dtype
        conditioning = self.model.decoder.self_conditioning
        return self.host_embedding(dtype) is not None and conditioning.runs_on_host(dtype)

    def _conditioned_on_host(
        self, blocks: RowBlocks, canvas_ids: mx.array, probs: list[mx.array] | None
    ) -> list[mx.array]:
        """The decoder's input in C, a thread per row block: the embedding lookup, probs @ E, self-conditioning's
        MLP and norms (host_kernels.conditioned_embeddings). No MLX op runs between them."""
        table, conditioning = self.embed_tokens, self.model.decoder.self_conditioning
        weights, packed = conditioning.host_weights(), np.asarray(table.packed)
        scale = embedding_scale(self.text_config.hidden_size, mx.float32).item()
        ids = blocks.split(canvas_ids)
        probs = probs or [None] * len(blocks)
        mx.eval(ids, [block for block in probs if block is not None])

        def block_input(ids: mx.array, block_probs: mx.array | None) -> np.ndarray:
            soft = None
            if block_probs is not None:
                soft = table.expected_embedding(np.asarray(block_probs).reshape(-1, block_probs.shape[-1]))
            return host_kernels.conditioned_embeddings(np.asarray(ids).reshape(-1), soft, packed, scale, weights)

        outs = in_parallel(block_input, ids, probs)
        return [mx.array(out).reshape(*block.shape, -1) for out, block in zip(outs, ids)]

    def _expected_embedding(self, probs: mx.array) -> mx.array:
        """probs @ embeddings × scale: the expected embedding of the last prediction."""
        embed = self.embed_tokens
        if isinstance(embed, nn.QuantizedEmbedding):
            dtype = embed.scales.dtype
            soft = embedding_product(probs.astype(dtype), embed, self_conditioning_product())
        else:
            dtype = embed.weight.dtype
            soft = probs.astype(dtype) @ embed.weight
        return soft * embedding_scale(self.text_config.hidden_size, dtype)

    def _encoder_masks(
        self, cache: EncoderCache, batch: int, length: int, attention_mask: mx.array | None
    ) -> dict[int | None, mx.array]:
        """Boolean masks (batch|1, 1, length, keys), one per kind of layer cache."""
        config = self.text_config
        offset = cache.offset
        new_valid = None if attention_mask is None else attention_mask.astype(mx.bool_)
        masks = {}
        for layer_cache in cache.layers:
            key = layer_cache.keep
            if key in masks:
                continue
            cached = layer_cache.length
            query_pos = mx.arange(offset, offset + length)[:, None]
            key_pos = mx.arange(offset - cached, offset + length)[None, :]
            allowed = key_pos <= query_pos
            if layer_cache.keep is not None:
                allowed = allowed & (key_pos > query_pos - config.sliding_window)
            old_valid = cache.validity_of_last(cached)
            if new_valid is not None or old_valid is not None:
                valid = mx.concatenate(
                    [
                        old_valid if old_valid is not None else mx.ones((batch, cached), dtype=mx.bool_),
                        new_valid if new_valid is not None else mx.ones((batch, length), dtype=mx.bool_),
                    ],
                    axis=1,
                )
                # A padded query may see no real key; letting it see itself
                # keeps its (never read) output finite.
                allowed = (allowed[None] & valid[:, None, :]) | (key_pos == query_pos)[None]
                masks[key] = allowed[:, None]
            else:
                masks[key] = allowed[None, None]
        return masks

    def _decoder_mask(self, cache: EncoderCache, cached: int, canvas: int) -> mx.array | None:
        """The canvas sees every real cached position and the whole canvas."""
        valid = cache.validity_of_last(cached)
        if valid is None:
            return None
        canvas_valid = mx.ones((valid.shape[0], canvas), dtype=mx.bool_)
        return mx.concatenate([valid, canvas_valid], axis=1)[:, None, None, :]
