"""How many MLX primitives one decoder layer and one denoising step evaluate: ours beside mlx-vlm's.

    python -m bench ops                      # bench shape, 4 bits (the default recipe), both runtimes
    python -m bench ops --shape released     # Google's shape: weights are random and packed, ~14 GB
    python -m bench ops --help

A step is counted as built, before anything runs: the lazy graph of its
outputs is written with `mx.export_to_dot` and every primitive node in it
counted (a compiled elementwise function counts once: it is one fused kernel
on a GPU). This is the graph a Mac runs: the CUDA plug-in is not applied.
MLX's CPU composes its `mx.fast` ops (RMS norm, RoPE, attention) from
several primitives where Metal runs one kernel; each such call is counted
as one (attention only at the head sizes Metal's fused kernel takes).
The weights are random (bench/synthetic.py), quantized with each runtime's
own recipe; the prompt is short, since its length changes no count.

mlx-vlm's step is what its `stream_diffusion_generate` builds per step with
the entropy-bound sampler: its decoder logits, temperature, draw, entropy,
acceptance and renoising, and the next step's self-conditioning input.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx

from . import synthetic
from .shapes import PRESETS, Shape

_PRIMITIVE = re.compile(r'\[label ="([^"]+)", shape=rectangle\]')
# Head sizes Metal's fused attention takes for a canvas's queries; other sizes take MLX's composed attention there.
METAL_ATTENTION_HEAD_DIMS = (64, 80, 128)


def _dot_counts(outputs: tuple) -> collections.Counter:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "graph.dot"
        mx.export_to_dot(str(path), *outputs)
        return collections.Counter(_PRIMITIVE.findall(path.read_text()))


class FastOps:
    """Counts as a Mac's GPU runs them: `mx.fast` ops that have a Metal kernel are one primitive each there, where
    the CPU composes them from a few (RMS norm) to a few dozen (RoPE). While active, every call of such an op is
    recorded; `correction` is what to take off the CPU's count: each call's composed primitives, less one."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []
        names = ("rms_norm", "rope", "scaled_dot_product_attention")
        self._originals = {name: getattr(mx.fast, name) for name in names}

    def __enter__(self) -> FastOps:
        for name, original in self._originals.items():
            setattr(mx.fast, name, self._recorder(name, original))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._originals.items():
            setattr(mx.fast, name, original)

    def _recorder(self, name: str, original: Any) -> Any:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            if name != "scaled_dot_product_attention" or args[0].shape[-1] in METAL_ATTENTION_HEAD_DIMS:
                self.calls.append((name, args, kwargs))
            return original(*args, **kwargs)

        return recorded

    def correction(self) -> collections.Counter:
        """Per op name, the CPU's primitives to take off (negative) and the one Metal primitive to add."""
        total: collections.Counter = collections.Counter()
        for name, args, kwargs in self.calls:
            placeholders = [mx.zeros(a.shape, a.dtype) if isinstance(a, mx.array) else a for a in args]
            keywords = {k: mx.zeros(v.shape, v.dtype) if isinstance(v, mx.array) else v for k, v in kwargs.items()}
            mx.eval([a for a in (*placeholders, *keywords.values()) if isinstance(a, mx.array)])
            composed = _dot_counts((self._originals[name](*placeholders, **keywords),))
            total.subtract(composed)
            total[f"fast.{name}"] += 1
        return total


def count_primitives(*outputs: Any, fast_ops: FastOps | None = None) -> collections.Counter:
    """The primitives, by name, that evaluating `outputs` runs (arrays already evaluated count none); with
    `fast_ops` (active while the outputs were built), its ops counted as Metal runs them."""
    counts = _dot_counts(outputs)
    if fast_ops is not None:
        counts.update(fast_ops.correction())
    return +counts  # drops names whose count fell to zero


def _prompt(shape: Shape, length: int) -> mx.array:
    return mx.random.randint(3, shape.text["vocab_size"], (1, length), key=mx.random.key(0))


def our_counts(shape: Shape, dtype: str, bits: int | None, prompt_length: int) -> dict[str, collections.Counter]:
    """Our sliding layer, full layer and whole denoising step (self-conditioning on)."""
    from mlx_dgemma.config import ModelConfig
    from mlx_dgemma.generate import prefill
    from mlx_dgemma.model import Model
    from mlx_dgemma.sampler import BlockSampler, SamplerSettings, SeededNoise, denoising_step

    from .runtimes.ours import _mixed_recipe

    config = ModelConfig.from_dict(shape.config_dict())
    model = synthetic.build(lambda: Model(config), lambda _: _mixed_recipe(bits, shape.group_size), dtype, bits, 64, 0)
    cache = model.make_cache()
    prefill(model, cache, _prompt(shape, prompt_length))
    settings, noise = SamplerSettings(steps=16, seed=0), SeededNoise(0)
    state = BlockSampler(model, settings, noise).initial_state(1, shape.canvas_length, 0, None)
    state.self_conditioning_logits = _random((1, shape.canvas_length, config.text.vocab_size), model.embedding_dtype)
    counts = {}
    hidden = _random((1, shape.canvas_length, config.text.hidden_size), model.embedding_dtype)
    for kind, index in _layer_indices(config.text.layers).items():
        layer = model.layers[index]
        with FastOps() as fast_ops:
            out = layer(hidden, cache.layers[index], cache.offset, None, False, layer.layer_scalar)
        counts[f"{kind} layer"] = count_primitives(out, fast_ops=fast_ops)
        # A decoder pass writes its states into the cache's spare room (in place, lazily): settle that before
        # the next count, or it would count this layer's projections too.
        mx.eval(cache.state)
    with FastOps() as fast_ops:
        step = denoising_step(model, cache, state, settings, noise, 0, 2)
        outputs = (step.canvas, step.argmax, step.self_conditioning_logits, step.finished, step.history)
    counts["step"] = count_primitives(*outputs, fast_ops=fast_ops)
    return counts


