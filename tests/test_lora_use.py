"""Using a LoRA adapter: `--adapter` on generate, chat, infill, edit and serve gives what the library gives with
`load(..., adapter_path=)`, and `dgemma fuse` writes a model that answers as base + adapter does (float: to float
rounding; quantized: within the requantization's error); every refusal is one line and leaves nothing behind.

The adapter is made, not trained: random A and B (mlx-lm starts B at zero) on attention, dense MLP and expert
layers, so it changes every output and exercises every kind of merge.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import httpx
import mlx.core as mx
import numpy as np
import pytest
from checkpoints import build_reference_model, save_reference_checkpoint
from mlx.utils import tree_flatten
from serve_fixtures import LiveServer
from tokenizer_fixture import write_tokenizer

import mlx_dgemma
from mlx_dgemma import load_model
from mlx_dgemma.cli import main
from mlx_dgemma.constrained import edit as edit_span
from mlx_dgemma.constrained import infill as fill_in
from mlx_dgemma.convert import ConversionError, convert_checkpoint
from mlx_dgemma.convert.writer import ShardWriter
from mlx_dgemma.files import offset_of, span_of_lines
from mlx_dgemma.lora.adapters import (
    DEFAULT_KEYS,
    EXPERT_KEYS,
    AdapterError,
    LoraSettings,
    adapter_config,
    add_lora,
    fuse_adapter,
    save_adapter,
)
from mlx_dgemma.lora.fuse import fuse_checkpoint

CANVAS = 8
PROMPT = "Tell me about the sea."
SAMPLE = ["--max-tokens", "16", "--steps", "4", "--seed", "3"]
PARAMS = dict(max_new_tokens=16, steps=4, seed=3)


def _reference(seed: int = 7):
    return build_reference_model(
        seed=seed, canvas_length=CANVAS, sliding_window=64, final_norm_gain=16.0, well_conditioned=True
    )


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = save_reference_checkpoint(_reference(), tmp_path_factory.mktemp("lora-use") / "base")
    write_tokenizer(path)
    return path


def make_adapter(base_path: Path, directory: Path, rank: int = 4, seed: int = 0) -> Path:
    """An adapter with random A and B on every default key and the experts, saved as `dgemma lora` saves one."""
    model = load_model(base_path)
    settings = LoraSettings(rank=rank, scale=2.0, keys=DEFAULT_KEYS + EXPERT_KEYS)
    count = add_lora(model, settings, seed=seed)
    mx.random.seed(seed + 1)
    for _, module in model.named_modules():
        if hasattr(module, "lora_b"):
            module.lora_b = 0.1 * mx.random.normal(module.lora_b.shape)
    return save_adapter(model, directory, adapter_config(model, settings, count, base_path, {}))


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory) -> Path:
    return make_adapter(base, tmp_path_factory.mktemp("lora-use") / "adapter")


@pytest.fixture(scope="module")
def quantized(base, tmp_path_factory) -> Path:
    """The base at 4 bits (experts) and 8 bits (the rest), group size 32: every linear layer quantized; float32
    scales and norms, so that the quantized models compute in float32 as the float base does."""
    directory = tmp_path_factory.mktemp("lora-use") / "q4"
    return convert_checkpoint(base, directory, bits=4, group_size=32, dtype="float32")


def dgemma(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what came before (the reference model's save prints progress)
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def api_generate(path: Path, adapter: Path | None = None, prompt: str = PROMPT):
    model, tokenizer = mlx_dgemma.load(path, adapter_path=adapter)
    return mlx_dgemma.generate(model, tokenizer, [{"role": "user", "content": prompt}], **PARAMS)


def logits(path: Path, adapter: Path | None = None, model=None) -> np.ndarray:
    """The decoder's logits for a fixed prompt and canvas (the encoder's and decoder's paths both count)."""
    model = model if model is not None else load_model(path, adapter_path=adapter)
    vocab = model.text_config.vocab_size
    prompt = mx.array(np.random.default_rng(0).integers(20, vocab, (1, 12)))
    canvas = mx.array(np.random.default_rng(1).integers(20, vocab, (1, CANVAS)))
    cache = model.make_cache()
    model.encode(prompt, cache)
    return np.array(model.denoise(canvas, cache).astype(mx.float32))


# ----------------------------------------------------------------- --adapter on every command


def test_generate_with_an_adapter_gives_the_libraries_tokens(base, adapter, capsys):
    code, out, err = dgemma(capsys, "generate", "-m", str(base), "--adapter", str(adapter), *SAMPLE, "--json", PROMPT)
    assert code == 0, err
    tokens = json.loads(out)["tokens"]
    assert tokens == api_generate(base, adapter).tokens
    assert tokens != api_generate(base).tokens  # the adapter changes what the model says


