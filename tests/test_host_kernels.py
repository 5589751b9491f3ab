"""The CPU's feed-forward blocks in C (mlx_dgemma/host_kernels.c): building the library, packing, the experts' and
the dense MLP's numbers."""

from __future__ import annotations

import os
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.switch_layers import SwitchLinear

from mlx_dgemma import host_kernels, moe
from mlx_dgemma.cpu import RowBlocks
from mlx_dgemma.layers import GatedMLP


@pytest.fixture(scope="module")
def width() -> int:
    if host_kernels.library() is None:
        # Every machine CI runs on has a C compiler: there the kernels must build.
        assert not os.environ.get("CI"), host_kernels.unavailable_reason()
        pytest.skip(f"no CPU experts' kernels: {host_kernels.unavailable_reason()}")
    return host_kernels.panel_width()


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def expected_block(x, indices, weights, gate_up, down) -> np.ndarray:
    """The experts' block in float64, one token and one of its experts at a time."""
    inner = down.shape[2]
    out = np.zeros((x.shape[0], down.shape[1]))
    for token, (experts, token_weights) in enumerate(zip(indices, weights)):
        for expert, weight in zip(experts, token_weights):
            gate_and_up = gate_up[expert] @ x[token]
            hidden = gelu_tanh(gate_and_up[:inner]) * gate_and_up[inner:]
            out[token] += weight * (down[expert] @ hidden)
    return out


def experts_config(hidden: int, inner: int) -> SimpleNamespace:
    """What an Experts block reads of a TextConfig."""
    return SimpleNamespace(
        hidden_size=hidden, moe_intermediate_size=inner, num_experts=8, top_k_experts=4,
        hidden_activation="gelu_pytorch_tanh",
    )  # fmt: skip


def random_block(rng, tokens, experts, k, hidden, inner, skew=0.0):
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    gate_up = (rng.standard_normal((experts, 2 * inner, hidden)) / np.sqrt(hidden)).astype(np.float32)
    down = (rng.standard_normal((experts, hidden, inner)) / np.sqrt(inner)).astype(np.float32)
    # A skewed router sends many tokens to a few experts and none to others.
    scores = rng.standard_normal((tokens, experts)) + skew * np.arange(experts)
    indices = np.argsort(-scores, axis=1)[:, :k].astype(np.uint32)
    weights = rng.random((tokens, k)).astype(np.float32)
    return x, indices, weights, gate_up, down


def test_pack_and_unpack_are_inverses(width):
    weight = mx.array(np.arange(3 * 2 * width * 5, dtype=np.float32).reshape(3, 2 * width, 5))
    packed = host_kernels.pack(weight, width)
    assert packed.shape == (3, 2, 5, width)
    # Panel p, input i holds outputs p * width .. (p + 1) * width - 1 of input i, in order.
    assert np.array_equal(np.array(packed[1, 1, 2]), np.array(weight[1, width : 2 * width, 2]))
    assert mx.array_equal(host_kernels.unpack(packed), weight)


@pytest.mark.parametrize(
    "tokens, experts, k, skew, threads",
    [(37, 8, 2, 0.0, 2), (256, 32, 4, 0.0, 2), (200, 16, 4, 0.6, 3), (5, 8, 1, 0.0, 2), (64, 4, 4, 0.0, 1)],
)
def test_block_matches_float64(width, tokens, experts, k, skew, threads):
    """Any number of tokens per expert (none, fewer than a tile, many tiles with a remainder), any top-k and
    thread count: the block to float32 rounding."""
    rng = np.random.default_rng(tokens + experts)
    hidden, inner = 2 * width, 3 * width
    x, indices, weights, gate_up, down = random_block(rng, tokens, experts, k, hidden, inner, skew)
    packed = [np.asarray(host_kernels.pack(mx.array(w), width)) for w in (gate_up, down)]
    ours = host_kernels.forward(x, indices, weights, *packed, threads=threads)
    x64, weights64, gate_up64, down64 = (a.astype(np.float64) for a in (x, weights, gate_up, down))
    expected = expected_block(x64, indices, weights64, gate_up64, down64)
    assert np.abs(ours - expected).max() < 2e-6 * np.abs(expected).max()


