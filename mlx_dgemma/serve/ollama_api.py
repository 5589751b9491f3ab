"""Ollama's API: /api/generate (with `suffix`: fill-in-the-middle), /api/chat, /api/tags and /api/show.

Streams are newline-delimited JSON (streaming is Ollama's default); the last
object has `done: true`, `done_reason` and the eval counts and durations in
nanoseconds. Errors are `{"error": "..."}`. With `"drafts": true`, a stream
also carries `{"draft": {...}, "done": false}` objects, one per denoising step.
Images: `images` (a list of base64 strings) on /api/generate and on each
/api/chat message, placed before the text of their turn.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..generate import Draft
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
    json_line,
    parse_body,
    prepare_fill,
    prepare_generation,
    sampler_settings,
    server_image,
    stop_strings,
    text_ids,
)
from .schemas import OllamaChatRequest, OllamaGenerateRequest, OllamaOptions, OllamaRequest, OllamaShowRequest

DEFAULT_HOLE_TOKENS = 64  # num_predict's default for fill-in-the-middle (Ollama's own is "unlimited")
NANOSECONDS = 1_000_000_000
ROLES = ("system", "user", "assistant")
# What /api/show calls the prompt template. Not used for prompts (the checkpoint's chat template is); clients
# read it: Continue sends fill-in-the-middle requests (with `suffix`) only to models whose template has .Suffix.
SHOW_TEMPLATE = "{{ if .Suffix }}{{ .Prompt }}<hole>{{ .Suffix }}{{ else }}{{ .Prompt }}{{ end }}"
# One piece of a reply as Ollama's objects carry it: /api/generate's `response`, /api/chat's `message`.
Shape = Callable[[str, str], dict[str, Any]]


def router(server: Server) -> APIRouter:
    routes = APIRouter()

    @routes.get("/api/tags")
    async def tags() -> dict[str, Any]:
        return {"models": [_model_entry(server)]}

    @routes.post("/api/show")
    async def show(request: Request) -> dict[str, Any]:
        body = await parse_body(request, OllamaShowRequest)
        _check_model(server, body.model or body.name)
        info = {"general.architecture": "diffusiongemma", "diffusiongemma.context_length": server.context}
        # A Modelfile's ADAPTER line, as Ollama shows a model made with one.
        adapter = f"FROM {server.model_name}\nADAPTER {server.adapter}\n" if server.adapter is not None else ""
        return {
            "modelfile": adapter,
            "parameters": f"num_ctx {server.context}",
            "template": SHOW_TEMPLATE,
            "details": _model_entry(server)["details"],
            "model_info": info,
            "capabilities": ["completion", "insert", "thinking", *(["vision"] if _reads_images(server) else [])],
        }

    @routes.post("/api/generate")
    async def generate(request: Request) -> Response:
        received = time.perf_counter()
        body = await parse_body(request, OllamaGenerateRequest)
        _check_body(server, body)
        if not body.prompt and not body.images and body.suffix is None:
            return _loaded(server, body.stream, {"response": ""})  # Ollama's way to load a model
        prepared = await server.prepare(_prepare_generate, body)
        return await _respond(server, request, body, prepared, received, _generate_shape)

    @routes.post("/api/chat")
    async def chat(request: Request) -> Response:
        received = time.perf_counter()
        body = await parse_body(request, OllamaChatRequest)
        _check_body(server, body)
        if body.images:
            raise ApiError(400, "images: on /api/chat, images go in a message's images list")
        if not body.messages:
            return _loaded(server, body.stream, {"message": {"role": "assistant", "content": ""}})
        prepared = await server.prepare(_prepare_chat, body)
        return await _respond(server, request, body, prepared, received, _chat_shape)

    return routes


def _model_entry(server: Server) -> dict[str, Any]:
    details = {
        "format": "mlx",
        "family": "diffusiongemma",
        "families": ["diffusiongemma"],
        "parameter_size": "",
        "quantization_level": "",
    }
    modified = datetime.fromtimestamp(server.created, timezone.utc).isoformat()
    return {
        "name": server.model_name,
        "model": server.model_name,
        "modified_at": modified,
        "size": 0,
        "digest": "",
        "details": details,
    }


def _reads_images(server: Server) -> bool:
    return server.engine.model.config.has_vision


def _check_model(server: Server, name: str | None) -> None:
    if not server.knows(name):
        raise ApiError(404, f"model {name!r} not found; this server serves {server.model_name!r}")


def _check_body(server: Server, body: OllamaRequest) -> None:
    _check_model(server, body.model)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _loaded(server: Server, stream: bool, empty: dict[str, Any]) -> Response:
    payload = {"model": server.model_name, "created_at": _now(), **empty, "done": True, "done_reason": "load"}
    if stream:
        return Response(json_line(payload), media_type="application/x-ndjson")
    return JSONResponse(payload)


# ----------------------------------------------------------------- building the job (in a worker thread)


def _options(body: OllamaRequest) -> OllamaOptions:
    return body.options or OllamaOptions()


def _settings_values(body: OllamaRequest, max_tokens: int | None) -> dict[str, Any]:
    """Sampler values from `options` (Ollama's place for them), or the top level."""
    options = _options(body)
    top, nested = body.sampler_values(), options.sampler_values()
    values = {name: nested[name] if nested[name] is not None else top[name] for name in top}
    seed = options.seed if options.seed is not None and options.seed >= 0 else None
    return {**values, "max_new_tokens": max_tokens, "seed": seed}


def _num_predict(body: OllamaRequest) -> int | None:
    value = _options(body).num_predict
    if value is None or value < 0:  # -1: until the end, -2: fill the context; both as our default
        return None
    if value == 0:
        raise ApiError(400, "options.num_predict must not be 0")
    return value


NAMES = Names(max_tokens="options.num_predict", seed="options.seed", prefix="options.")


def _with_images(server: Server, text: str, images: list[str] | None, param: str) -> str | list[dict[str, Any]]:
    """A turn's content: its text, after its images (prepared) when it has any."""
    if not images:
        return text
    parts: list[dict[str, Any]] = [
        {"type": "image", "image": server_image(server, image, f"{param}[{i}]")} for i, image in enumerate(images)
    ]
    return [*parts, {"type": "text", "text": text}] if text else parts


def _prepare_generate(server: Server, body: OllamaGenerateRequest) -> Prepared:
    stop = stop_strings(_options(body).stop, "options.stop")
    if body.images and (body.suffix is not None or body.raw):
        what = "suffix (fill-in-the-middle)" if body.suffix is not None else "raw prompts"
        raise ApiError(400, f"images cannot go with {what}: they need the chat template")
    if body.suffix is not None:  # fill-in-the-middle
        settings = sampler_settings(server, _settings_values(body, None), NAMES)
        hole = _num_predict(body) or DEFAULT_HOLE_TOKENS
        return prepare_fill(server, body.prompt, body.suffix, hole, settings, stop, NAMES)
    max_tokens = _num_predict(body)
    settings = sampler_settings(server, _settings_values(body, max_tokens), NAMES)
    if body.raw:
        ids = text_ids(server, body.prompt)
    else:
        messages = [{"role": "system", "content": body.system}] if body.system else []
        user = {"role": "user", "content": _with_images(server, body.prompt, body.images, "images")}
        ids, images = chat_prompt(server, [*messages, user], bool(body.think), "prompt")
        return prepare_generation(server, ids, settings, stop, NAMES, max_tokens, images=images)
    return prepare_generation(server, ids, settings, stop, NAMES, max_tokens)


def _prepare_chat(server: Server, body: OllamaChatRequest) -> Prepared:
    messages = []
    for i, message in enumerate(body.messages):
        if message.role not in ROLES:
            raise ApiError(400, f"messages[{i}].role: {message.role!r} is not supported: use system, user or assistant")
        content = _with_images(server, message.content, message.images, f"messages[{i}].images")
        messages.append({"role": message.role, "content": content})
    max_tokens = _num_predict(body)
    settings = sampler_settings(server, _settings_values(body, max_tokens), NAMES)
    ids, images = chat_prompt(server, messages, bool(body.think))
    history = chat_history_length(server, messages, bool(body.think), ids)
    stop = stop_strings(_options(body).stop, "options.stop")
    return prepare_generation(server, ids, settings, stop, NAMES, max_tokens, history, images)


# ----------------------------------------------------------------- responses


def _generate_shape(content: str, thinking: str) -> dict[str, Any]:
    return {"response": content, **({"thinking": thinking} if thinking else {})}


def _chat_shape(content: str, thinking: str) -> dict[str, Any]:
    message = {"role": "assistant", "content": content, **({"thinking": thinking} if thinking else {})}
    return {"message": message}


async def _respond(
    server: Server, request: Request, body: OllamaRequest, prepared: Prepared, received: float, shape: Shape
) -> Response:
    generation = Generation(server.engine, prepared, drafts=body.stream and body.drafts).submit()
    if body.stream:
        events = _stream(server, generation, received, shape)
        return JobStream(events, generation.job, "application/x-ndjson")
    text = await generation.collect(request)
    return JSONResponse(_final(server, generation, received, shape, text))


def _final(server: Server, generation: Generation, received: float, shape: Shape, text: Text) -> dict[str, Any]:
    prompt_seconds, eval_seconds = generation.timings()
    return {
        "model": server.model_name,
        "created_at": _now(),
        **shape(text.content, text.thinking),
        "done": True,
        "done_reason": generation.finish_reason,
        "total_duration": int((time.perf_counter() - received) * NANOSECONDS),
        "load_duration": 0,
        "prompt_eval_count": generation.prompt_tokens,
        "prompt_eval_duration": int(prompt_seconds * NANOSECONDS),
        "eval_count": generation.completion_tokens,
        "eval_duration": int(eval_seconds * NANOSECONDS),
    }


async def _stream(server: Server, generation: Generation, received: float, shape: Shape) -> AsyncIterator[bytes]:
    try:
        async for piece in generation.pieces():
            head = {"model": server.model_name, "created_at": _now()}
            if isinstance(piece, Draft):
                yield json_line({**head, **shape("", ""), "draft": draft_payload(piece), "done": False})
            else:
                yield json_line({**head, **shape(piece.content, piece.thinking), "done": False})
    except ApiError as error:
        yield json_line({"error": error.message})
        return
    yield json_line(_final(server, generation, received, shape, Text()))
