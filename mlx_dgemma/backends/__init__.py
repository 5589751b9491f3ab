"""Backend plug-ins: what one backend alone needs, applied once to a loaded model (`loader.load_model`).

The model and sampler hold no backend checks; this is the one place that asks which backend runs.
"""

from __future__ import annotations

import mlx.core as mx

from ..model import Model
from . import cpu, cuda


def prepare(cuda_options: cuda.CudaOptions) -> None:
    """Before any weight is read: settings the backend reads at its first launch."""
    if cuda_options.enabled and cuda.available():
        cuda.prepare(cuda_options)


def apply(model: Model, cuda_options: cuda.CudaOptions) -> None:
    """The plug-in of the default device, if it has one."""
    if cuda.available():
        if cuda_options.enabled:
            cuda.apply(model, cuda_options)
    elif mx.default_device().type == mx.cpu and cpu.needed(model):
        cpu.apply(model)
