"""Images in: the vision tower, the image embedding and the encoder's image mask against the transformers reference.

Random-weight checkpoints in the released layout with a small vision tower (tests/checkpoints.py), images made with
numpy and cut into patches by transformers' own Gemma 4 image processor. Float32: the soft tokens within 1e-4 of
the reference's relative to their largest, logits after encoding prompts with one and two images (a batch of two
left-padded rows too) within 1e-4; generation token-exact under shared noise. Our 4-bit conversion keeps the tower
in float and stays close; a text-only conversion refuses images.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from checkpoints import IMAGE_TOKENS, build_reference_model, save_reference_checkpoint
from PIL import Image
from reference_sampler import reference_noise
from transformers.cache_utils import DynamicCache
from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

import mlx_dgemma
from mlx_dgemma.convert import convert_checkpoint
from mlx_dgemma.sampler import BlockSampler, SamplerSettings, SeededNoise

TOLERANCE = 1e-4
BOI, EOI, IMAGE = IMAGE_TOKENS["boi_token_id"], IMAGE_TOKENS["eoi_token_id"], IMAGE_TOKENS["image_token_id"]
EOS, PAD = 1, 0
# (height, width) in pixels: landscape, tall, small square, very wide. The processor resizes each to fill a budget
# of 70 soft tokens (4-pixel patches pooled 3 x 3): grids of 6 x 10, 12 x 5, 8 x 8 and 2 x 28 soft tokens, each
# image longer than the text's sliding window of 12.
SIZES = [(40, 60), (100, 30), (24, 24), (20, 230)]
# A tower of two layers (tests/checkpoints.py has one).
TWO_LAYERS = dict(num_hidden_layers=2)


@pytest.fixture(scope="module")
def processor():
    return Gemma4ImageProcessorPil(patch_size=4, max_soft_tokens=70, pooling_kernel_size=3)


def make_image(seed: int, height: int, width: int) -> Image.Image:
    """Smooth gradients plus noise, so neighbouring patches differ but not only by noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    return Image.fromarray(np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8))


def process(processor, sizes, seed=0) -> dict:
    images = [make_image(seed + index, *size) for index, size in enumerate(sizes)]
    return processor(images, return_tensors="pt")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    reference = build_reference_model(seed=0, vision_overrides=TWO_LAYERS).eval()
    reference.config._attn_implementation = "eager"
    path = save_reference_checkpoint(reference, tmp_path_factory.mktemp("vision"))
    return reference, path, mlx_dgemma.load_model(path)


def reference_features(reference, batch) -> torch.Tensor:
    with torch.no_grad():
        return reference.model.encoder.get_image_features(
            batch["pixel_values"], batch["image_position_ids"]
        ).pooler_output


def our_features(model, batch) -> mx.array:
    return model.image_features(batch["pixel_values"].numpy(), batch["image_position_ids"].numpy())


def relative_error(ours: mx.array, expected: torch.Tensor) -> float:
    expected = expected.float().numpy()
    return float(np.abs(np.array(ours.astype(mx.float32)) - expected).max() / np.abs(expected).max())


# ----------------------------------------------------------------- the tower


def test_soft_tokens_match_the_reference_for_a_batch_of_sizes(checkpoint, processor):
    reference, _, model = checkpoint
    batch = process(processor, SIZES)
    counts = batch["num_soft_tokens_per_image"].tolist()
    assert counts == [60, 60, 64, 56]
    expected = reference_features(reference, batch)
    ours = our_features(model, batch)
    assert ours.shape == tuple(expected.shape) == (sum(counts), reference.config.text_config.hidden_size)
    assert relative_error(ours, expected) < TOLERANCE
    # One image at a time (its padded patches as the processor returns them) gives that image's rows.
    start = 0
    for index, count in enumerate(counts):
        single = model.image_features(batch["pixel_values"][index].numpy(), batch["image_position_ids"][index].numpy())
        assert relative_error(single, expected[start : start + count]) < TOLERANCE, index
        start += count


