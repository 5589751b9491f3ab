"""Training throughput and memory of `dgemma lora` (QLoRA, 4 bits) on this machine, and the plan for the released
shape.

    python -m bench lora                     # bench shape, 4-bit float32 conversion, CPU: ~10 min (3 steps a mode)
    python -m bench lora --quick             # the quick shape: a smoke run of seconds
    python -m bench lora --iters 5 --prompt-tokens 1024 --answer-tokens 300
    python -m bench lora --help

A random-weight checkpoint of the shape is written by the transformers reference (tests/checkpoints.py, with the
test tokenizer) and converted by our converter, through the real command: `dgemma convert SRC DST --bits 4
--dtype float32` (the mixed recipe: experts at 4 bits, the other linears and the embedding at 8; float32 because
MLX's CPU gather_mm takes float32 only: a bfloat16 model's float parts would be cast at every matmul). Both are cached
under OUT/checkpoints. A synthetic data set (train.jsonl, valid.jsonl of prompt/completion records of random
words, each prompt `--prompt-tokens` and each answer about `--answer-tokens` tokens long once the chat template
has rendered them) is written next to them. Then `dgemma lora` itself runs, in a process of its own, once per
mode (without, then with --grad-checkpoint):

    dgemma lora --model CKPT --data DATA --iters N --batch-size 1 --lora-rank 8 --steps-per-report 1
        --steps-per-eval 0 [--grad-checkpoint]

and its output is read: the memory plan it prints before training (its first line on stderr), and each
iteration's progress line (tokens/s, MLX's peak memory since training began). The first iteration compiles the
step and is left out of the rates; tokens are what the trainer counts (the sequence's tokens plus the canvas's).
The process's maximum resident set size (wait4's rusage) is recorded beside MLX's peak.

The released shape's plan is worked out as `dgemma lora` works it out (mlx_dgemma.lora.memory.training_plan) from
the config.json `dgemma convert --bits 4` writes for it (bfloat16, the mixed recipe), rank 8, batch 1: at this
run's sequence length and at the default --max-seq-length (2048, every token but the first a response token, the
worst case), with and without gradient checkpointing, against a 32 GB Mac's usable memory (Metal's recommended
working set, two thirds of 32 GiB). `dgemma lora --model DIR --plan-only --batch-size 1` prints the same from a
directory holding only that config.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .build import REPO
from .orchestrate import add_run_options, quiet_wait
from .shapes import PRESETS, Shape

DEFAULT_OUT = REPO / "bench" / "out" / "lora"
MARKER = "bench_lora.json"
MODES = {"plain": [], "checkpoint": ["--grad-checkpoint"]}
MODE_LABELS = {"plain": "without --grad-checkpoint", "checkpoint": "with --grad-checkpoint"}
# Per shape: iterations, prompt tokens, answer tokens.
DEFAULTS = {"bench": (3, 512, 200), "quick": (2, 40, 12)}
MAC_32GB_USABLE = 2 * 32 * 2**30 // 3  # Metal's recommended working set on a 32 GB Mac
RELEASED_DEFAULT_LENGTH = 2048  # dgemma lora's default --max-seq-length
TRAIN_RECORDS, VALID_RECORDS = 4, 2
WORDS = (
    "the model reads a prompt and writes its answer one block at a time while the decoder refines every position "
    "of the canvas from noise river mountain garden window letter number table music system paper orange silver "
    "quiet rapid gentle bright simple careful under over between after before during against toward around"
).split()
_UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}
_SIZE = r"([\d.,]+) (B|KB|MB|GB|TB)"
PROGRESS = re.compile(rf"^iter (\d+)/(\d+) · train loss ([\d.naif-]+) .*· ([\d,.]+) tokens/s · peak {_SIZE}")
PLAN = re.compile(rf"^memory plan: {_SIZE}.* for batch (\d+) x (\d+) tokens, (with|without) gradient checkpointing")


def parse_size(number: str, unit: str) -> int:
    return int(float(number.replace(",", "")) * _UNITS[unit])


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench lora", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default=None, choices=sorted(DEFAULTS), help="a preset shape (default bench)")
    parser.add_argument("--quick", action="store_true", help="the quick shape: a smoke run of seconds")
    parser.add_argument("--iters", type=int, default=None, help="iterations per mode (default 3; quick 2)")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="tokens per prompt (default 512; quick 40)")
    parser.add_argument("--answer-tokens", type=int, default=None, help="tokens per answer (default 200; quick 12)")
    parser.add_argument("--lora-rank", type=int, default=8, help="the adapter's rank (default 8)")
    parser.add_argument("--modes", default="plain,checkpoint", help="comma-separated: plain, checkpoint")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the data")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"checkpoints, data, logs, JSON ({DEFAULT_OUT})")
    add_run_options(parser, "mode", "dgemma lora")
    args = parser.parse_args(argv)
    if args.quick and args.shape not in (None, "quick"):
        parser.error("--quick is --shape quick")
    args.shape = "quick" if args.quick else (args.shape or "bench")
    iters, prompt, answer = DEFAULTS[args.shape]
    args.iters = args.iters or iters
    args.prompt_tokens = args.prompt_tokens or prompt
    args.answer_tokens = args.answer_tokens or answer
    args.quiet_wait = quiet_wait(args.quiet_wait, args.shape == "quick")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or set(args.modes) - set(MODES):
        parser.error(f"--modes: choose from {', '.join(MODES)}")
    if min(args.iters, args.prompt_tokens, args.answer_tokens, args.lora_rank) < 1:
        parser.error("--iters, --prompt-tokens, --answer-tokens and --lora-rank must be >= 1")
    return args


# -- the checkpoint ---------------------------------------------------------------------------------------------------


def build_float(spec: dict[str, Any]) -> None:
    """In its own process (torch): the reference model of the shape, in Google's layout, with the test tokenizer."""
    from .build import helper_from_tests

    checkpoints, tokenizer = helper_from_tests("checkpoints"), helper_from_tests("tokenizer_fixture")
    dest = Path(spec["dest"])
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    start = time.perf_counter()
    model = checkpoints.build_reference_model(seed=spec["seed"], canvas_length=spec["canvas_length"], **spec["text"])
    checkpoints.save_reference_checkpoint(model, staging)
    tokenizer.write_tokenizer(staging, vocab_size=spec["text"]["vocab_size"])
    (staging / MARKER).write_text(json.dumps(spec, indent=2))
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)
    print(f"[bench lora] wrote {dest} in {time.perf_counter() - start:.1f} s", file=sys.stderr)


