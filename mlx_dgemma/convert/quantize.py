"""The quantization recipe and the per-tensor conversion (cast, rename, quantize)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from .errors import ConversionError

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
RECIPES = ("mixed", "uniform", "none")
SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
MODE = "affine"
# Bits the mixed recipe gives every quantized linear layer except the experts.
MIXED_DENSE_BITS = 8

_EXPERTS = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")
_DENSE_LINEAR = re.compile(
    r"(\.self_attn\.[qkvo]_proj|\.mlp\.(gate|up|down)_proj|\.self_conditioning\.(gate|up|down)_proj"
    r"|^model\.decoder\.embed_tokens)\.weight$"
)


def parse_dtype(name: str) -> mx.Dtype:
    if name not in DTYPES:
        raise ConversionError(f"unsupported dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass(frozen=True)
class Recipe:
    """Which text tensors get quantized, and to how many bits."""

    name: str
    bits: int | None
    group_size: int

    @classmethod
    def parse(cls, name: str, bits: int | None, group_size: int) -> Recipe:
        if name not in RECIPES:
            raise ConversionError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
        if name == "none" or bits is None:
            return cls("none", None, group_size)
        if bits not in SUPPORTED_BITS:
            raise ConversionError(f"unsupported bits {bits}; choose one of {', '.join(map(str, SUPPORTED_BITS))}")
        if group_size not in SUPPORTED_GROUP_SIZES:
            raise ConversionError(
                f"unsupported group size {group_size}; choose one of {', '.join(map(str, SUPPORTED_GROUP_SIZES))}"
            )
        return cls(name, bits, group_size)

    @property
    def quantizes(self) -> bool:
        return self.bits is not None

    def bits_for(self, name: str, shape: tuple[int, ...]) -> int | None:
        """Bits for a text tensor, or None to keep it in the float dtype."""
        bits = self._bits_by_name(name, shape)
        return None if bits is None or shape[-1] % self.group_size else bits

    def left_float(self, name: str, shape: tuple[int, ...]) -> bool:
        """Whether the recipe would quantize this tensor but the group size does not divide its width."""
        return self._bits_by_name(name, shape) is not None and shape[-1] % self.group_size != 0

    def _bits_by_name(self, name: str, shape: tuple[int, ...]) -> int | None:
        if self.bits is None or len(shape) < 2:
            return None
        if _EXPERTS.search(name):
            return self.bits
        if _DENSE_LINEAR.search(name):
            return MIXED_DENSE_BITS if self.name == "mixed" else self.bits
        return None

    def config_block(self, module_bits: dict[str, int], left_float: Iterable[str] = ()) -> dict[str, Any]:
        """The config.json `quantization` block: defaults, modules whose bits deviate from them, and `false` for
        modules left float (as mlx-lm writes them: a loader must not look for their scales)."""
        block: dict[str, Any] = {"group_size": self.group_size, "bits": self.bits, "mode": MODE}
        for module, bits in sorted(module_bits.items()):
            if bits != self.bits:
                block[module] = {"group_size": self.group_size, "bits": bits}
        for module in sorted(left_float):
            block[module] = False
        return block


def output_key(name: str) -> str:
    """The MLX key of a source tensor: stacked experts gain the `.weight` suffix of a module."""
    return f"{name}.weight" if _EXPERTS.search(name) else name


def module_path(name: str) -> str:
    return output_key(name).removesuffix(".weight")


def convert_tensor(
    name: str, array: mx.array, dtype: mx.Dtype, bits: int | None, group_size: int
) -> dict[str, mx.array]:
    """The output arrays for one source tensor, evaluated so the source can be freed."""
    if mx.issubdtype(array.dtype, mx.floating) and array.dtype != dtype:
        array = array.astype(dtype)
    if bits is None:
        outputs = {output_key(name): array}
    else:
        packed, scales, biases = mx.quantize(array, group_size=group_size, bits=bits, mode=MODE)
        module = module_path(name)
        outputs = {f"{module}.weight": packed, f"{module}.scales": scales, f"{module}.biases": biases}
    try:
        mx.eval(outputs)
    except (RuntimeError, ValueError) as error:  # e.g. the file changed on disk since validation
        raise ConversionError(f"cannot convert {name}: {error}") from None
    return outputs
