"""The block-diffusion sampler: denoise a canvas, commit it, append it, repeat.

Per canvas: start from uniform noise; at each step (N down to 1) scale the
logits by a linear temperature, draw a token per position, accept the
lowest-entropy positions while their summed entropy (less the largest) stays
within the bound, re-noise the rest, and stop early once the argmax canvas is
stable and confident. The committed canvas is the last argmax canvas; after
the first EOS everything becomes pad.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx
import numpy as np

from . import host_vocab
from .cache import EncoderCache
from .cpu import RowBlocks, exp, on_cpu
from .model import Model


@dataclass(frozen=True)
class SamplerSettings:
    """Sampler parameters; defaults are the reference's, a checkpoint's generation_config.json overrides them."""

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
    """Every random number the sampler uses. `canvas` counts from 0 within one call;
    `step` 0 is a canvas's initial noise and s ≥ 1 the s-th denoising step.

    A source may also offer `gumbel_at(canvas, step, shape, positions)`, equal
    to `gumbel(canvas, step, shape)` flattened to (batch · length, vocab) and
    indexed by `positions`: on the CPU the sampler then draws only the
    positions it accepts (see BlockSampler._draw_accepted) instead of asking
    for the whole draw. Better still on the CPU, `gumbel_rows(canvas, step,
    width, positions)`: a function that, given a slice of `positions` (a numpy
    array), returns those rows of the draw as a numpy array, and that any
    thread may call: the sampler then makes and uses the noise a few rows at a
    time. Best, `gumbel_cells(canvas, step, width, positions)`: the same for
    any cells of those rows, so that only the columns that can still win are
    drawn; its noise must not exceed GUMBEL_MAX (SeededNoise offers all three).
    """

    def tokens(self, canvas: int, step: int, shape: tuple[int, ...], vocab: int) -> mx.array: ...

    def gumbel(self, canvas: int, step: int, shape: tuple[int, ...]) -> mx.array: ...


def _mix32(x, word: Callable[[int], Any]):
    """murmur3's 32-bit finaliser: a bijection that scatters every input bit (x: MLX or numpy uint32,
    `word` makes a uint32 scalar of the same library)."""
    x = x ^ (x >> 16)
    x = x * word(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * word(0xC2B2AE35)
    return x ^ (x >> 16)


def _mlx_word(value: int) -> mx.array:
    return mx.array(value, dtype=mx.uint32)


@mx.compile
def _hashed_bits(counter: mx.array, key: mx.array) -> mx.array:
    # Two keyed rounds over the element counter: streams for different keys
    # are unrelated, and the whole draw is one fused elementwise pass.
    return _mix32(_mix32(counter + key[0], _mlx_word) ^ key[1], _mlx_word)


def _host_hashed_bits(counter: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """`_hashed_bits` in numpy: the same integers."""
    return _mix32(_mix32(counter + np.uint32(key[0]), np.uint32) ^ np.uint32(key[1]), np.uint32)


# Uniforms from the top 23 bits, ((bits >> 9) + 0.5) / 2^23: exact in float32 and strictly inside (0, 1), so the
# Gumbel noise is finite. (With 24 bits the largest, 2^24 - 0.5, rounded to 2^24: u = 1 and +inf noise, a token
# forced whatever the logits.)
UNIFORM_SHIFT = 9
UNIFORM_SCALE = 1.0 / (1 << (32 - UNIFORM_SHIFT))


# The largest noise the draw can make: the top uniform's (the largest over the top 4096, in case float32's log
# does not rise strictly up there). The CPU's draw skips the columns this much below a score already reached.
GUMBEL_MAX = float(
    host_vocab.gumbel_from_bits(
        np.arange(2**32 - 4096 * 2**UNIFORM_SHIFT, 2**32, 2**UNIFORM_SHIFT, dtype=np.uint32), UNIFORM_SHIFT
    ).max()
)


@mx.compile
def _gumbel_from_bits(bits: mx.array) -> mx.array:
    uniform = ((bits >> UNIFORM_SHIFT).astype(mx.float32) + 0.5) * UNIFORM_SCALE
    return -mx.log(-mx.log(uniform))


class SeededNoise:
    """Counter-based noise: element i of the draw for (seed, canvas, step, kind) is a
    hash of i under that key. Reproducible on every backend (the same integers;
    the Gumbel values to float32 rounding of `log`, which the CPU takes from
    numpy), and far cheaper on a CPU than MLX's threefry RNG (the Gumbel draw
    covers the whole vocabulary at every position, every step)."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def _keys(self, canvas: int, step: int, kind: int) -> tuple[int, int]:
        words = [self.seed & 0xFFFFFFFF, (self.seed >> 32) & 0xFFFFFFFF, canvas, step, kind]
        key = 0x9E3779B9
        for word in words:  # fold the words into two 32-bit keys (splitmix-style)
            key = (key ^ word) * 0x2545F491 & 0xFFFFFFFF
            key ^= key >> 15
        return key, (key * 0x9E3779B9 + 0x7F4A7C15) & 0xFFFFFFFF

    def _bits(
        self, canvas: int, step: int, kind: int, shape: tuple[int, ...], positions: mx.array | None = None
    ) -> mx.array:
        keys = mx.array(self._keys(canvas, step, kind), dtype=mx.uint32)
        if positions is None:
            counter = mx.arange(math.prod(shape), dtype=mx.uint32).reshape(shape)
        else:  # rows `positions` of the whole draw seen as (batch · length, vocab): the same numbers, those rows only
            width = shape[-1]
            counter = positions.astype(mx.uint32)[:, None] * width + mx.arange(width, dtype=mx.uint32)
        return _hashed_bits(counter, keys)

    def gumbel_rows(self, canvas: int, step: int, width: int, positions: np.ndarray) -> Callable[[slice], np.ndarray]:
        """Rows positions[chunk] of the Gumbel draw seen as (batch · length, width), made by numpy when asked, from
        any thread (the CPU's path: numpy's log is several times MLX's there, see host_vocab)."""
        cells = self.gumbel_cells(canvas, step, width, positions)
        picks = np.arange(len(positions))[:, None]
        columns = np.arange(width, dtype=np.uint32)
        return lambda chunk: cells(picks[chunk], columns)

    def gumbel_cells(
        self, canvas: int, step: int, width: int, positions: np.ndarray
    ) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        """Cells of the same draw: given picks (indices into `positions`) and columns, broadcast together, the
        noise of row positions[pick] at each column, the numbers `gumbel_rows` makes there (any thread)."""
        key = self._keys(canvas, step, 1)
        rows = np.asarray(positions, dtype=np.uint32)

        def cells(picks: np.ndarray, columns: np.ndarray) -> np.ndarray:
            counter = rows[picks] * np.uint32(width) + columns.astype(np.uint32)
            return host_vocab.gumbel_from_bits(_host_hashed_bits(counter, key), UNIFORM_SHIFT)

        return cells

    def _host_gumbel(self, canvas: int, step: int, width: int, positions: np.ndarray) -> np.ndarray:
        """`gumbel_rows` for every row of `positions` at once, spread over the host's cores."""
        chunk_rows = self.gumbel_rows(canvas, step, width, positions)
        gumbel = np.empty((len(positions), width), dtype=np.float32)

        def fill(chunk: slice) -> None:
            gumbel[chunk] = chunk_rows(chunk)

        host_vocab.in_parallel(fill, host_vocab.row_chunks(len(positions)))
        return gumbel

    def tokens(self, canvas: int, step: int, shape: tuple[int, ...], vocab: int) -> mx.array:
        return (self._bits(canvas, step, 0, shape) % vocab).astype(mx.int32)

    def gumbel(self, canvas: int, step: int, shape: tuple[int, ...]) -> mx.array:
        if on_cpu():
            rows = np.arange(math.prod(shape[:-1]))
            return mx.array(self._host_gumbel(canvas, step, shape[-1], rows)).reshape(shape)
        return _gumbel_from_bits(self._bits(canvas, step, 1, shape))

    def gumbel_at(self, canvas: int, step: int, shape: tuple[int, ...], positions: mx.array) -> mx.array:
        """`gumbel(canvas, step, shape).reshape(-1, shape[-1])[positions]`, drawing only those rows."""
        if on_cpu():
            return mx.array(self._host_gumbel(canvas, step, shape[-1], np.array(positions)))
        return _gumbel_from_bits(self._bits(canvas, step, 1, shape, positions))


