"""Run the reference's `generate` with our noise in place of torch's RNG.

The reference draws its initial canvases and re-noise with `torch.randint` and
its tokens with `torch.multinomial(softmax(processed))`. We swap the `torch`
name inside its generation module for a proxy that answers those two calls
from a `Noise` (the draw becomes argmax(processed + gumbel), which is what our
sampler computes) and forwards everything else to torch.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from transformers.models.diffusion_gemma import generation_diffusion_gemma


def _to_torch(array) -> torch.Tensor:
    return torch.from_numpy(np.array(array))


class _NoiseTorch:
    def __init__(self, noise, vocab: int):
        self._noise, self._vocab = noise, vocab
        self._canvas, self._step = -1, 0
        self._renoise_due = False
        self._processed = None

    def __getattr__(self, name):
        return getattr(torch, name)

    def randint(self, low, high, size, device=None, **kwargs):
        assert low == 0 and high == self._vocab
        if self._renoise_due:
            self._renoise_due = False
            return _to_torch(self._noise.tokens(self._canvas, self._step, tuple(size), self._vocab)).long()
        self._canvas, self._step = self._canvas + 1, 0
        return _to_torch(self._noise.tokens(self._canvas, 0, tuple(size), self._vocab)).long()

    def softmax(self, logits, *args, **kwargs):
        self._processed = logits
        return torch.softmax(logits, *args, **kwargs)

    def multinomial(self, probs, num_samples):
        self._step += 1
        self._renoise_due = True
        batch, length, vocab = self._processed.shape
        gumbel = _to_torch(self._noise.gumbel(self._canvas, self._step, (batch, length, vocab))).float()
        drawn = torch.argmax(self._processed.float() + gumbel, dim=-1)
        return drawn.reshape(-1, 1)


@contextlib.contextmanager
def reference_noise(noise, vocab: int):
    """Within this block the reference samples with `noise`."""
    original = generation_diffusion_gemma.torch
    generation_diffusion_gemma.torch = _NoiseTorch(noise, vocab)
    try:
        yield
    finally:
        generation_diffusion_gemma.torch = original
