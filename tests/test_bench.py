"""`python -m bench --quick`: every runtime's code path runs and the report is written."""

from __future__ import annotations

import json

from bench.cli import main


def test_quick_bench_runs_every_runtime(tmp_path):
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "quick.json").read_text())
    text = json.dumps(report)
    for runtime in ("us", "mlx-vlm", "reference"):
        assert runtime in text
    assert (tmp_path / "quick.md").read_text().count("|") > 20
    assert (tmp_path / "quick.png").stat().st_size > 1000
