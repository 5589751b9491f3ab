"""What fast mode costs in quality, on your model: checkable tasks in exact and in fast mode, side by side.

    python -m bench quality --model mlx-community/diffusiongemma-26B-A4B-it-4bit
    python -m bench quality --model PATH --per-task 10 --seed 1
    python -m bench quality --help

The tasks are made on the fly from `--seed`, each with a checker: arithmetic
(two numbers, the answer's first number checked), copying a code string,
filling a JSON record through a template (parsed, every field checked),
infilling the body of a known small function (the filled expression is parsed,
only arithmetic of its arguments accepted, and evaluated on test inputs), and
writing a counted list (its items numbered 1 to n, in order). Each task runs in
exact mode, then in fast mode, with the same seed. Per task: accuracy in each
mode, the share of output tokens fast mode shares with exact mode (position by
position), and each mode's seconds. Random weights score nothing: the tests run
it on a tiny random checkpoint only to prove that it runs.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

FRUITS = ["fruits", "colours", "animals", "countries", "rivers", "trees"]
NAMES = ["Alice", "Bruno", "Chen", "Dalia", "Emeka", "Fatima", "Goran", "Hana"]
CITIES = ["Paris", "Lima", "Oslo", "Cairo", "Kyoto", "Quito", "Rome", "Perth"]
RECORD = '{"name": "{{hole:6}}", "age": {{hole:3}}, "city": "{{hole:6}}"}'
FUNCTIONS = [
    ("add", "the sum of a and b", "a + b"),
    ("difference", "a minus b", "a - b"),
    ("product", "a times b", "a * b"),
    ("sum_of_squares", "a squared plus b squared", "a * a + b * b"),
    ("average", "the mean of a and b", "(a + b) / 2"),
    ("larger", "the larger of a and b", "max(a, b)"),
]
TEST_INPUTS = [(3, 4), (10, -2), (7, 7)]


@dataclass
class Task:
    kind: str
    run: Callable[[dict[str, Any]], tuple[str, list[int]]]  # sampler params -> (text to check, output tokens)
    check: Callable[[str], bool]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", "-m", required=True, help="checkpoint directory or Hugging Face repo id")
    parser.add_argument("--per-task", type=int, default=5, help="instances of each task (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="makes the tasks and seeds the sampler (default 0)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps at most (default: the model's)")
    parser.add_argument("--max-tokens", type=int, default=64, help="most new tokens per answer (default 64)")
    parser.add_argument("--json", type=str, default=None, help="also write the per-instance results here")
    return parser.parse_args(argv)


def first_number(text: str) -> float | None:
    match = re.search(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
    return float(match.group(0)) if match else None


def safe_expression(text: str) -> ast.Expression | None:
    """`text` (a function's return expression) parsed, if it is arithmetic of `a`, `b`, numbers, max, min, abs."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    try:
        tree = ast.parse(line, mode="eval")
    except SyntaxError:
        return None
    allowed = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Name, ast.Load, ast.Call, ast.operator)
    allowed += (ast.unaryop,)
    for node in ast.walk(tree):
        if not isinstance(node, allowed) or isinstance(node, ast.Pow):  # no powers: 9 ** 9 ** 9 never ends
            return None
        if isinstance(node, ast.Name) and node.id not in ("a", "b", "max", "min", "abs"):
            return None
        if isinstance(node, ast.Constant) and not isinstance(node.value, (int, float)):
            return None
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and not node.keywords):
            return None
    return tree


def computes(expression: str, reference: str) -> bool:
    tree = safe_expression(expression)
    if tree is None:
        return False
    code = compile(tree, "<fill>", "eval")
    functions = {"max": max, "min": min, "abs": abs}
    try:
        return all(
            abs(eval(code, {"__builtins__": {}}, {**functions, "a": a, "b": b}) - eval(reference, {}, {"a": a, "b": b}))
            < 1e-9
            for a, b in TEST_INPUTS
        )
    except (ArithmeticError, TypeError, ValueError):
        return False


