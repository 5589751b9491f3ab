"""A step's vocabulary-wide math on the CPU, in numpy.

MLX's Linux CPU wheel is built for baseline x86-64: its elementwise kernels,
the ones `mx.compile` writes included, are 4-wide SSE, and its reductions over
the last axis take about 1 ns an element. numpy picks AVX2 / AVX-512 loops at
run time: its float32 exp, tanh and log take 0.4–0.6 ns an element on this
machine, 5× faster than the CPU's fast `exp` in `cpu.py`. So once the head's
logits exist (computed in C over the packed embedding table, host_kernels, or
by MLX), numpy reads them in place and runs the soft-cap,
the temperature, the softmax, the entropy, the argmax and the draw of the
accepted positions: a few rows at a time, so that every pass over them stays
in the core's cache, one thread per row block (numpy lets go of the GIL inside
its loops). Two row blocks of 128 × 32768 took 17 ms this way against 52 ms in
MLX on two CPU streams.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from .cpu import cpu_cores

# Rows per pass: 8 rows of a 32768-word vocabulary are 1 MiB an array, what a core's L2 cache holds.
CHUNK_ROWS = 8

_pool: ThreadPoolExecutor | None = None


def _forget_pool() -> None:
    # A forked child has none of the parent's threads: it makes a pool of its own on first use.
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def in_parallel(function: Callable[..., Any], *per_task: Sequence) -> list:
    """[function(*arguments of task i) for each task i], the tasks spread over one thread per core."""
    global _pool
    tasks = list(zip(*per_task))
    if len(tasks) < 2:
        return [function(*arguments) for arguments in tasks]
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=cpu_cores(), thread_name_prefix="dgemma-vocab")
    return list(_pool.map(lambda arguments: function(*arguments), tasks))


def row_chunks(rows: int) -> list[slice]:
    """`rows` rows cut into passes of CHUNK_ROWS."""
    return [slice(start, min(start + CHUNK_ROWS, rows)) for start in range(0, rows, CHUNK_ROWS)]


@dataclass
class RowsVocab:
    """What a step needs from some positions' logits, one row per position."""

    processed: np.ndarray  # (rows, vocab): the soft-capped logits / temperature
    argmax: np.ndarray  # (rows,) uint32: argmax(processed), the draft
    entropy: np.ndarray  # (rows,) float32: entropy of softmax(processed)
    probs: np.ndarray | None  # (rows, vocab): softmax(processed), when asked for


def vocab_math(
    logits: np.ndarray,
    cap: float | None,
    temperature: float,
    probs: np.ndarray | None = None,
    processed: np.ndarray | None = None,
) -> RowsVocab:
    """cap · tanh(logits / cap) / temperature and its argmax, entropy and (into `probs`, when given) softmax,
    per row. `processed` (rows, vocab), when given, receives the processed logits; else a new array does.

    The caller may pass arrays it keeps from step to step (probs in memory MLX
    owns, so the next step reads them without a copy). The soft-cap and the
    division round as the reference's do. The entropy is log Σe − Σ(e·s)/Σe
    with s = x − max x and e = exp(s): −Σ p log p from one pass of
    exponentials, the maximum read at the argmax.
    """
    rows, vocab = logits.shape
    if processed is None:
        processed = np.empty_like(logits, dtype=np.float32)
    argmax = np.empty(rows, dtype=np.uint32)
    entropy = np.empty(rows, dtype=np.float32)
    width = min(CHUNK_ROWS, rows)
    shifted_buffer = np.empty((width, vocab), dtype=np.float32)
    exps_buffer = None if probs is not None else np.empty((width, vocab), dtype=np.float32)
    heat = np.float32(temperature)
    for chunk in row_chunks(rows):
        x, p = logits[chunk], processed[chunk]
        count = len(x)
        if cap:
            bound = np.float32(cap)
            np.divide(x, bound, out=p)
            np.tanh(p, out=p)
            np.multiply(p, bound, out=p)
            np.divide(p, heat, out=p)
        else:
            np.divide(x, heat, out=p)
        top = p.argmax(axis=-1)
        argmax[chunk] = top
        shifted = shifted_buffer[:count]
        np.subtract(p, p[np.arange(count), top][:, None], out=shifted)
        exps = probs[chunk] if probs is not None else exps_buffer[:count]
        np.exp(shifted, out=exps)
        total = exps.sum(axis=-1)
        entropy[chunk] = np.log(total) - np.einsum("ij,ij->i", exps, shifted) / total
        if probs is not None:
            np.divide(exps, total[:, None], out=exps)
    return RowsVocab(processed, argmax, entropy, probs)


