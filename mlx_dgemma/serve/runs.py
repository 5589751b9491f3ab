"""From a request to an engine Job, and from the Job's events to text: what every API shares.

A route builds a `Prepared` (prompt ids, checked settings, a fill layout for
fill-in-the-middle, stop strings) with the helpers here, which turn every
problem with the request into a 400 naming the field; `Generation` submits it
(a full queue is a 429) and turns the engine's events into `Text` pieces and
`Draft`s, applying stop strings: the text is cut before the first one and the
job cancelled, so it stops at its next step.

Images come as `data:` URLs or bare base64 (Ollama); http(s) URLs only when
the server was started with `--allow-remote-images` (then fetched with a size
cap and a timeout). A local path is never read on a client's behalf. A bad
image is a 400 naming its field.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ..constrained import PINNED, Slot, fill_layout, infill_layout
from ..generate import (
    Commit,
    Done,
    Draft,
    GenerationStats,
    check_context,
    check_vision,
    checked_token_ids,
    default_settings,
    message_images,
    model_image_tokens,
    template_messages,
    vision_settings,
)
from ..images import (
    PreparedImage,
    decode_base64,
    expand_placeholders,
    fetch_remote_image,
    prepare_image,
)
from ..sampler import SamplerSettings
from ..tokenizer import TemplateError, encode_text, render_chat
from .engine import Encoded, Engine, Failed, FillDone, Job, QueueFull
from .errors import ApiError

DEFAULT_MODEL_ALIASES = ("", "default")
BodyModel = TypeVar("BodyModel", bound=BaseModel)


@dataclass
class Server:
    """What the routes share: the engine and the name clients call the model by."""

    engine: Engine
    model_name: str
    allow_remote_images: bool = False  # fetch http(s) image URLs (off: a client could make the server fetch any URL)
    adapter: str | None = None  # the LoRA adapter the model was loaded with
    created: int = field(default_factory=lambda: int(time.time()))
    _preparing: threading.Lock = field(default_factory=threading.Lock)

    async def prepare(self, build: Callable[..., Prepared], *args: Any) -> Prepared:
        """`build(self, *args)` off the event loop (a long prompt takes a while to tokenize), one at a time:
        transformers' fast tokenizers may reset their state on each call, which another thread must not see."""

        def locked() -> Prepared:
            with self._preparing:
                return build(self, *args)

        return await run_in_threadpool(locked)

    def knows(self, name: str | None) -> bool:
        """Whether a request's `model` names this model (omitted and "default" do; Ollama adds ':latest')."""
        if name is None or name in DEFAULT_MODEL_ALIASES:
            return True
        return name in (self.model_name, f"{self.model_name}:latest", "default:latest")

    @property
    def context(self) -> int:
        return self.engine.model.text_config.max_position_embeddings


@dataclass
class Names:
    """What a route calls the fields an error may name (`max_tokens`, `n_predict`, `options.num_predict`...)."""

    prompt: str = "prompt"
    max_tokens: str = "max_tokens"
    seed: str = "seed"
    prefix: str = ""  # before sampler fields: "options." for Ollama

    def of(self, name: str) -> str:
        return {"max_new_tokens": self.max_tokens, "seed": self.seed}.get(name, self.prefix + name)


@dataclass
class Prepared:
    prompt_ids: list[int]
    settings: SamplerSettings
    slots: list[Slot] | None = None  # a fill-in-the-middle layout
    stop: tuple[str, ...] = ()
    keep_prefix: int | None = None  # see engine.Job
    images: list[PreparedImage] = field(default_factory=list)  # the prompt's, in order


# ----------------------------------------------------------------- building a job


async def parse_body(request: Request, model: type[BodyModel]) -> BodyModel:
    """The JSON body as `model`, whatever the Content-Type (curl -d sends a form's); errors become 400s."""
    raw = await request.body()
    if not raw.strip():
        raise ApiError(400, "the request body is empty: send a JSON object")
    try:
        return model.model_validate_json(raw)
    except ValidationError as error:
        raise RequestValidationError(error.errors(include_url=False)) from None


