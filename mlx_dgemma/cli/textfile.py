"""What `dgemma infill` and `dgemma edit` share: the FILE argument, --in-place, and writing the result."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ..files import write_in_place
from .common import status

InPlaceOption = Annotated[
    bool,
    typer.Option(
        "--in-place", "-i", help="Write the result back to FILE (atomically; the old file is kept as FILE.bak)."
    ),
]
FileArgument = Annotated[Path, typer.Argument(metavar="FILE", help="A UTF-8 text file.")]


def emit(path: Path, text: str, in_place: bool) -> None:
    """Print `text`, or write it over `path`; a failed write prints it instead, so the result is never lost."""
    if not in_place:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    try:
        backup = write_in_place(path, text)
    except OSError as error:
        sys.stdout.write(text)
        sys.stdout.flush()
        raise OSError(f"{error}; the result is on stdout instead, {path} is unchanged") from None
    status(f"wrote {path} (previous version in {backup})")