def temperature(step: int, settings: SamplerSettings) -> mx.array:
    """t_min + (t_max - t_min) * step / N in float32, the division as the reference does it."""
    ratio = mx.array(step, dtype=mx.float32) / mx.array(settings.steps, dtype=mx.float32)
    return mx.array(settings.t_min, dtype=mx.float32) + mx.array(settings.t_max - settings.t_min, mx.float32) * ratio


def softmax_and_entropy(processed: mx.array, argmax: mx.array) -> tuple[mx.array, mx.array]:
    """softmax(processed) and its entropy per position, from one exponential pass.

    H = log Σe − Σ(e·s)/Σe with s = x − max x and e = exp(s): the same value as
    −Σ p log p, without a second pass of exponentials over the vocabulary. The
    maximum is read at `argmax` (the position's argmax, computed anyway) rather
    than found by another pass.
    """
    shifted = processed - mx.take_along_axis(processed, argmax[..., None], axis=-1)
    exps = exp(shifted)
    total = exps.sum(axis=-1)
    entropy = mx.log(total) - (exps * shifted).sum(axis=-1) / total
    return exps / total[..., None], entropy


def accepted_positions(entropy: mx.array, bound: float, pinned: mx.array | None = None) -> mx.array:
    """Lowest-entropy positions whose summed entropy, less the largest of them, stays within `bound`.

    Pinned positions count as certain: they spend none of the budget (and are
    accepted, though what they hold is decided elsewhere).
    """
    if pinned is not None:
        entropy = mx.where(pinned, 0.0, entropy)
    order = mx.argsort(entropy, axis=-1)
    ascending = mx.take_along_axis(entropy, order, axis=-1)
    within = (mx.cumsum(ascending, axis=-1) - ascending) <= bound
    return mx.take_along_axis(within, mx.argsort(order, axis=-1), axis=-1)


