"""The bench harness: `python -m bench --quick` runs every runtime's code path and writes the report;
`python -m bench.moe` times the MoE dispatches."""

from __future__ import annotations

import json

import mlx.core as mx

from bench.cli import main


def test_quick_bench_runs_every_runtime(tmp_path):
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "quick.json").read_text())
    text = json.dumps(report)
    for runtime in ("us", "mlx-vlm", "reference"):
        assert runtime in text
    assert (tmp_path / "quick.md").read_text().count("|") > 20
    assert (tmp_path / "quick.png").stat().st_size > 1000
    # Our step's breakdown: parts timed alone, and ablations of the whole step.
    breakdown = report["runtimes"]["us"]["breakdown"]
    assert not breakdown["errors"]
    from bench.breakdown import ABLATIONS

    assert set(breakdown["ablated_ms"]) == set(ABLATIONS)
    assert all(isinstance(ms, float) for ms in breakdown["ablated_ms"].values())


def test_moe_dispatch_choices_match_the_runtime():
    from bench.cli import MOE_DISPATCHES
    from mlx_dgemma.moe import DISPATCHES

    assert MOE_DISPATCHES == ("auto", *DISPATCHES)


def test_moe_probe_times_every_cpu_dispatch(tmp_path):
    from bench.moe import main as moe_main

    out = tmp_path / "moe.json"
    shape = '{"base": "quick", "moe_intermediate_size": 64, "hidden_size": 128}'
    assert moe_main(["--shape", shape, "--repeats", "2", "--embedding", "--router", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    rows = {(r["dispatch"], r["settings"].get("moe.TILE_ROWS")): r for r in results["dispatches"]}
    # The CPU runs every dispatch but our CUDA kernels, the tiled one at three tile heights.
    tiled = {("tiled", 8), ("tiled", 16), ("tiled", 32)}
    assert set(rows) == {("gather", None), ("grouped", None), ("host", None), *tiled}
    for row in rows.values():
        assert row["error"] is None and row["median_ms"] > 0
        assert row["max_rel_error"] < 1e-5 and row["max_rel_diff_first"] < 1e-5
    assert [r["case"] for r in results["embedding"]] == [
        "head, 8-bit",
        "head, dequantized",
        "self-conditioning, 8-bit",
        "self-conditioning, dequantized",
        *(f"self-conditioning, quantized in {n} slices" for n in (4, 8, 16, 32)),
        *(f"self-conditioning, dequantized in {n} slices" for n in (4, 8, 16)),
    ]
    assert all(r["error"] is None and r["median_ms"] > 0 for r in results["embedding"])
    # Off CUDA the router runs its stock ops only (our top-k kernel is CUDA's), agreeing with itself.
    assert [(r["case"], r["same_experts"], r["max_weight_diff"]) for r in results["router"]] == [
        ("router, stock ops", 1.0, 0.0)
    ]
    assert moe_main(["--shape", shape, "--dispatches", "fused"]) == 1  # CUDA only: a one-line error


def test_step_ab_runs_every_variant(tmp_path):
    from bench.step import main as step_main

    out = tmp_path / "step.json"
    arguments = ["--shape", "quick", "--steps", "3", "--rounds", "1", "--prompt-tokens", "16", "--out", str(out)]
    variants = ["--dispatches", "gather,tiled", "--dense", "quantized,dequantized"]
    vary = ["--vary", "model.SELF_CONDITIONING_PRODUCT=quantized,dequantized:2"]
    assert step_main([*arguments, *variants, *vary]) == 0
    rows = json.loads(out.read_text())["variants"]
    seen = {(r["dispatch"], r["dense"], r["settings"]["model.SELF_CONDITIONING_PRODUCT"]) for r in rows}
    assert len(rows) == len(seen) == 8
    # One warm step per canvas after the first (the first also launches the next), one counted round.
    assert all(not r["errors"] and r["samples"] == 2 and r["median_ms"] > 0 for r in rows)
    # Every launch timed on the host: building the step's graph, then queueing it (mx.async_eval), put back after.
    assert all(r["build_ms"] > 0 and r["encode_ms"] > 0 and len(r["build_s"]) >= r["samples"] for r in rows)
    assert mx.async_eval.__name__ == "async_eval"
    from mlx_dgemma import model as model_module

    assert model_module.SELF_CONDITIONING_PRODUCT is None  # every setting put back
    assert step_main([*arguments, "--vary", "model.NOPE"]) == 1  # a one-line error
    assert step_main([*arguments, "--vary", "env.MLX_MAX_OPS_PER_BUFFER=20,100"]) == 1  # once a process
    assert step_main([*arguments, "--vary", "model.NOPE=1"]) == 1  # no such setting: every variant fails
    assert "no NOPE" in json.loads(out.read_text())["variants"][0]["errors"][0]
    assert not hasattr(model_module, "NOPE")


def test_bench_sets_our_settings(tmp_path):
    arguments = ["--quick", "--runtimes", "us", "--no-breakdown", "--no-adaptive", "--no-chart", "--out", str(tmp_path)]
    setting = "model.SELF_CONDITIONING_PRODUCT=dequantized:2"
    assert main([*arguments, "--set", setting, "--dense-weights", "dequantized"]) == 0
    settings = json.loads((tmp_path / "quick.json").read_text())["settings"]
    assert settings["our_settings"] == {"model.SELF_CONDITIONING_PRODUCT": "dequantized:2"}
    assert settings["dense_weights"] == "dequantized"


def test_our_settings_reach_environment_variables(monkeypatch):
    import os

    from bench.shapes import our_settings

    monkeypatch.delenv("DGEMMA_BENCH_PROBE", raising=False)
    monkeypatch.setenv("DGEMMA_BENCH_KEPT", "before")
    with our_settings({"env.DGEMMA_BENCH_PROBE": 100, "env.DGEMMA_BENCH_KEPT": "during"}):
        assert os.environ["DGEMMA_BENCH_PROBE"] == "100" and os.environ["DGEMMA_BENCH_KEPT"] == "during"
    assert "DGEMMA_BENCH_PROBE" not in os.environ and os.environ["DGEMMA_BENCH_KEPT"] == "before"


def test_launch_costs_time_every_kind_of_op(tmp_path):
    from bench.launch import main as launch_main

    out = tmp_path / "launch.json"
    assert launch_main(["--ops", "3", "--repeats", "1", "--rows", "8", "--hidden", "64", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) >= 10
    assert {"matmul bf16 (cuBLAS on CUDA)", "rms_norm", "reshape (a view)"} <= {r["op"] for r in rows}
    assert all(r["error"] is None and r["queue_us"] > 0 and r["whole_us"] >= r["queue_us"] for r in rows)