def test_an_adapter_on_bfloat16_experts_runs_on_the_cpu(base, adapter, tmp_path):
    """Expert adapters over experts stored as bfloat16: the adapted stacks multiply in float32 where MLX's
    gather_mm takes float32 only (the CPU), so the model runs and agrees with the float32 base's."""
    bf16 = convert_checkpoint(base, tmp_path / "bf16", dtype="bfloat16", recipe="none")
    ours, reference = logits(bf16, adapter), logits(base, adapter)
    ours, reference = ours.reshape(-1, ours.shape[-1]), reference.reshape(-1, reference.shape[-1])
    cosine = (ours * reference).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(reference, axis=-1)
    assert np.isfinite(ours).all() and cosine.mean() > 0.97, cosine


def test_chat_infill_and_edit_take_an_adapter(base, adapter, capsys, monkeypatch, tmp_path):
    expected = api_generate(base, adapter).text
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{PROMPT}\n/quit\n"))
    code, out, err = dgemma(capsys, "chat", "-m", str(base), "--adapter", str(adapter), *SAMPLE)
    assert code == 0, err
    assert out.startswith(expected)

    source = tmp_path / "code.py"
    source.write_text("def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n")
    model, tokenizer = mlx_dgemma.load(base, adapter_path=adapter)
    text = source.read_text()
    sampler = ["--steps", "4", "--seed", "3"]
    code, out, err = dgemma(
        capsys, "infill", str(source), "--at", "2:12", "--tokens", "8", "-m", str(base), "--adapter", str(adapter),
        *sampler,
    )  # fmt: skip
    assert code == 0, err
    offset = offset_of(text, "2:12")
    assert out == fill_in(model, tokenizer, text[:offset], text[offset:], hole_tokens=8, steps=4, seed=3).text
    code, out, err = dgemma(
        capsys, "edit", str(source), "--lines", "2-2", "-m", str(base), "--adapter", str(adapter), *sampler
    )
    assert code == 0, err
    start, end = span_of_lines(text, "2-2")
    assert out == edit_span(model, tokenizer, text, start, end, None, steps=4, seed=3).text


def test_a_server_with_an_adapter_answers_as_the_library(base, adapter):
    from mlx_dgemma.serve.app import create_app
    from mlx_dgemma.serve.engine import Engine

    expected = api_generate(base, adapter).text
    model, tokenizer = mlx_dgemma.load(base, adapter_path=adapter)
    engine = Engine(model, tokenizer)
    try:
        with LiveServer(create_app(engine, "tuned", adapter=str(adapter))) as live:
            body = {
                "model": "tuned",
                "messages": [{"role": "user", "content": PROMPT}],
                "max_tokens": 16,
                "steps": 4,
                "seed": 3,
            }
            response = httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=60)
            (card,) = httpx.get(f"{live.url}/v1/models", timeout=60).json()["data"]
            shown = httpx.post(f"{live.url}/api/show", json={"model": "tuned"}, timeout=60).json()
    finally:
        engine.close()
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == expected
    assert card["id"] == "tuned" and card["adapter"] == str(adapter)  # clients can tell which adapter answers
    assert f"ADAPTER {adapter}" in shown["modelfile"]


# ----------------------------------------------------------------- refusals


def test_bad_adapters_are_one_line_errors(base, adapter, capsys, tmp_path):
    def refused(directory: Path, command: str = "generate") -> str:
        argv = [command, "-m", str(base), "--adapter", str(directory)]
        code, out, err = dgemma(capsys, *argv, *(["--port", "0"] if command == "serve" else [*SAMPLE, PROMPT]))
        assert code == 1 and out == "" and len(err.strip().splitlines()) == 1, err
        assert err.startswith("error: ") and "Traceback" not in err
        return err

    assert "no adapter directory" in refused(tmp_path / "missing")
    assert "no adapter directory" in refused(tmp_path / "missing", "serve")
    (tmp_path / "empty").mkdir()
    assert "not an adapter directory" in refused(tmp_path / "empty")

    other = save_reference_checkpoint(_reference(seed=8), tmp_path / "other")
    foreign = make_adapter(other, tmp_path / "foreign")
    assert "another checkpoint of this shape" in refused(foreign)

    ranked = make_adapter(base, tmp_path / "ranked")
    config = json.loads((ranked / "adapter_config.json").read_text())
    config["lora_parameters"]["rank"] = 8
    (ranked / "adapter_config.json").write_text(json.dumps(config))
    assert "another rank" in refused(ranked)

    corrupt = make_adapter(base, tmp_path / "corrupt")
    weights = corrupt / "adapters.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert "cannot read" in refused(corrupt)


