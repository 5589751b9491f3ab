"""The checkpoint converter: layout, quantization, validation, memory and CLI errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
import typer
from checkpoints import build_reference_model, save_reference_checkpoint
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

import mlx_dgemma
from mlx_dgemma.config import ModelConfig
from mlx_dgemma.convert import ConversionError, convert_checkpoint
from mlx_dgemma.convert.cli import convert_command
from mlx_dgemma.convert.layout import expected_text_shapes
from mlx_dgemma.convert.safetensors_header import read_header

# Dimensions divisible by 32/64 so that most linears quantize; experts.down_proj
# (last dim 64) stays float at group size 128.
QUANTIZABLE = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    moe_intermediate_size=64,
    head_dim=32,
    global_head_dim=64,
)
VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
EIGHT_BIT_SUFFIXES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
SELF_CONDITIONING = tuple(f"model.decoder.self_conditioning.{p}" for p in ("gate_proj", "up_proj", "down_proj"))


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A multi-shard float32 reference checkpoint with quantizable dimensions."""
    path = tmp_path_factory.mktemp("src") / "ckpt"
    save_reference_checkpoint(build_reference_model(**QUANTIZABLE), path, max_shard_size="100KB")
    return path


@pytest.fixture()
def scratch_source(source, tmp_path) -> Path:
    """A private copy of `source` that a test may damage."""
    return Path(shutil.copytree(source, tmp_path / "damaged"))


def source_tensors(path: Path) -> dict[str, np.ndarray]:
    tensors = {}
    for shard in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def output_tensors(path: Path) -> dict[str, mx.array]:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(mx.load(str(path / shard)))
    return tensors


def mlx_name(name: str) -> str:
    return f"{name}.weight" if name.endswith((".experts.gate_up_proj", ".experts.down_proj")) else name


def rewrite_shard_holding(path: Path, name: str, edit) -> None:
    """Apply `edit(tensors)` to the shard that holds `name`, keeping the index in step."""
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = index["weight_map"][name]
    tensors = load_file(path / shard)
    edit(tensors)
    save_file(tensors, path / shard, metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard}
    index["weight_map"].update(dict.fromkeys(tensors, shard))
    index_path.write_text(json.dumps(index))


def cli_app() -> typer.Typer:
    app = typer.Typer()
    app.command("convert")(convert_command)
    app.command("noop")(lambda: None)  # a second command keeps `convert` a named sub-command
    return app


def run_cli(*args: str):
    return CliRunner().invoke(cli_app(), ["convert", *args])


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# ---------------------------------------------------------------- round trip


def test_float32_round_trip_is_exact(source, tmp_path):
    dst = convert_checkpoint(source, tmp_path / "out", recipe="none", dtype="float32")
    expected = source_tensors(source)
    converted = output_tensors(dst)

    assert set(converted) == {mlx_name(name) for name in expected}
    for name, array in expected.items():
        np.testing.assert_array_equal(np.array(converted[mlx_name(name)]), array, err_msg=name)

    for i in range(6):
        decoder_scalar = np.array(converted[f"model.decoder.layers.{i}.layer_scalar"])
        encoder_scalar = np.array(converted[f"model.encoder.language_model.layers.{i}.layer_scalar"])
        assert decoder_scalar.shape == encoder_scalar.shape == (1,)
        assert decoder_scalar[0] != encoder_scalar[0]  # not tied: each role keeps its own
    assert any(name.startswith(VISION_PREFIXES) for name in converted)

    config = json.loads((dst / "config.json").read_text())
    assert "vision_config" in config and "quantization" not in config
    assert config["dtype"] == "float32"
    assert (dst / "generation_config.json").read_text() == (source / "generation_config.json").read_text()


def test_text_only_drops_vision(source, tmp_path):
    dst = convert_checkpoint(source, tmp_path / "out", recipe="none", text_only=True)
    converted = output_tensors(dst)
    config = json.loads((dst / "config.json").read_text())

    assert not [name for name in converted if name.startswith(VISION_PREFIXES)]
    assert "vision_config" not in config
    assert "model.encoder.language_model.layers.0.layer_scalar" in converted
    assert converted["model.decoder.embed_tokens.weight"].dtype == mx.bfloat16


