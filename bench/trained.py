"""A small DiffusionGemma trained here on a synthetic language: a test checkpoint that settles as trained weights do.

Random weights cannot show what fast mode costs: their first step predicts, at almost every position, the random
token the canvas started with there, and from then on their canvases either wander (chaotic) or keep that noise
(`python -m bench fast --checkpoints confident,flat,ordered` measures both). A model trained on the block-diffusion
objective instead turns noise into text and then holds it, which is what fast mode's *settled* positions rely on.

The language is a Markov chain over `SYMBOLS` tokens, each followed by one of `SUCCESSORS` tokens with the
probabilities `PROBABILITIES`: text whose quality is checkable (the share of adjacent pairs the chain allows) and
whose next token is often, not always, clear. With `ending`, answers stop at random (with that chance after each
token, at the canvas's end at the latest) and end-of-text fills the canvas after them, as after a short reply.
The model starts as the tests' random reference checkpoint at `TRAINED_TEXT` (written by transformers, in the
released layout); every weight is then trained with mlx_dgemma's own objective (lora/objective.py
`block_diffusion_loss`) on prompts of `PROMPT_TOKENS` followed by one canvas of answer. Each language's
checkpoint is built once (about 11 minutes on two cores), with its progress printed, and kept under the bench's
output folder.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .shapes import QUICK_TEXT, Shape

if TYPE_CHECKING:
    from mlx_dgemma.model import Model

SYMBOLS = 64
FIRST_SYMBOL = 10  # below it: the special tokens' ids
SUCCESSORS = 4
PROBABILITIES = (0.9, 0.06, 0.03, 0.01)
PROMPT_TOKENS = 32
FILL = 1  # what follows an answer's end to the canvas's end, as end-of-text tokens do in the real model's
ENDING = 1 / 64  # the chance, after each token, that an answer of the language with ends stops there
TRAINING_STEPS = 1000
BATCH = 16
LEARNING_RATE = 2e-3

# The quick shape's structure (three sliding-window layers, then a full-attention one), big enough to learn the
# language in a thousand steps.
TRAINED_TEXT = dict(
    QUICK_TEXT,
    vocab_size=384,
    hidden_size=128,
    num_hidden_layers=4,
    head_dim=32,
    global_head_dim=64,
    intermediate_size=256,
    moe_intermediate_size=64,
    sliding_window=256,
)
TRAINED_SHAPE = Shape("trained", TRAINED_TEXT, canvas_length=64)


@dataclass(frozen=True)
class MarkovLanguage:
    """Token i is followed by successors[i][k] with probability PROBABILITIES[k]; with `ending`, an answer stops
    after each token with that chance, FILL up to the canvas's end."""

    successors: np.ndarray  # (SYMBOLS, SUCCESSORS) token ids
    ending: float = 0.0

    @classmethod
    def seeded(cls, ending: float = 0.0, seed: int = 0) -> MarkovLanguage:
        rng = np.random.default_rng(seed)
        symbols = np.arange(FIRST_SYMBOL, FIRST_SYMBOL + SYMBOLS)
        return cls(np.stack([rng.choice(symbols, SUCCESSORS, replace=False) for _ in symbols]), ending)

    def sample(self, rng: np.random.Generator, length: int, start: int | None = None) -> np.ndarray:
        """`length` tokens of the chain, from `start` (a symbol) or a random one."""
        tokens = np.empty(length, dtype=np.int64)
        previous = FIRST_SYMBOL + rng.integers(SYMBOLS) if start is None else start
        choices = rng.choice(SUCCESSORS, size=length, p=PROBABILITIES)
        for index in range(length):
            previous = tokens[index] = self.successors[previous - FIRST_SYMBOL, choices[index]]
        return tokens

    def example(self, rng: np.random.Generator, canvas_length: int) -> tuple[int, ...]:
        """A prompt of PROMPT_TOKENS, then an answer of at most a canvas: to its end, or with `ending` to where it
        stops (the training objective fills the rest of the canvas with FILL)."""
        prompt = self.sample(rng, PROMPT_TOKENS)
        length = canvas_length if not self.ending else min(canvas_length, int(rng.geometric(self.ending)))
        return tuple(int(token) for token in (*prompt, *self.sample(rng, length, start=int(prompt[-1]))))

    def valid(self, tokens: np.ndarray) -> float:
        """The share of adjacent pairs of `tokens` (a context token, then an answer) that the language allows, up to
        the answer's end (with `ending`: its first FILL, after which the sampler pads), the pair that ends it
        included."""
        answer = answer_length(tokens[1:])
        if self.ending and answer < len(tokens) - 1:
            tokens = tokens[: answer + 2]
        previous, following = tokens[:-1], tokens[1:]
        known = (previous >= FIRST_SYMBOL) & (previous < FIRST_SYMBOL + SYMBOLS)
        rows = self.successors[np.clip(previous - FIRST_SYMBOL, 0, SYMBOLS - 1)]
        allowed = known & (rows == following[:, None]).any(axis=1)
        if self.ending:
            allowed |= known & (following == FILL)
        return float(allowed.mean())


