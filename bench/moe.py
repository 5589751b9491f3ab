"""One MoE experts block under every dispatch this device can run: time and error against float32.

    python -m bench.moe                            # the bench shape, float32
    python -m bench.moe --shape released --bits 4  # the released shape, 4-bit, bf16 (GPU)

Builds the experts of one layer with random weights (the bench's synthetic
weights: quantized by the converter's recipe when --bits is given), routes
`--tokens` random tokens to random top-k experts, and runs `Experts` under
each dispatch of `mlx_dgemma.moe` (the tiled ones at several tile heights, see
VARIANTS).
The reference is the same block in float32 from the dequantized weights,
one expert at a time; each dispatch is also compared with the first
(gather, unless --dispatches says otherwise). Prints a table and, with --out, writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .record import summary, time_repeated
from .shapes import parse_shape, set_our_settings

# Settings each dispatch is timed under: module attributes of mlx_dgemma ("module.NAME") and their values.
VARIANTS = {
    "tiled": [{"moe.TILE_ROWS": rows} for rows in (8, 16, 32)],
    "fused": [
        {"moe.KERNEL_TILE_ROWS": rows, "kernels.FUSED_MATMUL": matmul}
        for matmul in ("staged", "registers")
        for rows in (16, 32)
    ],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.moe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="bench", help="a preset or JSON, as for python -m bench")
    parser.add_argument("--bits", type=int, choices=(4, 8), help="quantize the experts (default: the shape's)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: the shape's")
    parser.add_argument("--tokens", type=int, help="tokens routed (default: the shape's canvas)")
    parser.add_argument("--dispatches", help="comma-separated dispatches to time (default: every one the device runs)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--embedding", action="store_true", help="also time the tied embedding's two matmuls")
    parser.add_argument("--router", action="store_true", help="also time the router: stock ops, and our kernel (CUDA)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here (rewritten after every row)")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}

    def save() -> None:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2))

    try:
        run(args, results, save)
    except Exception as error:  # a one-line reason, not a traceback
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    rows = results["dispatches"] + results.get("embedding", []) + results.get("router", [])
    return 0 if all(r.get("error") is None for r in rows) else 1


def run(args: argparse.Namespace, results: dict[str, Any], save) -> None:
    """Fills `results` (header, then one row per dispatch), calling `save` after each row."""
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_dgemma import moe
    from mlx_dgemma.config import ModelConfig
    from mlx_dgemma.cpu import RowBlocks

    from . import synthetic

    shape = parse_shape(args.shape)
    bits = args.bits if args.bits is not None else shape.bits
    dtype = synthetic.DTYPES[args.dtype or shape.dtype]
    config = ModelConfig.from_dict(shape.config_dict()).text
    tokens = args.tokens or shape.canvas_length

    experts = moe.Experts(config)
    if bits is not None:
        nn.quantize(
            experts, group_size=shape.group_size, bits=bits, class_predicate=lambda _, m: hasattr(m, "to_quantized")
        )
    synthetic.randomize(experts, dtype, args.seed)
    key_x, key_scores, key_weights = mx.random.split(mx.random.key(args.seed), 3)
    x = mx.random.normal((tokens, config.hidden_size), key=key_x).astype(dtype)
    k = config.top_k_experts
    scores = mx.random.normal((tokens, config.num_experts), key=key_scores)
    indices = mx.argpartition(-scores, kth=k - 1, axis=-1)[:, :k]
    weights = mx.softmax(mx.random.normal((tokens, k), key=key_weights), axis=-1)
    mx.eval(x, indices, weights)
    reference = _reference(experts, x, indices, weights)

    blocks = RowBlocks(tokens)
    xs, index_blocks, weight_blocks = (blocks.split(a, axis=0) for a in (x, indices, weights))
    # The "host" dispatch runs a copy holding the weights packed, as load_model leaves them on the CPU; the other
    # dispatches keep the stacks as they are.
    packed = copy.copy(experts)
    runs_packed = "host" in moe.available_dispatches() and packed.pack_for_host()

    def forward() -> mx.array:
        block = packed if moe.moe_dispatch() == "host" else experts
        return RowBlocks.join(block(blocks, xs, index_blocks, weight_blocks), axis=0)

    header = {
        "device": str(mx.default_device()),
        "mlx": mx.__version__,
        "shape": shape.name,
        "tokens": tokens,
        "experts": config.num_experts,
        "top_k": k,
        "hidden": config.hidden_size,
        "moe_intermediate": config.moe_intermediate_size,
        "bits": bits,
        "dtype": str(dtype),
    }
    print("  ".join(f"{key}={value}" for key, value in header.items()))
    results.update(header, dispatches=[])
    rows = results["dispatches"]
    print(f"{'dispatch':<28} {'median ms':>10} {'min ms':>8} {'max rel. error':>15} {'vs first':>10}")
    first = None
    dispatches = tuple(d for d in moe.available_dispatches() if d != "host" or runs_packed)
    if args.dispatches:
        asked = args.dispatches.split(",")
        unknown = [d for d in asked if d not in dispatches]
        if unknown:
            raise ValueError(f"--dispatches: {', '.join(unknown)} cannot run here; choose from {', '.join(dispatches)}")
        dispatches = tuple(asked)
    for dispatch in dispatches:
        for settings in VARIANTS.get(dispatch, [{}]):
            label = ", ".join(f"{v} rows" if k.endswith("ROWS") else str(v) for k, v in settings.items())
            name = f"{dispatch} ({label})" if label else dispatch
            row: dict[str, Any] = {"dispatch": dispatch, "settings": settings, "error": None}
            previous: dict[str, Any] = {}
            try:
                moe.set_moe_dispatch(dispatch)
                previous = set_our_settings(settings)
                out = forward()
                mx.eval(out)
                out = out.astype(mx.float32)
                first = out if first is None else first
                scale = mx.abs(reference).max()
                row["max_rel_error"] = float(mx.abs(out - reference).max() / scale)
                row["max_rel_diff_first"] = float(mx.abs(out - first).max() / scale)
                times = summary(time_repeated(forward, mx.eval, args.repeats, warmup=2))
                row.update(median_ms=times["median"] * 1e3, min_ms=times["min"] * 1e3)
                print(
                    f"{name:<28} {row['median_ms']:>10.3f} {row['min_ms']:>8.3f} {row['max_rel_error']:>15.2e}"
                    f" {row['max_rel_diff_first']:>10.2e}"
                )
            except Exception as error:
                row["error"] = f"{type(error).__name__}: {error}"
                print(f"{name:<28} error: {row['error'][:300]}")
            finally:
                moe.set_moe_dispatch(None)
                set_our_settings(previous)
            rows.append(row)
            save()
            sys.stdout.flush()
    if args.embedding:
        _embedding_parts(config, shape, tokens, dtype, args.repeats, save, results)
    if args.router:
        _router_parts(config, tokens, dtype, args, save, results)


def _router_parts(config, tokens: int, dtype, args, save, results) -> None:
    """One layer's router (projection, top-k, weights) with stock ops and, on CUDA, with our top-k kernel:
    time, whether both choose the same experts for every token, and the largest weight difference."""
    import mlx.core as mx

    from mlx_dgemma import kernels, moe

    from . import synthetic

    router = moe.Router(config)  # our converter keeps the router in the float dtype, unquantized
    synthetic.randomize(router, dtype, args.seed)
    x = mx.random.normal((tokens, config.hidden_size), key=mx.random.key(args.seed + 7)).astype(dtype)
    rows: list[dict[str, Any]] = []
    results["router"] = rows
    print(f"{'router':<28} {'median ms':>10} {'same experts':>13} {'max weight diff':>16}")
    first = None
    for use_kernel in (False, True) if kernels.available() else (False,):
        name = "router, our top-k kernel" if use_kernel else "router, stock ops"
        row: dict[str, Any] = {"case": name, "error": None}
        previous = set_our_settings({"moe.ROUTER_KERNEL": use_kernel})
        try:
            indices, weights = router(x)
            order = mx.argsort(indices, axis=-1)  # the kernel lists the best first; argpartition in no order
            chosen = (mx.take_along_axis(indices, order, -1), mx.take_along_axis(weights, order, -1))
            mx.eval(chosen)
            first = chosen if first is None else first
            row["same_experts"] = float(mx.all(chosen[0] == first[0], axis=-1).mean())
            row["max_weight_diff"] = float(mx.abs(chosen[1] - first[1]).max())
            times = summary(time_repeated(lambda: router(x), mx.eval, args.repeats, warmup=2))
            row["median_ms"] = times["median"] * 1e3
            print(f"{name:<28} {row['median_ms']:>10.3f} {row['same_experts']:>13.4f} {row['max_weight_diff']:>16.2e}")
        except Exception as error:
            row["error"] = f"{type(error).__name__}: {error}"
            print(f"{name:<28} error: {row['error'][:300]}")
        finally:
            set_our_settings(previous)
        rows.append(row)
        save()


def _embedding_parts(config, shape, tokens: int, dtype, repeats: int, save, results) -> None:
    """The head (hidden @ E.T) and self-conditioning (probs @ E) matmuls, with E quantized at 8 bits and as floats."""
    import mlx.core as mx

    vocab, hidden = config.vocab_size, config.hidden_size
    table = (mx.random.normal((vocab, hidden), key=mx.random.key(1)) * hidden**-0.5).astype(dtype)
    packed, scales, biases = mx.quantize(table, group_size=shape.group_size, bits=8)
    dense = mx.dequantize(packed, scales, biases, group_size=shape.group_size, bits=8).astype(dtype)
    x = mx.random.normal((tokens, hidden), key=mx.random.key(2)).astype(dtype)
    probs = mx.softmax(mx.random.normal((tokens, vocab), key=mx.random.key(3)), axis=-1).astype(dtype)
    mx.eval(packed, scales, biases, dense, x, probs)

    def quantized(a, transpose):
        return mx.quantized_matmul(a, packed, scales, biases, transpose=transpose, group_size=shape.group_size, bits=8)

    from mlx_dgemma.model import embedding_product

    embedding = SimpleNamespace(weight=packed, scales=scales, biases=biases, group_size=shape.group_size, bits=8)
    embedding.mode = "affine"
    embedding.get = lambda name: getattr(embedding, name)
    cases = {
        "head, 8-bit": lambda: quantized(x, True),
        "head, dequantized": lambda: x @ dense.T,
        "self-conditioning, 8-bit": lambda: quantized(probs, False),
        "self-conditioning, dequantized": lambda: probs @ dense,
        **{
            f"self-conditioning, {how.replace(':', ' in ')} slices": partial(embedding_product, probs, embedding, how)
            for how in (*(f"quantized:{n}" for n in (4, 8, 16, 32)), *(f"dequantized:{n}" for n in (4, 8, 16)))
        },
    }
    rows: list[dict[str, Any]] = []
    results["embedding"] = rows
    print(f"{'embedding matmul':<48} {'median ms':>10}")
    for name, case in cases.items():
        row: dict[str, Any] = {"case": name, "error": None}
        try:
            times = summary(time_repeated(case, mx.eval, repeats, warmup=2))
            row["median_ms"] = times["median"] * 1e3
            print(f"{name:<48} {row['median_ms']:>10.3f}")
        except Exception as error:
            row["error"] = f"{type(error).__name__}: {error}"
            print(f"{name:<48} error: {row['error'][:300]}")
        rows.append(row)
        save()


def _reference(experts, x, indices, weights):
    """The block in float32 from dequantized weights, one expert at a time."""
    import mlx.core as mx

    x32 = x.astype(mx.float32)
    out = mx.zeros(x.shape, dtype=mx.float32)
    for expert in range(experts.gate_up_proj.num_experts):
        gate_up, down = (_dequantized(layer, expert) for layer in (experts.gate_up_proj, experts.down_proj))
        share = (weights * (indices == expert)).sum(axis=-1).astype(mx.float32)
        hidden = experts._glu(x32 @ gate_up.T)
        out = out + share[:, None] * (hidden @ down.T)
        mx.eval(out)
    return out


def _dequantized(layer, expert: int):
    import mlx.core as mx

    if not hasattr(layer, "scales"):
        return layer.weight[expert].astype(mx.float32)
    biases = layer.get("biases")
    return mx.dequantize(
        layer.weight[expert],
        layer.scales[expert],
        None if biases is None else biases[expert],
        group_size=layer.group_size,
        bits=layer.bits,
        mode=getattr(layer, "mode", "affine"),
    ).astype(mx.float32)


if __name__ == "__main__":
    sys.exit(main())
