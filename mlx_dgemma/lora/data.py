"""Training data: `train.jsonl`, `valid.jsonl` and (optionally) `test.jsonl` in mlx-lm's formats.

One JSON object a line, each in one of mlx-lm's formats:
- `{"messages": [{"role": ..., "content": ...}, ...]}` (optionally `"tools"`): a chat, rendered through the
  checkpoint's chat template; the response is the last assistant message, everything before it the prompt;
- `{"prompt": ..., "completion": ...}`: a one-turn chat of a user prompt and the assistant's completion;
- `{"text": ...}`: plain text, all of it the response (after <bos>), closed with EOS.

The prompt ends as generation sees it (the template's generation prompt, with thinking off); the response is
the assistant's reply as the template writes it, its end-of-turn marker included. Only response tokens are
ever counted in the loss (mlx-lm's `mask_prompt`).

Every problem is a one-line `DataError` naming the file and line.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..tokenizer import TemplateError, encode_text, render_chat
from .objective import Example

SPLITS = ("train", "valid", "test")
LONG_SEQUENCES = ("truncate", "drop")
_SENTINEL = "DGEMMAREPLYSENTINEL"


class DataError(ValueError):
    """Training data that cannot be used; the message is one line."""


@dataclass
class Dataset:
    name: str
    examples: list[Example]
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def tokens(self) -> int:
        return sum(len(example.tokens) for example in self.examples)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) for every non-blank line; DataError on the first one that is not a JSON object."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text (byte {error.start + 1})") from None
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path.name} line {number}: not valid JSON ({error.msg} at column {error.colno})"
            ) from None
        if not isinstance(record, dict):
            raise DataError(f"{path.name} line {number}: expected a JSON object, got {type(record).__name__}")
        records.append((number, record))
    return records


def _common_prefix(a: str, b: str) -> int:
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count


def _chat_example(tokenizer: Any, messages: Sequence[dict[str, Any]], tools: Any) -> Example:
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError("'messages' must be a list of objects with a 'role'")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ValueError("no assistant message: nothing to learn")
    reply = messages[last]
    content = reply.get("content")
    if not reply.get("tool_calls") and (not isinstance(content, str) or not content.strip()):
        if not (isinstance(content, list) and content):
            raise ValueError("the assistant's reply is empty: nothing to learn")
    history = list(messages[:last])
    extra = {"tools": tools} if tools else {}
    before = render_chat(tokenizer, history, add_generation_prompt=False, **extra)
    prompt = render_chat(tokenizer, history, add_generation_prompt=True, **extra)
    full = render_chat(tokenizer, history + [reply], add_generation_prompt=False, **extra)
    if not full.startswith(before) or not prompt.startswith(before):
        raise ValueError("the chat template does not render this conversation as its history plus one more turn")
    turn = full[len(before) :]
    # The turn's header (what precedes the reply's text): where a sentinel reply's text starts.
    probe = render_chat(tokenizer, history + [{"role": "assistant", "content": _SENTINEL}], False, **extra)
    at = probe.find(_SENTINEL, len(before))
    header = probe[len(before) : at] if at >= 0 and turn.startswith(probe[len(before) : at]) else None
    if header is None:
        header = turn[: _common_prefix(turn, prompt[len(before) :])]
    response = turn[len(header) :].rstrip()
    prompt_ids = encode_text(tokenizer, prompt)
    response_ids = encode_text(tokenizer, response)
    if not response_ids:
        raise ValueError("the assistant's reply renders to no tokens")
    if not prompt_ids:
        prompt_ids = [tokenizer.bos_token_id]
    return Example(tuple(prompt_ids + response_ids), len(prompt_ids))


def _text_example(tokenizer: Any, text: Any) -> Example:
    if not isinstance(text, str) or not text.strip():
        raise ValueError("'text' is empty: nothing to learn")
    ids = encode_text(tokenizer, text)
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    bos = tokenizer.bos_token_id
    return Example(tuple([bos if bos is not None else eos] + ids), 1)


def _plain_completion(tokenizer: Any, prompt: str, completion: str) -> Example:
    """Prompt and completion without a chat template (a tokenizer that has none)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    head = [bos] if bos is not None else []
    prompt_ids = head + encode_text(tokenizer, prompt)
    response_ids = encode_text(tokenizer, completion) + ([eos] if eos is not None else [])
    return Example(tuple(prompt_ids + response_ids), len(prompt_ids))


