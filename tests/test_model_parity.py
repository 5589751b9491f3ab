"""The MLX model against the transformers reference on random-weight checkpoints.

Float32 checkpoints: logits and encoder caches to 1e-4 absolute.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from checkpoints import build_reference_model, save_reference_checkpoint
from transformers.cache_utils import DynamicCache

import mlx_dgemma
from mlx_dgemma import cpu, host_vocab, moe, set_moe_dispatch
from mlx_dgemma import layers as layers_module
from mlx_dgemma import model as model_module
from mlx_dgemma.host_kernels import PackedEmbedding, PackedLinear, PackedSwitchLinear, panel_width

TOLERANCE = 1e-4


@pytest.fixture(autouse=True, params=["default", "3 row blocks"])
def row_blocks(request, monkeypatch):
    """Every test runs as this machine cuts the positions, and again in 3 row blocks on 3 CPU streams
    (encoder, decoder and MoE, each block with its own queries, rows of the mask and share of the experts)."""
    if request.param != "default":
        monkeypatch.setattr(cpu, "block_count", lambda length: min(3, length))


def to_mx(tensor: torch.Tensor) -> mx.array:
    return mx.array(tensor.numpy())


def max_error(ours: mx.array, reference: torch.Tensor) -> float:
    return float(np.abs(np.array(ours.astype(mx.float32)) - reference.float().numpy()).max())


class ReferenceRun:
    """Drives the reference the way its `generate` does: encoder fills, decoder reads."""

    def __init__(self, model):
        self.model = model
        self.cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        self.mask = None

    @torch.no_grad()
    def encode(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        if mask is not None or self.mask is not None:
            new = mask if mask is not None else torch.ones_like(ids, dtype=torch.bool)
            self.mask = new.bool() if self.mask is None else torch.cat([self.mask, new.bool()], dim=1)
        self.model.model.encoder(input_ids=ids, attention_mask=self.mask, past_key_values=self.cache)

    @torch.no_grad()
    def denoise(self, canvas: torch.Tensor, self_conditioning_logits: torch.Tensor | None = None) -> torch.Tensor:
        decoder_mask = None
        if self.mask is not None:
            decoder_mask = torch.nn.functional.pad(self.mask, (0, canvas.shape[1]), value=True)
        return self.model(
            decoder_input_ids=canvas,
            past_key_values=self.cache,
            self_conditioning_logits=self_conditioning_logits,
            decoder_attention_mask=decoder_mask,
        ).logits


# On the CPU, heads of 16 take MLX's attention; heads of 32 (64 on the full layers) fill the C kernels' panels and
# take host_kernels.attention.
HEAD_SHAPES = {"heads of 16": {}, "heads of 32": dict(head_dim=32, global_head_dim=64)}


@pytest.fixture(scope="module", params=list(HEAD_SHAPES))
def small(request, tmp_path_factory):
    """The default small shape (and with wider heads), written in the released layout across several shards."""
    reference = build_reference_model(seed=0, **HEAD_SHAPES[request.param]).eval()
    reference.config._attn_implementation = "eager"
    path = save_reference_checkpoint(reference, tmp_path_factory.mktemp("small"), max_shard_size="200KB")
    return reference, mlx_dgemma.load_model(path)


def random_ids(generator: torch.Generator, vocab: int, *shape: int) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=generator)


def test_encoder_cache_matches_reference(small):
    reference, ours = small
    vocab, window = reference.config.text_config.vocab_size, reference.config.text_config.sliding_window
    prompt = random_ids(torch.Generator().manual_seed(1), vocab, 1, 3 * window + 5)
    run = ReferenceRun(reference)
    run.encode(prompt)
    cache = ours.make_cache()
    ours.encode(to_mx(prompt), cache)
    # The last layer's keys/values are written before its (skipped) feed-forward.
    for index, (ref_layer, our_layer) in enumerate(zip(run.cache.layers, cache.layers)):
        assert our_layer.keys.shape == tuple(ref_layer.keys.shape), index
        assert max_error(our_layer.keys, ref_layer.keys) < TOLERANCE, index
        assert max_error(our_layer.values, ref_layer.values) < TOLERANCE, index
    sliding = [layer for layer in cache.layers if layer.keep is not None]
    assert sliding and all(layer.length == window - 1 for layer in sliding)


def test_decoder_logits_with_and_without_self_conditioning(small):
    reference, ours = small
    vocab, canvas_length = reference.config.text_config.vocab_size, reference.config.canvas_length
    generator = torch.Generator().manual_seed(2)
    prompt = random_ids(generator, vocab, 1, 2 * reference.config.text_config.sliding_window + 3)
    canvas = random_ids(generator, vocab, 1, canvas_length)
    run = ReferenceRun(reference)
    run.encode(prompt)
    cache = ours.make_cache()
    ours.encode(to_mx(prompt), cache)

    first = run.denoise(canvas)
    ours_first = ours.denoise(to_mx(canvas), cache)
    assert ours_first.dtype == mx.float32 and ours_first.shape == tuple(first.shape)
    assert max_error(ours_first, first) < TOLERANCE

    processed = first / 0.6
    second = run.denoise(canvas, processed)
    ours_second = ours.denoise(to_mx(canvas), cache, to_mx(processed))
    assert max_error(ours_second, second) < TOLERANCE
    # Self-conditioning must actually change the prediction.
    assert float(torch.abs(second - first).max()) > 100 * TOLERANCE
    # Denoising leaves the cache as it was.
    assert cache.offset == prompt.shape[1]
    assert max_error(ours.denoise(to_mx(canvas), cache), first) < TOLERANCE


def test_the_numbers_do_not_depend_on_the_cores(small, monkeypatch):
    """The same logits, bit for bit, however many cores a step is spread over (row blocks, shares of the C
    kernels' work): the same seed gives the same tokens on a machine with 3 cores as with 2."""
    _, ours = small
    vocab, canvas_length = ours.text_config.vocab_size, ours.config.canvas_length
    generator = torch.Generator().manual_seed(5)
    prompt = to_mx(random_ids(generator, vocab, 1, 2 * ours.text_config.sliding_window + 3))
    canvas = to_mx(random_ids(generator, vocab, 1, canvas_length))
    runs = []
    for cores in (1, 2, 3, 5):
        monkeypatch.setattr(cpu, "block_count", lambda length, cores=cores: min(cores, length))
        for module in (model_module, layers_module, moe, host_vocab):
            monkeypatch.setattr(module, "cpu_cores", lambda cores=cores: cores)
        cache = ours.make_cache()
        ours.encode(prompt, cache)
        first = ours.denoise(canvas, cache)
        runs.append((np.array(first), np.array(ours.denoise(canvas, cache, first / 0.6))))
    for cores, (first, second) in zip((2, 3, 5), runs[1:]):
        assert np.array_equal(first, runs[0][0]) and np.array_equal(second, runs[0][1]), cores


def test_second_and_third_canvas_appended_through_the_encoder(small):
    reference, ours = small
    vocab, canvas_length = reference.config.text_config.vocab_size, reference.config.canvas_length
    generator = torch.Generator().manual_seed(3)
    run = ReferenceRun(reference)
    cache = ours.make_cache()
    chunk = random_ids(generator, vocab, 1, 7)
    for _ in range(3):
        run.encode(chunk)
        ours.encode(to_mx(chunk), cache)
        canvas = random_ids(generator, vocab, 1, canvas_length)
        assert max_error(ours.denoise(to_mx(canvas), cache), run.denoise(canvas)) < TOLERANCE
        chunk = canvas  # the committed canvas becomes context
    assert cache.offset == 7 + 2 * canvas_length


def test_left_padded_batch_of_two(small):
    reference, ours = small
    vocab, canvas_length = reference.config.text_config.vocab_size, reference.config.canvas_length
    window = reference.config.text_config.sliding_window
    generator = torch.Generator().manual_seed(4)
    length = window + 9
    prompt = random_ids(generator, vocab, 2, length)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, :6] = 0  # the second row is 6 tokens shorter, padded on the left
    prompt[1, :6] = 0
    run = ReferenceRun(reference)
    run.encode(prompt, mask)
    cache = ours.make_cache()
    ours.encode(to_mx(prompt), cache, attention_mask=to_mx(mask))

    canvas = random_ids(generator, vocab, 2, canvas_length)
    first = run.denoise(canvas)
    assert max_error(ours.denoise(to_mx(canvas), cache), first) < TOLERANCE
    assert max_error(ours.denoise(to_mx(canvas), cache, to_mx(first)), run.denoise(canvas, first)) < TOLERANCE

    # Append the canvas as the sampler does, then denoise the next one.
    run.encode(canvas)
    ours.encode(to_mx(canvas), cache)
    canvas = random_ids(generator, vocab, 2, canvas_length)
    assert max_error(ours.denoise(to_mx(canvas), cache), run.denoise(canvas)) < TOLERANCE
    assert cache.valid is not None and not bool(cache.valid[1, :6].any())


