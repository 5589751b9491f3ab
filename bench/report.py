"""The side-by-side table (Markdown) and the PNG chart."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

Getter = Callable[[dict[str, Any]], Any]


def _get(*path: str) -> Getter:
    def get(result: dict[str, Any]) -> Any:
        value: Any = result
        for key in path:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return value

    return get


def _mlx_peak(result: dict[str, Any]) -> Any:
    memory = (result.get("metrics") or {}).get("memory") or {}
    return memory.get("peak_gb") if "active_gb" in memory else None


def _probe(result: dict[str, Any]) -> Any:
    probes = (result.get("metrics") or {}).get("machine_probe_gflops") or []
    values = [f"{value:.0f}" for _, value in probes if value]
    return " → ".join(values) if values else None


def _cuda_plugin(result: dict[str, Any]) -> Any:
    """Ours only: "on" (applied), "off", or "on (not CUDA: unused)"."""
    env = result.get("env") or {}
    if "cuda_plugin" not in env:
        return None
    if env["cuda_plugin"] != "on" or env.get("cuda_plugin_applied"):
        return env["cuda_plugin"]
    return "on (not CUDA: unused)"


def metric_rows(settings: dict[str, Any]) -> list[tuple[str, Getter, str | None, str]]:
    """(label, getter, better: "lower" | "higher" | None, format)."""
    m = ("metrics",)
    return [
        ("denoising step, s (median of warm steps)", _get(*m, "step_s", "median"), "lower", "{:.3f}"),
        ("  warm step samples", _get(*m, "step_s", "n"), None, "{}"),
        (
            f"tokens/s, {settings['steps']} steps/canvas (adaptive stop off)",
            _get(*m, "fixed_tokens_per_s"),
            "higher",
            "{:.1f}",
        ),
        (
            f"tokens/s, adaptive stopping (cap {settings['adaptive_steps']} steps)",
            _get(*m, "adaptive_tokens_per_s"),
            "higher",
            "{:.1f}",
        ),
        ("  steps/canvas taken, adaptive", _get(*m, "adaptive_steps_per_canvas"), None, "{:.1f}"),
        (
            f"prompt prefill tokens/s (warm, {settings['prompt_tokens']} tokens)",
            _get(*m, "prefill_tokens_per_s"),
            "higher",
            "{:.0f}",
        ),
        ("cold start, s (load + first prefill + first step)", _get(*m, "cold_start_s"), "lower", "{:.2f}"),
        ("  load, s", _get(*m, "load_s"), "lower", "{:.2f}"),
        ("  first prefill, s", _get(*m, "cold_prefill_s"), "lower", "{:.2f}"),
        ("  first step, s", _get(*m, "cold_first_step_s"), "lower", "{:.3f}"),
        ("peak memory: max RSS, GB (whole process)", _get(*m, "memory", "maxrss_gb"), "lower", "{:.3f}"),
        ("  max RSS above RSS after import, GB", _get(*m, "memory", "maxrss_growth_gb"), "lower", "{:.3f}"),
        ("  MLX allocator peak, GB (mx.get_peak_memory)", _mlx_peak, None, "{:.3f}"),
        ("import, s", _get(*m, "import_s"), None, "{:.1f}"),
        ("other processes' CPU load, cores (worst phase)", _get(*m, "foreign_cores_max"), None, "{:.2f}"),
        ("machine probe, GFLOP/s (numpy fp32 matmul at start → end)", _probe, None, "{}"),
        ("OpenBLAS loaded", _get("env", "openblas_loaded"), None, "{}"),
        ("our CUDA plug-in (--cuda-plugin)", _cuda_plugin, None, "{}"),
    ]


def _advantage(ours: Any, theirs: Any, better: str | None) -> str:
    if better is None or not isinstance(ours, (int, float)) or not isinstance(theirs, (int, float)):
        return ""
    if not ours or not theirs:
        return ""
    factor = theirs / ours if better == "lower" else ours / theirs
    return f"{factor:.2f}×"


def _cell(result: dict[str, Any], getter: Getter, fmt: str) -> str:
    value = getter(result)
    if value is None:
        return "—"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def side_by_side(results: dict[str, dict[str, Any]], settings: dict[str, Any]) -> str:
    """Markdown: one column per runtime, and for each peer how many times better we are (>1: we win)."""
    names = list(results)
    peers = [n for n in names if n != "us"]
    header = ["metric", *(["us"] if "us" in results else [])]
    for peer in peers:
        header += [peer, f"us vs {peer}"] if "us" in results else [peer]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    status = ["status"]
    if "us" in results:
        status.append(results["us"].get("status", "?"))
    for peer in peers:
        status.append(results[peer].get("status", "?"))
        if "us" in results:
            status.append("")
    lines.append("| " + " | ".join(status) + " |")
    ours = results.get("us", {})
    for label, getter, better, fmt in metric_rows(settings):
        row = [label]
        if "us" in results:
            row.append(_cell(ours, getter, fmt))
        for peer in peers:
            row.append(_cell(results[peer], getter, fmt))
            if "us" in results:
                row.append(_advantage(getter(ours), getter(results[peer]), better))
        lines.append("| " + " | ".join(row) + " |")
    notes = []
    for name, result in results.items():
        if result.get("error"):
            notes.append(f"- **{name}** {result.get('status')}: {result['error']}")
        for phase, error in (result.get("phase_errors") or {}).items():
            notes.append(f"- **{name}**, phase {phase!r} failed: {error}")
    text = "\n".join(lines)
    text += "\n\n`us vs X`: how many times better we are than X on that line (time and memory: X ÷ us; "
    text += "throughput: us ÷ X); above 1 we win."
    if notes:
        text += "\n\n" + "\n".join(notes)
    return text


def chart(results: dict[str, dict[str, Any]], settings: dict[str, Any], title: str, path: Path) -> Path | None:
    """A PNG with step time and tokens/s; None (with a warning) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("warning: matplotlib is not installed; no chart (pip install matplotlib)", file=sys.stderr)
        return None
    names = list(results)
    colors = {"us": "#1f77b4", "mlx-vlm": "#ff7f0e", "reference": "#2ca02c"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))

    step = [_get("metrics", "step_s", "median")(results[n]) for n in names]
    ax = axes[0]
    bars = ax.bar(names, [s or 0 for s in step], color=[colors.get(n, "grey") for n in names])
    for bar, value, name in zip(bars, step, names):
        label = f"{value:.3f} s" if value else results[name].get("status", "n/a")
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
    ax.set_title("denoising step (s, lower is better)")

    ax = axes[1]
    fixed = [_get("metrics", "fixed_tokens_per_s")(results[n]) or 0 for n in names]
    adaptive = [_get("metrics", "adaptive_tokens_per_s")(results[n]) or 0 for n in names]
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], fixed, width=0.4, label=f"{settings['steps']} steps/canvas")
    ax.bar([x + 0.2 for x in xs], adaptive, width=0.4, label=f"adaptive (cap {settings['adaptive_steps']})")
    ax.set_xticks(list(xs), names)
    ax.set_title("tokens/s (higher is better)")
    ax.legend()

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
