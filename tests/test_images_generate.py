"""Images through the API and the command line, on a tiny random checkpoint with a vision tower.

The prompt's layout and pixels are transformers' processor's (tests/test_images.py); here: a generation
with images equals the reference's generation given the same ids, pixels and noise; prompts are encoded
in chunks that never split an image; `images=`, image parts and `Chat` (images kept across turns, in the
cache) agree with each other; `dgemma generate --image` and `/image` in `dgemma chat` give what the API
gives; and every refusal is one line.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from checkpoints import build_reference_model, save_reference_checkpoint
from PIL import Image
from reference_sampler import reference_noise
from tokenizer_fixture import SPECIAL_TOKEN_IDS, write_processor_config, write_tokenizer

import mlx_dgemma
from mlx_dgemma import Chat, SeededNoise, generate
from mlx_dgemma.cli import main as cli_main
from mlx_dgemma.generate import prefill, prompt_with_images, with_images
from mlx_dgemma.images import image_spans, prepare_image
from mlx_dgemma.tokenizer import encode_text, render_chat

EOS = 1
IMAGE = SPECIAL_TOKEN_IDS["<|image|>"]
FAST = dict(max_new_tokens=24, steps=4)
CLI_FAST = ["--steps", "4", "--max-tokens", "24", "--seed", "3"]


def picture(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x * y) % 256], axis=-1) + rng.normal(0, 30, (height, width, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def vision_checkpoint(tmp_path_factory):
    """A float32 checkpoint with a vision tower (4-pixel patches), the test tokenizer, and a processor config
    of 70 soft tokens per image."""
    reference = build_reference_model(seed=7, max_position_embeddings=1024).eval()
    reference.config._attn_implementation = "eager"
    path = save_reference_checkpoint(reference, tmp_path_factory.mktemp("vision"))
    write_tokenizer(path)
    write_processor_config(path, max_soft_tokens=70, patch_size=4)
    model, tokenizer = mlx_dgemma.load(path)
    return reference, model, tokenizer, path


@pytest.fixture(scope="module")
def text_only_checkpoint(tmp_path_factory):
    """The same shapes with the vision tower's weights dropped: a text-only conversion."""
    from safetensors.numpy import load_file, save_file

    reference = build_reference_model(seed=7, max_position_embeddings=1024)
    path = save_reference_checkpoint(reference, tmp_path_factory.mktemp("text"))
    for shard in path.glob("*.safetensors"):
        tensors = load_file(shard)
        kept = {k: v for k, v in tensors.items() if not k.startswith(("model.encoder.vision", "model.encoder.embed_v"))}
        save_file(kept, shard, metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config.pop("vision_config", None)
    (path / "config.json").write_text(json.dumps(config))
    write_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("images")
    png, jpeg = directory / "wide.png", directory / "tall.jpg"
    picture(40, 90, 1).save(png)
    picture(120, 50, 2).save(jpeg, quality=90)
    return png, jpeg


# ----------------------------------------------------------------- the API


def test_generation_with_images_matches_the_reference(vision_checkpoint, image_files):
    """Ids, pixels and positions from our preprocessing into the reference's generate: the same tokens."""
    reference, model, tokenizer, _ = vision_checkpoint
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": image_files[0]},
                {"type": "text", "text": "Compare the two pictures."},
                {"type": "image", "image": image_files[1]},
            ],
        }
    ]
    ids, images = prompt_with_images(model, tokenizer, messages, thinking=False)
    assert [e - s for s, e in image_spans(ids, IMAGE)] == [image.num_soft_tokens for image in images]
    noise = SeededNoise(11)
    mm_types = [1 if token == IMAGE else 0 for token in ids]
    with reference_noise(noise, model.text_config.vocab_size):
        expected = reference.generate(
            torch.tensor([ids]),
            pixel_values=torch.from_numpy(np.stack([image.pixel_values for image in images])),
            image_position_ids=torch.from_numpy(np.stack([image.position_ids for image in images])),
            mm_token_type_ids=torch.tensor([mm_types]),
            max_new_tokens=24,
            max_denoising_steps=4,
            eos_token_id=[EOS],
            pad_token_id=0,
        ).sequences[0, len(ids) :]
    expected = expected.tolist()[:24]
    if EOS in expected:
        expected = expected[: expected.index(EOS)]
    result = generate(model, tokenizer, messages, noise=noise, **FAST)
    assert result.tokens == expected
    assert result.stats.prompt_tokens == len(ids)
    # The images changed the reply: without them (or with others) it differs.
    text_only = generate(model, tokenizer, "Compare the two pictures.", noise=noise, **FAST)
    assert text_only.tokens != result.tokens


