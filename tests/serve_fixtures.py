"""Helpers for tests/test_serve.py: a live server in a thread, models with a gate or a script, stream parsers.

`LiveServer` runs an ASGI app under uvicorn on a loopback socket it binds
itself (no race for a free port). The model proxies wrap the tiny random model
for what random weights and timing cannot give on demand: `GatedModel` holds
the engine's worker at a known point (a request provably running when the next
arrives, a client gone before its job's next step, four requests provably in
flight together), and `ScriptedModel` makes the denoiser certain of a fixed
reply (thinking text, an answer, EOS), so what the server does with each is
checkable.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import weakref
from typing import Any

import httpx
import mlx.core as mx
import uvicorn


class LiveServer:
    """An ASGI app served by uvicorn on 127.0.0.1 in a background thread."""

    def __init__(self, app: Any):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        # A short graceful shutdown: a test that left a stream open must not hold the session's end.
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> LiveServer:
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), "the server to start")
        if not self.thread.is_alive():
            raise RuntimeError("the server stopped while starting (see the log above)")
        wait_until(self._healthy, "GET /health to answer 200")
        return self

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def wait_until(condition: Any, what: str, timeout: float = 60.0) -> None:
    """Poll `condition` until it holds; a generous deadline so that only a hang fails (no timing asserts)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {timeout:.0f} s")
        time.sleep(0.01)


# ---------------------------------------------------------------- model proxies


class _ModelProxy:
    """Everything as the wrapped model has it, except what a subclass overrides."""

    def __init__(self, model: Any):
        self._model = model

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


class GatedModel(_ModelProxy):
    """Encoding waits for `gate`: the engine's worker stops at a known point.

    hold="prompt" holds a request at its prompt; hold="canvas" lets prompts through (however many calls their
    encoding takes) and holds the request after its first committed canvas, when the canvas is appended to the
    cache (its client has text by then).
    """

    def __init__(self, model: Any, hold: str = "prompt"):
        super().__init__(model)
        self.hold = hold
        self.denoised = False
        self.gate = threading.Event()
        self.entered = threading.Event()  # the worker is held at the gate
        self.batch_sizes: list[int] = []  # rows of each decoder pass
        self.denoised_offsets: list[int] = []  # the cache's offset of each decoder pass
        self.held_offset: int | None = None  # the offset of the cache being encoded at the gate

    def denoise(self, canvas_ids: mx.array, cache: Any, *args: Any, **kwargs: Any) -> Any:
        self.denoised = True
        self.batch_sizes.append(canvas_ids.shape[0])
        self.denoised_offsets.append(cache.offset)
        return self._model.denoise(canvas_ids, cache, *args, **kwargs)

    def encode(self, input_ids: mx.array, cache: Any, *args: Any, **kwargs: Any) -> None:
        if self.hold == "prompt" or self.denoised:
            self.held_offset = cache.offset
            self.entered.set()
            self.gate.wait(timeout=60)
        return self._model.encode(input_ids, cache, *args, **kwargs)


class ScriptedModel(_ModelProxy):
    """Whatever the prompt, the denoiser is certain of `reply` (token ids), then pad.

    Each request's reply starts at its own cache's offset when it first denoises,
    so the script is followed canvas after canvas.
    """

    def __init__(self, model: Any, reply: list[int], pad: int):
        super().__init__(model)
        self.reply, self.pad = reply, pad
        self._starts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def denoise(self, canvas_ids: mx.array, cache: Any, self_conditioning_logits: mx.array | None = None) -> mx.array:
        batch, length = canvas_ids.shape
        start = self._starts.setdefault(cache, cache.offset)
        position = cache.offset - start
        tokens = [self._token(position + i) for i in range(length)]
        vocab = self._model.text_config.vocab_size
        # A margin far above any Gumbel draw: the scripted token is the only one ever drawn.
        logits = mx.eye(vocab)[mx.array(tokens)] * 60.0
        return mx.broadcast_to(logits[None], (batch, length, vocab)).astype(mx.float32)

    def _token(self, index: int) -> int:
        return self.reply[index] if index < len(self.reply) else self.pad


# ---------------------------------------------------------------- streams and error bodies


def sse_data(response: httpx.Response) -> list[str]:
    """The data fields of a server-sent event stream, in order ("[DONE]" included)."""
    return [line[len("data:") :].strip() for line in response.iter_lines() if line.startswith("data:")]


def ndjson(response: httpx.Response) -> list[dict[str, Any]]:
    """An NDJSON stream's objects, each line one JSON object."""
    return [json.loads(line) for line in response.iter_lines() if line.strip()]


def assert_openai_error(response: httpx.Response, statuses: tuple[int, ...] = (400,)) -> dict[str, Any]:
    """`response` is one of `statuses` with OpenAI's error body: {"error": {message, type, param, code}}."""
    assert response.status_code in statuses, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert {"message", "type", "param", "code"} <= set(error), body
    assert isinstance(error["message"], str) and error["message"], body
    assert isinstance(error["type"], str) and error["type"], body
    return error


def assert_ollama_error(response: httpx.Response, statuses: tuple[int, ...] = (400,)) -> str:
    """`response` is one of `statuses` with Ollama's error body: {"error": "..."}."""
    assert response.status_code in statuses, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
    return body["error"]


def assert_llamacpp_error(response: httpx.Response, statuses: tuple[int, ...] = (400,)) -> str:
    """`response` is one of `statuses` with a llama.cpp server's error body: {"error": {code, message, type}}."""
    assert response.status_code in statuses, (response.status_code, response.text)
    body = response.json()
    error = body["error"]
    assert isinstance(error, dict) and isinstance(error["message"], str) and error["message"], body
    return error["message"]


class BrokenModel(_ModelProxy):
    """The denoiser raises while `broken` is set (a failure inside generation, which must end only the requests
    it hits)."""

    def __init__(self, model: Any):
        super().__init__(model)
        self.broken = True

    def denoise(self, *args: Any, **kwargs: Any) -> Any:
        if self.broken:
            raise RuntimeError("the device went away\nin the middle of a step")
        return self._model.denoise(*args, **kwargs)
