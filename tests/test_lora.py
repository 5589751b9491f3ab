"""`dgemma lora`: the block-diffusion objective against the reference model, LoRA gradients against torch
autograd, training on a small task, adapters saved, resumed and refused, and the command's errors."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from checkpoints import build_reference_model, save_reference_checkpoint
from mlx.utils import tree_flatten
from transformers import DynamicCache

from mlx_dgemma import load_model
from mlx_dgemma.lora.adapters import LoraSettings, add_lora
from mlx_dgemma.lora.objective import BlockNoise, Example, loss_parts, make_batch

CANVAS = 8
EOS = 1


@pytest.fixture(scope="module")
def reference_checkpoint(tmp_path_factory):
    # A window (12) shorter than the contexts below, so sliding layers read only their last 11 positions.
    reference = build_reference_model(seed=5, canvas_length=CANVAS, well_conditioned=True).eval()
    reference.config._attn_implementation = "eager"
    path = save_reference_checkpoint(reference, tmp_path_factory.mktemp("lora-parity"))
    return reference, path


def _parity_case(vocab: int):
    rng = np.random.default_rng(11)
    examples = [
        Example(tuple(rng.integers(5, vocab, 31).tolist()), 9),  # a 22-token response: three blocks
        Example(tuple(rng.integers(5, vocab, 20).tolist()), 14),  # 6 tokens: one block, EOS-filled
        Example(tuple(rng.integers(5, vocab, 25).tolist()), 6),
    ]
    noise = BlockNoise.draw(rng, examples, CANVAS, vocab)
    noise = BlockNoise(
        block=np.array([1, 0, 2]),
        t=noise.t,
        u=noise.u,
        replacement=noise.replacement,
        self_condition=np.array([True, False, True]),
    )
    return examples, noise


def _torch_objective(reference, examples, batch, ar_weight):
    """The objective written from the reference model's own encoder and decoder, one example at a time."""
    canvas = torch.tensor(np.array(batch.canvas), dtype=torch.long)
    targets = torch.tensor(np.array(batch.targets), dtype=torch.long)
    coins = batch.self_condition
    text_config = reference.config.get_text_config(decoder=True)
    cross_entropy, ar_sum, ar_count = 0.0, 0.0, 0
    for row, example in enumerate(examples):
        start = example.response_start + int(_blocks[row]) * CANVAS
        cache = DynamicCache(config=text_config)
        reference.model.encoder(input_ids=torch.tensor([example.tokens[:start]]), past_key_values=cache)
        kwargs = {}
        if coins[row]:
            with torch.no_grad():
                first = reference(past_key_values=cache, decoder_input_ids=canvas[row : row + 1]).logits
            kwargs = dict(self_conditioning_logits=first.detach(), self_conditioning_mask=torch.tensor([True]))
        logits = reference(past_key_values=cache, decoder_input_ids=canvas[row : row + 1], **kwargs).logits
        cross_entropy = cross_entropy + F.cross_entropy(logits[0], targets[row], reduction="sum")
        # The autoregressive term: the encoder over the clean sequence, the tied head, the soft-cap.
        hidden = reference.model.encoder(input_ids=torch.tensor([example.tokens])).last_hidden_state
        cap = reference.config.text_config.final_logit_softcapping
        ar_logits = torch.tanh(reference.lm_head(hidden[0]).float() / cap) * cap
        s = example.response_start
        ar_sum = ar_sum + F.cross_entropy(ar_logits[s - 1 : -1], torch.tensor(example.tokens[s:]), reduction="sum")
        ar_count += len(example.tokens) - s
    diffusion = cross_entropy / (len(examples) * CANVAS)
    return diffusion + ar_weight * ar_sum / ar_count, diffusion


_blocks: np.ndarray = np.array([])


def test_loss_matches_the_reference_model(reference_checkpoint):
    global _blocks
    reference, path = reference_checkpoint
    model = load_model(path)
    examples, noise = _parity_case(model.text_config.vocab_size)
    _blocks = noise.block
    batch = make_batch(examples, noise, CANVAS, EOS)
    assert batch.padded and batch.context == 22  # rows left-padded so their blocks line up
    parts = loss_parts(model, batch, ar_weight=0.7)
    with torch.no_grad():
        expected, diffusion = _torch_objective(reference, examples, batch, 0.7)
    assert parts.diffusion.item() == pytest.approx(diffusion.item(), abs=1e-4)
    assert parts.loss.item() == pytest.approx(expected.item(), abs=1e-4)
    assert parts.canvas_tokens.item() == 3 * CANVAS


