"""The MLX model against the transformers reference on random-weight checkpoints.

Float32 checkpoints: logits and encoder caches to 1e-4 absolute, on the graph every backend runs and again with
the CUDA plug-in's pure-MLX parts applied. A quantized checkpoint: the plug-in's dequantized, merged dense layers
give the quantized core model's logits to float32 rounding.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from checkpoints import SMALL_TEXT, ReferenceRun, build_reference_model, save_reference_checkpoint
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

import mlx_dgemma
from mlx_dgemma.backends import cuda
from mlx_dgemma.config import ModelConfig
from mlx_dgemma.convert import convert_checkpoint
from mlx_dgemma.model import Attention, expected_embedding

TOLERANCE = 1e-4

# The plug-in's replacements that are plain MLX (grouped attention, dense layers dequantized and merged), which any
# backend runs; the fused experts and the router kernel need a CUDA GPU (test_kernels.py).
PORTABLE_PLUGIN = cuda.CudaOptions(fused_experts=False, router_kernel=False)


def to_mx(tensor: torch.Tensor) -> mx.array:
    return mx.array(tensor.numpy())


def max_error(ours: mx.array, reference: torch.Tensor) -> float:
    return float(np.abs(np.array(ours.astype(mx.float32)) - reference.float().numpy()).max())


# Heads of 16, and of 32 (64 on the full layers): MLX picks its attention kernels by head size.
HEAD_SHAPES = {"heads of 16": {}, "heads of 32": dict(head_dim=32, global_head_dim=64)}


@pytest.fixture(scope="module", params=list(HEAD_SHAPES))
def checkpoint(request, tmp_path_factory):
    """The default small shape (and with wider heads), written in the released layout across several shards."""
    reference = build_reference_model(seed=0, **HEAD_SHAPES[request.param]).eval()
    reference.config._attn_implementation = "eager"
    return reference, save_reference_checkpoint(reference, tmp_path_factory.mktemp("small"), max_shard_size="200KB")


def load(path, plugin: bool):
    model = mlx_dgemma.load_model(path)
    if plugin:
        cuda.apply(model, PORTABLE_PLUGIN)
    return model


@pytest.fixture(scope="module", params=["the core graph", "with the CUDA plug-in's portable parts"])
def small(request, checkpoint):
    """Every parity test runs on the core graph, and again with the plug-in's pure-MLX parts."""
    reference, path = checkpoint
    model = load(path, plugin=request.param != "the core graph")
    if request.param != "the core graph":
        # A float checkpoint has nothing to dequantize: only the attention changes.
        assert all(isinstance(layer.self_attn, cuda.GroupedAttention) for layer in model.layers)
        assert "fused_qkv" not in model.layers[0].self_attn
    return reference, model


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


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(16, 8, 64), (16, 2, 128), (4, 4, 16)])
def test_grouped_attention_is_mlx_attention(dtype, heads, kv_heads, head_dim):
    """The plug-in's attention (each KV head's queries in one matmul) computes what MLX's attention does."""
    keys = mx.random.split(mx.random.key(3), 5)
    q = mx.random.normal((2, heads, 24, head_dim), key=keys[0]).astype(dtype)
    k, v = (mx.random.normal((2, kv_heads, 40, head_dim), key=key).astype(dtype) for key in keys[1:3])
    padding = (mx.random.uniform(shape=(2, 1, 1, 40), key=keys[3]) > 0.3) | (mx.arange(40) == 0)
    causal = (mx.arange(40)[None, :] <= mx.arange(16, 40)[:, None])[None, None]
    grouped, core = attention_module(cuda.GroupedAttention), attention_module(Attention)
    for mask in (None, padding, causal):
        assert mx.array_equal(grouped.attend(q, k, v, mask), core.attend(q, k, v, mask))