@pytest.mark.parametrize("rows, threads", [(75, 2), (256, 2), (7, 3), (40, 1)])
def test_dense_mlp_runs_beside_the_experts(width, rows, threads):
    """The dense MLP in the experts' pass: any row count (whole groups of rows and a remainder, fewer rows than
    threads), to float32 rounding; the experts' output is the one they give alone."""
    rng = np.random.default_rng(rows)
    hidden, inner = 2 * width, 3 * width
    x, indices, weights, gate_up, down = random_block(rng, 30, 8, 2, hidden, inner)
    packed = [np.asarray(host_kernels.pack(mx.array(w), width)) for w in (gate_up, down)]
    dense_x = rng.standard_normal((rows, hidden)).astype(np.float32)
    gate, up = (rng.standard_normal((inner, hidden)) / np.sqrt(hidden) for _ in range(2))
    dense_down = rng.standard_normal((hidden, inner)) / np.sqrt(inner)
    dense = host_kernels.DenseMLP(
        dense_x, *(np.asarray(host_kernels.pack(mx.array(w.astype(np.float32)), width)) for w in (gate, up, dense_down))
    )
    experts_out, dense_out = host_kernels.feed_forward(x, indices, weights, *packed, threads, dense)
    assert np.array_equal(experts_out, host_kernels.forward(x, indices, weights, *packed, threads=threads))
    x64 = dense_x.astype(np.float64)
    expected = (gelu_tanh(x64 @ gate.T) * (x64 @ up.T)) @ dense_down.T
    assert dense_out.shape == (rows, hidden)
    assert np.abs(dense_out - expected).max() < 2e-6 * np.abs(expected).max()


def test_gated_mlp_packs_for_the_host(width):
    """A float32 gelu MLP packs; MLX still runs it from the packed weights (unpacked on use); others stay as
    they are."""
    mlp = GatedMLP(2 * width, 3 * width, "gelu_pytorch_tanh")
    x = mx.random.normal((1, 5, 2 * width), key=mx.random.key(0))
    before = np.array(mlp(x))
    assert not mlp.runs_on_host(mx.float32)
    assert mlp.pack_for_host()
    assert all(isinstance(mlp[name], host_kernels.PackedLinear) for name in ("gate_proj", "up_proj", "down_proj"))
    assert mlp.runs_on_host(mx.float32) and not mlp.runs_on_host(mx.bfloat16)
    assert np.array_equal(np.array(mlp(x)), before)
    assert not GatedMLP(2 * width, 3 * width, "silu").pack_for_host()  # the kernels' activation is gelu
    uneven = GatedMLP(2 * width, 3 * width + 1, "gelu_pytorch_tanh")  # gate and up fill no whole panel
    assert not uneven.pack_for_host() and type(uneven.gate_proj) is nn.Linear