def test_attention_runs_in_c_where_its_heads_fill_the_panels(small):
    """Heads of 32 take the C kernels' attention, and with it the whole layer in C (host_kernels.decoder_layer)."""
    _, ours = small
    for layer in ours.layers:
        attention = layer.self_attn
        fills = attention.head_dim % panel_width() == 0
        assert attention.runs_on_host(mx.float32) == fills and layer.runs_on_host(mx.float32) == fills
        assert isinstance(attention.q_proj, PackedLinear) == fills and ("fused_qkv" in attention) is False


def test_moe_dispatches_agree(small):
    _, ours = small
    vocab, canvas_length = ours.text_config.vocab_size, ours.config.canvas_length
    generator = torch.Generator().manual_seed(5)
    prompt, canvas = random_ids(generator, vocab, 2, 20), random_ids(generator, vocab, 2, canvas_length)
    results = {}
    try:
        # The fused dispatch (our CUDA kernels) takes the tiled path off CUDA; "host" (the CPU's feed-forward blocks
        # in C) runs the experts and dense MLPs load_model packed, the others read them unpacked. The head and
        # self-conditioning run in C on the packed table whatever the dispatch.
        assert moe.moe_dispatch() == "host" and isinstance(ours.layers[0].experts.down_proj, PackedSwitchLinear)
        assert isinstance(ours.layers[0].mlp.down_proj, PackedLinear) and isinstance(ours.embed_tokens, PackedEmbedding)
        assert ours.model.decoder.self_conditioning.runs_on_host(mx.float32)
        for dispatch in ("grouped", "gather", "tiled", "fused", "host"):
            set_moe_dispatch(dispatch)
            cache = ours.make_cache()
            ours.encode(to_mx(prompt), cache)
            results[dispatch] = np.array(ours.denoise(to_mx(canvas), cache))
    finally:
        set_moe_dispatch(None)
    # Float32 rounding only: the dispatches sum in different orders, and six random layers amplify it. With the
    # wider heads, "host" runs the whole layer in C (its norms and router too): up to 4e-5 from MLX's, within the
    # reference's tolerance.
    assert np.abs(results["grouped"] - results["gather"]).max() < 1e-5
    for dispatch in ("tiled", "fused", "host"):
        assert np.abs(results[dispatch] - results["gather"]).max() < TOLERANCE


