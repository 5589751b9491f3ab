"""Fast mode: a denoising step forwards only the canvas positions still changing.

Exact mode runs every canvas position through the decoder at every step, yet
after a while most positions are settled: they hold the token the model
predicts for them, step after step, with almost no doubt (FastSettings says
exactly when). Fast mode forwards only the others, the *live* positions.
Settled positions take part in attention through the keys and values of the
pass that last forwarded them, left after the cache (`LayerCache.rewritten`),
and keep that pass's logits and entropy.

The sampler's decisions follow exact mode's: forwarded positions draw from
their fresh logits (the same Gumbel noise exact mode would use there), every
position's entropy enters the entropy-bound acceptance, the rest is renoised,
and stable-and-confident stopping reads the whole canvas. A settled position
takes its argmax rather than a draw: with its entropy that far below the
bound it is always accepted, and a draw from it is its argmax but for a
chance of about its entropy. Only the forwarded positions' vocabulary-wide
work is done (processed logits, draws, entropies, the next step's
self-conditioning), so a step's cost shrinks with the live count throughout.

Shapes: the live count is rounded up to a multiple of `bucket` (at most the
free positions of a constrained canvas), the rest filled with the most
recently settled positions (forwarded like the live ones, so refreshed), so a
canvas's steps reuse a few shapes. The count comes from the step the host last
read, one behind the step being queued, so the host never waits on a step
before queueing the next (as in exact mode); a position that goes live after
that count was taken waits a step when the bucket has no room for it.

The first step, every `refresh_every`-th step and any step whose bucket would
hold the whole canvas forward the whole canvas and decide exactly as exact
mode does. With `final_pass`, the committed canvas is the argmax of a pass over
the whole canvas from the inputs of each row's last step, unless that step
forwarded the whole canvas already.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

from .cache import EncoderCache
from .model import Model
from .sampler import (
    FastSettings,
    Noise,
    Pins,
    SamplerSettings,
    StepState,
    _step_decisions,
    _stopping,
    accepted_positions,
    linear_temperature,
    token_entropy,
)

_LONGEST_STREAK = 1 << 16  # streaks rank settled positions; capped so that rank × length fits an int32


def bucketed(count: int, bucket: int, limit: int) -> int:
    """`count` rounded up to a multiple of `bucket` (at least one bucket), at most `limit`."""
    return min(limit, max(1, -(-count // bucket)) * bucket)


def live_positions(settled: mx.array, streak: mx.array, pinned: mx.array | None, size: int) -> mx.array:
    """(batch, size) canvas positions to forward: each row's live positions, then its most recently settled ones,
    pinned positions last."""
    length = settled.shape[-1]
    rank = mx.where(settled, mx.minimum(streak, _LONGEST_STREAK), -1)
    if pinned is not None:
        rank = mx.where(pinned, _LONGEST_STREAK + 1, rank)
    return mx.argsort(rank * length + mx.arange(length), axis=-1)[:, :size]


def settling(
    previous_canvas: mx.array,
    canvas: mx.array,
    argmax: mx.array,
    entropy: mx.array,
    streak: mx.array,
    pinned: mx.array | None,
    settle_steps: int,
    settle_entropy: float,
) -> tuple[mx.array, mx.array, mx.array]:
    """The streaks, the settled positions and each row's live count after a step."""
    # A position holds when its token is the one it had and the model's argmax: its next input is unchanged and
    # agrees with the prediction.
    holds = (canvas == previous_canvas) & (canvas == argmax)
    streak = mx.where(holds, streak + 1, 0)
    settled = (streak >= settle_steps) & (entropy < settle_entropy)
    if pinned is not None:
        settled = settled | pinned
    return streak, settled, (~settled).sum(axis=-1)


def _whole_canvas_decisions(
    logits: mx.array,
    temperature: mx.array,
    gumbel: mx.array,
    fresh_tokens: mx.array,
    state: StepState,
    pins: tuple[mx.array | None, mx.array | None],
    thresholds: tuple[float, float],
    settle: tuple[int, float],
    conditioning_dtype: mx.Dtype,
) -> tuple[mx.array, ...]:
    """A step that forwarded the whole canvas: exact mode's decisions, then the settling."""
    new = _step_decisions(logits, temperature, gumbel, fresh_tokens, state, *pins, *thresholds, conditioning_dtype)
    entropy = token_entropy(logits / temperature)  # the decisions' own: compilation computes it once
    if pins[0] is not None:
        entropy = mx.where(pins[0], 0.0, entropy)
    streak, settled, live = settling(state.canvas, new.canvas, new.argmax, entropy, state.streak, pins[0], *settle)
    exact = (new.canvas, new.argmax, new.self_conditioning_logits, new.finished, new.history)
    return (*exact, entropy, streak, settled, live)


