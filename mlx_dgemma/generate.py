"""Generation: prompts in, text out, streamed as the canvas sharpens.

`stream_generate` yields `Draft` events (each step's argmax canvas as text),
`Commit` events (text committed with a canvas) and one final `Done`;
`generate` returns the result directly; `Chat` keeps a conversation and its
encoder cache, so each turn encodes only its new tokens.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.generate import wired_limit
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .cache import EncoderCache
from .model import Model
from .sampler import BlockSampler, Noise, SamplerSettings, StepDraft
from .tokenizer import Message, ReplyDecoder, encode_text, render_chat

PREFILL_CHUNK = 512
_REPLY_MARK = "\x00mlx-dgemma-reply\x00"


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    canvases: int = 0
    denoising_steps: int = 0
    steps_per_canvas: float = 0.0
    tokens_per_forward: float = 0.0
    positions_forwarded: int = 0  # canvas positions run through the decoder (fast mode runs fewer)
    peak_memory_gb: float = 0.0

    def record_generation(self, tokens: int, seconds: float) -> None:
        """Fill in the generation figures once `canvases` and `denoising_steps` are counted."""
        self.generation_tokens = tokens
        self.generation_tps = tokens / seconds if seconds > 0 else 0.0
        if self.canvases:
            self.steps_per_canvas = self.denoising_steps / self.canvases
        if self.denoising_steps:
            self.tokens_per_forward = tokens / self.denoising_steps
        self.peak_memory_gb = mx.get_peak_memory() / 1e9


@dataclass
class GenerationResult:
    text: str
    thinking: str
    tokens: list[int]
    finish_reason: str  # "stop" (EOS), "length" (max_new_tokens) or "interrupted"
    stats: GenerationStats = field(default_factory=GenerationStats)


@dataclass
class Draft:
    canvas: int
    step: int
    text: str


@dataclass
class Commit:
    text: str
    thinking: str
    tokens: list[int]


@dataclass
class Done:
    result: GenerationResult


Event = Draft | Commit | Done


def default_settings(model: Model) -> SamplerSettings:
    """The checkpoint's generation defaults (attached at load) or the reference's."""
    settings = getattr(model, "generation_settings", None)
    return settings or SamplerSettings.from_generation_config({}, model.text_config)


def checked_token_ids(ids: Sequence[int], vocab_size: int) -> list[int]:
    """`ids` as a list, refused when one is outside the vocabulary (an embedding lookup does not check)."""
    bad = [token for token in ids if not 0 <= token < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary (0 to {vocab_size - 1})")
    return list(ids)


def prompt_tokens(
    tokenizer: TokenizerWrapper,
    prompt_or_messages: str | Sequence[Message] | Sequence[int],
    thinking: bool,
    vocab_size: int,
) -> list[int]:
    """Token ids for a plain prompt (one user turn), a message list, or ids as they are."""
    if isinstance(prompt_or_messages, str):
        prompt_or_messages = [{"role": "user", "content": prompt_or_messages}]
    items = list(prompt_or_messages)
    if items and all(isinstance(item, int) for item in items):
        return checked_token_ids(items, vocab_size)
    if not all(isinstance(item, dict) for item in items) or not items:
        raise ValueError("prompt must be text, a non-empty list of chat messages, or a list of token ids")
    rendered = render_chat(tokenizer, items, add_generation_prompt=True, thinking=thinking)
    return checked_token_ids(encode_text(tokenizer, rendered), vocab_size)


def check_context(model: Model, cached: int, new_prompt: int, settings: SamplerSettings) -> None:
    """Refuse, before any work, a prompt plus output beyond the model's context."""
    canvas = model.config.canvas_length
    needed = cached + new_prompt + -(-settings.max_new_tokens // canvas) * canvas
    limit = model.text_config.max_position_embeddings
    if needed > limit:
        raise ValueError(
            f"prompt of {cached + new_prompt} tokens plus {settings.max_new_tokens} new tokens "
            f"(whole canvases of {canvas}) needs {needed} positions; the model's context is {limit}"
        )


def prefill(
    model: Model, cache: EncoderCache, ids: mx.array, attention_mask: mx.array | None = None, chunk: int = PREFILL_CHUNK
) -> None:
    """Encode `ids` in chunks so that attention memory stays bounded by the chunk size."""
    for start in range(0, ids.shape[1], chunk):
        end = min(start + chunk, ids.shape[1])
        mask = None if attention_mask is None else attention_mask[:, start:end]
        model.encode(ids[:, start:end], cache, mask)
        mx.eval(cache.state)


class Turn:
    """One reply generated into a cache that already holds its prompt."""

    def __init__(self, model: Model, tokenizer: TokenizerWrapper, settings: SamplerSettings, noise: Noise | None):
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.sampler = BlockSampler(model, settings, noise)
        self.decoder = ReplyDecoder(tokenizer)
        self.tokens: list[int] = []  # the reply, EOS and pads removed, capped at max_new_tokens
        self.last_canvas: list[int] = []  # the reply tokens not yet in the cache
        self.finish_reason = "length"
        self.stats = GenerationStats()

    def run(self, cache: EncoderCache, drafts: bool) -> Iterator[Event]:
        start = time.perf_counter()
        eos = set(self.settings.eos_token_ids)
        for result in self.sampler.canvases(cache, 1, drafts=drafts):
            if isinstance(result, StepDraft):
                text = self.tokenizer.decode(result.argmax[0].tolist(), skip_special_tokens=True)
                yield Draft(result.canvas, result.step, text)
                continue
            self.stats.canvases += 1
            self.stats.denoising_steps += result.steps[0]
            self.stats.positions_forwarded += result.forwarded
            row = result.tokens[0].tolist()
            room = self.settings.max_new_tokens - len(self.tokens)
            new = []
            for token in row[:room]:
                if token in eos:
                    self.finish_reason = "stop"
                    break
                new.append(token)
            self.tokens += new
            self.last_canvas = new
            answer, thinking = self.decoder.add(new)
            if result.finished[0]:
                tail_answer, tail_thinking = self.decoder.finish()
                answer, thinking = answer + tail_answer, thinking + tail_thinking
            yield Commit(answer, thinking, new)
        self.stats.record_generation(len(self.tokens), time.perf_counter() - start)

    def result(self) -> GenerationResult:
        return GenerationResult(self.decoder.answer, self.decoder.thinking, self.tokens, self.finish_reason, self.stats)


def encode_prompt(model: Model, cache: EncoderCache, ids: list[int], stats: GenerationStats) -> None:
    """Prefill `ids` (one row) into `cache`, recording the prompt figures."""
    start = time.perf_counter()
    prefill(model, cache, mx.array([ids]))
    elapsed = time.perf_counter() - start
    stats.prompt_tokens = len(ids)
    stats.prompt_tps = len(ids) / elapsed if elapsed > 0 else 0.0


def stream_generate(
    model: Model,
    tokenizer: TokenizerWrapper,
    prompt_or_messages: str | Sequence[Message] | Sequence[int],
    *,
    thinking: bool = False,
    noise: Noise | None = None,
    drafts: bool = True,
    **params: Any,
) -> Iterator[Event]:
    """Generate a reply, yielding Draft and Commit events, then Done with the result.

    `params` override the checkpoint's sampler defaults: steps, entropy_bound,
    t_min, t_max, stability_threshold, confidence_threshold, seed, max_new_tokens,
    and speed ("exact", the default, or "fast": see README "Fast mode") with
    `fast` (a FastSettings).
    """
    settings = default_settings(model).updated(**params)
    ids = prompt_tokens(tokenizer, prompt_or_messages, thinking, model.text_config.vocab_size)
    check_context(model, 0, len(ids), settings)
    turn = Turn(model, tokenizer, settings, noise)
    with wired_limit(model):
        cache = model.make_cache()
        encode_prompt(model, cache, ids, turn.stats)
        yield from turn.run(cache, drafts)
    yield Done(turn.result())


def generate(
    model: Model,
    tokenizer: TokenizerWrapper,
    prompt_or_messages: str | Sequence[Message] | Sequence[int],
    **params: Any,
) -> GenerationResult:
    """Generate a reply; see `stream_generate` for the parameters."""
    for event in stream_generate(model, tokenizer, prompt_or_messages, drafts=False, **params):
        if isinstance(event, Done):
            return event.result
    raise RuntimeError("generation ended without a result")


class Chat:
    """A conversation whose encoder cache carries over from turn to turn.

    A new turn encodes only what the cache lacks: the previous reply's last
    canvas and the template's text that closes that reply and opens the new
    turn. `last_encoded_tokens` tells how many that was.
    """

    def __init__(
        self,
        model: Model,
        tokenizer: TokenizerWrapper,
        system: str | None = None,
        thinking: bool = False,
        **params: Any,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.thinking = thinking
        self.settings = default_settings(model).updated(**params)
        self.system = system
        self.last_encoded_tokens = 0
        self.reset()

    def reset(self, system: str | None = None) -> None:
        """Forget the conversation (and set a new system prompt when given)."""
        if system is not None:
            self.system = system or None
        self.messages: list[Message] = [{"role": "system", "content": self.system}] if self.system else []
        self._cache: EncoderCache | None = None
        self._pending: list[int] = []

    def set(self, **params: Any) -> None:
        """Change sampler parameters for the following turns."""
        self.settings = self.settings.updated(**params)

    def send(self, text: str, **params: Any) -> GenerationResult:
        for event in self.stream(text, drafts=False, **params):
            if isinstance(event, Done):
                return event.result
        raise RuntimeError("generation ended without a result")

    def stream(self, text: str, drafts: bool = True, noise: Noise | None = None, **params: Any) -> Iterator[Event]:
        """Add a user turn and stream the reply. Interrupting keeps what was committed."""
        settings = self.settings.updated(**params)
        user = {"role": "user", "content": text}
        new_ids = self._uncached_ids(user)
        cached = 0 if self._cache is None else self._cache.offset
        check_context(self.model, cached, len(new_ids), settings)
        self.messages.append(user)
        turn = Turn(self.model, self.tokenizer, settings, noise)
        try:
            with wired_limit(self.model):
                if self._cache is None:
                    self._cache = self.model.make_cache()
                encode_prompt(self.model, self._cache, new_ids, turn.stats)
                self.last_encoded_tokens = len(new_ids)
                yield from turn.run(self._cache, drafts)
        except BaseException:
            # Stopped part-way (Ctrl-C, closed stream, error): the cache may hold
            # half a step's writes, so the next turn re-encodes the conversation,
            # which keeps the committed part of this reply.
            turn.finish_reason = "interrupted"
            self._cache = None
            raise
        finally:
            self._pending = turn.last_canvas
            self.messages.append({"role": "assistant", "content": turn.decoder.answer})
        yield Done(turn.result())

    def _uncached_ids(self, user: Message) -> list[int]:
        """The tokens the cache lacks for a conversation continued by `user`."""
        if self._cache is None:
            messages = [*self.messages, user]
            return encode_text(self.tokenizer, render_chat(self.tokenizer, messages, thinking=self.thinking))
        # Render the history with a marker for the last reply: what follows the
        # marker closes that reply and opens the new turn.
        history = [*self.messages[:-1], {"role": "assistant", "content": _REPLY_MARK}, user]
        rendered = render_chat(self.tokenizer, history, thinking=self.thinking)
        suffix = rendered.split(_REPLY_MARK, 1)[1]
        return self._pending + encode_text(self.tokenizer, suffix)
