"""OpenAI's API: /v1/models, /v1/chat/completions and /v1/completions (with `suffix`: fill-in-the-middle).

Responses follow OpenAI's shapes, so its clients (the `openai` package,
Continue, Zed, ...) work unchanged. Extensions: the sampler's parameters as
extra request fields, `reasoning_content` for the thinking channel, and with
`"drafts": true` on a streamed request, chunks with an empty delta and a
`draft` field holding each denoising step's view of the canvas. Images come as
`image_url` content parts: data: URLs (base64), or http(s) URLs on a server
started with --allow-remote-images.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..generate import Draft
from ..sampler import SamplerSettings
from .errors import ApiError
from .runs import (
    Generation,
    JobStream,
    Names,
    Prepared,
    Server,
    Text,
    chat_history_length,
    chat_prompt,
    draft_payload,
    parse_body,
    prepare_fill,
    prepare_generation,
    sampler_settings,
    server_image,
    sse,
    stop_strings,
    text_ids,
)
from .schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, ContentPart

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions, and the hole's size with a suffix
DONE = b"data: [DONE]\n\n"


@dataclass
class Reply:
    """What every chunk of one response repeats."""

    model: str
    object: str
    id: str
    created: int = field(default_factory=lambda: int(time.time()))

    def head(self) -> dict[str, Any]:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model}


def router(server: Server) -> APIRouter:
    routes = APIRouter()

    @routes.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(server)]}

    @routes.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        _check_model(server, name)
        return _model_card(server)

    @routes.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await parse_body(request, ChatCompletionRequest)
        _check_request(server, body.model, body.n)
        if body.logprobs or body.top_logprobs:
            raise ApiError(400, "logprobs are not supported by this server", param="logprobs")
        prepared = await server.prepare(_prepare_chat, body)
        generation = Generation(server.engine, prepared, drafts=bool(body.stream and body.drafts)).submit()
        reply = Reply(server.model_name, "chat.completion", f"chatcmpl-{secrets.token_hex(12)}")
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return JobStream(_chat_stream(generation, reply, usage), generation.job, "text/event-stream")
        text = await generation.collect(request)
        return JSONResponse(_chat_body(generation, reply, text))

    @routes.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await parse_body(request, CompletionRequest)
        _check_request(server, body.model, body.n)
        _refuse_completion_extras(body)
        prepared = await server.prepare(_prepare_completion, body)
        generation = Generation(server.engine, prepared, drafts=bool(body.stream and body.drafts)).submit()
        reply = Reply(server.model_name, "text_completion", f"cmpl-{secrets.token_hex(12)}")
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return JobStream(_completion_stream(generation, reply, usage), generation.job, "text/event-stream")
        text = await generation.collect(request)
        choice = {"text": text.content, "index": 0, "logprobs": None, "finish_reason": generation.finish_reason}
        return JSONResponse({**reply.head(), "choices": [choice], "usage": usage_of(generation)})

    return routes


# ----------------------------------------------------------------- checks


def _model_card(server: Server) -> dict[str, Any]:
    card = {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "mlx-dgemma"}
    return card if server.adapter is None else {**card, "adapter": server.adapter}


def _check_model(server: Server, name: str | None) -> None:
    if not server.knows(name):
        message = f"the model {name!r} does not exist; this server serves {server.model_name!r}"
        raise ApiError(404, message, param="model", code="model_not_found")


def _check_request(server: Server, model: str | None, n: int | None) -> None:
    _check_model(server, model)
    if n is not None and n != 1:
        raise ApiError(400, "n must be 1: this server makes one choice per request", param="n")


def _refuse_completion_extras(body: CompletionRequest) -> None:
    if body.best_of is not None and body.best_of != 1:
        raise ApiError(400, "best_of must be 1: this server makes one choice per request", param="best_of")
    if body.echo:
        raise ApiError(400, "echo is not supported by this server", param="echo")
    if body.logprobs is not None:
        raise ApiError(400, "logprobs are not supported by this server", param="logprobs")


# ----------------------------------------------------------------- building the job (in a worker thread)


def chat_messages(server: Server, messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI messages as the chat template takes them: roles checked, text parts joined, images prepared."""
    converted = []
    for i, message in enumerate(messages):
        role = ROLES.get(message.role)
        if role is None:
            message_text = f"role {message.role!r} is not supported: use system, user or assistant"
            raise ApiError(400, message_text, param=f"messages[{i}].role")
        converted.append({"role": role, "content": _message_content(server, message, f"messages[{i}].content")})
    return converted


def _message_content(server: Server, message: ChatMessage, param: str) -> str | list[dict[str, Any]]:
    """The text (parts joined by newlines), or with images the parts in order: text and prepared images."""
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    texts: list[str] = []
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(message.content):
        if part.type == "image_url":
            parts.append(
                {
                    "type": "image",
                    "image": server_image(server, _image_url(part, f"{param}[{j}]"), _url_param(param, j, part)),
                }
            )
            continue
        if part.type != "text" or part.text is None:
            kind = f"content parts of type {part.type!r} are not supported: send text or image_url"
            raise ApiError(400, kind, param=f"{param}[{j}]")
        texts.append(part.text)
        parts.append({"type": "text", "text": part.text})
    if len(parts) == len(texts):  # no images: the text as one string, as before
        return "\n".join(texts)
    return parts


