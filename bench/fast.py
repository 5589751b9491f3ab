"""Fast mode against exact mode in one run: positions forwarded, step time, tokens/s and agreement.

    python -m bench fast                      # bench shape, canvas 256, float32 on the CPU
    python -m bench fast --quick              # a smoke run: the quick shape, the trained checkpoints barely trained
    python -m bench fast --variant settle_entropy=0.01 --variant refresh_every=0   # other FastSettings
    python -m bench fast --help

Checkpoints (`--checkpoints`, each built once and kept under --out):
- *trained* and *trained-ends* (bench/trained.py): a small DiffusionGemma trained here on a Markov-chain language,
  whose canvases turn noise into text and then hold it, as trained weights' do; in *trained* every answer runs to
  the canvas's end, in *trained-ends* answers may end (with chance 1/64 after each token) and end-of-text fills
  the canvas after them, as after a short reply. Their text is checkable: the table's last column is the share of
  adjacent pairs the language allows. Their shape is small (canvas 64), too small to be compute-bound, so their
  tokens/s are also given as projected at the run's shape: each step costing what a fast step of as many positions
  (scaled) costs there, by the bucket table (measured on the confident checkpoint of the run's shape, unless
  --no-buckets).
- random-weight checkpoints of the run's shape, written by the reference (tests/checkpoints.py): *confident*, its
  final norm scaled up and its routers and attention well conditioned; *flat* (the tests' scale), whose positions
  hardly settle; *ordered*, the confident one with its feed-forward outputs scaled down. Random weights copy their
  input and then wander or keep it; they show fast mode's mechanics and step costs, not what it costs in text.

For each checkpoint and prompt (seeded: random tokens, or the language's), one canvas in exact mode, then one in
fast mode per `--variant` (default: FastSettings' defaults, the bucket scaled to a shorter canvas), from copies of
one encoded prompt, the sampler's defaults otherwise (48 steps at most, adaptive stopping). Reported per mode:
denoising steps per canvas, canvas positions run through the decoder per step and over the canvas (against exact
mode's), step time and tokens/s (a canvas's tokens over its denoising time, the prompt encoded before), the
committed tokens fast mode shares with exact mode and the mean KL(exact || fast) between the logits each committed
from (exact: its last step's; fast: its final pass's, or its last step's merged logits), and fast mode's own
per-step error: the KL and the argmaxes differing between the logits it decides from and those the exact model
computes from the same inputs. A row of exact mode with its logits perturbed by `--noise-floor` shows how far
exact mode itself drifts under so small a change, and one with another seed how much two of its samples share.
With `--reveal P`, a row per threshold for another sampler (bench/reveal.py: positions revealed for good once
their draw is that likely, only the others forwarded): what leaving DiffusionGemma's sampler buys in positions
and costs in text. For exact mode: how many positions read another token than at the step before (what
forwarding only those would forward), change their argmax per step, after what share of the steps a position's
argmax takes its final value (what forwarding each position only until then would forward), and how many
positions predict, then commit, the random token they started with. Then what a new live-count shape costs: per
bucket size, the first fast step of that size against warm ones.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from . import trained
from .build import REPO
from .reveal import reveal_canvas
from .shapes import PRESETS, Shape

OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0")
DEFAULT_OUT = REPO / "bench" / "out" / "fast"
# The final norm's scale: 11 gives the bench shape's sharpest logits (from 16 up the soft-cap flattens them
# again: at 28 the median entropy is 3 nats); 4 is the tests' checkpoints'.
CONFIDENT_GAIN = 11.0
FLAT_GAIN = 4.0
# Enough for a smoke run to take every path (seconds), not to learn the language.
QUICK_TRAINING_STEPS = 20
# The ordered checkpoint's feed-forward output scale: low enough that exact mode is no longer chaotic.
ORDERED_FEED_FORWARD = 0.3
# Added to a prompt's seed for exact mode's run with other noise: how much two samples of the model share.
OTHER_SEED = 1000


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench fast", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default=None, choices=sorted(PRESETS), help="a preset shape (default bench)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"the quick shape (canvas 32), 2 prompts, {QUICK_TRAINING_STEPS} training steps: a smoke run",
    )
    parser.add_argument("--prompts", type=int, default=None, help="prompts per checkpoint (default 3)")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="prompt length (default 512; quick 64)")
    parser.add_argument("--confident-gain", type=float, default=CONFIDENT_GAIN, help="final norm scale, confident")
    parser.add_argument("--flat-gain", type=float, default=FLAT_GAIN, help="final norm scale, flat")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps at most (default: 48)")
    parser.add_argument(
        "--variant",
        action="append",
        default=None,
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="fast mode with these FastSettings changed (repeatable; default: the defaults)",
    )
    parser.add_argument(
        "--reveal",
        action="append",
        type=float,
        default=[],
        metavar="THRESHOLD",
        help="also run another sampler, which reveals positions whose draw has at least this probability and never "
        "revisits them, forwarding only the rest (bench/reveal.py; repeatable)",
    )
    parser.add_argument(
        "--checkpoints",
        default="trained,trained-ends,confident,flat",
        help="which of trained, trained-ends, confident, flat and ordered, comma-separated (default: all but ordered)",
    )
    parser.add_argument(
        "--training-steps",
        type=int,
        default=None,
        help="the trained checkpoints' training steps (default 1000: about 11 minutes each on two cores, once; "
        f"--quick: {QUICK_TRAINING_STEPS})",
    )
    parser.add_argument(
        "--noise-floor",
        type=float,
        default=1e-3,
        help="also run exact mode with every logit times 1 + this × N(0, 1): how far exact mode itself drifts "
        "under so small a change (default 1e-3; 0 skips it)",
    )
    parser.add_argument("--no-buckets", action="store_true", help="skip timing each bucket size's first pass")
    parser.add_argument("--no-openblas", action="store_true", help="do not preload OpenBLAS (MLX's CPU fp32 BLAS)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"checkpoints and JSON (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if args.training_steps is not None and args.training_steps < 1:
        parser.error("--training-steps must be at least 1")
    if any(not 0 < threshold <= 1 for threshold in args.reveal):
        parser.error("--reveal takes a probability in (0, 1]")
    return args


def _with_openblas(argv: list[str], args: argparse.Namespace) -> None:
    """Run again with OpenBLAS preloaded: MLX's bundled CPU BLAS is some 30x slower in float32 (REFERENCE.md)."""
    if args.no_openblas or not OPENBLAS.is_file() or str(OPENBLAS) in os.environ.get("LD_PRELOAD", ""):
        return
    env = dict(os.environ, LD_PRELOAD=os.pathsep.join(filter(None, [str(OPENBLAS), os.environ.get("LD_PRELOAD")])))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    os.execve(sys.executable, [sys.executable, "-m", "bench", "fast", *argv], env)


