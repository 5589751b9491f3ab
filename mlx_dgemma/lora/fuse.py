"""Merge a LoRA adapter into its base model and write the result as a checkpoint (`dgemma fuse`).

Each adapted layer becomes one plain layer: its base weight (dequantized if the base is quantized) plus the
low-rank update, as mlx-lm's `LoRALinear.fuse` and `LoRASwitchLinear.fuse` compute it: W + scale·Bᵀ·Aᵀ for a
linear (`lora_a` is in×r, `lora_b` r×out), W_e + scale·B_e·A_e for each expert e of a stack. The sum is taken in
float32 and cast to the base weight's dtype.

What gets quantized in the output:
- by default, what the base had quantized, each module with its own group size, bits and mode (the adapted
  ones requantized; the others copied bit for bit), and the base's `quantization` block kept;
- with `bits`, the conversion's recipe (`convert.quantize.Recipe`: mixed or uniform) at those bits and group
  size; modules the base already holds at exactly that quantization, and that the adapter left alone, are
  copied;
- with `dequantize`, nothing: a float checkpoint.

The output is written as `dgemma convert` writes one: shards in a staging directory beside OUT, published by a
rename once complete (an old OUT, with `force`, replaced only then), tokenizer, chat template, generation and
processor configs copied; an interrupted run leaves nothing behind. It loads like any conversion.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
from mlx_lm.tuner.lora import LoRALinear, LoRASwitchLinear

from ..backends import cuda
from ..config import VISION_PREFIXES, read_config_json
from ..convert.errors import ConversionError
from ..convert.pipeline import copy_side_files
from ..convert.quantize import MODE, Recipe, parse_dtype
from ..convert.writer import DEFAULT_MAX_SHARD_BYTES, ShardWriter, publish, remove_stale_dirs, staging_dir
from ..loader import load_model, resolve_model_path
from ..model import Model
from .adapters import adapter_digest, read_adapter_config

Progress = Callable[[int, int, str], None]
Quantization = tuple[int, int, str]  # group size, bits, mode

_QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)
_FLOAT = (nn.Linear, nn.Embedding, SwitchLinear)
_EXPERT_SUFFIXES = (".experts.gate_up_proj", ".experts.down_proj")
FUSE_RECIPES = ("mixed", "uniform")


@dataclass(frozen=True)
class FuseResult:
    path: Path
    fused: int  # adapted layers merged
    quantized: int  # modules stored quantized in the output


def fuse_checkpoint(
    model: str | Path,
    adapter_path: str | Path,
    out: str | Path,
    *,
    bits: int | None = None,
    group_size: int | None = None,
    recipe: str = "mixed",
    dequantize: bool = False,
    dtype: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> FuseResult:
    """Write MODEL with the adapter at ADAPTER_PATH merged into its weights, as a checkpoint at OUT.

    Options are checked, and the adapter's config read, before the model loads; OUT appears only once complete.
    Errors are one line: `ConversionError` (options, OUT), `LoadError` (the model), `AdapterError` (the adapter).
    """
    if dequantize and bits is not None:
        raise ConversionError("--dequantize writes a float model: it takes no --bits")
    if group_size is not None and bits is None:
        raise ConversionError("--group-size applies to the quantization --bits asks for: give --bits too")
    if recipe not in FUSE_RECIPES:
        raise ConversionError(f"unknown recipe {recipe!r}; choose one of {', '.join(FUSE_RECIPES)}")
    # None keeps the base's quantization; recipe "none" (from --dequantize) writes every tensor in float.
    plan = Recipe.parse("none" if dequantize else recipe, bits, group_size or 64) if dequantize or bits else None
    target_dtype = parse_dtype(dtype) if dtype is not None else None
    if max_shard_bytes <= 0:
        raise ConversionError(f"max_shard_bytes must be positive, got {max_shard_bytes}")

    out = Path(out).expanduser()
    adapter = Path(adapter_path).expanduser()
    adapter_config = read_adapter_config(adapter)
    remove_stale_dirs(out)  # first: it may put back an old OUT that a killed run had moved aside
    if _occupied(out) and not force:
        raise ConversionError(f"{out} exists and is not empty; pass --force to replace it")
    root = resolve_model_path(model)
    for name, inside in (("the base model", root), ("the adapter", adapter)):
        source, target = inside.resolve(), out.resolve()
        if target == source or target in source.parents:
            raise ConversionError(f"{out} holds {name}; choose another output directory")

    # The CUDA plug-in would swap layers for its own: fuse the model as its checkpoint describes it.
    loaded = load_model(root, cuda_options=cuda.CudaOptions(enabled=False), adapter_path=adapter)
    base_quantization, base_dtypes, fused = merge_adapter(loaded)
    raw_config = read_config_json(root)

    with staging_dir(out) as staging:
        writer = ShardWriter(staging, max_shard_bytes)
        module_bits = _write_modules(loaded, writer, base_quantization, base_dtypes, plan, target_dtype, progress)
        writer.finish()
        left_float = _left_float(loaded, plan) if plan is not None else []
        config = _output_config(raw_config, plan, module_bits, base_quantization, dtype, left_float)
        config["fused_adapter"] = _adapter_note(adapter, adapter_config)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_side_files(root, staging)
        publish(staging, out)
    return FuseResult(out, fused, len(module_bits))


def merge_adapter(model: Model) -> tuple[dict[str, Quantization], dict[str, mx.Dtype], int]:
    """Replace every LoRA layer of `model` by a float layer holding W + the low-rank update (lazily: nothing is
    computed until the weight is evaluated). Returns the base's quantization of every module that had one (the
    merged ones included), the float dtype of each merged weight, and how many layers were merged."""
    quantization: dict[str, Quantization] = {}
    dtypes: dict[str, mx.Dtype] = {}
    merged: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, _QUANTIZED):
            quantization[name] = (module.group_size, module.bits, module.mode)
        if not isinstance(module, (LoRALinear, LoRASwitchLinear)):
            continue
        base = module.linear
        weight = _float_weight(base)
        if isinstance(base, _QUANTIZED):
            quantization[name] = (base.group_size, base.bits, base.mode)
        dtypes[name] = weight.dtype
        scale = mx.array(module.scale, dtype=mx.float32)
        a, b = module.lora_a.astype(mx.float32), module.lora_b.astype(mx.float32)
        if isinstance(module, LoRALinear):
            delta = scale * (b.T @ a.T)  # (out, in)
            output_dims, input_dims = weight.shape
            layer: nn.Module = nn.Linear(input_dims, output_dims, bias="bias" in base)
        else:
            num_experts, output_dims, input_dims = weight.shape
            delta = scale * (b @ a.reshape(num_experts, -1, input_dims))  # (experts, out, in)
            layer = SwitchLinear(input_dims, output_dims, num_experts, bias="bias" in base)
        layer.weight = (weight.astype(mx.float32) + delta).astype(weight.dtype)
        if "bias" in base:
            layer.bias = base.bias
        merged.append((name, layer))
    for name in [name for name, _ in merged]:
        quantization.pop(f"{name}.linear", None)  # the LoRA layer's inner module: now the merged one's
    if merged:
        model.update_modules(tree_unflatten(merged))
    return quantization, dtypes, len(merged)


def _float_weight(module: nn.Module) -> mx.array:
    if isinstance(module, _QUANTIZED):
        return mx.dequantize(
            module.weight,
            module.scales,
            module.biases,
            group_size=module.group_size,
            bits=module.bits,
            mode=module.mode,
        )
    return module.weight


def _write_modules(
    model: Model,
    writer: ShardWriter,
    base_quantization: dict[str, Quantization],
    base_dtypes: dict[str, mx.Dtype],
    plan: Recipe | None,
    dtype: mx.Dtype | None,
    progress: Progress | None,
) -> dict[str, Quantization]:
    """Write every parameter, module by module (each evaluated, then handed to the shard writer); returns the
    quantization of every module written quantized."""
    modules = dict(model.named_modules())
    groups: dict[str, dict[str, mx.array]] = {}
    for name, value in tree_flatten(model.parameters()):
        path, _, leaf = name.rpartition(".")
        groups.setdefault(path, {})[leaf] = value
    written: dict[str, Quantization] = {}
    for done, (path, arrays) in enumerate(groups.items(), start=1):
        module = modules[path]
        if isinstance(module, _QUANTIZED + _FLOAT):
            target = _target(path, module, base_quantization, plan)
            outputs = _layer_arrays(module, arrays, target, base_dtypes.get(path), dtype)
            if target is not None:
                written[path] = target
        else:
            outputs = {leaf: _cast(value, dtype) for leaf, value in arrays.items()}
        outputs = {f"{path}.{leaf}": value for leaf, value in outputs.items()}
        try:
            mx.eval(outputs)
        except (RuntimeError, ValueError) as error:
            raise ConversionError(f"cannot write {path}: {' '.join(str(error).split())}") from None
        writer.add(outputs)
        if progress is not None:
            progress(done, len(groups), path)
    return written


def _target(
    path: str, module: nn.Module, base_quantization: dict[str, Quantization], plan: Recipe | None
) -> Quantization | None:
    """The output quantization of a linear-like module: the base's by default, the recipe's with --bits."""
    if plan is None:
        return base_quantization.get(path)
    if not plan.quantizes or path.startswith(VISION_PREFIXES):
        return None
    bits = plan.bits_for(_recipe_name(path), _float_shape(module))
    return (plan.group_size, bits, MODE) if bits is not None else None


def _left_float(model: Model, plan: Recipe) -> list[str]:
    """The modules `plan` would quantize but whose width its group size does not divide."""
    return [
        path
        for path, module in model.named_modules()
        if isinstance(module, _QUANTIZED + _FLOAT)
        and not path.startswith(VISION_PREFIXES)
        and plan.left_float(_recipe_name(path), _float_shape(module))
    ]


def _recipe_name(path: str) -> str:
    """The source name the recipe reads: expert stacks without `.weight`, other tensors with it."""
    return path if path.endswith(_EXPERT_SUFFIXES) else f"{path}.weight"


def _float_shape(module: nn.Module) -> tuple[int, ...]:
    shape = tuple(module.weight.shape)
    if isinstance(module, _QUANTIZED):
        shape = (*shape[:-1], shape[-1] * 32 // module.bits)
    return shape


def _layer_arrays(
    module: nn.Module,
    arrays: dict[str, mx.array],
    target: Quantization | None,
    merged_dtype: mx.Dtype | None,
    dtype: mx.Dtype | None,
) -> dict[str, mx.array]:
    current = (module.group_size, module.bits, module.mode) if isinstance(module, _QUANTIZED) else None
    same_dtype = dtype is None or arrays.get("scales", arrays["weight"]).dtype == dtype
    if current is not None and current == target and same_dtype:
        return dict(arrays)  # untouched by the adapter, already as wanted: bit for bit
    weight = _float_weight(module)
    weight = weight.astype(dtype or merged_dtype or weight.dtype)
    outputs: dict[str, mx.array] = {}
    if target is None:
        outputs["weight"] = weight
    else:
        group_size, bits, mode = target
        quantized = mx.quantize(weight, group_size=group_size, bits=bits, mode=mode)
        outputs.update(zip(("weight", "scales", "biases"), quantized, strict=False))
    if "bias" in arrays:
        outputs["bias"] = _cast(arrays["bias"], dtype)
    return outputs


def _cast(value: mx.array, dtype: mx.Dtype | None) -> mx.array:
    if dtype is not None and mx.issubdtype(value.dtype, mx.floating) and value.dtype != dtype:
        return value.astype(dtype)
    return value


def _output_config(
    raw: dict[str, Any],
    plan: Recipe | None,
    written: dict[str, Quantization],
    base_quantization: dict[str, Quantization],
    dtype: str | None,
    left_float: list[str],
) -> dict[str, Any]:
    config = copy.deepcopy(raw)
    if dtype is not None:
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = dtype
    if plan is not None or not written:
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    if plan is not None and written:
        block = plan.config_block({path: bits for path, (_, bits, _) in written.items()}, left_float)
        config["quantization"] = block
        config["quantization_config"] = copy.deepcopy(block)
    elif written and not (raw.get("quantization") or raw.get("quantization_config")):
        raise ConversionError("the base model is stored quantized but its config.json has no quantization block")
    return config


def _adapter_note(adapter: Path, config: dict[str, Any]) -> dict[str, Any]:
    """What config.json records of the merged adapter."""
    params = config.get("lora_parameters") or {}
    return {
        "path": str(adapter),
        "digest": adapter_digest(adapter),
        "rank": params.get("rank"),
        "scale": params.get("scale"),
        "keys": params.get("keys"),
        "num_layers": config.get("num_layers"),
    }


def _occupied(path: Path) -> bool:
    """A file, a link, or a directory with anything in it."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        return True
    return path.is_dir() and any(os.scandir(path))
