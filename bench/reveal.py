"""Another sampler, for comparison with fast mode: reveal positions at a confidence threshold, never revisit them.

mlx-vlm's default DiffusionGemma sampler and the published fast runners for diffusion LLMs (Fast-dLLM and its kin)
work this way: at each step, every position not yet revealed whose drawn token has a probability of at least
`threshold` is revealed (the most confident one at least, all of them at the last step) and keeps that token for
good; the others are renoised as the entropy-bound sampler renoises them (DiffusionGemma has no mask token). A
revealed position's token never changes again, so once a pass has read it (the step after the one that revealed it)
no pass needs to forward it: its keys and values stay as that pass left them. This runner forwards only the
positions not yet revealed and those revealed by the step before (their count rounded up to fast mode's buckets) and
stops once all are revealed. It is not DiffusionGemma's sampler, so its text is not exact mode's: `python -m bench
fast --reveal 0.9` measures how far apart they are, and how much less it forwards.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np


def reveal_canvas(model: Any, cache: Any, settings: Any, seed: int, threshold: float, bucket: int) -> dict[str, Any]:
    """One canvas of batch 1 and `settings.max_new_tokens` positions from a copy of `cache`, with `SeededNoise(seed)`
    (exact mode's noise), the positions a step forwards rounded up to a multiple of `bucket`: its steps, positions
    forwarded, seconds, committed tokens and the logits each position last had."""
    import mlx.core as mx

    from mlx_dgemma.fast import _gumbel_rows, bucketed, live_positions
    from mlx_dgemma.sampler import SeededNoise, linear_temperature

    cache = cache.copy()
    mx.eval(cache.state)
    noise = SeededNoise(seed)
    length, vocab = settings.max_new_tokens, model.text_config.vocab_size
    canvas = noise.tokens(0, 0, (1, length), vocab)
    revealed = mx.zeros((1, length), dtype=mx.bool_)
    logits = conditioning = settled = None
    forwarded = step_index = 0
    live = length
    start = time.perf_counter()
    for step_index in range(1, settings.steps + 1):
        temperature = linear_temperature(settings.steps + 1 - step_index, settings)
        if step_index == 1:
            positions = mx.arange(length)[None]
            fresh = model.denoise(canvas, cache, conditioning)
            gumbel = noise.gumbel(0, step_index, fresh.shape)
        else:
            # Unrevealed positions and those revealed by the last step (they read a new token: forwarded once
            # more), then the others to fill the bucket.
            size = bucketed(live, bucket, length)
            positions = live_positions(settled, mx.zeros(settled.shape, dtype=mx.int32), None, size)
            fresh = model.denoise(
                mx.take_along_axis(canvas, positions, 1),
                cache,
                mx.take_along_axis(conditioning, positions[..., None], 1),
                positions=positions,
            )
            gumbel = _gumbel_rows(noise, 0, step_index, (1, length, vocab), positions)
        forwarded += positions.shape[1]
        processed = fresh / temperature
        draws = mx.argmax(processed + gumbel, axis=-1)
        confidence = mx.take_along_axis(mx.softmax(processed, axis=-1), draws[..., None], -1)[..., 0]
        was_revealed = mx.take_along_axis(revealed, positions, 1)
        candidate = mx.where(was_revealed, -1.0, confidence)
        last_step = mx.array(step_index == settings.steps)
        reveal = ~was_revealed & ((candidate >= threshold) | (candidate == candidate.max()) | last_step)
        kept = mx.take_along_axis(canvas, positions, 1)
        fresh_tokens = mx.take_along_axis(noise.tokens(0, step_index, (1, length), vocab), positions, 1)
        chosen = mx.where(was_revealed, kept, mx.where(reveal, draws.astype(kept.dtype), fresh_tokens))
        canvas = mx.put_along_axis(canvas, positions, chosen, axis=1)
        revealed = mx.put_along_axis(revealed, positions, was_revealed | reveal, axis=1)
        settled = revealed & ~mx.put_along_axis(mx.zeros_like(revealed), positions, reveal, axis=1)
        logits = fresh if logits is None else mx.put_along_axis(logits, positions[..., None], fresh, axis=1)
        conditioning = (logits / temperature).astype(model.embedding_dtype)
        live = int((~settled).sum().item())
        if bool(revealed.all().item()):
            break
    seconds = time.perf_counter() - start
    return {
        "steps": step_index,
        "forwarded": forwarded,
        "seconds": seconds,
        "tokens": np.array(canvas[0]),
        "logits": np.array(logits[0], dtype=np.float32),
    }