def make_tasks(model: Any, tokenizer: Any, count: int, seed: int, max_tokens: int) -> list[Task]:
    from mlx_dgemma import fill_template, generate, infill

    rng = random.Random(seed)

    def answer(prompt: str) -> Callable[[dict[str, Any]], tuple[str, list[int]]]:
        def run(params: dict[str, Any]) -> tuple[str, list[int]]:
            result = generate(model, tokenizer, prompt, max_new_tokens=max_tokens, **params)
            return result.text, result.tokens

        return run

    tasks = []
    for _ in range(count):
        a, b = rng.randint(12, 98), rng.randint(12, 98)
        op = rng.choice("+-")
        value = a + b if op == "+" else a - b
        prompt = f"What is {a} {op} {b}? Answer with the number only."
        tasks.append(Task("arithmetic", answer(prompt), lambda text, v=value: first_number(text) == v))

        code = "-".join("".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(3)) for _ in range(3))
        prompt = f"Repeat this code exactly, and nothing else: {code}"
        tasks.append(Task("copy", answer(prompt), lambda text, c=code: c in text))

        name, city, age = rng.choice(NAMES), rng.choice(CITIES), rng.randint(19, 88)
        prompt = f"{name} is {age} years old and lives in {city}. Fill in the record."
        expected = {"name": name, "age": age, "city": city}

        def fill_record(params: dict[str, Any], prompt: str = prompt) -> tuple[str, list[int]]:
            result = fill_template(model, tokenizer, prompt, RECORD, **params)
            return result.text, result.tokens

        tasks.append(Task("json template", fill_record, lambda text, e=expected: _record(text) == e))

        function, description, body = rng.choice(FUNCTIONS)
        prefix = f'def {function}(a, b):\n    """Return {description}."""\n    return '

        def fill_body(params: dict[str, Any], prefix: str = prefix) -> tuple[str, list[int]]:
            result = infill(model, tokenizer, prefix, "\n", hole_tokens=16, **params)
            return result.fills[0], result.tokens

        tasks.append(Task("infill a function body", fill_body, lambda text, r=body: computes(text, r)))

        items, topic = rng.randint(5, 8), rng.choice(FRUITS)
        prompt = f"Write a numbered list of {items} {topic}, one per line, numbered 1. to {items}."
        numbered = list(range(1, items + 1))
        tasks.append(Task("counted list", answer(prompt), lambda text, n=numbered: _numbering(text) == n))
    return tasks


def _record(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _numbering(text: str) -> list[int]:
    return [int(match.group(1)) for match in re.finditer(r"^\s*(\d+)[.)]", text, flags=re.MULTILINE)]


def shared_tokens(first: list[int], second: list[int]) -> float:
    """The share of positions where both outputs hold the same token (over the longer output)."""
    longest = max(len(first), len(second))
    return 1.0 if longest == 0 else sum(x == y for x, y in zip(first, second)) / longest


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    import mlx_dgemma

    model, tokenizer = mlx_dgemma.load(args.model)
    tasks = make_tasks(model, tokenizer, args.per_task, args.seed, args.max_tokens)
    rows = []
    for index, task in enumerate(tasks):
        row: dict[str, Any] = {"task": task.kind}
        outputs = {}
        for speed in ("exact", "fast"):
            params = {"seed": args.seed + index, "speed": speed, "steps": args.steps}
            params = {key: value for key, value in params.items() if value is not None}
            start = time.perf_counter()
            text, tokens = task.run(params)
            row[f"{speed}_s"] = time.perf_counter() - start
            row[f"{speed}_correct"] = task.check(text)
            row[f"{speed}_text"] = text
            outputs[speed] = tokens
        row["shared"] = shared_tokens(outputs["exact"], outputs["fast"])
        rows.append(row)
        print(f"[bench quality] {task.kind}: exact {row['exact_correct']}, fast {row['fast_correct']}", file=sys.stderr)
    command = "python -m bench quality " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"## Fast mode's quality on {args.model}\n\n`{command}`\n")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"command": command, "rows": rows}, file, indent=2)
    return 0


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| task | n | exact: correct | fast: correct | tokens shared | exact, s | fast, s |",
        "|---|---|---|---|---|---|---|",
    ]
    kinds = list(dict.fromkeys(row["task"] for row in rows))
    for kind in [*kinds, "all"]:
        mine = [row for row in rows if kind in ("all", row["task"])]
        lines.append(
            f"| {kind} | {len(mine)} | {_share(mine, 'exact_correct')} | {_share(mine, 'fast_correct')} "
            f"| {statistics.fmean(row['shared'] for row in mine):.0%} "
            f"| {statistics.fmean(row['exact_s'] for row in mine):.1f} "
            f"| {statistics.fmean(row['fast_s'] for row in mine):.1f} |"
        )
    return "\n".join(lines)


def _share(rows: list[dict[str, Any]], key: str) -> str:
    right = sum(bool(row[key]) for row in rows)
    return f"{right}/{len(rows)} ({right / len(rows):.0%})"


if __name__ == "__main__":
    raise SystemExit(main())
