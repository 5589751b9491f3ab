"""`dgemma edit`: rewrite a span of lines, starting from their current text."""

from __future__ import annotations

from typing import Annotated

import typer

from ..constrained import edit as rewrite_span
from ..files import read_text, span_of_lines
from ..memory import DEFAULT_CONTEXT
from .common import (
    DEFAULT_MODEL,
    AdapterOption,
    FastOption,
    ModelOption,
    SeedOption,
    StepsOption,
    check_utf8,
    load_checkpoint,
    sampler_params,
)
from .textfile import FileArgument, InPlaceOption, emit


def edit(
    file: FileArgument,
    lines: Annotated[
        str, typer.Option("--lines", "-l", metavar="A-B", help="The lines to rewrite, 1-based, inclusive.")
    ],
    instruction: Annotated[
        str | None, typer.Option("--instruction", help="What to change, e.g. 'use a list comprehension'.")
    ] = None,
    model: ModelOption = DEFAULT_MODEL,
    steps: StepsOption = None,
    seed: SeedOption = None,
    fast: FastOption = False,
    in_place: InPlaceOption = False,
    adapter: AdapterOption = None,
) -> None:
    """Rewrite lines A-B of FILE, starting from their current text instead of noise.

    The rest of the file stays as it is (the text after the span is pinned in
    the canvas). Prints the whole file (or writes it back with --in-place).
    Example: dgemma edit app.py --lines 10-14 --instruction "add type hints"
    """
    text = read_text(file)
    start, end = span_of_lines(text, lines)
    if instruction is not None:
        check_utf8(instruction, "--instruction")
    params = sampler_params(None, None, steps, seed, fast)
    loaded, tokenizer, _ = load_checkpoint(model, params, max(DEFAULT_CONTEXT, len(text) // 2), adapter)
    result = rewrite_span(loaded, tokenizer, text, start, end, instruction, **params)
    emit(file, result.text, in_place)
