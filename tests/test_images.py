"""Images in: loading and preprocessing as transformers' Gemma 4 processor does it, the prompt's image tokens,
and every refusal."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tokenizer_fixture import SPECIAL_TOKEN_IDS, write_processor_config

from mlx_dgemma.images import (
    MAX_IMAGE_PIXELS,
    ImageTokens,
    PreparedImage,
    VisionSettings,
    chunk_ends,
    decode_data_url,
    expand_placeholders,
    image_spans,
    image_tokens,
    load_image,
    prepare_image,
    prepare_images,
    soft_token_count,
)

transformers = pytest.importorskip("transformers")
from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor  # noqa: E402
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil  # noqa: E402
from transformers.models.gemma4.processing_gemma4 import Gemma4Processor  # noqa: E402

# (height, width): tiny, wide, tall, larger than the budget, exactly a budget-sized square (not resized),
# a sliver whose short side rounds to nothing.
SIZES = [(5, 7), (90, 900), (900, 60), (1200, 1600), (768, 768), (3, 1500)]
SETTINGS = [
    {},  # Gemma 4's defaults: 16-pixel patches, 3x3 pooling, 280 soft tokens
    {"max_soft_tokens": 70},
    {"max_soft_tokens": 140, "patch_size": 4},  # the tiny test checkpoints' patch size
]


def picture(height: int, width: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    """Smooth colour gradients plus noise: something a resampler's rounding shows on."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], axis=-1)
    if channels == 4:
        base = np.concatenate([base, (x * 7 % 256)[..., None]], axis=-1)
    noisy = base + rng.normal(0, 20, base.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def write(path: Path, array: np.ndarray, image_format: str) -> Path:
    Image.fromarray(array).save(path, format=image_format)
    return path


def reference(image: Image.Image, settings: dict) -> tuple[np.ndarray, np.ndarray, int]:
    out = Gemma4ImageProcessorPil(**settings)(images=[image], return_tensors="np")
    return out["pixel_values"][0], out["image_position_ids"][0], int(out["num_soft_tokens_per_image"][0])


def assert_matches(ours: PreparedImage, image: Image.Image, settings: dict) -> None:
    pixels, positions, soft = reference(image, settings)
    assert ours.num_soft_tokens == soft
    assert ours.pixel_values.dtype == np.float32 and ours.pixel_values.shape == pixels.shape
    np.testing.assert_allclose(ours.pixel_values, pixels, rtol=0, atol=1e-6)
    assert ours.position_ids.shape == positions.shape
    np.testing.assert_array_equal(ours.position_ids, positions)


# ----------------------------------------------------------------- preprocessing against the reference


@pytest.mark.parametrize("settings", SETTINGS, ids=["default", "70-tokens", "4px-patches"])
@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_pixels_positions_and_count_match_the_reference(size, settings):
    image = Image.fromarray(picture(*size))
    ours = prepare_image(image, VisionSettings(**settings))
    assert_matches(ours, image, settings)
    assert soft_token_count(*size, VisionSettings(**settings)) == ours.num_soft_tokens
    # Padding: zeros at position -1 after the real patches.
    real = ours.num_soft_tokens * VisionSettings(**settings).pooling_kernel_size ** 2
    assert (ours.position_ids[real:] == -1).all() and not ours.pixel_values[real:].any()
    assert (ours.position_ids[:real] >= 0).all()


@pytest.mark.parametrize("image_format,suffix", [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"), ("BMP", "bmp")])
@pytest.mark.parametrize("size", [(40, 300), (500, 90), (1100, 1300)], ids=["wide", "tall", "large"])
def test_files_match_the_reference_on_the_decoded_image(tmp_path, image_format, suffix, size):
    path = write(tmp_path / f"picture.{suffix}", picture(*size, seed=3), image_format)
    with Image.open(path) as decoded:
        decoded.load()
        for source in (path, str(path), path.read_bytes()):
            assert_matches(prepare_image(source), decoded, {})


def test_transparency_is_composited_on_white_as_the_reference_does(tmp_path):
    rgba = Image.fromarray(picture(120, 200, channels=4), "RGBA")
    path = tmp_path / "alpha.png"
    rgba.save(path)
    assert_matches(prepare_image(path), rgba, {})
    loaded = np.asarray(load_image(path), dtype=np.int32)
    transparent = np.asarray(rgba)[..., 3] == 0
    assert transparent.any() and (loaded[transparent] == 255).all()


def test_other_modes_become_rgb(tmp_path):
    gray = Image.fromarray(picture(64, 96)[..., 0], "L")
    assert_matches(prepare_image(gray), gray, {})
    palette = Image.fromarray(picture(64, 96)).convert("P")
    palette.save(tmp_path / "palette.gif")
    with Image.open(tmp_path / "palette.gif") as decoded:
        decoded.load()
        assert_matches(prepare_image(tmp_path / "palette.gif"), decoded, {})


def test_exif_orientation_is_applied_to_files(tmp_path):
    array = picture(40, 100)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: shown turned 90 degrees clockwise
    Image.fromarray(array).save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").size == (40, 100)


def test_data_urls(tmp_path):
    path = write(tmp_path / "p.png", picture(30, 50), "PNG")
    encoded = base64.b64encode(path.read_bytes()).decode()
    from_url = prepare_image(f"data:image/png;base64,{encoded}")
    assert from_url.digest == prepare_image(path).digest
    assert decode_data_url(f"data:;base64,{encoded}") == path.read_bytes()  # no media type: allowed


def test_digest_tells_images_apart():
    first = prepare_image(Image.fromarray(picture(60, 60, seed=1)))
    second = prepare_image(Image.fromarray(picture(60, 60, seed=2)))
    again = prepare_image(Image.fromarray(picture(60, 60, seed=1)))
    assert first.digest != second.digest and first.digest == again.digest
    assert prepare_image(first) is first


# ----------------------------------------------------------------- settings


def test_settings_from_the_checkpoint(tmp_path):
    write_processor_config(tmp_path, max_soft_tokens=70, patch_size=4)
    assert VisionSettings.from_checkpoint(tmp_path) == VisionSettings(max_soft_tokens=70, patch_size=4)
    # The reference processor built from the same file agrees.
    config = json.loads((tmp_path / "processor_config.json").read_text())["image_processor"]
    config.pop("image_processor_type")
    processor = Gemma4ImageProcessorPil(**config)
    assert (processor.max_soft_tokens, processor.patch_size, processor.pooling_kernel_size) == (70, 4, 3)


def test_settings_fall_back_on_config_json_then_defaults(tmp_path):
    assert VisionSettings.from_checkpoint(tmp_path) == VisionSettings()
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": {"patch_size": 4, "pooling_kernel_size": 2}}))
    assert VisionSettings.from_checkpoint(tmp_path) == VisionSettings(patch_size=4, pooling_kernel_size=2)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"max_soft_tokens": 560}))
    assert VisionSettings.from_checkpoint(tmp_path).max_soft_tokens == 560