def _complete(path: Path, spec: dict[str, Any]) -> bool:
    try:
        return json.loads((path / MARKER).read_text()) == spec
    except (OSError, ValueError):
        return False


def ensure_checkpoint(shape: Shape, out: Path, seed: int, rebuild: bool, logs: Path) -> tuple[Path, dict[str, Any]]:
    """The 4-bit float32 conversion of the shape's reference checkpoint (cached); how long each part took."""
    from .cli import _relay, child_env

    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    spec = {"text": shape.text, "canvas_length": shape.canvas_length, "seed": seed}
    base = f"{shape.checkpoint_name()}-s{seed}"
    float_path, quant_path = root / base, root / f"{base}-q4-float32"
    timings: dict[str, Any] = {}
    if rebuild or not _complete(float_path, {**spec, "dest": str(float_path)}):
        print(f"[bench lora] building {float_path} ...", file=sys.stderr)
        spec_path = logs / f"{shape.name}-build.json"
        spec_path.write_text(json.dumps({**spec, "dest": str(float_path)}))
        command = [sys.executable, "-m", "bench.lora", "--build", str(spec_path)]
        code, _, wall, _ = _relay(command, child_env(False, False), logs / f"{shape.name}-build.log", 7200)
        if code != 0 or not (float_path / MARKER).is_file():
            raise SystemExit(f"building the checkpoint failed (see {logs / f'{shape.name}-build.log'})")
        timings["build_s"] = wall
        rebuild = True
    convert = {**spec, "convert": ["--bits", "4", "--dtype", "float32"]}
    if rebuild or not _complete(quant_path, convert):
        print(f"[bench lora] converting to {quant_path} ...", file=sys.stderr)
        command = [sys.executable, "-m", "mlx_dgemma.cli", "convert", str(float_path), str(quant_path)]
        command += [*convert["convert"], "--force"]
        code, _, wall, _ = _relay(command, child_env(False, False), logs / f"{shape.name}-convert.log", 7200)
        if code != 0:
            raise SystemExit(f"converting the checkpoint failed (see {logs / f'{shape.name}-convert.log'})")
        (quant_path / MARKER).write_text(json.dumps(convert, indent=2))
        timings["convert_s"] = wall
    return quant_path, timings


# -- the data ---------------------------------------------------------------------------------------------------------


def _words_to(tokenizer: Any, target: int, rng: np.random.Generator, measure) -> str:
    """Random words whose measured token count is `target` or the nearest above it (a word is several tokens)."""
    words = [str(w) for w in rng.choice(WORDS, size=max(1, target))]
    low, high = 1, len(words)
    while measure(" ".join(words[:high])) < target:  # the tokenizer merges more than one word a token: grow
        words += [str(w) for w in rng.choice(WORDS, size=len(words))]
        high = len(words)
    while low < high:  # the fewest words reaching the target
        middle = (low + high) // 2
        if measure(" ".join(words[:middle])) >= target:
            high = middle
        else:
            low = middle + 1
    return " ".join(words[:high])


