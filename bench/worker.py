"""One runtime, in its own process.

`python -m bench.worker SPEC.json RESULT.json` runs every phase in order;
with `--serve` it imports the runtime, then takes one command per line on
stdin and answers one JSON line on stdout, so that the parent can interleave
the runtimes phase by phase (a slow spell of the machine then hits every
runtime alike). Progress goes to stderr.

The phases, the same for every runtime:
- `import`: import the runtime (timed, on start);
- `load`: load the weights, then a cold prefill of the prompt into a fresh
  cache (the first encoder pass ever);
- `fixed N` (N = 0, 1, ...): a generation at a fixed number of steps per
  canvas, adaptive stopping off, from a freshly prefilled cache (prefill not
  counted). Run 0 is the cold run: its first step is the cold first step.
  Warm step samples are every step but the first of each canvas (no
  self-conditioning; after the first canvas it also encodes the committed
  one) of runs 1 and later. Tokens/s is the median over runs 2 and later
  (each runtime's own default way: mlx-vlm evaluates lazily once per canvas
  there), else run 1;
- `prefill`: warm prefills (median);
- `adaptive`: a generation with adaptive stopping on, capped at
  `adaptive_steps` (after an untimed 2-step adaptive warm-up);
- `finish`: memory figures.
The result file is rewritten after each phase, so a crash keeps what was measured.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import traceback
from typing import Any

from .record import Recorder, Skip, current_rss_gb, log, median, openblas_loaded, summary
from .runtimes import DRIVERS, Driver
from .shapes import RunSpec


def make_prompt(vocab: int, length: int, seed: int) -> list[int]:
    """The same prompt for every runtime: seeded random ids, clear of the low special ids."""
    rng = random.Random(seed)
    return [rng.randrange(8, vocab) for _ in range(length)]


def warm_steps(runs: list[dict[str, Any]]) -> list[float]:
    return [t for run in runs for canvas in run["step_times"] for t in canvas[1:]]


def machine_probe() -> float | None:
    """GFLOP/s of a numpy float32 1024² matmul for 0.3 s: how fast the machine is right now."""
    try:
        import numpy as np
    except ImportError:
        return None
    a = np.random.default_rng(0).random((1024, 1024), dtype=np.float32)
    a @ a
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < 0.3:
        a @ a
        count += 1
    return 2 * 1024**3 * count / (time.perf_counter() - start) / 1e9


class Session:
    def __init__(self, driver: Driver, rec: Recorder):
        self.driver = driver
        self.rec = rec
        self.metrics = rec.metrics
        self.settings = driver.settings
        self.prompt = make_prompt(int(driver.shape.text["vocab_size"]), self.settings.prompt_tokens, self.settings.seed)
        self.runs: list[dict[str, Any]] = []
        self.probes: list[tuple[str, float | None]] = []

    def probe(self, label: str) -> None:
        self.probes.append((label, machine_probe()))
        self.metrics["machine_probe_gflops"] = self.probes

    def setup(self) -> None:
        with self.rec.phase("import", required=True):
            start = time.perf_counter()
            self.rec.data["env"].update(self.driver.setup())
            self.metrics["import_s"] = time.perf_counter() - start
        self.rec.data["env"]["openblas_loaded"] = openblas_loaded()
        self.metrics["rss_after_import_gb"] = current_rss_gb()

    def load(self) -> None:
        metrics = self.metrics
        self.probe("start")  # not at import: the workers import at the same time
        with self.rec.phase("load", required=True):
            start = time.perf_counter()
            self.driver.load()
            metrics["load_s"] = time.perf_counter() - start
        metrics["memory_after_load"] = self.driver.memory()
        with self.rec.phase("cold prefill", required=True):
            start = time.perf_counter()
            self.driver.prefill(self.prompt)
            metrics["cold_prefill_s"] = time.perf_counter() - start

    def fixed(self, index: int) -> None:
        settings, metrics = self.settings, self.metrics
        with self.rec.phase(f"fixed-step generation {index}"):
            # Runs 0 (cold) and 1 (warm) report every step; later ones run each runtime's default way.
            per_step = index < 2
            run = self.driver.generate(
                self.prompt, settings.steps, adaptive=False, seed=settings.seed + index, per_step=per_step
            )
            self.runs.append({**run.to_json(), "index": index, "per_step_requested": per_step})
            log(self.driver.name, f"  {run.tokens} tokens in {run.seconds:.2f} s, {run.steps_per_canvas} steps")
        runs = sorted(self.runs, key=lambda r: r["index"])
        metrics["fixed_runs"] = runs
        if not runs:
            return
        first = runs[0]
        if first["index"] == 0 and first["step_times"] and first["step_times"][0]:
            metrics["cold_first_step_s"] = first["step_times"][0][0]
            metrics["cold_start_s"] = metrics["load_s"] + metrics["cold_prefill_s"] + metrics["cold_first_step_s"]
        warm = [r for r in runs if r["index"] >= 1] or runs  # run 0 is cold: torch and compiled graphs warm up there
        metrics["step_s"] = summary(warm_steps(warm))
        timed = [r for r in runs if r["index"] >= 2] or warm
        metrics["fixed_tokens_per_s"] = median([r["tokens_per_s"] for r in timed if r["tokens_per_s"]])
        metrics["fixed_tokens_per_s_runs"] = [r["index"] for r in timed]
        self.rec.save()

    def prefill(self) -> None:
        with self.rec.phase("warm prefill"):
            times = []
            for _ in range(self.settings.prefill_repeats):
                start = time.perf_counter()
                self.driver.prefill(self.prompt)
                times.append(time.perf_counter() - start)
            self.metrics["prefill_s"] = summary(times)
            self.metrics["prefill_tokens_per_s"] = len(self.prompt) / median(times)

    def adaptive(self) -> None:
        settings = self.settings
        with self.rec.phase("adaptive generation"):
            # Untimed 2-step warm-up: a runtime that compiles its step math per sampler setting compiles here.
            self.driver.generate(
                self.prompt, min(2, settings.adaptive_steps), adaptive=True, seed=settings.seed, per_step=False
            )
            run = self.driver.generate(
                self.prompt, settings.adaptive_steps, adaptive=True, seed=settings.seed, per_step=False
            )
            self.metrics["adaptive_run"] = run.to_json()
            self.metrics["adaptive_tokens_per_s"] = run.tokens / run.seconds
            self.metrics["adaptive_steps_per_canvas"] = sum(run.steps_per_canvas) / max(1, len(run.steps_per_canvas))

    def finish(self) -> None:
        metrics = self.metrics
        memory = self.driver.memory()
        if memory.get("maxrss_gb") is not None and metrics.get("rss_after_import_gb") is not None:
            memory["maxrss_growth_gb"] = memory["maxrss_gb"] - metrics["rss_after_import_gb"]
        metrics["memory"] = memory
        self.probe("end")
        self.rec.data["status"] = "partial" if self.rec.data["phase_errors"] else "ok"
        self.rec.save()

    def command(self, line: str) -> None:
        name, *args = line.split()
        if name == "load":
            self.load()
        elif name == "fixed":
            self.fixed(int(args[0]))
        elif name == "prefill":
            self.prefill()
        elif name == "adaptive":
            self.adaptive()
        elif name == "probe":
            self.probe(args[0] if args else "probe")
        elif name == "finish":
            self.finish()
        else:
            raise ValueError(f"unknown command {name!r}")

    def run_all(self) -> None:
        self.load()
        for index in range(self.settings.repeats):
            self.fixed(index)
        self.prefill()
        if self.settings.adaptive:
            self.adaptive()
        self.finish()


def _reply(message: dict[str, Any]) -> None:
    sys.__stdout__.write(json.dumps(message) + "\n")
    sys.__stdout__.flush()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    serve = "--serve" in argv
    paths = [a for a in argv if a != "--serve"]
    if len(paths) != 2:
        print("usage: python -m bench.worker SPEC.json RESULT.json [--serve]", file=sys.stderr)
        return 2
    with open(paths[0]) as file:
        spec = RunSpec.from_json(json.load(file))
    rec = Recorder(paths[1], spec.runtime)
    rec.data["env"].update(
        {"python": sys.version.split()[0], "LD_PRELOAD": os.environ.get("LD_PRELOAD"), "pid": os.getpid()}
    )
    if serve:
        sys.stdout = sys.stderr  # the runtimes' own prints must not garble the command channel

    def fail(error: BaseException) -> None:
        rec.data["status"] = "error"
        rec.data["error"] = f"{type(error).__name__}: {error}"
        rec.data["traceback"] = traceback.format_exc()[-4000:]
        traceback.print_exc(file=sys.stderr)
        rec.save()

    try:
        session = Session(DRIVERS[spec.runtime](spec), rec)
        session.setup()
    except Skip as reason:
        rec.data["status"], rec.data["error"] = "skipped", str(reason)
        rec.save()
        log(spec.runtime, f"skipped: {reason}")
        if serve:
            _reply({"ok": False, "skipped": True, "error": str(reason)})
        return 0
    except Exception as error:
        fail(error)
        if serve:
            _reply({"ok": False, "error": rec.data["error"]})
        return 0
    if not serve:
        try:
            session.run_all()
        except Exception as error:
            fail(error)
        return 0

    _reply({"ok": True, "ready": True})
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        if line == "quit":
            break
        try:
            session.command(line)
        except Exception as error:  # a required phase failed: nothing more can run in this process
            fail(error)
            _reply({"ok": False, "error": rec.data["error"]})
            return 0
        _reply({"ok": True})
    return 0


if __name__ == "__main__":
    sys.exit(main())
