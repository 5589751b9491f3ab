"""`dgemma serve`, end to end: a live server on loopback driven by the clients people use.

A tiny random checkpoint is served by uvicorn in a thread (tests/serve_fixtures.py):
the official `openai` package for the OpenAI routes, httpx for llama.cpp's
/infill, the Ollama routes, the safety checks and every bad request. Answers
are checked against the library (`generate`, `infill`) with the same seed: a
request's randomness is its own, so the server must give what the library gives,
whoever else it serves. Random weights write gibberish; for thinking text and
EOS, `ScriptedModel` makes the denoiser certain of a known reply.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest
from checkpoints import build_reference_model, save_reference_checkpoint
from serve_fixtures import (
    BrokenModel,
    GatedModel,
    LiveServer,
    ScriptedModel,
    assert_llamacpp_error,
    assert_ollama_error,
    assert_openai_error,
    ndjson,
    sse_data,
    wait_until,
)
from tokenizer_fixture import write_tokenizer

import mlx_dgemma
from mlx_dgemma import generate, infill
from mlx_dgemma.generate import prompt_tokens
from mlx_dgemma.serve.app import create_app
from mlx_dgemma.serve.engine import Engine
from mlx_dgemma.tokenizer import encode_text, render_chat

MODEL = "dgemma-test"
CONTEXT = 256  # small, so "beyond the context" is cheap
CANVAS = 16
STEPS = 3  # few denoising steps: fast, and still more than one draft per canvas
KEY = "test-key-123"
ALLOWED_ORIGIN = "http://allowed.example"
BODY_LIMIT = 64 * 1024
SAMPLER = {"steps": STEPS}  # our sampler settings ride along as extra fields
HELLO = [{"role": "user", "content": "Say hello to the sea."}]
FIM_PREFIX, FIM_SUFFIX = "def add(a, b):\n    return ", "\n\nprint(add(2, 3))\n"
# The scripted model's reply: a thought, then the answer, then EOS.
THOUGHT, ANSWER = "I ponder.", "Hi there, friend."


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve") / "hf"
    save_reference_checkpoint(build_reference_model(canvas_length=CANVAS, max_position_embeddings=CONTEXT), path)
    write_tokenizer(path, vocab_size=384)
    return path


@pytest.fixture(scope="session")
def loaded(model_dir):
    return mlx_dgemma.load(model_dir)


@pytest.fixture(scope="session")
def engine(loaded):
    engine = Engine(*loaded, max_concurrent=4, max_queue=16)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def server(engine):
    app = create_app(engine, MODEL, allowed_origins=(ALLOWED_ORIGIN,), max_body_bytes=BODY_LIMIT)
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="session")
def keyed_server(engine):
    """The same engine behind a second app that wants an API key."""
    with LiveServer(create_app(engine, MODEL, api_key=KEY)) as live:
        yield live


@pytest.fixture(scope="session")
def scripted_server(loaded):
    model, tokenizer = loaded
    reply = [
        tokenizer.convert_tokens_to_ids("<|channel>"),
        *encode_text(tokenizer, f"thought\n{THOUGHT}"),
        tokenizer.convert_tokens_to_ids("<channel|>"),
        *encode_text(tokenizer, ANSWER),
        tokenizer.eos_token_id,
    ]
    engine = Engine(ScriptedModel(model, reply, pad=tokenizer.pad_token_id), tokenizer)
    with LiveServer(create_app(engine, MODEL)) as live:
        yield live
    engine.close()


@pytest.fixture()
def client(server) -> openai.OpenAI:
    # No retries: a 429 or 5xx must show, not be retried away.
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as session:
        yield session


def chat(client: openai.OpenAI, messages=HELLO, seed: int = 1, max_tokens: int = 32, **extra):
    return client.chat.completions.create(
        model=MODEL, messages=messages, seed=seed, max_tokens=max_tokens, extra_body={**SAMPLER, **extra}
    )


def library_reply(loaded, messages, seed: int, max_tokens: int):
    model, tokenizer = loaded
    return generate(model, tokenizer, messages, steps=STEPS, seed=seed, max_new_tokens=max_tokens)


def library_fill(loaded, prefix: str, suffix: str, hole: int, seed: int) -> str:
    model, tokenizer = loaded
    return infill(model, tokenizer, prefix, suffix, hole, steps=STEPS, seed=seed).fills[0]


def assert_serving(url: str) -> None:
    """The server still answers after whatever the test did to it."""
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200


# ---------------------------------------------------------------- OpenAI routes through the openai package


def test_health_and_models(server, client, http):
    assert http.get("/health").status_code == 200
    models = client.models.list()
    assert [model.id for model in models.data] == [MODEL]
    assert models.data[0].object == "model"


def test_chat_answers_as_the_library_does(client, loaded):
    response = chat(client, seed=5, max_tokens=32)
    expected = library_reply(loaded, HELLO, seed=5, max_tokens=32)
    assert response.object == "chat.completion"
    assert response.model == MODEL
    (choice,) = response.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    usage = response.usage
    assert usage.prompt_tokens > 0
    assert usage.completion_tokens == len(expected.tokens)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_stream_assembles_the_same_answer(client):
    whole = chat(client, seed=7, max_tokens=40)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        seed=7,
        max_tokens=40,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=SAMPLER,
    )
    chunks = list(stream)  # the client ends the iteration at [DONE]
    assert chunks and all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk.id for chunk in chunks}) == 1
    assert all(chunk.model == MODEL for chunk in chunks)
    deltas = [chunk.choices[0] for chunk in chunks if chunk.choices]
    assert "".join(choice.delta.content or "" for choice in deltas) == whole.choices[0].message.content
    assert [choice.finish_reason for choice in deltas if choice.finish_reason] == [whole.choices[0].finish_reason]
    # include_usage: one last chunk with no choices and the usage.
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens

    plain = list(
        client.chat.completions.create(
            model=MODEL, messages=HELLO, seed=7, max_tokens=40, stream=True, extra_body=SAMPLER
        )
    )
    assert all(chunk.usage is None for chunk in plain)  # usage only when asked for
    assert "".join(c.choices[0].delta.content or "" for c in plain if c.choices) == whole.choices[0].message.content


def test_chat_text_parts_and_max_completion_tokens(client):
    """Content as a list of text parts reads as the joined string; max_completion_tokens is max_tokens."""
    expected = chat(client, seed=9, max_tokens=24).choices[0].message.content
    parts = [{"role": "user", "content": [{"type": "text", "text": HELLO[0]["content"]}]}]
    assert chat(client, messages=parts, seed=9, max_tokens=24).choices[0].message.content == expected
    response = client.chat.completions.create(
        model=MODEL, messages=HELLO, seed=9, max_completion_tokens=24, extra_body=SAMPLER
    )
    assert response.choices[0].message.content == expected
    assert response.usage.completion_tokens <= 24


def test_chat_accepts_common_openai_fields(client):
    """Editors send temperature, top_p, user and penalties whatever the server: they must not be refused."""
    response = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}, *HELLO],
        seed=3,
        max_tokens=16,
        temperature=0.7,
        top_p=0.9,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        user="someone",
        extra_body=SAMPLER,
    )
    assert isinstance(response.choices[0].message.content, str)


def test_thinking_comes_as_reasoning_content(scripted_server):
    scripted = openai.OpenAI(base_url=f"{scripted_server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    response = chat(scripted, max_tokens=64)
    message = response.choices[0].message
    assert message.content == ANSWER
    assert getattr(message, "reasoning_content", None) == THOUGHT
    assert response.choices[0].finish_reason == "stop"  # EOS, before max_tokens

    stream = scripted.chat.completions.create(
        model=MODEL, messages=HELLO, seed=1, max_tokens=64, stream=True, extra_body=SAMPLER
    )
    deltas = [chunk.choices[0].delta for chunk in stream if chunk.choices]
    assert "".join(delta.content or "" for delta in deltas) == ANSWER
    assert "".join(getattr(delta, "reasoning_content", None) or "" for delta in deltas) == THOUGHT


def test_stop_sequences(scripted_server):
    scripted = openai.OpenAI(base_url=f"{scripted_server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    response = scripted.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=64, stop=[","], extra_body=SAMPLER
    )
    assert response.choices[0].message.content == ANSWER.split(",")[0]
    assert response.choices[0].finish_reason == "stop"
    stream = scripted.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=64, stop=", f", stream=True, extra_body=SAMPLER
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == ANSWER.split(",")[0]


def test_drafts_only_when_asked(http):
    """Plain streams carry committed text only; "drafts": true adds each denoising step's draft."""
    body = {"model": MODEL, "messages": HELLO, "seed": 4, "max_tokens": 32, "stream": True, **SAMPLER}

    def stream(**extra) -> list[str]:
        with http.stream("POST", "/v1/chat/completions", json={**body, **extra}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            return sse_data(response)

    def content(data: list[str]) -> str:
        chunks = [json.loads(item) for item in data[:-1]]
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))

    plain, with_drafts = stream(), stream(drafts=True)
    assert plain[-1] == with_drafts[-1] == "[DONE]"
    # 2 canvases of up to STEPS drafts each: more events, the same committed text.
    assert len(with_drafts) > len(plain)
    assert content(with_drafts) == content(plain)
    assert all(json.loads(item) for item in with_drafts[:-1])  # every event but [DONE] is a JSON object