def drawn_tokens(
    processed: Sequence[np.ndarray], rows: Sequence[Sequence[int]], gumbel_rows: Callable[[slice], np.ndarray]
) -> np.ndarray:
    """argmax(processed + gumbel) of the picked rows: rows[i] of processed[i], every block's in turn, against
    gumbel_rows(chunk), the noise of the picks in `chunk` of that order, made a chunk at a time in the threads."""
    picks = _picks(rows)
    tokens = np.empty(len(picks), dtype=np.uint32)

    def draw(chunk: slice) -> None:
        scores = _picked_rows(processed, picks[chunk])
        scores += gumbel_rows(chunk)
        tokens[chunk] = scores.argmax(axis=-1)

    in_parallel(draw, row_chunks(len(picks)))
    return tokens


def drawn_tokens_where_they_can_win(
    processed: Sequence[np.ndarray],
    rows: Sequence[Sequence[int]],
    gumbel_cells: Callable[[np.ndarray, np.ndarray], np.ndarray],
    noise_max: float,
) -> np.ndarray:
    """`drawn_tokens`, the noise made only for the columns that can win.

    No noise exceeds `noise_max`, so a column whose processed logit lies more
    than `noise_max` below a score its row already reaches (its argmax plus
    that column's noise) cannot win the draw. On the bench's random weights
    that leaves 0.2–20% of the columns, the fewest late in a canvas, where most
    rows are drawn: 120 rows took 4.4 ms against 9.6 ms with every column's
    noise, a canvas's 16 steps 25 against 49 ms. Where most columns are in
    reach, every column gets its noise as in `drawn_tokens`. gumbel_cells(picks,
    columns), broadcast together, is the noise of pick i (its index in the
    order of `drawn_tokens`) at those columns. The same tokens as drawing every
    column, ties included: the lowest column wins among equal scores.
    """
    picks = _picks(rows)
    tokens = np.empty(len(picks), dtype=np.uint32)
    # The slack covers float32's rounding of the scores (a few ulps of values under 10^3).
    reach = np.float32(noise_max + 0.01)

    def draw(chunk: slice) -> None:
        scores = _picked_rows(processed, picks[chunk])
        count, width = scores.shape
        index = np.arange(chunk.start, chunk.stop)
        tops = scores.argmax(axis=-1)
        reached = scores[np.arange(count), tops] + gumbel_cells(index, tops)
        # Row-major, so grouped by row with the columns rising; every row keeps its argmax at least.
        flat = np.flatnonzero(scores >= (reached - reach)[:, None])
        if len(flat) * 8 > scores.size:  # picking out many columns costs more than drawing them all
            scores += gumbel_cells(index[:, None], np.arange(width))
            tokens[chunk] = scores.argmax(axis=-1)
            return
        row, column = np.divmod(flat, width)
        noisy = scores.ravel()[flat] + gumbel_cells(index[row], column)
        best = np.maximum.reduceat(noisy, np.searchsorted(row, np.arange(count)))
        winners = np.flatnonzero(noisy == best[row])  # the first of each row's is its lowest column
        tokens[chunk] = column[winners[np.searchsorted(row[winners], np.arange(count))]]

    in_parallel(draw, row_chunks(len(picks)))
    return tokens


def _picks(rows: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    return [(block, row) for block, block_rows in enumerate(rows) for row in block_rows]


def _picked_rows(processed: Sequence[np.ndarray], picks: Sequence[tuple[int, int]]) -> np.ndarray:
    return np.stack([processed[block][row] for block, row in picks])


def gumbel_from_bits(bits: np.ndarray, shift: int) -> np.ndarray:
    """−log(−log u) with u = ((bits >> shift) + 0.5) / 2^(32 − shift), every step rounded in float32."""
    noise = (bits >> shift).astype(np.float32)
    noise += np.float32(0.5)
    noise *= np.float32(1.0 / (1 << (32 - shift)))
    np.log(noise, out=noise)
    np.negative(noise, out=noise)
    np.log(noise, out=noise)
    return np.negative(noise, out=noise)
