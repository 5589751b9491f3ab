"""Token-exact parity of the sampler with the reference's `generate`, given the same noise."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from checkpoints import build_reference_model, save_reference_checkpoint
from reference_sampler import reference_noise
from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

import mlx_dgemma
from mlx_dgemma.backends import cuda
from mlx_dgemma.sampler import BlockSampler, SamplerSettings, SeededNoise

EOS, PAD = 1, 0

# The CUDA plug-in's replacements that are plain MLX (grouped attention; dense layers merged: a float checkpoint
# has nothing to dequantize), which any backend can run.
PORTABLE_PLUGIN = cuda.CudaOptions(fused_experts=False, router_kernel=False)


@pytest.fixture(scope="module", params=["heads of 16", "heads of 32"])
def checkpoint(request, tmp_path_factory):
    """The small shape, and with heads of 32 (64 on the full layers)."""
    wide = dict(head_dim=32, global_head_dim=64) if request.param == "heads of 32" else {}
    reference = build_reference_model(seed=11, **wide).eval()
    reference.config._attn_implementation = "eager"
    return reference, save_reference_checkpoint(reference, tmp_path_factory.mktemp("sampler"))


@pytest.fixture(scope="module", params=["the core graph", "with the CUDA plug-in's portable parts"])
def pair(request, checkpoint):
    """Every parity test runs on the graph every backend runs, and again with the plug-in's MLX-only parts."""
    reference, path = checkpoint
    model = mlx_dgemma.load_model(path)
    if request.param != "the core graph":
        cuda.apply(model, PORTABLE_PLUGIN)
    return reference, model


def run_reference(reference, ids, mask, noise, settings: SamplerSettings):
    kwargs = dict(
        max_new_tokens=settings.max_new_tokens,
        max_denoising_steps=settings.steps,
        t_min=settings.t_min,
        t_max=settings.t_max,
        stability_threshold=settings.stability_threshold,
        confidence_threshold=settings.confidence_threshold,
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=settings.entropy_bound),
        eos_token_id=list(settings.eos_token_ids),
        pad_token_id=settings.pad_token_id,
    )
    if mask is not None:
        kwargs["attention_mask"] = mask
    with reference_noise(noise, reference.config.text_config.vocab_size):
        out = reference.generate(ids, **kwargs)
    return out.sequences[:, ids.shape[1] :].numpy(), out.tokens_per_forward.numpy()


def run_ours(model, ids, mask, noise, settings: SamplerSettings):
    cache = model.make_cache()
    model.encode(mx.array(ids.numpy()), cache, None if mask is None else mx.array(mask.numpy()))
    results = list(BlockSampler(model, settings, noise).canvases(cache, ids.shape[0]))
    tokens = np.concatenate([np.array(r.tokens) for r in results], axis=1)
    steps = np.array([r.steps for r in results]).sum(axis=0)
    return tokens, results, steps


def tokens_per_forward(tokens: np.ndarray, steps: np.ndarray) -> np.ndarray:
    return (tokens != PAD).sum(axis=1) / steps