def test_images_argument_paths_bytes_and_pil_agree(vision_checkpoint, image_files):
    _, model, tokenizer, _ = vision_checkpoint
    png, jpeg = image_files
    by_path = generate(model, tokenizer, "Describe.", images=[png, str(jpeg)], seed=4, **FAST)
    with Image.open(jpeg) as decoded:
        decoded.load()
        by_other = generate(model, tokenizer, "Describe.", images=[png.read_bytes(), decoded], seed=4, **FAST)
    parts = [
        {"type": "image", "image": png},
        {"type": "image", "url": str(jpeg)},
        {"type": "text", "text": "Describe."},
    ]
    by_parts = generate(model, tokenizer, [{"role": "user", "content": parts}], seed=4, **FAST)
    assert by_path.tokens == by_other.tokens == by_parts.tokens
    # images= joins the last user message of a message list, before its text.
    listed = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe."}]
    with_system = generate(model, tokenizer, listed, images=[png, jpeg], seed=4, **FAST)
    assert with_system.stats.prompt_tokens > by_path.stats.prompt_tokens


def test_token_id_prompts_take_images_at_their_placeholders(vision_checkpoint, image_files):
    _, model, tokenizer, _ = vision_checkpoint
    rendered = render_chat(
        tokenizer, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    )
    ids = encode_text(tokenizer, rendered)
    from_ids = generate(model, tokenizer, ids, images=[image_files[0]], seed=2, **FAST)
    from_text = generate(model, tokenizer, "Hi", images=[image_files[0]], seed=2, **FAST)
    assert from_ids.tokens == from_text.tokens


def test_chunked_prefill_never_splits_an_image(vision_checkpoint, image_files):
    """Encoding in chunks of 7 tokens (each image's run in one piece) leaves the cache a single call leaves."""
    _, model, tokenizer, _ = vision_checkpoint
    ids, images = prompt_with_images(model, tokenizer, "One, then two.", False, images=list(image_files))
    canvas = mx.array([[5] * model.config.canvas_length])
    logits = []
    for chunk in (7, 10_000):
        cache = model.make_cache()
        prefill(model, cache, mx.array([ids]), chunk=chunk, images=images)
        logits.append(np.array(model.denoise(canvas, cache)))
    np.testing.assert_allclose(logits[0], logits[1], rtol=0, atol=2e-4 * np.abs(logits[1]).max())


def test_chat_keeps_images_in_the_conversation_and_the_cache(vision_checkpoint, image_files):
    _, model, tokenizer, path = vision_checkpoint
    png, jpeg = image_files
    chat = Chat(model, tokenizer, seed=6, **FAST)
    first = chat.send("What is this?", images=[png])
    first_ids, first_images = prompt_with_images(model, tokenizer, "What is this?", False, images=[png])
    assert chat.last_encoded_tokens == len(first_ids) == first.stats.prompt_tokens

    content = [{"type": "text", "text": "And these?"}, {"type": "image", "image": jpeg}]
    user = {"role": "user", "content": chat._prepared_content(with_images(content, [png]))}
    pending = list(chat._pending)
    new_ids, new_images = chat._uncached(user)
    second = chat.send(content, images=[png])
    # The second turn encodes only what the cache lacks: the first reply's last canvas, and this turn with
    # its two images' runs.
    assert chat.last_encoded_tokens == len(new_ids)
    assert [e - s for s, e in image_spans(new_ids, IMAGE)] == [image.num_soft_tokens for image in new_images]
    assert [image.digest for image in new_images] == [
        prepare_image(p, model.vision_settings).digest for p in (png, jpeg)
    ]
    # The second reply equals a fresh generation over the tokens (and images) the cache holds.
    history = first_ids + first.tokens[: len(first.tokens) - len(pending)] + new_ids
    fresh = generate(model, tokenizer, history, images=[*first_images, *new_images], seed=6, **FAST)
    assert fresh.tokens == second.tokens
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]

    # A turn after an interruption re-encodes the whole conversation, its images included.
    chat._cache = None
    third = chat.send("Once more.")
    assert third.stats.prompt_tokens > len(first_ids) + len(new_ids) - len(pending)


# ----------------------------------------------------------------- refusals


def test_images_for_a_text_only_checkpoint_are_refused(text_only_checkpoint, image_files):
    model, tokenizer = mlx_dgemma.load(text_only_checkpoint)
    assert not model.config.has_vision
    with pytest.raises(ValueError, match="no vision tower: it takes text only"):
        generate(model, tokenizer, "Hi", images=[image_files[0]], **FAST)
    chat = Chat(model, tokenizer, **FAST)
    with pytest.raises(ValueError, match="no vision tower"):
        chat.send("Hi", images=[image_files[0]])
    assert chat.messages == []  # nothing half-added
    assert generate(model, tokenizer, "Hi", seed=1, **FAST).tokens  # text still works


