"""Our denoising step under several settings, in one process, alternating: which settings make it fastest.

    python -m bench.step --shape released --dispatches tiled,fused --compile off,on   # a GPU

Loads our model once (the bench's checkpoint, or the shape's random weights
built in memory), then runs rounds of generations: every round runs each
variant (an MoE dispatch; the decoder layers compiled or not;
the quantized dense layers as they are or dequantized; any `--vary` setting)
for one canvas of `--steps` fixed steps, in turn, so the machine's drift
reaches every variant alike. Round 0 warms up (graph tracing, kernel
compiles) and is not counted. A variant's figure is the median of its warm
steps (a canvas's first step, which also launches the next, is left out as in
`python -m bench`). Each step's launch is timed on the host as well: building
its graph (Python) and encoding it (`mx.async_eval`, which returns once every
kernel is queued); a launch as long as the step says the host, not the device,
sets the pace. Prints a table and, with --out, writes JSON after every round.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .record import mlx_environment, summary
from .shapes import RunSpec, Settings, our_settings, parse_setting, parse_shape
from .worker import make_prompt

COMPILE_CHOICES = {"auto": None, "off": False, "on": True}
DENSE_CHOICES = ("auto", "quantized", "dequantized")


@dataclass(frozen=True)
class Variant:
    dispatch: str  # an MoE dispatch, or "auto"
    compiled: bool | None  # the decoder layers as compiled graphs around attention (None: our default)
    dense: str  # the quantized dense layers: "quantized" or "dequantized" (at load)
    settings: tuple[tuple[str, Any], ...]  # ("module.NAME" of mlx_dgemma, value)

    def to_json(self) -> dict[str, Any]:
        return {
            "dispatch": self.dispatch,
            "compiled": self.compiled,
            "dense": self.dense,
            "settings": dict(self.settings),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="bench", help="a preset or JSON, as for python -m bench")
    parser.add_argument("--dispatches", default="auto", help="comma-separated MoE dispatches (auto: the device's)")
    parser.add_argument(
        "--compile", default="auto", help="the decoder layers compiled: auto (our default), off, on; comma-separated"
    )
    parser.add_argument(
        "--dense",
        default="auto",
        help="quantized dense layers: auto (our default here), quantized, dequantized (at load); comma-separated",
    )
    parser.add_argument(
        "--vary",
        action="append",
        default=[],
        metavar="MODULE.NAME=A,B",
        help="also vary a setting of mlx_dgemma (e.g. moe.ROUTER_KERNEL=0,1); repeatable",
    )
    parser.add_argument("--steps", type=int, default=16, help="fixed steps per canvas")
    parser.add_argument("--rounds", type=int, default=4, help="rounds after the warm-up round")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    try:
        variants = _variants(args.dispatches, args.compile, args.dense, args.vary)
        results = run(args, variants)
    except Exception as error:  # a one-line reason, not a traceback
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0 if any(v.get("median_ms") for v in results["variants"]) else 1


def _variants(dispatches: str, compiled: str, dense: str, vary: list[str]) -> list[Variant]:
    """Every combination asked for."""
    for option, given, choices in (("--compile", compiled, COMPILE_CHOICES), ("--dense", dense, DENSE_CHOICES)):
        unknown = [c for c in given.split(",") if c not in choices]
        if unknown:
            raise ValueError(f"{option}: {', '.join(unknown)}; choose from {', '.join(choices)}")
    settings: list[tuple] = [()]
    for item in vary:
        target, values = parse_setting(item)
        if target.startswith("env."):
            raise ValueError(f"--vary {target}: MLX reads its environment once a process; run once per value")
        settings = [(*s, (target, value)) for s in settings for value in values]
    return [
        Variant(d, COMPILE_CHOICES[c], w, s)
        for d in dispatches.split(",")
        for c in compiled.split(",")
        for w in dense.split(",")
        for s in settings
    ]


def run(args: argparse.Namespace, variants: list[Variant]) -> dict[str, Any]:

    from mlx_dgemma import moe
    from mlx_dgemma.loader import dense_weights_here, dequantized_dense_layers, swap_modules

    from .cli import ensure_checkpoint
    from .runtimes.ours import OursDriver

    for variant in variants:
        if variant.dispatch != "auto" and variant.dispatch not in moe.available_dispatches():
            raise ValueError(
                f"--dispatches: {variant.dispatch} cannot run here; choose from {moe.available_dispatches()}"
            )
    shape = parse_shape(args.shape)
    # Loaded as stored; each variant puts its own dense layers in place.
    settings = Settings(
        prompt_tokens=args.prompt_tokens, steps=args.steps, seed=args.seed, breakdown=False, dense_weights="quantized"
    )
    variants = [replace(v, dense=dense_weights_here(v.dense)) for v in variants]
    checkpoint = None
    if shape.source != "synthetic":
        out = Path(__file__).resolve().parent / "out"
        (out / "logs").mkdir(parents=True, exist_ok=True)
        checkpoint = str(ensure_checkpoint(shape, out, False, out / "logs"))
    driver = OursDriver(RunSpec("us", shape, settings, checkpoint))
    env = driver.setup()
    driver.load()
    # Both sets of dense layers stay loaded; each variant puts its own in place.
    dense_layers: dict[str, dict] = {}
    if any(v.dense == "dequantized" for v in variants):
        dense_layers["dequantized"] = dequantized_dense_layers(driver.model)
    prompt = make_prompt(driver.vocab, settings.prompt_tokens, settings.seed)
    rows = {
        variant: {**variant.to_json(), "steps_s": [], "build_s": [], "encode_s": [], "errors": []}
        for variant in variants
    }
    results: dict[str, Any] = {
        "shape": shape.name,
        "device": env["device"],
        "mlx": env["mlx"],
        "mlx_environment": mlx_environment(),
        "steps": args.steps,
        "variants": list(rows.values()),
    }
    environment = "".join(f"  {k}={v}" for k, v in results["mlx_environment"].items())
    print(f"shape={shape.name}  device={env['device']}  mlx={env['mlx']}  steps={args.steps}{environment}", flush=True)
    in_place = "quantized"
    for round_index in range(args.rounds + 1):
        for variant, row in rows.items():
            if variant.dense != in_place:
                replaced = swap_modules(driver.model, dense_layers[variant.dense])
                dense_layers[in_place] = replaced
                in_place = variant.dense
            moe.set_moe_dispatch(None if variant.dispatch == "auto" else variant.dispatch)
            settings = {"model.COMPILE_LAYERS": variant.compiled, **dict(variant.settings)}
            try:
                with our_settings(settings), launch_timer() as launches:
                    generation = driver.generate(prompt, args.steps, adaptive=False, seed=args.seed, per_step=True)
            except Exception as error:
                row["errors"].append(f"{type(error).__name__}: {error}"[:300])
                continue
            finally:
                moe.set_moe_dispatch(None)
            if round_index == 0:
                row["dispatch_used"] = variant.dispatch if variant.dispatch != "auto" else moe.moe_dispatch()
                continue
            row["steps_s"].extend(t for canvas in generation.step_times for t in canvas[1:])
            row["build_s"].extend(build for build, _ in launches)
            row["encode_s"].extend(encode for _, encode in launches)
        for row in rows.values():
            if row["steps_s"]:
                stats = summary(row["steps_s"])
                row.update(median_ms=stats["median"] * 1e3, min_ms=stats["min"] * 1e3, samples=len(row["steps_s"]))
                row.update(build_ms=summary(row["build_s"])["median"] * 1e3)
                row.update(encode_ms=summary(row["encode_s"])["median"] * 1e3)
        print(f"round {round_index} done", flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2))
    header = f"{'dispatch':<10} {'compiled':<9} {'dense':<12} {'median ms':>10} {'min ms':>8} {'samples':>8}"
    print(f"{header} {'build ms':>9} {'encode ms':>10}  settings")
    for row in rows.values():
        label = " ".join(f"{k}={v}" for k, v in row["settings"].items())
        start = f"{row['dispatch']:<10} {str(row['compiled']):<9} {row['dense']:<12}"
        if row.get("median_ms") is None:
            print(f"{start} error: {'; '.join(row['errors'])[:300]}  {label}")
            continue
        figures = f"{row['median_ms']:>10.2f} {row['min_ms']:>8.2f} {row['samples']:>8}"
        print(f"{start} {figures} {row['build_ms']:>9.2f} {row['encode_ms']:>10.2f}  {label}")
    return results


@contextmanager
def launch_timer() -> Iterator[list[tuple[float, float]]]:
    """(build, encode) seconds of every step the sampler launches meanwhile: from the start of its decoder call to
    its `mx.async_eval`, and inside that call."""
    import mlx.core as mx

    from mlx_dgemma.sampler import BlockSampler

    launches: list[tuple[float, float]] = []
    started = [0.0]
    decode, async_eval = BlockSampler._decode, mx.async_eval

    def timed_decode(self, *args, **kwargs):
        started[0] = time.perf_counter()
        return decode(self, *args, **kwargs)

    def timed_async_eval(*arrays):
        called = time.perf_counter()
        async_eval(*arrays)
        launches.append((called - started[0], time.perf_counter() - called))

    BlockSampler._decode, mx.async_eval = timed_decode, timed_async_eval
    try:
        yield launches
    finally:
        BlockSampler._decode, mx.async_eval = decode, async_eval


if __name__ == "__main__":
    sys.exit(main())
