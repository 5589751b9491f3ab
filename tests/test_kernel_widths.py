"""The CPU's C kernels built for narrower vectors than this machine's own: host_kernels.c picks its tiles per vector
width (AVX-512, AVX2, 128-bit SSE), and each build must give the numbers tests/test_host_kernels.py checks. Each
width runs that file in a process of its own, its compiler wrapped to drop the wider instructions."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent

# What each wrapper does to the compiler's arguments, and the vector width the build must then report.
WIDTHS = {
    "avx2": ('exec "$COMPILER" "$@" -mno-avx512f', 8),
    "sse": ('for a; do shift; [ "$a" = -march=native ] || set -- "$@" "$a"; done; exec "$COMPILER" "$@"', 4),
}


@pytest.fixture(scope="module")
def compiler() -> str:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the narrower x86 builds are tested on x86-64")
    found = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if found is None:
        assert not os.environ.get("CI"), "CI machines have a C compiler"
        pytest.skip("no C compiler")
    return found


@pytest.mark.parametrize("width", WIDTHS)
def test_kernels_built_narrower_give_the_same_numbers(width, compiler, tmp_path):
    body, lanes = WIDTHS[width]
    wrapper = tmp_path / "cc"
    wrapper.write_text(f"#!/bin/sh\n{body}\n")
    wrapper.chmod(0o755)
    env = {**os.environ, "CC": str(wrapper), "COMPILER": compiler, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    built = subprocess.run(
        [sys.executable, "-c", "from mlx_dgemma import host_kernels; print(host_kernels.vector_lanes())"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.stdout.strip() == str(lanes), built.stderr[-2000:]
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS / "test_host_kernels.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert tests.returncode == 0, tests.stdout[-4000:]
    assert " passed" in tests.stdout and "skipped" not in tests.stdout, tests.stdout[-2000:]
