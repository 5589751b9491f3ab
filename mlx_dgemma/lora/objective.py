"""The block-diffusion training objective, as an MLX graph that `mx.value_and_grad` differentiates.

It follows the published fine-tuning recipe for DiffusionGemma (NVIDIA NeMo AutoModel's
`DiffusionGemmaSFTRecipe`); docs/where we differ are in `block_diffusion_loss`'s docstring.

One training example is a token sequence, the prompt then the response (the assistant's tokens). Per example:

- the response is cut into blocks of `canvas_length` tokens, counted from its first token, the last block filled
  up to the canvas with EOS (the sampler commits a canvas whose tail after EOS is padding: the model learns to
  close a canvas with EOS); one block is chosen at random;
- the causal encoder runs over the clean sequence; the decoder's canvas attends to the encoder's keys and values
  of everything before the chosen block (the prompt and the response's earlier blocks, as generation would have
  committed them), sliding layers to the last `sliding_window - 1` of them, exactly as `Model.denoise` reads the
  cache at inference;
- a corruption level t ~ U(eps, 1); each canvas position is replaced by a uniformly random token with
  probability t (no mask token: the canvas noise the sampler uses);
- self-conditioning: a first decoder pass without it, its soft-capped logits detached (`mx.stop_gradient`) and fed
  as the self-conditioning signal of the second pass for the examples whose coin (probability 0.5) came up;
- the loss is the decoder's cross-entropy against the clean block, averaged over all the block's positions
  (corrupted or not), plus `ar_weight` times the encoder's next-token cross-entropy over the clean response.

The randomness is drawn on the host (`BlockNoise.draw`, numpy) and handed in, so the loss itself is a pure
function of arrays: a fixed batch and noise give a fixed loss, which is what the tests compare with torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..model import DecoderLayer, Model

DEFAULT_EPS = 1e-3
DEFAULT_SELF_CONDITIONING = 0.5


@dataclass(frozen=True)
class Example:
    """One training sequence: `tokens` is the prompt then the response, the response starting at
    `response_start` (at least 1: the encoder needs a token of context)."""

    tokens: tuple[int, ...]
    response_start: int

    def __post_init__(self) -> None:
        if not 1 <= self.response_start < len(self.tokens):
            raise ValueError(
                f"an example needs context and a response: response_start {self.response_start}, "
                f"{len(self.tokens)} tokens"
            )

    @property
    def response_length(self) -> int:
        return len(self.tokens) - self.response_start

    def blocks(self, canvas_length: int) -> int:
        """How many canvas-length blocks the response spans."""
        return -(-self.response_length // canvas_length)


@dataclass(frozen=True)
class BlockNoise:
    """Everything random about one batch's loss, per example: which response `block`, the corruption level `t`,
    the uniform draws `u` (a position is corrupted where u < t) and the `replacement` tokens (batch, canvas),
    and the `self_condition` coin."""

    block: np.ndarray
    t: np.ndarray
    u: np.ndarray
    replacement: np.ndarray
    self_condition: np.ndarray

    @classmethod
    def draw(
        cls,
        rng: np.random.Generator,
        examples: Sequence[Example],
        canvas_length: int,
        vocab_size: int,
        eps: float = DEFAULT_EPS,
        self_conditioning: float = DEFAULT_SELF_CONDITIONING,
    ) -> BlockNoise:
        batch = len(examples)
        blocks = np.array([example.blocks(canvas_length) for example in examples])
        return cls(
            block=np.minimum((rng.random(batch) * blocks).astype(np.int64), blocks - 1),
            t=eps + (1 - eps) * rng.random(batch),
            u=rng.random((batch, canvas_length)),
            replacement=rng.integers(0, vocab_size, (batch, canvas_length)),
            self_condition=rng.random(batch) < self_conditioning,
        )


@dataclass(frozen=True)
class DiffusionBatch:
    """A batch laid out for the loss: every row's chosen block starts at position `context` of `inputs`.

    Rows are left-padded so their blocks line up (RoPE is relative: a uniform shift of a row's positions changes
    nothing) and right-padded to a common length; `valid` marks real tokens. The canvas is (batch, canvas);
    the autoregressive loss reads the encoder's hidden states at `ar_index`, which predict `ar_targets`.
    """

    inputs: mx.array  # (batch, length) int32, the clean sequences
    valid: mx.array  # (batch, length) bool
    context: int  # where the blocks start; the decoder sees the encoder's states before it
    canvas: mx.array  # (batch, canvas) int32, the corrupted block
    targets: mx.array  # (batch, canvas) int32, the clean block (EOS-filled)
    canvas_mask: mx.array  # (batch, canvas) float32, positions counted
    self_condition: np.ndarray  # (batch,) bool, host side: whether a first pass is needed at all
    coin: mx.array  # (batch,) bool, the same on the device: which rows get the first pass's signal
    ar_index: mx.array  # (batch, responses) int32
    ar_targets: mx.array  # (batch, responses) int32
    ar_mask: mx.array  # (batch, responses) float32
    padded: bool  # whether any position of `inputs` is padding

    @property
    def canvas_tokens(self) -> int:
        return int(self.canvas.shape[0] * self.canvas.shape[1])

    @property
    def tokens(self) -> int:
        """Tokens the model reads: the clean sequences' and the canvases'."""
        return int(self.valid.sum().item()) + self.canvas_tokens


def make_batch(
    examples: Sequence[Example],
    noise: BlockNoise,
    canvas_length: int,
    fill_id: int,
    pad_id: int = 0,
    bucket: bool = False,
) -> DiffusionBatch:
    """Lay `examples` out for `block_diffusion_loss` with the blocks and noise of `noise`.

    With `bucket`, the context, the length and the response positions are padded up to the next of eight sizes per
    octave (`bucketed`: at most 1/8 more, masked: the same loss), so that batches of nearby lengths share one shape,
    and one compiled training step."""
    size = bucketed if bucket else (lambda value: value)
    batch = len(examples)
    starts = []
    for row, example in enumerate(examples):
        block = int(noise.block[row])
        if not 0 <= block < example.blocks(canvas_length):
            raise ValueError(f"row {row}: block {block} is outside its response's {example.blocks(canvas_length)}")
        starts.append(example.response_start + block * canvas_length)
    context = size(max(starts))
    length = size(context + max(len(example.tokens) - start for example, start in zip(examples, starts)))
    responses = size(max(example.response_length for example in examples))
    inputs = np.full((batch, length), pad_id, dtype=np.int32)
    valid = np.zeros((batch, length), dtype=bool)
    targets = np.full((batch, canvas_length), fill_id, dtype=np.int32)
    ar_index = np.zeros((batch, responses), dtype=np.int32)
    ar_targets = np.zeros((batch, responses), dtype=np.int32)
    ar_mask = np.zeros((batch, responses), dtype=np.float32)
    for row, (example, start) in enumerate(zip(examples, starts)):
        tokens = np.asarray(example.tokens, dtype=np.int32)
        shift = context - start
        inputs[row, shift : shift + len(tokens)] = tokens
        valid[row, shift : shift + len(tokens)] = True
        block = tokens[start : start + canvas_length]
        targets[row, : len(block)] = block
        count = example.response_length
        # The hidden state before each response token predicts it.
        ar_index[row, :count] = shift + example.response_start - 1 + np.arange(count)
        ar_targets[row, :count] = tokens[example.response_start :]
        ar_mask[row, :count] = 1
    corrupted = noise.u < noise.t[:, None]
    canvas = np.where(corrupted, noise.replacement, targets).astype(np.int32)
    return DiffusionBatch(
        inputs=mx.array(inputs),
        valid=mx.array(valid),
        context=context,
        canvas=mx.array(canvas),
        targets=mx.array(targets),
        canvas_mask=mx.ones((batch, canvas_length), dtype=mx.float32),
        self_condition=np.asarray(noise.self_condition, dtype=bool),
        coin=mx.array(np.asarray(noise.self_condition, dtype=bool)),
        ar_index=mx.array(ar_index),
        ar_targets=mx.array(ar_targets),
        ar_mask=mx.array(ar_mask),
        padded=not bool(valid.all()),
    )


def bucketed(value: int) -> int:
    """`value` rounded up to a multiple of 2^(⌊log2 value⌋ - 3): 8 sizes per octave, values below 16 as they are."""
    multiple = 1 << max(0, value.bit_length() - 4)
    return -(-value // multiple) * multiple


class _Context:
    """The part of `cache.LayerCache` a layer calls, over arrays in the graph: the encoder's states kept by
    `commit`, a decoder pass's canvas states put after given context states by `extended`."""

    def __init__(self, keys: mx.array | None = None, values: mx.array | None = None):
        self.keys, self.values = keys, values
        self._new: tuple[mx.array, mx.array] | None = None

    def extended(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self._new = (keys, values)
        if self.keys is None:
            return keys, values
        return mx.concatenate([self.keys, keys], axis=2), mx.concatenate([self.values, values], axis=2)

    def commit(self) -> None:
        self.keys, self.values = self._new


def _checkpointed(layer: nn.Module, fn: Callable[..., object], enabled: bool) -> Callable[..., object]:
    """`fn(*arrays)` (which runs `layer`), recomputed in the backward pass when `enabled` (as mlx-lm's
    `grad_checkpoint` does: the layer's trainable parameters go in as inputs of the checkpoint)."""
    if not enabled:
        return fn

    def inner(params, *arrays):
        layer.update(params)
        return fn(*arrays)

    checkpoint = mx.checkpoint(inner)
    return lambda *arrays: checkpoint(layer.trainable_parameters(), *arrays)


def encode(
    model: Model, inputs: mx.array, valid: mx.array, padded: bool = True, checkpoint: bool = False
) -> tuple[mx.array, list[tuple[mx.array, mx.array]]]:
    """The encoder over whole sequences: its last hidden states (normed, before the tied head) and each
    layer's keys and values (batch, kv_heads, length, head_dim) as the cache would hold them."""
    empty = model.make_cache()  # the masks are those the encoder uses for a first chunk
    masks = model.encoder_masks(empty, *inputs.shape, valid if padded else None)
    h = model.embed(inputs)
    states = []
    scalars = model.model.encoder.language_model.layers
    for layer, scalar, layer_cache in zip(model.layers, scalars, empty.layers):
        mask = masks[layer_cache.keep]

        def run(h, layer=layer, scalar=scalar.layer_scalar, mask=mask):
            context = _Context()
            out = layer(h, context, 0, mask, True, scalar)
            return out, context.keys, context.values

        h, keys, values = _checkpointed(layer, run, checkpoint)(h)
        states.append((keys, values))
    return model.model.decoder.norm(h), states


def denoise(
    model: Model,
    canvas: mx.array,
    states: Sequence[tuple[mx.array, mx.array]],
    valid: mx.array,
    context: int,
    padded: bool,
    self_conditioning_logits: mx.array | None = None,
    self_condition: mx.array | None = None,
    checkpoint: bool = False,
) -> mx.array:
    """Decoder logits (batch, canvas, vocab) for `canvas` placed after the first `context` positions of the
    encoder's `states`, as `Model.denoise` computes them after a cache holding those positions.

    `self_condition` (batch,) gates `self_conditioning_logits` per row (False: no signal, as on a first step)."""
    hidden = decoder_states(
        model, canvas, states, valid, context, padded, self_conditioning_logits, self_condition, checkpoint
    )
    return model.logits(hidden)


def decoder_states(
    model: Model,
    canvas: mx.array,
    states: Sequence[tuple[mx.array, mx.array]],
    valid: mx.array,
    context: int,
    padded: bool,
    self_conditioning_logits: mx.array | None = None,
    self_condition: mx.array | None = None,
    checkpoint: bool = False,
) -> mx.array:
    """`denoise`'s last hidden states (normed, before the tied head)."""
    soft = None
    if self_conditioning_logits is not None:
        soft = model.self_conditioning_signal(self_conditioning_logits)
        if self_condition is not None:
            soft = soft * self_condition[:, None, None].astype(soft.dtype)
    h = model.model.decoder.self_conditioning(model.embed(canvas), soft)
    keep = model.text_config.sliding_window - 1
    masks: dict[bool, mx.array | None] = {}
    for sliding in (False, True):
        first = max(0, context - keep) if sliding else 0
        masks[sliding] = None
        if padded:
            seen = mx.concatenate([valid[:, first:context], mx.ones((valid.shape[0], canvas.shape[1]), mx.bool_)], 1)
            masks[sliding] = seen[:, None, None, :]
    for layer, (keys, values), shape in zip(model.layers, states, model.text_config.layers):
        first = max(0, context - keep) if shape.is_sliding else 0
        mask = masks[shape.is_sliding]

        def run(h, keys, values, layer: DecoderLayer = layer, mask=mask):
            return layer(h, _Context(keys, values), context, mask, False, layer.layer_scalar)

        h = _checkpointed(layer, run, checkpoint)(h, keys[:, :, first:context], values[:, :, first:context])
    return model.model.decoder.norm(h)


# Positions whose vocabulary-wide logits are alive at once under gradient checkpointing (lora/memory.py).
LOGIT_CHUNK = 256


def head_cross_entropy(
    model: Model, hidden: mx.array, targets: mx.array, mask: mx.array, checkpoint: bool = False
) -> mx.array:
    """Σ mask x cross-entropy of the tied head's logits of `hidden` (batch, positions, hidden) against `targets`.

    With `checkpoint` the positions go through the head `LOGIT_CHUNK` at a time, each chunk recomputed in the
    backward pass: at the released vocabulary (262144) a chunk's float32 logits are 268 MB, the 2048 positions of a
    long response 2 GB for each array the loss and its gradient keep."""

    def chunk_loss(hidden, targets, mask):
        entropy = nn.losses.cross_entropy(model.logits(hidden), targets, reduction="none")
        return (entropy * mask).sum()

    if not checkpoint or hidden.shape[0] * hidden.shape[1] <= LOGIT_CHUNK:
        return chunk_loss(hidden, targets, mask)
    hidden = hidden.reshape(1, -1, hidden.shape[-1])
    targets, mask = targets.reshape(1, -1), mask.reshape(1, -1)
    total = mx.array(0.0)
    for start in range(0, hidden.shape[1], LOGIT_CHUNK):
        end = start + LOGIT_CHUNK
        # Targets and mask are constants of the chunk's function: only the hidden states take a gradient.
        chunk = mx.checkpoint(lambda h, t=targets[:, start:end], m=mask[:, start:end]: chunk_loss(h, t, m))
        total = total + chunk(hidden[:, start:end])
    return total


@dataclass(frozen=True)
class LossParts:
    loss: mx.array
    diffusion: mx.array
    autoregressive: mx.array
    canvas_tokens: mx.array
    response_tokens: mx.array


def loss_parts(model: Model, batch: DiffusionBatch, ar_weight: float = 1.0, checkpoint: bool = False) -> LossParts:
    """`block_diffusion_loss` with its two terms apart."""
    hidden, states = encode(model, batch.inputs, batch.valid, batch.padded, checkpoint)
    common = dict(valid=batch.valid, context=batch.context, padded=batch.padded, checkpoint=checkpoint)
    self_conditioning_logits = coin = None
    if batch.self_condition.any():
        # The first pass is not trained: neither it nor the states it reads carry gradients.
        frozen = [(mx.stop_gradient(keys), mx.stop_gradient(values)) for keys, values in states]
        first = denoise(model, batch.canvas, frozen, **{**common, "checkpoint": False})
        self_conditioning_logits = mx.stop_gradient(first)
        coin = batch.coin
    decoded = decoder_states(
        model, batch.canvas, states, self_conditioning_logits=self_conditioning_logits, self_condition=coin, **common
    )
    canvas_tokens = batch.canvas_mask.sum()
    diffusion = head_cross_entropy(model, decoded, batch.targets, batch.canvas_mask, checkpoint)
    diffusion = diffusion / mx.maximum(canvas_tokens, 1)
    response_tokens = batch.ar_mask.sum()
    autoregressive = mx.array(0.0)
    if ar_weight:
        picked = mx.take_along_axis(hidden, batch.ar_index[..., None], axis=1)
        autoregressive = head_cross_entropy(model, picked, batch.ar_targets, batch.ar_mask, checkpoint)
        autoregressive = autoregressive / mx.maximum(response_tokens, 1)
    loss = diffusion + ar_weight * autoregressive if ar_weight else diffusion
    return LossParts(loss, diffusion, autoregressive, canvas_tokens, response_tokens)


def block_diffusion_loss(
    model: Model, batch: DiffusionBatch, ar_weight: float = 1.0, checkpoint: bool = False
) -> tuple[mx.array, mx.array]:
    """The training loss of `batch` and the number of canvas tokens it averages over.

    As the published recipe (NeMo AutoModel's DiffusionGemma SFT) has it: uniform-random-token corruption at
    t ~ U(eps, 1), one response block per example, a flat mean cross-entropy over all the block's positions,
    corrupted and clean alike, with no 1/t weighting; two-pass self-conditioning with a per-example coin; plus
    `ar_weight` times the encoder's next-token cross-entropy (the recipe's `encoder_loss_weight`, default 1).

    Where we differ from that recipe, and why:
    - the autoregressive term counts the response's tokens only; the recipe scores every next token of the
      sequence (prompt and EOS fill too). Only the assistant's tokens are ever counted here, in both terms,
      the rule of mlx-lm's `mask_prompt` that users know;
    - the first self-conditioning pass runs only when some example's coin came up (the recipe always runs it
      to keep its distributed collectives in step); without a coin its result would be multiplied by zero;
    - only the chosen block goes through the decoder (the recipe runs every response block under a
      block-causal mask and scores one): the chosen block's logits are the same, at a fraction of the work.
    """
    parts = loss_parts(model, batch, ar_weight, checkpoint)
    return parts.loss, parts.canvas_tokens