def write_data(checkpoint: Path, folder: Path, prompt_tokens: int, answer_tokens: int, seed: int) -> dict[str, Any]:
    """train.jsonl and valid.jsonl of prompt/completion records sized in the checkpoint's tokens."""
    from mlx_dgemma.lora.data import record_to_example
    from mlx_dgemma.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(checkpoint)
    rng = np.random.default_rng([seed, 0x10EA])
    folder.mkdir(parents=True, exist_ok=True)
    examples = []
    for name, count in (("train", TRAIN_RECORDS), ("valid", VALID_RECORDS)):
        lines = []
        for _ in range(count):
            prompt = _words_to(
                tokenizer,
                prompt_tokens,
                rng,
                lambda text: record_to_example(tokenizer, {"prompt": text, "completion": "ok"}).response_start,
            )
            completion = _words_to(
                tokenizer,
                answer_tokens,
                rng,
                lambda text, p=prompt: record_to_example(tokenizer, {"prompt": p, "completion": text}).response_length,
            )
            record = {"prompt": prompt, "completion": completion}
            examples.append(record_to_example(tokenizer, record))
            lines.append(json.dumps(record))
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return {
        "train_records": TRAIN_RECORDS,
        "valid_records": VALID_RECORDS,
        "prompt_tokens": [e.response_start for e in examples],
        "answer_tokens": [e.response_length for e in examples],
        "longest": max(len(e.tokens) for e in examples),
        "longest_answer": max(e.response_length for e in examples),
    }


# -- one training run -------------------------------------------------------------------------------------------------


def run_lora(command: list[str], env: dict[str, str], log_path: Path, timeout: float) -> dict[str, Any]:
    """Run `dgemma lora` in its own process group; each output line timestamped, echoed and logged; its rusage."""
    from .cli import _relay

    lines: list[tuple[float, str]] = []
    code, timed_out, wall, max_rss = _relay(command, env, log_path, timeout, lambda at, line: lines.append((at, line)))
    return {"exit_code": code, "timed_out": timed_out, "wall_s": wall, "max_rss": max_rss, "lines": lines}


def parse_run(run: dict[str, Any]) -> dict[str, Any]:
    """The plan and the progress lines of one `dgemma lora` run, and the rates without the first iteration."""
    plan, steps = None, []
    for at, line in run["lines"]:
        if plan is None and (match := PLAN.match(line)):
            plan = {
                "line": line,
                "total": parse_size(match[1], match[2]),
                "batch": int(match[3]),
                "tokens": int(match[4]),
                "grad_checkpoint": match[5] == "with",
            }
        elif match := PROGRESS.match(line):
            steps.append(
                {
                    "iteration": int(match[1]),
                    "train_loss": float(match[3]),
                    "tokens_per_second": float(match[4].replace(",", "")),
                    "peak_memory": parse_size(match[5], match[6]),
                    "at_s": at,
                }
            )
    for before, step in zip([None, *steps], steps):
        step["step_s"] = None if before is None else step["at_s"] - before["at_s"]
    warm = steps[1:]
    return {
        "plan": plan,
        "steps": steps,
        "tokens_per_second": statistics.median(s["tokens_per_second"] for s in warm) if warm else None,
        "step_s": statistics.median(s["step_s"] for s in warm) if warm else None,
        "first_tokens_per_second": steps[0]["tokens_per_second"] if steps else None,
        "peak_memory": steps[-1]["peak_memory"] if steps else None,
    }


# -- the released shape's plan ----------------------------------------------------------------------------------------


def converted_config(text: dict[str, Any], canvas: int, bits: int = 4, group_size: int = 64, dtype: str = "bfloat16"):
    """config.json as `dgemma convert --bits 4` (the mixed recipe) writes it for a checkpoint of `text`'s shape."""
    from mlx_dgemma.config import ModelConfig
    from mlx_dgemma.convert.quantize import Recipe
    from mlx_dgemma.memory import _tensors

    raw = {"model_type": "diffusion_gemma", "canvas_length": canvas, "text_config": dict(text), "dtype": dtype}
    config = ModelConfig.from_dict(raw)
    recipe = Recipe.parse("mixed", bits, group_size)
    module_bits = {}
    for tensor in _tensors(config):
        if tensor.matrix:
            name = tensor.module if ".experts." in tensor.module else f"{tensor.module}.weight"
            chosen = recipe.bits_for(name, (1, tensor.in_features))
            if chosen:
                module_bits[tensor.module] = chosen
    raw["quantization"] = recipe.config_block(module_bits)
    return ModelConfig.from_dict(raw)