def _live_decisions(
    live_logits: mx.array,
    positions: mx.array,
    temperature: mx.array,
    gumbel: mx.array,
    fresh_tokens: mx.array,
    state: StepState,
    pins: tuple[mx.array | None, mx.array | None],
    thresholds: tuple[float, float],
    settle: tuple[int, float],
) -> tuple[mx.array, ...]:
    """A step that forwarded `positions`: their fresh logits decided as exact mode decides, merged with what the
    other positions hold, then acceptance, renoising and stopping over the whole canvas, then the settling."""
    pinned, pin_tokens = pins
    entropy_bound, confidence_threshold = thresholds

    def merged(rows: mx.array, into: mx.array) -> mx.array:
        return mx.put_along_axis(into, positions, rows, axis=1)

    processed = live_logits / temperature
    # A position not forwarded keeps its argmax, which is also its draw (it is near-certain: see the module).
    draws = merged(mx.argmax(processed + gumbel, axis=-1), state.argmax)
    argmax = merged(mx.argmax(processed, axis=-1), state.argmax)
    entropy = merged(token_entropy(processed), state.entropy)
    if pinned is not None:
        entropy = mx.where(pinned, 0.0, entropy)
    canvas = mx.where(accepted_positions(entropy, entropy_bound), draws, fresh_tokens)
    if pinned is not None:
        canvas = mx.where(pinned, pin_tokens, canvas)
        argmax = mx.where(pinned, pin_tokens, argmax)
    # Rows that stopped earlier keep their canvas and draft.
    finished = state.finished
    canvas = mx.where(finished[:, None], state.canvas, canvas)
    argmax = mx.where(finished[:, None], state.argmax, argmax)
    finished, history = _stopping(state.history, argmax, entropy, finished, pinned, confidence_threshold)
    logits = mx.put_along_axis(state.logits, positions[..., None], live_logits, axis=1)
    streak, settled, live = settling(state.canvas, canvas, argmax, entropy, state.streak, pinned, *settle)
    return canvas, argmax, finished, history, logits, entropy, streak, settled, live


_compiled: dict[tuple[str, mx.Dtype | None], Callable] = {}


def _compiled_decisions(kind: str, conditioning_dtype: mx.Dtype | None = None) -> Callable:
    """The decisions of a whole-canvas or a live step, compiled (a dtype cannot be an argument: one per dtype)."""
    key = (kind, conditioning_dtype)
    if key not in _compiled:
        if kind == "whole":

            def decisions(logits, temperature, gumbel, fresh_tokens, state_arrays, pins, thresholds, settle):
                state = StepState(*state_arrays[:5], streak=state_arrays[5])
                return _whole_canvas_decisions(
                    logits, temperature, gumbel, fresh_tokens, state, pins, thresholds, settle, conditioning_dtype
                )

        else:

            def decisions(live_logits, positions, temperature, gumbel, fresh_tokens, state_arrays, *rest):
                canvas, argmax, finished, history, logits, entropy, streak = state_arrays
                state = StepState(canvas, argmax, None, finished, history, logits, None, entropy, streak)
                return _live_decisions(live_logits, positions, temperature, gumbel, fresh_tokens, state, *rest)

        _compiled[key] = mx.compile(decisions)
    return _compiled[key]