def sampler_settings(server: Server, values: dict[str, Any], names: Names) -> SamplerSettings:
    """The checkpoint's defaults with the request's values; a bad value is a 400 naming its field."""
    base = default_settings(server.engine.model)
    given = {key: value for key, value in values.items() if value is not None}
    # As OpenAI's and Ollama's servers do: a request without a seed gets a fresh one (a "regenerate" differs).
    given.setdefault("seed", secrets.randbits(31))
    try:
        return base.updated(**given)
    except ValueError as error:
        culprit = "t_min" if "t_min" in given else next(iter(given), None)  # t_min and t_max may only clash
        for key, value in given.items():  # the one refused on its own, if any
            try:
                base.updated(**{key: value})
            except ValueError:
                culprit = key
                break
        message = str(error).split(" (got ", 1)[0]  # SamplerSettings appends every field's value
        raise ApiError(400, message, param=names.of(culprit) if culprit else None) from None


def stop_strings(stop: str | Sequence[str] | None, param: str = "stop") -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else list(stop)
    if len(items) > 16:
        raise ApiError(400, "at most 16 stop strings", param=param)
    return tuple(item for item in items if item)


def server_image(server: Server, source: Any, param: str) -> PreparedImage:
    """A client's image, preprocessed for the model: a data: URL, bare base64, or (when the server allows it)
    an http(s) URL. Anything wrong is a 400 naming `param`."""
    model = server.engine.model
    try:
        check_vision(model)
    except ValueError as error:
        raise ApiError(400, str(error), param=param, code="images_not_supported") from None
    if not isinstance(source, str) or not source.strip():
        raise ApiError(400, "an image must be a data: URL or base64 text", param=param)
    source = source.strip()
    try:
        if source[:8].lower().startswith(("http://", "https://")):
            if not server.allow_remote_images:
                message = (
                    "remote image URLs are not fetched by this server: send the image as a data: URL "
                    "(base64), or start the server with --allow-remote-images"
                )
                raise ApiError(400, message, param=param, code="remote_images_disabled")
            data: Any = fetch_remote_image(source)
        elif source[:5].lower() == "data:":
            data = source
        else:
            data = decode_base64(source)
        return prepare_image(data, vision_settings(model, server.engine.tokenizer))
    except ValueError as error:
        raise ApiError(400, " ".join(str(error).split()), param=param, code="invalid_image") from None


def chat_ids(server: Server, messages: list[dict[str, Any]], thinking: bool, param: str = "messages") -> list[int]:
    """The chat template's prompt for text-only `messages`, as token ids."""
    return chat_prompt(server, messages, thinking, param)[0]


def chat_prompt(
    server: Server, messages: list[dict[str, Any]], thinking: bool, param: str = "messages"
) -> tuple[list[int], list[PreparedImage]]:
    """The chat template's prompt for `messages`, as token ids with each image's run expanded, and the images
    (already prepared, in the messages' image parts) in prompt order."""
    if not messages:
        raise ApiError(400, "messages must not be empty", param=param)
    tokenizer = server.engine.tokenizer
    try:
        rendered = render_chat(tokenizer, template_messages(messages), add_generation_prompt=True, thinking=thinking)
    except TemplateError as error:
        raise ApiError(400, str(error), param=param) from None
    ids = encode_text(tokenizer, rendered)
    images = message_images(messages)
    if images:
        ids = _expanded(server, ids, images, param)
    return _checked(server, ids, param), images


def _expanded(server: Server, ids: list[int], images: list[PreparedImage], param: str) -> list[int]:
    model = server.engine.model
    tokens = model_image_tokens(model, server.engine.tokenizer)
    try:
        return expand_placeholders(ids, images, tokens)
    except ValueError as error:  # a message's text holding the image placeholder itself
        raise ApiError(400, str(error), param=param) from None


def chat_history_length(server: Server, messages: list[dict[str, Any]], thinking: bool, ids: list[int]) -> int | None:
    """How many leading tokens of a chat prompt `ids` are its history without this turn's generation prompt:
    the part the next turn's prompt extends (None where the template does not render it as a prefix)."""
    tokenizer = server.engine.tokenizer
    try:
        rendered = render_chat(tokenizer, template_messages(messages), add_generation_prompt=False, thinking=thinking)
        history = encode_text(tokenizer, rendered)
        images = message_images(messages)
        if images:
            history = _expanded(server, history, images, "messages")
    except (TemplateError, ApiError):
        return None
    return len(history) if 0 < len(history) < len(ids) and ids[: len(history)] == history else None


def text_ids(server: Server, prompt: str | list[int], param: str = "prompt") -> list[int]:
    """A raw prompt (no chat template) to continue: BOS and its tokens, or token ids as given."""
    if isinstance(prompt, list):
        if not prompt:
            raise ApiError(400, "the prompt is empty", param=param)
        return _checked(server, prompt, param)
    tokenizer = server.engine.tokenizer
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = bos + encode_text(tokenizer, prompt)
    if not ids:
        raise ApiError(400, "the prompt is empty", param=param)
    return _checked(server, ids, param)