def test_completions_fill_in_the_middle(client, loaded):
    """With a suffix, /v1/completions fills the hole (max_tokens its size): what the library's infill gives."""
    expected = library_fill(loaded, FIM_PREFIX, FIM_SUFFIX, hole=12, seed=2)
    response = client.completions.create(
        model=MODEL, prompt=FIM_PREFIX, suffix=FIM_SUFFIX, max_tokens=12, seed=2, extra_body=SAMPLER
    )
    assert response.object == "text_completion"
    assert response.choices[0].text == expected
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens

    stream = client.completions.create(
        model=MODEL, prompt=FIM_PREFIX, suffix=FIM_SUFFIX, max_tokens=12, seed=2, stream=True, extra_body=SAMPLER
    )
    chunks = list(stream)
    assert chunks and all(chunk.object == "text_completion" for chunk in chunks)
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == expected


def test_completions_without_suffix(client):
    whole = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=20, seed=6, extra_body=SAMPLER)
    text = whole.choices[0].text
    assert isinstance(text, str) and whole.usage.completion_tokens <= 20
    stream = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=20, seed=6, stream=True, extra_body=SAMPLER
    )
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == text


# ---------------------------------------------------------------- llama.cpp and Ollama routes through httpx


def test_infill_llama_cpp(http, loaded):
    request = {"input_prefix": FIM_PREFIX, "input_suffix": FIM_SUFFIX, "n_predict": 12, "seed": 2, **SAMPLER}
    response = http.post("/infill", json=request)
    assert response.status_code == 200, response.text
    assert response.json()["content"] == library_fill(loaded, FIM_PREFIX, FIM_SUFFIX, hole=12, seed=2)

    # Other files and text already typed in the hole: still one fill, the same for the same request.
    extra = {
        **request,
        "input_extra": [{"filename": "util.py", "text": "def sub(a, b):\n    return a - b\n"}],
        "prompt": "a",
    }
    first, second = http.post("/infill", json=extra), http.post("/infill", json=extra)
    assert first.status_code == 200, first.text
    assert isinstance(first.json()["content"], str)
    assert first.json()["content"] == second.json()["content"]


