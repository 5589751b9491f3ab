"""The Gemma-4-style test tokenizer loads, round-trips and templates the way the runtime expects."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tokenizer_fixture import SPECIAL_TOKEN_IDS, build_tokenizer, write_tokenizer

transformers = pytest.importorskip("transformers")
mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
from mlx_lm.tokenizer_utils import SPMStreamingDetokenizer  # noqa: E402

MULTIBYTE = "héllo wörld — 你好 🚀"
ENGLISH = "The model writes the answer to the question, and then the test checks it."

# Spelled out rather than read from the module, so a change to the layout shows up here.
EXPECTED_IDS = {
    "<pad>": 0,
    "<eos>": 1,
    "<bos>": 2,
    "<unk>": 3,
    "<mask>": 4,
    "<|turn>": 5,
    "<turn|>": 6,
    "<|think|>": 7,
    "<|channel>": 8,
    "<channel|>": 9,
    "<|tool>": 10,
    "<tool|>": 11,
    "<|tool_call>": 12,
    "<tool_call|>": 13,
    "<|tool_response>": 14,
    "<tool_response|>": 15,
    '<|"|>': 16,
    "<|image>": 17,
    "<image|>": 18,
    "<|image|>": 19,
    "<|audio>": 20,
    "<audio|>": 21,
    "<|audio|>": 22,
    "<|video|>": 23,
}


@pytest.fixture(scope="module")
def hf_tok(tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def mlx_tok(tokenizer_dir):
    return mlx_lm_utils.load_tokenizer(Path(tokenizer_dir))


def test_files_written(tokenizer_dir):
    assert {p.name for p in tokenizer_dir.iterdir()} >= {
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    }
    cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert cfg["add_bos_token"] is True
    assert cfg["tokenizer_class"] == "GemmaTokenizer"
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"], cfg["unk_token"]) == (
        "<bos>",
        "<eos>",
        "<pad>",
        "<unk>",
    )


def test_special_token_ids(hf_tok, mlx_tok):
    assert SPECIAL_TOKEN_IDS == EXPECTED_IDS
    assert type(hf_tok).__name__ == "GemmaTokenizer"
    assert (hf_tok.pad_token_id, hf_tok.eos_token_id, hf_tok.bos_token_id, hf_tok.unk_token_id) == (0, 1, 2, 3)
    for token, expected in EXPECTED_IDS.items():
        assert hf_tok.convert_tokens_to_ids(token) == expected, token
        # Each is one token when it appears in text, not spelled out in pieces.
        assert hf_tok.encode(f"a{token}b", add_special_tokens=False)[1:-1] == [expected], token
        assert mlx_tok.encode(token, add_special_tokens=False) == [expected], token
    assert set(EXPECTED_IDS) <= set(hf_tok.all_special_tokens)
    # The 256 byte-fallback pieces follow the specials, in byte order.
    assert [hf_tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in range(256)] == list(range(24, 24 + 256))
    assert mlx_tok.eos_token_ids == {1}


def test_bos_is_added_once(hf_tok):
    ids = hf_tok.encode("hello")
    assert ids[0] == 2 and ids.count(2) == 1
    assert hf_tok.encode("hello", add_special_tokens=False)[0] != 2


@pytest.mark.parametrize("vocab_size", [384, 512, 1024])
def test_size_matches_vocab(tmp_path, vocab_size):
    path = write_tokenizer(tmp_path / str(vocab_size), vocab_size=vocab_size)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert len(tok) == vocab_size
    assert max(tok.get_vocab().values()) == vocab_size - 1
    # Every id a model with this vocab can emit decodes, through both decoders.
    wrapper = mlx_lm_utils.load_tokenizer(path)
    detok = wrapper.detokenizer
    detok.reset()
    for i in range(vocab_size):
        detok.add_token(i)
    detok.finalize()
    assert detok.text
    assert isinstance(tok.decode(list(range(vocab_size))), str)
    assert tok.decode(tok.encode(MULTIBYTE, add_special_tokens=False)) == MULTIBYTE


def test_too_small_vocab_is_refused(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        write_tokenizer(tmp_path, vocab_size=300)


@pytest.mark.parametrize(
    "text",
    [MULTIBYTE, ENGLISH, "  two leading spaces,  two inner\nand a newline\n", "tab\tand 'quotes' \"too\"", "ü"],
)
def test_round_trip(hf_tok, mlx_tok, text):
    for tok in (hf_tok, mlx_tok):
        ids = tok.encode(text, add_special_tokens=False)
        assert 3 not in ids, "nothing may fall back to <unk>"
        assert tok.decode(ids) == text
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text


def test_tokenizer_json_alone_matches_transformers(tokenizer_dir, hf_tok):
    # transformers rebuilds GemmaTokenizer's pipeline from the vocab and merges; the file itself must agree,
    # for code that loads tokenizer.json with the tokenizers library directly.
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    assert raw.get_vocab_size() == len(hf_tok) == 384
    chat = hf_tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    for text in (MULTIBYTE, ENGLISH, "  a  b\n\tc ", chat):
        for add in (False, True):
            ids = raw.encode(text, add_special_tokens=add).ids
            assert ids == hf_tok.encode(text, add_special_tokens=add), text
            assert 3 not in ids
        assert raw.decode(raw.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text


def test_byte_fallback_is_used_for_rare_characters(hf_tok):
    pieces = hf_tok.convert_ids_to_tokens(hf_tok.encode(MULTIBYTE, add_special_tokens=False))
    # 🚀 is F0 9F 9A 80, spelled as its four bytes.
    assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0x9A>", "<0x80>"]
    assert "<0xC3>" in pieces  # é / ö


def test_merges_shorten_english(hf_tok):
    ids = hf_tok.encode(ENGLISH, add_special_tokens=False)
    assert len(ids) < 0.6 * len(ENGLISH.encode())
    assert "▁the" in hf_tok.convert_ids_to_tokens(ids)


def test_deterministic_across_processes():
    script = "from tokenizer_fixture import build_tokenizer; print(build_tokenizer(512).to_str())"
    here = str(Path(__file__).parent)
    outs = {
        subprocess.run(
            [sys.executable, "-c", script], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        for _ in range(2)
    }
    outs.add(build_tokenizer(512).to_str())
    assert len(outs) == 1


def test_fast_to_build(tmp_path):
    start = time.perf_counter()
    write_tokenizer(tmp_path, vocab_size=1024)
    assert time.perf_counter() - start < 2.0


CONVERSATION = [
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "<|channel>thought\nAdd them.<channel|>Four."},
    {"role": "user", "content": " And three plus three? "},
]


def test_chat_template_without_thinking(hf_tok):
    rendered = hf_tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    assert rendered == (
        "<bos><|turn>user\nWhat is two plus two?<turn|>\n"
        "<|turn>model\nFour.<turn|>\n"
        "<|turn>user\nAnd three plus three?<turn|>\n"
        "<|turn>model\n<|channel>thought\n<channel|>"
    )
    off = hf_tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False, enable_thinking=False)
    assert off == rendered


def test_chat_template_with_thinking(hf_tok):
    messages = [{"role": "system", "content": "Be brief."}, *CONVERSATION]
    rendered = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, enable_thinking=True)
    assert rendered == (
        "<bos><|turn>system\n<|think|>\nBe brief.<turn|>\n"
        "<|turn>user\nWhat is two plus two?<turn|>\n"
        "<|turn>model\nFour.<turn|>\n"
        "<|turn>user\nAnd three plus three?<turn|>\n"
        "<|turn>model\n"
    )
    # Thinking on with no system message still opens a system turn for the switch.
    only_user = hf_tok.apply_chat_template(
        CONVERSATION[:1], add_generation_prompt=True, tokenize=False, enable_thinking=True
    )
    assert only_user.startswith("<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\n")


def test_chat_template_without_generation_prompt(hf_tok):
    rendered = hf_tok.apply_chat_template(CONVERSATION[:2], tokenize=False)
    assert rendered.endswith("<|turn>model\nFour.<turn|>\n")


def test_chat_template_tokens_round_trip(hf_tok, mlx_tok):
    for thinking in (False, True):
        text = hf_tok.apply_chat_template(
            CONVERSATION, add_generation_prompt=True, tokenize=False, enable_thinking=thinking
        )
        ids = hf_tok.encode(text, add_special_tokens=False)
        assert hf_tok.decode(ids) == text
        assert ids.count(EXPECTED_IDS["<|turn>"]) == text.count("<|turn>")
        assert ids.count(EXPECTED_IDS["<turn|>"]) == text.count("<turn|>")
        assert ids.count(EXPECTED_IDS["<bos>"]) == 1
        # Tokenizing inside apply_chat_template gives the same ids (and no second <bos>).
        out = hf_tok.apply_chat_template(
            CONVERSATION, add_generation_prompt=True, enable_thinking=thinking, return_dict=False
        )
        assert list(out) == ids
        # And through mlx-lm's wrapper, which passes enable_thinking itself.
        assert mlx_tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, enable_thinking=thinking) == ids


def test_chat_template_tools(hf_tok, mlx_tok):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "name": "get_weather", "content": {"temp": 21, "sky": "clear"}},
    ]
    rendered = hf_tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("<bos><|turn>system\n<|tool>declaration:get_weather{")
    call = '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>'
    response = '<|tool_response>response:get_weather{sky:<|"|>clear<|"|>,temp:21}<tool_response|>'
    # The call and its result stay in one open model turn; no new generation header after a result.
    assert rendered.endswith("<|turn>model\n" + call + response)
    # The answer after the result continues that same model turn, then closes it.
    answered = [*messages, {"role": "assistant", "content": "It is 21 and clear."}]
    rendered = hf_tok.apply_chat_template(answered, tools=tools, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith(
        call + response + "It is 21 and clear.<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    )
    # mlx-lm recognises the Gemma 4 tool format from the template and parses our call syntax.
    assert mlx_tok._tool_parser is not None
    assert mlx_tok._tool_parser(call[len("<|tool_call>") : -len("<tool_call|>")]) == {
        "name": "get_weather",
        "arguments": {"city": "Paris"},
    }


def test_mlx_lm_uses_spm_streaming_detokenizer(mlx_tok):
    detok = mlx_tok.detokenizer
    assert isinstance(detok, SPMStreamingDetokenizer)
    assert detok.trim_space is False  # Gemma: no dummy prefix to strip
    assert mlx_tok.think_start == "<|channel>thought" and mlx_tok.think_end == "<channel|>"


@pytest.mark.parametrize("text", [MULTIBYTE, " " + MULTIBYTE + "\nnext line 🚀🚀", ENGLISH])
def test_streaming_detokenizer(mlx_tok, text):
    ids = mlx_tok.encode(text, add_special_tokens=False)
    detok = mlx_tok.detokenizer
    detok.reset()
    seen = []
    for i in ids:
        detok.add_token(i)
        assert "\ufffd" not in detok.text
        seen.append(detok.last_segment)
        assert "\ufffd" not in seen[-1]
    detok.finalize()
    seen.append(detok.last_segment)
    assert detok.text == mlx_tok.decode(ids) == text
    assert "".join(seen) == text
    if not text.isascii():
        # Multi-byte characters arrive whole, after their last byte: some steps emit nothing.
        assert sum(1 for s in seen if s) < len(ids)