def test_unsupported_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="max_soft_tokens must be one of"):
        VisionSettings(max_soft_tokens=100)
    write_processor_config(tmp_path, max_soft_tokens=100)
    with pytest.raises(ValueError, match="image processor settings"):
        VisionSettings.from_checkpoint(tmp_path)


# ----------------------------------------------------------------- the prompt's image tokens


class _Processor(Gemma4Processor):
    """transformers' Gemma 4 processor without a video processor (which needs torchvision)."""

    def check_argument_for_proper_class(self, attribute_name, argument):
        if argument is not None:
            return super().check_argument_for_proper_class(attribute_name, argument)


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def mlx_tokenizer(tokenizer_dir):
    from mlx_dgemma.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


FIXTURE_TOKENS = ImageTokens(
    placeholder=SPECIAL_TOKEN_IDS["<|image|>"],
    begin=SPECIAL_TOKEN_IDS["<|image>"],
    image=SPECIAL_TOKEN_IDS["<|image|>"],
    end=SPECIAL_TOKEN_IDS["<image|>"],
)


def test_image_token_ids_from_the_tokenizer_or_config(mlx_tokenizer):
    assert image_tokens({}, mlx_tokenizer) == FIXTURE_TOKENS
    config = {"image_token_id": 300, "boi_token_id": 301, "eoi_token_id": 302}
    assert image_tokens(config, mlx_tokenizer) == ImageTokens(SPECIAL_TOKEN_IDS["<|image|>"], 301, 300, 302)