def record_to_example(tokenizer: Any, record: dict[str, Any]) -> Example:
    """One record in any of the three formats; ValueError (one line) when it cannot be used."""
    if "messages" in record:
        return _chat_example(tokenizer, record["messages"], record.get("tools"))
    if "prompt" in record or "completion" in record:
        prompt, completion = record.get("prompt"), record.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError("'prompt' and 'completion' must both be strings")
        if not completion.strip():
            raise ValueError("the completion is empty: nothing to learn")
        if not getattr(tokenizer, "chat_template", None):
            return _plain_completion(tokenizer, prompt, completion)
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return _chat_example(tokenizer, messages, None)
    if "text" in record:
        return _text_example(tokenizer, record["text"])
    keys = ", ".join(sorted(record)) or "none"
    raise ValueError(f"no 'messages', 'prompt'/'completion' or 'text' (keys: {keys})")


def _fit(example: Example, max_length: int, long_sequences: str) -> Example | None:
    """`example` within `max_length` tokens: truncated (None when no response token would be left) or dropped."""
    if len(example.tokens) <= max_length:
        return example
    if long_sequences == "drop" or example.response_start >= max_length:
        return None
    return Example(example.tokens[:max_length], example.response_start)


def load_split(path: Path, tokenizer: Any, max_seq_length: int, long_sequences: str = "truncate") -> Dataset:
    if long_sequences not in LONG_SEQUENCES:
        raise DataError(f"--long-sequences must be one of {', '.join(LONG_SEQUENCES)}, got {long_sequences!r}")
    records = read_jsonl(path)
    if not records:
        raise DataError(f"{path} holds no records")
    examples: list[Example] = []
    long = kept_short = 0
    for number, record in records:
        try:
            example = record_to_example(tokenizer, record)
        except TemplateError as error:
            raise DataError(f"{path.name} line {number}: {_one_line(error)}") from None
        except (ValueError, TypeError, KeyError) as error:
            raise DataError(f"{path.name} line {number}: {_one_line(error)}") from None
        fitted = _fit(example, max_seq_length, long_sequences)
        if fitted is not example:
            long += 1
            kept_short += fitted is not None
        if fitted is not None:
            examples.append(fitted)
    notes = []
    if long:
        dropped = long - kept_short
        what = []
        if kept_short:
            what.append(f"{kept_short} truncated")
        if dropped:
            what.append(f"{dropped} dropped" + (" (their prompts alone fill it)" if long_sequences != "drop" else ""))
        notes.append(
            f"{path.name}: {long} of {len(records)} records are longer than --max-seq-length {max_seq_length} "
            f"tokens: {', '.join(what)}"
        )
    if not examples:
        raise DataError(
            f"{path.name}: every record is longer than --max-seq-length {max_seq_length} tokens; raise it "
            "or use shorter records"
        )
    return Dataset(path.stem, examples, notes)


def load_datasets(
    directory: str | Path,
    tokenizer: Any,
    max_seq_length: int,
    long_sequences: str = "truncate",
    test: bool = False,
) -> dict[str, Dataset]:
    """train and valid (required), test (when `test`): DataError for a missing or empty directory or file."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise DataError(f"no data directory at {directory}")
    if not any(directory.iterdir()):
        raise DataError(f"the data directory {directory} is empty: put train.jsonl and valid.jsonl in it")
    names = ["train", "valid"] + (["test"] if test else [])
    sets = {}
    for name in names:
        path = directory / f"{name}.jsonl"
        if not path.is_file():
            raise DataError(f"no {name}.jsonl in {directory} (train.jsonl and valid.jsonl are required)")
        sets[name] = load_split(path, tokenizer, max_seq_length, long_sequences)
    return sets


# ----------------------------------------------------------------- batches


def length_batches(examples: Sequence[Example], batch_size: int) -> list[list[int]]:
    """Indices of `examples` in batches of `batch_size`, neighbours in length together (less padding); a
    remainder that does not fill a batch is left out of the epoch (as mlx-lm does)."""
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i].tokens), i))
    return [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]


def training_batch(
    examples: Sequence[Example], batches: Sequence[list[int]], seed: int, iteration: int
) -> list[Example]:
    """The batch of (0-based) `iteration`: epochs visit every batch once in an order drawn from (seed, epoch),
    so any iteration's batch is known without replaying the ones before (what `--resume` relies on)."""
    epoch, index = divmod(iteration, len(batches))
    order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(len(batches))
    return [examples[i] for i in batches[order[index]]]