@pytest.mark.parametrize(
    "overrides",
    [
        dict(use_clipped_linears=True, standardize=False),
        dict(num_attention_heads=4, num_key_value_heads=1, head_dim=8, pooling_kernel_size=2, rope_parameters=None),
    ],
    ids=["clipped linears, no standardization", "grouped heads of 8, 2 x 2 pooling"],
)
def test_soft_tokens_match_for_other_tower_shapes(tmp_path, overrides):
    reference = build_reference_model(seed=4, vision_overrides={**TWO_LAYERS, **overrides}).eval()
    model = mlx_dgemma.load_model(save_reference_checkpoint(reference, tmp_path))
    kernel = overrides.get("pooling_kernel_size", 3)
    batch = process(Gemma4ImageProcessorPil(patch_size=4, max_soft_tokens=70, pooling_kernel_size=kernel), SIZES[:2])
    assert relative_error(our_features(model, batch), reference_features(reference, batch)) < TOLERANCE
    if overrides.get("use_clipped_linears"):
        # The stored ranges bite: without them the features move far beyond the tolerance.
        for layer in model.model.encoder.vision_tower.encoder.layers:
            attention, mlp = layer.self_attn, layer.mlp
            for projection in (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj):
                unclip(projection)
            for projection in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                unclip(projection)
        assert relative_error(our_features(model, batch), reference_features(reference, batch)) > 100 * TOLERANCE


def unclip(projection) -> None:
    projection.input_min, projection.input_max = mx.array(-math.inf), mx.array(math.inf)
    projection.output_min, projection.output_max = mx.array(-math.inf), mx.array(math.inf)


def test_bad_image_arrays_are_refused(checkpoint, processor):
    _, _, model = checkpoint
    batch = process(processor, SIZES[:1])
    pixels, positions = batch["pixel_values"][0].numpy(), batch["image_position_ids"][0].numpy()
    with pytest.raises(ValueError, match="pixel_values"):
        model.image_features(pixels[:, :10], positions)
    with pytest.raises(ValueError, match="position_ids"):
        model.image_features(pixels, positions[:-1])
    with pytest.raises(ValueError, match="position_ids"):
        model.image_features(pixels, positions.astype(np.float32))
    with pytest.raises(ValueError, match="no patches"):
        model.image_features(pixels, np.full_like(positions, -1))


# ----------------------------------------------------------------- prompts with images


def image_prompt(seed: int, counts: list[int], text: int = 7) -> list[int]:
    """Text, then each image as <boi> image tokens <eoi> followed by more text."""
    rng = np.random.default_rng(seed)
    words = lambda: rng.integers(20, 384, text).tolist()  # noqa: E731 (clear of the special tokens)
    ids = [2, *words()]
    for count in counts:
        ids += [BOI, *[IMAGE] * count, EOI, *words()]
    return ids


def reference_encode(reference, ids, batch, mask=None) -> DynamicCache:
    """The reference's encoder over a prompt with images, masked as its `generate` masks it."""
    cache = DynamicCache(config=reference.config.get_text_config(decoder=True))
    positions = torch.arange(ids.shape[1])[None]
    masks = reference.model.encoder.create_masks_for_generate(
        config=reference.config,
        inputs_embeds=torch.empty((*ids.shape, 0)),
        attention_mask=torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool(),
        past_key_values=cache,
        position_ids=positions,
        mm_token_type_ids=(ids == IMAGE).long(),
    )
    with torch.no_grad():
        reference.model.encoder(
            input_ids=ids,
            pixel_values=batch["pixel_values"],
            image_position_ids=batch["image_position_ids"],
            attention_mask=masks,
            past_key_values=cache,
            position_ids=positions,
        )
    return cache


def reference_logits(reference, cache, canvas, mask=None, self_conditioning=None) -> torch.Tensor:
    decoder_mask = None if mask is None else torch.nn.functional.pad(mask.bool(), (0, canvas.shape[1]), value=True)
    with torch.no_grad():
        return reference(
            decoder_input_ids=canvas,
            past_key_values=cache,
            self_conditioning_logits=self_conditioning,
            decoder_attention_mask=decoder_mask,
        ).logits


def max_error(ours: mx.array, expected: torch.Tensor) -> float:
    return float(np.abs(np.array(ours) - expected.numpy()).max())


