"""Images through `dgemma serve`: a live server on loopback, a tiny random checkpoint with a vision tower.

OpenAI `image_url` parts (data: URLs) and Ollama's `images` (base64) give what the library gives with the
same seed; the prompt cache tells prompts apart by their images and keeps a conversation's images; remote
URLs are refused unless the server allows them (then fetched, with a size cap); every bad image is a 400 in
its API's error shape, and the server goes on serving.
"""

from __future__ import annotations

import base64
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from checkpoints import build_reference_model, save_reference_checkpoint
from PIL import Image
from serve_fixtures import LiveServer, assert_ollama_error, assert_openai_error, ndjson
from tokenizer_fixture import SPECIAL_TOKEN_IDS, write_processor_config, write_tokenizer

import mlx_dgemma
import mlx_dgemma.images as images_module
from mlx_dgemma import generate
from mlx_dgemma.generate import prompt_with_images
from mlx_dgemma.images import image_spans
from mlx_dgemma.serve.app import create_app
from mlx_dgemma.serve.engine import Engine

MODEL = "dgemma-vision-test"
SAMPLER = {"steps": 3}
MAX_TOKENS = 24
OPENAI_CHAT = "/v1/chat/completions"


def picture(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x * y) % 256], axis=-1) + rng.normal(0, 30, (height, width, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def data_url(path: Path) -> str:
    kind = "png" if path.suffix == ".png" else "jpeg"
    return f"data:image/{kind};base64,{base64.b64encode(path.read_bytes()).decode()}"


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = save_reference_checkpoint(
        build_reference_model(seed=9, max_position_embeddings=1024), tmp_path_factory.mktemp("vision-serve")
    )
    write_tokenizer(path)
    write_processor_config(path, max_soft_tokens=70, patch_size=4)
    return path


@pytest.fixture(scope="module")
def loaded(model_dir):
    return mlx_dgemma.load(model_dir)


@pytest.fixture(scope="module")
def engine(loaded):
    engine = Engine(*loaded, max_concurrent=2, max_queue=8)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def server(engine):
    with LiveServer(create_app(engine, MODEL)) as live:
        yield live


@pytest.fixture(scope="module")
def remote_server(engine):
    """The same engine behind an app that fetches http(s) image URLs."""
    with LiveServer(create_app(engine, MODEL, allow_remote_images=True)) as live:
        yield live


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("serve-images")
    png, jpeg, other = directory / "wide.png", directory / "tall.jpg", directory / "other.png"
    picture(40, 90, 1).save(png)
    picture(120, 50, 2).save(jpeg, quality=90)
    picture(40, 90, 3).save(other)
    return png, jpeg, other


@pytest.fixture(scope="module")
def image_host(image_files):
    """A plain HTTP server on loopback serving the image files' directory (for remote URLs)."""
    directory = image_files[0].parent

    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(directory), **kwargs)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture()
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as session:
        yield session


def image_message(text: str, *urls: str) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def library(loaded, messages, seed: int):
    model, tokenizer = loaded
    return generate(model, tokenizer, messages, seed=seed, max_new_tokens=MAX_TOKENS, **SAMPLER)


def user_with_images(text: str, *paths: Path) -> dict:
    return {
        "role": "user",
        "content": [*({"type": "image", "image": p} for p in paths), {"type": "text", "text": text}],
    }


# ----------------------------------------------------------------- OpenAI


def test_openai_data_urls_match_the_library(client, loaded, image_files):
    png, jpeg, _ = image_files
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[image_message("Compare them.", data_url(png), data_url(jpeg))],
        seed=5,
        max_tokens=MAX_TOKENS,
        extra_body=SAMPLER,
    )
    expected = library(loaded, [user_with_images("Compare them.", png, jpeg)], seed=5)
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.prompt_tokens == expected.stats.prompt_tokens

    stream = client.chat.completions.create(
        model=MODEL,
        messages=[image_message("Compare them.", data_url(png), data_url(jpeg))],
        seed=5,
        max_tokens=MAX_TOKENS,
        stream=True,
        extra_body=SAMPLER,
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == expected.text


def test_openai_images_between_text_parts_and_a_bare_url_string(http, loaded, image_files):
    png, jpeg, _ = image_files
    content = [
        {"type": "text", "text": "First"},
        {"type": "image_url", "image_url": data_url(png)},
        {"type": "text", "text": "then"},
        {"type": "image_url", "image_url": {"url": data_url(jpeg), "detail": "low"}},
    ]
    body = {"messages": [{"role": "user", "content": content}], "seed": 2, "max_tokens": MAX_TOKENS, **SAMPLER}
    response = http.post(OPENAI_CHAT, json=body)
    assert response.status_code == 200, response.text
    parts = [
        {"type": "text", "text": "First"},
        {"type": "image", "image": png},
        {"type": "text", "text": "then"},
        {"type": "image", "image": jpeg},
    ]
    expected = library(loaded, [{"role": "user", "content": parts}], seed=2)
    assert response.json()["choices"][0]["message"]["content"] == expected.text


def test_prompt_cache_keys_include_images(client, loaded, image_files):
    """Two prompts differing only in an image share no cache past the image; the same image is reused; the
    next turn of a conversation with an image extends the cached history."""
    png, _, other = image_files

    def ask(url: str, messages_before=()):
        return client.chat.completions.create(
            model=MODEL,
            messages=[*messages_before, image_message("What is it?", url)],
            seed=1,
            max_tokens=MAX_TOKENS,
            extra_body=SAMPLER,
        )

    first = ask(data_url(png))
    again = ask(data_url(png))
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens
    assert again.choices[0].message.content == first.choices[0].message.content
    swapped = ask(data_url(other))
    # Only the text before the image (its begin marker included) can come from the cache.
    assert swapped.usage.prompt_tokens_details.cached_tokens < 12
    assert swapped.usage.prompt_tokens == first.usage.prompt_tokens
    assert swapped.choices[0].message.content != first.choices[0].message.content

    history = [image_message("What is it?", data_url(png)), {"role": "assistant", "content": "A picture."}]
    follow = client.chat.completions.create(
        model=MODEL,
        messages=[*history, {"role": "user", "content": "Sure?"}],
        seed=1,
        max_tokens=MAX_TOKENS,
        extra_body=SAMPLER,
    )
    # The first turn's history (its image included) came from the cache: all but its generation prompt.
    ids, _ = prompt_with_images(*loaded, [user_with_images("What is it?", png)], False)
    ((_, image_end),) = image_spans(ids, SPECIAL_TOKEN_IDS["<|image|>"])
    assert image_end < follow.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens


# ----------------------------------------------------------------- Ollama


def test_ollama_generate_and_chat_images_match_the_library(http, loaded, image_files):
    png, jpeg, _ = image_files
    body = {"prompt": "Describe.", "images": [b64(png), b64(jpeg)], "stream": False, "options": {"seed": 4}}
    response = http.post("/api/generate", json={**body, "options": {"seed": 4, "num_predict": MAX_TOKENS}, **SAMPLER})
    assert response.status_code == 200, response.text
    expected = library(loaded, [user_with_images("Describe.", png, jpeg)], seed=4)
    assert response.json()["response"] == expected.text
    assert response.json()["prompt_eval_count"] == expected.stats.prompt_tokens

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "And this?", "images": [data_url(png)]},
    ]
    streamed = http.post(
        "/api/chat", json={"messages": messages, "options": {"seed": 4, "num_predict": MAX_TOKENS}, **SAMPLER}
    )
    assert streamed.status_code == 200, streamed.text
    text = "".join(line["message"]["content"] for line in ndjson(streamed) if "message" in line)
    expected = library(loaded, [messages[0], user_with_images("And this?", png)], seed=4)
    assert text == expected.text

    # An image alone is a prompt (no "load the model" answer).
    alone = http.post("/api/generate", json={"images": [b64(png)], "stream": False, **SAMPLER})
    assert alone.status_code == 200 and alone.json()["done_reason"] != "load"
    shown = http.post("/api/show", json={"model": MODEL}).json()
    assert "vision" in shown["capabilities"]