def _openblas_loaded() -> bool:
    try:
        return "libopenblas" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def parse_variant(text: str) -> dict[str, Any]:
    """`settle_entropy=0.01,final_pass=false` -> FastSettings changes, typed as its fields are."""
    from mlx_dgemma.sampler import FastSettings

    defaults = FastSettings()
    kinds = {f.name: type(getattr(defaults, f.name)) for f in fields(FastSettings)}
    kinds["settle_entropy"] = float  # None by default: derived from the sampler's bound
    changes: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, raw = item.partition("=")
        if key not in kinds:
            raise SystemExit(f"--variant: unknown FastSettings field {key!r}; choose from {', '.join(kinds)}")
        kind = kinds[key]
        if raw.lower() == "none":
            changes[key] = None
        else:
            changes[key] = raw.lower() in ("1", "true", "on", "yes") if kind is bool else kind(raw)
    return changes


# -- checkpoints ---------------------------------------------------------------------------------------------------


def checkpoint(
    shape: Shape, gain: float, out: Path, well_conditioned: bool = False, feed_forward_gain: float = 1.0
) -> Path:
    """A random-weight checkpoint of `shape` with the final norm scaled by `gain`, built once and kept;
    `well_conditioned`: routers with clear margins and softer attention; `feed_forward_gain` scales the layers'
    feed-forward outputs (tests/checkpoints.py)."""
    from .build import helper_from_tests

    suffix = ("-conditioned" if well_conditioned else "") + (
        f"-ff{feed_forward_gain:g}" if feed_forward_gain != 1 else ""
    )
    path = out / "checkpoints" / f"{shape.checkpoint_name()}-gain{gain:g}{suffix}"
    if (path / "config.json").is_file():
        return path
    checkpoints = helper_from_tests("checkpoints")
    model = checkpoints.build_reference_model(
        seed=0,
        canvas_length=shape.canvas_length,
        final_norm_gain=gain,
        well_conditioned=well_conditioned,
        feed_forward_gain=feed_forward_gain,
        **shape.text,
    )
    staging = path.with_name(path.name + ".partial")
    checkpoints.save_reference_checkpoint(model, staging)
    staging.rename(path)
    return path


# -- runs ----------------------------------------------------------------------------------------------------------


