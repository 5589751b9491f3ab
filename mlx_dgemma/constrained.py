"""Constrained canvases: fill holes around fixed text, rewrite a span in place.

Every canvas position sees every other, so the model can fill a gap using the
text on both sides. Fixed tokens are *pinned*: held at every step, never
re-noised or replaced. A long layout is cut into canvases; each is committed
and appended to the cache before the next.

EOS and pad in a constrained canvas: the sampler never stops at EOS, every
canvas is committed whole. A free position that ends up holding EOS or pad
means "no token here" and is dropped, which lets the model fill a hole with
fewer tokens than it was given. Pinned positions always keep their tokens.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .cache import EncoderCache
from .generate import GenerationStats, check_context, default_settings, encode_prompt
from .model import Model
from .sampler import BlockSampler, CanvasResult, Noise, Pins, SamplerSettings, StepDraft
from .tokenizer import encode_text, render_chat

HOLE_MARKER = re.compile(r"\{\{hole:(\d+)\}\}")
_LOOSE_MARKER = re.compile(r"\{\{\s*hole\b[^}]*\}\}")

# Kinds of layout slot.
PINNED, FREE, START = "pinned", "free", "start"


@dataclass(frozen=True)
class Slot:
    kind: str  # PINNED: held; FREE: starts as noise; START: starts from `token`, free to change
    token: int = 0


@dataclass
class FillResult:
    text: str  # the whole text with the holes filled
    fills: list[str]  # what went into each hole, in order
    tokens: list[int]  # token ids of the free positions kept (EOS and pad dropped)
    stats: GenerationStats = field(default_factory=GenerationStats)


@dataclass
class _Filled:
    tokens: list[int]
    slots: list[Slot]
    stats: GenerationStats


def _fill(
    model: Model,
    prompt_ids: list[int],
    slots: list[Slot],
    noise: Noise | None,
    params: dict[str, Any],
) -> _Filled:
    """Denoise `slots` as canvases after `prompt_ids`; returns the committed tokens."""
    settings: SamplerSettings = default_settings(model).updated(**params)
    slots = fill_layout(model, prompt_ids, slots, settings)
    stats = GenerationStats()
    cache = model.make_cache()
    encode_prompt(model, cache, prompt_ids, stats)
    begin = time.perf_counter()
    tokens: list[int] = []
    for result in fill_canvases(model, cache, slots, settings, noise):
        if isinstance(result, CanvasResult):
            tokens += result.tokens[0].tolist()
            stats.canvases += 1
            stats.denoising_steps += result.steps[0]
            stats.positions_forwarded += result.forwarded
    stats.record_generation(sum(slot.kind != PINNED for slot in slots), time.perf_counter() - begin)
    return _Filled(tokens, slots, stats)


def fill_layout(model: Model, prompt_ids: list[int], slots: list[Slot], settings: SamplerSettings) -> list[Slot]:
    """`slots` checked (something to fill, some context, within the model's context) and cut after the canvas
    that holds the last free slot (later canvases would only repeat fixed text)."""
    canvas = model.config.canvas_length
    last_free = max((i for i, slot in enumerate(slots) if slot.kind != PINNED), default=-1)
    if last_free < 0:
        raise ValueError("nothing to fill: every position is fixed")
    if not prompt_ids:
        raise ValueError("an empty prompt: give some context before the hole")
    slots = slots[: (last_free // canvas + 1) * canvas]
    check_context(model, 0, len(prompt_ids) + len(slots), settings.updated(max_new_tokens=1))
    return slots


def fill_canvases(
    model: Model,
    cache: EncoderCache,
    slots: list[Slot],
    settings: SamplerSettings,
    noise: Noise | None,
    drafts: bool = False,
) -> Iterator[CanvasResult | StepDraft]:
    """Denoise a layout (`fill_layout`'s) canvas by canvas into a cache that holds its prompt."""
    yield from BlockSampler(model, settings, noise).pinned_canvases(cache, canvas_pins(model, slots), drafts=drafts)


def canvas_pins(model: Model, slots: Sequence[Slot]) -> list[Pins]:
    """A layout's pins, one per canvas (the last may be shorter)."""
    canvas = model.config.canvas_length
    return [_pins(slots[start : start + canvas]) for start in range(0, len(slots), canvas)]


def _pins(slots: Sequence[Slot]) -> Pins:
    pinned = mx.array([[slot.kind == PINNED for slot in slots]])
    start = mx.array([[slot.kind == START for slot in slots]])
    tokens = mx.array([[slot.token for slot in slots]])
    return Pins(pinned, tokens, start if any(slot.kind == START for slot in slots) else None)


def _kept(model: Model, tokens: Sequence[int]) -> list[int]:
    """Free-position tokens minus the EOS and pad that mean 'nothing here'."""
    settings = default_settings(model)
    dropped = set(settings.eos_token_ids) | ({settings.pad_token_id} if settings.pad_token_id is not None else set())
    return [token for token in tokens if token not in dropped]


def _holes(filled: _Filled, model: Model) -> list[list[int]]:
    return filled_holes(model, filled.slots, filled.tokens)


def filled_holes(model: Model, slots: Sequence[Slot], tokens: Sequence[int]) -> list[list[int]]:
    """The kept tokens of each run of free slots, from a layout's committed tokens."""
    runs: list[list[int]] = []
    previous_free = False
    for slot, token in zip(slots, tokens):
        free = slot.kind != PINNED
        if free and not previous_free:
            runs.append([])
        if free:
            runs[-1].append(token)
        previous_free = free
    return [_kept(model, run) for run in runs]


def _bos(tokenizer: TokenizerWrapper) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def _check_hole(hole_tokens: int) -> None:
    if not isinstance(hole_tokens, int) or hole_tokens <= 0:
        raise ValueError(f"hole_tokens must be a positive integer, got {hole_tokens!r}")


def infill(
    model: Model,
    tokenizer: TokenizerWrapper,
    prefix: str,
    suffix: str,
    hole_tokens: int = 64,
    *,
    noise: Noise | None = None,
    **params: Any,
) -> FillResult:
    """Fill-in-the-middle: up to `hole_tokens` tokens between `prefix` and `suffix`.

    The prefix is the encoded context; the hole and the suffix tokens that
    share its last canvas are laid out in the canvas, the suffix pinned.
    """
    prompt, slots = infill_layout(tokenizer, prefix, suffix, hole_tokens)
    filled = _fill(model, prompt, slots, noise, params)
    hole = _holes(filled, model)[0]
    fill = tokenizer.decode(hole, skip_special_tokens=True)
    return FillResult(prefix + fill + suffix, [fill], hole, filled.stats)


def infill_layout(
    tokenizer: TokenizerWrapper, prefix: str, suffix: str, hole_tokens: int
) -> tuple[list[int], list[Slot]]:
    """Fill-in-the-middle as a prompt (the prefix) and a layout: the hole's free slots, then the suffix pinned."""
    _check_hole(hole_tokens)
    prompt = _bos(tokenizer) + encode_text(tokenizer, prefix)
    return prompt, [Slot(FREE)] * hole_tokens + [Slot(PINNED, t) for t in encode_text(tokenizer, suffix)]


def parse_template(template: str) -> list[str | int]:
    """Split a template into fixed text and hole sizes; one-line errors for bad markers."""
    parts: list[str | int] = []
    position = 0
    for match in HOLE_MARKER.finditer(template):
        parts.append(template[position : match.start()])
        size = int(match.group(1))
        if size <= 0:
            raise ValueError(f"hole sizes must be positive: {match.group(0)}")
        parts.append(size)
        position = match.end()
    parts.append(template[position:])
    stripped = HOLE_MARKER.sub("", template)
    bad = _LOOSE_MARKER.search(stripped)
    if bad:
        raise ValueError(f"malformed hole marker {bad.group(0)!r}: write {{{{hole:N}}}} with N tokens")
    if not any(isinstance(part, int) for part in parts):
        raise ValueError("the template has no {{hole:N}} markers")
    return [part for part in parts if part != ""]


def fill_template(
    model: Model,
    tokenizer: TokenizerWrapper,
    prompt: str,
    template: str,
    *,
    thinking: bool = False,
    noise: Noise | None = None,
    **params: Any,
) -> FillResult:
    """Answer `prompt` in the shape of `template`: its fixed text pinned, each `{{hole:N}}` filled."""
    parts = parse_template(template)
    prompt_ids = encode_text(
        tokenizer, render_chat(tokenizer, [{"role": "user", "content": prompt}], thinking=thinking)
    )
    slots: list[Slot] = []
    for part in parts:
        if isinstance(part, int):
            slots += [Slot(FREE)] * part
        else:
            slots += [Slot(PINNED, t) for t in encode_text(tokenizer, part)]
    filled = _fill(model, prompt_ids, slots, noise, params)
    holes = _holes(filled, model)
    fills = [tokenizer.decode(hole, skip_special_tokens=True) for hole in holes]
    fill_iter = iter(fills)
    text = "".join(next(fill_iter) if isinstance(part, int) else part for part in parts)
    return FillResult(text, fills, [t for hole in holes for t in hole], filled.stats)


def edit(
    model: Model,
    tokenizer: TokenizerWrapper,
    text: str,
    start: int,
    end: int,
    instruction: str | None = None,
    *,
    slack: int | None = None,
    noise: Noise | None = None,
    **params: Any,
) -> FillResult:
    """Rewrite `text[start:end]`, starting from its own tokens instead of noise.

    The span may grow by `slack` tokens (default: a quarter of it, at least 4),
    which start as pad; the text after the span is pinned. With an
    `instruction`, the model is told what to change through the chat template.
    """
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= len(text)):
        raise ValueError(f"bad span {start}:{end} for a text of {len(text)} characters")
    prefix, span, suffix = text[:start], text[start:end], text[end:]
    span_ids = encode_text(tokenizer, span)
    slack = max(4, len(span_ids) // 4) if slack is None else slack
    if slack < 0:
        raise ValueError("slack must be >= 0")
    if instruction:
        request = f"{instruction}\n\nRewrite the part between [[ and ]] in:\n{prefix}[[{span}]]{suffix}"
        prompt = encode_text(tokenizer, render_chat(tokenizer, [{"role": "user", "content": request}]))
        prompt += encode_text(tokenizer, prefix)
    else:
        prompt = _bos(tokenizer) + encode_text(tokenizer, prefix)
    pad = default_settings(model).pad_token_id or 0
    slots = [Slot(START, t) for t in span_ids] + [Slot(START, pad)] * slack
    slots += [Slot(PINNED, t) for t in encode_text(tokenizer, suffix)]
    filled = _fill(model, prompt, slots, noise, params)
    hole = _holes(filled, model)[0]
    replacement = tokenizer.decode(hole, skip_special_tokens=True)
    return FillResult(prefix + replacement + suffix, [replacement], hole, filled.stats)