def attention_module(kind: type) -> Attention:
    """An attention layer of the small shape (`attend` reads only its inputs' shapes)."""
    text = ModelConfig.from_dict({"model_type": "diffusion_gemma", "text_config": dict(SMALL_TEXT)}).text
    module = Attention(text, text.layers[0])
    module.__class__ = kind
    return module


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("mask_shape", [None, (2, 1, 12, 20), (2, 1, 1, 20)])
def test_attention_is_softmax_of_the_scores(mask_shape, dtype):
    """Attention.attend (MLX's fused SDPA) is softmax(q kᵀ) v with scale 1, query head h reading KV head
    h // (heads / kv_heads), under a boolean mask per query or per key (the decoder's padding mask)."""
    rng = np.random.default_rng(0)
    shapes = [(2, 8, 12, 16), (2, 2, 20, 16), (2, 2, 20, 16)]  # 8 query heads over 2 KV heads
    as_mx = [mx.array(rng.normal(size=shape).astype(np.float32)).astype(dtype) for shape in shapes]
    # The reference reads the inputs as rounded to `dtype`, in float64.
    q, k, v = (np.array(x.astype(mx.float32)).astype(np.float64) for x in as_mx)
    k, v = np.repeat(k, 4, axis=1), np.repeat(v, 4, axis=1)
    scores = q @ k.swapaxes(-1, -2)
    mask = None
    if mask_shape is not None:
        allowed = rng.random(mask_shape) < 0.6
        allowed[..., 0] = True  # every query sees at least one key
        scores = np.where(allowed, scores, -np.inf)
        mask = mx.array(allowed)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    expected = (weights / weights.sum(axis=-1, keepdims=True)) @ v
    ours = attention_module(Attention).attend(*as_mx, mask)
    assert ours.dtype == dtype and ours.shape == expected.shape
    # bf16: the probabilities are rounded to bf16 before the value product.
    tolerance = 1e-5 if dtype == mx.float32 else 5e-2
    np.testing.assert_allclose(np.array(ours.astype(mx.float32)), expected, atol=tolerance)


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_expected_embedding_is_probabilities_times_the_table(bits):
    """Self-conditioning's soft embedding, probs @ E, read straight from a quantized table equals the product
    with the dequantized table."""
    embedding = nn.Embedding(1000, 128)
    embedding.weight = mx.random.normal((1000, 128), key=mx.random.key(0)) * 0.05
    table = embedding.weight
    if bits is not None:
        embedding = nn.QuantizedEmbedding.from_embedding(embedding, group_size=64, bits=bits)
        table = mx.dequantize(embedding.weight, embedding.scales, embedding.biases, group_size=64, bits=bits)
    probs = mx.softmax(3 * mx.random.normal((2, 16, 1000), key=mx.random.key(1)), axis=-1)
    soft = expected_embedding(embedding, probs)
    assert soft.shape == (2, 16, 128) and soft.dtype == mx.float32
    assert float(mx.abs(soft - probs @ table).max()) < 1e-6


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
    """Each configuration on the core graph and with the plug-in's portable parts."""
    overrides = dict(VARIANTS[variant])
    spelling = overrides.pop("spelling", "released")
    reference = build_reference_model(seed=7, canvas_length=12, **overrides).eval()
    reference.config._attn_implementation = "eager"
    path = save_reference_checkpoint(reference, tmp_path, spelling=spelling)
    models = [load(path, plugin=False), load(path, plugin=True)]
    vocab = reference.config.text_config.vocab_size
    generator = torch.Generator().manual_seed(8)
    run, caches = ReferenceRun(reference), [model.make_cache() for model in models]
    for length in (23, 12):
        chunk = random_ids(generator, vocab, 1, length)
        run.encode(chunk)
        canvas = random_ids(generator, vocab, 1, 12)
        first = run.denoise(canvas)
        second = run.denoise(canvas, first)
        for ours, cache in zip(models, caches):
            ours.encode(to_mx(chunk), cache)
            assert max_error(ours.denoise(to_mx(canvas), cache), first) < TOLERANCE
            assert max_error(ours.denoise(to_mx(canvas), cache, to_mx(first)), second) < TOLERANCE


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """An 8-bit checkpoint with float32 scales (so dequantizing is exact) and attention biases (merged too)."""
    reference = build_reference_model(seed=13, attention_bias=True)
    source = save_reference_checkpoint(reference, tmp_path_factory.mktemp("quantized-src"))
    out = tmp_path_factory.mktemp("quantized") / "out"
    return convert_checkpoint(source, out, dtype="float32", bits=8, group_size=32, recipe="uniform")


def test_dequantized_dense_layers_give_the_quantized_logits(quantized):
    """The plug-in dequantizes every quantized dense layer and merges q/k/v (q/k on full layers, which have no
    value projection) and gate/up into one matmul each; the logits are the quantized core model's."""
    core, merged = load(quantized, plugin=False), load(quantized, plugin=True)
    assert isinstance(core.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    for layer, shape in zip(merged.layers, merged.text_config.layers):
        attention = layer.self_attn
        assert isinstance(attention, cuda.MergedQKV) and isinstance(attention, cuda.GroupedAttention)
        projections = ["q_proj", "k_proj", "v_proj"] if shape.is_sliding else ["q_proj", "k_proj"]
        assert ("v_proj" in attention) == shape.is_sliding
        rows = sum(attention[name].weight.shape[0] for name in projections)
        assert attention.fused_qkv.weight.shape[0] == rows and attention.fused_qkv.bias.shape == (rows,)
        assert attention.fused_qkv.weight.dtype == mx.float32
        assert type(attention.o_proj) is nn.Linear  # dequantized, not merged
        assert isinstance(layer.mlp, cuda.MergedGateUp) and type(layer.mlp.fused_gate_up) is nn.Linear
        # The experts stay quantized (the fused kernels' business), and so does the tied table.
        assert isinstance(layer.experts.gate_up_proj, QuantizedSwitchLinear)
    assert isinstance(merged.model.decoder.self_conditioning, cuda.MergedGateUp)
    assert isinstance(merged.embed_tokens, nn.QuantizedEmbedding)

    vocab, canvas_length = merged.text_config.vocab_size, merged.config.canvas_length
    generator = torch.Generator().manual_seed(14)
    caches = [core.make_cache(), merged.make_cache()]
    for length in (29, canvas_length):
        chunk = to_mx(random_ids(generator, vocab, 2, length))
        canvas = to_mx(random_ids(generator, vocab, 2, canvas_length))
        for model, cache in zip((core, merged), caches):
            model.encode(chunk, cache)
        expected = core.denoise(canvas, caches[0])
        ours = merged.denoise(canvas, caches[1])
        assert float(mx.abs(ours - expected).max()) < 1e-4
        expected_second = core.denoise(canvas, caches[0], expected / 0.6)
        assert float(mx.abs(merged.denoise(canvas, caches[1], expected / 0.6) - expected_second).max()) < 1e-4
