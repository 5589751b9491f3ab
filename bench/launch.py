"""What the host pays to queue one op of each kind: MLX on a GPU sets a step's pace from the host.

    python -m bench.launch              # this device; --ops 200 --repeats 5 by default

On the H200 our denoising step took about 22 ms, of which the host spent ~18
queueing ~1,100 kernels (`mx.async_eval`) and ~3 building the graph, while
the GPU's own work took ~6 (bench/RESULTS.md). This tool builds `--ops`
independent ops of one kind at the released shape's sizes (256 canvas rows,
hidden 2816), then times, per op: building them (Python), queueing them
(`mx.async_eval`) and the whole (until `mx.eval` returns). The medians over
`--repeats` (after one warm-up) say which kinds of op are worth fusing away.
Prints a table and, with --out, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .record import mlx_environment, summary

HEADS, HEAD_DIM, CACHED = 16, 256, 768


def cases(rows: int, hidden: int) -> dict[str, tuple[Callable[[], Any], Callable[[Any], Any]]]:
    """name: (make the inputs, make one op from them), at `rows` canvas rows and `hidden` wide."""
    import mlx.core as mx
    import mlx.nn as nn

    import mlx_dgemma  # noqa: F401  (its import sets our CUDA graph size, as in a real run)
    from mlx_dgemma import kernels

    def normal(*shape):
        return mx.random.normal(shape).astype(mx.bfloat16)

    def activations():
        return normal(rows, hidden), normal(hidden), normal(hidden, hidden)

    def quantized():
        x, _, w = activations()
        return x, *mx.quantize(w, group_size=64, bits=8)

    def heads():
        return (normal(1, HEADS, rows, HEAD_DIM),)

    def buffer():
        return mx.zeros((1, 8, CACHED + rows, HEAD_DIM), dtype=mx.bfloat16), normal(1, 8, rows, HEAD_DIM)

    def cache_write(a):
        return mx.slice_update(a[0], a[1], mx.array([0, 0, CACHED, 0]), (0, 1, 2, 3))

    gelu_times = mx.compile(lambda a, b: nn.gelu_approx(a) * b)
    table = {
        "add (elementwise)": (activations, lambda a: a[0] + a[1]),
        "compiled gelu(x) * y": (activations, lambda a: gelu_times(a[0], a[0])),
        "rms_norm": (activations, lambda a: mx.fast.rms_norm(a[0], a[1], 1e-6)),
        "matmul bf16 (cuBLAS on CUDA)": (activations, lambda a: a[0] @ a[2]),
        "quantized_matmul 8-bit": (
            quantized,
            lambda a: mx.quantized_matmul(a[0], a[1], a[2], a[3], transpose=True, group_size=64, bits=8),
        ),
        "rope": (heads, lambda a: mx.fast.rope(a[0], HEAD_DIM, traditional=False, base=1e4, scale=1.0, offset=512)),
        "softmax (precise)": (heads, lambda a: mx.softmax(a[0], axis=-1, precise=True)),
        "slice_update (cache write)": (buffer, cache_write),
        "reshape (a view)": (heads, lambda a: a[0].reshape(1, HEADS * rows, -1)),
        "transpose + reshape (a copy)": (heads, lambda a: a[0].transpose(0, 2, 1, 3).reshape(1, rows, -1)),
    }
    if kernels.available():
        scores = lambda: (normal(rows, 128), mx.ones((128,), dtype=mx.bfloat16))  # noqa: E731
        table["custom kernel (router top-k)"] = (scores, lambda a: kernels.top_k_routes(a[0], a[1], 8)[1])
    return table


def time_case(make_inputs, make_op, ops: int, repeats: int) -> dict[str, float]:
    import mlx.core as mx

    inputs = make_inputs()
    mx.eval(inputs)
    rounds: dict[str, list[float]] = {"build": [], "queue": [], "whole": []}
    for repeat in range(repeats + 1):
        start = time.perf_counter()
        outputs = [make_op(inputs) for _ in range(ops)]
        built = time.perf_counter()
        mx.async_eval(outputs)
        queued = time.perf_counter()
        mx.eval(outputs)
        done = time.perf_counter()
        if repeat:  # the first round warms up (kernel compiles, allocations)
            rounds["build"].append((built - start) / ops)
            rounds["queue"].append((queued - built) / ops)
            rounds["whole"].append((done - start) / ops)
        del outputs
    return {f"{name}_us": summary(values)["median"] * 1e6 for name, values in rounds.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=200, help="ops of each kind per round")
    parser.add_argument("--repeats", type=int, default=5, help="rounds after the warm-up")
    parser.add_argument("--rows", type=int, default=256, help="canvas rows (the released canvas: 256)")
    parser.add_argument("--hidden", type=int, default=2816, help="hidden width (released: 2816)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)

    import mlx.core as mx

    rows: list[dict[str, Any]] = []
    environment = mlx_environment()
    results = {"device": str(mx.default_device()), "mlx": mx.__version__, "ops": args.ops, "rows": rows}
    print(f"device={results['device']}  mlx={results['mlx']}  ops={args.ops}  {environment}")
    print(f"{'op':<32} {'build µs':>9} {'queue µs':>9} {'whole µs':>9}   (per op)")
    for name, (make_inputs, make_op) in cases(args.rows, args.hidden).items():
        row: dict[str, Any] = {"op": name, "error": None}
        try:
            row.update(time_case(make_inputs, make_op, args.ops, args.repeats))
            print(f"{name:<32} {row['build_us']:>9.1f} {row['queue_us']:>9.1f} {row['whole_us']:>9.1f}")
        except Exception as error:  # one kind failing leaves the others
            row["error"] = f"{type(error).__name__}: {error}"[:300]
            print(f"{name:<32} error: {row['error']}")
        rows.append(row)
    results["mlx_environment"] = environment
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return 0 if all(r["error"] is None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