class Recorder:
    """Keeps a canvas's last decoder passes (model.denoise wrapped), to rebuild the logits it committed from: the
    passes from the third-last pass over the whole canvas on (a step's pass, the one dropped after the stop, and a
    final pass may each be whole)."""

    def __init__(self, model: Any):
        self.model = model
        self.segments: list[list[tuple[int, Any, Any]]] = []  # runs of (pass number, positions, logits)
        self.whole_argmax: list[Any] = []  # each pass over the whole canvas's argmax, left lazy until read
        self.whole_inputs: list[Any] = []  # the canvas each pass over the whole canvas read; the first: its noise
        self.count = 0
        self._denoise = model.denoise

    def __enter__(self) -> Recorder:
        def recording(canvas: Any, cache: Any, conditioning: Any = None, positions: Any = None) -> Any:
            logits = self._denoise(canvas, cache, conditioning, positions=positions)
            self.count += 1
            if positions is None:
                self.whole_inputs.append(canvas)
                self.segments = [*self.segments[-2:], []]
                self.whole_argmax.append(logits.argmax(axis=-1))
            self.segments[-1].append((self.count, positions, logits))
            return logits

        self.model.denoise = recording
        return self

    def __exit__(self, *exc: object) -> None:
        del self.model.denoise

    def changing(self, passes: int) -> float:
        """The share of positions whose argmax differs from the previous whole pass's, averaged over the first
        `passes` whole passes (exact mode: its steps): what a mode forwarding only changing positions forwards."""
        argmaxes = [np.array(argmax) for argmax in self.whole_argmax[:passes]]
        return statistics.fmean(float((a != b).mean()) for a, b in zip(argmaxes, argmaxes[1:]))

    def inputs_changing(self, passes: int) -> float:
        """The share of positions whose input token differs from the previous whole pass's, the first pass counting
        them all, over the first `passes` whole passes (exact mode: its steps): what a mode forwarding the positions
        whose own token changed, and only those, would forward."""
        inputs = np.stack([np.array(canvas[0]) for canvas in self.whole_inputs[:passes]])
        return float(((inputs[1:] != inputs[:-1]).sum() + inputs.shape[1]) / inputs.size)

    def until_final(self, passes: int) -> float:
        """The share of the first `passes` whole passes (exact mode: its steps) that come before each position's
        argmax takes its final value, averaged over positions: what a mode forwarding each position until then, and
        not after, would forward."""
        argmaxes = np.stack([np.array(argmax[0]) for argmax in self.whole_argmax[:passes]])
        differs = argmaxes != argmaxes[-1]
        last = np.where(differs.any(axis=0), passes - 1 - np.argmax(differs[::-1], axis=0), -1)
        return float((last + 2).mean() / passes)  # the pass that first shows the final value is forwarded too

    def own_noise(self, tokens: np.ndarray) -> tuple[float, float]:
        """The shares of positions whose first argmax, and whose committed token, is the random token the canvas
        started with there."""
        start = np.array(self.whole_inputs[0][0])
        return float((np.array(self.whole_argmax[0][0]) == start).mean()), float((tokens == start).mean())

    def merged(self, upto: int) -> np.ndarray:
        """The logits as of pass number `upto` (1-based): the last whole pass before it, the later ones merged in."""
        segment = next(segment for segment in reversed(self.segments) if segment[0][0] <= upto)
        merged = np.array(segment[0][2], dtype=np.float32)
        for number, positions, fresh in segment[1:]:
            if number <= upto:
                np.put_along_axis(merged, np.array(positions)[..., None], np.array(fresh), axis=1)
        return merged


