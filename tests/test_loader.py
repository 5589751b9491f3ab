"""Loading: clear one-line errors for what users get wrong."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import pytest
from checkpoints import build_reference_model, save_reference_checkpoint

import mlx_dgemma
from mlx_dgemma.config import ConfigError, ModelConfig
from mlx_dgemma.loader import LoadError, resolve_model_path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_reference_checkpoint(build_reference_model(seed=41), tmp_path_factory.mktemp("loader") / "ck")


def one_line(error: Exception) -> str:
    text = str(error)
    assert "\n" not in text
    return text


def test_load_without_tokenizer_files_says_so(checkpoint):
    with pytest.raises(LoadError) as raised:
        mlx_dgemma.load(checkpoint)
    assert "no tokenizer" in one_line(raised.value)


def test_weights_that_do_not_match_the_config(checkpoint, tmp_path):
    broken = shutil.copytree(checkpoint, tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    config["text_config"]["moe_intermediate_size"] = 48
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError) as raised:
        mlx_dgemma.load_model(broken)
    assert "do not match config.json" in one_line(raised.value)


def test_a_missing_tensor_is_named(checkpoint, tmp_path):
    broken = shutil.copytree(checkpoint, tmp_path / "missing")
    (file,) = broken.glob("*.safetensors")
    weights = mx.load(str(file))
    missing = "model.decoder.layers.2.self_attn.k_norm.weight"
    del weights[missing]
    mx.save_safetensors(str(file), weights, metadata={"format": "pt"})
    with pytest.raises(LoadError) as raised:
        mlx_dgemma.load_model(broken)
    assert "do not match config.json" in one_line(raised.value) and missing in str(raised.value)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(model_type="gemma4"), "unsupported model_type"),
        (lambda c: c["text_config"].update(use_bidirectional_attention="all"), "use_bidirectional_attention"),
        (lambda c: c["text_config"].update(top_k_experts=99), "exceeds num_experts"),
        (lambda c: c.pop("text_config"), "no 'text_config'"),
        (lambda c: c["text_config"].update(layer_types=["full_attention"]), "layer_types"),
    ],
)
def test_config_errors(checkpoint, change, message):
    config = json.loads((checkpoint / "config.json").read_text())
    change(config)
    with pytest.raises(ConfigError) as raised:
        ModelConfig.from_dict(config)
    assert message in one_line(raised.value)


def test_missing_directory_and_offline_hub(monkeypatch, tmp_path):
    with pytest.raises(LoadError, match="no model directory"):
        resolve_model_path(tmp_path / "nowhere")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(LoadError) as raised:
        resolve_model_path("someone/not-cached-anywhere")
    text = one_line(raised.value)
    assert "local checkpoint directory" in text and "HF_HUB_OFFLINE" in text


def test_both_config_spellings_give_the_same_shapes(tmp_path):
    model = build_reference_model(seed=42)
    released = ModelConfig.from_path(save_reference_checkpoint(model, tmp_path / "a", spelling="released"))
    per_layer = ModelConfig.from_path(save_reference_checkpoint(model, tmp_path / "b", spelling="per_layer"))
    assert released.text.layers == per_layer.text.layers
    assert [layer.head_dim for layer in released.text.layers] == [16] * 5 + [32]
