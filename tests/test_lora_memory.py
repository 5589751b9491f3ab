"""The memory plan `dgemma lora` makes before training: the released shape at 4 bits fits a 32 GB Mac with
gradient checkpointing (and not without), a plan too big for the machine is refused in one line saying what would
fit, --plan-only prints the plan without loading the model, and the chunked head loss equals the plain one."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from checkpoints import build_reference_model, save_reference_checkpoint
from mlx.utils import tree_flatten
from tokenizer_fixture import write_tokenizer

import mlx_dgemma.loader
from bench.lora import converted_config
from bench.shapes import PRESETS
from mlx_dgemma import load_model
from mlx_dgemma.cli import lora as lora_command
from mlx_dgemma.config import ModelConfig
from mlx_dgemma.lora import memory as lora_memory
from mlx_dgemma.lora import objective
from mlx_dgemma.lora.adapters import LoraSettings, add_lora
from mlx_dgemma.lora.memory import TrainingShape, adapter_parameter_count, training_plan
from mlx_dgemma.lora.objective import BlockNoise, Example, loss_parts, make_batch
from mlx_dgemma.memory import config_weight_bytes

GB = 1000**3
# Metal's recommended working set on a 32 GB Mac: two thirds of its 32 GiB.
MAC_32GB_USABLE = 2 * 32 * 2**30 // 3


def _released_4_bit() -> ModelConfig:
    """config.json as `dgemma convert --bits 4` writes it for the released shape."""
    return converted_config(PRESETS["released"].text, PRESETS["released"].canvas_length)


def test_the_released_shape_at_4_bits_fits_a_32_gb_mac_with_gradient_checkpointing():
    config = _released_4_bit()
    weights = config_weight_bytes(config)
    assert 15 * GB < weights < 16 * GB  # 26B parameters, experts at 4 bits, the rest at 8
    settings = LoraSettings(rank=8)
    # q, k, v (sliding layers), o, gate, up, down of 30 layers: rank x (in + out) each.
    assert adapter_parameter_count(config, settings) == 9_292_800
    # Batch 1 of the default --max-seq-length, every token but the first a response token (the worst case).
    shape = TrainingShape(batch=1, length=2048, responses=2047, grad_checkpoint=True)
    with_checkpointing = training_plan(config, settings, shape)
    without = training_plan(config, settings, TrainingShape(1, 2048, 2047, grad_checkpoint=False))
    assert with_checkpointing.weights == weights
    assert with_checkpointing.total < MAC_32GB_USABLE < without.total
    assert without.total > 2.5 * with_checkpointing.total
    # The float32 logits of a 262144 vocabulary: unchunked, 6 arrays of 2303 positions x 1 MB.
    assert without.logits == 6 * (256 + 2047) * 262144 * 4
    assert with_checkpointing.logits == 6 * (256 + 256) * 262144 * 4
    assert 22.0 * GB < with_checkpointing.total < 22.9 * GB, with_checkpointing.describe()


def test_the_plan_grows_with_what_a_step_holds():
    config = converted_config(PRESETS["bench"].text, 256, dtype="float32")
    settings = LoraSettings(rank=8)
    base = training_plan(config, settings, TrainingShape(1, 512, 256))
    assert training_plan(config, settings, TrainingShape(2, 512, 256)).activations > 1.9 * base.activations
    assert training_plan(config, settings, TrainingShape(1, 1024, 256)).layers > 1.8 * base.layers
    assert training_plan(config, LoraSettings(rank=16), TrainingShape(1, 512, 256)).adapter == 2 * base.adapter
    experts = LoraSettings(rank=8, keys=settings.keys + ("experts.gate_up_proj", "experts.down_proj"))
    # Per expert: rank x (hidden + 2 x moe) for gate|up, rank x (moe + hidden) for down.
    per_layer = 32 * 8 * ((512 + 2 * 256) + (256 + 512))
    assert adapter_parameter_count(config, experts) == base.adapter_parameters + 6 * per_layer
    assert training_plan(config, settings, TrainingShape(1, 512, 256), optimizer="sgd").adapter == base.adapter // 2


# ----------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-memory")
    path = save_reference_checkpoint(build_reference_model(seed=7, canvas_length=8), root / "ck")
    write_tokenizer(path)
    data = root / "data"
    data.mkdir()
    lines = [json.dumps({"prompt": p, "completion": c}) for p, c in (("apple", "red"), ("sky", "blue"))]
    for name in ("train", "valid"):
        (data / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return path, data


def _dgemma(capsys, *argv):
    from mlx_dgemma.cli import main

    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _machine(monkeypatch, available: int) -> None:
    monkeypatch.setattr(lora_memory, "available_memory", lambda: (available, "test memory"))
    monkeypatch.setattr(lora_command, "available_memory", lambda: (available, "test memory"))
    monkeypatch.setattr(mlx_dgemma.loader, "load_model", lambda *a, **k: pytest.fail("loaded a model"))


def _plan(path: Path, data: Path, batch: int, checkpoint: bool):
    from mlx_dgemma.lora.data import load_datasets
    from mlx_dgemma.tokenizer import load_tokenizer

    datasets = load_datasets(data, load_tokenizer(path), 2048)
    shape = lora_command._training_shape(datasets, batch, 2048, checkpoint)
    return training_plan(path, LoraSettings(rank=8), shape)


@pytest.mark.parametrize("room", ["checkpointing", "batch 1", "nothing"])
def test_a_plan_that_cannot_fit_is_refused_in_one_line(tiny, tmp_path, capsys, monkeypatch, room):
    path, data = tiny
    if room == "checkpointing":
        available = _plan(path, data, 2, True).total + 1
        expected = "try --grad-checkpoint (about "
    elif room == "batch 1":
        available = _plan(path, data, 1, True).total + 1
        expected = "try --grad-checkpoint --batch-size 1 (about "
    else:
        available = 1000
        expected = "use a smaller quantization"
    assert _plan(path, data, 2, False).total > available
    _machine(monkeypatch, available)
    out = tmp_path / "adapters"
    argv = ["lora", "--model", str(path), "--data", str(data), "--batch-size", "2", "--adapter-path", str(out)]
    code, _, err = _dgemma(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith("error: training needs about ") and "(test memory)" in lines[0], lines[0]
    assert expected in lines[0], lines[0]
    assert not out.exists()


def test_a_shorter_max_seq_length_is_suggested(tiny, capsys, monkeypatch):
    path, _ = tiny
    settings = LoraSettings(rank=8)
    config = ModelConfig.from_path(path)
    fits = training_plan(path, settings, TrainingShape(1, 512, 511, True)).total
    assert training_plan(path, settings, TrainingShape(1, 1024, 1023, True)).total > fits
    assert config.text.max_position_embeddings >= 2048
    _machine(monkeypatch, fits + 1)
    # --plan-only reports, never refuses.
    code, out, _ = _dgemma(capsys, "lora", "--model", str(path), "--plan-only", "--grad-checkpoint")
    assert code == 0 and out.count("does not fit") == 2, out
    code, _, err = _dgemma(capsys, "lora", "--model", str(path), "--data", "/nonexistent", "--plan-only")
    assert code == 1 and "no data directory" in err
    with pytest.raises(lora_memory.TrainingMemoryError, match=r"try --max-seq-length 512 \(about "):
        lora_memory.plan_for_machine(path, settings, TrainingShape(1, 2048, 2047, True), max_seq_length=2048)


def test_plan_only_prints_both_plans_without_loading(tiny, capsys, monkeypatch):
    path, data = tiny
    _machine(monkeypatch, 10**12)
    code, out, _ = _dgemma(capsys, "lora", "--model", str(path), "--plan-only", "--grad-checkpoint")
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 2, out
    assert lines[0].startswith("memory plan: ") and "with gradient checkpointing: fits" in lines[0]
    assert "x 2048 tokens, without gradient checkpointing: fits" in lines[1]
    code, out, _ = _dgemma(capsys, "lora", "--model", str(path), "--data", str(data), "--plan-only")
    assert code == 0 and "without gradient checkpointing" in out.splitlines()[0]


def test_training_prints_the_plan_first(tiny, tmp_path, capsys):
    path, data = tiny
    argv = ["lora", "--model", str(path), "--data", str(data), "--iters", "1", "--batch-size", "2"]
    code, _, err = _dgemma(capsys, *argv, "--adapter-path", str(tmp_path / "a"), "--steps-per-eval", "0")
    assert code == 0
    assert err.splitlines()[0].startswith("memory plan: "), err


# ----------------------------------------------------------------- the chunked head loss


def test_the_chunked_head_loss_equals_the_plain_one(tiny, monkeypatch):
    """Under gradient checkpointing the head's cross-entropy goes through a few positions at a time: the loss and
    the LoRA gradients are the plain computation's."""
    path, _ = tiny
    monkeypatch.setattr(objective, "LOGIT_CHUNK", 7)
    model = load_model(path)
    add_lora(model, LoraSettings(rank=4))
    mx.random.seed(1)
    for _, module in model.named_modules():
        if hasattr(module, "lora_b"):
            module.lora_b = 0.05 * mx.random.normal(module.lora_b.shape)
    rng = np.random.default_rng(1)
    vocab = model.text_config.vocab_size
    examples = [Example(tuple(rng.integers(5, vocab, n).tolist()), start) for n, start in ((31, 9), (20, 14))]
    batch = make_batch(examples, BlockNoise.draw(rng, examples, 8, vocab, self_conditioning=1.0), 8, 1)
    results = {}
    for checkpoint in (False, True):
        loss, grads = nn.value_and_grad(model, lambda m, c=checkpoint: loss_parts(m, batch, 0.5, c).loss)(model)
        results[checkpoint] = (loss.item(), dict(tree_flatten(grads)))
    assert results[True][0] == pytest.approx(results[False][0], abs=1e-5)
    for name, grad in results[False][1].items():
        assert np.allclose(np.array(results[True][1][name]), np.array(grad), atol=1e-5), name


def test_plan_only_needs_only_config_json(tmp_path, capsys, monkeypatch):
    """The released shape's plan from a directory holding only the config.json its 4-bit conversion has."""
    _machine(monkeypatch, MAC_32GB_USABLE)
    (tmp_path / "config.json").write_text(json.dumps(_released_4_bit().raw))
    argv = ["lora", "--model", str(tmp_path), "--plan-only", "--grad-checkpoint", "--batch-size", "1"]
    code, out, _ = _dgemma(capsys, *argv)
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 2, out
    assert "weights 15.4 GB" in lines[0] and "with gradient checkpointing: fits" in lines[0]
    assert "without gradient checkpointing: does not fit" in lines[1]
    code, _, err = _dgemma(capsys, "lora", "--model", str(tmp_path), "--data", str(tmp_path), "--plan-only")
    assert code == 1 and "no tokenizer" in err
