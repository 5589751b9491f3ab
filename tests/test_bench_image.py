"""`python -m bench image`: one image encoded by us and by mlx-vlm on the same pixels and weights."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import image
from bench.cli import main
from bench.shapes import PRESETS, VISION


def test_quick_image_bench_runs_both_runtimes_and_their_soft_tokens_agree(tmp_path):
    assert main(["image", "--shape", "quick", "--repeats", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "quick.json").read_text())
    assert list(report["runtimes"]) == ["us", "mlx-vlm"]
    for name, result in report["runtimes"].items():
        assert result["status"] == "ok", (name, result.get("error"))
        for key in ("tower_cold_s", "tower_s", "prefill_cold_s", "prefill_s", "encode_s"):
            assert result[key] > 0, (name, key)
    soft = report["image"]["soft_tokens"]
    assert soft > 0 and report["image"]["prompt_tokens"] == soft + image.TEXT_BEFORE + image.TEXT_AFTER + 3
    assert report["runtimes"]["us"]["features_shape"] == report["runtimes"]["mlx-vlm"]["features_shape"]
    assert report["features_max_abs_diff"] < 1e-5
    markdown = (tmp_path / "quick.md").read_text()
    assert "python -m bench image --shape quick" in markdown and "BLAS" in markdown
    assert "| tower, warm median (ms) |" in markdown and "| encode: pixels to cache, warm median (ms) |" in markdown
    assert "max abs diff" in markdown


def test_mlx_vlm_gets_the_same_patches_from_the_channel_first_image():
    vision, budget, (width, height) = VISION["quick"]
    from mlx_dgemma.images import VisionSettings, prepare_image

    patch = vision["patch_size"]
    settings = VisionSettings(patch_size=patch, pooling_kernel_size=vision["pooling_kernel_size"], max_soft_tokens=70)
    prepared = prepare_image(image.synthetic_image(width, height, 3), settings)
    picture = image.channel_first(prepared.pixel_values, prepared.position_ids, patch)
    assert picture.shape == (3, *prepared.size)
    # mlx-vlm's patchify of a (channels, height, width) image: rows of patches, each patch's pixels row-major with
    # the channels innermost.
    rows, columns = picture.shape[1] // patch, picture.shape[2] // patch
    patches = picture.reshape(3, rows, patch, columns, patch).transpose(1, 3, 2, 4, 0).reshape(rows * columns, -1)
    real = prepared.position_ids[:, 0] >= 0
    np.testing.assert_array_equal(patches, prepared.pixel_values[real])


def test_synthetic_weights_give_both_runtimes_the_same_tower():
    """The released shape's path (random weights in memory, text quantized, the tower float) at the quick size."""
    import mlx.core as mx

    vision = VISION["quick"][0]
    shape = PRESETS["quick"]
    config = {**shape.config_dict(), "vision_config": vision, **image.TEST_IMAGE_TOKENS}
    spec = {"config": config, "dtype": "float32", "bits": 4, "group_size": 32, "seed": 0}
    ours, theirs = image._synthetic("us", spec), image._synthetic("mlx-vlm", spec)
    assert type(ours.model.decoder.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"
    pixels = np.random.default_rng(0).random((3, 24, 36), dtype=np.float32)
    patch = vision["patch_size"]
    grid = np.stack(np.meshgrid(np.arange(36 // patch), np.arange(24 // patch), indexing="xy"), -1).reshape(-1, 2)
    patches = pixels.reshape(3, 24 // patch, patch, 36 // patch, patch).transpose(1, 3, 2, 4, 0).reshape(len(grid), -1)
    a = ours.image_features(patches, grid)
    b = theirs.model.encoder.get_image_features(mx.array(pixels[None]))[0]
    assert a.shape == b.shape == (6, shape.text["hidden_size"])
    np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5)


def test_image_size_is_checked(tmp_path):
    for size in ("640", "0x480", "axb"):
        with pytest.raises(SystemExit) as exit_:
            main(["image", "--shape", "quick", "--image-size", size, "--out", str(tmp_path)])
        assert exit_.value.code == 2
