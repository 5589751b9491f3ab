"""Reduced-precision conversions against the float32 reference.

Tolerances (per canvas position, over the vocabulary's logits; the checkpoint
is built well conditioned so rounding does not flip routing or attention):

| conversion                  | min cosine | mean cosine | top-1 agreement |
|-----------------------------|-----------:|------------:|----------------:|
| float32                     | max abs error ≤ 1e-4                      |||
| bfloat16 / float16          | 0.97       | 0.99        | 0.90            |
| 8-bit (every linear, g32)   | 0.94       | 0.98        | 0.75            |
| 4-bit mixed (experts 4, rest 8, g32) | 0.93 | 0.97     | 0.70            |
| the same with g64 (a float down_proj) | 0.93 | 0.97    | 0.70            |

and bfloat16 against the reference run in bfloat16 itself: min cosine 0.999.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from checkpoints import build_reference_model, save_reference_checkpoint
from transformers.cache_utils import DynamicCache

import mlx_dgemma
from mlx_dgemma.convert import convert_checkpoint
from mlx_dgemma.sampler import (
    BlockSampler,
    SamplerSettings,
    SeededNoise,
    StepState,
    _compiled_decisions,
    _step_decisions,
)

TOLERANCES = {
    # name: (convert options, min cosine, mean cosine, top-1 agreement)
    "bfloat16": (dict(dtype="bfloat16", recipe="none"), 0.97, 0.99, 0.90),
    "float16": (dict(dtype="float16", recipe="none"), 0.97, 0.99, 0.90),
    "8-bit": (dict(dtype="bfloat16", bits=8, group_size=32, recipe="uniform"), 0.94, 0.98, 0.75),
    "4-bit mixed": (dict(dtype="bfloat16", bits=4, group_size=32, recipe="mixed"), 0.93, 0.97, 0.70),
    # Groups of 64 do not divide the experts' 32-wide down projection: it stays bfloat16 beside 4-bit gate/up.
    "4-bit mixed g64": (dict(dtype="bfloat16", bits=4, group_size=64, recipe="mixed"), 0.93, 0.97, 0.70),
}


def reference_logits(model, prompt, canvas) -> tuple[np.ndarray, np.ndarray]:
    """Logits without and with self-conditioning (from the first logits at temperature 0.6)."""
    with torch.no_grad():
        cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        model.model.encoder(input_ids=prompt, past_key_values=cache)
        first = model(decoder_input_ids=canvas, past_key_values=cache).logits.float()
        second = model(decoder_input_ids=canvas, past_key_values=cache, self_conditioning_logits=first / 0.6).logits
    return first.numpy(), second.float().numpy()


def our_logits(model, prompt, canvas, first_reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cache = model.make_cache()
    model.encode(mx.array(prompt.numpy()), cache)
    first = model.denoise(mx.array(canvas.numpy()), cache)
    second = model.denoise(mx.array(canvas.numpy()), cache, mx.array(first_reference / 0.6))
    return np.array(first), np.array(second)


def agreement(ours: np.ndarray, reference: np.ndarray) -> tuple[float, float, float]:
    ours, reference = ours.reshape(-1, ours.shape[-1]), reference.reshape(-1, reference.shape[-1])
    cosine = (ours * reference).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(reference, axis=-1)
    return float(cosine.min()), float(cosine.mean()), float((ours.argmax(-1) == reference.argmax(-1)).mean())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    reference = build_reference_model(seed=0, well_conditioned=True).eval()
    reference.config._attn_implementation = "eager"
    source = save_reference_checkpoint(reference, tmp_path_factory.mktemp("precision-src"), max_shard_size="300KB")
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 384, (2, 30), generator=generator)
    canvas = torch.randint(0, 384, (2, 16), generator=generator)
    return reference, source, prompt, canvas, reference_logits(reference, prompt, canvas), tmp_path_factory


def test_float32_conversion_is_exact(setup):
    _, source, prompt, canvas, (first, second), factory = setup
    model = mlx_dgemma.load_model(
        convert_checkpoint(source, factory.mktemp("f32") / "out", dtype="float32", recipe="none")
    )
    ours_first, ours_second = our_logits(model, prompt, canvas, first)
    assert np.abs(ours_first - first).max() < 1e-4
    assert np.abs(ours_second - second).max() < 1e-4


@pytest.mark.parametrize("name", list(TOLERANCES))
def test_reduced_precision_within_tolerance(setup, name):
    _, source, prompt, canvas, (first, second), factory = setup
    options, min_cosine, mean_cosine, top1 = TOLERANCES[name]
    model = mlx_dgemma.load_model(convert_checkpoint(source, factory.mktemp(name.replace(" ", "-")) / "out", **options))
    for ours, reference in zip(our_logits(model, prompt, canvas, first), (first, second)):
        worst, mean, agree = agreement(ours, reference)
        assert worst >= min_cosine and mean >= mean_cosine and agree >= top1, (name, worst, mean, agree)


def test_bfloat16_matches_the_reference_in_bfloat16(setup):
    reference, source, prompt, canvas, _, factory = setup
    model = mlx_dgemma.load_model(
        convert_checkpoint(source, factory.mktemp("bf16") / "out", dtype="bfloat16", recipe="none")
    )
    reference_bf16 = build_reference_model(seed=0, well_conditioned=True).eval().to(torch.bfloat16)
    reference_bf16.config._attn_implementation = "eager"
    first, _ = reference_logits(reference_bf16, prompt, canvas)
    ours, _ = our_logits(model, prompt, canvas, first)
    worst, _, _ = agreement(ours, first)
    assert worst >= 0.999


@pytest.mark.parametrize("name", ["bfloat16", "4-bit mixed", "4-bit mixed g64"])
def test_generation_runs_on_reduced_precision_conversions(setup, name):
    """The whole sampler on bf16 weights and bf16-scaled quantized weights (self-conditioning in bf16), and on
    experts quantized in part (on the CPU the float stack runs through the CPU plug-in)."""
    _, source, prompt, _, _, factory = setup
    options = TOLERANCES[name][0]
    model = mlx_dgemma.load_model(
        convert_checkpoint(source, factory.mktemp(f"gen-{name.replace(' ', '-')}") / "o", **options)
    )
    assert model.embedding_dtype == mx.bfloat16
    cache = model.make_cache()
    model.encode(mx.array(prompt.numpy()), cache)
    settings = SamplerSettings(steps=3, max_new_tokens=32, eos_token_ids=(1,), pad_token_id=0)
    canvases = list(BlockSampler(model, settings, SeededNoise(0)).canvases(cache, prompt.shape[0]))
    tokens = np.concatenate([np.array(c.tokens) for c in canvases], axis=1)
    assert tokens.shape[0] == prompt.shape[0] and tokens.shape[1] in (16, 32)
    assert ((tokens >= 0) & (tokens < 384)).all()


def decision_inputs(dtype: mx.Dtype, later: bool, pinned: bool):
    """`_step_decisions`'s inputs for a batch of two: a first step (no conditioning, no history), or a later one
    whose second row has already finished; with or without pinned positions."""
    generator = np.random.default_rng(0)
    shape = (2, 16, 384)

    def tokens() -> mx.array:
        return mx.array(generator.integers(0, 384, shape[:2]).astype(np.int32))

    logits = mx.array(generator.normal(size=shape).astype(np.float32) * 3)
    gumbel = mx.array(generator.gumbel(size=shape).astype(np.float32))
    pins = (None, None)
    if pinned:
        pins = (mx.array(generator.random(shape[:2]) < 0.3), tokens())
    state = StepState(tokens(), tokens(), None, mx.array([False, False]), None)
    if later:
        conditioning = mx.array(generator.normal(size=shape).astype(np.float32)).astype(dtype)
        # A history holding the argmax canvas this step will find: stable, so confidence decides the live row.
        argmax = mx.argmax(logits, axis=-1).astype(mx.int32)
        if pinned:
            argmax = mx.where(pins[0], pins[1], argmax)
        state = StepState(tokens(), tokens(), conditioning, mx.array([False, True]), argmax[None])
    return logits, mx.array(0.6, dtype=mx.float32), gumbel, tokens(), state, pins


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("later", [False, True], ids=["first step", "later step"])
@pytest.mark.parametrize("pinned", [False, True], ids=["free", "pinned"])
def test_compiled_step_decisions_equal_the_plain_ops(dtype, later, pinned):
    """The sampler's compiled step math (one graph per conditioning dtype) computes what `_step_decisions`'s plain
    ops do."""
    logits, temperature, gumbel, fresh, state, pins = decision_inputs(dtype, later, pinned)
    thresholds = (2.5, 2.0)  # an entropy budget that accepts some draws and renoises others
    plain = _step_decisions(logits, temperature, gumbel, fresh, state, *pins, *thresholds, dtype)
    state_arrays = (state.canvas, state.argmax, state.self_conditioning_logits, state.finished, state.history)
    compiled = StepState(
        *_compiled_decisions(dtype)(logits, temperature, gumbel, fresh, state_arrays, pins, thresholds)
    )
    for name in ("canvas", "argmax", "finished", "history"):
        a, b = getattr(plain, name), getattr(compiled, name)
        assert (a is None) == (b is None) == (name == "history" and not later), name
        if a is not None:
            assert a.dtype == b.dtype and mx.array_equal(a, b), name
    assert plain.self_conditioning_logits.dtype == compiled.self_conditioning_logits.dtype == dtype
    np.testing.assert_allclose(
        np.array(plain.self_conditioning_logits.astype(mx.float32)),
        np.array(compiled.self_conditioning_logits.astype(mx.float32)),
        rtol=1e-5,
        atol=1e-6,
    )
    # Some draws accepted and some renoised, so the comparison covers both.
    accepted = np.array(plain.canvas) == np.array(mx.argmax(logits / temperature + gumbel, axis=-1))
    assert accepted[0].any() and not accepted[0].all()
    if later:
        # The finished row kept its canvas, draft and conditioning; the other row's stable, confident draft ends it.
        for name in ("canvas", "argmax", "self_conditioning_logits"):
            assert mx.array_equal(getattr(compiled, name)[1], getattr(state, name)[1]), name
        assert compiled.finished.tolist() == [True, True]
    if pinned:
        # Pinned positions hold their tokens in every live row.
        live = np.array(~state.finished)[:, None]
        where = np.array(pins[0]) & live
        for name in ("canvas", "argmax"):
            np.testing.assert_array_equal(np.array(getattr(compiled, name))[where], np.array(pins[1])[where])