def released_plans(rank: int, lengths: list[tuple[str, int, int]]) -> list[dict[str, Any]]:
    """What `dgemma lora` plans for the released shape at 4 bits, batch 1, per (label, length, responses)."""
    from mlx_dgemma.lora.adapters import LoraSettings
    from mlx_dgemma.lora.memory import TrainingShape, training_plan

    released = PRESETS["released"]
    config = converted_config(released.text, released.canvas_length)
    settings = LoraSettings(rank=rank)
    rows = []
    for label, length, responses in lengths:
        row: dict[str, Any] = {"label": label, "length": length, "responses": responses}
        for key, checkpoint in (("checkpoint", True), ("plain", False)):
            plan = training_plan(config, settings, TrainingShape(1, length, responses, checkpoint))
            row[key] = {
                "total": plan.total,
                "weights": plan.weights,
                "adapter": plan.adapter,
                "adapter_parameters": plan.adapter_parameters,
                "layers": plan.layers,
                "logits": plan.logits,
                "workspace": plan.workspace,
                "line": plan.describe(),
                "fits_32gb_mac": plan.total <= MAC_32GB_USABLE,
            }
        rows.append(row)
    return rows


# -- the report -------------------------------------------------------------------------------------------------------


def _gb(value: int | None) -> str:
    if value is None:
        return "—"
    return f"{value / 1e9:.2f} GB" if value >= 1e9 else f"{value / 1e6:.1f} MB"


