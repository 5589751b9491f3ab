"""Timing helpers and the incrementally written result of one worker."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class Skip(Exception):
    """This runtime cannot run this configuration (or is not installed); not a failure."""


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summary(values: list[float]) -> dict[str, Any]:
    """Median, min, max and the samples of a list of timings."""
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0, "samples": []}
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "samples": [round(v, 6) for v in values],
    }


def maxrss_gb() -> float:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1e9 if sys.platform == "darwin" else 1e6)


def current_rss_gb() -> float | None:
    """Resident set size now (Linux), or None where /proc is missing."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e9


def openblas_loaded() -> bool:
    """Whether an OpenBLAS library is mapped into this process."""
    try:
        return "libopenblas" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def log(runtime: str, message: str) -> None:
    print(f"[{runtime}] {message}", file=sys.stderr, flush=True)


class Recorder:
    """A worker's result, rewritten atomically after every phase so a crash or timeout keeps what was measured."""

    def __init__(self, path: str | Path, runtime: str):
        self.path = Path(path)
        self.runtime = runtime
        self.data: dict[str, Any] = {
            "runtime": runtime,
            "status": "running",
            "error": None,
            "metrics": {},
            "phases": {},
            "phase_errors": {},
            "env": {},
        }
        self.save()

    @property
    def metrics(self) -> dict[str, Any]:
        return self.data["metrics"]

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)

    @contextlib.contextmanager
    def phase(self, name: str, required: bool = False) -> Iterator[None]:
        """Time a phase; an error in an optional phase is recorded and the run goes on."""
        log(self.runtime, f"{name} ...")
        start = time.perf_counter()
        try:
            yield
        except Skip:
            raise
        except Exception as error:  # a failing phase must not lose the others
            detail = f"{type(error).__name__}: {error}"
            self.data["phase_errors"][name] = detail
            self.data["phases"][name] = time.perf_counter() - start
            log(self.runtime, f"{name} FAILED: {detail}")
            traceback.print_exc(file=sys.stderr)
            self.save()
            if required:
                raise
            return
        elapsed = time.perf_counter() - start
        self.data["phases"][name] = elapsed
        log(self.runtime, f"{name} done in {elapsed:.1f} s")
        self.save()
