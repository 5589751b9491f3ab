"""`python -m bench serve`: both ways of sharing the model measured through live servers, with one-at-a-time."""

from __future__ import annotations

import json

from bench.cli import main


def test_quick_serve_bench_measures_every_way_and_the_head_of_line_case(tmp_path, capsys):
    out = tmp_path / "serve.json"
    argv = ["serve", "--clients", "1,2", "--rounds", "1", "--repeats", "1", "--steps", "2", "--canvas", "16"]
    assert main([*argv, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [level["clients"] for level in report["levels"]] == [1, 2]
    for level in report["levels"]:
        for way in ("turns", "batch", "alone"):
            assert level[way]["tokens_per_s"] > 0 and level[way]["median_first_canvas_s"] > 0, (level, way)
            assert len(level[way]["first_canvas_s"]) == level["clients"] and min(level[way]["first_canvas_s"]) > 0
    head_of_line = report["head_of_line"]
    assert head_of_line["canvas_s"] > 0 and head_of_line["canvases"] > 0
    printed = capsys.readouterr().out
    assert "| clients | tokens/s, taking turns | tokens/s, one batch |" in printed and "| 2 |" in printed
    assert "A short infill behind a long chat reply" in printed
