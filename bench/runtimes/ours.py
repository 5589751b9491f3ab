"""mlx-dgemma (us): `load_model`, `prefill`, `BlockSampler`, plus a per-component breakdown of one step."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .base import GenerationRun, MlxDriver

# Never stops early: a mean entropy below this is impossible short of exact one-hot logits.
NEVER_CONFIDENT = 1e-30


class OursDriver(MlxDriver):
    name = "us"

    def setup(self) -> dict[str, Any]:
        import mlx.core as mx

        import mlx_dgemma
        from mlx_dgemma import model as model_module
        from mlx_dgemma import moe

        if self.settings.moe_dispatch != "auto":
            moe.set_moe_dispatch(self.settings.moe_dispatch)
        from ..shapes import set_our_settings

        set_our_settings(getattr(self.settings, "our_settings", {}))
        compiled = getattr(self.settings, "compile_layers", "auto")
        if compiled != "auto":
            model_module.COMPILE_LAYERS = compiled == "on"
        self.mx = mx
        return {
            "mlx": mx.__version__,
            "mlx_dgemma": _version("mlx-dgemma") or getattr(mlx_dgemma, "__version__", "?"),
            "device": str(mx.default_device()),
            "moe_dispatch": moe.moe_dispatch(),
            "compile_layers": _compiles_layers(model_module),
            "cpu_kernel_lanes": _cpu_kernel_lanes(mx),
        }

    # -- loading -------------------------------------------------------------------------------------------------

    def load(self) -> None:
        from mlx_dgemma import loader

        dense = getattr(self.settings, "dense_weights", "auto")
        if self.shape.source == "synthetic":
            self.model = self._synthetic_model()
            # What loading a checkpoint does after reading it (older trees dequantized nothing).
            if hasattr(loader, "place_dense_layers"):
                loader.place_dense_layers(self.model, dense)
        elif hasattr(loader, "place_dense_layers"):
            self.model = loader.load_model(self.spec.checkpoint, dense_weights=dense)
        else:
            self.model = loader.load_model(self.spec.checkpoint)
        self.canvas = self.model.config.canvas_length
        self.vocab = self.model.text_config.vocab_size

    def _synthetic_model(self):
        from mlx_dgemma.config import ModelConfig
        from mlx_dgemma.model import Model

        from .. import synthetic

        config = ModelConfig.from_dict(self.shape.config_dict())
        bits, group_size = self.shape.bits, self.shape.group_size
        return synthetic.build(
            lambda: Model(config),
            lambda model: _mixed_recipe(bits, group_size),
            self.shape.dtype,
            bits,
            group_size,
            self.settings.seed,
        )

    # -- the protocol --------------------------------------------------------------------------------------------

    def prefill(self, prompt: list[int]):
        from mlx_dgemma.generate import prefill

        cache = self.model.make_cache()
        prefill(self.model, cache, self.mx.array([prompt]))
        return cache

    def sampler_settings(self, steps: int, adaptive: bool, seed: int):
        from mlx_dgemma.sampler import SamplerSettings

        return SamplerSettings(
            steps=steps,
            max_new_tokens=self.settings.canvases * self.canvas,
            eos_token_ids=(),  # random weights: never stop on a chance EOS, every runtime makes the same tokens
            pad_token_id=None,
            seed=seed,
            stability_threshold=1 if adaptive else 0,
            confidence_threshold=0.005 if adaptive else NEVER_CONFIDENT,
        )

    def generate(self, prompt: list[int], steps: int, adaptive: bool, seed: int, per_step: bool) -> GenerationRun:
        from mlx_dgemma.sampler import BlockSampler, SeededNoise

        mx = self.mx
        settings = self.sampler_settings(steps, adaptive, seed)
        cache = self.prefill(prompt)
        sampler = BlockSampler(self.model, settings, SeededNoise(seed))
        marks: list[tuple[int, float]] = []
        start = time.perf_counter()
        tokens, steps_per_canvas = 0, []
        for kind, item in sampler_events(sampler, cache):
            if kind == "draft":
                # The sampler has read this step's stop flags: a true step boundary.
                marks.append((item.canvas, time.perf_counter()))
            else:
                mx.eval(item.tokens)
                tokens += item.tokens.shape[1]
                steps_per_canvas.append(item.steps[0])
        seconds = time.perf_counter() - start
        return GenerationRun(tokens, seconds, steps_per_canvas, _intervals(start, marks))

    # -- where a step's time goes --------------------------------------------------------------------------------

    def breakdown(self, prompt: list[int]) -> dict[str, Any]:
        from ..breakdown import StepBreakdown

        return StepBreakdown(self, prompt).run()


@dataclass
class _Draft:
    canvas: int
    step: int


def sampler_events(sampler, cache) -> Iterator[tuple[str, Any]]:
    """("draft", d) after every step (d.canvas, d.step) and ("canvas", result) per committed canvas.

    Works with the sampler yielding step drafts (`canvases(..., drafts=True)`) and with
    the earlier callback form (`canvases(..., on_draft)`).
    """
    if "drafts" in inspect.signature(sampler.canvases).parameters:
        for item in sampler.canvases(cache, 1, drafts=True):
            yield ("canvas", item) if hasattr(item, "tokens") else ("draft", item)
        return
    drafts: list[_Draft] = []
    for result in sampler.canvases(cache, 1, lambda canvas, step, argmax: drafts.append(_Draft(canvas, step))):
        yield from (("draft", d) for d in drafts)  # the callback already ran; timing is approximate here
        drafts.clear()
        yield "canvas", result


def _compiles_layers(model_module) -> bool | None:
    """Whether a canvas's decoder layers run as compiled graphs (None: a tree without the option)."""
    if not hasattr(model_module, "compiles_layers"):
        return None
    from mlx_dgemma.cpu import RowBlocks

    return model_module.compiles_layers(RowBlocks(256))


def _cpu_kernel_lanes(mx) -> int | None:
    """Floats per vector in our C kernels as built here (None: not on the CPU, not built, or a tree before them)."""
    from mlx_dgemma import host_kernels

    if mx.default_device().type != mx.cpu or not hasattr(host_kernels, "vector_lanes"):
        return None
    return host_kernels.vector_lanes()


def _version(distribution: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _intervals(start: float, marks: list[tuple[int, float]]) -> list[list[float]]:
    """Per canvas, the time of each step: from the previous step boundary (or the start) to this one."""
    per_canvas: list[list[float]] = []
    previous = start
    for canvas, moment in marks:
        while len(per_canvas) <= canvas:
            per_canvas.append([])
        per_canvas[canvas].append(moment - previous)
        previous = moment
    return per_canvas


def _mixed_recipe(bits: int, group_size: int) -> Callable:
    """Our converter's mixed recipe: experts at `bits`, the other linear layers and the embedding at 8 bits."""
    import mlx.nn as nn

    try:
        from mlx_dgemma.convert.quantize import Recipe

        recipe = Recipe.parse("mixed", bits, group_size)

        def bits_for(path: str, module) -> int | None:
            stacked = module.weight.ndim == 3  # expert stacks keep the source name, without `.weight`
            return recipe.bits_for(path if stacked else f"{path}.weight", module.weight.shape)

    except ImportError:  # the converter is not importable: same rule, spelled out

        def bits_for(path: str, module) -> int | None:
            if ".router" in path:
                return None
            return bits if module.weight.ndim == 3 else 8

    def predicate(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized") or "weight" not in module:
            return False
        chosen = bits_for(path, module)
        return {"bits": chosen, "group_size": group_size} if chosen else False

    return predicate
