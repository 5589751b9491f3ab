"""mlx-dgemma (us), through its public API: `load_model`, `generate.prefill`, `BlockSampler`, `SeededNoise`,
`SamplerSettings`; the CUDA plug-in on or off at load (`CudaOptions(enabled=...)`, `--cuda-plugin`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .base import GenerationRun, MlxDriver

# Never stops early: a mean entropy below this is impossible short of exact one-hot logits.
NEVER_CONFIDENT = 1e-30


class OursDriver(MlxDriver):
    name = "us"

    def setup(self) -> dict[str, Any]:
        import mlx.core as mx

        import mlx_dgemma
        from mlx_dgemma.backends import cuda

        self.mx = mx
        self.cuda_options = mlx_dgemma.CudaOptions(enabled=self.settings.cuda_plugin)
        return {
            "mlx": mx.__version__,
            "mlx_dgemma": _version("mlx-dgemma") or getattr(mlx_dgemma, "__version__", "?"),
            "device": str(mx.default_device()),
            "cuda_plugin": "on" if self.settings.cuda_plugin else "off",
            # load_model applies it only where MLX's default device is a CUDA GPU.
            "cuda_plugin_applied": self.settings.cuda_plugin and cuda.available(),
        }

    # -- loading -------------------------------------------------------------------------------------------------

    def load(self) -> None:
        from mlx_dgemma import load_model

        if self.shape.source == "synthetic":
            self.model = self._synthetic_model()
        else:
            self.model = load_model(self.spec.checkpoint, cuda_options=self.cuda_options)
        self.canvas = self.model.config.canvas_length
        self.vocab = self.model.text_config.vocab_size

    def _synthetic_model(self):
        """Random weights in memory, then what `load_model` does after reading a checkpoint: the CUDA plug-in."""
        from mlx_dgemma import Model, ModelConfig
        from mlx_dgemma.backends import cuda

        from .. import synthetic

        plugin = self.cuda_options.enabled and cuda.available()
        if plugin:
            cuda.prepare(self.cuda_options)  # before MLX's first launch
        config = ModelConfig.from_dict(self.shape.config_dict())
        bits, group_size = self.shape.bits, self.shape.group_size
        model = synthetic.build(
            lambda: Model(config),
            lambda model: _mixed_recipe(bits, group_size),
            self.shape.dtype,
            bits,
            group_size,
            self.settings.seed,
        )
        if plugin:
            cuda.apply(model, self.cuda_options)
        return model

    # -- the protocol --------------------------------------------------------------------------------------------

    def prefill(self, prompt: list[int]):
        from mlx_dgemma.generate import prefill

        cache = self.model.make_cache()
        prefill(self.model, cache, self.mx.array([prompt]))
        return cache

    def sampler_settings(self, steps: int, adaptive: bool, seed: int):
        from mlx_dgemma import SamplerSettings

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
        from mlx_dgemma import SeededNoise
        from mlx_dgemma.sampler import BlockSampler

        mx = self.mx
        settings = self.sampler_settings(steps, adaptive, seed)
        cache = self.prefill(prompt)
        sampler = BlockSampler(self.model, settings, SeededNoise(seed))
        marks: list[tuple[int, float]] = []
        start = time.perf_counter()
        tokens, steps_per_canvas = 0, []
        for item in sampler.canvases(cache, 1, drafts=True):
            if not hasattr(item, "tokens"):
                # A step draft: the sampler has read this step's stop flags, a true step boundary.
                marks.append((item.canvas, time.perf_counter()))
                continue
            mx.eval(item.tokens)
            tokens += item.tokens.shape[1]
            steps_per_canvas.append(item.steps[0])
        seconds = time.perf_counter() - start
        return GenerationRun(tokens, seconds, steps_per_canvas, _intervals(start, marks))


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

    from mlx_dgemma.convert.quantize import Recipe

    recipe = Recipe.parse("mixed", bits, group_size)

    def predicate(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized") or "weight" not in module:
            return False
        stacked = module.weight.ndim == 3  # expert stacks keep the source name, without `.weight`
        chosen = recipe.bits_for(path if stacked else f"{path}.weight", module.weight.shape)
        return {"bits": chosen, "group_size": group_size} if chosen else False

    return predicate