def answer_length(tokens: np.ndarray) -> int:
    """How many of `tokens` come before the first FILL (all of them without one)."""
    return int(np.argmax(tokens == FILL)) if FILL in tokens else len(tokens)


def checkpoint(out: Path, language: MarkovLanguage, steps: int = TRAINING_STEPS) -> Path:
    """The checkpoint trained on `language` under `out`, trained and written the first time (to a staging folder,
    then renamed)."""
    ends = f"-ends{1 / language.ending:.0f}" if language.ending else ""
    path = out / "checkpoints" / f"{TRAINED_SHAPE.checkpoint_name()}-markov{ends}-{steps}"
    if (path / "config.json").is_file():
        return path
    from .build import helper_from_tests

    checkpoints = helper_from_tests("checkpoints")
    staging = path.with_name(path.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)  # what an interrupted build left
    reference = checkpoints.build_reference_model(seed=0, canvas_length=TRAINED_SHAPE.canvas_length, **TRAINED_TEXT)
    checkpoints.save_reference_checkpoint(reference, staging)
    model, losses = _train(staging, language, steps)
    for file in staging.glob("*.safetensors"):
        file.unlink()  # the loader reads every safetensors file of the folder
    _save_weights(model, staging / "model.safetensors")
    (staging / "training.json").write_text(json.dumps({"steps": steps, "batch": BATCH, "losses": losses}, indent=1))
    staging.rename(path)
    return path


def _train(path: Path, language: MarkovLanguage, steps: int) -> tuple[Model, list[float]]:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    from mlx_dgemma.loader import load_model
    from mlx_dgemma.lora.objective import BlockNoise, Example, block_diffusion_loss, make_batch

    model = load_model(path)
    model.train()
    rng = np.random.default_rng(1)
    canvas = TRAINED_SHAPE.canvas_length
    vocab = TRAINED_TEXT["vocab_size"]
    optimizer = optim.Adam(learning_rate=LEARNING_RATE)
    loss_and_grad = nn.value_and_grad(model, lambda m, batch: block_diffusion_loss(m, batch)[0])
    losses: list[float] = []
    started = time.perf_counter()
    for step in range(1, steps + 1):
        examples = [Example(language.example(rng, canvas), PROMPT_TOKENS) for _ in range(BATCH)]
        noise = BlockNoise.draw(rng, examples, canvas, vocab)
        batch = make_batch(examples, noise, canvas, fill_id=FILL)
        loss, grads = loss_and_grad(model, batch)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state, loss)
        losses.append(round(loss.item(), 4))
        if step % 50 == 0 or step == steps:
            elapsed = time.perf_counter() - started
            recent = sum(losses[-50:]) / len(losses[-50:])
            print(
                f"[bench trained] step {step}/{steps}: loss {recent:.3f}, {elapsed:.0f} s, "
                f"about {elapsed / step * (steps - step):.0f} s left",
                file=sys.stderr,
            )
    model.eval()
    return model, losses


def _save_weights(model: Model, file: Path) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    mx.save_safetensors(str(file), dict(tree_flatten(model.parameters())))


def prompt(language: MarkovLanguage, seed: int) -> np.ndarray:
    """(1, PROMPT_TOKENS) token ids: a stretch of the language, seeded."""
    return language.sample(np.random.default_rng(1000 + seed), PROMPT_TOKENS)[None]
