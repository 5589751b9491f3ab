"""`dgemma serve`'s HTTP layer, end to end: a real uvicorn server on 127.0.0.1 (a free port, in a thread) over a
tiny random-weight checkpoint, called as its clients call it (the `openai` package, plain HTTP)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from checkpoints import build_reference_model, save_reference_checkpoint
from tokenizer_fixture import write_tokenizer

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from mlx_dgemma.loader import load  # noqa: E402
from mlx_dgemma.serve.app import create_app  # noqa: E402
from mlx_dgemma.serve.engine import Engine, QueueFull  # noqa: E402

CONTEXT, CANVAS = 256, 16
FAST = {"steps": 4, "seed": 3}
KEY = "s3cret"
ORIGIN = "http://app.example"


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 at a free port, in a thread (no signal handlers there)."""

    def __init__(self, app):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve") / "tiny"
    save_reference_checkpoint(build_reference_model(canvas_length=CANVAS, max_position_embeddings=CONTEXT), path)
    write_tokenizer(path, vocab_size=384)
    return path


@pytest.fixture(scope="module")
def engine(model_dir) -> Iterator[Engine]:
    model, tokenizer = load(model_dir)
    engine = Engine(model, tokenizer, max_concurrent=2, max_queue=2)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def url(engine) -> Iterator[str]:
    with ServerThread(create_app(engine, "tiny", max_body_bytes=64 * 1024)) as server:
        yield server.url


@pytest.fixture(scope="module")
def guarded_url(engine) -> Iterator[str]:
    with ServerThread(create_app(engine, "tiny", api_key=KEY, allowed_origins=[ORIGIN])) as server:
        yield server.url


def sse_events(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


# ----------------------------------------------------------------- OpenAI


def test_openai_client_chat_and_stream(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, extra_body=FAST)
    assert reply.object == "chat.completion" and reply.choices[0].finish_reason in ("stop", "length")
    assert isinstance(reply.choices[0].message.content, str)
    usage = reply.usage
    assert usage.prompt_tokens > 0 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=FAST,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content  # same seed, same reply
    assert chunks[-1].usage.completion_tokens == usage.completion_tokens and not chunks[-1].choices


def test_completions_plain_fill_and_stop(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    plain = client.completions.create(model="tiny", prompt="def add(a, b):", max_tokens=20, extra_body=FAST)
    assert plain.object == "text_completion" and plain.usage.completion_tokens <= 20
    fill = client.completions.create(
        model="tiny", prompt="def add(a, b):\n    ", suffix="\n    return c\n", max_tokens=8, extra_body=FAST
    )
    assert fill.usage.completion_tokens <= 8 and isinstance(fill.choices[0].text, str)
    text = plain.choices[0].text
    if len(text) > 3:  # a stop string from the reply itself cuts it there
        stopped = client.completions.create(
            model="tiny", prompt="def add(a, b):", max_tokens=20, stop=[text[2:4]], extra_body=FAST
        )
        assert stopped.choices[0].text == text[: text.index(text[2:4])]
        assert stopped.choices[0].finish_reason == "stop"


def test_drafts_are_opt_in(url):
    body = {"prompt": "hello", "max_tokens": 16, "stream": True, **FAST}
    with httpx.stream("POST", f"{url}/v1/completions", json=body) as response:
        plain = sse_events(response)
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "drafts": True}) as response:
        drafted = sse_events(response)
    assert plain[-1] == drafted[-1] == "[DONE]"
    assert not any("draft" in e for e in plain[:-1])
    drafts = [e["draft"] for e in drafted[:-1] if "draft" in e]
    assert drafts and {"canvas", "step", "text"} <= set(drafts[0])


# ----------------------------------------------------------------- llama.cpp and Ollama


def test_llamacpp_infill(url):
    body = {
        "input_prefix": "x = 1\n",
        "input_suffix": "\nprint(y)\n",
        "input_extra": [{"filename": "util.py", "text": "def f(): pass"}],
        "n_predict": 8,
        **FAST,
        "response_fields": ["content", "timings/predicted_n"],
    }
    answer = httpx.post(f"{url}/infill", json=body).json()
    assert set(answer) == {"content", "timings/predicted_n"} and answer["timings/predicted_n"] <= 8
    full = httpx.post(f"{url}/infill", json={**body, "response_fields": None}).json()
    assert full["stop"] is True and full["content"] == answer["content"]
    assert httpx.post(f"{url}/infill", json={"input_extra": [], "n_predict": 0}).json()["content"] == ""


