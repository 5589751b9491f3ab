"""What MLX's CPU backend needs from the process to run the sampler at full speed.

MLX's CPU allocator has no buffer cache: every array is a fresh `malloc`. A
float32 canvas x vocabulary array (256 x 262144 for the released model; 32 MiB
already at vocabulary 32768) is above glibc's largest mmap threshold, so each
one is a new mapping whose zeroed pages fault in on first touch and go back to
the kernel on free. A denoising step makes a dozen such arrays; the page faults
cost more than the arithmetic (measured: an elementwise multiply over 256 x 32768
takes 25 ms with the default policy, 2.6 ms without the mappings).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import mlx.core as mx

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# Free memory kept at the top of the heap instead of being handed back to the
# kernel: a few steps' worth of vocabulary-wide arrays.
_KEEP_FREE_BYTES = 1 << 30

_tuned = False


def reuse_freed_memory() -> bool:
    """On glibc, serve every allocation from the heap so freed arrays are reused, not unmapped.

    Process-wide and idempotent; does nothing off Linux, off glibc, when MLX's
    default device is not the CPU, or when DGEMMA_KEEP_MALLOC is set. Returns
    whether the policy is in effect.
    """
    global _tuned
    if _tuned:
        return True
    if sys.platform != "linux" or os.environ.get("DGEMMA_KEEP_MALLOC") or mx.default_device().type != mx.cpu:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    _tuned = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_FREE_BYTES))
    return _tuned


_streams: list[mx.Stream] = []


def cpu_streams(count: int) -> list[mx.Stream]:
    """The default CPU stream and count - 1 more, created once per process.

    MLX runs each CPU stream's ops on a thread of its own, one op at a time, and
    its elementwise ops use one core: work cut into independent pieces, one per
    stream, keeps every core busy.
    """
    if not _streams:
        _streams.append(mx.default_stream(mx.cpu))
    while len(_streams) < count:
        _streams.append(mx.new_stream(mx.cpu))
    return _streams[:count]


def cpu_cores() -> int:
    return os.cpu_count() or 1