def _checked(server: Server, ids: Sequence[int], param: str) -> list[int]:
    try:
        return checked_token_ids(ids, server.engine.model.text_config.vocab_size)
    except ValueError as error:
        raise ApiError(400, str(error), param=param) from None


def prepare_generation(
    server: Server,
    ids: list[int],
    settings: SamplerSettings,
    stop: tuple[str, ...],
    names: Names,
    max_tokens: int | None,
    keep_prefix: int | None = None,
    images: list[PreparedImage] | None = None,
) -> Prepared:
    """A free generation after `ids` (with its `images`), refused when prompt and reply would not fit the
    context. Without a requested `max_tokens`, the default shrinks to the room the prompt leaves (whole
    canvases)."""
    images = images or []
    if max_tokens is None:
        settings = _fitted(server, len(ids), settings)
    try:
        check_context(server.engine.model, 0, len(ids), settings, images)
    except ValueError as error:
        param = names.prompt if len(ids) >= server.context else names.max_tokens
        raise ApiError(400, str(error), param=param, code="context_length_exceeded") from None
    return Prepared(ids, settings, None, stop, keep_prefix, images)


def _fitted(server: Server, prompt: int, settings: SamplerSettings) -> SamplerSettings:
    canvas = server.engine.model.config.canvas_length
    room = (server.context - prompt) // canvas * canvas
    if 0 < room < settings.max_new_tokens:
        return settings.updated(max_new_tokens=room)
    return settings  # no room at all: check_context says so


def prepare_fill(
    server: Server, prefix: str, suffix: str, hole: int, settings: SamplerSettings, stop: tuple[str, ...], names: Names
) -> Prepared:
    """Fill-in-the-middle: up to `hole` tokens between `prefix` and `suffix`, through the constrained canvas."""
    engine = server.engine
    try:
        ids, slots = infill_layout(engine.tokenizer, prefix, suffix, hole)
    except ValueError as error:
        raise ApiError(400, str(error), param=names.max_tokens) from None
    ids = _checked(server, ids, names.prompt)
    _checked(server, [slot.token for slot in slots if slot.kind == PINNED], "suffix")
    try:
        fill_layout(engine.model, ids, slots, settings)  # the checks the engine would make, before queueing
    except ValueError as error:
        if "context" not in str(error):
            raise ApiError(400, str(error), param=names.prompt) from None
        message = (
            f"the prompt ({len(ids)} tokens) and a hole of {hole} tokens (with the suffix that shares its last "
            f"canvas) do not fit the model's context of {server.context} tokens"
        )
        param = names.prompt if len(ids) >= server.context else names.max_tokens
        raise ApiError(400, message, param=param, code="context_length_exceeded") from None
    return Prepared(ids, settings, slots, stop)


# ----------------------------------------------------------------- running it


@dataclass
class Text:
    """Committed text: the answer's and the thinking channel's."""

    content: str = ""
    thinking: str = ""


