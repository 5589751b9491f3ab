"""convert_checkpoint: validate the whole source, then convert it tensor by tensor."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from .errors import ConversionError
from .layout import Role, classify, expected_text_shapes
from .quantize import Recipe, convert_tensor, module_path, parse_dtype
from .safetensors_header import TensorInfo
from .source import SIDE_FILES, SourceCheckpoint, resolve_source
from .writer import DEFAULT_MAX_SHARD_BYTES, ShardWriter, publish, remove_stale_dirs, staging_dir

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class PlannedTensor:
    info: TensorInfo
    bits: int | None  # None keeps the tensor in the float dtype


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    dtype: str = "bfloat16",
    bits: int | None = 4,
    group_size: int = 64,
    recipe: str = "mixed",
    text_only: bool = False,
    force: bool = False,
    revision: str | None = None,
    progress: Progress | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Convert a DiffusionGemma checkpoint (directory or hub repo id) SRC into an MLX checkpoint at DST.

    Everything is validated before the first byte is written; the output appears
    at DST only once complete (with `force`, an old DST is replaced only then).
    """
    target_dtype = parse_dtype(dtype)
    plan_recipe = Recipe.parse(recipe, bits, group_size)
    if max_shard_bytes <= 0:
        raise ConversionError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    dst = Path(dst).expanduser()
    # First, as it may put back an old DST that a killed run had moved aside.
    remove_stale_dirs(dst)
    if (dst.exists() or dst.is_symlink()) and not force:
        raise ConversionError(f"{dst} exists; pass --force to overwrite")
    root = resolve_source(src, revision)
    _refuse_overwriting_source(root, dst)
    source = SourceCheckpoint.open(root)
    plan = plan_tensors(source, plan_recipe, text_only)

    with staging_dir(dst) as staging:
        module_bits = write_tensors(plan, staging, target_dtype, plan_recipe, max_shard_bytes, progress)
        left_float = [module_path(t.info.name) for t in plan if plan_recipe.left_float(t.info.name, t.info.shape)]
        config = output_config(source.raw_config, plan_recipe, module_bits, dtype, text_only, left_float)
        _write_json(staging / "config.json", config)
        copy_side_files(root, staging)
        publish(staging, dst)
    return dst


def plan_tensors(source: SourceCheckpoint, recipe: Recipe, text_only: bool) -> list[PlannedTensor]:
    """The tensors to write, in source order; raises on any missing, extra or misshapen text tensor."""
    expected = expected_text_shapes(source.config)
    missing = sorted(expected.keys() - source.tensors.keys())
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConversionError(f"missing tensor {missing[0]}{more}")
    plan = []
    for name, info in source.tensors.items():
        role = classify(name, expected)
        if role is Role.UNEXPECTED:
            raise ConversionError(f"unexpected tensor {name} in {info.file.name}")
        if role is Role.TEXT:
            _check_text_tensor(info, expected[name])
            plan.append(PlannedTensor(info, recipe.bits_for(name, info.shape)))
        elif role is Role.VISION and not text_only:
            plan.append(PlannedTensor(info, None))
    return plan


def _check_text_tensor(info: TensorInfo, shape: tuple[int, ...]) -> None:
    if info.shape != shape:
        raise ConversionError(f"tensor {info.name} has shape {list(info.shape)}, expected {list(shape)}")
    if not info.is_float:
        raise ConversionError(f"tensor {info.name} has dtype {info.dtype}, expected a float dtype")


def write_tensors(
    plan: list[PlannedTensor],
    directory: Path,
    dtype: mx.Dtype,
    recipe: Recipe,
    max_shard_bytes: int,
    progress: Progress | None,
) -> dict[str, int]:
    """Convert and write every planned tensor; returns the bits of each quantized module."""
    writer = ShardWriter(directory, max_shard_bytes)
    module_bits: dict[str, int] = {}
    done = 0
    for file, items in _group_by_file(plan).items():
        arrays = _load_lazily(file)
        for item in items:
            name = item.info.name
            writer.add(convert_tensor(name, arrays.pop(name), dtype, item.bits, recipe.group_size))
            # Free the source tensor now: peak memory stays near one tensor plus one shard.
            mx.clear_cache()
            if item.bits is not None:
                module_bits[module_path(name)] = item.bits
            done += 1
            if progress is not None:
                progress(done, len(plan), name)
        del arrays
    writer.finish()
    return module_bits


def _group_by_file(plan: list[PlannedTensor]) -> dict[Path, list[PlannedTensor]]:
    groups: dict[Path, list[PlannedTensor]] = {}
    for item in plan:
        groups.setdefault(item.info.file, []).append(item)
    return groups


def _load_lazily(file: Path) -> dict[str, mx.array]:
    # mx.load maps safetensors lazily: a tensor's bytes are read only when it is evaluated.
    try:
        return mx.load(str(file))
    except (RuntimeError, ValueError) as error:
        raise ConversionError(f"cannot read {file}: {error}") from None


def output_config(
    raw: dict[str, Any],
    recipe: Recipe,
    module_bits: dict[str, int],
    dtype: str,
    text_only: bool,
    left_float: Sequence[str] = (),
) -> dict[str, Any]:
    """The source config.json with the output dtype and, when quantized, the quantization block (`left_float`:
    modules the recipe would quantize but whose width the group size does not divide)."""
    config = copy.deepcopy(raw)
    if text_only:
        config.pop("vision_config", None)
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = dtype
    if recipe.quantizes:
        block = recipe.config_block(module_bits, left_float)
        config["quantization"] = block
        config["quantization_config"] = copy.deepcopy(block)
    return config


def copy_side_files(root: Path, directory: Path) -> None:
    for name in SIDE_FILES:
        if (root / name).is_file():
            shutil.copyfile(root / name, directory / name)


def _refuse_overwriting_source(root: Path, dst: Path) -> None:
    source, target = root.resolve(), dst.resolve()
    if target == source or target in source.parents:
        raise ConversionError(f"{dst} holds the source checkpoint; choose another destination")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
