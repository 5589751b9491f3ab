"""The generation API, the chat template and streaming text, on a random checkpoint with a real tokenizer."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from checkpoints import build_reference_model, save_reference_checkpoint
from reference_sampler import reference_noise
from tokenizer_fixture import write_tokenizer
from transformers import AutoTokenizer

import mlx_dgemma
from mlx_dgemma import Chat, Commit, Done, Draft, SeededNoise, generate, stream_generate
from mlx_dgemma.generate import prefill
from mlx_dgemma.tokenizer import ReplyDecoder, encode_text, render_chat

EOS = 1


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    reference = build_reference_model(seed=21, max_position_embeddings=200).eval()
    reference.config._attn_implementation = "eager"
    path = save_reference_checkpoint(reference, tmp_path_factory.mktemp("gen"))
    write_tokenizer(path)
    model, tokenizer = mlx_dgemma.load(path)
    return reference, model, tokenizer, path


def test_generate_returns_text_tokens_and_stats(checkpoint):
    _, model, tokenizer, _ = checkpoint
    result = generate(model, tokenizer, "Write a haiku about the sea.", max_new_tokens=40, steps=6, seed=1)
    assert result.finish_reason in ("stop", "length")
    assert 0 < len(result.tokens) <= 40 and EOS not in result.tokens
    assert result.stats.prompt_tokens > 5 and result.stats.generation_tokens == len(result.tokens)
    assert 1 <= result.stats.canvases <= 3 and result.stats.steps_per_canvas <= 6
    assert result.stats.tokens_per_forward == pytest.approx(len(result.tokens) / result.stats.denoising_steps)
    # Same seed, same reply; another seed, another reply.
    again = generate(model, tokenizer, "Write a haiku about the sea.", max_new_tokens=40, steps=6, seed=1)
    other = generate(model, tokenizer, "Write a haiku about the sea.", max_new_tokens=40, steps=6, seed=2)
    assert again.tokens == result.tokens and other.tokens != result.tokens


def test_generate_with_noise_matches_the_reference(checkpoint):
    reference, model, tokenizer, _ = checkpoint
    ids = encode_text(tokenizer, render_chat(tokenizer, [{"role": "user", "content": "Hello!"}]))
    noise = SeededNoise(4)
    with reference_noise(noise, model.text_config.vocab_size):
        expected = reference.generate(
            torch.tensor([ids]),
            max_new_tokens=40,
            max_denoising_steps=7,
            eos_token_id=[EOS],
            pad_token_id=0,
        ).sequences[0, len(ids) :]
    expected = expected.tolist()[:40]
    if EOS in expected:
        expected = expected[: expected.index(EOS)]
    result = generate(model, tokenizer, ids, noise=noise, max_new_tokens=40, steps=7)
    assert result.tokens == expected


def test_stream_generate_events(checkpoint):
    _, model, tokenizer, _ = checkpoint
    events = list(stream_generate(model, tokenizer, "Hi", max_new_tokens=32, steps=5, seed=3))
    assert isinstance(events[-1], Done)
    result = events[-1].result
    drafts = [e for e in events if isinstance(e, Draft)]
    commits = [e for e in events if isinstance(e, Commit)]
    assert len(commits) == result.stats.canvases
    assert len(drafts) == result.stats.denoising_steps
    assert [d.step for d in drafts if d.canvas == 0] == list(range(1, 1 + sum(d.canvas == 0 for d in drafts)))
    assert "".join(c.text for c in commits) == result.text
    assert [t for c in commits for t in c.tokens] == result.tokens


def test_chat_reuses_the_cache(checkpoint):
    _, model, tokenizer, _ = checkpoint
    chat = Chat(model, tokenizer, system="Be brief.", max_new_tokens=24, steps=4, seed=5)
    first = chat.send("What is MLX?")
    full_first = encode_text(tokenizer, render_chat(tokenizer, chat.messages[:2]))
    assert chat.last_encoded_tokens == len(full_first)

    user = {"role": "user", "content": "And diffusion?"}
    pending = list(chat._pending)
    new_ids = chat._uncached_ids(user)
    second = chat.send(user["content"])
    # Only the last reply's uncached tokens and the template's turn change are new.
    assert chat.last_encoded_tokens == len(new_ids)
    assert new_ids[: len(pending)] == pending and first.tokens[len(first.tokens) - len(pending) :] == pending
    assert "And diffusion?" in tokenizer.decode(new_ids[len(pending) :])
    rendered = render_chat(tokenizer, chat.messages[:4])
    assert chat.last_encoded_tokens < len(encode_text(tokenizer, rendered))

    # The second reply equals a fresh generation over the tokens the cache holds.
    history = full_first + first.tokens[: len(first.tokens) - len(pending)] + new_ids
    fresh = generate(model, tokenizer, history, max_new_tokens=24, steps=4, seed=5)
    assert fresh.tokens == second.tokens
    assert len(chat.messages) == 5 and chat.messages[-1]["content"] == second.text


def test_chat_reset_and_system(checkpoint):
    _, model, tokenizer, _ = checkpoint
    chat = Chat(model, tokenizer, max_new_tokens=16, steps=3)
    chat.send("one")
    chat.reset(system="You are terse.")
    assert chat.messages == [{"role": "system", "content": "You are terse."}]
    chat.send("two")
    assert chat.last_encoded_tokens == len(encode_text(tokenizer, render_chat(tokenizer, chat.messages[:2])))


def test_chat_template_renders_as_transformers_does(checkpoint):
    _, _, tokenizer, path = checkpoint
    hf = AutoTokenizer.from_pretrained(path)
    conversations = [
        [{"role": "user", "content": "Hi"}],
        [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "<|channel>thought\nhmm<channel|>Hello!"},
            {"role": "user", "content": "Ça va? 你好 🚀"},
        ],
    ]
    for messages in conversations:
        for thinking in (False, True):
            ours = render_chat(tokenizer, messages, thinking=thinking)
            theirs = hf.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False, enable_thinking=thinking
            )
            assert ours == theirs


def test_thinking_is_split_from_the_answer(checkpoint):
    _, _, tokenizer, _ = checkpoint
    ids = encode_text(tokenizer, "<|channel>thought\nLet me think: 2+2=4.<channel|>The answer is 4 — ✓")
    decoder = ReplyDecoder(tokenizer)
    pieces = [decoder.add([token]) for token in ids]
    tail = decoder.finish()
    assert decoder.thinking == "Let me think: 2+2=4."
    assert decoder.answer == "The answer is 4 — ✓"
    assert "".join(a for a, _ in pieces) + tail[0] == decoder.answer


def test_streaming_never_splits_a_character(checkpoint):
    _, _, tokenizer, _ = checkpoint
    text = "héllo wörld — 你好 🚀 ∑"
    ids = encode_text(tokenizer, text)
    assert len(ids) > len(text) // 2  # byte fallback splits these characters over several tokens
    decoder = ReplyDecoder(tokenizer)
    seen = []
    for token in ids:
        answer, _ = decoder.add([token])
        seen.append(answer)
        assert "\ufffd" not in answer
    seen.append(decoder.finish()[0])
    assert "".join(seen) == text


def test_prompt_beyond_the_context_is_refused_before_work(checkpoint):
    _, model, tokenizer, _ = checkpoint
    long_ids = list(np.random.default_rng(0).integers(30, 300, size=150))
    with pytest.raises(ValueError, match="context"):
        generate(model, tokenizer, [int(i) for i in long_ids], max_new_tokens=64)


@pytest.mark.parametrize("token", [999999, -1, "vocab_size"])
def test_token_ids_outside_the_vocabulary_are_refused(checkpoint, token):
    """An id past the embedding table is refused up front: the lookup itself would read out of bounds."""
    _, model, tokenizer, _ = checkpoint
    token = model.text_config.vocab_size if token == "vocab_size" else token
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, tokenizer, [5, token], max_new_tokens=16, steps=2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, tokenizer, [token])


def test_chunked_prefill_equals_one_pass(checkpoint):
    _, model, _, _ = checkpoint
    ids = mx.array(np.random.default_rng(1).integers(30, 300, size=(1, 45)))
    whole, chunked = model.make_cache(), model.make_cache()
    prefill(model, whole, ids, chunk=1000)
    prefill(model, chunked, ids, chunk=8)
    canvas = mx.array(np.random.default_rng(2).integers(0, 384, size=(1, 16)))
    np.testing.assert_allclose(
        np.array(model.denoise(canvas, whole)), np.array(model.denoise(canvas, chunked)), atol=1e-5
    )