def test_ollama_generate(http):
    body = {"model": MODEL, "prompt": "Once upon a time", "options": {"seed": 8, "num_predict": 24, **SAMPLER}}
    with http.stream("POST", "/api/generate", json=body) as response:  # streams by default
        assert response.status_code == 200
        lines = ndjson(response)
    assert all(line["model"] == MODEL for line in lines)
    assert [line["done"] for line in lines] == [False] * (len(lines) - 1) + [True]
    whole = http.post("/api/generate", json={**body, "stream": False})
    assert whole.status_code == 200, whole.text
    assert whole.json()["done"] is True
    assert "".join(line["response"] for line in lines) == whole.json()["response"]


def test_ollama_generate_with_suffix(http, loaded):
    body = {
        "model": MODEL,
        "prompt": FIM_PREFIX,
        "suffix": FIM_SUFFIX,
        "stream": False,
        "options": {"seed": 2, "num_predict": 12, **SAMPLER},
    }
    response = http.post("/api/generate", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["response"] == library_fill(loaded, FIM_PREFIX, FIM_SUFFIX, hole=12, seed=2)


def test_ollama_chat(http, loaded):
    body = {"model": MODEL, "messages": HELLO, "options": {"seed": 5, "num_predict": 32, **SAMPLER}}
    with http.stream("POST", "/api/chat", json=body) as response:
        assert response.status_code == 200
        lines = ndjson(response)
    assert [line["done"] for line in lines] == [False] * (len(lines) - 1) + [True]
    assert all(line["message"]["role"] == "assistant" for line in lines if "message" in line)
    streamed = "".join(line.get("message", {}).get("content", "") for line in lines)
    assert streamed == library_reply(loaded, HELLO, seed=5, max_tokens=32).text
    whole = http.post("/api/chat", json={**body, "stream": False}).json()
    assert whole["done"] is True and whole["message"]["content"] == streamed


def test_ollama_tags(http):
    response = http.get("/api/tags")
    assert response.status_code == 200
    assert [model["name"] for model in response.json()["models"]] == [MODEL]


# ---------------------------------------------------------------- bad requests: 400 with the route's error body


LONG = "many words " * 200  # beyond the 256-token context
OPENAI_CHAT = "/v1/chat/completions"
BAD_REQUESTS = {
    "malformed JSON": (OPENAI_CHAT, b'{"messages": [', (400,)),
    "not an object": (OPENAI_CHAT, [1, 2], (400,)),
    "no messages": (OPENAI_CHAT, {"model": MODEL}, (400,)),
    "messages not a list": (OPENAI_CHAT, {"model": MODEL, "messages": "hi"}, (400,)),
    "empty messages": (OPENAI_CHAT, {"model": MODEL, "messages": []}, (400,)),
    "content mistyped": (OPENAI_CHAT, {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, (400,)),
    "max_tokens mistyped": (OPENAI_CHAT, {"model": MODEL, "messages": HELLO, "max_tokens": "ten"}, (400,)),
    "unknown model": (OPENAI_CHAT, {"model": "no-such-model", "messages": HELLO}, (400, 404)),
    "steps 0": (OPENAI_CHAT, {"model": MODEL, "messages": HELLO, "steps": 0}, (400,)),
    "max_tokens -1": (OPENAI_CHAT, {"model": MODEL, "messages": HELLO, "max_tokens": -1}, (400,)),
    "entropy_bound -1": (OPENAI_CHAT, {"model": MODEL, "messages": HELLO, "entropy_bound": -1}, (400,)),
    "n 2": (OPENAI_CHAT, {"model": MODEL, "messages": HELLO, "n": 2}, (400,)),
    "logprobs": (OPENAI_CHAT, {"model": MODEL, "messages": HELLO, "logprobs": True}, (400,)),
    "prompt beyond the context": (
        OPENAI_CHAT,
        {"model": MODEL, "messages": [{"role": "user", "content": LONG}], **SAMPLER},
        (400,),
    ),
    "not UTF-8": (
        OPENAI_CHAT,
        b'{"model": "dgemma-test", "messages": [{"role": "user", "content": "caf\xe9"}]}',
        (400,),
    ),
    "completion without prompt": ("/v1/completions", {"model": MODEL}, (400,)),
    "completion max_tokens 0": ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, (400,)),
    "hole beyond the context": (
        "/v1/completions",
        {"model": MODEL, "prompt": "x = ", "suffix": "\n", "max_tokens": 1000, **SAMPLER},
        (400,),
    ),
}
BAD_INFILL = {
    "malformed JSON": b"{",
    "input_extra mistyped": {"input_prefix": "a", "input_suffix": "b", "input_extra": "util.py"},
    "hole beyond the context": {"input_prefix": "a", "input_suffix": "b", "n_predict": 1000},
}
BAD_OLLAMA = {
    "malformed JSON": ("/api/generate", b"{"),
    "prompt mistyped": ("/api/generate", {"model": MODEL, "prompt": 5}),
    "messages mistyped": ("/api/chat", {"model": MODEL, "messages": "hi"}),
    "prompt beyond the context": ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": LONG}]}),
    "hole beyond the context": (
        "/api/generate",
        {"model": MODEL, "prompt": "a", "suffix": "b", "options": {"num_predict": 1000}},
    ),
}


def post(http: httpx.Client, path: str, body) -> httpx.Response:
    if isinstance(body, bytes):
        return http.post(path, content=body, headers={"content-type": "application/json"})
    return http.post(path, json=body)


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_openai_request(server, http, case):
    path, body, statuses = BAD_REQUESTS[case]
    assert_openai_error(post(http, path, body), statuses)
    assert_serving(server.url)


@pytest.mark.parametrize("case", BAD_INFILL)
def test_bad_infill_request(server, http, case):
    assert_llamacpp_error(post(http, "/infill", BAD_INFILL[case]))
    assert_serving(server.url)


@pytest.mark.parametrize("case", BAD_OLLAMA)
def test_bad_ollama_request(server, http, case):
    path, body = BAD_OLLAMA[case]
    assert_ollama_error(post(http, path, body))
    assert_serving(server.url)


def test_unknown_ollama_model(http):
    assert_ollama_error(http.post("/api/chat", json={"model": "nope", "messages": HELLO}), (400, 404))


# ---------------------------------------------------------------- many clients


@pytest.mark.parametrize("max_batch", [1, 4])
def test_four_clients_at_once_each_get_what_they_get_alone(server, loaded, max_batch):
    """Taking turns canvas by canvas or denoised together in one batch, each request's answer is its own seed's,
    not its neighbours'."""
    requests = [
        ("/v1/chat/completions", {"model": MODEL, "messages": HELLO, "seed": 21, "max_tokens": 48, **SAMPLER}),
        (
            "/v1/chat/completions",
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "Count to ten."}],
                "seed": 22,
                "max_tokens": 64,
                "stream": True,
                **SAMPLER,
            },
        ),
        (
            "/v1/completions",
            {"model": MODEL, "prompt": FIM_PREFIX, "suffix": FIM_SUFFIX, "seed": 23, "max_tokens": 20, **SAMPLER},
        ),
        (
            "/api/generate",
            {
                "model": MODEL,
                "prompt": "Tell a tale.",
                "stream": False,
                "options": {"seed": 24, "num_predict": 40, **SAMPLER},
            },
        ),
    ]

    async def one(session: httpx.AsyncClient, path: str, body: dict) -> str:
        if not body.get("stream"):
            response = await session.post(path, json=body)
            assert response.status_code == 200, response.text
            data = response.json()
            if "response" in data:
                return data["response"]
            choice = data["choices"][0]
            return choice["message"]["content"] if "message" in choice else choice["text"]
        text = ""
        async with session.stream("POST", path, json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data:") and line != "data: [DONE]":
                    chunk = json.loads(line[len("data:") :])
                    text += "".join(choice["delta"].get("content") or "" for choice in chunk["choices"])
        return text

    async def alone() -> list[str]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as session:
            return [await one(session, path, body) for path, body in requests]

    # Together on an engine held until all four are in (and sharing batches when they may).
    model, tokenizer = loaded
    gated = GatedModel(model)
    engine = Engine(gated, tokenizer, max_concurrent=4, max_batch=max_batch)
    submitted = []
    submit = engine.submit
    engine.submit = lambda job: submitted.append(job) or submit(job)

    async def together(url: str) -> list[str]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as session:
            replies = asyncio.gather(*(one(session, path, body) for path, body in requests))
            for _ in range(6000):
                if len(submitted) == len(requests):
                    break
                await asyncio.sleep(0.01)
            gated.gate.set()
            return list(await replies)

    solo = asyncio.run(alone())
    try:
        with LiveServer(create_app(engine, MODEL)) as live:
            assert asyncio.run(together(live.url)) == solo
    finally:
        gated.gate.set()
        engine.close()
    assert len(submitted) == len(requests)
    assert max(gated.batch_sizes) == max_batch, gated.batch_sizes


def test_clients_that_disconnect_are_dropped(loaded):
    """A request whose client left is dropped at its next step (streamed or not); the others finish."""
    model, tokenizer = loaded
    gated = GatedModel(model, hold="canvas")  # the first request is held after its first canvas
    engine = Engine(gated, tokenizer, max_concurrent=4, max_queue=4)
    jobs = []
    submit = engine.submit

    def recording_submit(job):
        # What the worker emits for each job, to tell a dropped request from one that ran to its end.
        kinds, emit = [], job._emit
        job._emit = lambda event: (kinds.append(type(event).__name__), emit(event))
        jobs.append((job, kinds))
        return submit(job)

    engine.submit = recording_submit
    body = {"model": MODEL, "messages": HELLO, "seed": 1, "max_tokens": 64, **SAMPLER}
    try:
        with LiveServer(create_app(engine, MODEL)) as live:
            with httpx.Client(base_url=live.url, timeout=60) as leaving:
                with leaving.stream("POST", OPENAI_CHAT, json={**body, "stream": True}) as response:
                    assert response.status_code == 200
                    # Held in a name: an abandoned line iterator would close the connection at once.
                    lines = response.iter_lines()
                    for line in lines:  # hang up once committed text came and the worker is held
                        if line.startswith("data:") and json.loads(line[5:])["choices"][0]["delta"].get("content"):
                            break
                    wait_until(gated.entered.is_set, "the first request to reach the gate")

            # A client of a reply that is not streamed leaves before its answer.
            payload = json.dumps(body).encode()
            head = f"POST {OPENAI_CHAT} HTTP/1.1\r\nHost: 127.0.0.1:{live.port}\r\n"
            head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
            with socket.create_connection(("127.0.0.1", live.port)) as raw:
                raw.sendall(head.encode() + payload)
                wait_until(lambda: len(jobs) == 2, "the second request to be queued")

            neighbour: dict[str, httpx.Response] = {}
            url = f"{live.url}{OPENAI_CHAT}"
            thread = threading.Thread(target=lambda: neighbour.update(response=httpx.post(url, json=body, timeout=60)))
            thread.start()
            wait_until(lambda: len(jobs) == 3, "the third request to be queued")
            wait_until(lambda: jobs[0][0].cancelled.is_set() and jobs[1][0].cancelled.is_set(), "cancellations")
            gated.gate.set()
            thread.join(timeout=60)
            assert neighbour["response"].status_code == 200, neighbour["response"].text
            wait_until(lambda: engine.load == {"active": 0, "waiting": 0}, "the engine to be idle")
            (_, streamed), (_, whole), (_, served) = jobs
            assert "Commit" in streamed and "Done" not in streamed, streamed
            assert "Done" not in whole, whole
            assert "Done" in served, served
            assert_serving(live.url)
    finally:
        gated.gate.set()
        engine.close()


def test_an_infill_behind_a_long_reply_is_answered_after_its_own_canvas(loaded):
    """A fill-in-the-middle request arriving while a long reply runs gets its holes when its canvas is done, not
    after another of the reply's canvases (its canvas is shorter than the reply's: the two do not share a batch)."""
    model, tokenizer = loaded
    reply = encode_text(tokenizer, " and the sea said hello back" * 8)[: 3 * CANVAS]  # no EOS: three canvases
    gated = GatedModel(ScriptedModel(model, reply, pad=tokenizer.pad_token_id), hold="canvas")
    engine = Engine(gated, tokenizer, max_concurrent=4, max_queue=4)
    assert len(reply) == 3 * CANVAS
    events: list[tuple[int, str]] = []  # (job, event) in the order the worker emits them
    jobs, submit = [], engine.submit

    def recording_submit(job):
        index, emit = len(jobs), job._emit
        jobs.append(job)
        job._emit = lambda event: (events.append((index, type(event).__name__)), emit(event))
        return submit(job)

    engine.submit = recording_submit
    try:
        with LiveServer(create_app(engine, MODEL)) as live:
            long_body = {"model": MODEL, "messages": HELLO, "seed": 1, "max_tokens": 3 * CANVAS, **SAMPLER}
            url = f"{live.url}{OPENAI_CHAT}"
            long_reply = threading.Thread(target=lambda: httpx.post(url, json=long_body, timeout=60))
            long_reply.start()
            wait_until(gated.entered.is_set, "the reply to be held after its first canvas")
            fill_body = {"model": MODEL, "prompt": FIM_PREFIX, "suffix": FIM_SUFFIX, "max_tokens": 4, **SAMPLER}
            answers: dict[str, httpx.Response] = {}
            fill_url = f"{live.url}/v1/completions"

            def post_fill() -> None:
                answers.update(fill=httpx.post(fill_url, json=fill_body, timeout=60))

            fill = threading.Thread(target=post_fill)
            fill.start()
            wait_until(lambda: engine.load["waiting"] == 1, "the infill to be queued")
            gated.gate.set()
            fill.join(timeout=60)
            long_reply.join(timeout=60)
            assert answers["fill"].status_code == 200, answers["fill"].text
            reply_commits = [at for at, (job, kind) in enumerate(events) if job == 0 and kind == "Commit"]
            fill_done = next(at for at, (job, kind) in enumerate(events) if job == 1 and kind == "FillDone")
            assert len(reply_commits) == 3, events
            # The reply was appending its first canvas to its cache when the infill came; its second waits for the
            # infill's canvas.
            assert reply_commits[0] < fill_done < reply_commits[1], events
    finally:
        gated.gate.set()
        engine.close()


def test_queue_full_is_429_at_once(loaded):
    """With one request running and no room to wait, the next is refused at once (and later ones served)."""
    model, tokenizer = loaded
    gated = GatedModel(model)
    engine = Engine(gated, tokenizer, max_concurrent=1, max_queue=0)
    body = {"model": MODEL, "messages": HELLO, "seed": 1, "max_tokens": 16, **SAMPLER}
    first: dict[str, httpx.Response] = {}
    try:
        with LiveServer(create_app(engine, MODEL)) as live:
            url = f"{live.url}/v1/chat/completions"
            thread = threading.Thread(target=lambda: first.update(response=httpx.post(url, json=body, timeout=60)))
            thread.start()
            wait_until(gated.entered.is_set, "the first request to run")
            assert_openai_error(httpx.post(url, json=body, timeout=60), (429,))
            ollama = httpx.post(f"{live.url}/api/chat", json={"model": MODEL, "messages": HELLO}, timeout=60)
            assert_ollama_error(ollama, (429,))
            gated.gate.set()
            thread.join(timeout=60)
            assert first["response"].status_code == 200, first["response"].text
            assert httpx.post(url, json=body, timeout=60).status_code == 200
    finally:
        gated.gate.set()
        engine.close()


def test_prompt_cache_reuse(server, engine, loaded, monkeypatch):
    """A prompt that extends an earlier one reuses its encoder cache, and answers as a fresh server does."""
    model, tokenizer = loaded
    reused = []
    longest_prefix = engine.prompt_cache.longest_prefix

    def spy(ids):
        found = longest_prefix(ids)
        reused.append(found[0])
        return found

    monkeypatch.setattr(engine.prompt_cache, "longest_prefix", spy)
    first = "The lighthouse keeper counted the ships that passed"
    second = first + " in the night, and wrote each name down."
    assert encode_text(tokenizer, second)[: len(encode_text(tokenizer, first))] == encode_text(tokenizer, first)
    # With thinking on, the template's generation prompt is the start of the next turn's history (with it off,
    # an empty thought channel ends the prompt, and the next turn's history has none: no prefix to reuse).
    thinking = {"chat_template_kwargs": {"enable_thinking": True}}
    follow_up = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one."},
    ]

    def ask(url: str) -> list:
        session = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        completion = session.completions.create(model=MODEL, prompt=second, max_tokens=16, seed=12, extra_body=SAMPLER)
        reply = chat(session, messages=follow_up, seed=13, max_tokens=16, **thinking)
        return [completion, reply]

    session = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    session.completions.create(model=MODEL, prompt=first, max_tokens=16, seed=11, extra_body=SAMPLER)
    chat(session, messages=follow_up[:1], seed=11, max_tokens=16, **thinking)
    reused.clear()
    completion, reply = ask(server.url)
    first_chat = prompt_tokens(tokenizer, follow_up[:1], True, model.text_config.vocab_size)
    assert reused[0] >= len(encode_text(tokenizer, first)), reused
    assert reused[1] >= len(first_chat), reused
    # OpenAI's field for it: the prompt tokens that came from the cache.
    assert [completion.usage.prompt_tokens_details.cached_tokens, reply.usage.prompt_tokens_details.cached_tokens] == (
        reused
    )

    fresh_engine = Engine(model, tokenizer)
    try:
        with LiveServer(create_app(fresh_engine, MODEL)) as fresh:
            fresh_completion, fresh_reply = ask(fresh.url)
    finally:
        fresh_engine.close()
    assert fresh_completion.choices[0].text == completion.choices[0].text
    assert fresh_reply.choices[0].message == reply.choices[0].message
    assert fresh_completion.usage.prompt_tokens_details.cached_tokens == 0