@pytest.mark.parametrize("rows, panels", [(1, 3), (32, 4), (75, 3), (130, 5)])
def test_packed_embedding_reads_as_the_table(width, rows, panels):
    """One packed copy of the table serves the lookup (exactly), the head and self-conditioning's probs @ E (to
    float32 rounding), for any row count (token panels with a remainder) and vocabulary panel count."""
    rng = np.random.default_rng(rows)
    vocab, hidden = panels * width, 3 * host_kernels.library().hidden_tile()
    embedding = nn.Embedding(vocab, hidden)
    embedding.weight = mx.array(rng.standard_normal((vocab, hidden)).astype(np.float32))
    table = np.array(embedding.weight).astype(np.float64)
    assert host_kernels.embedding_packable(embedding, width)
    packed = host_kernels.PackedEmbedding(embedding, width)
    ids = mx.array(rng.integers(0, vocab, (2, rows)))
    assert mx.array_equal(packed(ids), embedding(ids)) and mx.array_equal(packed.weight, embedding.weight)
    x = rng.standard_normal((rows, hidden)).astype(np.float32)
    logits = np.empty((rows, vocab), dtype=np.float32)
    packed.head(x, logits)
    expected = x.astype(np.float64) @ table.T
    assert np.abs(logits - expected).max() < 2e-6 * np.abs(expected).max()
    probs = rng.random((rows, vocab)).astype(np.float32)
    expected = probs.astype(np.float64) @ table
    assert np.abs(packed.expected_embedding(probs) - expected).max() < 2e-6 * np.abs(expected).max()
    # What the kernels cannot read stays as it is.
    assert not host_kernels.embedding_packable(nn.Embedding(vocab + 1, hidden), width)
    assert not host_kernels.embedding_packable(nn.Embedding(vocab, hidden + 1), width)
    half = nn.Embedding(vocab, hidden)
    half.weight = half.weight.astype(mx.bfloat16)
    assert not host_kernels.embedding_packable(half, width)


@pytest.mark.parametrize("rows, conditioned", [(5, False), (45, True), (70, True)])
def test_self_conditioning_matches_float64(width, rows, conditioned):
    """host_kernels.conditioned_embeddings against float64: the lookup in the packed table, the MLP over groups of
    rows with a remainder, the norms; with no previous prediction, the lookup and the output norm alone."""
    rng = np.random.default_rng(rows)
    vocab, hidden, inner = 3 * width, 2 * width, 3 * width
    embedding = nn.Embedding(vocab, hidden)
    embedding.weight = mx.array(rng.standard_normal((vocab, hidden)).astype(np.float32))
    table = host_kernels.PackedEmbedding(embedding, width)
    mlp = GatedMLP(hidden, inner, "gelu_pytorch_tanh")
    assert mlp.pack_for_host()
    pre_norm = rng.uniform(0.5, 1.5, hidden).astype(np.float32)
    weights = host_kernels.ConditioningWeights(
        pre_norm, *(np.array(layer.packed) for layer in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)), 1e-6
    )
    ids = rng.integers(0, vocab, rows)
    soft = rng.standard_normal((rows, hidden)).astype(np.float32) if conditioned else None
    scale = float(np.float32(np.sqrt(hidden)))
    out = host_kernels.conditioned_embeddings(ids, soft, np.array(table.packed), scale, weights)
    expected = np.array(embedding.weight).astype(np.float64)[ids] * scale
    if conditioned:
        normed = rms_normed(soft.astype(np.float64) * scale, pre_norm)
        gate, up, down = (
            np.array(layer.weight).astype(np.float64) for layer in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        )
        expected += (gelu_tanh(normed @ gate.T) * (normed @ up.T)) @ down.T
    expected = rms_normed(expected, None)
    assert out.shape == (rows, hidden) and np.abs(out - expected).max() < 1e-5
    for outside in (-1, vocab):  # never read past the table
        with pytest.raises(ValueError, match="token ids"):
            host_kernels.conditioned_embeddings(np.append(ids, outside), None, np.array(table.packed), scale, weights)


def rms_normed(x: np.ndarray, weight: np.ndarray | None, eps: float = 1e-6) -> np.ndarray:
    normed = x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
    return normed if weight is None else normed * weight


