"""The bench harness: `python -m bench --quick` runs every runtime's code path and writes the report."""

from __future__ import annotations

import json
import types

import pytest

from bench.cli import REMOVED_OPTIONS, main

CUDA_PLUGIN_ROW = "| our CUDA plug-in (--cuda-plugin) |"


def test_quick_bench_runs_every_runtime(tmp_path):
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "quick.json").read_text())
    runtimes = report["runtimes"]
    assert list(runtimes) == ["us", "mlx-vlm", "reference"]
    for name, result in runtimes.items():
        assert result["status"] in ("ok", "skipped"), (name, result.get("error"))
    ours = runtimes["us"]
    assert ours["status"] == "ok"
    metrics = ours["metrics"]
    assert metrics["step_s"]["median"] > 0 and metrics["step_s"]["n"] > 0
    assert metrics["fixed_tokens_per_s"] > 0 and metrics["adaptive_tokens_per_s"] > 0
    assert all(run["tokens"] == report["shape"]["canvas_length"] for run in metrics["fixed_runs"])
    # The plug-in's switch, on by default, recorded with whether it applied (only on CUDA).
    assert report["settings"]["cuda_plugin"] is True
    assert ours["env"]["cuda_plugin"] == "on"
    assert isinstance(ours["env"]["cuda_plugin_applied"], bool)
    # Nothing of the removed machinery in the settings or the runtimes' results.
    text = json.dumps([report["settings"], runtimes])
    for gone in ("breakdown", "moe_dispatch", "cpu_kernel_lanes", "our_settings", "dense_weights"):
        assert gone not in text
    markdown = (tmp_path / "quick.md").read_text()
    assert markdown.count("|") > 20 and CUDA_PLUGIN_ROW in markdown
    assert "breakdown" not in markdown.lower() and "vector width" not in markdown
    assert (tmp_path / "quick.png").stat().st_size > 1000


def test_ours_on_synthetic_weights_with_the_cuda_plugin_off(tmp_path):
    arguments = ["--quick", "--runtimes", "us", "--synthetic", "--bits", "4", "--no-adaptive", "--no-chart"]
    assert main([*arguments, "--repeats", "2", "--cuda-plugin", "off", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "quick.json").read_text())
    ours = report["runtimes"]["us"]
    assert ours["status"] == "ok" and ours["metrics"]["fixed_tokens_per_s"] > 0
    assert report["shape"]["source"] == "synthetic" and report["shape"]["bits"] == 4
    assert report["settings"]["cuda_plugin"] is False
    assert ours["env"]["cuda_plugin"] == "off" and ours["env"]["cuda_plugin_applied"] is False
    assert f"{CUDA_PLUGIN_ROW} off |" in (tmp_path / "quick.md").read_text()
    assert not (tmp_path / "quick.png").exists()


@pytest.mark.parametrize("option", sorted(REMOVED_OPTIONS))
def test_removed_options_are_refused_with_the_reason(option, capsys, tmp_path):
    for argument in ([option, "x"], [f"{option}=x"]):
        with pytest.raises(SystemExit) as exit_:
            main(["--quick", "--out", str(tmp_path), *argument])
        assert exit_.value.code == 2
        assert f"error: {option} was removed: " in capsys.readouterr().err
    assert not (tmp_path / "quick.json").exists()


def test_cuda_plugin_takes_on_or_off(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--quick", "--cuda-plugin", "auto"])
    assert exit_.value.code == 2
    assert "--cuda-plugin: invalid choice: 'auto'" in capsys.readouterr().err


def test_ops_subcommand_goes_to_bench_ops(monkeypatch):
    seen = []
    module = types.ModuleType("bench.ops")
    module.main = lambda argv: seen.append(argv) or 7
    monkeypatch.setitem(__import__("sys").modules, "bench.ops", module)
    assert main(["ops", "--anything", "x"]) == 7
    assert seen == [["--anything", "x"]]


def test_kernel_check_writes_every_cuda_kernel():
    from bench.kernel_check import kernel_source, variants
    from mlx_dgemma.backends import cuda_kernels

    names = set()
    for kernel, dtypes, template in variants():
        source = kernel_source(kernel, dtypes, template)
        assert f"__global__ void custom_kernel_{kernel.name}(" in source and kernel.source in source
        names.add(kernel.name)
    expected = [*cuda_kernels.FUSED_QMM.values(), cuda_kernels.MOE_LAYOUT, cuda_kernels.MOE_COMBINE]
    assert names == {kernel.name for kernel in [*expected, cuda_kernels.ROUTER_TOP_K]}