@pytest.mark.parametrize("max_soft_tokens", [70, 280])
def test_layout_matches_the_processors_expansion_of_the_template(hf_tokenizer, mlx_tokenizer, max_soft_tokens):
    from mlx_dgemma.tokenizer import encode_text, render_chat

    images = [Image.fromarray(picture(*size, seed=i)) for i, size in enumerate([(50, 400), (700, 300), (33, 33)])]
    messages = [
        {"role": "system", "content": "Look carefully."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare these"}, {"type": "image"}]},
        {"role": "assistant", "content": "They differ."},
        {"role": "user", "content": [{"type": "text", "text": "And this one?"}, {"type": "image"}]},
    ]
    settings = {"max_soft_tokens": max_soft_tokens}
    processor = _Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=Gemma4ImageProcessorPil(**settings),
        tokenizer=hf_tokenizer,
        video_processor=None,
        chat_template=hf_tokenizer.chat_template,
        image_seq_length=max_soft_tokens,
    )
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = processor(text=[text], images=[images], add_special_tokens=False, return_tensors="np")

    rendered = render_chat(mlx_tokenizer, messages, add_generation_prompt=True)
    assert rendered == text
    prepared = prepare_images(images, VisionSettings(**settings))
    ids = expand_placeholders(encode_text(mlx_tokenizer, rendered), prepared, image_tokens({}, mlx_tokenizer))
    assert ids == expected["input_ids"][0].tolist()
    spans = image_spans(ids, FIXTURE_TOKENS.image)
    assert [end - start for start, end in spans] == [image.num_soft_tokens for image in prepared]
    assert all(ids[start - 1] == FIXTURE_TOKENS.begin and ids[end] == FIXTURE_TOKENS.end for start, end in spans)
    mm_types = expected["mm_token_type_ids"][0]
    assert [i for i, kind in enumerate(mm_types) if kind == 1] == [i for s, e in spans for i in range(s, e)]
    np.testing.assert_array_equal(np.stack([p.pixel_values for p in prepared]), expected["pixel_values"])
    np.testing.assert_array_equal(np.stack([p.position_ids for p in prepared]), expected["image_position_ids"])


def test_placeholders_and_images_must_pair_up():
    image = prepare_image(Image.fromarray(picture(48, 48)), VisionSettings(max_soft_tokens=70))
    tokens = FIXTURE_TOKENS
    with pytest.raises(ValueError, match="2 image placeholders for 1 images"):
        expand_placeholders([2, tokens.placeholder, 40, tokens.placeholder], [image], tokens)
    with pytest.raises(ValueError, match="0 image placeholders for 1 images"):
        expand_placeholders([2, 40], [image], tokens)


def test_chunks_never_split_an_image():
    spans = [(10, 40), (45, 50)]
    assert chunk_ends(60, spans, 16, margin=0) == [10, 40, 56, 60]  # 16 falls inside the first run: cut before
    assert chunk_ends(60, spans, 100, margin=0) == [60]
    assert chunk_ends(60, [(0, 40)], 16, margin=0) == [40, 56, 60]  # a run at the start: cut after it
    assert chunk_ends(60, spans, 16, start=40, margin=0) == [56, 60]
    assert chunk_ends(60, spans, 100, extra=[20, 42], margin=0) == [42, 60]  # 20 is inside a run: dropped
    # With the markers around each run kept in the same call (the default).
    assert chunk_ends(60, spans, 16) == [9, 41, 57, 60]
    assert chunk_ends(60, spans, 16, start=41) == [57, 60]
    assert chunk_ends(60, spans, 100, extra=[10, 40, 41, 44, 45]) == [41, 44, 60]
    for length, chunk in [(300, 7), (300, 64), (300, 512)]:
        ends = chunk_ends(length, [(5, 100), (150, 290)], chunk)
        assert ends[-1] == length
        assert not any(s <= e <= t for e in ends for s, t in [(5, 100), (150, 290)])


