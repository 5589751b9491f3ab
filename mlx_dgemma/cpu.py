"""What MLX's CPU backend needs to run a step at full speed: reused memory, its cores, a fast exp.

Cores: MLX runs each CPU stream's ops on a thread of its own, one op at a time,
and its elementwise ops on one core. The model and the sampler therefore cut
the positions of a chunk or canvas into row blocks (`RowBlocks`), one per
core, each on its own stream, and a BLAS loaded into the process is held to
one thread per call (`one_blas_thread`) so the blocks' matmuls do not fight
over the cores.

Memory: MLX's CPU allocator has no buffer cache: every array is a fresh `malloc`. A
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
import math
import os
import sys
from collections.abc import Callable

import mlx.core as mx

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# Free memory kept at the top of the heap instead of being handed back to the
# kernel: a few steps' worth of vocabulary-wide arrays.
_KEEP_FREE_BYTES = 1 << 30

_tuned = False


def on_cpu() -> bool:
    """Whether MLX's default device is the CPU: the test every CPU-only path here makes."""
    return mx.default_device().type == mx.cpu


def reuse_freed_memory() -> bool:
    """On glibc, serve every allocation from the heap so freed arrays are reused, not unmapped.

    Process-wide and idempotent; does nothing off Linux, off glibc, when MLX's
    default device is not the CPU, or when DGEMMA_KEEP_MALLOC is set. Returns
    whether the policy is in effect.
    """
    global _tuned
    if _tuned:
        return True
    if sys.platform != "linux" or os.environ.get("DGEMMA_KEEP_MALLOC") or not on_cpu():
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
    """Cores to spread CPU work over (the row blocks of a step, the C kernels' threads): those this process may
    run on (`taskset`, a container's cpuset), where the system says."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def one_blas_thread() -> bool:
    """Make an OpenBLAS loaded into this process run each call on the calling thread alone.

    The CPU path already runs one row block per core, each on its own stream
    (see RowBlocks); a BLAS that also spreads every call over all the cores
    would put two threads on each. Does nothing when MLX's default device is not
    the CPU, on one core, or when no OpenBLAS is loaded globally (MLX's own CPU
    BLAS, Accelerate). Returns whether the setting was made.
    """
    if not on_cpu() or cpu_cores() < 2:
        return False
    try:
        set_threads = ctypes.CDLL(None).openblas_set_num_threads
    except (OSError, AttributeError):
        return False
    set_threads(1)
    return True


class RowBlocks:
    """Positions (tokens) cut into blocks, each block's work on a stream of its own.

    MLX runs each CPU stream on a thread of its own, and its elementwise ops on
    one core. Everything in a step but attention's mixing of positions is
    independent per position, so on the CPU the positions are cut into one
    block per core and each block's ops run on its own stream: every core stays
    busy, and every op gives the same numbers as over the whole. Elsewhere (a
    GPU runs each op over every position already) one block on the default stream.
    """

    def __init__(self, length: int, count: int | None = None):
        count = block_count(length) if count is None else count
        edges = even_cuts(length, count)
        self.rows = [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]
        self.streams = cpu_streams(count) if count > 1 else [mx.default_stream(mx.default_device())]

    @classmethod
    def whole(cls, length: int) -> RowBlocks:
        """Every position in one block, on the default stream."""
        return cls(length, count=1)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def starts(self) -> list[int]:
        return [rows.start for rows in self.rows]

    def map(self, function: Callable[..., object], *per_block: list) -> list:
        """[function(*arguments of block i) for each block i], each call on its block's stream."""
        results = []
        for stream, *arguments in zip(self.streams, *per_block):
            with mx.stream(stream):
                results.append(function(*arguments))
        return results

    def split(self, x: mx.array, axis: int = 1) -> list[mx.array]:
        """x cut along `axis` into the blocks' positions."""
        index = [slice(None)] * axis
        return [x[(*index, rows)] for rows in self.rows]

    @staticmethod
    def join(blocks: list[mx.array], axis: int = 1) -> mx.array:
        """The blocks put back together along `axis`."""
        return blocks[0] if len(blocks) == 1 else mx.concatenate(blocks, axis=axis)


def even_cuts(length: int, parts: int) -> list[int]:
    """The parts + 1 boundaries cutting `length` items into `parts` runs whose sizes differ by at most one."""
    return [length * i // parts for i in range(parts + 1)]


def block_count(length: int) -> int:
    """Row blocks for `length` positions: on the CPU one per core, up to 8, of 16 positions or more; else 1."""
    if not on_cpu():
        return 1
    return max(1, min(cpu_cores(), 8, length // 16))


LOG2_E = math.log2(math.e)
# Arguments are floored here (e^-inf included): e^-87 ≈ 1.6e-38, nothing a sum notices.
_EXP_FLOOR = -87.0
# The largest argument whose 2^n the exponent bits still hold (e^88 ≈ 1.65e38).
_EXP_CEILING = 88.0
# Adding and subtracting 1.5 · 2^23 rounds a float32 to the nearest integer.
_ROUNDER = 12582912.0
# 2^f on [-0.5, 0.5]: a degree-5 least-squares fit through 2^0 = 1 (so e^0 is exactly 1), relative error 2e-7.
_EXP2_COEFFICIENTS = (
    1.0,
    0.6931468559416913,
    0.2402223800274111,
    0.05550892952451219,
    0.009671697938398751,
    0.0013218672481612153,
)


def exp(x: mx.array, saturate: bool = False) -> mx.array:
    """e^x for x up to 88 (softmax arguments: shifted by their maximum); with `saturate`, e^88 above that.

    On the CPU, for float32: MLX's CPU `exp` runs about 12 ns an element there
    (`power(2, ·)` 4.4 ns), while a fused kernel of plain arithmetic runs near
    memory speed. So 2^(x·log2 e) is split into 2^n, built from its exponent
    bits, times a polynomial for 2^f: 2.5–4× faster, within 3e-7 relative for |x| < 1
    (rounding x·log2 e to float32 adds 8e-8·|x|, as with `power`).
    """
    if not on_cpu() or x.dtype != mx.float32:
        return mx.exp(x)
    return _exp_kernel(mx.clip(x, _EXP_FLOOR, _EXP_CEILING) if saturate else mx.maximum(x, _EXP_FLOOR))


@mx.compile
def _exp_kernel(x: mx.array) -> mx.array:
    # Kept to a few elementwise ops that MLX's CPU compiler fuses and vectorises:
    # no min/max/select inside (they stop the vectorising), the floor applied before.
    c0, c1, c2, c3, c4, c5 = _EXP2_COEFFICIENTS
    y = x * LOG2_E
    n = (y + _ROUNDER) - _ROUNDER
    f = y - n
    f2 = f * f
    fraction = (c0 + c1 * f) + f2 * ((c2 + c3 * f) + f2 * (c4 + c5 * f))
    whole = ((n.astype(mx.int32) + 127) << 23).view(mx.float32)
    return fraction * whole
