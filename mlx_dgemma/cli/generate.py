"""`dgemma generate`: one prompt, the answer streamed to stdout."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from typing import Annotated, Any, TextIO

import typer

from ..generate import Commit, Done, GenerationResult, stream_generate
from ..images import load_image
from ..memory import DEFAULT_CONTEXT, IMAGE_PROMPT_TOKENS
from .common import (
    DEFAULT_MODEL,
    AdapterOption,
    FastOption,
    ImageOption,
    MaxTokensOption,
    ModelOption,
    SeedOption,
    SetOption,
    StepsOption,
    SystemOption,
    ThinkingOption,
    check_utf8,
    load_checkpoint,
    sampler_params,
    stats_line,
    status,
    tolerant_stdin,
    undecodable,
)
from .views import DIM, UNDIM, printable


def read_prompt(prompt: str | None) -> str:
    """PROMPT, or stdin for none or '-'; refuses an empty prompt and one that is not UTF-8."""
    if prompt is None or prompt == "-":
        if sys.stdin.isatty():
            status("reading the prompt from stdin; end it with Ctrl-D")
        tolerant_stdin()
        try:
            prompt = sys.stdin.read()
        except UnicodeDecodeError as error:
            raise undecodable(error) from None
    prompt = check_utf8(prompt).rstrip()
    if not prompt.strip():
        raise ValueError("empty prompt: pass PROMPT or pipe the prompt on stdin")
    return prompt


def result_json(result: GenerationResult) -> dict[str, Any]:
    return {
        "text": result.text,
        "thinking": result.thinking,
        "tokens": result.tokens,
        "finish_reason": result.finish_reason,
        "stats": asdict(result.stats),
    }


def _stream(events: Any, out: TextIO, err: TextIO, quiet: bool) -> GenerationResult:
    """Write each commit as it comes (thoughts on `err`; nothing when `quiet`); the final result.

    Terminals get the text with control characters defused; pipes get it as generated.
    """
    on_terminal, thoughts_on_terminal = out.isatty(), err.isatty()
    result: GenerationResult | None = None
    ended_line = True
    try:
        for event in events:
            if isinstance(event, Commit) and not quiet:
                if event.thinking:
                    thoughts = event.thinking
                    err.write(f"{DIM}{printable(thoughts)}{UNDIM}" if thoughts_on_terminal else thoughts)
                    err.flush()
                if event.text:
                    out.write(printable(event.text) if on_terminal else event.text)
                    out.flush()
                    ended_line = event.text.endswith("\n")
            elif isinstance(event, Done):
                result = event.result
    except KeyboardInterrupt:
        if not ended_line:
            out.write("\n")
        print("interrupted", file=err)
        raise typer.Exit(130) from None
    if result is None:
        raise RuntimeError("generation ended without a result")
    if not ended_line:
        out.write("\n")
    return result


def generate(
    prompt: Annotated[
        str | None,
        typer.Argument(metavar="PROMPT", help="The prompt. Without it, or with '-', the prompt is read from stdin."),
    ] = None,
    model: ModelOption = DEFAULT_MODEL,
    system: SystemOption = None,
    max_tokens: MaxTokensOption = None,
    steps: StepsOption = None,
    seed: SeedOption = None,
    thinking: ThinkingOption = False,
    fast: FastOption = False,
    image: ImageOption = None,
    adapter: AdapterOption = None,
    assignments: SetOption = None,
    json_output: Annotated[
        bool,
        typer.Option("--json", help="Print one JSON object: text, thinking, tokens, finish_reason, stats."),
    ] = False,
    show_stats: Annotated[bool, typer.Option("--stats", help="Print a statistics line on stderr at the end.")] = False,
) -> None:
    """Answer one prompt, streaming the answer to stdout as each canvas is committed.

    Thoughts (with --thinking) go to stderr, so stdout holds the answer alone. Images (--image, repeatable)
    go before the prompt's text, in the order given.
    """
    params = sampler_params(assignments, max_tokens, steps, seed, fast)
    # Images are read first: a bad file is refused before the model loads.
    images = [load_image(path) for path in image or []]
    text = read_prompt(prompt)
    if system is not None:
        check_utf8(system, "--system")
    # A long prompt needs more than the default context; a few characters per token is a safe guess, and an
    # image takes up to IMAGE_PROMPT_TOKENS.
    context = max(
        DEFAULT_CONTEXT,
        len(text) // 3 + len(images) * IMAGE_PROMPT_TOKENS + int(params.get("max_new_tokens", 0)),
    )
    loaded, tokenizer, _ = load_checkpoint(model, params, context, adapter)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    events = stream_generate(loaded, tokenizer, messages, images=images, thinking=thinking, drafts=False, **params)
    result = _stream(events, sys.stdout, sys.stderr, quiet=json_output)
    if json_output:
        sys.stdout.write(json.dumps(result_json(result), ensure_ascii=False) + "\n")
    sys.stdout.flush()
    if show_stats:
        print(stats_line(result), file=sys.stderr)