def vlm_counts(shape: Shape, dtype: str, bits: int | None, prompt_length: int) -> dict[str, collections.Counter]:
    """mlx-vlm's whole denoising step, as its generator builds it (self-conditioning on)."""
    from mlx_vlm.generate import diffusion
    from mlx_vlm.models.diffusion_gemma import Model, ModelConfig

    from .runtimes.vlm import _vlm_predicate

    config = ModelConfig.from_dict(shape.config_dict())
    model = synthetic.build(lambda: Model(config), _vlm_predicate, dtype, bits, shape.group_size, 0)
    cache = model.diffusion_prefill_cache(
        _prompt(shape, prompt_length),
        attention_mask=None,
        cache=model.make_cache(),
        pixel_values=None,
        mm_token_type_ids=None,
        prefill_step_size=None,
        chunk_prefill=False,
    )
    mx.eval([c.state for c in cache])
    canvas_length, vocab = shape.canvas_length, shape.text["vocab_size"]
    canvas = mx.random.randint(0, vocab, (1, canvas_length), key=mx.random.key(1))
    context = model.diffusion_prepare_self_conditioning()
    conditioning = model.diffusion_self_conditioning(_random((1, canvas_length, vocab), mx.float32), context)
    mx.eval(canvas, context, conditioning)
    with FastOps() as fast_ops:
        # Its second step, as `stream_diffusion_generate` makes it with the entropy-bound sampler.
        masks = model.diffusion_decoder_masks(canvas, cache, None)
        processed = model.diffusion_decoder_logits(
            canvas, cache=cache, self_conditioning=conditioning, decoder_attention_mask=masks
        )
        processed = processed / diffusion._diffusion_linear_temperature(15, 16, {"t_min": 0.4, "t_max": 0.8})
        argmax = mx.argmax(processed, axis=-1).astype(canvas.dtype)
        drawn = diffusion._diffusion_sample_canvas(processed, canvas.dtype, 1.0)
        entropy = diffusion._diffusion_token_entropy(processed)
        next_conditioning = model.diffusion_self_conditioning(processed, context)
        accepted = diffusion._diffusion_entropy_transfer_mask(entropy, 0.1)
        fresh = diffusion._diffusion_initialize_canvas(1, canvas_length, vocab, canvas.dtype)
        next_canvas = mx.where(accepted, mx.where(accepted, drawn, canvas), fresh)
    return {"step": count_primitives(next_canvas, argmax, next_conditioning, entropy, fast_ops=fast_ops)}


def _random(shape: tuple[int, ...], dtype: mx.Dtype) -> mx.array:
    array = mx.random.normal(shape, key=mx.random.key(2)).astype(dtype)
    mx.eval(array)
    return array


def _layer_indices(layers: tuple) -> dict[str, int]:
    indices: dict[str, int] = {}
    for index, layer in enumerate(layers):
        indices.setdefault("sliding" if layer.is_sliding else "full", index)
    return indices


RUNTIMES = {"us": our_counts, "mlx-vlm": vlm_counts}


def table(results: dict[str, dict[str, collections.Counter]], top: int) -> str:
    """Markdown: total primitives per part and runtime, then each runtime's most frequent primitives a step."""
    parts = sorted({part for counts in results.values() for part in counts}, key=lambda p: (p != "step", p))
    lines = ["| part | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for part in parts:
        cells = [str(sum(counts[part].values())) if part in counts else "—" for counts in results.values()]
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
    for runtime, counts in results.items():
        common = ", ".join(f"{name} {n}" for name, n in counts["step"].most_common(top))
        lines.append(f"\n{runtime}, a step's most frequent primitives: {common}")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench ops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(PRESETS), default="bench")
    parser.add_argument("--bits", type=int, default=4, help="experts' bits in the default recipe (0: float weights)")
    parser.add_argument("--dtype", choices=sorted(synthetic.DTYPES), default="bfloat16")
    parser.add_argument("--runtimes", default="us,mlx-vlm", help="comma-separated: us, mlx-vlm")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--top", type=int, default=8, help="how many of a step's most frequent primitives to list")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    shape = PRESETS[args.shape]
    names = [name.strip() for name in args.runtimes.split(",") if name.strip()]
    unknown = [name for name in names if name not in RUNTIMES]
    if unknown or not names:
        print(f"--runtimes: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(RUNTIMES)}")
        return 2
    bits = args.bits or None
    results = {name: RUNTIMES[name](shape, args.dtype, bits, args.prompt_tokens) for name in names}
    recipe = f"{bits}-bit experts, the rest at 8 bits" if bits else "float weights"
    print(f"## MLX primitives: {shape.name} shape, {args.dtype}, {recipe}, canvas {shape.canvas_length}\n")
    print(table(results, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