def test_the_next_chat_turn_reuses_the_history_with_thinking_off(server, engine, loaded, monkeypatch):
    """With thinking off the prompt ends in an empty thought channel that the next turn's history lacks, so the
    server keeps the cache of the history before the generation prompt too, and the next turn extends that."""
    _, tokenizer = loaded
    reused = []
    longest_prefix = engine.prompt_cache.longest_prefix

    def spy(ids):
        found = longest_prefix(ids)
        reused.append(found[0])
        return found

    monkeypatch.setattr(engine.prompt_cache, "longest_prefix", spy)
    turns = [
        {"role": "user", "content": "Name a river of Europe."},
        {"role": "assistant", "content": "The Danube."},
        {"role": "user", "content": "And one of Africa?"},
    ]
    session = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    chat(session, messages=turns[:1], seed=21, max_tokens=16)
    reply = chat(session, messages=turns, seed=22, max_tokens=16)
    history = render_chat(tokenizer, turns[:1], add_generation_prompt=False, thinking=False)
    assert reused[-1] == len(encode_text(tokenizer, history)) > 0
    assert reply.usage.prompt_tokens_details.cached_tokens == reused[-1]


# ---------------------------------------------------------------- safety


def test_api_key(keyed_server):
    url = f"{keyed_server.url}/v1/chat/completions"
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 16, **SAMPLER}
    assert_openai_error(httpx.post(url, json=body), (401,))
    assert_openai_error(httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}), (401,))
    assert_openai_error(httpx.get(f"{keyed_server.url}/v1/models"), (401,))
    keyed = openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key=KEY, max_retries=0, timeout=60)
    assert keyed.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, extra_body=SAMPLER).choices
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_cross_origin(http):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 16, **SAMPLER}
    refused = http.post(OPENAI_CHAT, json=body, headers={"Origin": "http://evil.example"})
    assert_openai_error(refused, (403,))
    assert "access-control-allow-origin" not in refused.headers

    allowed = http.post(OPENAI_CHAT, json=body, headers={"Origin": ALLOWED_ORIGIN})
    assert allowed.status_code == 200, allowed.text
    assert allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN

    # The browser's preflight before a JSON POST with a bearer token.
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    answered = http.options(OPENAI_CHAT, headers={"Origin": ALLOWED_ORIGIN, **preflight})
    assert 200 <= answered.status_code < 300
    assert answered.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "POST" in answered.headers["access-control-allow-methods"]
    assert "authorization" in answered.headers["access-control-allow-headers"].lower()
    foreign = http.options(OPENAI_CHAT, headers={"Origin": "http://evil.example", **preflight})
    assert foreign.status_code == 403 and "access-control-allow-origin" not in foreign.headers


