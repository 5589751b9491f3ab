"""What of our CUDA kernels can be checked without a GPU: their wiring, and when they apply.

Their arithmetic is checked on a GPU by `python -m bench.moe` and their compilation by
`python -m bench.kernel_check` (bench/README.md).
"""

import re

import mlx.core as mx
import pytest
from mlx_lm.models.switch_layers import SwitchLinear

from mlx_dgemma import kernels

SOURCES = [*kernels.FUSED_QMM.values(), kernels.MOE_LAYOUT, kernels.MOE_COMBINE, kernels.ROUTER_TOP_K]


@pytest.mark.parametrize("kernel", SOURCES, ids=lambda k: k.name)
def test_every_argument_is_used_and_every_used_name_is_an_argument(kernel):
    body = kernel.source
    for name in (*kernel.inputs, *kernel.outputs):
        assert re.search(rf"\b{name}\b", body), f"{kernel.name}: {name} is never used"
    # Template constants the Python side passes, by kernel; anything else upper-case must be defined in the body.
    constants = set(re.findall(r"\b([A-Z][A-Z_]+)\b", body)) - {"N", "K"}
    defined = set(re.findall(r"constexpr int ([A-Z_]+)", body))
    passed = {"MT", "GATHER", "GLU", "ACT", "STAGES", "EXPERTS", "TILE", "H", "TOP_K"}
    assert constants <= defined | passed, constants - defined - passed


def test_staged_shared_memory_matches_what_ptxas_reported():
    # ptxas (bench.kernel_check): 41728 bytes at the released gate/up (k 2816, 16-row tiles), 24832 at down (704).
    assert kernels.staged_fits(2816, 16) and kernels.staged_fits(704, 16) and kernels.staged_fits(2816, 32)
    assert 128 * 44 * 4 + kernels.stages(16) * (128 * 32 + 16 * 144) == 41728
    assert not kernels.staged_fits(4096, 16)  # a wider model takes the register-prefetch matmul


def test_nothing_applies_off_cuda():
    layer = SwitchLinear(256, 256, 4).to_quantized(group_size=64, bits=4)
    layer.set_dtype(mx.bfloat16)  # now what the kernels would take on CUDA
    assert (layer.bits, layer.group_size, layer.scales.dtype, layer.weight.dtype) == (4, 64, mx.bfloat16, mx.uint32)
    assert not kernels.available()
    assert not kernels.supports(layer, layer, mx.bfloat16)


def test_router_takes_stock_ops_off_cuda(monkeypatch):
    from mlx_dgemma import moe

    monkeypatch.setattr(moe, "ROUTER_KERNEL", True)
    assert not moe.routes_by_kernel()
    assert moe.dispatch_settings()[-1] is False  # compiled graphs are keyed by whether the kernel routes
