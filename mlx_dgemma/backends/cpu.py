"""The CPU plug-in: what MLX's CPU backend lacks for a model, applied at load (`apply`).

MLX's CPU `gather_mm` multiplies float32 only, so the experts of a bfloat16 or
float16 checkpoint (stored unquantized) cannot run there as a Mac runs them.
Each gathered matmul of such experts runs in float32 here and is rounded back to
the weights' dtype, as a reduced-precision matmul rounds its output. Quantized
experts (`gather_qmm`) and float32 ones need nothing.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.switch_layers import SwitchLinear

from ..model import Experts, Model


class Float32SwitchLinear(SwitchLinear):
    """A stack of expert linears multiplied in float32, the output rounded to the weights' dtype."""

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        weight = self["weight"]
        out = mx.gather_mm(
            x.astype(mx.float32),
            weight.astype(mx.float32).swapaxes(-1, -2),
            rhs_indices=indices,
            sorted_indices=sorted_indices,
        )
        if "bias" in self:
            out = out + mx.expand_dims(self["bias"][indices], -2).astype(mx.float32)
        return out.astype(weight.dtype)


def needed(model: Model) -> bool:
    """Whether `apply` changes anything for this model."""
    return any(_reduced_float_stacks(layer.experts) for layer in model.layers)


def apply(model: Model) -> None:
    """Make reduced-precision float experts multiply in float32 (see the module's docstring)."""
    for layer in model.layers:
        for stack in _reduced_float_stacks(layer.experts):
            stack.__class__ = Float32SwitchLinear


def _reduced_float_stacks(experts: Experts) -> list[SwitchLinear]:
    """The experts' stacks stored as reduced-precision floats: both, or one where a quantization left the other
    float (a group size that does not divide its width); under a LoRA adapter, the stack it adapts."""
    stacks = [getattr(stack, "linear", stack) for stack in (experts.gate_up_proj, experts.down_proj)]
    return [s for s in stacks if type(s) is SwitchLinear and s.weight.dtype in (mx.bfloat16, mx.float16)]
