"""Generation: prompts in, text out, streamed as the canvas sharpens.

`stream_generate` yields `Draft` events (each step's argmax canvas as text),
`Commit` events (text committed with a canvas) and one final `Done`;
`generate` returns the result directly; `Chat` keeps a conversation and its
encoder cache, so each turn encodes only its new tokens.

Images go in as `images=` (paths, bytes, PIL images) or as image parts of a
chat message's content ({"type": "image", "image": source}); each becomes the
reference processor's run of image tokens where the chat template puts it,
and the vision tower's soft tokens take those positions when the prompt is
encoded (see `images.py`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.generate import wired_limit
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .cache import EncoderCache
from .images import (
    ImageSource,
    ImageTokens,
    PreparedImage,
    VisionSettings,
    chunk_ends,
    expand_placeholders,
    image_spans,
    image_tokens,
    prepare_images,
)
from .model import Model
from .sampler import BlockSampler, CanvasResult, Noise, SamplerSettings, StepDraft
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
    rendered = render_chat(tokenizer, template_messages(items), add_generation_prompt=True, thinking=thinking)
    return checked_token_ids(encode_text(tokenizer, rendered), vocab_size)


IMAGE_PART_KEYS = ("image", "url", "path")


def is_image_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "image"


def image_source(part: dict[str, Any]) -> Any:
    """The image an image part names: its "image", "url" or "path" (the keys transformers' templates know)."""
    for key in IMAGE_PART_KEYS:
        if part.get(key) is not None:
            return part[key]
    raise ValueError('an image part needs the image as "image" (a path, bytes, PIL image or data: URL)')


def message_images(messages: Sequence[Message]) -> list[Any]:
    """The image sources of the messages' image parts, in prompt order."""
    return [
        image_source(part)
        for message in messages
        if isinstance(message.get("content"), list)
        for part in message["content"]
        if is_image_part(part)
    ]


def template_messages(messages: Sequence[Message]) -> list[Message]:
    """The messages as the chat template sees them: image parts reduced to their type (the template writes a
    placeholder for each; the image itself is no business of the template's)."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list) and any(is_image_part(part) for part in content):
            content = [{"type": "image"} if is_image_part(part) else part for part in content]
            message = {**message, "content": content}
        out.append(message)
    return out


def with_images(content: Any, images: Sequence[ImageSource]) -> Any:
    """A user message's content with `images` before it (as image parts), the way chat UIs attach them."""
    if not images:
        return content
    parts = [{"type": "image", "image": image} for image in images]
    if content is None or content == "":
        return parts
    if isinstance(content, str):
        return [*parts, {"type": "text", "text": content}]
    return [*parts, *content]


def vision_settings(model: Model, tokenizer: TokenizerWrapper | None = None) -> VisionSettings:
    """How this model's images are preprocessed: `model.vision_settings` when the loader set it from the
    checkpoint's processor config; else the processor config beside the tokenizer's files (a checkpoint
    directory holds both); else config.json's vision_config and Gemma 4's defaults."""
    settings = getattr(model, "vision_settings", None)
    if settings is not None:
        return settings
    directory = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    if str(directory) not in ("", ".") and directory.is_dir():
        settings = VisionSettings.from_checkpoint(directory, model.config.raw)
    else:
        settings = VisionSettings.from_dicts(None, model.config.raw)
    try:
        model.vision_settings = settings
    except AttributeError:
        pass
    return settings


def check_vision(model: Model) -> None:
    """Refuse images for a checkpoint without a vision tower."""
    if not model.config.has_vision or not hasattr(model, "image_features"):
        raise ValueError("this checkpoint has no vision tower: it takes text only, not images")


def model_image_tokens(model: Model, tokenizer: TokenizerWrapper) -> ImageTokens:
    """The model's image token ids: the image token as the model reads it, the markers from config.json or the
    tokenizer."""
    return image_tokens({**model.config.raw, "image_token_id": model.config.image_token_id}, tokenizer)


def prompt_with_images(
    model: Model,
    tokenizer: TokenizerWrapper,
    prompt_or_messages: str | Sequence[Message] | Sequence[int],
    thinking: bool,
    images: Sequence[ImageSource] | None = None,
) -> tuple[list[int], list[PreparedImage]]:
    """A prompt's token ids, each image's placeholder expanded into its image tokens, and its images in order.

    `images` join a text prompt's user turn, or a message list's last user message, before its text. Token-id
    prompts take them at their image placeholder ids (`<|image|>`), one each, or hold their runs already
    (begin, as many image tokens as the image's soft tokens, end).
    """
    vocab = model.text_config.vocab_size
    images = list(images or [])
    if isinstance(prompt_or_messages, str):
        prompt_or_messages = [{"role": "user", "content": with_images(prompt_or_messages, images)}]
        images = []
    items = list(prompt_or_messages)
    if items and all(isinstance(item, int) for item in items):
        ids = checked_token_ids(items, vocab)
        sources = images
    else:
        if images:
            users = [i for i, item in enumerate(items) if isinstance(item, dict) and item.get("role") == "user"]
            if not users:
                raise ValueError("images need a user message to go with")
            last = users[-1]
            items[last] = {**items[last], "content": with_images(items[last].get("content"), images)}
        sources = message_images([item for item in items if isinstance(item, dict)])
        ids = prompt_tokens(tokenizer, items, thinking, vocab)
    if not sources:
        return ids, []
    check_vision(model)
    prepared = prepare_images(sources, vision_settings(model, tokenizer))
    tokens = model_image_tokens(model, tokenizer)
    if sources is images and _expanded_already(ids, prepared, tokens):
        return ids, prepared
    return checked_token_ids(expand_placeholders(ids, prepared, tokens), vocab), prepared


def _expanded_already(ids: list[int], images: Sequence[PreparedImage], tokens: ImageTokens) -> bool:
    """Whether token ids hold each image's whole run already (begin, its soft tokens' count of image tokens,
    end), as a prompt that was expanded before does."""
    spans = image_spans(ids, tokens.image)
    return len(spans) == len(images) and all(
        start > 0
        and end < len(ids)
        and ids[start - 1] == tokens.begin
        and ids[end] == tokens.end
        and end - start == image.num_soft_tokens
        for (start, end), image in zip(spans, images)
    )


def check_context(
    model: Model, cached: int, new_prompt: int, settings: SamplerSettings, images: Sequence[PreparedImage] = ()
) -> None:
    """Refuse, before any work, a prompt plus output beyond the model's context."""
    canvas = model.config.canvas_length
    needed = cached + new_prompt + -(-settings.max_new_tokens // canvas) * canvas
    limit = model.text_config.max_position_embeddings
    if needed > limit:
        held = ""
        if images:
            count = sum(image.num_soft_tokens + 2 for image in images)
            held = f" ({len(images)} image{'s' if len(images) != 1 else ''} take {count} of them)"
        raise ValueError(
            f"prompt of {cached + new_prompt} tokens{held} plus {settings.max_new_tokens} new tokens "
            f"(whole canvases of {canvas}) needs {needed} positions; the model's context is {limit}"
        )


def prefill(
    model: Model,
    cache: EncoderCache,
    ids: mx.array,
    attention_mask: mx.array | None = None,
    chunk: int = PREFILL_CHUNK,
    images: Sequence[PreparedImage] = (),
) -> None:
    """Encode `ids` in chunks so that attention memory stays bounded by the chunk size.

    With `images` (one row only), each run of image tokens in `ids` takes the next image's soft tokens, and
    a run is never split between chunks.
    """
    if not images:
        for start in range(0, ids.shape[1], chunk):
            end = min(start + chunk, ids.shape[1])
            mask = None if attention_mask is None else attention_mask[:, start:end]
            model.encode(ids[:, start:end], cache, mask)
            mx.eval(cache.state)
        return
    if ids.shape[0] != 1:
        raise ValueError("prompts with images are encoded one at a time")
    row = ids[0].tolist()
    spans = image_spans(row, model.config.image_token_id)
    if len(spans) != len(images):
        raise ValueError(f"the prompt has {len(spans)} runs of image tokens for {len(images)} images")
    begin = 0
    for end in chunk_ends(len(row), spans, chunk):
        mask = None if attention_mask is None else attention_mask[:, begin:end]
        encode_chunk(model, cache, row, begin, end, spans, images, mask)
        begin = end


def encode_chunk(
    model: Model,
    cache: EncoderCache,
    ids: Sequence[int],
    begin: int,
    end: int,
    spans: Sequence[tuple[int, int]],
    images: Sequence[PreparedImage],
    mask: mx.array | None = None,
) -> None:
    """Encode `ids[begin:end]` (one row) with the soft tokens of the images whose runs (`spans`) it holds."""
    inside = [image for (start, stop), image in zip(spans, images) if begin <= start and stop <= end]
    features = [model.image_features(image.pixel_values, image.position_ids) for image in inside]
    chunk_ids = mx.array([list(ids[begin:end])])
    if features:
        model.encode(chunk_ids, cache, mask, image_features=features)
    else:
        model.encode(chunk_ids, cache, mask)
    mx.eval(cache.state)


class Turn:
    """One reply generated into a cache that already holds its prompt."""

    def __init__(
        self,
        model: Model,
        tokenizer: TokenizerWrapper,
        settings: SamplerSettings,
        noise: Noise | None,
        sampler: BlockSampler | None = None,
    ):
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.sampler = sampler if sampler is not None else BlockSampler(model, settings, noise)
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
            if not isinstance(result, CanvasResult):  # a scheduler's request from its sampler (serve.engine)
                yield result
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


def encode_prompt(
    model: Model, cache: EncoderCache, ids: list[int], stats: GenerationStats, images: Sequence[PreparedImage] = ()
) -> None:
    """Prefill `ids` (one row, with its `images`) into `cache`, recording the prompt figures."""
    start = time.perf_counter()
    prefill(model, cache, mx.array([ids]), images=images)
    elapsed = time.perf_counter() - start
    stats.prompt_tokens = len(ids)
    stats.prompt_tps = len(ids) / elapsed if elapsed > 0 else 0.0


def stream_generate(
    model: Model,
    tokenizer: TokenizerWrapper,
    prompt_or_messages: str | Sequence[Message] | Sequence[int],
    *,
    images: Sequence[ImageSource] | None = None,
    thinking: bool = False,
    noise: Noise | None = None,
    drafts: bool = True,
    **params: Any,
) -> Iterator[Event]:
    """Generate a reply, yielding Draft and Commit events, then Done with the result.

    `images` (paths, bytes, PIL images, data: URLs) join the user turn before its text; chat messages may
    carry image parts ({"type": "image", "image": ...}) instead, several per message.

    `params` override the checkpoint's sampler defaults: steps, entropy_bound,
    t_min, t_max, stability_threshold, confidence_threshold, seed, max_new_tokens,
    and speed ("exact", the default, or "fast": see README "Fast mode") with
    `fast` (a FastSettings).
    """
    settings = default_settings(model).updated(**params)
    ids, prepared = prompt_with_images(model, tokenizer, prompt_or_messages, thinking, images)
    check_context(model, 0, len(ids), settings, prepared)
    turn = Turn(model, tokenizer, settings, noise)
    with wired_limit(model):
        cache = model.make_cache()
        encode_prompt(model, cache, ids, turn.stats, prepared)
        yield from turn.run(cache, drafts)
    yield Done(turn.result())


def generate(
    model: Model,
    tokenizer: TokenizerWrapper,
    prompt_or_messages: str | Sequence[Message] | Sequence[int],
    *,
    images: Sequence[ImageSource] | None = None,
    **params: Any,
) -> GenerationResult:
    """Generate a reply; see `stream_generate` for the parameters."""
    for event in stream_generate(model, tokenizer, prompt_or_messages, images=images, drafts=False, **params):
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

    def send(
        self, text: str | list[dict[str, Any]], images: Sequence[ImageSource] | None = None, **params: Any
    ) -> GenerationResult:
        """Add a user turn (text, or content parts with images; `images` go before the text) and reply."""
        for event in self.stream(text, images=images, drafts=False, **params):
            if isinstance(event, Done):
                return event.result
        raise RuntimeError("generation ended without a result")

    def stream(
        self,
        text: str | list[dict[str, Any]],
        drafts: bool = True,
        noise: Noise | None = None,
        images: Sequence[ImageSource] | None = None,
        **params: Any,
    ) -> Iterator[Event]:
        """Add a user turn and stream the reply. Interrupting keeps what was committed.

        `text` may be content parts, image parts among them ({"type": "image", "image": source}); `images`
        join the turn before its text. Images are loaded and preprocessed here, once: they stay in the
        conversation (and their soft tokens in the cache) for the turns that follow.
        """
        settings = self.settings.updated(**params)
        content = with_images(text, list(images or []))
        user = {"role": "user", "content": self._prepared_content(content)}
        new_ids, new_images = self._uncached(user)
        cached = 0 if self._cache is None else self._cache.offset
        check_context(self.model, cached, len(new_ids), settings, new_images)
        self.messages.append(user)
        turn = Turn(self.model, self.tokenizer, settings, noise)
        try:
            with wired_limit(self.model):
                if self._cache is None:
                    self._cache = self.model.make_cache()
                encode_prompt(self.model, self._cache, new_ids, turn.stats, new_images)
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

    def _prepared_content(self, content: Any) -> Any:
        """`content` with each image part's image loaded and preprocessed (a one-line ValueError if refused)."""
        if not isinstance(content, list):
            return content
        sources = message_images([{"content": content}])
        if not sources:
            return content
        check_vision(self.model)
        prepared = iter(prepare_images(sources, vision_settings(self.model, self.tokenizer)))
        return [{"type": "image", "image": next(prepared)} if is_image_part(part) else part for part in content]

    def _uncached_ids(self, user: Message) -> list[int]:
        """The tokens the cache lacks for a conversation continued by `user`."""
        return self._uncached(user)[0]

    def _uncached(self, user: Message) -> tuple[list[int], list[PreparedImage]]:
        """The tokens the cache lacks for a conversation continued by `user`, and the images among them."""
        if self._cache is None:
            return self._expanded(
                [*self.messages, user],
                render_chat(self.tokenizer, template_messages([*self.messages, user]), thinking=self.thinking),
            )
        # Render the history with a marker for the last reply: what follows the
        # marker closes that reply and opens the new turn.
        history = [*self.messages[:-1], {"role": "assistant", "content": _REPLY_MARK}, user]
        rendered = render_chat(self.tokenizer, template_messages(history), thinking=self.thinking)
        suffix = rendered.split(_REPLY_MARK, 1)[1]
        ids, images = self._expanded([user], suffix)
        return self._pending + ids, images

    def _expanded(self, messages: Sequence[Message], rendered: str) -> tuple[list[int], list[PreparedImage]]:
        """`rendered`'s token ids with the placeholders of `messages`' images expanded, and those images."""
        ids = encode_text(self.tokenizer, rendered)
        images: list[PreparedImage] = message_images(messages)
        if not images:
            return ids, []
        tokens = model_image_tokens(self.model, self.tokenizer)
        return expand_placeholders(ids, images, tokens), images