@dataclass(frozen=True)
class Pins:
    """Canvas positions held to given tokens at every step, and a starting canvas.

    `pinned` (batch, canvas) bool: these positions always hold `tokens`; they are
    never re-noised or replaced, spend none of the entropy budget and are left
    out of the confidence test. `start` (batch, canvas) bool: free positions that
    begin from `tokens` instead of noise (editing an existing text).
    """

    pinned: mx.array
    tokens: mx.array
    start: mx.array | None = None

    def initial_canvas(self, noise: mx.array) -> mx.array:
        use_tokens = self.pinned if self.start is None else self.pinned | self.start
        return mx.where(use_tokens, self.tokens, noise)


@dataclass
class StepResult:
    canvas: mx.array  # the next step's input: accepted draws, the rest re-noised
    argmax: mx.array  # this step's argmax canvas (the draft)
    conditioning: list[mx.array] | None  # the next step's self-conditioning, per row block (see RowBlocks)
    finished: mx.array  # rows whose denoising has stopped


@dataclass
class VocabPass:
    """What a step needs from a row block's logits; everything but `processed` and `conditioning` is per position."""

    processed: mx.array | np.ndarray  # logits / temperature; on the CPU in numpy, (batch · positions, vocab)
    drawn: mx.array | None  # argmax(processed + gumbel), the sampled token; None until drawn (CPU)
    argmax: mx.array  # argmax(processed): the draft
    entropy: mx.array  # entropy of softmax(processed)
    conditioning: mx.array  # the next step's self-conditioning for these positions