def test_ollama_generate_stream_and_chat(url):
    body = {"model": "tiny", "prompt": "Hi", "options": {"num_predict": 16, **FAST}}
    with httpx.stream("POST", f"{url}/api/generate", json=body) as response:
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert lines[-1]["done"] is True and lines[-1]["done_reason"] in ("stop", "length")
    assert lines[-1]["eval_count"] <= 16 and lines[-1]["prompt_eval_count"] > 0
    chat = httpx.post(
        f"{url}/api/chat",
        json={
            "model": "tiny:latest",
            "messages": [{"role": "user", "content": "Hi"}],
            "stream": False,
            "options": {"num_predict": 16, **FAST},
        },
    ).json()
    assert chat["done"] is True and chat["message"]["role"] == "assistant"
    assert httpx.get(f"{url}/api/tags").json()["models"][0]["name"] == "tiny"


# ----------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("path", "content", "status", "param"),
    [
        ("/v1/chat/completions", b"{not json", 400, None),
        ("/v1/chat/completions", b'{"messages": "hi"}', 400, "messages"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "9"}',
            400,
            "max_tokens",
        ),
        ("/v1/chat/completions", b'{"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}', 404, "model"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}', 400, "n"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "steps": 0}', 400, "steps"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4096}',
            400,
            "max_tokens",
        ),
        ("/v1/completions", b'{"prompt": "' + b"word " * 400 + b'"}', 400, "prompt"),
        ("/v1/completions", b'{"prompt": "a", "suffix": "b", "max_tokens": 1000}', 400, "max_tokens"),
        ("/v1/completions", b'{"prompt": "caf\xe9"}', 400, None),
        ("/v1/completions", b'{"prompt": "' + b"x" * 70000 + b'"}', 413, None),
    ],
)
def test_openai_errors(url, path, content, status, param):
    response = httpx.post(f"{url}{path}", content=content, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param


def test_other_families_errors_and_server_lives_on(url):
    ollama = httpx.post(f"{url}/api/generate", content=b'{"prompt": 3}')
    assert ollama.status_code == 400 and isinstance(ollama.json()["error"], str)
    llama = httpx.post(f"{url}/infill", content=b'{"n_predict": "x"}')
    assert llama.status_code == 400 and llama.json()["error"]["code"] == 400
    assert httpx.get(f"{url}/nothing").status_code == 404
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_host_origin_and_key(guarded_url):
    port = guarded_url.rsplit(":", 1)[1]
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{guarded_url}/health").status_code == 200
    assert httpx.get(f"{guarded_url}/v1/models").status_code == 401
    assert httpx.get(f"{guarded_url}/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert httpx.get(f"{guarded_url}/v1/models", headers=auth).status_code == 200
    assert httpx.get(f"{guarded_url}/v1/models", headers={**auth, "Host": f"localhost:{port}"}).status_code == 200
    assert httpx.get(f"{guarded_url}/v1/models", headers={**auth, "Host": f"evil.example:{port}"}).status_code == 403
    evil = httpx.get(f"{guarded_url}/v1/models", headers={**auth, "Origin": "http://evil.example"})
    assert evil.status_code == 403
    allowed = httpx.get(f"{guarded_url}/v1/models", headers={**auth, "Origin": ORIGIN})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN
    preflight = httpx.options(
        f"{guarded_url}/v1/chat/completions",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 204 and preflight.headers["access-control-allow-origin"] == ORIGIN


# ----------------------------------------------------------------- many clients


def test_disconnect_cancels_and_queue_full(url, engine, monkeypatch):
    jobs = []
    submit = engine.submit
    monkeypatch.setattr(engine, "submit", lambda job: jobs.append(job) or submit(job))
    body = {"prompt": "tell me", "suffix": "end", "max_tokens": CONTEXT - 4 * CANVAS, "stream": True, "drafts": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body) as response:
        next(response.iter_lines())
    deadline = time.monotonic() + 20
    while not jobs[-1].cancelled.is_set() or engine.load["active"] or engine.load["waiting"]:
        assert time.monotonic() < deadline, engine.load  # cancelled, the job goes at its next step
        time.sleep(0.05)

    def full(job):
        raise QueueFull("2 requests are waiting already")

    monkeypatch.setattr(engine, "submit", full)
    busy = httpx.post(f"{url}/v1/completions", json={"prompt": "hi"})
    assert busy.status_code == 429 and busy.json()["error"]["code"] == "rate_limit_exceeded"
    busy = httpx.post(f"{url}/api/generate", json={"prompt": "hi"})
    assert busy.status_code == 429 and "busy" in busy.json()["error"]
