"""What of the CUDA plug-in's kernels can be checked without a GPU: their wiring, and when they apply.

Their compilation is checked by `python -m bench.kernel_check` (no GPU needed, bench/README.md); their
arithmetic only by a run on a CUDA GPU.
"""

import re

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models.switch_layers import SwitchLinear

from mlx_dgemma.backends import cuda, cuda_kernels
from mlx_dgemma.config import ModelConfig
from mlx_dgemma.model import Experts, Model, Router

SOURCES = [
    *cuda_kernels.FUSED_QMM.values(),
    cuda_kernels.MOE_LAYOUT,
    cuda_kernels.MOE_COMBINE,
    cuda_kernels.ROUTER_TOP_K,
]


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
    assert cuda_kernels.staged_fits(2816, 16) and cuda_kernels.staged_fits(704, 16)
    assert cuda_kernels.staged_fits(2816, 32)
    assert 128 * 44 * 4 + cuda_kernels.stages(16) * (128 * 32 + 16 * 144) == 41728
    assert not cuda_kernels.staged_fits(4096, 16)  # a wider model takes the register-prefetch matmul


def test_nothing_applies_off_cuda():
    layer = SwitchLinear(256, 256, 4).to_quantized(group_size=64, bits=4)
    layer.set_dtype(mx.bfloat16)  # now what the kernels would take on CUDA
    assert (layer.bits, layer.group_size, layer.scales.dtype, layer.weight.dtype) == (4, 64, mx.bfloat16, mx.uint32)
    assert not cuda_kernels.available() and not cuda.available()
    assert not cuda_kernels.supports(layer, layer, mx.bfloat16)
    assert not cuda_kernels.fused_supports(layer, layer, mx.bfloat16, "gelu_pytorch_tanh")


# A shape whose experts the fused kernels would take on CUDA: output columns in multiples of 128, k in groups of 64.
TEXT = dict(
    vocab_size=384,
    hidden_size=128,
    intermediate_size=128,
    moe_intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    global_head_dim=64,
    num_global_key_value_heads=1,
    sliding_window=12,
    num_experts=8,
    top_k_experts=2,
)


def bf16_model(options: cuda.CudaOptions | None) -> Model:
    """Random weights in bf16 (the same for every call), quantized as the released conversion is: experts 4-bit
    in groups of 64, the other linears 8-bit (the router's projection stays float); then `options` applied."""
    mx.random.seed(0)
    model = Model(ModelConfig.from_dict({"model_type": "diffusion_gemma", "text_config": TEXT, "canvas_length": 16}))
    model.set_dtype(mx.bfloat16)

    def quantization(path: str, module: nn.Module):
        if isinstance(module, SwitchLinear):
            return {"group_size": 64, "bits": 4}
        return isinstance(module, nn.Linear) and not path.endswith("router.proj") and {"group_size": 64, "bits": 8}

    nn.quantize(model, class_predicate=quantization)
    mx.eval(model.parameters())
    if options is not None:
        cuda.apply(model, options)
    return model


def logits(model: Model) -> tuple[mx.array, mx.array]:
    """Logits of a canvas after a prompt, without and with self-conditioning."""
    prompt = mx.random.randint(0, 384, (2, 20), key=mx.random.key(1))
    canvas = mx.random.randint(0, 384, (2, 16), key=mx.random.key(2))
    cache = model.make_cache()
    model.encode(prompt, cache)
    first = model.denoise(canvas, cache)
    return first, model.denoise(canvas, cache, first / 0.6)


def test_the_plugin_off_cuda_keeps_the_core_experts_and_router():
    """Every option on, without the kernels: the router stays the core's, the fused experts fall back to the core's
    path, and the logits are those of the plug-in's pure-MLX parts alone."""
    everything = bf16_model(cuda.CudaOptions())
    for layer in everything.layers:
        assert type(layer.router) is Router
        experts = layer.experts
        assert isinstance(experts, cuda.FusedExperts)
        # On CUDA these blocks would take the kernels: only the missing GPU sends them down the core's path.
        assert cuda_kernels._suits(experts.gate_up_proj) and cuda_kernels._suits(experts.down_proj)
        assert not cuda_kernels.fused_supports(experts.gate_up_proj, experts.down_proj, mx.bfloat16, experts.activation)
        x = mx.random.normal((2, 16, TEXT["hidden_size"]), key=mx.random.key(3)).astype(mx.bfloat16)
        indices, weights = layer.router(x)
        assert mx.array_equal(experts(x, indices, weights), Experts.__call__(experts, x, indices, weights))
    portable = bf16_model(cuda.CudaOptions(fused_experts=False, router_kernel=False))
    for ours, expected in zip(logits(everything), logits(portable)):
        assert mx.array_equal(ours, expected)


def test_the_kernel_options_alone_leave_the_core_logits_off_cuda():
    core, kernels_only = bf16_model(None), bf16_model(cuda.CudaOptions(dequantize_dense=False, grouped_attention=False))
    assert isinstance(kernels_only.layers[0].experts, cuda.FusedExperts)
    for ours, expected in zip(logits(kernels_only), logits(core)):
        assert mx.array_equal(ours, expected)