class HostBuffers:
    """The arrays the CPU's vocabulary math writes each step, kept for a canvas (see host_vocab).

    The probabilities go into arrays MLX owns, through numpy views of their
    memory, so the next step's self-conditioning reads them without a copy
    (2 × 16 MB a step at the bench's shape). Two sets serve in turn: rows that
    stopped keep the previous step's probabilities, copied out of the other set
    (evaluated at once) before that set is written again.
    """

    def __init__(self) -> None:
        self._probs: list[list[mx.array]] = []
        self._processed: list[np.ndarray] = []
        self._turn = 0

    def probs(self, shapes: list[tuple[int, ...]]) -> list[mx.array]:
        """This step's probability arrays, one per row block of the given shapes."""
        if len(self._probs) < 2:
            arrays = [mx.zeros(shape, dtype=mx.float32) for shape in shapes]
            mx.eval(arrays)
            self._probs.append(arrays)
        arrays = self._probs[self._turn % 2]
        self._turn += 1
        return arrays

    def processed(self, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
        """The processed logits' arrays, (batch · positions, vocab) per row block; read within the step only."""
        if not self._processed:
            self._processed = [np.empty((math.prod(shape[:-1]), shape[-1]), dtype=np.float32) for shape in shapes]
        return self._processed


def vocab_pass(
    processed: mx.array,
    gumbel: mx.array,
    finished: mx.array,
    previous_conditioning: mx.array | None,
    conditioning_dtype: mx.Dtype | None = None,
) -> VocabPass:
    """All the vocabulary-wide math of one step for a block of positions, from the logits / temperature, fused
    (a GPU's path; the CPU's is `host_vocab`).

    The next step is conditioned on softmax(processed) itself when
    `conditioning_dtype` is None (a float32 model: the same numbers, one
    exponential pass fewer), else on the processed logits cast to that dtype,
    exactly as the reference rounds them for a bf16 model. Rows that stopped
    earlier keep their previous conditioning (None: no row has).
    """
    drawn, *distribution = _vocab_math_for(conditioning_dtype)(processed, gumbel, finished, previous_conditioning)
    return VocabPass(processed, drawn, *distribution)


def _vocab_math(processed, gumbel, finished, previous_conditioning, conditioning_dtype=None):
    drawn = mx.argmax(processed + gumbel, axis=-1)
    return (drawn, *_distribution(processed, finished, previous_conditioning, conditioning_dtype))


def _distribution(processed, finished, previous_conditioning, conditioning_dtype):
    """The draft, the entropy and the next step's conditioning of the processed logits."""
    argmax = mx.argmax(processed, axis=-1)
    probs, entropy = softmax_and_entropy(processed, argmax)
    conditioning = probs if conditioning_dtype is None else processed.astype(conditioning_dtype)
    if previous_conditioning is not None:
        conditioning = mx.where(finished[:, None, None], previous_conditioning, conditioning)
    return argmax, entropy, conditioning


def denoising_step(
    passes: list[VocabPass],
    drawn: mx.array,
    state: StepResult,
    history: mx.array | None,
    settings: SamplerSettings,
    noise_tokens: mx.array,
    pins: Pins | None = None,
) -> tuple[StepResult, mx.array | None]:
    """The per-position decisions of one step, from its row blocks' vocabulary passes and the draws.

    Accept the lowest-entropy draws within the entropy bound, re-noise the rest,
    hold pinned positions, and stop rows whose argmax is stable and confident.
    """
    argmax, entropy = (RowBlocks.join([getattr(block, name) for block in passes]) for name in ("argmax", "entropy"))
    canvas, argmax, finished, history = _decision_math_for()(
        drawn,
        argmax,
        entropy,
        state.canvas,
        state.argmax,
        state.finished,
        history,
        noise_tokens,
        None if pins is None else pins.pinned,
        None if pins is None else pins.tokens,
        settings.entropy_bound,
        settings.stability_threshold,
        settings.confidence_threshold,
    )
    return StepResult(canvas, argmax, [block.conditioning for block in passes], finished), history


def _decision_math(
    drawn,
    argmax,
    entropy,
    previous_canvas,
    previous_argmax,
    finished,
    history,
    noise_tokens,
    pinned,
    pin_tokens,
    entropy_bound,
    stability_threshold,
    confidence_threshold,
):
    if pinned is not None:
        entropy = mx.where(pinned, 0.0, entropy)  # certain: none of the budget, and out of the stop test
    canvas = mx.where(accepted_positions(entropy, entropy_bound), drawn, noise_tokens)
    if pinned is not None:
        canvas = mx.where(pinned, pin_tokens, canvas)
        argmax = mx.where(pinned, pin_tokens, argmax)

    # Rows that stopped earlier keep their canvas and draft.
    canvas = mx.where(finished[:, None], previous_canvas, canvas)
    argmax = mx.where(finished[:, None], previous_argmax, argmax)

    if stability_threshold == 0:
        stable = mx.ones(finished.shape, dtype=mx.bool_)
    else:
        stable = (history == argmax[None]).all(axis=(0, 2))
        history = mx.concatenate([history[1:], argmax[None]], axis=0)
    free = entropy.shape[-1] if pinned is None else mx.maximum((~pinned).sum(axis=-1), 1)
    confident = entropy.sum(axis=-1) / free < confidence_threshold
    return canvas, argmax, finished | (stable & confident), history


_compiled: dict[object, Callable] = {}


def _vocab_math_for(conditioning_dtype: mx.Dtype | None) -> Callable:
    """The vocabulary pass with the draw, fused into one graph (a GPU's path: a dozen kernels become a few).

    The CPU never takes it: it draws only the accepted positions, and runs the
    rest as plain ops in row blocks. A dtype is not a valid argument of a
    compiled function, so each dtype gets its own compiled closure.
    """
    return _compiled_once(("vocab", conditioning_dtype), partial(_vocab_math, conditioning_dtype=conditioning_dtype))


def _decision_math_for() -> Callable:
    """The per-position decisions, fused on GPUs (a few dozen tiny kernels otherwise)."""
    return _decision_math if on_cpu() else _compiled_once("decision", _decision_math)


def _compiled_once(key: object, function: Callable) -> Callable:
    if key not in _compiled:
        _compiled[key] = mx.compile(function)
    return _compiled[key]


@dataclass
class CanvasResult:
    tokens: mx.array  # committed canvas (batch, canvas), pads after EOS applied
    steps: list[int]  # denoising steps each row ran
    finished: list[bool]  # rows finished (EOS or length) after this canvas


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
        self,
        cache: EncoderCache,
        batch: int,
        drafts: bool = False,
        finished: list[bool] | None = None,
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
            argmax, steps = yield from self._denoise(cache, batch, index, finished, drafts)
            previous, finished_now = self._commit(argmax, finished, last=index == self.max_canvases - 1)
            yield CanvasResult(previous, steps, finished_now)
            finished = finished_now
            if all(finished):
                return

    def _denoise(
        self,
        cache: EncoderCache,
        batch: int,
        canvas_index: int,
        finished: list[bool],
        drafts: bool,
        pins: Pins | None = None,
    ) -> Generator[StepDraft, None, tuple[mx.array, list[int]]]:
        # A constrained layout's last canvas may be shorter than the model's.
        length = self.canvas_length if pins is None else pins.tokens.shape[1]
        settings, shape = self.settings, (batch, length)
        canvas = self.noise.tokens(canvas_index, 0, shape, self.vocab)
        if pins is not None:
            canvas = pins.initial_canvas(canvas)
        state = StepResult(canvas, canvas, None, mx.zeros((batch,), dtype=mx.bool_))
        history = None
        if settings.stability_threshold > 0:
            history = mx.full((settings.stability_threshold, *shape), -1, dtype=canvas.dtype)
        embed_dtype = self._embedding_dtype()
        conditioning_dtype = None if embed_dtype == mx.float32 else embed_dtype

        blocks = RowBlocks(length)
        buffers = HostBuffers() if on_cpu() else None

        def launch(state: StepResult, history: mx.array | None, step_index: int):
            """Build step `step_index` on `state` and start computing it."""
            hidden = self._decode(cache, state, conditioning_dtype)
            step = (canvas_index, step_index, shape, blocks, pins, conditioning_dtype, buffers)
            result = self._sample(hidden, state, history, *step)
            mx.async_eval(result[0].canvas, result[0].argmax, result[0].finished, result[0].conditioning)
            return result

        steps = [0] * batch
        stopped = [False] * batch
        # On a GPU the next step is launched before this one's stop flags are
        # read, so the device never idles on the host round-trip (if every row
        # stops, that speculative step is simply dropped). The CPU reads each
        # step's acceptances mid-step (see _draw_accepted), so it has nothing to
        # overlap and launches a step only once the last one is known to go on.
        ahead = not on_cpu()
        pending = launch(state, history, 1)
        for step_index in range(1, settings.steps + 1):
            for row in range(batch):
                steps[row] += not (stopped[row] or finished[row])
            state, history = pending
            more = step_index < settings.steps
            if ahead and more:
                pending = launch(state, history, step_index + 1)
            # The one host read per step: which rows have stopped.
            stopped = state.finished.tolist()
            if drafts:
                yield StepDraft(canvas_index, step_index, state.argmax)
            if all(stopped):
                break
            if not ahead and more:
                pending = launch(state, history, step_index + 1)
        return state.argmax, steps

    def _decode(self, cache: EncoderCache, state: StepResult, conditioning_dtype: mx.Dtype | None) -> list[mx.array]:
        """The decoder over the current canvas, conditioned on the previous step's prediction; in row blocks."""
        if conditioning_dtype is None:
            return self.model.denoise_hidden(state.canvas, cache, self_conditioning_probs=state.conditioning)
        return self.model.denoise_hidden(state.canvas, cache, state.conditioning)

    def _sample(
        self,
        hidden: list[mx.array],
        state: StepResult,
        history: mx.array | None,
        canvas_index: int,
        step_index: int,
        shape: tuple[int, int],
        blocks: RowBlocks,
        pins: Pins | None,
        conditioning_dtype: mx.Dtype | None,
        buffers: HostBuffers | None,
    ) -> tuple[StepResult, mx.array | None]:
        """Per row block: the head, soft-cap and vocabulary math. Then the draws and the decisions."""
        heat = temperature(self.settings.steps + 1 - step_index, self.settings)
        draw_shape = (*shape, self.vocab)
        if on_cpu():
            passes = self._host_vocab_passes(hidden, heat, state, blocks, conditioning_dtype, buffers)
            drawn = self._draw_accepted(passes, blocks, state, pins, canvas_index, step_index, draw_shape)
        else:
            # A GPU draws every position inside one fused vocabulary pass, each block on its stream.
            gumbel = blocks.split(self.noise.gumbel(canvas_index, step_index, draw_shape))

            def block_pass(hidden: mx.array, gumbel: mx.array, previous: mx.array | None) -> VocabPass:
                processed = self.model.logits(hidden, heat)
                return vocab_pass(processed, gumbel, state.finished, previous, conditioning_dtype)

            passes = blocks.map(block_pass, hidden, gumbel, state.conditioning or [None] * len(blocks))
            drawn = RowBlocks.join([block.drawn for block in passes])
        noise_tokens = self.noise.tokens(canvas_index, step_index, shape, self.vocab)
        return denoising_step(passes, drawn, state, history, self.settings, noise_tokens, pins)

    def _host_vocab_passes(
        self,
        hidden: list[mx.array],
        heat: mx.array,
        state: StepResult,
        blocks: RowBlocks,
        conditioning_dtype: mx.Dtype | None,
        buffers: HostBuffers,
    ) -> list[VocabPass]:
        """The CPU's vocabulary math, one thread per row block: the head (in C where the embedding table is
        packed for it, else by MLX on the block's stream), then numpy the rest (host_vocab), writing into
        `buffers`. `processed` stays in numpy for the draw."""
        table = self.model.host_embedding(hidden[0].dtype)
        inputs = hidden if table is not None else blocks.map(self.model.head, hidden)
        mx.eval(inputs)
        cap = self.model.text_config.final_logit_softcapping
        with_probs = conditioning_dtype is None
        heat_value = heat.item()  # MLX is called from this thread only: its streams are per thread
        shapes = [(*block.shape[:-1], self.vocab) for block in inputs]
        probs = buffers.probs(shapes) if with_probs else [None] * len(blocks)
        processed = buffers.processed(shapes)

        def block_math(block: np.ndarray, probs: mx.array | None, processed: np.ndarray):
            rows = processed.shape[0]
            block = block.reshape(rows, -1)
            if table is not None:  # the logits straight into `processed`, which the math then works over in place
                table.head(np.ascontiguousarray(block), processed)
                block = processed
            into = None if probs is None else np.array(probs, copy=False).reshape(rows, self.vocab)
            return host_vocab.vocab_math(block, cap, heat_value, into, processed)

        hold_back = any(state.finished.tolist())  # rows that stopped keep their conditioning
        passes = []
        results = host_vocab.in_parallel(block_math, [np.asarray(block) for block in inputs], probs, processed)
        previous_conditioning = state.conditioning or [None] * len(blocks)
        for rows, block_probs, shape, previous in zip(results, probs, shapes, previous_conditioning):
            batch, size, _ = shape
            if with_probs:
                conditioning = block_probs
            else:  # cast as the reference rounds a bf16 model's processed logits
                conditioning = mx.array(rows.processed).reshape(shape).astype(conditioning_dtype)
            if hold_back and previous is not None:
                # Now, while `previous` still holds the last step's numbers (its buffer is written next step).
                conditioning = mx.where(state.finished[:, None, None], previous, conditioning)
                mx.eval(conditioning)
            argmax, entropy = (mx.array(values).reshape(batch, size) for values in (rows.argmax, rows.entropy))
            passes.append(VocabPass(rows.processed, None, argmax, entropy, conditioning))
        return passes

    def _draw_accepted(
        self,
        passes: list[VocabPass],
        blocks: RowBlocks,
        state: StepResult,
        pins: Pins | None,
        canvas_index: int,
        step_index: int,
        draw_shape: tuple[int, int, int],
    ) -> mx.array:
        """The drawn token of every position this step accepts (0 elsewhere, never read).

        Only accepted positions keep their draw, and which ones are accepted
        depends on the entropies alone. On the CPU the Gumbel draw over the whole
        vocabulary costs more than the rest of the step's vocabulary math, so the
        accepted positions are read back (one host read) and only their rows are
        drawn: argmax(processed + gumbel) there, the same numbers as drawing all.
        """
        batch, length, _ = draw_shape
        pinned = None if pins is None else pins.pinned
        entropy = RowBlocks.join([block.entropy for block in passes])
        accepted = accepted_positions(entropy, self.settings.entropy_bound, pinned) & ~state.finished[:, None]
        if pinned is not None:
            accepted = accepted & ~pinned  # held to their pins whatever is drawn
        flags = accepted.tolist()
        positions, block_rows = [], []
        for rows in blocks.rows:
            chosen = [(row, p) for row in range(batch) for p in range(rows.start, rows.stop) if flags[row][p]]
            positions += [row * length + p for row, p in chosen]
            # A block's processed logits are its (batch, positions) rows flattened.
            size = rows.stop - rows.start
            block_rows.append([row * size + p - rows.start for row, p in chosen])
        drawn = np.zeros(batch * length, dtype=np.uint32)
        if positions:
            processed = [block.processed for block in passes]
            if hasattr(self.noise, "gumbel_cells"):
                cells = self.noise.gumbel_cells(canvas_index, step_index, draw_shape[-1], np.array(positions))
                drawn[positions] = host_vocab.drawn_tokens_where_they_can_win(processed, block_rows, cells, GUMBEL_MAX)
            else:
                gumbel = self._gumbel_rows(canvas_index, step_index, draw_shape, positions)
                drawn[positions] = host_vocab.drawn_tokens(processed, block_rows, gumbel)
        return mx.array(drawn.reshape(batch, length))

    def _gumbel_rows(
        self, canvas_index: int, step_index: int, shape: tuple[int, int, int], positions: list[int]
    ) -> Callable[[slice], np.ndarray]:
        """Gumbel noise for rows positions[chunk] of the (batch · length, vocab) draw, as numpy, from any thread."""
        if hasattr(self.noise, "gumbel_rows"):
            return self.noise.gumbel_rows(canvas_index, step_index, shape[-1], np.array(positions))
        # MLX is called from this thread only: the rows are made here, whole.
        index = mx.array(positions)
        if hasattr(self.noise, "gumbel_at"):
            rows = self.noise.gumbel_at(canvas_index, step_index, shape, index)
        else:
            rows = self.noise.gumbel(canvas_index, step_index, shape).reshape(-1, shape[-1])[index]
        gumbel = np.array(rows)
        return lambda chunk: gumbel[chunk]

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
            previous, steps = yield from self._denoise(cache, batch, index, [False] * batch, drafts, pins)
            yield CanvasResult(previous, steps, [index == len(layouts) - 1] * batch)

    def _embedding_dtype(self) -> mx.Dtype:
        embed = self.model.embed_tokens
        return embed.scales.dtype if hasattr(embed, "scales") else embed.weight.dtype

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
