"""mlx-vlm (the peer), driven through its own diffusion generator, `stream_diffusion_generate`.

It takes a tokenizer and a processor only to detokenize and to spot EOS; the
stand-ins below decode nothing and never stop, so that it makes exactly the
tokens the other runtimes make. Its sampler settings come from
`model.config.generation_config`, which is set per run: the entropy-bound
sampler with the reference's temperatures, and the stability/confidence keys
only when adaptive stopping is on (without them it never stops early).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .base import GenerationRun, MlxDriver, Skip


class _Detokenizer:
    last_segment = ""

    def reset(self) -> None:
        self.last_segment = ""

    def add_token(self, token: int, skip_special_token_ids=None) -> None:
        pass

    def finalize(self) -> None:
        pass


class _NeverStop:
    def __call__(self, token: int) -> bool:
        return False

    def add_eos_token_ids(self, ids) -> None:
        pass


class _Tokenizer:
    detokenizer = _Detokenizer()
    stopping_criteria = _NeverStop()

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return ""


class VlmDriver(MlxDriver):
    name = "mlx-vlm"

    def setup(self) -> dict[str, Any]:
        import importlib.metadata

        import mlx.core as mx

        try:
            from mlx_vlm.generate.diffusion import stream_diffusion_generate
        except ImportError as error:
            raise Skip(f"mlx-vlm is not importable ({error})") from None

        self.mx = mx
        self.stream = stream_diffusion_generate
        return {
            "mlx": mx.__version__,
            "mlx_vlm": importlib.metadata.version("mlx-vlm"),
            "device": str(mx.default_device()),
        }

    def load(self) -> None:
        if self.shape.source == "synthetic":
            from mlx_vlm.models.diffusion_gemma import Model, ModelConfig

            from .. import synthetic

            config = ModelConfig.from_dict(self.shape.config_dict())
            self.model = synthetic.build(
                lambda: Model(config),
                lambda model: _vlm_predicate(model),
                self.shape.dtype,
                self.shape.bits,
                self.shape.group_size,
                self.settings.seed,
            )
        else:
            from mlx_vlm.utils import load_model

            self.model = load_model(Path(self.spec.checkpoint))
        self.canvas = int(self.model.config.canvas_length)

    def prefill(self, prompt: list[int]):
        mx = self.mx
        cache = self.model.make_cache()
        cache = self.model.diffusion_prefill_cache(
            mx.array([prompt]),
            attention_mask=None,
            cache=cache,
            pixel_values=None,
            mm_token_type_ids=None,
            prefill_step_size=None,
            chunk_prefill=False,
        )
        mx.eval([c.state for c in cache])
        return cache

    def generate(self, prompt: list[int], steps: int, adaptive: bool, seed: int, per_step: bool) -> GenerationRun:
        mx = self.mx
        generation = {
            "max_denoising_steps": steps,
            "t_min": 0.4,
            "t_max": 0.8,
            "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1},
        }
        if adaptive:
            generation.update(stability_threshold=1, confidence_threshold=0.005)
        self.model.config.generation_config = generation
        mx.random.seed(seed)
        tokenizer = _Tokenizer()
        # Per-step draft events make it evaluate every step; its default path evaluates once per canvas.
        marks: list[tuple[int, int, float]] = []
        last = None
        results = self.stream(
            self.model,
            tokenizer,
            tokenizer,
            mx.array([prompt]),
            None,
            None,
            max_tokens=self.settings.canvases * self.canvas,
            skip_special_token_ids=[],
            temperature=1.0,  # draw from softmax(processed logits), as the reference does
            max_denoising_steps=steps,
            diffusion_full_canvas=True,
            diffusion_sampler="entropy-bound",
            diffusion_show_unmasking=per_step,
        )
        for result in results:
            if result.is_draft:
                marks.append((result.diffusion_canvas_index, result.diffusion_step, time.perf_counter()))
            last = result
        if last is None or not last.generation_tps:
            raise RuntimeError("mlx-vlm's generator returned no result")
        tokens = int(last.generation_tokens)
        seconds = tokens / last.generation_tps
        step_times, steps_per_canvas = _intervals(marks)
        if not steps_per_canvas:
            canvases = max(1, self.settings.canvases)
            steps_per_canvas = [last.diffusion_denoising_steps / canvases] * canvases
        return GenerationRun(
            tokens,
            seconds,
            steps_per_canvas,
            step_times,
            extra={
                "mode": "per-step draft events (evaluates each step)" if per_step else "default (lazy within a canvas)",
                "its_prompt_tps": last.prompt_tps,
                "its_denoising_steps": last.diffusion_denoising_steps,
            },
        )


def _intervals(marks: list[tuple[int, int, float]]) -> tuple[list[list[float]], list[int]]:
    """Step durations from its draft events: step 0 is the fresh canvas, step k follows denoising step k."""
    per_canvas: dict[int, list[tuple[int, float]]] = {}
    for canvas, step, moment in marks:
        per_canvas.setdefault(canvas, []).append((step, moment))
    step_times, steps = [], []
    for canvas in sorted(per_canvas):
        events = sorted(per_canvas[canvas])
        step_times.append([b[1] - a[1] for a, b in zip(events, events[1:])])
        steps.append(sum(1 for step, _ in events if step > 0))
    return step_times, steps


def _vlm_predicate(model):
    """mlx-vlm's own quantization recipe for this model."""
    predicate = model.quant_predicate

    def wrapped(path, module):
        if not hasattr(module, "to_quantized"):
            return False
        return predicate(path, module)

    return wrapped