def test_foreign_host_refused(server, http):
    """DNS rebinding: a page's domain pointed at 127.0.0.1 sends its own name as Host."""
    refused = http.get("/v1/models", headers={"Host": f"evil.example:{server.port}"})
    assert refused.status_code in (400, 403, 421), refused.text
    assert_openai_error(refused, (refused.status_code,))
    assert http.get("/v1/models", headers={"Host": f"localhost:{server.port}"}).status_code == 200
    assert_serving(server.url)


def test_body_too_large(server, http):
    huge = {"model": MODEL, "messages": [{"role": "user", "content": "a" * (2 * BODY_LIMIT)}]}
    assert_openai_error(http.post(OPENAI_CHAT, json=huge), (413,))

    def chunks():  # no Content-Length: the server must count as it reads
        yield b'{"model": "dgemma-test", "prompt": "'
        for _ in range(4):
            yield b"a" * (BODY_LIMIT // 2)
        yield b'"}'

    streamed = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_openai_error(streamed, (413,))
    assert_serving(server.url)


# ---------------------------------------------------------------- the command


def test_dgemma_serve_command(model_dir, tmp_path):
    """`dgemma serve` binds 127.0.0.1 by default and honours --api-key; Ctrl-C stops it."""
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HOME=str(tmp_path))
    argv = [sys.executable, "-m", "mlx_dgemma.cli", "serve", "--model", str(model_dir), "--port", str(port)]
    argv += ["--api-key", KEY, "--max-concurrent", "2", "--max-queue", "4"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            assert proc.poll() is None, proc.stdout.read().decode(errors="replace")
            try:
                return httpx.get(f"{url}/health", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(up, "dgemma serve to answer")
        assert listening_addresses(port) == {"127.0.0.1"}
        assert httpx.get(f"{url}/v1/models").status_code == 401
        keyed = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
        (model,) = keyed.models.list().data
        assert model.id == model_dir.name  # the checkpoint directory's name
        assert keyed.chat.completions.create(model=model.id, messages=HELLO, max_tokens=16, extra_body=SAMPLER).choices
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError("dgemma serve did not stop on SIGINT") from None
    output = proc.stdout.read().decode(errors="replace")
    # A clean stop: no traceback, no abort from a native thread at exit.
    assert proc.returncode == 0, output
    assert "Traceback" not in output and "terminate called" not in output, output
    assert f"127.0.0.1:{port}" in output, output


def free_port() -> int:
    """A port free at the moment (bound to 0, then released for the server to take)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a TCP socket listening on `port` (Linux: /proc/net/tcp*, elsewhere lsof)."""
    if Path("/proc/net/tcp").exists():
        found = set()
        for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
            for row in Path(table).read_text().splitlines()[1:]:
                local, state = row.split()[1], row.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    found.add(_proc_address(address, width))
        return found
    out = subprocess.run(
        ["lsof", "-nP", f"-iTCP:{port}", "-sTCP:LISTEN", "-Fn"], capture_output=True, text=True, check=False
    ).stdout
    return {line[1:].rsplit(":", 1)[0].strip("[]") for line in out.splitlines() if line.startswith("n")}


def _proc_address(address: str, width: int) -> str:
    raw = bytes.fromhex(address)
    if width == 8:
        return str(ipaddress.IPv4Address(raw[::-1]))
    # IPv6 in /proc is four little-endian 32-bit words.
    return str(ipaddress.IPv6Address(b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))))


