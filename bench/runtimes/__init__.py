"""One driver per runtime under test. Heavy imports happen inside the drivers, in the worker process."""

from __future__ import annotations

from .base import Driver, GenerationRun, Skip
from .ours import OursDriver
from .reference import ReferenceDriver
from .vlm import VlmDriver

DRIVERS: dict[str, type[Driver]] = {
    OursDriver.name: OursDriver,
    VlmDriver.name: VlmDriver,
    ReferenceDriver.name: ReferenceDriver,
}
# The Python module each runtime needs, checked before a worker is started.
REQUIRES = {"us": "mlx_dgemma", "mlx-vlm": "mlx_vlm", "reference": "transformers"}

__all__ = ["DRIVERS", "REQUIRES", "Driver", "GenerationRun", "Skip"]