def prompt(seed: int, batch: int = 1, length: int = 9) -> torch.Tensor:
    return torch.randint(3, 384, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_several_canvases_token_exact(pair, seed):
    reference, ours = pair
    settings = SamplerSettings(steps=12, max_new_tokens=40, eos_token_ids=(EOS,), pad_token_id=PAD)
    ids, noise = prompt(seed), SeededNoise(seed)
    expected, expected_tpf = run_reference(reference, ids, None, noise, settings)
    tokens, results, steps = run_ours(ours, ids, None, noise, settings)
    assert len(results) >= 2
    np.testing.assert_array_equal(tokens, expected)
    np.testing.assert_allclose(tokens_per_forward(tokens, steps), expected_tpf, rtol=1e-6)


def test_early_eos_pads_the_rest(pair):
    reference, ours = pair
    ids, noise = prompt(5), SeededNoise(5)
    plain = SamplerSettings(steps=10, max_new_tokens=48, eos_token_ids=(EOS,), pad_token_id=PAD)
    first_canvas, _, _ = run_ours(ours, ids, None, noise, plain.updated(max_new_tokens=16))
    # Declare a token the first canvas commits at position 6 to be the EOS.
    eos = int(first_canvas[0, 6])
    settings = plain.updated(eos_token_ids=(eos,))
    expected, expected_tpf = run_reference(reference, ids, None, noise, settings)
    tokens, results, steps = run_ours(ours, ids, None, noise, settings)
    np.testing.assert_array_equal(tokens, expected)
    assert len(results) == 1 and results[0].finished == [True]
    first_eos = int(np.argmax(tokens[0] == eos))
    assert first_eos <= 6 and (tokens[0, first_eos + 1 :] == PAD).all()
    np.testing.assert_allclose(tokens_per_forward(tokens, steps), expected_tpf, rtol=1e-6)


def test_left_padded_batch_of_two(pair):
    reference, ours = pair
    ids = prompt(7, batch=2, length=20)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    ids[0, :5] = PAD
    settings = SamplerSettings(steps=8, max_new_tokens=32, eos_token_ids=(EOS,), pad_token_id=PAD)
    noise = SeededNoise(7)
    # The reference builds its padded decoder mask in the canvas's integer dtype,
    # which only its SDPA path (boolean masks) accepts.
    reference.config._attn_implementation = "sdpa"
    try:
        expected, expected_tpf = run_reference(reference, ids, mask, noise, settings)
    finally:
        reference.config._attn_implementation = "eager"
    tokens, _, steps = run_ours(ours, ids, mask, noise, settings)
    np.testing.assert_array_equal(tokens, expected)
    np.testing.assert_allclose(tokens_per_forward(tokens, steps), expected_tpf, rtol=1e-6)


def test_early_stop_before_the_step_limit(pair):
    reference, ours = pair
    ids, noise = prompt(9, batch=2), SeededNoise(9)
    # Random weights never give a stable argmax canvas (every re-noise moves it),
    # so stop on confidence alone: the mean entropy falls below 5 nats as the
    # temperature drops, a few steps before the limit.
    settings = SamplerSettings(
        steps=30,
        max_new_tokens=32,
        stability_threshold=0,
        confidence_threshold=5.0,
        eos_token_ids=(EOS,),
        pad_token_id=PAD,
    )
    expected, expected_tpf = run_reference(reference, ids, None, noise, settings)
    tokens, results, steps = run_ours(ours, ids, None, noise, settings)
    np.testing.assert_array_equal(tokens, expected)
    assert all(step < settings.steps for result in results for step in result.steps)
    np.testing.assert_allclose(tokens_per_forward(tokens, steps), expected_tpf, rtol=1e-6)


class ProtocolOnlyNoise:
    """A user's noise source: just the protocol's two methods, counting the Gumbel draws asked of it."""

    def __init__(self, seed: int):
        self.inner, self.gumbel_calls = SeededNoise(seed), []

    def tokens(self, canvas, step, shape, vocab):
        return self.inner.tokens(canvas, step, shape, vocab)

    def gumbel(self, canvas, step, shape):
        self.gumbel_calls.append((canvas, step))
        return self.inner.gumbel(canvas, step, shape)


def test_a_noise_source_of_the_protocol_draws_the_same_tokens(pair):
    """A user's noise source is asked for one whole draw per step and gives SeededNoise's tokens."""
    _, ours = pair
    settings = SamplerSettings(steps=5, max_new_tokens=16, stability_threshold=0)
    ids, noise = prompt(4, batch=2), ProtocolOnlyNoise(4)
    tokens, _, _ = run_ours(ours, ids, None, noise, settings)
    expected, _, _ = run_ours(ours, ids, None, SeededNoise(4), settings)
    np.testing.assert_array_equal(tokens, expected)
    # The last step's speculative successor is never launched.
    assert noise.gumbel_calls == [(0, step) for step in range(1, 6)]
