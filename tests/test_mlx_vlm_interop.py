"""Community MLX conversions (mlx-vlm 0.7.10) and ours load in both tools."""

from __future__ import annotations

import importlib

import mlx.core as mx
import pytest
import torch
from checkpoints import build_reference_model, save_reference_checkpoint
from mlx.utils import tree_flatten
from test_precision import agreement, our_logits, reference_logits
from test_vision import SIZES, our_features, process, reference_features, relative_error
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

import mlx_dgemma
from mlx_dgemma.convert import convert_checkpoint

mlx_vlm_convert = pytest.importorskip("mlx_vlm.convert")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    reference = build_reference_model(seed=3, well_conditioned=True).eval()
    reference.config._attn_implementation = "eager"
    path = save_reference_checkpoint(reference, tmp_path_factory.mktemp("interop-src"), dtype=torch.bfloat16)
    reference = reference.float()
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 384, (1, 30), generator=generator)
    canvas = torch.randint(0, 384, (1, 16), generator=generator)
    return reference, path, prompt, canvas


def test_we_load_an_mlx_vlm_4bit_conversion(source, tmp_path):
    reference, path, prompt, canvas = source
    importlib.import_module("mlx_vlm.convert").convert(
        hf_path=str(path), mlx_path=str(tmp_path / "vlm"), quantize=True, q_bits=4, q_group_size=32
    )
    model = mlx_dgemma.load_model(tmp_path / "vlm")
    # mlx-vlm quantizes the router and the embedding too: check we did take its quantized layers.
    assert isinstance(model.embed_tokens, mlx_dgemma.model.nn.QuantizedEmbedding)
    assert model.layers[0].experts.gate_up_proj.bits == 4
    # It keeps the vision tower in float, under the reference's names: the tower loads and reads images.
    batch = process(Gemma4ImageProcessorPil(patch_size=4, max_soft_tokens=70, pooling_kernel_size=3), SIZES[:1])
    assert relative_error(our_features(model, batch), reference_features(reference, batch)) < 0.06
    first, second = reference_logits(reference, prompt, canvas)
    for ours, expected in zip(our_logits(model, prompt, canvas, first), (first, second)):
        worst, mean, top1 = agreement(ours, expected)
        assert worst >= 0.9 and mean >= 0.95 and top1 >= 0.6, (worst, mean, top1)


def test_mlx_vlm_loads_our_conversion(source, tmp_path):
    _, path, _, _ = source
    ours = convert_checkpoint(path, tmp_path / "ours", bits=4, group_size=32)
    vlm_model = importlib.import_module("mlx_vlm.utils").load_model(ours)
    vlm_params = dict(tree_flatten(vlm_model.parameters()))
    stored = {}
    for file in sorted(ours.glob("*.safetensors")):
        stored.update(mx.load(str(file)))
    text_keys = [key for key in stored if key.startswith("model.decoder.")]
    assert text_keys and all(key in vlm_params for key in text_keys)
    for key in text_keys:
        loaded, written = vlm_params[key], stored[key]
        assert loaded.dtype == written.dtype and mx.array_equal(loaded, written).item(), key
    # Its layers were quantized as our config says: 4-bit experts, 8-bit attention.
    layer = vlm_model.model.decoder.layers[0]
    assert layer.experts.gate_up_proj.bits == 4 and layer.self_attn.q_proj.bits == 8
