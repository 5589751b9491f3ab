"""What a runtime driver provides to the measurement protocol."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..record import Skip, maxrss_gb
from ..shapes import RunSpec

__all__ = ["Driver", "GenerationRun", "Skip"]


@dataclass
class GenerationRun:
    """One generation from an already-cached prompt."""

    tokens: int  # new tokens produced
    seconds: float  # wall time after the prompt was cached, to the last committed canvas
    steps_per_canvas: list[int]
    # Per canvas, the wall time of each denoising step (empty where the runtime gives no per-step view).
    step_times: list[list[float]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "seconds": self.seconds,
            "tokens_per_s": self.tokens / self.seconds if self.seconds else None,
            "steps_per_canvas": self.steps_per_canvas,
            "step_times": [[round(t, 6) for t in canvas] for canvas in self.step_times],
            **self.extra,
        }


class Driver:
    """A runtime under test. Every method runs synchronously: results are materialised when it returns."""

    name = "?"
    is_mlx = False

    def __init__(self, spec: RunSpec):
        self.spec = spec
        self.shape = spec.shape
        self.settings = spec.settings

    def setup(self) -> dict[str, Any]:
        """Import the runtime; return version and device information."""
        raise NotImplementedError

    def load(self) -> None:
        raise NotImplementedError

    def prefill(self, prompt: list[int]) -> Any:
        """Encode the prompt into a fresh cache and return it."""
        raise NotImplementedError

    def generate(self, prompt: list[int], steps: int, adaptive: bool, seed: int, per_step: bool) -> GenerationRun:
        """Prefill (untimed), then denoise `settings.canvases` canvases of `steps` steps (or fewer when adaptive)."""
        raise NotImplementedError

    def memory(self) -> dict[str, Any]:
        return {}

    def reset_peak_memory(self) -> None:
        pass


class MlxDriver(Driver):
    """A runtime on MLX: memory comes from MLX's allocator as well as the process."""

    is_mlx = True
    mx: Any = None  # mlx.core, imported in setup()

    def memory(self) -> dict[str, Any]:
        return {
            "peak_gb": self.mx.get_peak_memory() / 1e9,
            "active_gb": self.mx.get_active_memory() / 1e9,
            "maxrss_gb": maxrss_gb(),
        }

    def reset_peak_memory(self) -> None:
        self.mx.reset_peak_memory()