def _lora_hooks(reference, model, scale):
    """Give the torch model the MLX model's LoRA deltas: a forward hook adding scale·(x A) B on every adapted
    linear, encoder and decoder copies alike (they share the weights). Returns {mlx name: (A, B)} leaves."""
    leaves, handles = {}, []
    decoder = reference.model.decoder.layers
    encoder = reference.model.encoder.language_model.layers
    for name, module in model.named_modules():
        if not hasattr(module, "lora_a"):
            continue
        index, path = name.split("layers.", 1)[1].split(".", 1)
        a = torch.tensor(np.array(module.lora_a), requires_grad=True)
        b = torch.tensor(np.array(module.lora_b), requires_grad=True)
        leaves[name] = (a, b)
        for stack in (decoder, encoder):
            target = stack[int(index)].get_submodule(path)

            def hook(_module, inputs, output, a=a, b=b):
                return output + scale * ((inputs[0] @ a) @ b)

            handles.append(target.register_forward_hook(hook))
    return leaves, handles


def test_lora_gradients_match_torch_autograd(reference_checkpoint):
    global _blocks
    reference, path = reference_checkpoint
    model = load_model(path)
    add_lora(model, LoraSettings(rank=4, scale=2.0))
    # Non-zero B (mlx-lm starts it at zero) so every factor's gradient is non-trivial.
    mx.random.seed(3)
    for _, module in model.named_modules():
        if hasattr(module, "lora_b"):
            module.lora_b = 0.05 * mx.random.normal(module.lora_b.shape)
    examples, noise = _parity_case(model.text_config.vocab_size)
    _blocks = noise.block
    batch = make_batch(examples, noise, CANVAS, EOS)

    def loss_fn(model):
        return loss_parts(model, batch, ar_weight=0.5).loss

    loss, grads = nn.value_and_grad(model, loss_fn)(model)
    grads = dict(tree_flatten(grads))
    leaves, handles = _lora_hooks(reference, model, 2.0)
    try:
        expected, _ = _torch_objective(reference, examples, batch, 0.5)
        expected.backward()
    finally:
        for handle in handles:
            handle.remove()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-4)
    assert len(leaves) == 6 * 7 - 1  # q, k, v, o, gate, up, down in six layers; the full layer has no v_proj
    worst = 0.0
    for name, (a, b) in leaves.items():
        for leaf, tensor in (("lora_a", a), ("lora_b", b)):
            ours = np.array(grads[f"{name}.{leaf}"])
            theirs = tensor.grad.numpy()
            scale = max(np.abs(theirs).max(), 1e-3)
            worst = max(worst, np.abs(ours - theirs).max() / scale)
            assert np.abs(ours - theirs).max() <= 1e-3 * scale + 1e-5, f"{name}.{leaf}"
    assert math.isfinite(worst)


# ----------------------------------------------------------------- training on a small task

import json  # noqa: E402
from pathlib import Path  # noqa: E402

from tokenizer_fixture import write_tokenizer  # noqa: E402

import mlx_dgemma  # noqa: E402
from mlx_dgemma.lora.adapters import AdapterError, adapter_config, apply_adapter  # noqa: E402
from mlx_dgemma.lora.data import load_datasets  # noqa: E402
from mlx_dgemma.lora.fuse import fuse_checkpoint  # noqa: E402
from mlx_dgemma.lora.trainer import Trainer, TrainingConfig  # noqa: E402

TASK = {"apple": "red", "sky": "one", "grass": "cat"}  # two tokens each


