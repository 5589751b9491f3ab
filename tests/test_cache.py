"""The KV cache's buffers: states written into room allocated ahead, the same numbers as concatenating."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_dgemma.cache import LayerCache


def states(generator: np.random.Generator, count: int) -> tuple[mx.array, mx.array]:
    keys = generator.normal(size=(2, 3, count, 4)).astype(np.float32)
    values = generator.normal(size=(2, 3, count, 5)).astype(np.float32)
    return mx.array(keys), mx.array(values)


@pytest.mark.parametrize("keep", [None, 300])
def test_chunks_and_passes_match_concatenation(keep):
    """Encoder chunks kept, decoder passes read and forgotten: what a concatenating cache would hold and return."""
    generator = np.random.default_rng(0)
    cache, expected_keys, expected_values = LayerCache(keep), np.zeros((2, 3, 0, 4)), np.zeros((2, 3, 0, 5))
    for chunk in (200, 56, 256, 256, 17, 256):
        for _ in range(3):  # decoder passes over a canvas: read, never kept
            keys, values = states(generator, 256)
            seen_keys, seen_values = cache.extended(keys, values)
            np.testing.assert_array_equal(np.array(seen_keys), np.concatenate([expected_keys, keys], axis=2))
            np.testing.assert_array_equal(np.array(seen_values), np.concatenate([expected_values, values], axis=2))
        keys, values = states(generator, chunk)
        cache.extended(keys, values)
        cache.commit()
        expected_keys = np.concatenate([expected_keys, keys], axis=2)
        expected_values = np.concatenate([expected_values, values], axis=2)
        if keep is not None:
            expected_keys, expected_values = expected_keys[:, :, -keep:], expected_values[:, :, -keep:]
        assert cache.length == expected_keys.shape[2]
        np.testing.assert_array_equal(np.array(cache.keys), expected_keys)
        np.testing.assert_array_equal(np.array(cache.values), expected_values)


def test_decoder_passes_reuse_the_buffers():
    """Once a canvas fits, decoder passes write into the same buffers: no growth, no move, step after step."""
    generator = np.random.default_rng(1)
    cache = LayerCache(None)
    cache.extended(*states(generator, 512))
    cache.commit()
    cache.extended(*states(generator, 256))
    capacity = cache.buffers[0].shape[2]
    assert capacity >= 512 + 256
    for _ in range(5):
        cache.extended(*states(generator, 256))
        assert cache.buffers[0].shape[2] == capacity and cache.length == 512
