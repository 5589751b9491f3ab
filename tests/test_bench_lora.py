"""`python -m bench lora`: `dgemma lora` trained for a few steps at a shape, its rates, peak and plan reported."""

from __future__ import annotations

import json

from bench import lora
from bench.cli import main


def test_quick_lora_bench_trains_both_modes_and_reports_rates_peaks_and_plans(tmp_path):
    assert main(["lora", "--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "quick.json").read_text())
    assert report["iters"] == 2 and report["lora_rank"] == 8
    # The records hit the token targets (a word is a few tokens: at most a few over).
    assert all(40 <= n <= 46 for n in report["data"]["prompt_tokens"])
    assert all(12 <= n <= 18 for n in report["data"]["answer_tokens"])
    assert list(report["modes"]) == ["plain", "checkpoint"]
    for mode, result in report["modes"].items():
        assert result["status"] == "ok", (mode, result.get("error"))
        assert "--lora-rank 8" in result["command"] and "--batch-size 1" in result["command"]
        assert ("--grad-checkpoint" in result["command"]) == (mode == "checkpoint")
        assert [s["iteration"] for s in result["steps"]] == [1, 2]
        assert result["tokens_per_second"] == result["steps"][1]["tokens_per_second"] > 0
        assert result["peak_memory"] > 0 and result["max_rss"] > result["peak_memory"]
        plan = result["plan"]
        assert plan["grad_checkpoint"] == (mode == "checkpoint") and plan["batch"] == 1
        assert plan["tokens"] == report["data"]["longest"]
        assert 0.5 < plan["total"] / result["peak_memory"] < 3, (mode, plan["line"])
    assert report["modes"]["checkpoint"]["plan"]["total"] < report["modes"]["plain"]["plan"]["total"]
    # The released shape's plan: 4 bits, rank 8, batch 1; it fits a 32 GB Mac with checkpointing at 2048 tokens.
    default = report["released"][1]
    assert default["length"] == 2048 and default["checkpoint"]["fits_32gb_mac"]
    assert not default["plain"]["fits_32gb_mac"]
    assert 15e9 < default["checkpoint"]["weights"] < 16e9
    markdown = (tmp_path / "quick.md").read_text()
    assert "`python -m bench lora --quick" in markdown and "Machine:" in markdown
    assert "| mode | tokens/s | s/step | MLX peak (measured) | max RSS | plan's estimate | plan ÷ peak |" in markdown
    assert "| without --grad-checkpoint |" in markdown and "| with --grad-checkpoint |" in markdown
    assert "| default --max-seq-length: 2048 tokens, 2047 response |" in markdown


def test_progress_and_plan_lines_are_parsed():
    run = {
        "lines": [
            (0.5, "memory plan: 1.2 GB of this machine's 25.3 GB (physical RAM) = weights 1 GB + adapter ... for "
             "batch 1 x 712 tokens, with gradient checkpointing"),
            (9.0, "iter 1/3 · train loss 15.466 (diffusion 7.601, ar 7.865) · lr 1.00e-05 · 9 tokens/s · "
             "peak 10.0 MB · ETA 10s"),
            (11.0, "iter 2/3 · train loss 14.366 (diffusion 6.933, ar 7.433) · lr 1.00e-05 · 1,377 tokens/s · "
             "peak 1.4 GB · ETA 2s"),
            (14.0, "iter 3/3 · train loss 14.0 (diffusion 6.9, ar 7.1) · lr 1.00e-05 · 1,000 tokens/s · "
             "peak 1.5 GB · ETA 0s"),
        ]
    }  # fmt: skip
    parsed = lora.parse_run(run)
    assert parsed["plan"]["total"] == 1_200_000_000 and parsed["plan"]["tokens"] == 712
    assert parsed["plan"]["grad_checkpoint"]
    assert [s["step_s"] for s in parsed["steps"]] == [None, 2.0, 3.0]
    assert parsed["tokens_per_second"] == 1188.5 and parsed["step_s"] == 2.5
    assert parsed["peak_memory"] == 1_500_000_000 and parsed["first_tokens_per_second"] == 9
