"""The tiled MoE dispatch's buffer layout, checked against its definition with numpy."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_dgemma.moe import tile_layout


@pytest.mark.parametrize(
    "tokens, k, experts, tile, skew",
    [(37, 4, 8, 16, False), (256, 8, 128, 16, False), (50, 2, 6, 8, True), (5, 1, 3, 4, True)],
)
def test_tile_layout(tokens, k, experts, tile, skew):
    rng = np.random.default_rng(tokens * experts)
    # Skewed routing piles most tokens onto expert 0 and leaves some experts empty.
    probs = None
    if skew:
        probs = np.full(experts, 0.5 / (experts - 1))
        probs[0] = 0.5
    indices = np.stack([rng.choice(experts, size=k, replace=False, p=probs) for _ in range(tokens)])
    slots, tile_experts, sources = (np.array(a) for a in tile_layout(mx.array(indices), experts, tile))

    rows = sources.shape[0]
    assert rows % tile == 0 and tile_experts.shape == (rows // tile,)
    assert rows >= tokens * k + experts * (tile - 1) > rows - tile
    # Every entry has a row of its own, in a tile of its expert, reading its token.
    assert len(np.unique(slots)) == tokens * k
    np.testing.assert_array_equal(tile_experts[slots // tile], indices)
    np.testing.assert_array_equal(sources[slots], np.repeat(np.arange(tokens), k).reshape(tokens, k))
    # Tiles are grouped by expert in ascending order (sorted indices), and no expert has a tile to spare.
    assert np.all(np.diff(tile_experts.astype(np.int64)) >= 0)
    tile_used = np.zeros(rows // tile, dtype=bool)
    tile_used[np.unique(slots // tile)] = True
    counts = np.bincount(indices.ravel(), minlength=experts)
    assert tile_used.sum() == sum(-(-c // tile) for c in counts)
    # The used tiles come first.
    assert tile_used[: tile_used.sum()].all()