def rotated(x: np.ndarray, rotations: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE of x (..., length, heads, dim) by rotations (length, dim): cos then sin."""
    half = x.shape[-1] // 2
    cos, sin = rotations[:, None, :half], rotations[:, None, half:]
    low, high = x[..., :half], x[..., half:]
    return np.concatenate([low * cos - high * sin, high * cos + low * sin], axis=-1)


def expected_attention(x, rotations, cached, mask, w):
    """The attention layer in float64 over the whole (batch, length, hidden) input: (output, new keys, values)."""
    batch, length, _ = x.shape
    dim = rotations.shape[1]
    heads = lambda y: y.reshape(batch, length, -1, dim)  # noqa: E731
    queries = rotated(rms_normed(heads(x @ w["q_proj"].T), w["q_norm"]), rotations)
    raw_keys = heads(x @ w["k_proj"].T)
    values = rms_normed(raw_keys if w["v_proj"] is None else heads(x @ w["v_proj"].T), None)
    keys = rotated(rms_normed(raw_keys, w["k_norm"]), rotations)
    keys, values = keys.transpose(0, 2, 1, 3), values.transpose(0, 2, 1, 3)  # (batch, kv_heads, length, dim)
    all_keys = keys if cached is None else np.concatenate([cached[0], keys], axis=2)
    all_values = values if cached is None else np.concatenate([cached[1], values], axis=2)
    group = queries.shape[2] // keys.shape[1]
    scores = np.einsum("blhd,bhpd->bhlp", queries, np.repeat(all_keys, group, axis=1))
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    out = np.einsum("bhlp,bhpd->blhd", weights, np.repeat(all_values, group, axis=1)).reshape(batch, length, -1)
    return out @ w["o_proj"].T, keys, values


@pytest.mark.parametrize(
    "batch, blocks, cached, heads, kv_heads, dim, values_from_keys, masked",
    [
        (1, (40, 37), 0, 4, 2, 1, False, False),  # a first chunk: nothing cached
        (2, (70,), 45, 4, 1, 2, True, True),  # a full layer: the values are the raw keys; a padded batch
        (1, (9, 9, 10), 100, 2, 2, 1, False, True),  # three small blocks, a causal mask per row
    ],
)
def test_attention_matches_float64(width, batch, blocks, cached, heads, kv_heads, dim, values_from_keys, masked):
    """host_kernels.attention against float64: tiles of queries with remainders, keys that fill no whole panel,
    grouped queries, cached states read at the cache's strides, masks per batch row and per query."""
    rng = np.random.default_rng(sum(blocks) + cached)
    dim *= width
    hidden, length = 2 * width, sum(blocks)
    positions = cached + length
    x = rng.standard_normal((batch, length, hidden)).astype(np.float32)
    scaled = lambda *shape: (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)  # noqa: E731
    w = dict(
        q_proj=scaled(heads * dim, hidden), k_proj=scaled(kv_heads * dim, hidden), o_proj=scaled(hidden, heads * dim)
    )
    w["v_proj"] = None if values_from_keys else scaled(kv_heads * dim, hidden)
    w["q_norm"], w["k_norm"] = (rng.uniform(0.5, 1.5, dim).astype(np.float32) for _ in range(2))
    angles = rng.uniform(-np.pi, np.pi, (length, dim // 2))
    rotations = np.concatenate([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    states = None
    if cached:
        # The cache's buffers hold room after the kept positions: the kernels read them at its strides.
        buffers = rng.standard_normal((2, batch, kv_heads, cached + 7, dim)).astype(np.float32)
        states = (buffers[0][:, :, 3 : 3 + cached], buffers[1][:, :, 3 : 3 + cached])
    mask = None
    if masked:
        query, key = np.arange(length)[:, None] + cached, np.arange(positions)[None, :]
        mask = np.broadcast_to(key <= query, (batch, 1, length, positions)).copy()
        mask[-1, :, :, :5] = False  # the last batch row padded on the left
    pack = lambda weight: None if weight is None else np.array(host_kernels.pack(mx.array(weight), width))  # noqa: E731
    weights = host_kernels.AttentionWeights(
        *(pack(w[name]) for name in ("q_proj", "k_proj", "v_proj", "o_proj")), w["q_norm"], w["k_norm"], 1e-6
    )
    edges = np.cumsum([0, *blocks])
    outs, keys, values = host_kernels.attention(
        [x[:, a:b] for a, b in zip(edges, edges[1:])],
        list(edges[:-1]),
        rotations,
        states,
        [None if mask is None else mask[:, :, a:b] for a, b in zip(edges, edges[1:])],
        weights,
        threads=2,
    )
    as64 = lambda y: None if y is None else y.astype(np.float64)  # noqa: E731
    expected, expected_keys, expected_values = expected_attention(
        as64(x),
        as64(rotations),
        None if states is None else tuple(as64(s) for s in states),
        mask,
        {name: as64(value) for name, value in w.items()},
    )
    out = np.concatenate(outs, axis=1)
    assert out.shape == (batch, length, hidden)
    assert np.abs(out - expected).max() < 1e-5 * np.abs(expected).max()
    assert np.abs(keys - expected_keys).max() < 1e-5 and np.abs(values - expected_values).max() < 1e-5
    if not cached:  # the encoder's last layer takes the new states alone: the same numbers
        alone = host_kernels.attention_states(
            [x[:, a:b] for a, b in zip(edges, edges[1:])], list(edges[:-1]), rotations, weights
        )
        assert np.array_equal(alone[0], keys) and np.array_equal(alone[1], values)


def test_attention_packs_where_its_heads_fill_the_panels(width):
    from mlx_dgemma.config import LayerShape, RopeConfig
    from mlx_dgemma.layers import Attention

    config = SimpleNamespace(
        num_attention_heads=2, hidden_size=2 * width, attention_bias=False, rms_norm_eps=1e-6
    )  # fmt: skip
    rope = RopeConfig("default", 10_000.0)
    sliding = Attention(config, LayerShape("sliding_attention", width, 1, rope))
    assert sliding.pack_for_host() and sliding.runs_on_host(mx.float32) and not sliding.runs_on_host(mx.bfloat16)
    assert all(
        isinstance(sliding[name], host_kernels.PackedLinear) for name in ("q_proj", "k_proj", "v_proj", "o_proj")
    )
    full = Attention(config, LayerShape("full_attention", 2 * width, 1, rope))
    assert full.pack_for_host() and "v_proj" not in full
    narrow = Attention(config, LayerShape("sliding_attention", width // 2, 1, rope))  # its values fill no panel
    assert not narrow.pack_for_host() and not narrow.runs_on_host(mx.float32) and type(narrow.o_proj) is nn.Linear


def test_routes_are_the_routers():
    """host_kernels.route picks each row's experts and weights as moe.Router does (in any order)."""
    rng = np.random.default_rng(3)
    scores = rng.standard_normal((50, 16)).astype(np.float32)
    per_expert_scale = rng.uniform(0.5, 1.5, 16).astype(np.float32)
    indices, weights = host_kernels.route(scores, 4, per_expert_scale)
    chosen = mx.argpartition(-mx.array(scores), kth=3, axis=-1)[:, :4]
    expected = mx.softmax(mx.take_along_axis(mx.array(scores), chosen, axis=-1), axis=-1)
    expected = np.array(expected * mx.array(per_expert_scale)[chosen])
    for row in range(len(scores)):
        ours, theirs = np.argsort(indices[row]), np.argsort(np.array(chosen[row]))
        assert np.array_equal(indices[row][ours], np.array(chosen[row])[theirs])
        np.testing.assert_allclose(weights[row][ours], expected[row][theirs], rtol=1e-6)


def test_shares_cut_the_experts_evenly():
    counts = np.array([0, 40, 3, 3, 0, 60, 1, 1, 30, 2])
    for threads in (1, 2, 3, 4):
        edges = host_kernels._shares(counts, threads)
        assert len(edges) == threads + 1 and edges[0] == 0 and edges[-1] == len(counts)
        assert all(a <= b for a, b in zip(edges, edges[1:]))
        cost = counts + np.where(counts > 0, host_kernels._EXPERT_COST_ROWS, 0)
        shares = [cost[a:b].sum() for a, b in zip(edges, edges[1:])]
        # No share is heavier than an even share plus the one expert that straddles the cut.
        assert max(shares) <= cost.sum() / threads + cost.max()


def test_experts_module_packs_and_dispatches(width):
    """The "host" dispatch of Experts against MLX's gathered one on the same weights, and packing's fallbacks."""
    config = experts_config(hidden=2 * width, inner=width)
    experts = moe.Experts(config)
    rng = np.random.default_rng(3)
    x, indices, weights, *_ = random_block(rng, 40, 8, config.top_k_experts, 2 * width, width)
    blocks = RowBlocks(40, count=2)
    xs, index_blocks, weight_blocks = (blocks.split(mx.array(a), axis=0) for a in (x, indices, weights))

    def run(dispatch: str) -> np.ndarray:
        moe.set_moe_dispatch(dispatch)
        try:
            return np.array(mx.concatenate(experts(blocks, xs, index_blocks, weight_blocks), axis=0))
        finally:
            moe.set_moe_dispatch(None)

    gathered = run("gather")
    assert not experts.runs_on_host(mx.float32)
    assert np.array_equal(run("host"), run("grouped"))  # unpacked experts: "host" takes the grouped path
    assert experts.pack_for_host()
    assert all(isinstance(experts[name], host_kernels.PackedSwitchLinear) for name in ("gate_up_proj", "down_proj"))
    assert experts.runs_on_host(mx.float32) and not experts.runs_on_host(mx.bfloat16)
    assert np.abs(run("host") - gathered).max() < 1e-5 * np.abs(gathered).max()
    # The packed stacks still serve MLX's dispatches, unpacked on use.
    assert np.abs(run("gather") - gathered).max() < 1e-6 * np.abs(gathered).max()
    assert moe.moe_dispatch() == "host" and "host" in moe.available_dispatches()
    # A stack that is not float32, or whose outputs do not fill whole panels, stays as it is.
    assert not host_kernels.packable(SwitchLinear(width, width + 1, 4, bias=False), width)
    half = SwitchLinear(width, width, 4, bias=False)
    half.weight = half.weight.astype(mx.bfloat16)
    assert not host_kernels.packable(half, width)


def test_without_a_compiler_the_cpu_keeps_the_grouped_dispatch(monkeypatch, tmp_path):
    monkeypatch.setattr(host_kernels, "_library", None)
    monkeypatch.setattr(host_kernels, "_failure", None)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert host_kernels.library() is None
    assert "no-such-compiler" in host_kernels.unavailable_reason()
    assert moe.moe_dispatch() == "grouped" and "host" not in moe.available_dispatches()
    config = experts_config(hidden=64, inner=32)
    assert not moe.Experts(config).pack_for_host()
    assert not GatedMLP(64, 96, "gelu_pytorch_tanh").pack_for_host()


def test_the_library_is_built_once_into_the_cache(width, monkeypatch, tmp_path):
    monkeypatch.setattr(host_kernels, "_library", None)
    monkeypatch.setattr(host_kernels, "_failure", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    built = host_kernels._built_library()
    assert built.parent == tmp_path / "mlx-dgemma" and built.is_file()
    assert [p.name for p in built.parent.iterdir()] == [built.name]  # no half-written file left beside it
    stamp = built.stat().st_mtime_ns
    assert host_kernels._built_library() == built and built.stat().st_mtime_ns == stamp
    assert host_kernels.library() is not None and host_kernels.panel_width() == width


def test_the_cache_keeps_one_library_per_processor(width, monkeypatch, tmp_path):
    """A cache shared between machines (a network home) must not hand one CPU another's -march=native build."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    here = host_kernels._built_library()
    monkeypatch.setattr(host_kernels, "_processor", lambda: "a CPU with other instructions")
    elsewhere = host_kernels._built_library()
    assert elsewhere != here and here.is_file() and elsewhere.is_file()
