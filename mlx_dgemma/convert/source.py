"""Finding the source checkpoint (local directory or hub repo) and indexing its tensors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_dgemma.config import ConfigError, ModelConfig
from mlx_dgemma.loader import LoadError, resolve_model_path

from .errors import ConversionError
from .safetensors_header import TensorInfo, read_header

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Files besides the weights that a converted checkpoint needs next to it.
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "processor_config.json",
    "preprocessor_config.json",
)


@dataclass(frozen=True)
class SourceCheckpoint:
    root: Path
    config: ModelConfig
    tensors: dict[str, TensorInfo]

    @classmethod
    def open(cls, root: Path) -> SourceCheckpoint:
        try:
            config = ModelConfig.from_path(root)
        except ConfigError as error:
            raise ConversionError(str(error)) from None
        if config.quantization:
            raise ConversionError(f"{root} is already quantized; convert from the original bf16 checkpoint")
        return cls(root, config, index_tensors(root))

    @property
    def raw_config(self) -> dict[str, Any]:
        return self.config.raw


def resolve_source(src: str | Path, revision: str | None = None) -> Path:
    """A local checkpoint directory for SRC, downloading it when SRC is a hub repo id."""
    try:
        return resolve_model_path(src, revision)
    except LoadError as error:
        raise ConversionError(str(error)) from None


def index_tensors(root: Path) -> dict[str, TensorInfo]:
    """Every tensor in the checkpoint, by name, from the safetensors headers alone."""
    weight_map = _read_weight_map(root)
    files = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_FILE]
    tensors: dict[str, TensorInfo] = {}
    for file_name in files:
        for info in read_header(root / file_name):
            if info.name in tensors:
                raise ConversionError(
                    f"tensor {info.name} appears in both {tensors[info.name].file.name} and {file_name}"
                )
            tensors[info.name] = info
    if weight_map is not None:
        _check_index_agrees(root, weight_map, tensors)
    return tensors


def _read_weight_map(root: Path) -> dict[str, str] | None:
    index_path = root / INDEX_FILE
    if not index_path.is_file():
        if not (root / SINGLE_FILE).is_file():
            raise ConversionError(f"no {SINGLE_FILE} or {INDEX_FILE} in {root}")
        return None
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise ConversionError(f"{index_path} is not a valid safetensors index") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ConversionError(f"{index_path} is not a valid safetensors index")
    for file_name in sorted(set(weight_map.values())):
        if not (root / file_name).is_file():
            raise ConversionError(f"{INDEX_FILE} names shard {file_name}, which is missing from {root}")
    return weight_map


def _check_index_agrees(root: Path, weight_map: dict[str, str], tensors: dict[str, TensorInfo]) -> None:
    for name, file_name in weight_map.items():
        info = tensors.get(name)
        if info is None or info.file != root / file_name:
            raise ConversionError(f"{INDEX_FILE} places {name} in {file_name}, but that shard does not hold it")