class FastCanvas:
    """One canvas denoised in fast mode: sizes and runs each step, then makes the final pass."""

    def __init__(
        self,
        model: Model,
        cache: EncoderCache,
        settings: SamplerSettings,
        noise: Noise,
        canvas_index: int,
        pins: Pins | None,
        length: int,
    ):
        self.model, self.cache, self.settings, self.noise = model, cache, settings, noise
        self.fast: FastSettings = settings.fast
        self.canvas_index, self.pins, self.length = canvas_index, pins, length
        # At most every free position is live: a constrained canvas never forwards more of it in a live step.
        self.limit = length if pins is None else max(1, int((~pins.pinned).sum(axis=-1).max().item()))
        self.known_live = self.limit  # live positions per row as of the latest step the host has read
        self.settle_entropy = self.fast.settle_entropy
        if self.settle_entropy is None:  # the sampler then always accepts a settled position: see FastSettings
            self.settle_entropy = settings.entropy_bound / max(1, length - 1)
        self.sizes: dict[int, int] = {}  # positions per row each step forwarded
        self.last_steps: list[tuple[StepState, int]] = []  # per row: its latest step's input, and that step
        self.stopped: list[bool] = []

    def size(self, step_index: int) -> int:
        """Positions per row that step `step_index` forwards (the canvas's length: all of them)."""
        every = self.fast.refresh_every
        if step_index == 1 or (every and (step_index - 1) % every == 0):
            return self.length
        size = bucketed(self.known_live, self.fast.bucket, self.limit)
        return self.length if size >= self.length else size

    def step(self, state: StepState, step_index: int) -> StepState:
        """One denoising step: the decoder over the live positions (or all), then the sampler's decisions."""
        size = self.sizes[step_index] = self.size(step_index)
        settings, noise, canvas_index = self.settings, self.noise, self.canvas_index
        batch, length = state.canvas.shape
        vocab = self.model.text_config.vocab_size
        temperature = linear_temperature(settings.steps + 1 - step_index, settings)
        fresh_tokens = noise.tokens(canvas_index, step_index, (batch, length), vocab)
        pins = (None, None) if self.pins is None else (self.pins.pinned, self.pins.tokens)
        streak = state.streak if state.streak is not None else mx.zeros((batch, length), dtype=mx.int32)
        thresholds = (settings.entropy_bound, settings.confidence_threshold)
        settle = (self.fast.settle_steps, self.settle_entropy)
        if size == self.length:
            conditioning = self.conditioning(state)
            logits = self.model.denoise(state.canvas, self.cache, conditioning)
            gumbel = noise.gumbel(canvas_index, step_index, logits.shape)
            state_arrays = (state.canvas, state.argmax, conditioning, state.finished, state.history, streak)
            decisions = _compiled_decisions("whole", self.model.embedding_dtype)
            outputs = decisions(logits, temperature, gumbel, fresh_tokens, state_arrays, pins, thresholds, settle)
            canvas, argmax, conditioning, finished, history, entropy, streak, settled, live = outputs
            return StepState(
                canvas, argmax, conditioning, finished, history, logits, temperature, entropy, streak, settled, live
            )
        positions = live_positions(state.settled, streak, pins[0], size)
        live_logits = self.model.denoise(
            mx.take_along_axis(state.canvas, positions, axis=1),
            self.cache,
            self.conditioning(state, positions),
            positions=positions,
        )
        gumbel = _gumbel_rows(noise, canvas_index, step_index, (batch, length, vocab), positions)
        state_arrays = (state.canvas, state.argmax, state.finished, state.history, state.logits, state.entropy, streak)
        decisions = _compiled_decisions("live")
        outputs = decisions(
            live_logits, positions, temperature, gumbel, fresh_tokens, state_arrays, pins, thresholds, settle
        )
        canvas, argmax, finished, history, logits, entropy, streak, settled, live = outputs
        return StepState(canvas, argmax, None, finished, history, logits, temperature, entropy, streak, settled, live)

    def conditioning(self, state: StepState, positions: mx.array | None = None) -> mx.array | None:
        """The self-conditioning logits `state` hands the next step (its processed logits, in the embeddings'
        dtype), at `positions` (batch, n) or all; None after no step."""
        if state.self_conditioning_logits is not None:
            conditioning = state.self_conditioning_logits
            return conditioning if positions is None else mx.take_along_axis(conditioning, positions[..., None], 1)
        if state.logits is None:
            return None
        logits = state.logits if positions is None else mx.take_along_axis(state.logits, positions[..., None], 1)
        return (logits / state.temperature).astype(self.model.embedding_dtype)

    def observe(self, step_index: int, previous: StepState, state: StepState, stopped: list[bool]) -> None:
        """What the host learnt from step `step_index` (its input `previous`, its output `state`, the rows
        `stopped` by now): the live count, and each row's last step until it stops."""
        self.known_live = max(state.live.tolist())
        if not self.last_steps:
            self.last_steps = [(previous, step_index)] * len(stopped)
            self.stopped = [False] * len(stopped)
        for row, done in enumerate(stopped):
            if not self.stopped[row]:
                self.last_steps[row] = (previous, step_index)
                self.stopped[row] = done

    def forwarded(self, last_step: int) -> int:
        """Positions forwarded per row over the canvas: steps 1 to `last_step`, and the final pass."""
        steps = sum(self.sizes[step] for step in range(1, last_step + 1))
        return steps + (self.length if any(self._rows_to_redo()) else 0)

    def committed(self, argmax: mx.array) -> mx.array:
        """The canvas to commit: `argmax`, or with `final_pass` the argmax of a pass over the whole canvas from the
        inputs of each row's last step, for the rows whose last step forwarded only some positions."""
        redo = self._rows_to_redo()
        if not any(redo):
            return argmax
        vocab = self.model.text_config.vocab_size
        canvases, conditionings = [], []
        for row, (state, _) in enumerate(self.last_steps):
            canvases.append(state.canvas[row : row + 1])
            conditioning = self.conditioning(state)
            # A first step's input has none; that step forwarded the whole canvas, so the row is not redone.
            zeros = mx.zeros((1, self.length, vocab), dtype=self.model.embedding_dtype)
            conditionings.append(zeros if conditioning is None else conditioning[row : row + 1])
        logits = self.model.denoise(mx.concatenate(canvases), self.cache, mx.concatenate(conditionings))
        full = mx.argmax(logits, axis=-1).astype(argmax.dtype)
        if self.pins is not None:
            full = mx.where(self.pins.pinned, self.pins.tokens, full)
        return mx.where(mx.array(redo)[:, None], full, argmax)

    def _rows_to_redo(self) -> list[bool]:
        if not self.fast.final_pass:
            return []
        return [self.sizes[step] < self.length for _, step in self.last_steps]


def _gumbel_rows(noise: Noise, canvas: int, step: int, shape: tuple[int, int, int], positions: mx.array) -> mx.array:
    """The Gumbel noise exact mode would draw at `positions`, computing only those rows where the noise can."""
    rows = getattr(noise, "gumbel_rows", None)
    if rows is not None:
        return rows(canvas, step, shape, positions)
    return mx.take_along_axis(noise.gumbel(canvas, step, shape), positions[..., None], axis=1)