@pytest.mark.parametrize("sizes", [SIZES[:1], SIZES[1:3]], ids=["one image", "two images"])
def test_logits_after_a_prompt_with_images(checkpoint, processor, sizes):
    reference, _, model = checkpoint
    batch = process(processor, sizes)
    ids = torch.tensor([image_prompt(1, batch["num_soft_tokens_per_image"].tolist())])
    canvas = torch.randint(0, 384, (1, reference.config.canvas_length), generator=torch.Generator().manual_seed(2))
    ref_cache = reference_encode(reference, ids, batch)
    expected = reference_logits(reference, ref_cache, canvas)
    second = reference_logits(reference, ref_cache, canvas, self_conditioning=expected)

    cache = model.make_cache()
    model.encode(mx.array(ids.numpy()), cache, image_features=our_features(model, batch))
    for ref_layer, our_layer in zip(ref_cache.layers, cache.layers):
        assert max_error(our_layer.keys, ref_layer.keys) < TOLERANCE
        assert max_error(our_layer.values, ref_layer.values) < TOLERANCE
    logits = model.denoise(mx.array(canvas.numpy()), cache)
    assert max_error(logits, expected) < TOLERANCE
    assert max_error(model.denoise(mx.array(canvas.numpy()), cache, mx.array(expected.numpy())), second) < TOLERANCE

    # The images' tokens seeing each other both ways matters: a causal encoder gives other logits.
    causal = model.make_cache()
    flat = model.image_features(batch["pixel_values"].numpy(), batch["image_position_ids"].numpy())
    bidirectional = model.text_config
    model.text_config = dataclasses.replace(bidirectional, use_bidirectional_attention=None)
    try:
        model.encode(mx.array(ids.numpy()), causal, image_features=flat)
    finally:
        model.text_config = bidirectional
    assert max_error(model.denoise(mx.array(canvas.numpy()), causal), expected) > 100 * TOLERANCE


def test_a_left_padded_batch_with_an_image_per_row(checkpoint, processor):
    reference, _, model = checkpoint
    batch = process(processor, [SIZES[2], SIZES[0]], seed=5)
    rows = [image_prompt(3, [count]) for count in batch["num_soft_tokens_per_image"].tolist()]
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(row)) + row for row in rows])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    canvas = torch.randint(0, 384, (2, reference.config.canvas_length), generator=torch.Generator().manual_seed(6))
    # The reference's padded decoder mask takes its SDPA path (see test_sampler_parity).
    reference.config._attn_implementation = "sdpa"
    try:
        expected = reference_logits(reference, reference_encode(reference, ids, batch, mask), canvas, mask)
    finally:
        reference.config._attn_implementation = "eager"
    cache = model.make_cache()
    per_image = [
        model.image_features(batch["pixel_values"][i].numpy(), batch["image_position_ids"][i].numpy()) for i in range(2)
    ]
    model.encode(mx.array(ids.numpy()), cache, mx.array(mask.numpy()), image_features=per_image)
    assert max_error(model.denoise(mx.array(canvas.numpy()), cache), expected) < TOLERANCE


def test_text_before_an_image_may_come_in_an_earlier_chunk(checkpoint, processor):
    reference, _, model = checkpoint
    batch = process(processor, SIZES[:1])
    ids = image_prompt(7, batch["num_soft_tokens_per_image"].tolist(), text=20)
    canvas = torch.randint(0, 384, (1, reference.config.canvas_length), generator=torch.Generator().manual_seed(8))
    expected = reference_logits(reference, reference_encode(reference, torch.tensor([ids]), batch), canvas)
    cache = model.make_cache()
    split = 15  # past the sliding window: the image's chunk starts with the window's cache full
    model.encode(mx.array([ids[:split]]), cache)
    model.encode(mx.array([ids[split:]]), cache, image_features=our_features(model, batch))
    assert max_error(model.denoise(mx.array(canvas.numpy()), cache), expected) < TOLERANCE


def test_image_tokens_and_features_must_agree(checkpoint, processor):
    _, _, model = checkpoint
    batch = process(processor, SIZES[1:3])
    counts = batch["num_soft_tokens_per_image"].tolist()
    features = our_features(model, batch)
    ids = image_prompt(1, counts)
    first_image = ids.index(IMAGE)
    with pytest.raises(ValueError, match="soft tokens for"):
        model.encode(mx.array([ids]), model.make_cache(), image_features=features[:-1])
    with pytest.raises(ValueError, match="runs of"):
        per_image = [features[: counts[1]], features[counts[1] :]]  # the images in the wrong order
        model.encode(mx.array([ids]), model.make_cache(), image_features=per_image)
    with pytest.raises(ValueError, match="one call"):
        model.encode(mx.array([ids[: first_image + 3]]), model.make_cache(), image_features=features[:3])
    with pytest.raises(ValueError, match="one call"):
        model.encode(mx.array([ids[first_image:]]), model.make_cache(), image_features=features)


