"""The HTTP app of `dgemma serve`: OpenAI's, Ollama's and llama.cpp's APIs over one Engine.

Every request becomes a Job on the engine, which runs them canvas by canvas,
in turns or batched; the routes only translate. `Guard` stands in front of all of them
(Host, Origin, API key, body size); errors come out in each API's own shape.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from fastapi import FastAPI

from . import llamacpp_api, ollama_api, openai_api
from .engine import Engine
from .errors import install_error_handlers
from .guard import Guard
from .runs import Server

# Images come base64 in the body (4/3 of their size): 20 MiB takes a 15 MB photo.
DEFAULT_MAX_BODY_BYTES = 20 * 1024 * 1024


def create_app(
    engine: Engine,
    model_name: str,
    api_key: str | None = None,
    allowed_origins: Sequence[str] = (),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    hosts: Iterable[str] = (),
    allow_remote_images: bool = False,
    adapter: str | None = None,
) -> FastAPI:
    """The app serving `engine`'s model as `model_name`.

    `api_key`: required as `Authorization: Bearer KEY` on every route but /health.
    `allowed_origins`: web pages (their `Origin`) that may call it; "*" for any.
    `hosts`: names the server answers to besides 127.0.0.1, localhost and [::1] (its --host).
    `allow_remote_images`: fetch images given as http(s) URLs (else only data: URLs and base64 are taken).
    `adapter`: the LoRA adapter the model was loaded with, which /v1/models and /api/show name.
    """
    server = Server(engine, model_name, allow_remote_images=allow_remote_images, adapter=adapter)
    # No interactive docs: they would be one more thing a web page could reach.
    app = FastAPI(title="dgemma serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": server.model_name, **engine.load}

    app.include_router(openai_api.router(server))
    app.include_router(ollama_api.router(server))
    app.include_router(llamacpp_api.router(server))
    app.add_middleware(
        Guard, api_key=api_key, allowed_origins=tuple(allowed_origins), max_body_bytes=max_body_bytes, hosts=hosts
    )
    return app