# ----------------------------------------------------------------- refusals


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ValueError, match="image file not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ValueError, match="is a directory"):
        load_image(tmp_path)


def test_not_an_image(tmp_path):
    (tmp_path / "notes.png").write_text("these are not pixels")
    with pytest.raises(ValueError, match="is not an image"):
        load_image(tmp_path / "notes.png")
    with pytest.raises(ValueError, match="is empty"):
        load_image(b"")
    with pytest.raises(ValueError, match="is not an image"):
        load_image(b"GIF89a but then nothing")


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
def test_truncated_file(tmp_path, image_format):
    path = write(tmp_path / "full", picture(200, 300), image_format)
    data = path.read_bytes()
    (tmp_path / "cut").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="could not be decoded"):
        load_image(tmp_path / "cut")


@pytest.mark.parametrize("image_format", ["ICO", "PPM", "TGA"])
def test_unsupported_format(tmp_path, image_format):
    path = tmp_path / "picture"
    Image.fromarray(picture(32, 32)).save(path, format=image_format)
    with pytest.raises(ValueError, match=f"is a {image_format} image, which is not supported"):
        load_image(path)


def test_pixel_cap(tmp_path):
    # A bilevel PNG is small on disk however many pixels it claims; the header is checked before decoding.
    Image.new("1", (8000, 7000)).save(tmp_path / "big.png")
    assert 8000 * 7000 > MAX_IMAGE_PIXELS
    with pytest.raises(ValueError, match="is 8000x7000 pixels .* the limit is 50 MP"):
        load_image(tmp_path / "big.png")
    with pytest.raises(ValueError, match="the limit is 0.001 MP"):
        prepare_image(Image.new("RGB", (40, 40)), max_pixels=1000)


def test_pillows_decompression_bomb_limit_is_respected(tmp_path, monkeypatch):
    write(tmp_path / "p.png", picture(100, 100), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    with pytest.raises(ValueError, match="too large to decode safely|the limit is 0.005 MP"):
        load_image(tmp_path / "p.png")


def test_bad_data_urls_and_sources():
    with pytest.raises(ValueError, match="not valid base64"):
        load_image("data:image/png;base64,!!!not base64!!!")
    with pytest.raises(ValueError, match="must be base64"):
        load_image("data:image/png,rawbytes")
    with pytest.raises(ValueError, match="is not an image"):
        load_image("data:text/plain;base64,aGVsbG8=")
    with pytest.raises(ValueError, match="not an image"):
        load_image("data:image/png;base64,aGVsbG8=")
    with pytest.raises(ValueError, match="remote image URLs are not fetched"):
        load_image("https://example.com/cat.png")
    with pytest.raises(ValueError, match="not int"):
        load_image(42)


def test_several_images_name_the_bad_one(tmp_path):
    good = Image.fromarray(picture(30, 30))
    with pytest.raises(ValueError, match="^image 2: image file not found"):
        prepare_images([good, tmp_path / "missing.jpg"])


def test_empty_pil_image():
    with pytest.raises(ValueError, match="is empty"):
        prepare_image(Image.new("RGB", (0, 0)))


def test_the_pixel_bytes_are_what_pillow_decodes(tmp_path):
    """A JPEG round trip through bytes in memory is the same as through the file."""
    buffer = io.BytesIO()
    Image.fromarray(picture(80, 120)).save(buffer, format="JPEG")
    (tmp_path / "p.jpg").write_bytes(buffer.getvalue())
    assert prepare_image(buffer.getvalue()).digest == prepare_image(tmp_path / "p.jpg").digest
