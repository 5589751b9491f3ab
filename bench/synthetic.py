"""Random-weight MLX models built in memory, for shapes too big to write as checkpoints.

The modules are created (their float initialisers stay lazy, never evaluated),
quantized (also lazy), then every quantized tensor is replaced by random packed
integers and random scales before anything is evaluated, so peak memory is the
quantized model itself. Each tensor's values come from a key derived from its
module path, so two runtimes whose modules share names get the same numbers.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def _random_words(shape: tuple[int, ...], key: int) -> mx.array:
    """Uniform random uint32 words: the lowbias32 integer hash of a counter (MLX has no raw-bits draw)."""
    x = mx.arange(math.prod(shape), dtype=mx.uint32) * mx.array(0x9E3779B1, mx.uint32) + mx.array(key, mx.uint32)
    x = x ^ (x >> 16)
    x = x * mx.array(0x7FEB352D, mx.uint32)
    x = x ^ (x >> 15)
    x = x * mx.array(0x846CA68B, mx.uint32)
    return (x ^ (x >> 16)).reshape(shape)


def _seed_of(seed: int, name: str) -> int:
    return (zlib.crc32(name.encode()) ^ (seed * 2654435761)) & 0xFFFFFFFF


def _fill_quantized(name: str, module: nn.Module, dtype: mx.Dtype, seed: int) -> None:
    """Random packed weights whose dequantized values have std ~ 1/sqrt(fan-in)."""
    bits = module.bits
    packed_shape = module.weight.shape
    fan_in = packed_shape[-1] * 32 // bits
    key = _seed_of(seed, name)
    levels = 2**bits
    unit = 1.0 / (math.sqrt((levels**2 - 1) / 12.0) * math.sqrt(fan_in))
    module.weight = _random_words(packed_shape, key)
    scales = (mx.random.uniform(0.75, 1.25, module.scales.shape, key=mx.random.key(key)) * unit).astype(dtype)
    module.scales = scales
    if module.get("biases") is not None:
        module.biases = (scales * (-(levels - 1) / 2.0)).astype(dtype)
    mx.eval([a for a in (module.weight, module.scales, module.get("biases")) if a is not None])


def randomize(model: nn.Module, dtype: mx.Dtype, seed: int = 0) -> None:
    """Give a freshly built (lazy) model concrete random weights in `dtype`, evaluated module by module."""
    for name, module in model.named_modules():
        if "scales" in module and hasattr(module, "bits"):
            _fill_quantized(name, module, dtype, seed)
    # Float parameters left: norms, layer scalars, router scales, unquantized linears.
    model.update(tree_map(lambda a: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a, model.parameters()))
    for _, array in tree_flatten(model.parameters()):
        mx.eval(array)


def build(
    make_model: Callable[[], nn.Module],
    predicate_for: Callable[[nn.Module], Callable[[str, nn.Module], Any]] | None,
    dtype: str,
    bits: int | None,
    group_size: int,
    seed: int,
) -> nn.Module:
    """Build a model, quantize it with the runtime's own recipe (`predicate_for(model)`), give it random weights."""
    model = make_model()
    if bits is not None and predicate_for is not None:
        nn.quantize(model, group_size=group_size, bits=bits, class_predicate=predicate_for(model))
    randomize(model, DTYPES[dtype], seed)
    model.eval()
    return model
