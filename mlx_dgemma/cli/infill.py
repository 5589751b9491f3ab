"""`dgemma infill`: fill a hole in a file from the text on both sides."""

from __future__ import annotations

from typing import Annotated

import typer

from ..constrained import infill as fill_in
from ..files import offset_of, read_text
from ..memory import DEFAULT_CONTEXT
from .common import (
    DEFAULT_MODEL,
    AdapterOption,
    FastOption,
    ModelOption,
    SeedOption,
    StepsOption,
    load_checkpoint,
    sampler_params,
)
from .textfile import FileArgument, InPlaceOption, emit


def infill(
    file: FileArgument,
    at: Annotated[
        str,
        typer.Option(
            "--at", metavar="LINE[:COL]", help="Where the hole opens: a line (its start) or LINE:COL, 1-based."
        ),
    ],
    tokens: Annotated[
        int, typer.Option("--tokens", "-t", min=1, help="Most tokens the model may put in the hole.")
    ] = 64,
    model: ModelOption = DEFAULT_MODEL,
    steps: StepsOption = None,
    seed: SeedOption = None,
    fast: FastOption = False,
    in_place: InPlaceOption = False,
    adapter: AdapterOption = None,
) -> None:
    """Fill in text at a position of FILE, using what comes before and after it.

    Every canvas position sees every other, so the fill fits the text on both
    sides. Prints the whole file with the fill (or writes it back with
    --in-place). Example: dgemma infill app.py --at 12 --tokens 48
    """
    text = read_text(file)
    offset = offset_of(text, at)
    params = sampler_params(None, None, steps, seed, fast)
    loaded, tokenizer, _ = load_checkpoint(model, params, max(DEFAULT_CONTEXT, len(text) // 3 + tokens), adapter)
    result = fill_in(loaded, tokenizer, text[:offset], text[offset:], hole_tokens=tokens, **params)
    emit(file, result.text, in_place)