def test_compiled_layers_match_reference(small, monkeypatch):
    """CUDA's compiled decoder layers, forced here in one block: reference logits, one trace per dispatch, and none
    for a new position."""
    reference, ours = small
    monkeypatch.setattr(cpu, "block_count", lambda length: 1)
    monkeypatch.setattr(model_module, "COMPILE_LAYERS", True)
    vocab, canvas_length = ours.text_config.vocab_size, ours.config.canvas_length
    generator = torch.Generator().manual_seed(9)
    prompt, canvas = random_ids(generator, vocab, 1, 17), random_ids(generator, vocab, 1, canvas_length)
    run, cache = ReferenceRun(reference), ours.make_cache()
    run.encode(prompt)
    ours.encode(to_mx(prompt), cache)
    expected = run.denoise(canvas)
    layer = ours.layers[0]
    traces = []
    trace = layer._input_graphs.function
    monkeypatch.setattr(layer._input_graphs, "function", lambda *args: traces.append(args) or trace(*args))
    layer._input_graphs.graphs.clear()
    layer._output_graphs.graphs.clear()
    try:
        for dispatch in ("gather", "tiled"):
            set_moe_dispatch(dispatch)
            for _ in range(2):
                assert max_error(ours.denoise(to_mx(canvas), cache), expected) < TOLERANCE
        # A later chunk moves the canvas's positions: the same traces serve it.
        more = random_ids(generator, vocab, 1, 5)
        run.encode(more)
        ours.encode(to_mx(more), cache)
        assert max_error(ours.denoise(to_mx(canvas), cache), run.denoise(canvas)) < TOLERANCE
    finally:
        set_moe_dispatch(None)
    assert [key[0][0] for key in layer._output_graphs.graphs] == ["gather", "tiled"]
    assert len(traces) == 2


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(16, 8, 64), (16, 2, 128), (4, 4, 16)])
def test_grouped_attention_is_mlx_attention(dtype, heads, kv_heads, head_dim):
    """CUDA's attention (each KV head's queries in one matmul) computes what MLX's composed attention does."""
    from mlx_dgemma.layers import grouped_attention

    keys = mx.random.split(mx.random.key(3), 5)
    q = mx.random.normal((2, heads, 24, head_dim), key=keys[0]).astype(dtype)
    k, v = (mx.random.normal((2, kv_heads, 40, head_dim), key=key).astype(dtype) for key in keys[1:3])
    padding = (mx.random.uniform(shape=(2, 1, 1, 40), key=keys[3]) > 0.3) | (mx.arange(40) == 0)
    causal = (mx.arange(40)[None, :] <= mx.arange(16, 40)[:, None])[None, None]
    for mask in (None, padding, causal):
        expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)
        assert mx.array_equal(grouped_attention(q, k, v, mask), expected)


