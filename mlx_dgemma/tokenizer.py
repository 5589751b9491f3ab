"""Text in and out: the checkpoint's tokenizer, its chat template, the thinking channel.

The tokenizer is mlx-lm's TokenizerWrapper (which brings a streaming
detokenizer that never splits a UTF-8 character). The chat template is
rendered in a sandboxed Jinja environment set up the way transformers sets
up its own, so prompts match what the reference would be given.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tokenizer_utils import load as load_mlx_lm_tokenizer

Message = dict[str, Any]

CHANNEL_OPEN = "<|channel>"
CHANNEL_CLOSE = "<channel|>"


def load_tokenizer(path: str | Path) -> TokenizerWrapper:
    """mlx-lm's TokenizerWrapper for a checkpoint directory."""
    return load_mlx_lm_tokenizer(Path(path))


class TemplateError(ValueError):
    """A chat template that cannot render these messages; one line."""


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **kwargs: Any) -> str:
        # Jinja's own tojson escapes HTML characters, which a prompt must not.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, **kwargs)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat(
    tokenizer: TokenizerWrapper,
    messages: Sequence[Message],
    add_generation_prompt: bool = True,
    thinking: bool = False,
    **extra: Any,
) -> str:
    """The checkpoint's chat template applied to `messages`."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise TemplateError("this tokenizer has no chat template; pass token ids or plain text instead")
    context = {
        "messages": [dict(message) for message in messages],
        "add_generation_prompt": add_generation_prompt,
        "enable_thinking": thinking,
        "bos_token": tokenizer.bos_token or "",
        "eos_token": tokenizer.eos_token or "",
        **extra,
    }
    try:
        return _compile(template).render(**context)
    except jinja2.exceptions.TemplateError as error:
        raise TemplateError(f"chat template: {error}") from None


def encode_text(tokenizer: TokenizerWrapper, text: str) -> list[int]:
    """Token ids of rendered text; the template writes <bos> itself, so none is added."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def special_id(tokenizer: TokenizerWrapper, token: str) -> int | None:
    """The id of a special token that exists as a single token, else None."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        return None
    return int(token_id)


class ReplyDecoder:
    """Turns generated token ids into answer and thinking text, streaming.

    Tokens between `<|channel>` and `<channel|>` are the model's thoughts (the
    first line there names the channel and is dropped); special tokens (EOS,
    pad, turn markers) are never shown.
    """

    def __init__(self, tokenizer: TokenizerWrapper):
        self.tokenizer = tokenizer
        self.open_id = special_id(tokenizer, CHANNEL_OPEN)
        self.close_id = special_id(tokenizer, CHANNEL_CLOSE)
        self.hidden = set(tokenizer.all_special_ids)
        self.answer = ""
        self.thinking = ""
        self._in_channel = False
        self._channel_named = False
        self._detokenizer = tokenizer.detokenizer
        self._detokenizer.reset()

    def add(self, token_ids: Sequence[int]) -> tuple[str, str]:
        """Feed committed tokens; returns the (answer, thinking) text they complete."""
        answer, thinking = [], []
        for token in token_ids:
            if token in (self.open_id, self.close_id):
                self._flush(answer, thinking)
                self._in_channel = token == self.open_id
                self._channel_named = False
                continue
            if token in self.hidden:
                continue
            self._detokenizer.add_token(token)
            self._take(answer, thinking)
        self.answer += "".join(answer)
        self.thinking += "".join(thinking)
        return "".join(answer), "".join(thinking)

    def finish(self) -> tuple[str, str]:
        answer, thinking = [], []
        self._flush(answer, thinking)
        self.answer += "".join(answer)
        self.thinking += "".join(thinking)
        return "".join(answer), "".join(thinking)

    def _take(self, answer: list[str], thinking: list[str]) -> None:
        segment = self._detokenizer.last_segment
        if not segment:
            return
        if self._in_channel:
            if not self._channel_named:
                # Drop the channel's name line ("thought\n").
                if "\n" not in segment:
                    return
                segment = segment.split("\n", 1)[1]
                self._channel_named = True
            thinking.append(segment)
        else:
            answer.append(segment)

    def _flush(self, answer: list[str], thinking: list[str]) -> None:
        self._detokenizer.finalize()
        self._take(answer, thinking)
        self._detokenizer.reset()