def _write_task(directory: Path, records=None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    lines = records or [json.dumps({"prompt": k, "completion": v}) for k, v in TASK.items()]
    for name in ("train", "valid"):
        (directory / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return directory


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A tiny checkpoint that LoRA can teach quickly (a sharp head, a window covering the prompts), a tokenizer,
    and the task's data."""
    root = tmp_path_factory.mktemp("lora-task")
    reference = build_reference_model(seed=7, canvas_length=CANVAS, sliding_window=64, final_norm_gain=16.0)
    path = save_reference_checkpoint(reference, root / "ck")
    write_tokenizer(path)
    return path, _write_task(root / "data")


def _trainer(path, data, adapters, iters, settings=None, **overrides):
    model, tokenizer = mlx_dgemma.load(path)
    settings = settings or LoraSettings(rank=16)
    count = add_lora(model, settings, seed=0)
    sets = load_datasets(data, tokenizer, 256)
    options = dict(iters=iters, batch_size=3, learning_rate=3e-3, steps_per_report=1, steps_per_eval=0, save_every=4)
    config = TrainingConfig(**{**options, **overrides})
    trainer = Trainer(
        model,
        sets,
        config,
        adapters,
        adapter_config(model, settings, count, path, {}),
        tokenizer.eos_token_id,
        report=lambda line: None,
    )
    return model, tokenizer, trainer


def _answers(model, tokenizer):
    """Each prompt's reply with the normal sampler (fixed seed): {prompt: (text, tokens)}."""
    replies = {}
    for prompt in TASK:
        result = mlx_dgemma.generate(
            model, tokenizer, [{"role": "user", "content": prompt}], max_new_tokens=CANVAS, steps=8, seed=0
        )
        replies[prompt] = (result.text, result.tokens)
    return replies


def test_training_teaches_the_task(task, tmp_path):
    """LoRA learns the fixed mapping: generation with the adapter (trained in memory, reloaded from its files, and
    fused into the weights by `dgemma fuse`) gives every trained answer exactly, which the base model does not.

    The decoder has to learn from scratch which canvas position holds which token (RoPE alone tells them apart
    when the canvas is noise): with rank 16 and 60 to 200 steps it knew the answers' tokens but not their places
    ("atat" for "cat"); rank 32 at scale 40 and 200 steps of 1e-3 learn the places too."""
    path, data = task
    adapters = tmp_path / "adapters"
    settings = LoraSettings(rank=32, scale=40.0)
    model, tokenizer, trainer = _trainer(
        path, data, adapters, 200, settings, learning_rate=1e-3, steps_per_eval=100, val_batches=-1, save_every=200
    )
    base = _answers(*mlx_dgemma.load(path))
    assert all(base[prompt][0] != answer for prompt, answer in TASK.items()), base
    result = trainer.run()
    val = [entry["val_loss"] for entry in result.history if "val_loss" in entry]
    assert len(val) == 3 and val[-1] < val[0] / 20, val
    assert result.tokens_per_second > 0 and result.peak_memory > 0
    trained = _answers(model, tokenizer)
    assert {prompt: text for prompt, (text, _) in trained.items()} == TASK
    # The saved adapter, loaded with the model, answers as the trained model does, token for token.
    assert _answers(*mlx_dgemma.load(path, adapter_path=adapters)) == trained
    # So does the model `dgemma fuse` writes with the adapter merged into its weights.
    fused = fuse_checkpoint(path, adapters, tmp_path / "fused").path
    assert _answers(*mlx_dgemma.load(fused)) == trained


def test_resume_continues_identically(task, tmp_path):
    path, data = task
    _, _, straight = _trainer(path, data, tmp_path / "straight", 8)
    straight_losses = [entry["train_loss"] for entry in straight.run().history]
    _, _, first = _trainer(path, data, tmp_path / "resumed", 8)
    stopped = first.run(stop=lambda: len(first.history) >= 4)  # as a Ctrl-C after the fourth step does
    assert stopped.interrupted and stopped.iteration == 4
    state = json.loads((tmp_path / "resumed" / "training_state.json").read_text())
    assert state["iteration"] == 4
    _, _, second = _trainer(path, data, tmp_path / "resumed", 8)
    resumed = second.run(resume=True)
    assert resumed.iteration == 8 and not resumed.interrupted
    losses = [entry["train_loss"] for entry in first.history + second.history]
    assert losses == straight_losses


def test_the_compiled_step_trains_as_the_plain_one(task, tmp_path):
    path, data = task
    runs = {}
    for compiled in (True, False):
        _, _, trainer = _trainer(path, data, tmp_path / str(compiled), 4, compile=compiled)
        runs[compiled] = [entry["train_loss"] for entry in trainer.run().history]
    assert runs[True] == pytest.approx(runs[False], rel=1e-4)


def test_qlora_and_expert_adapters_train(task, tmp_path):
    path, data = task
    model, tokenizer = mlx_dgemma.load(path)
    nn.quantize(
        model,
        group_size=32,
        bits=4,
        class_predicate=lambda p, m: p.startswith("model.decoder.layers") and hasattr(m, "to_quantized"),
    )
    settings = LoraSettings(
        rank=4, keys=("self_attn.q_proj", "self_attn.v_proj", "experts.gate_up_proj", "experts.down_proj")
    )
    count = add_lora(model, settings)
    assert isinstance(model.layers[0].self_attn.q_proj.linear, nn.QuantizedLinear)
    assert type(model.layers[0].experts.gate_up_proj.linear).__name__ == "QuantizedSwitchLinear"
    sets = load_datasets(data, tokenizer, 256)
    config = TrainingConfig(
        iters=6, batch_size=3, learning_rate=3e-3, steps_per_report=1, steps_per_eval=0, grad_checkpoint=True
    )
    trainer = Trainer(
        model,
        sets,
        config,
        tmp_path / "q",
        adapter_config(model, settings, count, path, {}),
        tokenizer.eos_token_id,
        report=lambda line: None,
    )
    losses = [entry["train_loss"] for entry in trainer.run().history]
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    names = [name for name, _ in tree_flatten(model.trainable_parameters())]
    assert any("experts.gate_up_proj.lora_a" in name for name in names)
    assert not any("router" in name for name in names)


def test_adapters_for_another_base_are_refused(task, tmp_path):
    path, data = task
    _, _, trainer = _trainer(path, data, tmp_path / "a", 1)
    trainer.run()
    other = save_reference_checkpoint(
        build_reference_model(seed=8, canvas_length=CANVAS, sliding_window=64, final_norm_gain=16.0), tmp_path / "o"
    )
    with pytest.raises(AdapterError, match="another checkpoint of this shape"):
        apply_adapter(load_model(other), tmp_path / "a")
    wider = save_reference_checkpoint(
        build_reference_model(seed=7, canvas_length=CANVAS, hidden_size=32), tmp_path / "w"
    )
    with pytest.raises(AdapterError, match="hidden_size 64 there, 32 here"):
        apply_adapter(load_model(wider), tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    config["lora_parameters"]["rank"] = 8
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="another rank"):
        apply_adapter(load_model(path), tmp_path / "a")
    with pytest.raises(AdapterError, match="no adapter directory"):
        apply_adapter(load_model(path), tmp_path / "missing")


# ----------------------------------------------------------------- the command


def _dgemma(capsys, *argv):
    from mlx_dgemma.cli import main

    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_lora_command_trains_with_a_yaml_config(task, tmp_path, capsys):
    path, data = task
    config = tmp_path / "lora.yaml"
    config.write_text(
        f"model: {path}\ndata: {data}\niters: 5\nbatch_size: 3\nlearning_rate: 0.003\n"
        "lora_parameters:\n  rank: 4\n  scale: 10.0\n  dropout: 0.0\n  keys: [q_proj, v_proj]\n"
    )
    out = tmp_path / "adapters"
    code, stdout, _ = _dgemma(
        capsys,
        "lora",
        "--config",
        str(config),
        "--iters",
        "2",
        "--adapter-path",
        str(out),
        "--steps-per-report",
        "1",
        "--steps-per-eval",
        "2",
        "--val-batches",
        "1",
    )
    assert code == 0
    assert "iter 2/2 · train loss" in stdout and "val loss" in stdout and "tokens/s" in stdout
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["lora_parameters"]["rank"] == 4 and saved["lora_parameters"]["scale"] == 10.0
    assert saved["lora_parameters"]["keys"] == ["self_attn.q_proj", "self_attn.v_proj"]
    assert json.loads((out / "training_state.json").read_text())["iteration"] == 2


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "no data directory at"),
        ("empty", "is empty: put train.jsonl and valid.jsonl in it"),
        ("no-valid", "no valid.jsonl in"),
        ("bad-json", "train.jsonl line 2: not valid JSON"),
        ("no-assistant", "train.jsonl line 1: no assistant message"),
        ("too-long", "every record is longer than --max-seq-length 8 tokens"),
        ("bad-key", "the router stays frozen"),
    ],
)
def test_lora_command_bad_input(task, tmp_path, capsys, case, message):
    path, good = task
    out = tmp_path / "adapters"
    # A good adapter is there already: a failed run must leave it as it was.
    _, _, trainer = _trainer(path, good, out, 1)
    trainer.run()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    data = tmp_path / "data"
    extra = []
    if case == "empty":
        data.mkdir()
    elif case == "no-valid":
        data.mkdir()
        (data / "train.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    elif case == "bad-json":
        _write_task(data, [json.dumps({"text": "fine"}), '{"text": "broken'])
    elif case == "no-assistant":
        _write_task(data, [json.dumps({"messages": [{"role": "user", "content": "hi"}]})])
    elif case in ("too-long", "bad-key"):
        _write_task(data)
        extra = ["--max-seq-length", "8"] if case == "too-long" else ["--lora-keys", "router.proj"]
    code, _, err = _dgemma(
        capsys,
        "lora",
        "--model",
        str(path),
        "--data",
        str(data),
        "--iters",
        "1",
        "--batch-size",
        "3",
        "--adapter-path",
        str(out),
        *extra,
    )
    assert code == 1
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_long_records_are_truncated_or_dropped_with_a_note(task, tmp_path):
    path, _ = task
    tokenizer = mlx_dgemma.load(path)[1]
    long_text = "word " * 40
    data = _write_task(tmp_path / "d", [json.dumps({"text": long_text}), json.dumps({"text": "short"})])
    truncated = load_datasets(data, tokenizer, 20)["train"]
    assert len(truncated) == 2 and max(len(e.tokens) for e in truncated.examples) == 20
    assert "1 of 2 records are longer than --max-seq-length 20 tokens: 1 truncated" in truncated.notes[0]
    dropped = load_datasets(data, tokenizer, 20, "drop")["train"]
    assert len(dropped) == 1 and "1 dropped" in dropped.notes[0]