def test_serving_memory_warning(model_dir, monkeypatch):
    """The pre-load check counts one request; a server warns when its running requests' caches, its kept prompts
    and a batch's canvases may not fit."""
    from mlx_dgemma import memory
    from mlx_dgemma.cli.serve import serving_memory_warning

    one = memory.estimate_memory(model_dir, 200)
    assert memory.estimate_memory(model_dir, 200, caches=3).kv_cache == 3 * one.kv_cache
    batch = memory.estimate_memory(model_dir, 200, rows=4)
    assert batch.activations > one.activations + 4 * one.kv_cache and batch.kv_cache == one.kv_cache
    need = memory.estimate_memory(model_dir, CONTEXT, caches=2 + 8, rows=2).total
    monkeypatch.setattr(memory, "available_memory", lambda: (need, "a test's budget"))
    assert serving_memory_warning(model_dir, 2, 2, 8) is None
    monkeypatch.setattr(memory, "available_memory", lambda: (need - 1, "a test's budget"))
    warning = serving_memory_warning(model_dir, 2, 2, 8)
    assert "2 requests at once (up to 2 as one batch)" in warning and "--max-concurrent" in warning, warning


def test_a_failure_inside_generation_is_a_500_and_the_server_serves_on(loaded):
    """A step that raises answers its request with a 500 (an error event on a stream), the error in one line; the
    next request is answered."""
    model, tokenizer = loaded
    broken = BrokenModel(model)
    engine = Engine(broken, tokenizer)
    body = {"model": MODEL, "messages": HELLO, "seed": 1, "max_tokens": 16, **SAMPLER}
    try:
        with LiveServer(create_app(engine, MODEL)) as live, httpx.Client(base_url=live.url, timeout=60) as http:
            response = http.post(OPENAI_CHAT, json=body)
            assert response.status_code == 500, response.text
            error = response.json()["error"]
            assert error["code"] == "generation_failed"
            assert error["message"] == "generation failed: the device went away in the middle of a step"
            with http.stream("POST", OPENAI_CHAT, json={**body, "stream": True}) as stream:
                lines = [line for line in stream.iter_lines() if line.startswith("data:")]
            assert lines[-1] == "data: [DONE]"
            assert json.loads(lines[-2][len("data:") :])["error"]["code"] == "generation_failed"
            broken.broken = False
            assert http.post(OPENAI_CHAT, json=body).status_code == 200
    finally:
        engine.close()
