"""`python -m bench`: us, mlx-vlm and the transformers reference, side by side on one checkpoint."""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib
import importlib.util
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import orchestrate, report
from .build import MARKER, is_complete
from .runtimes import REQUIRES
from .shapes import PRESETS, QUICK_SETTINGS, RunSpec, Settings, Shape, parse_shape

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "out"
OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0")
RUNTIMES = ("us", "mlx-vlm", "reference")
MLX_RUNTIMES = ("us", "mlx-vlm")
# Options of earlier versions, refused with the reason rather than argparse's bare "unrecognized arguments".
REMOVED_OPTIONS = {
    "--moe-dispatch": "there are no MoE dispatches any more: every backend runs one MLX graph (on CUDA, see "
    "--cuda-plugin)",
    "--compile-layers": "our decoder layers have no compile switch any more",
    "--dense-weights": "dequantizing the dense layers is part of the CUDA plug-in now (--cuda-plugin)",
    "--set": "mlx_dgemma has no module settings any more; set environment variables in the shell",
    "--moe-compare": "there are no MoE dispatches to compare any more",
    "--no-breakdown": "there is no per-component breakdown any more",
    "--breakdown-repeats": "there is no per-component breakdown any more",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark mlx-dgemma (us) against mlx-vlm and the transformers reference, each in its own "
        "process, on the same checkpoint and settings. Prints a table, writes JSON, Markdown and a PNG chart.",
        epilog="python -m bench ops ...: a subcommand of its own (bench/ops.py; python -m bench ops --help).",
    )
    parser.add_argument("--runtimes", default=",".join(RUNTIMES), help="comma-separated: us, mlx-vlm, reference")
    parser.add_argument(
        "--shape",
        default=None,
        help=f"a preset ({', '.join(PRESETS)}), a JSON object or a JSON file, e.g. "
        '\'{"base": "released", "num_hidden_layers": 2}\' (default: bench)',
    )
    parser.add_argument("--quick", action="store_true", help="tiny shape and settings: a smoke run under a minute")
    parser.add_argument("--steps", type=int, help="fixed denoising steps per canvas (default 16)")
    parser.add_argument("--adaptive-steps", type=int, help="step cap with adaptive stopping on (default 48)")
    parser.add_argument(
        "--repeats", type=int, help="fixed-step generations per runtime (default 3: cold, warm per-step, timed)"
    )
    parser.add_argument("--prefill-repeats", type=int, help="warm prefills timed (default 3)")
    parser.add_argument("--prompt-tokens", type=int, help="prompt length (default 512)")
    parser.add_argument("--canvases", type=int, help="canvases per generation (default 1)")
    parser.add_argument("--seed", type=int, help="seed for prompt, weights and noise (default 0)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="weights dtype (bench: float32)")
    parser.add_argument("--bits", type=int, choices=(4, 8), help="quantize the MLX runtimes' weights (mixed recipe)")
    parser.add_argument("--group-size", type=int, choices=(32, 64, 128), help="quantization group size (64)")
    parser.add_argument("--synthetic", action="store_true", help="random weights built in memory, no checkpoint")
    parser.add_argument(
        "--cuda-plugin",
        choices=("on", "off"),
        default="on",
        help="our CUDA plug-in (mlx_dgemma.backends.cuda: fused experts, router kernel, dequantized dense layers, "
        "grouped attention, larger CUDA graphs) at load: CudaOptions(enabled=...). Changes nothing off CUDA "
        "(default on)",
    )
    parser.add_argument("--no-adaptive", action="store_true", help="skip the adaptive-stopping generation")
    parser.add_argument("--out", type=Path, default=None, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--no-chart", action="store_true", help="do not draw the PNG chart")
    orchestrate.add_run_options(parser, "phase of a runtime", "the MLX runtimes")
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="run each runtime alone, start to exit, instead of interleaving their phases",
    )
    for item in sys.argv[1:] if argv is None else argv:
        option = item.split("=", 1)[0]
        if option in REMOVED_OPTIONS:
            parser.error(f"{option} was removed: {REMOVED_OPTIONS[option]}")
    return parser.parse_args(argv)


def resolve(args: argparse.Namespace) -> tuple[Shape, Settings, list[str]]:
    shape = parse_shape(args.shape or ("quick" if args.quick else "bench"))
    if args.dtype:
        shape = replace(shape, dtype=args.dtype)
    if args.bits:
        shape = replace(shape, bits=args.bits)
    if args.group_size:
        shape = replace(shape, group_size=args.group_size)
    if args.synthetic:
        shape = replace(shape, source="synthetic")
    base = QUICK_SETTINGS if args.quick else Settings()
    overrides = {
        "steps": args.steps,
        "adaptive_steps": args.adaptive_steps,
        "repeats": args.repeats,
        "prefill_repeats": args.prefill_repeats,
        "prompt_tokens": args.prompt_tokens,
        "canvases": args.canvases,
        "seed": args.seed,
    }
    settings = replace(base, **{k: v for k, v in overrides.items() if v is not None})
    settings = replace(
        settings, cuda_plugin=args.cuda_plugin == "on", adaptive=settings.adaptive and not args.no_adaptive
    )
    runtimes = [name.strip() for name in args.runtimes.split(",") if name.strip()]
    unknown = sorted(set(runtimes) - set(RUNTIMES))
    if unknown:
        raise SystemExit(f"unknown runtime(s) {unknown}; choose from {', '.join(RUNTIMES)}")
    if min(settings.steps, settings.adaptive_steps, settings.repeats, settings.prompt_tokens, settings.canvases) < 1:
        raise SystemExit("--steps, --adaptive-steps, --repeats, --prompt-tokens and --canvases must be >= 1")
    return shape, settings, runtimes


# -- machine and provenance --------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": sys.version.split()[0], "cores": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                info["cpu"] = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        info["cpu"] = platform.processor()
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["ram_gb"] = round(int(line.split()[1]) / 1e6, 1)
    except OSError:
        pass
    try:
        gpus = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
        info["gpus"] = gpus.stdout.strip().splitlines() if gpus.returncode == 0 else []
    except (OSError, subprocess.SubprocessError):
        info["gpus"] = []
    return info


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        return result.stdout.strip()

    try:
        modified = git("status", "--porcelain", "--untracked-files=no").splitlines()
        diff = git("diff", "HEAD", "--", "mlx_dgemma")
        return {
            "commit": git("rev-parse", "--short", "HEAD"),
            "modified": [line[3:] for line in modified],  # tracked files changed since the commit
            "runtime_diff_sha1": hashlib.sha1(diff.encode()).hexdigest()[:12] if diff else None,
        }
    except (OSError, subprocess.SubprocessError):
        return {}


# -- processes ---------------------------------------------------------------------------------------------------


def _relay(
    command: list[str],
    env: dict[str, str],
    log_path: Path,
    timeout: float,
    on_line: Callable[[float, str], None] | None = None,
) -> tuple[int, bool, float, int]:
    """Run a child in its own process group, echo its output live and to a log; kill the group on timeout.
    `on_line(seconds since start, line)` sees each line as it comes. Returns the exit code, whether it timed out,
    the wall time and the child's maximum resident set size in bytes."""
    start = time.perf_counter()
    timed_out = threading.Event()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

        def kill() -> None:
            timed_out.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            for line in proc.stdout:
                if on_line is not None:
                    on_line(time.perf_counter() - start, line.rstrip("\n"))
                sys.stderr.write(line)
                log.write(line)
            _, status, usage = os.wait4(proc.pid, 0)
            code = os.waitstatus_to_exitcode(status)
        finally:
            timer.cancel()
    return code, timed_out.is_set(), time.perf_counter() - start, usage.ru_maxrss * 1024  # Linux: kilobytes


def child_env(mlx: bool, openblas: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    if mlx and openblas:
        env["LD_PRELOAD"] = os.pathsep.join(filter(None, [str(OPENBLAS), env.get("LD_PRELOAD")]))
    return env


def ensure_checkpoint(shape: Shape, out: Path, rebuild: bool, logs: Path) -> Path:
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    float_shape = replace(shape, bits=None)
    float_path = root / float_shape.checkpoint_name()
    shape_file = logs / f"{shape.name}-shape.json"
    shape_file.write_text(json.dumps(float_shape.to_json(), indent=2))
    if rebuild or not is_complete(float_path, float_shape):
        print(f"[bench] building checkpoint {float_path} ...", file=sys.stderr)
        command = [sys.executable, "-m", "bench.build", str(shape_file), str(float_path)]
        code, *_ = _relay(command, child_env(False, False), logs / f"{shape.name}-build.log", 7200)
        if code != 0 or not (float_path / MARKER).is_file():
            raise RuntimeError(f"building the checkpoint failed (see {logs / f'{shape.name}-build.log'})")
    if not shape.bits:
        return float_path
    quant_path = root / f"{float_shape.checkpoint_name()}-mlx-q{shape.bits}g{shape.group_size}"
    if rebuild or not is_complete(quant_path, shape):
        quant_file = logs / f"{shape.name}-shape-q.json"
        quant_file.write_text(json.dumps(shape.to_json(), indent=2))
        command = [sys.executable, "-m", "bench.build", str(quant_file), str(quant_path), str(float_path)]
        code, *_ = _relay(command, child_env(False, False), logs / f"{shape.name}-convert.log", 7200)
        if code != 0 or not (quant_path / MARKER).is_file():
            raise RuntimeError("converting the checkpoint failed")
    return quant_path


def unavailable(name: str, shape: Shape) -> str | None:
    module = REQUIRES[name]
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed"
    if name == "reference" and shape.source == "synthetic":
        return "the reference needs a checkpoint on disk; this shape is built in memory (released: too big here)"
    if name == "reference" and shape.bits:
        return "the reference does not load MLX-quantized checkpoints"
    return None


# `python -m bench NAME ...` runs bench/NAME.py's main.
SUBCOMMANDS = ("ops", "serve", "fast", "quality", "image", "lora")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:
        # Imported only when asked for: each needs what the side-by-side run does not.
        module = importlib.import_module(f".{argv[0]}", __package__)
        return module.main(argv[1:])
    args = parse_args(argv)
    shape, settings, runtimes = resolve(args)
    out = (args.out or DEFAULT_OUT).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    openblas = OPENBLAS.is_file() and not args.no_openblas
    started = time.perf_counter()
    document: dict[str, Any] = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m bench " + " ".join(shlex.quote(a) for a in argv),
        "machine": machine(),
        "git": git_state(),
        "shape": shape.to_json(),
        "settings": settings.to_json(),
        "openblas": {
            "path": str(OPENBLAS),
            "present": OPENBLAS.is_file(),
            "preloaded_for": list(MLX_RUNTIMES) if openblas else [],
        },
        "checkpoint": None,
        "runtimes": {},
    }
    checkpoint = None
    build_error = None
    if shape.source == "checkpoint":
        try:
            checkpoint = ensure_checkpoint(shape, out, args.rebuild, logs)
            document["checkpoint"] = str(checkpoint)
        except Exception as error:
            build_error = f"no checkpoint: {error}"
    document["interleaved"] = not args.sequential
    pending = []
    for name in runtimes:
        reason = unavailable(name, shape)
        if reason:
            document["runtimes"][name] = {"runtime": name, "status": "skipped", "error": reason, "metrics": {}}
            print(f"[bench] {name}: skipped ({reason})", file=sys.stderr)
        elif build_error:
            document["runtimes"][name] = {"runtime": name, "status": "error", "error": build_error, "metrics": {}}
        else:
            document["runtimes"][name] = None  # keeps the order of --runtimes
            pending.append(RunSpec(name, shape, settings, str(checkpoint) if checkpoint else None))
    print(f"[bench] running {', '.join(s.runtime for s in pending)}", file=sys.stderr)
    results = orchestrate.run_all(
        pending,
        logs,
        lambda name: child_env(name in MLX_RUNTIMES, openblas),
        args.timeout,
        not args.sequential,
        orchestrate.quiet_wait(args.quiet_wait, args.quick),
    )
    document["runtimes"].update(results)
    document["wall_s"] = time.perf_counter() - started

    stem = out / shape.name
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(document, indent=2, default=str))
    title = (
        f"DiffusionGemma '{shape.name}' shape, {shape.dtype}{f', {shape.bits}-bit' if shape.bits else ''}, "
        f"prompt {settings.prompt_tokens}, canvas {shape.canvas_length}"
    )
    table = report.side_by_side(document["runtimes"], settings.to_json())
    markdown = f"## {title}\n\n`{document['command']}`\n\n{table}\n"
    stem.with_suffix(".md").write_text(markdown)
    png = (
        None
        if args.no_chart
        else report.chart(document["runtimes"], settings.to_json(), title, stem.with_suffix(".png"))
    )
    print(markdown)
    print(f"wrote {json_path}, {stem.with_suffix('.md')}" + (f", {png}" if png else ""), file=sys.stderr)
    print(f"total wall time {document['wall_s']:.1f} s", file=sys.stderr)
    return 0 if all(r.get("status") in ("ok", "skipped") for r in document["runtimes"].values()) else 1