def test_info_describes_an_adapter(base, adapter, capsys, tmp_path):
    arrays = mx.load(str(adapter / "adapters.safetensors"))
    parameters = sum(value.size for value in arrays.values())
    code, out, err = dgemma(capsys, "info", str(base), "--adapter", str(adapter))
    assert code == 0, err
    assert f"adapter        {adapter}: LoRA rank 4, scale 2, on 6 of 6 layers: self_attn.q_proj," in out
    assert f"{parameters:,} parameters" in out and f"trained on {base}, a model of this shape" in out
    code, out, err = dgemma(capsys, "info", str(base), "--adapter", str(adapter), "--json")
    facts = json.loads(out)
    assert facts["adapter"]["parameters"] == parameters and facts["adapter"]["shape_difference"] is None
    assert "experts.gate_up_proj" in facts["adapter"]["keys"]
    _, alone, _ = dgemma(capsys, "info", str(base), "--json")
    added = facts["memory"]["total"] - json.loads(alone)["memory"]["total"]
    assert added == (adapter / "adapters.safetensors").stat().st_size

    # An adapter recorded as trained on a wider model is named so; one already fused into the model too.
    wider = tmp_path / "wider"
    shutil.copytree(adapter, wider)
    config = json.loads((wider / "adapter_config.json").read_text())
    config["base_model"]["shape"]["hidden_size"] = 128
    (wider / "adapter_config.json").write_text(json.dumps(config))
    code, out, err = dgemma(capsys, "info", str(base), "--adapter", str(wider))
    assert code == 0 and "another model's (hidden_size 128 there, 64 here): this model refuses it" in out
    fused = fuse_checkpoint(base, adapter, tmp_path / "fused").path
    code, out, err = dgemma(capsys, "info", str(fused), "--adapter", str(adapter))
    assert code == 0 and "already fused into this model" in out

    code, out, err = dgemma(capsys, "info", str(base), "--adapter", str(tmp_path / "missing"))
    assert code == 1 and out == "" and err.startswith("error: no adapter directory") and len(err.splitlines()) == 1


# ----------------------------------------------------------------- dgemma fuse


def test_fuse_adapter_in_memory_equals_the_adapted_model(base, adapter):
    adapted = load_model(base, adapter_path=adapter)
    expected = logits(base, model=adapted)
    fused = fuse_adapter(adapted)
    assert not any("lora" in name for name, _ in tree_flatten(fused.parameters()))
    np.testing.assert_allclose(logits(base, model=fused), expected, atol=2e-4)


def test_a_fused_float_model_answers_as_base_plus_adapter(base, adapter, capsys, tmp_path):
    out = tmp_path / "fused"
    code, _, err = dgemma(capsys, "fuse", "-m", str(base), "--adapter-path", str(adapter), str(out))
    assert code == 0, err
    assert f"-> {out}" in err
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and config["fused_adapter"]["rank"] == 4
    assert not any("lora" in key for key in mx.load(str(next(out.glob("*.safetensors")))))
    # float32 all through: W + scale·BA merged equals x·W + scale·(x·A)·B to float rounding.
    np.testing.assert_allclose(logits(out), logits(base, adapter), atol=2e-4)
    assert api_generate(out).tokens == api_generate(base, adapter).tokens
    assert "wrote" in err  # progress: a few plain lines off a terminal
    # The fused model keeps the base's norms, so the base check would take the adapter again: refused.
    with pytest.raises(AdapterError, match="already fused into this model"):
        load_model(out, adapter_path=adapter)

    # --dtype casts every float tensor (and names the dtype in config.json).
    half = fuse_checkpoint(base, adapter, tmp_path / "bf16", dtype="bfloat16").path
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"
    assert {value.dtype for value in mx.load(str(next(half.glob("*.safetensors")))).values()} == {mx.bfloat16}


def test_a_fused_quantized_model_keeps_the_bases_quantization(base, quantized, adapter, capsys, tmp_path):
    out = tmp_path / "fused-q4"
    code, _, err = dgemma(capsys, "fuse", "-m", str(quantized), "--adapter", str(adapter), str(out))
    assert code == 0, err
    config, source = (json.loads((path / "config.json").read_text()) for path in (out, quantized))
    assert config["quantization"] == source["quantization"]
    fused_weights, base_weights = (mx.load(str(next(path.glob("*.safetensors")))) for path in (out, quantized))
    assert fused_weights.keys() == base_weights.keys()
    # What the adapter left alone is copied bit for bit; what it adapted is requantized at the base's bits.
    for key in ("model.decoder.embed_tokens.weight", "model.decoder.self_conditioning.up_proj.scales"):
        assert mx.array_equal(fused_weights[key], base_weights[key])
    adapted = "model.decoder.layers.0.experts.gate_up_proj.weight"
    assert fused_weights[adapted].dtype == mx.uint32
    assert not mx.array_equal(fused_weights[adapted], base_weights[adapted])

    # Requantizing W + ΔW rounds each weight again (4 bits for the experts, 8 for the rest), so the fused model
    # is not base + adapter to float rounding. Both are one rounding away from the float base + adapter: the
    # fused model must be as close to it as the quantized base + adapter is (up to 1.5x), and far closer to the
    # quantized base + adapter than the adapter's own effect.
    fused, adapted_q, float_adapted = logits(out), logits(quantized, adapter), logits(base, adapter)
    rounding = np.abs(adapted_q - float_adapted).max()
    assert np.abs(fused - float_adapted).max() <= 1.5 * rounding
    assert np.abs(fused - adapted_q).max() <= 0.5 * np.abs(adapted_q - logits(quantized)).max()

    # --dequantize: a float model, equal to the quantized base + adapter to float rounding.
    flat = tmp_path / "fused-float"
    code, _, err = dgemma(capsys, "fuse", "-m", str(quantized), "--adapter", str(adapter), "--dequantize", str(flat))
    assert code == 0, err
    assert "quantization" not in json.loads((flat / "config.json").read_text())
    np.testing.assert_allclose(logits(flat), adapted_q, atol=2e-3)


