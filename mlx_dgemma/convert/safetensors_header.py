"""Reading safetensors headers without touching tensor data.

The format is an 8-byte little-endian header length, a JSON header mapping each
tensor name to dtype, shape and data offsets, then the raw data. Parsing it
ourselves lets us validate a 50 GB checkpoint (names, shapes, truncation) in
milliseconds, before any output is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..memory import WeightsFileError, read_safetensors_header
from .errors import ConversionError

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
    """The tensors a safetensors file holds; raises if the file is cut short, unreadable or of a dtype we lack."""
    try:
        header = read_safetensors_header(path)
    except WeightsFileError as error:
        raise ConversionError(str(error)) from None
    tensors = []
    for name, entry in header.items():
        dtype = entry["dtype"]
        if dtype not in ITEM_SIZES:
            raise ConversionError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        shape = tuple(int(dim) for dim in entry["shape"])
        tensors.append(TensorInfo(name, path, dtype, shape, math.prod(shape) * ITEM_SIZES[dtype]))
    return tensors
