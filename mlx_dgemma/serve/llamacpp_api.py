"""llama.cpp's server API: /infill (fill-in-the-middle, as llama.vim and llama.vscode send it) and /completion.

Answers are llama.cpp's: `{"content": ..., "stop": true, "timings": {...}, ...}`,
streamed as server-sent events ending with a `stop: true` object; errors are
`{"error": {"code", "message", "type"}}`. `response_fields` picks fields by
path (`"timings/prompt_n"`) as llama.cpp does. A request with `n_predict: 0`
(llama.vim's way to hand over extra context ahead of time) answers at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence
from pathlib import PurePosixPath
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
    draft_payload,
    parse_body,
    prepare_fill,
    prepare_generation,
    sampler_settings,
    sse,
    stop_strings,
    text_ids,
)
from .schemas import InfillRequest, InputExtra, LlamaCompletionRequest, LlamaCppRequest

DEFAULT_HOLE_TOKENS = 64
NAMES = Names(max_tokens="n_predict")
# Comment syntax for the header line that names each extra file (llama.cpp uses FIM tokens we do not have).
COMMENTS = {
    **dict.fromkeys((".py", ".sh", ".bash", ".rb", ".pl", ".r", ".yaml", ".yml", ".toml", ".cfg", ".ini"), "#"),
    **dict.fromkeys((".lua", ".sql", ".hs", ".elm"), "--"),
    **dict.fromkeys((".html", ".xml", ".md", ".vue", ".svelte"), "<!--"),
}


def router(server: Server) -> APIRouter:
    routes = APIRouter()

    @routes.post("/infill")
    async def infill(request: Request) -> Response:
        body = await parse_body(request, InfillRequest)
        if body.n_predict == 0:
            return JSONResponse(_select(_empty(server), body.response_fields))
        prepared = await server.prepare(_prepare_infill, body)
        return await _respond(server, request, body, prepared)

    @routes.post("/completion")
    async def completion(request: Request) -> Response:
        body = await parse_body(request, LlamaCompletionRequest)
        if body.n_predict == 0:
            return JSONResponse(_select(_empty(server), body.response_fields))
        prepared = await server.prepare(_prepare_completion, body)
        return await _respond(server, request, body, prepared)

    return routes


# ----------------------------------------------------------------- building the job (in a worker thread)


def _settings(server: Server, body: LlamaCppRequest, max_tokens: int | None) -> SamplerSettings:
    seed = body.seed if body.seed is not None and body.seed >= 0 else None  # llama.cpp's -1: "random"
    return sampler_settings(server, {**body.sampler_values(), "max_new_tokens": max_tokens, "seed": seed}, NAMES)


def extra_context(extras: Sequence[InputExtra]) -> str:
    """The extra files as context before the prefix: each a comment line naming it, then its text."""
    parts = []
    for extra in extras:
        text = extra.text if not extra.text or extra.text.endswith("\n") else extra.text + "\n"
        parts.append(_file_header(extra.filename) + text if extra.filename else text)
    return "".join(parts)


def _file_header(filename: str) -> str:
    opener = COMMENTS.get(PurePosixPath(filename).suffix.lower(), "//")
    return f"{opener} {filename}{' -->' if opener == '<!--' else ''}\n"


def _prepare_infill(server: Server, body: InfillRequest) -> Prepared:
    hole = body.n_predict if body.n_predict is not None and body.n_predict > 0 else DEFAULT_HOLE_TOKENS
    prefix = extra_context(body.input_extra) + body.input_prefix + body.prompt
    settings = _settings(server, body, None)
    return prepare_fill(server, prefix, body.input_suffix, hole, settings, stop_strings(body.stop), NAMES)


def _prepare_completion(server: Server, body: LlamaCompletionRequest) -> Prepared:
    max_tokens = body.n_predict if body.n_predict is not None and body.n_predict > 0 else None
    settings = _settings(server, body, max_tokens)
    ids = text_ids(server, body.prompt)
    return prepare_generation(server, ids, settings, stop_strings(body.stop), NAMES, max_tokens)


# ----------------------------------------------------------------- responses


async def _respond(server: Server, request: Request, body: LlamaCppRequest, prepared: Prepared) -> Response:
    generation = Generation(server.engine, prepared, drafts=body.stream and body.drafts).submit()
    if body.stream:
        events = _stream(server, generation, prepared, body.response_fields)
        return JobStream(events, generation.job, "text/event-stream")
    text = await generation.collect(request)
    return JSONResponse(_select(_final(server, generation, prepared, text.content), body.response_fields))


def _empty(server: Server) -> dict[str, Any]:
    timings = {
        "prompt_n": 0,
        "prompt_ms": 0.0,
        "prompt_per_token_ms": 0.0,
        "prompt_per_second": 0.0,
        "predicted_n": 0,
        "predicted_ms": 0.0,
        "predicted_per_token_ms": 0.0,
        "predicted_per_second": 0.0,
    }
    return {
        "index": 0,
        "content": "",
        "tokens": [],
        "id_slot": 0,
        "stop": True,
        "model": server.model_name,
        "tokens_predicted": 0,
        "tokens_evaluated": 0,
        "truncated": False,
        "stop_type": "limit",
        "stopping_word": "",
        "tokens_cached": 0,
        "timings": timings,
    }


def _final(server: Server, generation: Generation, prepared: Prepared, content: str) -> dict[str, Any]:
    word = generation.stopping_word
    stop_type = "word" if word else "eos" if generation.finish_reason == "stop" else "limit"
    settings = {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in dataclasses.asdict(prepared.settings).items()
    }
    if prepared.slots is not None:
        settings["n_predict"] = generation.hole
    return {
        **_empty(server),
        "content": content,
        "tokens_predicted": generation.completion_tokens,
        "tokens_evaluated": generation.prompt_tokens,
        "generation_settings": settings,
        "has_new_line": "\n" in content,
        "stop_type": stop_type,
        "stopping_word": word or "",
        "tokens_cached": generation.cached_tokens,
        "timings": _timings(generation),
    }


def _timings(generation: Generation) -> dict[str, Any]:
    prompt_seconds, eval_seconds = generation.timings()
    prompt_n = generation.prompt_tokens - generation.cached_tokens
    predicted_n = generation.completion_tokens
    return {
        "prompt_n": prompt_n,
        "prompt_ms": prompt_seconds * 1000,
        "prompt_per_token_ms": prompt_seconds * 1000 / prompt_n if prompt_n else 0.0,
        "prompt_per_second": prompt_n / prompt_seconds if prompt_seconds > 0 else 0.0,
        "predicted_n": predicted_n,
        "predicted_ms": eval_seconds * 1000,
        "predicted_per_token_ms": eval_seconds * 1000 / predicted_n if predicted_n else 0.0,
        "predicted_per_second": predicted_n / eval_seconds if eval_seconds > 0 else 0.0,
    }


def _select(payload: dict[str, Any], fields: list[str] | None) -> dict[str, Any]:
    """llama.cpp's `response_fields`: only the fields named, each under its path (`"timings/prompt_n"`)."""
    if not fields:
        return payload
    selected = {}
    for path in fields:
        value: Any = payload
        for key in path.split("/"):
            if not isinstance(value, dict) or key not in value:
                break
            value = value[key]
        else:
            selected[path] = value
    return selected


async def _stream(
    server: Server, generation: Generation, prepared: Prepared, fields: list[str] | None
) -> AsyncIterator[bytes]:
    partial = {"index": 0, "tokens": [], "stop": False, "id_slot": 0}
    try:
        async for piece in generation.pieces():
            if isinstance(piece, Draft):
                yield sse({**partial, "content": "", "draft": draft_payload(piece)})
            elif piece.content:
                yield sse({**partial, "content": piece.content})
    except ApiError as error:
        yield sse({"error": {"code": error.status, "message": error.message, "type": "server_error"}})
        return
    yield sse(_select(_final(server, generation, prepared, ""), fields))