def test_bf16_source_converts_to_bfloat16(tmp_path):
    src = save_reference_checkpoint(build_reference_model(), tmp_path / "bf16", dtype=torch.bfloat16)
    dst = convert_checkpoint(src, tmp_path / "out", recipe="none")
    converted = output_tensors(dst)
    expected = mx.load(str(src / "model.safetensors"))
    for name, array in expected.items():
        assert mx.array_equal(converted[mlx_name(name)], array), name


# ---------------------------------------------------------------- quantization


def check_quantized(converted: dict, name: str, source: np.ndarray, bits: int, group_size: int) -> None:
    module = mlx_name(name).removesuffix(".weight")
    packed, scales, biases = (converted[f"{module}.{part}"] for part in ("weight", "scales", "biases"))
    *lead, width = source.shape
    assert packed.dtype == mx.uint32
    assert packed.shape == (*lead, width * bits // 32), name
    assert scales.shape == biases.shape == (*lead, width // group_size), name
    restored = np.array(mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits).astype(mx.float32))
    grouped = (*lead, width // group_size, group_size)
    error = np.abs(restored - source).reshape(grouped)
    # Affine rounding errs by at most one quantization step per group; half-precision
    # scales, biases and outputs add rounding relative to the group's magnitude.
    step = np.abs(np.array(scales.astype(mx.float32)))[..., None]
    magnitude = np.abs(source).reshape(grouped).max(axis=-1, keepdims=True)
    rounding = 0.0 if scales.dtype == mx.float32 else 2.0**-6
    assert np.all(error <= step * 1.01 + rounding * magnitude + 1e-6), name


def test_mixed_4bit_layout_config_and_accuracy(source, tmp_path):
    dst = convert_checkpoint(source, tmp_path / "out", dtype="float32", bits=4, max_shard_bytes=64_000)
    expected = source_tensors(source)
    converted = output_tensors(dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = sorted(dst.glob("model-*.safetensors"))

    assert len(shards) > 3
    assert {s.name for s in shards} == set(index["weight_map"].values())
    assert all(s.name.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    assert set(index["weight_map"]) == set(converted)
    for name, shard in index["weight_map"].items():
        assert name in mx.load(str(dst / shard)), name
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in converted.values())

    config = json.loads((dst / "config.json").read_text())
    block = config["quantization"]
    assert config["quantization_config"] == block
    assert {k: block[k] for k in ("group_size", "bits", "mode")} == {"group_size": 64, "bits": 4, "mode": "affine"}
    eight_bit = {k for k, v in block.items() if isinstance(v, dict)}
    assert all(block[k] == {"group_size": 64, "bits": 8} for k in eight_bit)
    layers = range(6)
    wanted = {"model.decoder.embed_tokens", *SELF_CONDITIONING}
    wanted |= {f"model.decoder.layers.{i}.{suffix}" for i in layers for suffix in EIGHT_BIT_SUFFIXES}
    wanted.discard("model.decoder.layers.5.self_attn.v_proj")  # full-attention layer: no v_proj
    assert eight_bit == wanted

    for i in layers:
        for part in ("gate_up_proj", "down_proj"):
            check_quantized(
                converted,
                f"model.decoder.layers.{i}.experts.{part}",
                expected[f"model.decoder.layers.{i}.experts.{part}"],
                4,
                64,
            )
    for module in eight_bit:
        check_quantized(converted, f"{module}.weight", expected[f"{module}.weight"], 8, 64)

    for unquantized in ("model.decoder.layers.0.router.proj", "model.decoder.layers.0.input_layernorm"):
        assert f"{unquantized}.scales" not in converted
        np.testing.assert_array_equal(np.array(converted[f"{unquantized}.weight"]), expected[f"{unquantized}.weight"])
    assert not [k for k in converted if k.startswith(VISION_PREFIXES) and k.endswith(".scales")]
    assert "model.decoder.layers.0.router.scale" in converted


@pytest.mark.parametrize(
    ("recipe", "bits", "group_size"),
    [("uniform", 4, 64), ("mixed", 8, 32), ("mixed", 4, 128), ("uniform", 8, 128)],
)
def test_recipes_bits_and_group_sizes(source, tmp_path, recipe, bits, group_size):
    dst = convert_checkpoint(source, tmp_path / "out", bits=bits, group_size=group_size, recipe=recipe)
    expected = source_tensors(source)
    converted = output_tensors(dst)
    block = json.loads((dst / "config.json").read_text())["quantization"]
    assert (block["bits"], block["group_size"]) == (bits, group_size)

    dense_bits = 8 if recipe == "mixed" else bits
    overrides = {k: v for k, v in block.items() if isinstance(v, dict)}
    assert all(v == {"group_size": group_size, "bits": dense_bits} for v in overrides.values())
    assert bool(overrides) == (dense_bits != bits)

    for name in ("model.decoder.layers.1.self_attn.q_proj.weight", "model.decoder.embed_tokens.weight"):
        check_quantized(converted, name, expected[name], dense_bits, group_size)
    check_quantized(
        converted,
        "model.decoder.layers.1.experts.gate_up_proj",
        expected["model.decoder.layers.1.experts.gate_up_proj"],
        bits,
        group_size,
    )

    down = "model.decoder.layers.1.experts.down_proj"
    if expected[down].shape[-1] % group_size:
        # A width the group size does not divide stays float, under the module's `.weight` name, and the config
        # says so (false, as mlx-lm writes a module left float), so that no loader looks for its scales.
        assert f"{down}.scales" not in converted
        assert converted[f"{down}.weight"].shape == expected[down].shape
        assert block[down] is False
        model = mlx_dgemma.load_model(dst)
        assert type(model.layers[1].experts.down_proj).__name__ != "QuantizedSwitchLinear"
    else:
        check_quantized(converted, down, expected[down], bits, group_size)
    assert "model.decoder.layers.1.router.proj.scales" not in converted


@pytest.mark.parametrize("spelling", ["released", "per_layer"])
def test_both_config_spellings_convert(tmp_path, spelling):
    src = save_reference_checkpoint(build_reference_model(), tmp_path / "src", spelling=spelling)
    config = json.loads((src / "config.json").read_text())
    assert ("per_layer_config" in config["text_config"]) == (spelling == "per_layer")

    dst = convert_checkpoint(src, tmp_path / "out", group_size=32)
    converted = output_tensors(dst)
    # Full-attention layer 5: 4 heads x global head_dim 32 = 128 query rows, 1 KV head of 32, no v_proj.
    assert converted["model.decoder.layers.5.self_attn.q_proj.weight"].shape == (128, 64 * 8 // 32)
    assert converted["model.decoder.layers.5.self_attn.k_proj.weight"].shape == (32, 64 * 8 // 32)
    assert "model.decoder.layers.5.self_attn.v_proj.weight" not in converted
    assert converted["model.decoder.layers.0.self_attn.k_proj.weight"].shape == (32, 64 * 8 // 32)
    assert json.loads((dst / "config.json").read_text())["text_config"] == config["text_config"]


def test_expected_shapes_of_the_released_model():
    text = dict(
        vocab_size=262144,
        hidden_size=2816,
        intermediate_size=2112,
        moe_intermediate_size=704,
        num_hidden_layers=30,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        global_head_dim=512,
        num_global_key_value_heads=2,
        sliding_window=1024,
        num_experts=128,
        top_k_experts=8,
    )
    shapes = expected_text_shapes(ModelConfig.from_dict({"model_type": "diffusion_gemma", "text_config": text}))
    layer = "model.decoder.layers.{}.".format
    assert shapes[layer(0) + "self_attn.q_proj.weight"] == (4096, 2816)
    assert shapes[layer(0) + "self_attn.v_proj.weight"] == (2048, 2816)
    assert shapes[layer(5) + "self_attn.q_proj.weight"] == (8192, 2816)
    assert shapes[layer(5) + "self_attn.k_proj.weight"] == (1024, 2816)
    assert shapes[layer(5) + "self_attn.o_proj.weight"] == (2816, 8192)
    assert layer(5) + "self_attn.v_proj.weight" not in shapes and layer(29) + "self_attn.v_proj.weight" not in shapes
    assert shapes[layer(7) + "experts.gate_up_proj"] == (128, 1408, 2816)
    assert shapes[layer(7) + "experts.down_proj"] == (128, 2816, 704)
    assert shapes["model.decoder.self_conditioning.down_proj.weight"] == (2816, 2112)
    assert shapes["model.encoder.language_model.layers.29.layer_scalar"] == (1,)
    # Per layer 21 decoder tensors and the encoder's layer scalar, v_proj on the 25 sliding layers,
    # then embedding, final norm and four self-conditioning tensors.
    assert len(shapes) == 30 * 22 + 25 + 6


# ---------------------------------------------------------------- peak memory

MEMORY_PROBE = textwrap.dedent(
    """
    import json, re, sys
    import mlx.core as mx
    from mlx_dgemma.convert import convert_checkpoint

    def status_kb(field):
        return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))

    try:
        # Restart the peak-RSS count after the imports (Linux only), which peak higher than a small conversion.
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        before = status_kb("VmRSS")
    except OSError:
        before = None
    mx.reset_peak_memory()
    src, dst, dtype, recipe, shard = sys.argv[1:]
    convert_checkpoint(src, dst, dtype=dtype, recipe=recipe, max_shard_bytes=int(shard))
    rss_increase = None if before is None else (status_kb("VmHWM") - before) * 1024
    print(json.dumps({"mlx": mx.get_peak_memory(), "rss_increase": rss_increase}))
    """
)


def probe_memory(*args: str) -> dict[str, int | None]:
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, *args], capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def big_source(tmp_path_factory) -> Path:
    """About 120 MB in 8 MB shards; its largest tensor (the embedding) is 16 MB."""
    model = build_reference_model(
        vocab_size=16384,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_experts=16,
        num_hidden_layers=12,
        num_attention_heads=4,
        head_dim=64,
        global_head_dim=128,
    )
    return save_reference_checkpoint(model, tmp_path_factory.mktemp("big") / "ckpt", max_shard_size="8MB")


@pytest.mark.parametrize(("dtype", "recipe"), [("float32", "none"), ("bfloat16", "mixed")])
def test_peak_memory_stays_near_largest_tensor_plus_one_shard(big_source, tmp_path, dtype, recipe):
    shard_limit = 4_000_000
    sizes = [info.nbytes for shard in big_source.glob("*.safetensors") for info in read_header(shard)]
    total, largest = sum(sizes), max(sizes)
    assert total > 6 * largest  # loading everything would be clearly visible

    measured = probe_memory(str(big_source), str(tmp_path / "out"), dtype, recipe, str(shard_limit))

    # The source tensor, its cast copy or quantized outputs, and one pending shard.
    bound = 2 * largest + shard_limit + 16_000_000
    assert measured["mlx"] < bound, (measured, bound)
    if measured["rss_increase"] is not None:
        assert measured["rss_increase"] < bound, (measured, bound)


# ---------------------------------------------------------------- errors


def drop(name):
    return lambda tensors: tensors.pop(name)


def add(name, shape):
    return lambda tensors: tensors.__setitem__(name, np.zeros(shape, np.float32))


def damage_missing_tensor(path):
    rewrite_shard_holding(path, "model.decoder.layers.3.router.scale", drop("model.decoder.layers.3.router.scale"))


def damage_extra_tensor(path):
    # Full-attention layers have no v_proj.
    name = "model.decoder.layers.5.self_attn.q_proj.weight"
    rewrite_shard_holding(path, name, add("model.decoder.layers.5.self_attn.v_proj.weight", (64, 128)))


def damage_wrong_shape(path):
    name = "model.decoder.layers.2.router.proj.weight"
    rewrite_shard_holding(path, name, add(name, (9, 128)))


def damage_truncated_shard(path):
    shard = max(path.glob("model-*.safetensors"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:-100])


def damage_missing_shard(path):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    next(path / shard for shard in index["weight_map"].values() if shard.startswith("model-00003-")).unlink()


def damage_model_type(path):
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "gemma4"
    (path / "config.json").write_text(json.dumps(config))


def damage_missing_config(path):
    (path / "config.json").unlink()


def damage_invalid_json(path):
    (path / "config.json").write_text('{"model_type": "diffusion_gemma",')


def damage_unreadable_header(path):
    shard = next(iter(sorted(path.glob("model-*.safetensors"))))
    data = bytearray(shard.read_bytes())
    data[8:12] = b"\xff\xfe{{"
    shard.write_bytes(bytes(data))


ERROR_CASES = {
    "missing tensor": (damage_missing_tensor, "missing tensor model.decoder.layers.3.router.scale"),
    "extra tensor": (damage_extra_tensor, "unexpected tensor model.decoder.layers.5.self_attn.v_proj.weight"),
    "wrong shape": (
        damage_wrong_shape,
        "model.decoder.layers.2.router.proj.weight has shape [9, 128], expected [8, 128]",
    ),
    "truncated shard": (damage_truncated_shard, "cut short"),
    "unreadable header": (damage_unreadable_header, "not a safetensors file"),
    "missing shard": (damage_missing_shard, "names shard model-00003-of-"),
    "model type": (damage_model_type, "unsupported model_type 'gemma4'"),
    "missing config": (damage_missing_config, "no config.json"),
    "invalid json": (damage_invalid_json, "is not valid JSON"),
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_bad_checkpoints_fail_with_one_line_before_writing(scratch_source, tmp_path, case):
    damage, message = ERROR_CASES[case]
    damage(scratch_source)
    dst = tmp_path / "out"

    with pytest.raises(ConversionError) as raised:
        convert_checkpoint(scratch_source, dst)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)
    assert not dst.exists() and leftovers(tmp_path) == []

    result = run_cli(str(scratch_source), str(dst))
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [f"error: {raised.value}"]
    assert "Traceback" not in result.output


def test_existing_destination_needs_force(source, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old-file").write_text("old")

    with pytest.raises(ConversionError, match="exists; pass --force to overwrite"):
        convert_checkpoint(source, dst, recipe="none")
    result = run_cli(str(source), str(dst), "--recipe", "none")
    assert result.exit_code == 1 and "pass --force" in result.stderr
    assert (dst / "old-file").exists()

    result = run_cli(str(source), str(dst), "--recipe", "none", "--force")
    assert result.exit_code == 0, result.output
    assert not (dst / "old-file").exists()
    assert (dst / "model.safetensors.index.json").is_file()
    assert leftovers(tmp_path) == []


def test_failure_mid_conversion_leaves_old_destination_and_no_temp_dir(source, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old-file").write_text("old")

    def fail_halfway(done, total, name):
        if done == total // 2:
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        convert_checkpoint(source, dst, force=True, max_shard_bytes=10_000, progress=fail_halfway)
    assert sorted(p.name for p in dst.iterdir()) == ["old-file"]
    assert leftovers(tmp_path) == []

    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError):
        convert_checkpoint(source, fresh, max_shard_bytes=10_000, progress=fail_halfway)
    assert not fresh.exists() and leftovers(tmp_path) == []


def test_progress_reports_every_tensor(source, tmp_path):
    calls = []
    convert_checkpoint(source, tmp_path / "out", recipe="none", progress=lambda *call: calls.append(call))
    total = calls[0][1]
    assert [done for done, _, _ in calls] == list(range(1, total + 1))
    assert {name for _, _, name in calls} == set(source_tensors(source))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dtype": "float64"}, "unsupported dtype 'float64'"),
        ({"bits": 3}, "unsupported bits 3"),
        ({"group_size": 16}, "unsupported group size 16"),
        ({"recipe": "fancy"}, "unknown recipe 'fancy'"),
    ],
)
def test_invalid_options(source, tmp_path, options, message):
    with pytest.raises(ConversionError, match=message):
        convert_checkpoint(source, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_cli_passes_its_options_through(source, tmp_path):
    dst = tmp_path / "out"
    args = ["--dtype", "float16", "--bits", "8", "--group-size", "32", "--recipe", "uniform", "--text-only"]
    result = run_cli(str(source), str(dst), *args)
    assert result.exit_code == 0, result.output
    config = json.loads((dst / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 8, "mode": "affine"}
    assert "vision_config" not in config
    converted = output_tensors(dst)
    assert converted["model.decoder.layers.0.self_attn.q_proj.scales"].dtype == mx.float16
    assert converted["model.decoder.layers.0.experts.gate_up_proj.weight"].shape == (8, 128, 128 * 8 // 32)
    assert not [name for name in converted if name.startswith(VISION_PREFIXES)]


def test_cli_rejects_invalid_choices(source, tmp_path):
    result = run_cli(str(source), str(tmp_path / "out"), "--bits", "3")
    assert result.exit_code != 0 and not (tmp_path / "out").exists()
    assert "Traceback" not in result.output


def test_offline_hub_id_fails_fast_with_one_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConversionError) as raised:
        convert_checkpoint("nobody-here/no-such-diffusiongemma", tmp_path / "out")
    message = str(raised.value)
    assert "nobody-here/no-such-diffusiongemma" in message and "cannot be fetched" in message
    assert "\n" not in message

    app = "import typer; from mlx_dgemma.convert.cli import convert_command; typer.run(convert_command)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run(
        [sys.executable, "-c", app, "nobody-here/no-such-diffusiongemma", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1 and "nobody-here/no-such-diffusiongemma" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_destination_may_not_hold_the_source(scratch_source):
    with pytest.raises(ConversionError, match="holds the source checkpoint"):
        convert_checkpoint(scratch_source, scratch_source, force=True)
    assert (scratch_source / "config.json").is_file()


def test_dense_layers_dequantized_by_the_cuda_plugin_give_the_quantized_logits(source, tmp_path):
    """The CUDA plug-in's float twins of the quantized dense layers, q/k/v and gate/up merged, compute what the
    quantized layers do (plain MLX: checked here on the CPU)."""
    from mlx_dgemma import load_model
    from mlx_dgemma.backends import cuda

    converted = convert_checkpoint(source, tmp_path / "out", dtype="float32", bits=4)
    model = load_model(converted)
    cache = model.make_cache()
    model.encode(mx.array([[5, 9, 2, 7, 11]]), cache)
    canvas = mx.array([list(range(20, 20 + model.config.canvas_length))])
    quantized = model.denoise(canvas, cache)
    conditioned = model.denoise(canvas, cache, quantized)
    cuda.apply(model, cuda.CudaOptions(fused_experts=False, router_kernel=False, grouped_attention=False))
    kinds = {type(module).__name__ for _, module in model.named_modules()}
    # Every 8-bit dense linear of the mixed recipe is float now; the experts and the embedding stay quantized.
    assert "QuantizedLinear" not in kinds and "QuantizedSwitchLinear" in kinds and "QuantizedEmbedding" in kinds
    attention, mlp = model.layers[0].self_attn, model.layers[0].mlp
    parts = [attention[f"{name}_proj"].weight for name in "qkv"]
    assert mx.array_equal(mx.concatenate(parts), attention.fused_qkv.weight)
    assert mx.array_equal(mx.concatenate([mlp.gate_proj.weight, mlp.up_proj.weight]), mlp.fused_gate_up.weight)
    assert "fused_gate_up" in model.model.decoder.self_conditioning
    assert float(mx.abs(model.denoise(canvas, cache) - quantized).max()) < 1e-4
    assert float(mx.abs(model.denoise(canvas, cache, quantized) - conditioned).max()) < 1e-4