def test_more_images_than_the_context_holds(vision_checkpoint, image_files):
    _, model, tokenizer, _ = vision_checkpoint
    with pytest.raises(ValueError, match=r"\(20 images take 1240 of them\) .* the model's context is 1024"):
        generate(model, tokenizer, "Count them.", images=[image_files[0]] * 20, **FAST)


def test_bad_images_are_one_line_errors(vision_checkpoint, tmp_path):
    _, model, tokenizer, _ = vision_checkpoint
    (tmp_path / "fake.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="^.*fake.png is not an image"):
        generate(model, tokenizer, "Hi", images=[tmp_path / "fake.png"], **FAST)
    with pytest.raises(ValueError, match="^image 2: image file not found"):
        generate(model, tokenizer, "Hi", images=[picture(20, 20, 0), tmp_path / "gone.png"], **FAST)
    with pytest.raises(ValueError, match="needs the image"):
        generate(model, tokenizer, [{"role": "user", "content": [{"type": "image"}]}], **FAST)
    with pytest.raises(ValueError, match="the prompt has 1 image placeholders for 2 images"):
        generate(model, tokenizer, [2, IMAGE, 40], images=[picture(20, 20, 0), picture(20, 20, 1)], **FAST)


# ----------------------------------------------------------------- the command line


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli_main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_command_with_images_matches_the_api(vision_checkpoint, image_files, capsys):
    _, model, tokenizer, path = vision_checkpoint
    png, jpeg = image_files
    code, out, err = run_main(
        capsys, "generate", "Describe both.", "--model", str(path), "--image", str(png), "--image", str(jpeg),
        *CLI_FAST, "--json",
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    expected = generate(model, tokenizer, "Describe both.", images=[png, jpeg], max_new_tokens=24, steps=4, seed=3)
    assert result["tokens"] == expected.tokens and result["text"] == expected.text


def test_generate_command_refuses_bad_images(vision_checkpoint, text_only_checkpoint, image_files, tmp_path, capsys):
    path = vision_checkpoint[3]
    (tmp_path / "notes.txt").write_text("hello")
    cases = [
        ([str(tmp_path / "missing.png")], str(path), "image file not found"),
        ([str(tmp_path / "notes.txt")], str(path), "is not an image"),
        ([str(image_files[0])], str(text_only_checkpoint), "no vision tower"),
    ]
    for images, model_path, message in cases:
        args = [arg for image in images for arg in ("--image", image)]
        code, out, err = run_main(capsys, "generate", "Hi", "--model", model_path, *args, *CLI_FAST)
        assert code == 1 and out == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_chat_image_command(vision_checkpoint, image_files, tmp_path, capsys, monkeypatch):
    """/image attaches to the next message only; a bad one is one error line and the chat goes on."""
    _, model, tokenizer, path = vision_checkpoint
    png, jpeg = image_files
    script = "\n".join(
        [
            f"/image {tmp_path / 'missing.png'}",
            f"/image {png}",
            f"/image {jpeg}",
            "What are these?",
            "/history",
            "/image",
            f"/image {png}",
            "/image",
            "And now?",
            "/stats",
            "/quit",
        ]
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO(script + "\n"))
    code, out, err = run_main(capsys, "chat", "--model", str(path), *CLI_FAST)
    assert code == 0, err
    errors = err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: image file not found"), err
    assert "attached wide.png (90x40); 1 image go with the next message" in out
    assert "2 images go with the next message" in out
    assert "user: [image] [image] What are these?" in out
    assert "no image attached" in out and "1 attached image dropped" in out
    chat = Chat(model, tokenizer, max_new_tokens=24, steps=4, seed=3)
    first = chat.send("What are these?", images=[png, jpeg])
    assert out.split("attached tall.jpg", 1)[1].split("\n", 1)[1].startswith(first.text)
    second = chat.send("And now?")
    assert f"{second.stats.prompt_tokens} tokens encoded this turn" in out


def test_vision_settings_come_from_the_checkpoint(vision_checkpoint):
    _, model, tokenizer, path = vision_checkpoint
    ids, images = prompt_with_images(model, tokenizer, "Hi", False, images=[picture(300, 300, 0)])
    assert images[0].num_soft_tokens == 64  # 96x96 pixels at most in 4-pixel patches, 3x3 pooled: 8x8
    assert Path(path, "processor_config.json").is_file()
