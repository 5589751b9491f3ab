"""Gated activations, act(gate) * up, each one compiled elementwise kernel (the text model's MLPs and experts,
the vision tower's MLPs)."""

from __future__ import annotations

import math
from functools import partial

import mlx.core as mx
import mlx.nn as nn

_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)


@partial(mx.compile, shapeless=True)
def _gelu_tanh_gate(gate: mx.array, up: mx.array) -> mx.array:
    # PyTorch's "tanh" gelu, written out flat so that it compiles to one kernel (mlx-lm's geglu nests
    # nn.gelu_approx's own compiled graph and makes two), with x·x·x as PyTorch computes the cube.
    inner = _SQRT_2_OVER_PI * (gate + 0.044715 * (gate * gate * gate))
    return 0.5 * gate * (1 + mx.tanh(inner)) * up


@partial(mx.compile, shapeless=True)
def _silu_gate(gate: mx.array, up: mx.array) -> mx.array:
    return nn.silu(gate) * up


@partial(mx.compile, shapeless=True)
def _gelu_gate(gate: mx.array, up: mx.array) -> mx.array:
    return nn.gelu(gate) * up


@partial(mx.compile, shapeless=True)
def _relu_gate(gate: mx.array, up: mx.array) -> mx.array:
    return nn.relu(gate) * up


# act(gate) * up, one compiled elementwise kernel each.
GATES = {
    "gelu_pytorch_tanh": _gelu_tanh_gate,
    "gelu_new": _gelu_tanh_gate,
    "gelu": _gelu_gate,
    "silu": _silu_gate,
    "relu": _relu_gate,
}
