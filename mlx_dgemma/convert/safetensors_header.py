"""Reading safetensors headers without touching tensor data.

The format is an 8-byte little-endian header length, a JSON header mapping each
tensor name to dtype, shape and data offsets, then the raw data. Parsing it
ourselves lets us validate a 50 GB checkpoint (names, shapes, truncation) in
milliseconds, before any output is written.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import ConversionError

# Real headers are a few MB at most; anything larger is a corrupt length field.
MAX_HEADER_BYTES = 100_000_000

FLOAT_DTYPES = {"F32": 4, "F16": 2, "BF16": 2}
INTEGER_DTYPES = {"I8": 1, "U8": 1, "BOOL": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8}
ITEM_SIZES = {**FLOAT_DTYPES, **INTEGER_DTYPES}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


def read_header(path: Path) -> list[TensorInfo]:
    """The tensors a safetensors file holds; raises if the file is cut short or unreadable."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ConversionError(f"{path} is truncated: no safetensors header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise ConversionError(f"{path} is truncated or not a safetensors file (header length {header_len})")
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConversionError(f"{path} has an unreadable safetensors header") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path} has an unreadable safetensors header")
    header.pop("__metadata__", None)

    tensors = []
    data_end = 0
    for name, entry in header.items():
        info, end = _parse_entry(path, name, entry)
        tensors.append(info)
        data_end = max(data_end, end)
    expected_size = 8 + header_len + data_end
    if size < expected_size:
        raise ConversionError(f"{path} is truncated: {size} bytes on disk, its header needs {expected_size}")
    return tensors


def _parse_entry(path: Path, name: str, entry: object) -> tuple[TensorInfo, int]:
    try:
        dtype = entry["dtype"]
        shape = tuple(int(dim) for dim in entry["shape"])
        begin, end = (int(offset) for offset in entry["data_offsets"])
    except (TypeError, KeyError, ValueError):
        raise ConversionError(f"{path} has a malformed header entry for {name}") from None
    if dtype not in ITEM_SIZES:
        raise ConversionError(f"{path}: tensor {name} has unsupported dtype {dtype}")
    nbytes = math.prod(shape) * ITEM_SIZES[dtype]
    if begin < 0 or end - begin != nbytes:
        raise ConversionError(f"{path}: tensor {name} has data offsets {begin}..{end} that do not fit shape {shape}")
    return TensorInfo(name, path, dtype, shape, nbytes), end
