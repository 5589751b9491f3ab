"""The block-diffusion sampler: denoise a canvas, commit it, append it, repeat.

Named as the reference names its parts. Per canvas: the entropy-bound sampler
initializes the canvas with uniform noise; each denoising step (N down to 1)
runs the decoder conditioned on the last step's processed logits
(self-conditioning), divides the logits by the linear temperature schedule,
draws a token per position, accepts the lowest-entropy draws within the
entropy bound and renoises the rest; stable-and-confident stopping ends the
canvas early. The committed canvas is the last argmax canvas; after the first
EOS everything becomes pad.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx

from .cache import EncoderCache
from .model import Model

SPEEDS = ("exact", "fast")


@dataclass(frozen=True)
class FastSettings:
    """How fast mode (`speed="fast"`) picks the canvas positions a step forwards (fast.py); README "Fast mode" gives
    the measurements behind the defaults.

    A position is *settled* once, `settle_steps` steps in a row, it kept its token and that token was the model's
    argmax, with an entropy (of the step's processed logits, nats) below `settle_entropy`; None takes
    entropy_bound / (canvas − 1), under which the entropy-bound sampler accepts a position whatever the others
    hold (the positions before it sum to at most the bound), so a settled position is never renoised. Pinned
    positions are settled from the start. A step forwards the others (the *live* ones), their count rounded up to
    a multiple of `bucket` so that shapes repeat; settled positions keep the logits, keys and values of the pass
    that last forwarded them. Every `refresh_every`-th step forwards the whole canvas (0: only the first does).
    With `final_pass`, the committed canvas is the argmax of a pass over the whole canvas from the last step's
    inputs, what the exact model predicts from them, rather than the last step's mix of fresh and kept logits.
    """

    settle_steps: int = 2
    settle_entropy: float | None = None
    refresh_every: int = 16
    final_pass: bool = True
    bucket: int = 32

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.settle_steps, int) and self.settle_steps >= 1, "settle_steps must be an integer >= 1"),
            (self.settle_entropy is None or self.settle_entropy >= 0, "settle_entropy must be >= 0 or None"),
            (
                isinstance(self.refresh_every, int) and self.refresh_every >= 0,
                "refresh_every must be an integer >= 0",
            ),
            (isinstance(self.final_pass, bool), "final_pass must be True or False"),
            (isinstance(self.bucket, int) and self.bucket >= 1, "bucket must be a positive integer"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message} (got {self!r})")


@dataclass(frozen=True)
class SamplerSettings:
    """Sampler parameters; defaults are the reference's, a checkpoint's generation_config.json overrides them.

    `speed` "exact" (the default) computes what the reference computes; "fast" forwards only the canvas
    positions still changing (`fast` says how: FastSettings), faster and approximate.
    """

    steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    max_new_tokens: int = 256
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    seed: int = 0
    speed: str = "exact"
    fast: FastSettings = FastSettings()

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.steps, int) and self.steps > 0, "steps must be a positive integer"),
            (self.entropy_bound > 0, "entropy_bound must be > 0"),
            (0 <= self.t_min < self.t_max, "temperatures need 0 <= t_min < t_max"),
            (
                isinstance(self.stability_threshold, int) and self.stability_threshold >= 0,
                "stability_threshold must be an integer >= 0",
            ),
            (self.confidence_threshold > 0, "confidence_threshold must be > 0"),
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens > 0, "max_new_tokens must be positive"),
            (self.speed in SPEEDS, f"speed must be one of {', '.join(SPEEDS)}"),
            (isinstance(self.fast, FastSettings), "fast must be a FastSettings"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message} (got {self._describe()})")

    def _describe(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self))

    def updated(self, **overrides: Any) -> SamplerSettings:
        """A copy with the given parameters changed; None leaves one as it is."""
        unknown = set(overrides) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"unknown sampler parameter(s): {', '.join(sorted(unknown))}")
        changes = {key: value for key, value in overrides.items() if value is not None}
        if "eos_token_ids" in changes:
            changes["eos_token_ids"] = _as_tuple(changes["eos_token_ids"])
        return replace(self, **changes)

    @classmethod
    def from_checkpoint(cls, path: str | Path, text_config: Any | None = None) -> SamplerSettings:
        """Defaults overridden by the checkpoint's generation_config.json (nulls keep defaults)."""
        generation = {}
        file = Path(path) / "generation_config.json"
        if file.is_file():
            try:
                generation = json.loads(file.read_text())
            except json.JSONDecodeError as error:
                raise ValueError(f"{file} is not valid JSON ({error})") from None
        return cls.from_generation_config(generation, text_config)

    @classmethod
    def from_generation_config(cls, generation: dict[str, Any], text_config: Any | None = None) -> SamplerSettings:
        sampler = generation.get("sampler_config") or {}
        values = {
            "steps": generation.get("max_denoising_steps"),
            "entropy_bound": sampler.get("entropy_bound") if isinstance(sampler, dict) else None,
            "t_min": generation.get("t_min"),
            "t_max": generation.get("t_max"),
            "stability_threshold": generation.get("stability_threshold"),
            "confidence_threshold": generation.get("confidence_threshold"),
            "max_new_tokens": generation.get("max_new_tokens"),
            "pad_token_id": generation.get("pad_token_id"),
        }
        eos = generation.get("eos_token_id")
        if eos is None and text_config is not None:
            eos = text_config.eos_token_id
        if values["pad_token_id"] is None and text_config is not None:
            values["pad_token_id"] = text_config.pad_token_id
        return cls().updated(eos_token_ids=eos, **values)


def _as_tuple(value: int | list[int] | tuple[int, ...] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


class Noise(Protocol):
    """Every random number the sampler uses. `canvas` counts from 0 within one call; `step` 0 is a canvas's
    initial noise and s >= 1 the s-th denoising step (its draw, then its renoising)."""

    def tokens(self, canvas: int, step: int, shape: tuple[int, ...], vocab: int) -> mx.array: ...

    def gumbel(self, canvas: int, step: int, shape: tuple[int, ...]) -> mx.array: ...


class RowNoise:
    """Each row of a batch drawing from a noise of its own at a canvas of its own: a denoising batch of
    requests in which each gets the numbers it would get alone. The `canvas` the sampler passes is ignored."""

    def __init__(self, rows: Sequence[tuple[Noise, int]]):
        self.rows = list(rows)  # (noise, canvas index) per row

    def tokens(self, canvas: int, step: int, shape: tuple[int, ...], vocab: int) -> mx.array:
        row_shape = (1, *shape[1:])
        return mx.concatenate([noise.tokens(index, step, row_shape, vocab) for noise, index in self.rows])

    def gumbel(self, canvas: int, step: int, shape: tuple[int, ...]) -> mx.array:
        row_shape = (1, *shape[1:])
        return mx.concatenate([noise.gumbel(index, step, row_shape) for noise, index in self.rows])


def _mix32(x: mx.array) -> mx.array:
    """murmur3's 32-bit finaliser: a bijection of uint32 that scatters every input bit."""
    x = x ^ (x >> 16)
    x = x * mx.array(0x85EBCA6B, dtype=mx.uint32)
    x = x ^ (x >> 13)
    x = x * mx.array(0xC2B2AE35, dtype=mx.uint32)
    return x ^ (x >> 16)


# Uniforms from the top 23 bits, ((bits >> 9) + 0.5) / 2^23: exact in float32 and strictly inside (0, 1), so the
# Gumbel noise is finite (with 24 bits the largest rounds to 1, +inf noise, a token forced whatever the logits).
UNIFORM_SHIFT = 9
UNIFORM_SCALE = 1.0 / (1 << (32 - UNIFORM_SHIFT))


@mx.compile
def _hashed_uniform_bits(counter: mx.array, key: mx.array) -> mx.array:
    # Two keyed rounds over the element counter: streams of different keys are unrelated.
    return _mix32(_mix32(counter + key[0]) ^ key[1])


@mx.compile
def _gumbel_from_bits(bits: mx.array) -> mx.array:
    uniform = ((bits >> UNIFORM_SHIFT).astype(mx.float32) + 0.5) * UNIFORM_SCALE
    return -mx.log(-mx.log(uniform))


class SeededNoise:
    """Counter-based noise: element i of the draw for (seed, canvas, step, kind) is a hash of i under that key.

    The same integers on every backend (the Gumbel values to float32 rounding of `log`), so a seed gives one
    generation wherever it runs, and a test can hand the same numbers to the reference.
    """

    def __init__(self, seed: int = 0):
        self.seed = seed

    def _key(self, canvas: int, step: int, kind: int) -> mx.array:
        words = [self.seed & 0xFFFFFFFF, (self.seed >> 32) & 0xFFFFFFFF, canvas, step, kind]
        key = 0x9E3779B9
        for word in words:  # fold the words into two 32-bit keys (splitmix-style)
            key = (key ^ word) * 0x2545F491 & 0xFFFFFFFF
            key ^= key >> 15
        return mx.array([key, (key * 0x9E3779B9 + 0x7F4A7C15) & 0xFFFFFFFF], dtype=mx.uint32)

    def _bits(self, canvas: int, step: int, kind: int, shape: tuple[int, ...]) -> mx.array:
        counter = mx.arange(math.prod(shape), dtype=mx.uint32).reshape(shape)
        return _hashed_uniform_bits(counter, self._key(canvas, step, kind))

    def tokens(self, canvas: int, step: int, shape: tuple[int, ...], vocab: int) -> mx.array:
        return (self._bits(canvas, step, 0, shape) % vocab).astype(mx.int32)

    def gumbel(self, canvas: int, step: int, shape: tuple[int, ...]) -> mx.array:
        return _gumbel_from_bits(self._bits(canvas, step, 1, shape))

    def gumbel_rows(self, canvas: int, step: int, shape: tuple[int, int, int], positions: mx.array) -> mx.array:
        """The rows `positions` (batch, n) of `gumbel(canvas, step, shape)`, shape (batch, length, vocab), computing
        only those (fast mode draws for the positions it forwarded)."""
        batch, length, vocab = shape
        rows = mx.arange(batch, dtype=mx.uint32)[:, None] * length + positions.astype(mx.uint32)
        counter = (rows * vocab)[..., None] + mx.arange(vocab, dtype=mx.uint32)
        return _gumbel_from_bits(_hashed_uniform_bits(counter, self._key(canvas, step, 1)))


def linear_temperature(cur_step: int, settings: SamplerSettings) -> mx.array:
    """The linear temperature schedule: t_min + (t_max - t_min) * (cur_step / N), `cur_step` counting the steps
    that remain (N first). In float32 with the division as the reference does it: a float64 temperature differs
    in the last bit, and self-conditioning compounds that into other tokens."""
    ratio = mx.array(cur_step, dtype=mx.float32) / mx.array(settings.steps, dtype=mx.float32)
    return mx.array(settings.t_min, dtype=mx.float32) + mx.array(settings.t_max - settings.t_min, mx.float32) * ratio


def token_entropy(processed: mx.array) -> mx.array:
    """The entropy of softmax(processed) per position: log Σe − Σ(e·s)/Σe with s = x − max x, e = exp(s)."""
    shifted = processed - processed.max(axis=-1, keepdims=True)
    exps = mx.exp(shifted)
    total = exps.sum(axis=-1)
    return mx.log(total) - (exps * shifted).sum(axis=-1) / total


def accepted_positions(entropy: mx.array, entropy_bound: float) -> mx.array:
    """The entropy-bound sampler's acceptance: the lowest-entropy positions whose summed entropy, less the
    largest of them, stays within the bound."""
    order = mx.argsort(entropy, axis=-1)
    ascending = mx.take_along_axis(entropy, order, axis=-1)
    within = (mx.cumsum(ascending, axis=-1) - ascending) <= entropy_bound
    return mx.take_along_axis(within, mx.argsort(order, axis=-1), axis=-1)


@dataclass(frozen=True)
class Pins:
    """Canvas positions held to given tokens at every step, and a starting canvas.

    `pinned` (batch, canvas) bool: these positions always hold `tokens`; they are
    never renoised or replaced, spend none of the entropy budget and are left
    out of the confidence test. `start` (batch, canvas) bool: free positions that
    begin from `tokens` instead of noise (editing an existing text).
    """

    pinned: mx.array
    tokens: mx.array
    start: mx.array | None = None

    def initial_canvas(self, noise: mx.array) -> mx.array:
        use_tokens = self.pinned if self.start is None else self.pinned | self.start
        return mx.where(use_tokens, self.tokens, noise)

    @classmethod
    def stacked(cls, rows: Sequence[Pins | None], length: int) -> Pins | None:
        """The pins of several canvases of `length` as one batch's, a row without pins free throughout; None when
        no row has any."""
        if all(row is None for row in rows):
            return None
        free = mx.zeros((1, length), dtype=mx.bool_)
        tokens = mx.zeros((1, length), dtype=mx.int32)
        pinned = mx.concatenate([free if row is None else row.pinned for row in rows])
        pinned_tokens = mx.concatenate([tokens if row is None else row.tokens.astype(mx.int32) for row in rows])
        if all(row is None or row.start is None for row in rows):
            return cls(pinned, pinned_tokens)
        start = mx.concatenate([free if row is None or row.start is None else row.start for row in rows])
        return cls(pinned, pinned_tokens, start)


@dataclass
class StepState:
    """What one denoising step hands the next."""

    canvas: mx.array  # the current canvas: accepted draws, the rest renoised
    argmax: mx.array  # the argmax canvas (the draft, and what a canvas commits)
    self_conditioning_logits: mx.array | None  # the processed logits, in the embeddings' dtype
    finished: mx.array  # rows whose denoising has stopped
    history: mx.array | None  # the last `stability_threshold` argmax canvases
    # Fast mode only (fast.py), where a step that forwards some positions leaves `self_conditioning_logits` None:
    logits: mx.array | None = None  # each position's logits from the pass that last forwarded it
    temperature: mx.array | None = None  # the step's: its processed logits are logits / temperature
    entropy: mx.array | None = None  # each position's entropy as of the pass that last forwarded it
    streak: mx.array | None = None  # steps in a row each position kept its token, the argmax
    settled: mx.array | None = None  # positions the next step need not forward
    live: mx.array | None = None  # per row, how many positions are not settled

    @property
    def arrays(self) -> list[mx.array]:
        """The arrays a step computes (for evaluation)."""
        exact = (self.canvas, self.argmax, self.finished, self.self_conditioning_logits, self.history)
        fast = (self.logits, self.entropy, self.streak, self.settled, self.live)
        return [array for array in (*exact, *fast) if array is not None]


def _step_decisions(
    logits: mx.array,
    temperature: mx.array,
    gumbel: mx.array,
    fresh_tokens: mx.array,
    state: StepState,
    pinned: mx.array | None,
    pin_tokens: mx.array | None,
    entropy_bound: float,
    confidence_threshold: float,
    conditioning_dtype: mx.Dtype,
) -> StepState:
    """Everything a step does after the decoder, top to bottom (one compiled graph: see `_compiled_decisions`)."""
    # The linear temperature schedule.
    processed = logits / temperature
    # The denoiser's canvas: a token drawn per position (argmax of processed + Gumbel noise is a draw from
    # softmax(processed)), and the argmax canvas.
    denoiser_canvas = mx.argmax(processed + gumbel, axis=-1)
    argmax = mx.argmax(processed, axis=-1)
    entropy = token_entropy(processed)
    if pinned is not None:
        entropy = mx.where(pinned, 0.0, entropy)  # certain: none of the budget, and out of the confidence test
    # The entropy-bound sampler: accept the draws within the bound, renoise every other position.
    accepted = accepted_positions(entropy, entropy_bound)
    canvas = mx.where(accepted, denoiser_canvas, fresh_tokens)
    if pinned is not None:
        canvas = mx.where(pinned, pin_tokens, canvas)
        argmax = mx.where(pinned, pin_tokens, argmax)
    # Rows that stopped earlier keep their canvas, draft and self-conditioning.
    finished = state.finished
    canvas = mx.where(finished[:, None], state.canvas, canvas)
    argmax = mx.where(finished[:, None], state.argmax, argmax)
    conditioning = processed.astype(conditioning_dtype)
    if state.self_conditioning_logits is not None:
        conditioning = mx.where(finished[:, None, None], state.self_conditioning_logits, conditioning)
    finished, history = _stopping(state.history, argmax, entropy, finished, pinned, confidence_threshold)
    return StepState(canvas, argmax, conditioning, finished, history)


def _stopping(
    history: mx.array | None,
    argmax: mx.array,
    entropy: mx.array,
    finished: mx.array,
    pinned: mx.array | None,
    confidence_threshold: float,
) -> tuple[mx.array, mx.array | None]:
    """Stable-and-confident stopping: the argmax canvas unchanged over the history, and a low mean entropy. The rows
    finished now, and the history with this step's argmax canvas."""
    if history is None:
        stable = mx.ones(finished.shape, dtype=mx.bool_)
    else:
        stable = (history == argmax[None]).all(axis=(0, 2))
        history = mx.concatenate([history[1:], argmax[None]], axis=0)
    free = entropy.shape[-1] if pinned is None else mx.maximum((~pinned).sum(axis=-1), 1)
    confident = entropy.sum(axis=-1) / free < confidence_threshold
    return finished | (stable & confident), history


_compiled: dict[mx.Dtype, Callable] = {}


def _compiled_decisions(conditioning_dtype: mx.Dtype) -> Callable:
    """`_step_decisions` compiled: the vocabulary-wide math and the decisions fuse into a few kernels. A dtype
    cannot be an argument of a compiled function, so each gets its own."""
    if conditioning_dtype not in _compiled:

        def decisions(logits, temperature, gumbel, fresh_tokens, state_arrays, pins, settings):
            state = StepState(*state_arrays)
            new = _step_decisions(
                logits, temperature, gumbel, fresh_tokens, state, *pins, *settings, conditioning_dtype
            )
            return new.canvas, new.argmax, new.self_conditioning_logits, new.finished, new.history

        _compiled[conditioning_dtype] = mx.compile(decisions)
    return _compiled[conditioning_dtype]


def denoising_step(
    model: Model,
    cache: EncoderCache,
    state: StepState,
    settings: SamplerSettings,
    noise: Noise,
    canvas_index: int,
    step_index: int,
    pins: Pins | None = None,
) -> StepState:
    """One denoising step (`step_index` from 1): the decoder over the canvas, then the sampler's decisions."""
    logits = model.denoise(state.canvas, cache, state.self_conditioning_logits)
    temperature = linear_temperature(settings.steps + 1 - step_index, settings)
    gumbel = noise.gumbel(canvas_index, step_index, logits.shape)
    fresh_tokens = noise.tokens(canvas_index, step_index, state.canvas.shape, logits.shape[-1])
    pin_arrays = (None, None) if pins is None else (pins.pinned, pins.tokens)
    state_arrays = (state.canvas, state.argmax, state.self_conditioning_logits, state.finished, state.history)
    thresholds = (settings.entropy_bound, settings.confidence_threshold)
    decisions = _compiled_decisions(model.embedding_dtype)
    return StepState(*decisions(logits, temperature, gumbel, fresh_tokens, state_arrays, pin_arrays, thresholds))


@dataclass
class CanvasResult:
    tokens: mx.array  # committed canvas (batch, canvas), pads after EOS applied
    steps: list[int]  # denoising steps each row ran
    finished: list[bool]  # rows finished (EOS or length) after this canvas
    forwarded: int = 0  # canvas positions each row ran through the decoder over the canvas, all passes together


@dataclass
class StepDraft:
    """A denoising step's argmax canvas, handed out as the step finishes."""

    canvas: int
    step: int
    argmax: mx.array


class BlockSampler:
    """Runs the sampler over a cache that already holds the prompt."""

    def __init__(self, model: Model, settings: SamplerSettings, noise: Noise | None = None):
        self.model = model
        self.settings = settings
        self.noise = noise if noise is not None else SeededNoise(settings.seed)
        self.vocab = model.text_config.vocab_size
        self.canvas_length = model.config.canvas_length

    @property
    def max_canvases(self) -> int:
        return math.ceil(self.settings.max_new_tokens / self.canvas_length)

    def canvases(
        self, cache: EncoderCache, batch: int, drafts: bool = False, finished: list[bool] | None = None
    ) -> Iterator[CanvasResult | StepDraft]:
        """Denoise and commit canvases until every row has finished or the token budget is spent.

        With `drafts`, each step's argmax canvas is yielded as it is ready.
        """
        finished = list(finished) if finished is not None else [False] * batch
        previous = None
        for index in range(self.max_canvases):
            if previous is not None:
                # The committed canvas becomes context for the next one.
                self.model.encode(previous, cache)
            argmax, steps, forwarded = yield from self.denoise_canvas(cache, batch, index, finished, drafts)
            previous, finished_now = self._commit(argmax, finished, last=index == self.max_canvases - 1)
            yield CanvasResult(previous, steps, finished_now, forwarded)
            finished = finished_now
            if all(finished):
                return

    def pinned_canvases(
        self, cache: EncoderCache, layouts: list[Pins], drafts: bool = False
    ) -> Iterator[CanvasResult | StepDraft]:
        """Denoise one canvas per layout, each appended to the cache before the next.

        No EOS handling: a constrained canvas is committed whole, and the caller
        decides what an EOS or pad in a free position means.
        """
        previous = None
        for index, pins in enumerate(layouts):
            batch = pins.tokens.shape[0]
            if previous is not None:
                self.model.encode(previous, cache)
            denoised = yield from self.denoise_canvas(cache, batch, index, [False] * batch, drafts, pins)
            previous, steps, forwarded = denoised
            yield CanvasResult(previous, steps, [index == len(layouts) - 1] * batch, forwarded)

    def initial_state(self, batch: int, length: int, canvas_index: int, pins: Pins | None) -> StepState:
        """The entropy-bound sampler's initial canvas: uniform noise (pinned positions hold their tokens)."""
        canvas = self.noise.tokens(canvas_index, 0, (batch, length), self.vocab)
        if pins is not None:
            canvas = pins.initial_canvas(canvas)
        history = None
        if self.settings.stability_threshold > 0:
            history = mx.full((self.settings.stability_threshold, batch, length), -1, dtype=canvas.dtype)
        return StepState(canvas, canvas, None, mx.zeros((batch,), dtype=mx.bool_), history)

    def denoise_canvas(
        self,
        cache: EncoderCache,
        batch: int,
        canvas_index: int,
        finished: list[bool],
        drafts: bool,
        pins: Pins | None = None,
    ) -> Generator[StepDraft, None, tuple[mx.array, list[int], int]]:
        """Denoise one canvas: its argmax canvas, the steps each row ran, and the positions forwarded per row.

        A generator (its value is the return's): with `drafts` it yields each step's StepDraft as it is ready.
        """
        # A constrained layout's last canvas may be shorter than the model's.
        length = self.canvas_length if pins is None else pins.tokens.shape[1]
        settings = self.settings
        fast = None
        if settings.speed == "fast":
            from .fast import FastCanvas  # fast.py builds on this module

            fast = FastCanvas(self.model, cache, settings, self.noise, canvas_index, pins, length)

        def launch(state: StepState, step_index: int) -> StepState:
            if fast is None:
                state = denoising_step(self.model, cache, state, settings, self.noise, canvas_index, step_index, pins)
            else:
                state = fast.step(state, step_index)
            mx.async_eval(*state.arrays)
            return state

        steps = [0] * batch
        stopped = [False] * batch
        # The next step is launched before this one's stop flags are read, so the device never idles on the
        # host's round trip; if every row stops, that step is dropped.
        previous = self.initial_state(batch, length, canvas_index, pins)
        pending = launch(previous, 1)
        for step_index in range(1, settings.steps + 1):
            for row in range(batch):
                steps[row] += not (stopped[row] or finished[row])
            state = pending
            if step_index < settings.steps:
                pending = launch(state, step_index + 1)
            stopped = state.finished.tolist()  # the one host read per step
            if fast is not None:
                fast.observe(step_index, previous, state, stopped)
            if drafts:
                yield StepDraft(canvas_index, step_index, state.argmax)
            if all(stopped):
                break
            previous = state
        if fast is None:
            return state.argmax, steps, length * step_index
        return fast.committed(state.argmax), steps, fast.forwarded(step_index)

    def _commit(self, argmax: mx.array, finished: list[bool], last: bool) -> tuple[mx.array, list[bool]]:
        """Rows done before this canvas become all pad; rows hitting EOS are padded after it."""
        settings = self.settings
        eos = mx.array(settings.eos_token_ids or [-1])
        is_eos = (argmax[..., None] == eos).any(axis=-1)
        hit_eos = is_eos.any(axis=-1).tolist()
        finished_now = [done or eos_here or last for done, eos_here in zip(finished, hit_eos)]
        if settings.pad_token_id is None or not any(finished_now):
            return argmax, finished_now
        seen = mx.cumsum(is_eos.astype(mx.int32), axis=-1)
        after_first_eos = (seen > 0) & ~((seen == 1) & is_eos)
        was_done = mx.array(finished)[:, None]
        pad = was_done | (mx.array(hit_eos)[:, None] & after_first_eos)
        return mx.where(pad, settings.pad_token_id, argmax), finished_now
