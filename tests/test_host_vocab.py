"""The CPU's vocabulary-wide step math in numpy (host_vocab) against plain float64 math and MLX's ops."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_dgemma import host_vocab, sampler
from mlx_dgemma.sampler import SeededNoise


def logits(rows: int, vocab: int, seed: int = 0, scale: float = 20.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, vocab)) * scale).astype(np.float32)


def expected_math(x: np.ndarray, cap: float | None, heat: float):
    """The same quantities in float64, from the reference's formulas (entropy as −Σ p log p)."""
    processed = np.tanh(x.astype(np.float64) / cap) * cap / heat if cap else x.astype(np.float64) / heat
    shifted = processed - processed.max(axis=-1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)
    entropy = -(probs * np.log(np.where(probs > 0, probs, 1.0))).sum(axis=-1)
    return processed, probs, entropy


# 19 rows: two whole passes of CHUNK_ROWS and a short one.
@pytest.mark.parametrize("cap", [30.0, None])
def test_vocab_math_matches_float64(cap):
    x, heat = logits(19, 3000), 0.55
    ours = host_vocab.vocab_math(x, cap, heat, probs=np.empty_like(x))
    processed, probs, entropy = expected_math(x, cap, heat)
    np.testing.assert_allclose(ours.processed, processed, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(ours.argmax, processed.argmax(axis=-1))
    assert ours.argmax.dtype == np.uint32 and ours.entropy.dtype == np.float32
    np.testing.assert_allclose(ours.entropy, entropy, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours.probs, probs, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(ours.probs.sum(axis=-1), 1.0, rtol=1e-5)


def test_vocab_math_rounds_the_soft_cap_as_float32_ops_do():
    """cap · tanh(x / cap) / t, each step rounded in float32: what the reference's torch ops compute."""
    x, heat = logits(5, 4000, seed=3), np.float32(0.7)
    cap = np.float32(30.0)
    ours = host_vocab.vocab_math(x, 30.0, float(heat))
    np.testing.assert_array_equal(ours.processed, np.tanh(x / cap) * cap / heat)
    assert ours.probs is None


def test_vocab_math_without_probs_gives_the_same_entropy_and_argmax():
    x = logits(11, 2048, seed=1)
    full, bare = host_vocab.vocab_math(x, 30.0, 0.4, probs=np.empty_like(x)), host_vocab.vocab_math(x, 30.0, 0.4)
    np.testing.assert_array_equal(full.entropy, bare.entropy)
    np.testing.assert_array_equal(full.argmax, bare.argmax)


def test_entropy_of_a_near_certain_row_stays_accurate():
    """A confident row's entropy is tiny; it decides acceptance, so it must not drown in rounding."""
    x = np.zeros((2, 1000), dtype=np.float32)
    x[:, 7] = 25.0  # processed gap of 25 / 0.4 ≈ 62: p(other) ≈ 1e-27
    x[1, 9] = 23.0
    ours = host_vocab.vocab_math(x, None, 0.4)
    _, _, entropy = expected_math(x, None, 0.4)
    # Row 0: about 4e-23 nats, far below what a cancellation (Σe·x − max·Σe) would leave (~1e-6).
    assert 0 <= ours.entropy[0] < 1e-20
    np.testing.assert_allclose(ours.entropy[1], entropy[1], rtol=1e-5)


def test_drawn_tokens_are_argmax_of_processed_plus_gumbel():
    blocks = [logits(24, 500, seed=4), logits(24, 500, seed=5)]
    rows = [np.array([0, 3, 23, 9, 10, 11, 12, 13, 14, 15]), np.array([], dtype=np.int64), np.array([2])]
    blocks.append(logits(4, 500, seed=6))
    picked = np.concatenate([block[r] for block, r in zip(blocks, rows)])
    gumbel = np.random.default_rng(7).gumbel(size=picked.shape).astype(np.float32)
    tokens = host_vocab.drawn_tokens(blocks, rows, lambda chunk: gumbel[chunk])
    np.testing.assert_array_equal(tokens, np.argmax(picked + gumbel, axis=-1))
    assert tokens.dtype == np.uint32


@pytest.mark.parametrize("scale", [0.05, 3.0, 40.0])
def test_drawing_only_the_columns_that_can_win_draws_what_every_column_does(scale):
    """From nearly flat rows (every column a candidate) to sharp ones (a handful), against SeededNoise's own cells."""
    blocks = [logits(30, 4000, seed=8, scale=scale), logits(21, 4000, seed=9, scale=scale)]
    rows = [np.arange(30)[::-1], np.array([20, 0, 7, 13, 14, 15, 16, 17, 18, 19, 1])]
    positions = np.concatenate([rows[0], 30 + rows[1]])  # where each pick sits in the whole (51, 4000) draw
    noise = SeededNoise(11)
    cells = noise.gumbel_cells(2, 5, 4000, positions)
    whole = noise.gumbel_rows(2, 5, 4000, positions)(slice(None))
    picked = np.concatenate([block[r] for block, r in zip(blocks, rows)])
    tokens = host_vocab.drawn_tokens_where_they_can_win(blocks, rows, cells, sampler.GUMBEL_MAX)
    np.testing.assert_array_equal(tokens, np.argmax(picked + whole, axis=-1))
    assert tokens.dtype == np.uint32
    if scale == 40.0:  # sharp rows: the winner is often not the argmax, so the noise really decided
        assert (tokens != picked.argmax(axis=-1)).any()


def test_drawing_only_the_columns_that_can_win_keeps_argmax_tie_breaking():
    """Equal best scores: the lowest column wins, as numpy's argmax over the whole row picks, even past the argmax
    of the logits; a column just out of reach never wins."""
    processed = np.zeros((3, 50), dtype=np.float32)
    gumbel = np.zeros((3, 50), dtype=np.float32)
    processed[0, [9, 30]] = 5.0  # row 0: argmax 9; column 4 ties it with the largest noise
    gumbel[0, 4], processed[0, 4] = 2.0, 3.0
    gumbel[0, 9] = 0.0
    processed[1, 40], gumbel[1, 40] = 1.0, 2.0  # row 1: the noise lifts column 40 over the argmax, column 3
    processed[1, 3] = 2.5
    processed[2, 7] = 10.0  # row 2: nothing within reach of column 7
    processed[2, 8], gumbel[2, 8] = 10.0 - 2.0 - 1e-3, 2.0
    tokens = host_vocab.drawn_tokens_where_they_can_win(
        [processed], [np.arange(3)], lambda picks, columns: gumbel[picks, columns], 2.0
    )
    np.testing.assert_array_equal(tokens, np.argmax(processed + gumbel, axis=-1))
    np.testing.assert_array_equal(tokens, [4, 40, 7])


def test_gumbel_max_bounds_every_noise_value():
    bits = np.random.default_rng(1).integers(0, 2**32, size=1 << 20, dtype=np.uint32)
    assert host_vocab.gumbel_from_bits(bits, sampler.UNIFORM_SHIFT).max() <= sampler.GUMBEL_MAX
    top = host_vocab.gumbel_from_bits(np.array([2**32 - 1], dtype=np.uint32), sampler.UNIFORM_SHIFT)[0]
    assert top == sampler.GUMBEL_MAX


def test_in_parallel_keeps_the_order_of_the_tasks():
    assert host_vocab.in_parallel(lambda a, b: a * b, range(50), range(50)) == [i * i for i in range(50)]
    assert host_vocab.in_parallel(lambda a: a + 1, [41]) == [42]
    assert host_vocab.in_parallel(lambda a: a, []) == []


def test_host_hash_is_mlx_hash():
    counter = np.concatenate([np.arange(5000, dtype=np.uint32), np.array([2**32 - 1, 2**31], dtype=np.uint32)])
    key = (0xDEADBEEF, 0x12345678)
    ours = sampler._host_hashed_bits(counter, key)
    mlx = np.array(sampler._hashed_bits(mx.array(counter), mx.array(key, dtype=mx.uint32)))
    assert ours.dtype == np.uint32
    np.testing.assert_array_equal(ours, mlx)


def test_host_gumbel_is_mlx_gumbel_to_float32_rounding(monkeypatch):
    noise, shape = SeededNoise(5), (2, 40, 777)
    host = np.array(noise.gumbel(3, 2, shape))
    monkeypatch.setattr(sampler, "on_cpu", lambda: False)  # MLX's ops, as a GPU computes it
    device = np.array(noise.gumbel(3, 2, shape))
    np.testing.assert_allclose(host, device, rtol=2e-6, atol=2e-6)
    # Standard Gumbel: mean γ, standard deviation π/√6.
    assert abs(host.mean() - 0.5772) < 0.01 and abs(host.std() - 1.2825) < 0.01


@pytest.mark.parametrize("bits", [0, 2**32 - 1])
def test_gumbel_noise_is_finite_at_the_extreme_bits(bits):
    """The largest uniform stays below 1 (with 24 bits it rounded to 1: infinite noise, a forced token)."""
    word = np.array([bits], dtype=np.uint32)
    host = host_vocab.gumbel_from_bits(word, sampler.UNIFORM_SHIFT)
    device = np.array(sampler._gumbel_from_bits(mx.array(word)))
    assert np.isfinite(host).all() and np.isfinite(device).all()
    np.testing.assert_allclose(host, device, rtol=1e-6)


class _HeadOnly:
    """What the CPU's vocabulary pass asks of a model: its head, its soft-cap, and the table its C kernels would
    read for the head (none here: MLX's head runs)."""

    def __init__(self, logits: list[mx.array], cap: float):
        self._logits = iter(logits)
        self.text_config = type("TextConfig", (), {"vocab_size": logits[0].shape[-1], "final_logit_softcapping": cap})
        self.config = type("Config", (), {"canvas_length": 8})

    def head(self, hidden: mx.array) -> mx.array:
        return next(self._logits)

    def host_embedding(self, dtype: mx.Dtype) -> None:
        return None


def test_host_passes_match_the_fused_device_pass_and_hold_finished_rows():
    """Per row block: the argmax, entropy and conditioning the GPU's fused MLX pass gives, rows that stopped
    keeping their previous conditioning."""
    from mlx_dgemma.cpu import RowBlocks
    from mlx_dgemma.sampler import BlockSampler, HostBuffers, SamplerSettings, StepResult, vocab_pass

    generator = np.random.default_rng(2)
    blocks = RowBlocks(8, count=2)
    logits = [mx.array(generator.normal(size=(2, 4, 300)).astype(np.float32) * 15) for _ in blocks.rows]
    previous = [mx.array(generator.random(size=(2, 4, 300)).astype(np.float32)) for _ in blocks.rows]
    finished = mx.array([False, True])
    state = StepResult(mx.zeros((2, 8), dtype=mx.int32), mx.zeros((2, 8), dtype=mx.int32), previous, finished)
    heat = mx.array(0.5, dtype=mx.float32)
    ours = BlockSampler(_HeadOnly(logits, 30.0), SamplerSettings())._host_vocab_passes(
        [mx.zeros((2, 4, 16))] * len(blocks), heat, state, blocks, None, HostBuffers()
    )
    for block, block_logits, block_previous in zip(ours, logits, previous):
        processed = mx.tanh(block_logits / 30.0) * 30.0 / heat
        device = vocab_pass(processed, mx.zeros_like(processed), finished, block_previous)
        np.testing.assert_array_equal(np.array(block.argmax), np.array(device.argmax))
        np.testing.assert_allclose(np.array(block.entropy), np.array(device.entropy), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.array(block.conditioning), np.array(device.conditioning), rtol=1e-4, atol=1e-9)
        np.testing.assert_array_equal(np.array(block.conditioning[1]), np.array(block_previous[1]))
        assert not np.allclose(np.array(block.conditioning[0]), np.array(block_previous[0]))


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_a_forked_child_gets_a_pool_of_its_own():
    import os
    import signal
    import time

    host_vocab.in_parallel(lambda a: time.sleep(0.05), range(8))  # the parent's pool, every worker started
    pid = os.fork()
    if pid == 0:  # the child: the parent's threads are gone; a working pool must replace them
        signal.signal(signal.SIGALRM, lambda *_: os._exit(3))  # a pool of dead threads would wait forever
        signal.alarm(20)
        try:
            os._exit(0 if host_vocab.in_parallel(lambda a: a * 2, [1, 2, 3]) == [2, 4, 6] else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_gumbel_rows_are_rows_of_the_whole_draw():
    noise, shape = SeededNoise(4), (2, 30, 500)
    whole = np.array(noise.gumbel(2, 3, shape)).reshape(-1, 500)
    positions = np.array([59, 0, 31, 7, 8, 9, 10, 11, 12, 13, 14])
    chunk_rows = noise.gumbel_rows(2, 3, 500, positions)
    for chunk in (slice(0, 1), slice(1, 9), slice(9, 11), slice(0, 11)):
        np.testing.assert_array_equal(chunk_rows(chunk), whole[positions[chunk]])


def test_host_buffers_keep_a_stopped_rows_probabilities_while_the_next_steps_are_written():
    """Step 2 holds a stopped row to step 1's probabilities; step 3 writes into step 1's buffer set again, so the
    held row keeps step 1's numbers only because the hold-back was evaluated when step 2 made it."""
    from mlx_dgemma.cpu import RowBlocks
    from mlx_dgemma.sampler import BlockSampler, HostBuffers, SamplerSettings, StepResult

    generator = np.random.default_rng(3)
    blocks = RowBlocks(8, count=2)
    steps = [
        [mx.array(generator.normal(size=(2, 4, 300)).astype(np.float32) * 15) for _ in blocks.rows] for _ in range(3)
    ]
    sampler = BlockSampler(_HeadOnly([block for step in steps for block in step], 30.0), SamplerSettings())
    buffers, heat = HostBuffers(), mx.array(0.5, dtype=mx.float32)
    canvas = mx.zeros((2, 8), dtype=mx.int32)
    hidden = [mx.zeros((2, 4, 16))] * len(blocks)  # the stand-in head reads none of it
    running = StepResult(canvas, canvas, None, mx.array([False, False]))
    first = sampler._host_vocab_passes(hidden, heat, running, blocks, None, buffers)
    expected = [np.array(block.conditioning) for block in first]  # a copy of step 1's probabilities
    stopped = StepResult(canvas, canvas, [block.conditioning for block in first], mx.array([False, True]))
    second = sampler._host_vocab_passes(hidden, heat, stopped, blocks, None, buffers)
    third = sampler._host_vocab_passes(hidden, heat, running, blocks, None, buffers)
    mx.eval([block.conditioning for block in second + third])
    for held, fresh, step_one in zip(second, third, expected):
        np.testing.assert_array_equal(np.array(held.conditioning)[1], step_one[1])
        assert not np.allclose(np.array(held.conditioning)[0], step_one[0])
        assert not np.allclose(np.array(fresh.conditioning), np.array(held.conditioning))