# ----------------------------------------------------------------- generation


def test_generation_with_an_image_is_token_exact(checkpoint, processor):
    reference, _, model = checkpoint
    batch = process(processor, SIZES[:1], seed=9)
    ids = torch.tensor([image_prompt(9, batch["num_soft_tokens_per_image"].tolist())])
    settings = SamplerSettings(steps=10, max_new_tokens=32, eos_token_ids=(EOS,), pad_token_id=PAD)
    noise = SeededNoise(9)
    with reference_noise(noise, reference.config.text_config.vocab_size):
        out = reference.generate(
            ids,
            pixel_values=batch["pixel_values"],
            image_position_ids=batch["image_position_ids"],
            mm_token_type_ids=(ids == IMAGE).long(),
            max_new_tokens=settings.max_new_tokens,
            max_denoising_steps=settings.steps,
            t_min=settings.t_min,
            t_max=settings.t_max,
            stability_threshold=settings.stability_threshold,
            confidence_threshold=settings.confidence_threshold,
            sampler_config=EntropyBoundSamplerConfig(entropy_bound=settings.entropy_bound),
            eos_token_id=[EOS],
            pad_token_id=PAD,
        )
    expected = out.sequences[:, ids.shape[1] :].numpy()
    cache = model.make_cache()
    model.encode(mx.array(ids.numpy()), cache, image_features=our_features(model, batch))
    results = list(BlockSampler(model, settings, noise).canvases(cache, 1))
    tokens = np.concatenate([np.array(result.tokens) for result in results], axis=1)
    assert len(results) == 2
    np.testing.assert_array_equal(tokens, expected)


# ----------------------------------------------------------------- conversions


def test_our_4bit_conversion_keeps_the_tower_in_float(checkpoint, processor, tmp_path):
    reference, path, _ = checkpoint
    model = mlx_dgemma.load_model(convert_checkpoint(path, tmp_path / "q4", bits=4, group_size=32))
    tower = model.model.encoder.vision_tower
    assert model.layers[0].experts.gate_up_proj.bits == 4
    assert not any(isinstance(module, nn.QuantizedLinear) for _, module in tower.named_modules())
    assert tower.patch_embedder.input_proj.weight.dtype == mx.bfloat16
    batch = process(processor, SIZES[:2])
    features = our_features(model, batch)
    assert bool(mx.all(mx.isfinite(features)).item())
    # The tower in bfloat16, as released: the reference's own bfloat16 tower is 2.4% of the largest value off its
    # float32 one on these images, ours 3.8%.
    assert relative_error(features, reference_features(reference, batch)) < 0.06


def test_a_text_only_conversion_refuses_images(checkpoint, processor, tmp_path):
    _, path, _ = checkpoint
    text_only = convert_checkpoint(path, tmp_path / "text", bits=None, text_only=True)
    batch = process(processor, SIZES[:1])
    # Without the tower's weights and config; with its config but not its weights; with its weights but not its
    # config: a text model each time.
    (tmp_path / "config only").mkdir()
    (tmp_path / "weights only").mkdir()
    config = json.loads((path / "config.json").read_text())
    for directory, source, config_json in (
        (tmp_path / "config only", text_only, config),
        (tmp_path / "weights only", path, {key: value for key, value in config.items() if key != "vision_config"}),
    ):
        (directory / "config.json").write_text(json.dumps(config_json))
        for weights in source.glob("*.safetensors"):
            shutil.copyfile(weights, directory / weights.name)
    for directory in (text_only, tmp_path / "config only", tmp_path / "weights only"):
        model = mlx_dgemma.load_model(directory)
        assert "vision_tower" not in model.model.encoder and not model.config.has_vision, directory
        with pytest.raises(ValueError, match="no vision tower"):
            our_features(model, batch)