# ----------------------------------------------------------------- refusals


def test_bad_images_are_400s_and_the_server_goes_on(http, image_files, tmp_path):
    png, _, _ = image_files
    data = png.read_bytes()
    truncated = base64.b64encode(data[: len(data) // 2]).decode()
    ico = tmp_path / "icon.ico"
    picture(32, 32, 0).save(ico, format="ICO")
    cases = [
        ("https://example.com/cat.png", "remote image URLs are not fetched", "remote_images_disabled"),
        ("data:image/png;base64,@@@@", "not valid base64", "invalid_image"),
        ("data:text/plain;base64,aGVsbG8=", "is not an image", "invalid_image"),
        (f"data:image/png;base64,{truncated}", "could not be decoded", "invalid_image"),
        (f"data:image/x-icon;base64,{b64(ico)}", "ICO image, which is not supported", "invalid_image"),
        ("/etc/passwd", "is not an image", "invalid_image"),  # a path is never read: it is taken as base64
    ]
    for url, message, code in cases:
        body = {"messages": [image_message("Hi", url)], "max_tokens": 8, **SAMPLER}
        error = assert_openai_error(http.post(OPENAI_CHAT, json=body))
        assert message in error["message"] and error["code"] == code, (url, error)
        assert error["param"] == "messages[0].content[0].image_url.url"
        ollama = {"prompt": "Hi", "images": [url], "stream": False}
        assert message in assert_ollama_error(http.post("/api/generate", json=ollama))

    missing = {"messages": [{"role": "user", "content": [{"type": "image_url"}]}], **SAMPLER}
    assert "needs" in assert_openai_error(http.post(OPENAI_CHAT, json=missing))["message"]
    many = {"messages": [image_message("Hi", *[data_url(png)] * 20)], "max_tokens": 8, **SAMPLER}
    error = assert_openai_error(http.post(OPENAI_CHAT, json=many))
    assert error["code"] == "context_length_exceeded" and "20 images take" in error["message"]
    raw = {"prompt": "Hi", "images": [b64(png)], "raw": True, "stream": False}
    assert "raw prompts" in assert_ollama_error(http.post("/api/generate", json=raw))
    fim = {"prompt": "Hi", "suffix": "there", "images": [b64(png)], "stream": False}
    assert "suffix" in assert_ollama_error(http.post("/api/generate", json=fim))
    top_level = {"messages": [{"role": "user", "content": "Hi"}], "images": [b64(png)], "stream": False}
    assert "message's images" in assert_ollama_error(http.post("/api/chat", json=top_level))

    # Still serving.
    ok = http.post(OPENAI_CHAT, json={"messages": [image_message("Hi", data_url(png))], "max_tokens": 8, **SAMPLER})
    assert ok.status_code == 200, ok.text


def test_text_only_checkpoint_refuses_images(tmp_path, image_files):
    reference = build_reference_model(seed=9, max_position_embeddings=512, vision_overrides=None)
    path = save_reference_checkpoint(reference, tmp_path / "text")
    import json

    config = json.loads((path / "config.json").read_text())
    config.pop("vision_config")
    (path / "config.json").write_text(json.dumps(config))
    write_tokenizer(path)
    model, tokenizer = mlx_dgemma.load(path)
    assert not model.config.has_vision
    engine = Engine(model, tokenizer)
    try:
        with LiveServer(create_app(engine, MODEL)) as live, httpx.Client(base_url=live.url, timeout=60) as http:
            body = {"messages": [image_message("Hi", data_url(image_files[0]))], **SAMPLER}
            error = assert_openai_error(http.post(OPENAI_CHAT, json=body))
            assert "no vision tower" in error["message"] and error["code"] == "images_not_supported"
            ollama = {"prompt": "Hi", "images": [b64(image_files[0])], "stream": False}
            assert "no vision tower" in assert_ollama_error(http.post("/api/generate", json=ollama))
            assert "vision" not in http.post("/api/show", json={}).json()["capabilities"]
            text = http.post(OPENAI_CHAT, json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8})
            assert text.status_code == 200, text.text
    finally:
        engine.close()


# ----------------------------------------------------------------- remote URLs, when allowed


def test_remote_urls_when_allowed(remote_server, image_host, image_files, monkeypatch):
    png = image_files[0]
    with httpx.Client(base_url=remote_server.url, timeout=120) as http:

        def ask(url: str) -> httpx.Response:
            body = {"messages": [image_message("Hi", url)], "seed": 3, "max_tokens": MAX_TOKENS, **SAMPLER}
            return http.post(OPENAI_CHAT, json=body)

        fetched, inline = ask(f"{image_host}/wide.png"), ask(data_url(png))
        assert fetched.status_code == 200, fetched.text
        assert fetched.json()["choices"][0]["message"]["content"] == inline.json()["choices"][0]["message"]["content"]
        assert "HTTP 404" in assert_openai_error(ask(f"{image_host}/missing.png"))["message"]
        monkeypatch.setattr(images_module, "MAX_REMOTE_IMAGE_BYTES", 100)
        assert "larger than" in assert_openai_error(ask(f"{image_host}/wide.png"))["message"]
        ollama = {"prompt": "Hi", "images": [f"{image_host}/tall.jpg"], "stream": False, **SAMPLER}
        monkeypatch.setattr(images_module, "MAX_REMOTE_IMAGE_BYTES", 20 * 1024 * 1024)
        assert http.post("/api/generate", json=ollama).status_code == 200


def test_serve_command_has_the_remote_images_flag():
    result = subprocess.run(
        [sys.executable, "-m", "mlx_dgemma.cli", "serve", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "--allow-remote-images" in result.stdout