def _image_url(part: ContentPart, param: str) -> Any:
    """An image_url part's URL: {"image_url": {"url": ...}} as OpenAI sends it, or {"image_url": "..."}."""
    value = (part.model_extra or {}).get("image_url")
    if isinstance(value, dict):
        value = value.get("url")
    if not isinstance(value, str) or not value:
        raise ApiError(400, 'an image_url part needs {"image_url": {"url": "data:image/...;base64,..."}}', param=param)
    return value


def _url_param(param: str, index: int, part: ContentPart) -> str:
    nested = isinstance((part.model_extra or {}).get("image_url"), dict)
    return f"{param}[{index}].image_url" + (".url" if nested else "")


def _settings(
    server: Server, body: ChatCompletionRequest | CompletionRequest, max_tokens: int | None, names: Names
) -> SamplerSettings:
    return sampler_settings(server, {**body.sampler_values(), "max_new_tokens": max_tokens, "seed": body.seed}, names)


def _prepare_chat(server: Server, body: ChatCompletionRequest) -> Prepared:
    thinking = bool(body.chat_template_kwargs and body.chat_template_kwargs.enable_thinking)
    names = Names(prompt="messages", max_tokens="max_completion_tokens" if body.max_completion_tokens else "max_tokens")
    max_tokens = body.max_completion_tokens or body.max_tokens
    settings = _settings(server, body, max_tokens, names)
    messages = chat_messages(server, body.messages)
    ids, images = chat_prompt(server, messages, thinking)
    history = chat_history_length(server, messages, thinking, ids)
    return prepare_generation(server, ids, settings, stop_strings(body.stop), names, max_tokens, history, images)


def _prepare_completion(server: Server, body: CompletionRequest) -> Prepared:
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and all(isinstance(item, str) for item in prompt):
        if len(prompt) != 1:
            raise ApiError(400, "one prompt per request", param="prompt")
        prompt = prompt[0]
    max_tokens = body.max_tokens or DEFAULT_COMPLETION_TOKENS
    names = Names()
    stop = stop_strings(body.stop)
    if body.suffix is None:
        settings = _settings(server, body, max_tokens, names)
        return prepare_generation(server, text_ids(server, prompt), settings, stop, names, max_tokens)
    if not isinstance(prompt, str):
        raise ApiError(400, "a suffix needs the prompt as text", param="prompt")
    settings = _settings(server, body, None, names)  # the hole's size is the layout's, not a token budget
    return prepare_fill(server, prompt, body.suffix, max_tokens, settings, stop, names)


# ----------------------------------------------------------------- responses


def usage_of(generation: Generation) -> dict[str, Any]:
    return {
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": generation.completion_tokens,
        "total_tokens": generation.prompt_tokens + generation.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": generation.cached_tokens},
    }


def _chat_body(generation: Generation, reply: Reply, text: Text) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text.content}
    if text.thinking:
        message["reasoning_content"] = text.thinking
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": generation.finish_reason}
    return {**reply.head(), "choices": [choice], "usage": usage_of(generation)}


async def _chat_stream(generation: Generation, reply: Reply, include_usage: bool) -> AsyncIterator[bytes]:
    head = {**reply.head(), "object": "chat.completion.chunk"}
    extra = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, Any], finish: str | None = None, **more: Any) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return sse({**head, "choices": [choice], **extra, **more})

    yield chunk({"role": "assistant", "content": ""})
    try:
        async for piece in generation.pieces():
            if isinstance(piece, Draft):
                yield chunk({}, draft=draft_payload(piece))
                continue
            delta = {"reasoning_content": piece.thinking} if piece.thinking else {}
            if piece.content:
                delta["content"] = piece.content
            yield chunk(delta)
    except ApiError as error:
        yield _stream_error(error)
        return
    yield chunk({}, generation.finish_reason)
    if include_usage:
        yield sse({**head, "choices": [], "usage": usage_of(generation)})
    yield DONE


async def _completion_stream(generation: Generation, reply: Reply, include_usage: bool) -> AsyncIterator[bytes]:
    extra = {"usage": None} if include_usage else {}

    def chunk(text: str, finish: str | None = None, **more: Any) -> bytes:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
        return sse({**reply.head(), "choices": [choice], **extra, **more})

    try:
        async for piece in generation.pieces():
            if isinstance(piece, Draft):
                yield chunk("", draft=draft_payload(piece))
            elif piece.content:
                yield chunk(piece.content)
    except ApiError as error:
        yield _stream_error(error)
        return
    yield chunk("", generation.finish_reason)
    if include_usage:
        yield sse({**reply.head(), "choices": [], "usage": usage_of(generation)})
    yield DONE


def _stream_error(error: ApiError) -> bytes:
    """A failure after the stream began: an error event (as OpenAI sends one), then the end."""
    body = {"message": error.message, "type": error.type, "param": error.param, "code": error.code}
    return sse({"error": body}) + DONE