def table(document: dict[str, Any]) -> str:
    lines = [
        "| mode | tokens/s | s/step | MLX peak (measured) | max RSS | plan's estimate | plan ÷ peak |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, result in document["modes"].items():
        if result.get("status") != "ok":
            lines.append(f"| {MODE_LABELS[mode]} | {result.get('status')}: {result.get('error')} | | | | | |")
            continue
        rate, step = result["tokens_per_second"], result["step_s"]
        plan = (result.get("plan") or {}).get("total")
        peak = result["peak_memory"]
        ratio = f"{plan / peak:.2f}" if plan and peak else "—"
        lines.append(
            f"| {MODE_LABELS[mode]} | {'—' if rate is None else f'{rate:,.0f}'} | "
            f"{'—' if step is None else f'{step:.1f}'} | {_gb(peak)} | {_gb(result['max_rss'])} | {_gb(plan)} | "
            f"{ratio} |"
        )
    return "\n".join(lines)


def released_table(document: dict[str, Any]) -> str:
    usable = MAC_32GB_USABLE
    lines = [
        f"| released shape, 4 bits, rank {document['lora_rank']}, batch 1 | with --grad-checkpoint | without | "
        f"fits a 32 GB Mac ({usable / 1e9:.1f} GB usable) with / without |",
        "|---|---|---|---|",
    ]
    for row in document["released"]:
        fits = " / ".join("yes" if row[k]["fits_32gb_mac"] else "no" for k in ("checkpoint", "plain"))
        lines.append(
            f"| {row['label']}: {row['length']} tokens, {row['responses']} response | {_gb(row['checkpoint']['total'])}"
            f" | {_gb(row['plain']['total'])} | {fits} |"
        )
    first = document["released"][0]["checkpoint"]
    lines += [
        "",
        f"Weights {_gb(first['weights'])}, adapter and Adam state {_gb(first['adapter'])} "
        f"({first['adapter_parameters']:,} parameters).",
    ]
    return "\n".join(lines)


def header(document: dict[str, Any]) -> str:
    shape, machine, data = document["shape"], document["machine"], document["data"]
    text = shape["text"]
    load = [r.get("foreign_cores") for r in document["modes"].values() if r.get("foreign_cores") is not None]
    return "\n".join(
        [
            f"## dgemma lora: '{shape['name']}' shape, 4-bit (mixed recipe) float32, rank {document['lora_rank']}, "
            "batch 1",
            "",
            f"`{document['command']}`",
            "",
            f"Machine: {machine.get('cpu', '?')}, {machine.get('cores')} cores"
            + (f", {', '.join(machine['gpus'])}" if machine.get("gpus") else "")
            + "; BLAS: "
            + ("OpenBLAS preloaded" if document["openblas"] else "MLX's bundled BLAS")
            + f"; git {document['git'].get('commit', '?')}"
            + (" (modified)" if document["git"].get("modified") else "")
            + (f"; other processes' load {max(load):.2f} cores at most" if load else ""),
            "",
            f"Text: {text['num_hidden_layers']} layers × {text['hidden_size']}, {text['num_experts']} experts "
            f"top-{text['top_k_experts']}, vocabulary {text['vocab_size']}, canvas {shape['canvas_length']}. Data: "
            f"prompts of {min(data['prompt_tokens'])}–{max(data['prompt_tokens'])} tokens, answers of "
            f"{min(data['answer_tokens'])}–{max(data['answer_tokens'])}; {document['iters']} iterations a mode, the "
            "first (compiling the step) left out of the rates (medians); tokens/s as the trainer counts them "
            "(sequence + canvas); MLX peak: the last progress line's.",
        ]
    )


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from .cli import OPENBLAS, child_env, git_state, machine
    from .orchestrate import LoadMeter, wait_until_quiet

    shape = PRESETS[args.shape]
    out = args.out.resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    openblas = OPENBLAS.is_file() and not args.no_openblas
    started = time.perf_counter()
    checkpoint, timings = ensure_checkpoint(shape, out, args.seed, args.rebuild, logs)
    data_dir = out / f"{shape.name}-data"
    data = write_data(checkpoint, data_dir, args.prompt_tokens, args.answer_tokens, args.seed)
    document: dict[str, Any] = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m bench lora " + " ".join(shlex.quote(a) for a in argv),
        "machine": machine(),
        "git": git_state(),
        "shape": shape.to_json(),
        "checkpoint": str(checkpoint),
        "checkpoint_timings": timings,
        "openblas": openblas,
        "iters": args.iters,
        "lora_rank": args.lora_rank,
        "data": {**data, "path": str(data_dir)},
        "modes": {},
    }
    for mode in args.modes:
        adapters = out / f"{shape.name}-adapters-{mode}"
        shutil.rmtree(adapters, ignore_errors=True)
        flags = ["--model", str(checkpoint), "--data", str(data_dir), "--iters", str(args.iters), "--batch-size", "1"]
        flags += ["--lora-rank", str(args.lora_rank), "--steps-per-report", "1", "--steps-per-eval", "0"]
        flags += ["--adapter-path", str(adapters), "--seed", str(args.seed), *MODES[mode]]
        waited, _ = wait_until_quiet([], args.quiet_wait)
        print(f"[bench lora] {MODE_LABELS[mode]} ...", file=sys.stderr)
        command = [sys.executable, "-m", "mlx_dgemma.cli", "lora", *flags]
        meter = LoadMeter([])  # cores other processes keep busy while dgemma lora runs
        run = run_lora(command, child_env(True, openblas), logs / f"{shape.name}-{mode}.log", args.timeout)
        foreign = meter.foreign_cores()
        result = {
            "command": "dgemma lora " + " ".join(shlex.quote(a) for a in flags),
            "exit_code": run["exit_code"],
            "wall_s": run["wall_s"],
            "max_rss": run["max_rss"],
            "quiet_wait_s": waited,
            "foreign_cores": foreign,
            **parse_run(run),
        }
        if run["exit_code"] != 0 or not result["steps"]:
            result["status"] = "timeout" if run["timed_out"] else "error"
            result["error"] = f"exit code {run['exit_code']}, see {logs / f'{shape.name}-{mode}.log'}"
        else:
            result["status"] = "ok"
        document["modes"][mode] = result
    ok = [r for r in document["modes"].values() if r["status"] == "ok" and r.get("plan")]
    length = ok[0]["plan"]["tokens"] if ok else data["longest"]
    document["released"] = released_plans(
        args.lora_rank,
        [
            ("this run's sequences", length, data["longest_answer"]),
            ("default --max-seq-length", RELEASED_DEFAULT_LENGTH, RELEASED_DEFAULT_LENGTH - 1),
        ],
    )
    document["wall_s"] = time.perf_counter() - started
    markdown = f"{header(document)}\n\n{table(document)}\n\n{released_table(document)}\n"
    json_path, md_path = out / f"{shape.name}.json", out / f"{shape.name}.md"
    json_path.write_text(json.dumps(document, indent=2, default=str))
    md_path.write_text(markdown)
    print(markdown)
    print(f"wrote {json_path}, {md_path} (wall {document['wall_s']:.0f} s)", file=sys.stderr)
    return 0 if all(r["status"] == "ok" for r in document["modes"].values()) else 1


def _entry(argv: list[str]) -> int:
    if argv[:1] == ["--build"]:
        build_float(json.loads(Path(argv[1]).read_text()))
        return 0
    return main(argv)


if __name__ == "__main__":
    sys.exit(_entry(sys.argv[1:]))