class StopScanner:
    """Cuts streamed text before the first stop string, holding back a tail that may begin one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [stop for stop in stops if stop]
        self.pending = ""
        self.hit: str | None = None

    def feed(self, text: str) -> str:
        """The part of `text` (after what was held back) that is safe to hand out now."""
        if not self.stops or self.hit is not None:
            return text if self.hit is None else ""
        self.pending += text
        found = [(self.pending.find(stop), stop) for stop in self.stops]
        found = [(index, stop) for index, stop in found if index >= 0]
        if found:
            index, self.hit = min(found)
            out, self.pending = self.pending[:index], ""
            return out
        keep = self._held_back()
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

    def _held_back(self) -> int:
        longest = max(len(stop) for stop in self.stops) - 1
        for size in range(min(longest, len(self.pending)), 0, -1):
            tail = self.pending[-size:]
            if any(stop.startswith(tail) for stop in self.stops):
                return size
        return 0


class Generation:
    """One request on the engine: its events as `Text` and `Draft` pieces, its counts and timings."""

    def __init__(self, engine: Engine, prepared: Prepared, drafts: bool = False) -> None:
        self.engine, self.drafts = engine, drafts
        self.job = Job(
            prepared.prompt_ids,
            prepared.settings,
            slots=prepared.slots,
            keep_prefix=prepared.keep_prefix,
            images=prepared.images,
            drafts=drafts,
        )
        self.fill = prepared.slots is not None
        self.hole = sum(slot.kind != PINNED for slot in prepared.slots or ())
        self.scanner = StopScanner(prepared.stop)
        self.prompt_tokens = len(prepared.prompt_ids)
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.finish_reason = "length"
        self.stats: GenerationStats | None = None
        self.started = self.prompt_done = self.ended = time.perf_counter()

    @property
    def stopping_word(self) -> str | None:
        return self.scanner.hit

    def submit(self) -> Generation:
        try:
            self.engine.submit(self.job)
        except QueueFull:
            engine = self.engine
            message = (
                f"the server is busy ({engine.max_concurrent} requests running, at most {engine.max_queue} "
                "waiting); try again shortly"
            )
            raise ApiError(429, message, code="rate_limit_exceeded") from None
        self.started = self.prompt_done = time.perf_counter()
        return self

    async def pieces(self) -> AsyncIterator[Text | Draft]:
        """Committed text (and drafts, when asked for) as the engine makes them; raises ApiError on a failure."""
        prompt_seen = False
        try:
            async for event in self.job.events():
                if isinstance(event, Encoded) or not prompt_seen:
                    self.prompt_done, prompt_seen = time.perf_counter(), True
                for piece in self._pieces_of(event):
                    yield piece
                if self.scanner.hit is not None:
                    self.finish_reason = "stop"
                    self.job.cancel()  # it has what it wanted: stop at the next step
                    break
        finally:
            self.ended = time.perf_counter()

    def _pieces_of(self, event: Any) -> list[Text | Draft]:
        if isinstance(event, Draft):
            return [event] if self.drafts else []
        if isinstance(event, Commit) and not self.fill:
            self.completion_tokens += len(event.tokens)
            return _nonempty(Text(self.scanner.feed(event.text), event.thinking))
        if isinstance(event, Done):
            self.stats, self.finish_reason = event.result.stats, event.result.finish_reason
            self.cached_tokens = self.prompt_tokens - self.stats.prompt_tokens
            return _nonempty(Text(self.scanner.flush()))
        if isinstance(event, FillDone):
            self.stats, self.completion_tokens = event.stats, event.stats.generation_tokens
            self.cached_tokens = self.prompt_tokens - self.stats.prompt_tokens
            self.finish_reason = "length" if self.completion_tokens >= self.hole else "stop"
            text = self.scanner.feed(event.fills[0] if event.fills else "")
            return _nonempty(Text(text + self.scanner.flush()))
        if isinstance(event, Failed):
            raise ApiError(500, f"generation failed: {event.message}", code="generation_failed")
        return []

    async def collect(self, request: Request) -> Text:
        """The whole text, for a response that is not streamed; the job is cancelled if the client leaves."""
        watcher = asyncio.create_task(_cancel_on_disconnect(request.receive, self.job))
        content, thinking = [], []
        try:
            async for piece in self.pieces():
                if isinstance(piece, Text):
                    content.append(piece.content)
                    thinking.append(piece.thinking)
        finally:
            watcher.cancel()
            self.job.cancel()
        return Text("".join(content), "".join(thinking))

    def timings(self) -> tuple[float, float]:
        """Seconds encoding the prompt (from submission) and generating."""
        return max(0.0, self.prompt_done - self.started), max(0.0, self.ended - self.prompt_done)


def _nonempty(text: Text) -> list[Text | Draft]:
    return [text] if text.content or text.thinking else []


async def _cancel_on_disconnect(receive: Receive, job: Job) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


def sse(payload: Any) -> bytes:
    """One server-sent event (`data: ...`), as OpenAI's and llama.cpp's streams send them."""
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def json_line(payload: Any) -> bytes:
    """One line of newline-delimited JSON, as Ollama streams."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def draft_payload(draft: Draft) -> dict[str, Any]:
    return {"canvas": draft.canvas, "step": draft.step, "text": draft.text}


class JobStream(StreamingResponse):
    """A streamed response whose job is cancelled however the stream ends: finished, failed, or the client gone
    (Starlette then cancels the stream, which may leave the body generator suspended, so it is closed here)."""

    def __init__(self, content: AsyncIterator[bytes], job: Job, media_type: str) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type=media_type, headers=headers)
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()
            closer: Callable[[], Any] | None = getattr(self.body_iterator, "aclose", None)
            if closer is not None:
                await closer()