class NoisyLogits:
    """The model with every pass's logits times 1 + `scale`·N(0, 1): exact mode's own sensitivity, the floor under
    what agreement between two modes can show on these weights."""

    def __init__(self, model: Any, scale: float, seed: int):
        self._model, self.scale = model, scale
        self._rng = np.random.default_rng(seed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def denoise(self, canvas: Any, cache: Any, conditioning: Any = None, positions: Any = None) -> Any:
        import mlx.core as mx

        logits = self._model.denoise(canvas, cache, conditioning, positions=positions)
        return logits * (1 + self.scale * mx.array(self._rng.normal(size=logits.shape).astype(np.float32)))


@dataclass
class Run:
    mode: str
    steps: int
    forwarded: int
    seconds: float
    tokens: np.ndarray
    logits: np.ndarray
    sizes: list[int] = field(default_factory=list)
    changing: float | None = None  # exact mode: positions whose argmax changes from one step to the next
    until_final: float | None = None  # exact mode: Recorder.until_final
    inputs_changing: float | None = None  # exact mode: Recorder.inputs_changing
    own_noise: tuple[float, float] | None = None  # exact mode: Recorder.own_noise


def one_canvas(model: Any, cache: Any, settings: Any, seed: int) -> Run:
    """Denoise one canvas into a copy of `cache`; the timing covers the denoising, not the prompt."""
    import mlx.core as mx

    from mlx_dgemma.sampler import BlockSampler, CanvasResult, SeededNoise

    cache = cache.copy()
    mx.eval(cache.state)
    with Recorder(model) as recorder:
        start = time.perf_counter()
        results = [r for r in BlockSampler(model, settings, SeededNoise(seed)).canvases(cache, 1)]
        result = next(r for r in results if isinstance(r, CanvasResult))
        tokens = np.array(result.tokens[0])
        seconds = time.perf_counter() - start
        steps = result.steps[0]
        step_passes = steps + (steps < settings.steps)  # the step launched before the stop was seen is dropped
        upto = recorder.count if recorder.count > step_passes else steps
        logits = recorder.merged(upto)[0]
        exact = settings.speed == "exact"
        changing = recorder.changing(steps) if exact and steps > 1 else None
        until_final = recorder.until_final(steps) if exact else None
        inputs_changing = recorder.inputs_changing(steps) if exact else None
        own_noise = recorder.own_noise(tokens) if exact else None
    figures = dict(changing=changing, until_final=until_final, inputs_changing=inputs_changing, own_noise=own_noise)
    return Run(settings.speed, steps, result.forwarded, seconds, tokens, logits, **figures)


def step_errors(model: Any, cache: Any, settings: Any, seed: int) -> tuple[float, float]:
    """Fast mode's own error, free of where its canvas drifted from exact mode's: at each step, the mean over the
    canvas of KL(exact || fast) between the logits the exact model computes from that step's inputs and those fast
    mode decides from, and the share of positions whose argmax differ; means over the canvas's steps (a step over
    the whole canvas adds zeros). Untimed: the exact passes run on a copy of the cache."""
    import mlx.core as mx

    from mlx_dgemma import fast
    from mlx_dgemma.sampler import BlockSampler, SeededNoise

    reference, cache = cache.copy(), cache.copy()
    errors: list[tuple[float, float]] = []
    original = fast.FastCanvas.step

    def step(self: Any, state: Any, step_index: int) -> Any:
        new = original(self, state, step_index)
        if self.sizes[step_index] == self.length:
            errors.append((0.0, 0.0))
        else:
            exact = np.array(model.denoise(state.canvas, reference, self.conditioning(state))[0])
            ours = np.array(new.logits[0])
            errors.append((kl(exact, ours), float((exact.argmax(-1) != ours.argmax(-1)).mean())))
        return new

    fast.FastCanvas.step = step
    try:
        for _ in BlockSampler(model, settings, SeededNoise(seed)).canvases(cache, 1):
            pass
    finally:
        fast.FastCanvas.step = original
    mx.eval(cache.state)
    return statistics.fmean(e for e, _ in errors), statistics.fmean(d for _, d in errors)


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean over positions of KL(softmax p || softmax q), in nats."""
    p_log = _log_softmax(p_logits.astype(np.float64))
    q_log = _log_softmax(q_logits.astype(np.float64))
    return float((np.exp(p_log) * (p_log - q_log)).sum(axis=-1).mean())


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclass
class Subject:
    """A checkpoint to compare the modes on: its shape, how its prompts are made and, for the trained one, the
    language its text is checked against."""

    label: str
    path: Path
    shape: Shape
    prompt_tokens: int
    language: Any = None  # trained.MarkovLanguage

    def prompt(self, index: int) -> np.ndarray:
        """(1, prompt_tokens) token ids, seeded by `index`: random tokens, or a stretch of the language."""
        if self.language is not None:
            return trained.prompt(self.language, index)
        vocab = self.shape.text["vocab_size"]
        return np.random.default_rng(index).integers(3, vocab, (1, self.prompt_tokens))

    def scaled(self, changes: dict[str, Any]) -> dict[str, Any]:
        """FastSettings changes for this canvas: unless given, the bucket for its length (`scaled_bucket`)."""
        return {"bucket": scaled_bucket(self.shape.canvas_length), **changes}


def scaled_bucket(length: int) -> int:
    """The default bucket in proportion to a canvas of `length`: the released canvas's share, so that a short
    canvas's live counts come in as many sizes."""
    from mlx_dgemma.sampler import FastSettings

    return max(1, FastSettings().bucket * length // 256)


def compare(model: Any, subject: Subject, args: argparse.Namespace, variants: list[dict[str, Any]]) -> Iterator[dict]:
    """Per prompt: exact mode, then each fast variant, from copies of one encoded prompt."""
    import mlx.core as mx

    from mlx_dgemma.generate import default_settings, prefill

    shape = subject.shape
    base = default_settings(model).updated(max_new_tokens=shape.canvas_length, steps=args.steps)
    fast_settings = [
        base.updated(speed="fast", fast=replace(base.fast, **subject.scaled(changes))) for changes in variants
    ]
    # Compile every graph once (decisions of each mode, the buckets' first shapes) before timing anything.
    warm_cache = model.make_cache()
    prefill(model, warm_cache, mx.array(np.random.default_rng(99).integers(3, shape.text["vocab_size"], (1, 32))))
    for settings in [base, *fast_settings]:
        one_canvas(model, warm_cache, settings.updated(steps=min(base.steps, 6)), 99)
    bucket = scaled_bucket(shape.canvas_length)
    for threshold in args.reveal:
        reveal_canvas(model, warm_cache, base.updated(steps=min(base.steps, 6)), 99, threshold, bucket)
    for prompt in range(args.prompts):
        cache = model.make_cache()
        ids = subject.prompt(prompt)
        prefill(model, cache, mx.array(ids))
        figures = partial(_figures, shape=shape, subject=subject, context=ids[0, -1:])
        exact = one_canvas(model, cache, base, prompt)
        yield {
            "prompt": prompt,
            "variant": "exact",
            **figures(exact, exact),
            "step_kl": 0.0,
            "step_argmax": 0.0,
            "changing": exact.changing,
            "until_final": exact.until_final,
            "inputs_changing": exact.inputs_changing,
            "own_noise": exact.own_noise,
        }
        if args.noise_floor:
            noisy = one_canvas(NoisyLogits(model, args.noise_floor, prompt), cache, base, prompt)
            yield {"prompt": prompt, "variant": "noise", **figures(noisy, exact), "step_kl": None, "step_argmax": None}
        other = one_canvas(model, cache, base, prompt + OTHER_SEED)
        yield {"prompt": prompt, "variant": "other seed", **figures(other, exact), "step_kl": None, "step_argmax": None}
        for index, settings in enumerate(fast_settings):
            fast = one_canvas(model, cache, settings, prompt)
            step_kl, step_argmax = step_errors(model, cache, settings, prompt)
            yield {
                "prompt": prompt,
                "variant": index,
                **figures(fast, exact),
                "step_kl": step_kl,
                "step_argmax": step_argmax,
            }
        for threshold in args.reveal:
            revealed = Run("reveal", **reveal_canvas(model, cache, base, prompt, threshold, bucket))
            name = reveal_name(threshold)
            yield {"prompt": prompt, "variant": name, **figures(revealed, exact), "step_kl": None, "step_argmax": None}


def reveal_name(threshold: float) -> str:
    return f"reveal {threshold:g}"


def _figures(run: Run, exact: Run, shape: Shape, subject: Subject, context: np.ndarray) -> dict[str, Any]:
    """A run's figures against exact mode's; for a trained checkpoint, how much of its text (after the prompt's
    last token, `context`) the language allows, and how many of its tokens come before an end."""
    valid = answer = None
    if subject.language is not None:
        valid = subject.language.valid(np.append(context, run.tokens))
        answer = trained.answer_length(run.tokens)
    return {
        "valid": valid,
        "answer": answer,
        "steps": run.steps,
        "forwarded": run.forwarded,
        "forwarded_vs_exact": run.forwarded / exact.forwarded,
        "step_s": run.seconds / run.steps,
        "seconds": run.seconds,
        "tokens_per_s": shape.canvas_length / run.seconds,
        "speedup": exact.seconds / run.seconds,
        "shared": float((run.tokens == exact.tokens).mean()),
        "kl": kl(exact.logits, run.logits),
    }


def bucket_costs(model: Any, shape: Shape, prompt_tokens: int) -> list[dict[str, float]]:
    """Per live-count bucket, a whole fast step of that size (decoder, draws, decisions): its first run, with any
    tracing and compiling a new shape triggers, against warm ones; the last row forwards the whole canvas."""
    import mlx.core as mx

    from mlx_dgemma.fast import FastCanvas
    from mlx_dgemma.generate import default_settings, prefill
    from mlx_dgemma.sampler import BlockSampler, SeededNoise

    length, vocab = shape.canvas_length, shape.text["vocab_size"]
    cache = model.make_cache()
    prefill(model, cache, mx.array(np.random.default_rng(7).integers(3, vocab, (1, prompt_tokens))))
    settings = default_settings(model).updated(speed="fast")
    settings = settings.updated(fast=replace(settings.fast, bucket=scaled_bucket(length)))
    noise = SeededNoise(7)
    canvas = FastCanvas(model, cache, settings, noise, 0, None, length)
    first_step = canvas.step(BlockSampler(model, settings, noise).initial_state(1, length, 0, None), 1)
    mx.eval(*first_step.arrays)  # the whole canvas's states in the cache, as a first step leaves them

    def timed(size: int) -> float:
        canvas.known_live = size
        start = time.perf_counter()
        mx.eval(*canvas.step(first_step, 2).arrays)
        return time.perf_counter() - start

    rows = []
    for size in [*range(settings.fast.bucket, length, settings.fast.bucket), length]:
        first = timed(size)
        warm = statistics.median(timed(size) for _ in range(3))
        rows.append({"size": size, "first_s": first, "warm_s": warm})
    return rows


# -- report --------------------------------------------------------------------------------------------------------


def summary(rows: list[dict[str, Any]], variant: int | str, length: int) -> dict[str, float]:
    """One variant's figures over the prompts: means, and totals over totals for rates."""
    mine = [row for row in rows if row["variant"] == variant]
    keys = ("steps", "forwarded", "shared", "kl", "step_kl", "step_argmax", "valid")
    mean = {key: _mean(row[key] for row in mine) for key in keys}
    seconds = sum(row["seconds"] for row in mine)
    exact_seconds = sum(row["seconds"] for row in rows if row["variant"] == "exact")
    exact_forwarded = sum(row["forwarded"] for row in rows if row["variant"] == "exact")
    steps = sum(row["steps"] for row in mine)
    return {
        **mean,
        "per_step": sum(row["forwarded"] for row in mine) / steps,
        "forwarded_vs_exact": sum(row["forwarded"] for row in mine) / exact_forwarded,
        "step_ms": 1000 * seconds / steps,
        "tokens_per_s": len(mine) * length / seconds,
        "speedup": exact_seconds / seconds,
    }


def _mean(values: Iterator[float | None]) -> float | None:
    values = list(values)
    return None if None in values else statistics.fmean(values)


def table(
    results: dict[str, list[dict[str, Any]]],
    lengths: dict[str, int],
    variants: list[dict[str, Any]],
    noise_floor: float,
    reveals: list[float],
) -> str:
    names = [
        "exact",
        *(["noise"] if noise_floor else []),
        "other seed",
        *range(len(variants)),
        *map(reveal_name, reveals),
    ]
    lines = [
        "| checkpoint | mode | steps/canvas | positions forwarded/step | forwarded vs exact | step, ms | tokens/s "
        "| vs exact | tokens shared with exact | KL(exact ‖ fast), committed logits | per-step KL, same inputs "
        "| per-step argmax differing | text valid |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for checkpoint_name, rows in results.items():
        length = lengths[checkpoint_name]
        for name in names:
            s = summary(rows, name, length)
            if name in ("exact", "noise", "other seed"):
                mode = {
                    "exact": "exact",
                    "noise": f"exact, logits × (1 + {noise_floor:g}·N(0, 1))",
                    "other seed": "exact, another seed",
                }[name]
            elif isinstance(name, str):
                mode = f"another sampler: revealed for good at p ≥ {name.split()[1]}"
            else:
                mode = "fast " + (_describe(variants[name]) or "(defaults)")
            step_kl = "–" if s["step_kl"] is None else f"{s['step_kl']:.2g}"
            step_argmax = "–" if s["step_argmax"] is None else f"{s['step_argmax']:.2%}"
            valid = "–" if s["valid"] is None else f"{s['valid']:.1%}"
            lines.append(
                f"| {checkpoint_name} | {mode} | {s['steps']:.1f} | {s['per_step']:.1f} of {length} "
                f"| {s['forwarded_vs_exact']:.0%} | {s['step_ms']:.0f} | {s['tokens_per_s']:.1f} "
                f"| {s['speedup']:.2f}× | {s['shared']:.1%} | {s['kl']:.2g} | {step_kl} | {step_argmax} | {valid} |"
            )
    return "\n".join(lines)


def projected_speedup(
    rows: list[dict[str, Any]], variant: int | str, length: int, buckets: list[dict[str, float]]
) -> float:
    """Exact mode's time over `variant`'s had each step cost what a fast step of as many positions, scaled to the
    bucket table's canvas, costs there (a line fitted to its warm steps): a small model's own steps are too short
    to be compute-bound."""
    sizes = np.array([row["size"] for row in buckets], dtype=np.float64)
    per_position, per_step = np.polyfit(sizes, [row["warm_s"] for row in buckets], 1)
    scale = sizes.max() / length

    def seconds(name: int | str) -> float:
        mine = [row for row in rows if row["variant"] == name]
        return sum(per_step * row["steps"] + per_position * scale * row["forwarded"] for row in mine)

    return seconds("exact") / seconds(variant)


def _describe(changes: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in changes.items())


def bucket_table(rows: list[dict[str, float]]) -> str:
    lines = ["| positions forwarded | first step, ms | warm step, ms | first − warm, ms |", "|---|---|---|---|"]
    for row in rows:
        first, warm = 1000 * row["first_s"], 1000 * row["warm_s"]
        lines.append(f"| {row['size']} | {first:.0f} | {warm:.0f} | {first - warm:+.0f} |")
    return "\n".join(lines)


ENDINGS = {"trained": 0.0, "trained-ends": trained.ENDING}
RANDOM_WEIGHTS = ("confident", "flat", "ordered")


def checkpoint_names(text: str) -> list[str]:
    """`--checkpoints`, checked before anything is built."""
    chosen = [name.strip() for name in text.split(",")]
    if unknown := sorted(set(chosen) - set(ENDINGS) - set(RANDOM_WEIGHTS)):
        names = ", ".join([*ENDINGS, *RANDOM_WEIGHTS])
        raise SystemExit(f"--checkpoints: unknown {', '.join(unknown)}; choose from {names}")
    return chosen


def subjects(args: argparse.Namespace, shape: Shape, names: list[str]) -> Iterator[Subject]:
    """The checkpoints `names` (from `checkpoint_names`), in that order, each built the first time."""
    random_weights = {
        "confident": (args.confident_gain, True, 1.0),
        "flat": (args.flat_gain, False, 1.0),
        "ordered": (args.confident_gain, True, ORDERED_FEED_FORWARD),
    }
    for name in names:
        if name in ENDINGS:
            language = trained.MarkovLanguage.seeded(ending=ENDINGS[name])
            path = trained.checkpoint(args.out, language, args.training_steps)
            answers = f"answers ending with chance 1/{1 / language.ending:.0f} a token" if language.ending else "text"
            canvas = trained.TRAINED_SHAPE.canvas_length
            notes = f"Markov language, {answers}, {args.training_steps} steps, canvas {canvas}"
            yield Subject(f"{name} ({notes})", path, trained.TRAINED_SHAPE, trained.PROMPT_TOKENS, language)
            continue
        gain, conditioned, feed_forward = random_weights[name]
        notes = [f"final norm ×{gain:g}", *(["well conditioned"] if conditioned else [])]
        notes += [f"feed-forward ×{feed_forward:g}"] if feed_forward != 1 else []
        path = checkpoint(shape, gain, args.out, conditioned, feed_forward)
        yield Subject(f"{name} ({', '.join(notes)})", path, shape, args.prompt_tokens)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    _with_openblas(argv, args)
    shape = PRESETS[args.shape or ("quick" if args.quick else "bench")]
    args.prompts = args.prompts or (2 if args.quick else 3)
    args.prompt_tokens = args.prompt_tokens or (64 if shape.name == "quick" else 512)
    variants = [parse_variant(text) for text in (args.variant or [""])]
    names = checkpoint_names(args.checkpoints)
    args.training_steps = args.training_steps or (QUICK_TRAINING_STEPS if args.quick else trained.TRAINING_STEPS)

    import mlx.core as mx

    from mlx_dgemma.loader import load_model
    from mlx_dgemma.sampler import FastSettings

    results: dict[str, list[dict[str, Any]]] = {}
    chosen: dict[str, Subject] = {}
    buckets: list[dict[str, float]] = []
    started = time.perf_counter()
    if not args.no_buckets:
        model = load_model(checkpoint(shape, args.confident_gain, args.out, well_conditioned=True))
        buckets = bucket_costs(model, shape, args.prompt_tokens)
        del model
    for subject in subjects(args, shape, names):
        model = load_model(subject.path)
        label = subject.label
        results[label], chosen[label] = [], subject
        for row in compare(model, subject, args, variants):
            results[label].append(row)
            print(f"[bench fast] {label} prompt {row['prompt']} {row['variant']}: {_line(row)}", file=sys.stderr)
        del model
        mx.clear_cache()
    command = "python -m bench fast " + " ".join(argv)
    title = (
        f"## Fast mode against exact: '{shape.name}' shape, float32, CPU, prompt {args.prompt_tokens}, "
        f"canvas {shape.canvas_length}, {args.prompts} prompts per checkpoint"
    )
    blas = "OpenBLAS preloaded" if _openblas_loaded() else "MLX's bundled BLAS"
    print(f"{title}\n\n`{command.strip()}` ({blas}, wall {time.perf_counter() - started:.0f} s)\n")
    print(f"FastSettings defaults: {FastSettings()}; the bucket scales with a shorter canvas (Subject.scaled)\n")
    lengths = {label: subject.shape.canvas_length for label, subject in chosen.items()}
    print(table(results, lengths, variants, args.noise_floor, args.reveal))
    compared = [*range(len(variants)), *map(reveal_name, args.reveal)]
    for label, rows in results.items():
        print(f"\nExact mode, {label}: " + "; ".join(_exact_clauses(rows)) + ".")
        if chosen[label].language is not None and chosen[label].language.ending:
            print(_by_answer(rows, lengths[label], compared))
        if chosen[label].shape is not shape and buckets:
            speedups = [projected_speedup(rows, name, lengths[label], buckets) for name in compared]
            print(
                f"Tokens/s against exact mode had each step cost what the '{shape.name}' shape's does for as many "
                f"positions (its bucket table): " + ", ".join(f"{speedup:.2f}×" for speedup in speedups) + "."
            )
    if buckets:
        print(f"\nA fast step per live-count bucket, '{shape.name}' shape (confident), prompt {args.prompt_tokens}:\n")
        print(bucket_table(buckets))
    args.out.mkdir(parents=True, exist_ok=True)
    document = {"command": command, "variants": variants, "results": results, "buckets": buckets}
    (args.out / f"{shape.name}.json").write_text(json.dumps(document, indent=2))
    return 0


def _by_answer(rows: list[dict[str, Any]], length: int, variants: list[int | str]) -> str:
    """Fast mode's positions forwarded against exact mode's, apart for the prompts whose exact answer ends within
    the canvas and for those whose answer runs to its end."""
    parts = []
    for name, ends in (("ending within the canvas", True), ("running to its end", False)):
        prompts = {row["prompt"] for row in rows if row["variant"] == "exact" and (row["answer"] < length) == ends}
        if not prompts:
            continue
        mine = [row for row in rows if row["prompt"] in prompts]
        answer = statistics.fmean(row["answer"] for row in mine if row["variant"] == "exact")
        shares = [summary(mine, name, length)["forwarded_vs_exact"] for name in variants]
        figures = ", ".join(f"{share:.0%}" for share in shares)
        parts.append(f"answers {name} ({len(prompts)} prompts, {answer:.0f} tokens on average): {figures}")
    return "Positions forwarded against exact mode's, per variant, by answer: " + "; ".join(parts) + "."


def _exact_clauses(rows: list[dict[str, Any]]) -> list[str]:
    """What exact mode's canvases did: how many positions read another token or change their argmax a step, when
    argmaxes take their final values, how many positions copy their noise."""
    exact_rows = [row for row in rows if row["variant"] == "exact"]
    first, committed = (statistics.fmean(row["own_noise"][i] for row in exact_rows) for i in (0, 1))
    clauses = [
        f"the first step predicts the random token a position started with at {first:.0%} of them, "
        f"and {committed:.0%} of the committed tokens are that token"
    ]
    changing = [row["changing"] for row in exact_rows if row["changing"] is not None]
    if changing:
        until_final = statistics.fmean(row["until_final"] for row in exact_rows)
        inputs_changing = statistics.fmean(row["inputs_changing"] for row in exact_rows)
        clauses[:0] = [
            f"{inputs_changing:.0%} of the positions read another token than at the step before (mean over its "
            "steps, the first counting them all: the sampler renoises every position it does not accept): a mode "
            "forwarding only the positions whose own token changed would forward that share",
            f"{statistics.fmean(changing):.0%} of the positions change their argmax from one step to the next "
            "(mean over its steps)",
            f"a position's argmax takes its final value after {until_final:.0%} of the steps (mean, counting the step "
            "that shows it): a mode forwarding each position until then would forward that share",
        ]
    return clauses


def _line(row: dict[str, Any]) -> str:
    return (
        f"{row['steps']} steps, {row['forwarded']} forwarded ({row['forwarded_vs_exact']:.0%}), "
        f"{1000 * row['step_s']:.0f} ms/step, {row['tokens_per_s']:.1f} tok/s, shared {row['shared']:.1%}, "
        f"KL {row['kl']:.2e}, step KL {row['step_kl']}, step argmax {row['step_argmax']}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
