"""`dgemma serve`: the model over HTTP, with OpenAI's, Ollama's and llama.cpp's APIs."""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Annotated

import typer

from .common import DEFAULT_MODEL, AdapterOption, ModelOption, load_checkpoint

GRACEFUL_SHUTDOWN_SECONDS = 3  # requests in flight at Ctrl-C get this long, then they are cancelled


HostOption = Annotated[
    str, typer.Option("--host", help="Address to listen on; 0.0.0.0 opens it to the network (use --api-key).")
]
PortOption = Annotated[int, typer.Option("--port", "-p", min=0, max=65535, help="Port (0: any free one).")]
ApiKeyOption = Annotated[
    str | None,
    typer.Option(
        "--api-key", envvar="DGEMMA_API_KEY", help="Require 'Authorization: Bearer KEY' (all routes but /health)."
    ),
]
AllowOriginOption = Annotated[
    list[str] | None,
    typer.Option(
        "--allow-origin",
        metavar="ORIGIN",
        help="A web page origin (https://app.example) allowed to call the server; repeatable; '*' for any.",
    ),
]
AllowRemoteImagesOption = Annotated[
    bool,
    typer.Option(
        "--allow-remote-images",
        help="Fetch images that requests give as http(s) URLs (at most 20 MiB, 10 s). Off by default: a client "
        "could make the server fetch any URL it can reach. data: URLs and base64 images are always taken.",
    ),
]
MaxConcurrentOption = Annotated[int, typer.Option("--max-concurrent", min=1, help="Requests generated at once.")]
MaxBatchOption = Annotated[
    int,
    typer.Option(
        "--max-batch",
        min=1,
        help="Running requests denoised together as one batch, joining and leaving at canvas boundaries; 1: they "
        "take turns canvas by canvas. More pays where a step is bound by memory rather than compute: measure "
        "with python -m bench serve.",
    ),
]
MaxQueueOption = Annotated[
    int, typer.Option("--max-queue", min=0, help="Requests that may wait beyond those; more get HTTP 429.")
]


def serve(
    model: ModelOption = DEFAULT_MODEL,
    host: HostOption = "127.0.0.1",
    port: PortOption = 8080,
    api_key: ApiKeyOption = None,
    allow_origin: AllowOriginOption = None,
    max_concurrent: MaxConcurrentOption = 4,
    max_batch: MaxBatchOption = 1,
    max_queue: MaxQueueOption = 16,
    allow_remote_images: AllowRemoteImagesOption = False,
    adapter: AdapterOption = None,
) -> None:
    """Serve the model over HTTP for editors, agents and scripts.

    OpenAI's /v1/chat/completions, /v1/completions (with suffix: fill-in-the-middle) and /v1/models;
    Ollama's /api/generate, /api/chat and /api/tags; llama.cpp's /infill and /completion; /health.
    Listens on 127.0.0.1 unless told otherwise. Example: dgemma serve --port 8080, then point an
    OpenAI client at http://127.0.0.1:8080/v1
    """
    import uvicorn  # the server's dependencies load only for this command

    from ..serve.app import create_app
    from ..serve.engine import Engine

    listener = _listen(host, port)
    try:
        loaded, tokenizer, path = load_checkpoint(model, {}, adapter=adapter)
        engine = Engine(loaded, tokenizer, max_concurrent=max_concurrent, max_queue=max_queue, max_batch=max_batch)
        warning = serving_memory_warning(path, max_concurrent, max_batch, engine.prompt_cache.entries)
        if warning:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
    except BaseException:
        listener.close()
        raise
    name = served_name(model)
    app = create_app(
        engine,
        name,
        api_key=api_key,
        allowed_origins=allow_origin or (),
        hosts=(host,),
        allow_remote_images=allow_remote_images,
        adapter=str(adapter) if adapter is not None else None,
    )
    config = uvicorn.Config(
        app, log_level="warning", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS, access_log=False
    )
    listener.listen(socket.SOMAXCONN)  # connections made from here on wait for uvicorn instead of failing
    with_adapter = f" with the adapter {adapter}" if adapter is not None else ""
    print(f"serving {name}{with_adapter} on http://{_url_host(host)}:{listener.getsockname()[1]}", flush=True)
    try:
        uvicorn.Server(config).run(sockets=[listener])
    except KeyboardInterrupt:
        pass  # uvicorn has shut down already; it re-raises the signal on its way out
    finally:
        engine.close()
        listener.close()
    print("stopped", file=sys.stderr)


def served_name(model: str) -> str:
    """What clients call the model: a checkpoint directory's name, or the repo id as given."""
    path = Path(model).expanduser()
    return path.resolve().name if path.exists() else model


def _listen(host: str, port: int) -> socket.socket:
    """A bound socket (before loading, so a port in use is one error line at once, not after the load)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        listener = socket.socket(family, kind, proto)
    except OSError as error:
        raise OSError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
    except OSError as error:
        listener.close()
        raise OSError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    listener.set_inheritable(True)
    return listener


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def serving_memory_warning(path: Path, max_concurrent: int, max_batch: int, kept_prompts: int) -> str | None:
    """What to say when serving at these settings may not fit this machine's memory (None: it fits). The check
    before loading counts one request; a server holds `max_concurrent` requests' caches and `kept_prompts`
    prompt caches, and denoises up to `max_batch` canvases at once."""
    from ..config import ModelConfig
    from ..memory import DEFAULT_CONTEXT, available_memory, estimate_memory, format_bytes

    context = min(DEFAULT_CONTEXT, ModelConfig.from_path(path).text.max_position_embeddings)
    estimate = estimate_memory(path, context, caches=max_concurrent + kept_prompts, rows=max_batch)
    available, source = available_memory()
    if estimate.total <= available:
        return None
    return (
        f"{max_concurrent} requests at once (up to {max_batch} as one batch) with {context}-token prompts, and "
        f"{kept_prompts} prompts kept for reuse, may need about {format_bytes(estimate.total)}, more than this "
        f"machine's {format_bytes(available)} ({source}); lower --max-concurrent or --max-batch if requests fail "
        "for lack of memory"
    )