@pytest.mark.parametrize("how", ["quantized", "quantized:3", "quantized:8", "dequantized:1", "dequantized:3"])
def test_self_conditioning_product_in_vocabulary_slices(how):
    """Self-conditioning's product with the quantized table, in slices or dequantized slice by slice, equals the
    product with the dequantized table."""
    embedding = mlx_dgemma.model.nn.Embedding(1000, 128)
    embedding.weight = mx.random.normal((1000, 128), key=mx.random.key(0)) * 0.05
    quantized = mlx_dgemma.model.nn.QuantizedEmbedding.from_embedding(embedding, group_size=64, bits=8)
    probs = mx.softmax(3 * mx.random.normal((2, 16, 1000), key=mx.random.key(1)), axis=-1)
    dense = mx.dequantize(quantized.weight, quantized.scales, quantized.biases, group_size=64, bits=8)
    soft = model_module.embedding_product(probs, quantized, how)
    assert soft.shape == (2, 16, 128) and soft.dtype == probs.dtype
    assert float(mx.abs(soft - probs @ dense).max()) < 1e-6


@pytest.mark.parametrize("how", ["dequant", "quantized:0", "dequantized:x", "8"])
def test_embedding_product_settings_are_checked(how):
    with pytest.raises(ValueError, match="quantized:N"):
        model_module.parse_product(how)


VARIANTS = {
    "per-layer-config spelling, top-1 routing": dict(spelling="per_layer", top_k_experts=1),
    "attention bias, exact gelu": dict(attention_bias=True, hidden_activation="gelu"),
    "3 layers, window 5, 2 global KV heads": dict(
        num_hidden_layers=3, sliding_window=5, head_dim=8, global_head_dim=16, num_global_key_value_heads=2
    ),
    "MHA, 16 experts top-4, long rope share": dict(
        num_key_value_heads=4,
        num_experts=16,
        top_k_experts=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        num_hidden_layers=4,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 5000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 20000.0},
        },
    ),
    "no vision attention flag, window 9": dict(use_bidirectional_attention=None, sliding_window=9),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_other_configurations(variant, tmp_path):
    overrides = dict(VARIANTS[variant])
    spelling = overrides.pop("spelling", "released")
    reference = build_reference_model(seed=7, canvas_length=12, **overrides).eval()
    reference.config._attn_implementation = "eager"
    ours = mlx_dgemma.load_model(save_reference_checkpoint(reference, tmp_path, spelling=spelling))
    vocab = reference.config.text_config.vocab_size
    generator = torch.Generator().manual_seed(8)
    run, cache = ReferenceRun(reference), ours.make_cache()
    for length in (23, 12):
        chunk = random_ids(generator, vocab, 1, length)
        run.encode(chunk)
        ours.encode(to_mx(chunk), cache)
        canvas = random_ids(generator, vocab, 1, 12)
        first = run.denoise(canvas)
        assert max_error(ours.denoise(to_mx(canvas), cache), first) < TOLERANCE
        assert max_error(ours.denoise(to_mx(canvas), cache, to_mx(first)), run.denoise(canvas, first)) < TOLERANCE


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_cpu_attention_equals_the_fused_kernel(masked, dtype):
    """The CPU's grouped attention computes what MLX's fused kernel (the GPU path) does."""
    from mlx_dgemma.layers import attend

    rng = np.random.default_rng(0)
    queries = mx.array(rng.normal(size=(2, 8, 12, 16)).astype(np.float32)).astype(dtype)
    keys = mx.array(rng.normal(size=(2, 2, 20, 16)).astype(np.float32)).astype(dtype)
    values = mx.array(rng.normal(size=(2, 2, 20, 16)).astype(np.float32)).astype(dtype)
    mask = None
    if masked:
        allowed = rng.random((2, 1, 12, 20)) < 0.7
        allowed[..., 0] = True  # every query sees at least one key
        mask = mx.array(allowed)
    fused = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=1.0, mask=mask)
    with mx.stream(mx.cpu):
        ours = attend(queries, keys, values, mask)
    # bf16: the weights are rounded to bf16 once before the value product (the fused kernel keeps float32).
    tolerance = 2e-6 if dtype == mx.float32 else 2e-2
    assert ours.dtype == dtype
    np.testing.assert_allclose(np.array(ours.astype(mx.float32)), np.array(fused.astype(mx.float32)), atol=tolerance)