def test_fuse_with_bits_quantizes_a_float_base_with_the_recipe(base, adapter, quantized, tmp_path):
    result = fuse_checkpoint(base, adapter, tmp_path / "q", bits=4, group_size=32)
    assert result.fused == 6 * 7 - 1 + 6 * 2  # attention and MLP (the full layer has no v_proj), two expert stacks
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"] == json.loads((quantized / "config.json").read_text())["quantization"]
    fused, float_adapted = logits(tmp_path / "q"), logits(base, adapter)
    assert np.abs(fused - float_adapted).max() <= 1.5 * np.abs(logits(quantized, adapter) - float_adapted).max()


def test_fuse_refusals_leave_nothing_behind(base, adapter, capsys, monkeypatch, tmp_path):
    def leftovers() -> list[str]:
        return sorted(path.name for path in tmp_path.iterdir() if path.name.startswith("."))

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    code, _, err = dgemma(capsys, "fuse", "-m", str(base), "--adapter", str(adapter), str(taken))
    assert code == 1 and "exists and is not empty; pass --force" in err
    assert [path.name for path in taken.iterdir()] == ["keep.txt"]

    for argv, message in (
        (["--adapter", str(tmp_path / "missing")], "no adapter directory"),
        (["--adapter", str(adapter), "--group-size", "32"], "give --bits too"),
        (["--adapter", str(adapter), "--bits", "4", "--dequantize"], "takes no --bits"),
        (["--adapter", str(adapter), "--bits", "3"], "3 is not one of 4, 8"),
        (["-m", str(tmp_path / "nowhere"), "--adapter", str(adapter)], "no model directory"),
    ):
        code, _, err = dgemma(capsys, "fuse", "-m", str(base), *argv, str(tmp_path / "out"))
        assert code != 0 and len(err.strip().splitlines()) == 1 and message in err, err
    code, _, err = dgemma(capsys, "fuse", "-m", str(base), "--adapter", str(adapter), str(base.parent), "--force")
    assert code == 1 and "holds the base model" in err

    other = save_reference_checkpoint(_reference(seed=8), tmp_path / "other")
    code, _, err = dgemma(capsys, "fuse", "-m", str(other), "--adapter", str(adapter), str(tmp_path / "out"))
    assert code == 1 and "another checkpoint of this shape" in err
    assert not (tmp_path / "out").exists() and leftovers() == []

    # Interrupted while writing: nothing at OUT, no staging directory, the exit status of Ctrl-C.
    def interrupt(done, total, name):
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fuse_checkpoint(base, adapter, tmp_path / "out", progress=interrupt)
    assert not (tmp_path / "out").exists() and leftovers() == []
    with monkeypatch.context() as patch:
        patch.setattr(ShardWriter, "finish", lambda self: interrupt(5, 5, ""))
        code, _, err = dgemma(capsys, "fuse", "-m", str(base), "--adapter", str(adapter), str(tmp_path / "out"))
    assert code == 130 and "interrupted; nothing written" in err
    assert not (tmp_path / "out").exists() and leftovers() == []

    # --force replaces what was there, once the merged model is complete.
    code, _, err = dgemma(capsys, "fuse", "-m", str(base), "--adapter", str(adapter), str(taken), "--force")
    assert code == 0, err
    assert not (taken / "keep.txt").exists() and (taken / "config.json").is_file() and leftovers() == []
    with pytest.raises(ConversionError, match="exists and is not empty"):
        fuse_checkpoint(base, adapter, taken)
    with pytest.raises(AdapterError, match="no adapters.safetensors"):
        (tmp_path / "half").mkdir()
        (tmp_path / "half" / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
        fuse_checkpoint(base, tmp_path / "half", tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers() == []
