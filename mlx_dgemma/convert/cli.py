"""`dgemma convert`: the Typer command around convert_checkpoint."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mlx_dgemma.config import ConfigError, ModelConfig
from mlx_dgemma.memory import quantization_summary

from .errors import ConversionError
from .pipeline import Progress as ProgressCallback
from .pipeline import convert_checkpoint
from .quantize import DTYPES, RECIPES, SUPPORTED_BITS, SUPPORTED_GROUP_SIZES

# Plain (non-TTY) progress prints about this many lines per conversion.
PLAIN_PROGRESS_LINES = 20


def one_of(*choices: object) -> Callable[[object], object]:
    """A Typer callback that turns a value outside CHOICES into a usage error (an option left out, None, passes)."""

    def check(value: object) -> object:
        if value is not None and value not in choices:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(map(str, choices))}")
        return value

    return check


def convert_command(
    src: Annotated[
        str,
        typer.Argument(help="Source checkpoint: a local Hugging Face directory or a hub repo id."),
    ],
    dst: Annotated[Path, typer.Argument(help="Output directory for the MLX checkpoint (must not exist).")],
    dtype: Annotated[
        str,
        typer.Option(
            callback=one_of(*DTYPES),
            metavar="[bfloat16|float16|float32]",
            help="Float dtype of every unquantized tensor and of the quantization scales.",
        ),
    ] = "bfloat16",
    bits: Annotated[
        int,
        typer.Option(
            callback=one_of(*SUPPORTED_BITS),
            metavar="[4|8]",
            help="Bits per weight for the experts (and, with --recipe uniform, every quantized layer).",
        ),
    ] = 4,
    group_size: Annotated[
        int,
        typer.Option(
            callback=one_of(*SUPPORTED_GROUP_SIZES),
            metavar="[32|64|128]",
            help="Weights sharing one scale and bias; tensors whose width it does not divide stay float.",
        ),
    ] = 64,
    recipe: Annotated[
        str,
        typer.Option(
            callback=one_of(*RECIPES),
            metavar="[mixed|uniform|none]",
            help="mixed: experts at --bits, attention, dense MLPs, self-conditioning and embedding at 8 bits; "
            "uniform: all of those at --bits; none: only cast to --dtype. Router, norms, scalars and the "
            "vision tower are never quantized.",
        ),
    ] = "mixed",
    text_only: Annotated[
        bool, typer.Option("--text-only", help="Drop the vision tower and vision_config (text generation only).")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Replace DST if it exists (only once the new checkpoint is complete).")
    ] = False,
    revision: Annotated[str | None, typer.Option(help="Hub branch, tag or commit when SRC is a repo id.")] = None,
) -> None:
    """Convert a DiffusionGemma checkpoint to MLX safetensors, optionally quantized.

    The whole source is validated (config, tensor names, shapes, truncated
    shards) before anything is written; tensors are then converted one at a
    time, so memory stays near the largest tensor plus one output shard.
    """
    err = Console(stderr=True)
    try:
        with progress_reporter(err) as report:
            out = convert_checkpoint(
                src,
                dst,
                dtype=dtype,
                bits=bits,
                group_size=group_size,
                recipe=recipe,
                text_only=text_only,
                force=force,
                revision=revision,
                progress=report,
            )
    except (ConversionError, ConfigError, OSError) as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        raise typer.Exit(code=1) from None
    print(f"converted {src} -> {out}", file=sys.stderr)
    print(f"quantization: {quantization_summary(ModelConfig.from_path(out))}", file=sys.stderr)


@contextmanager
def progress_reporter(
    console: Console, doing: str = "converting", done_line: str = "converted {done}/{total} tensors"
) -> Iterator[ProgressCallback]:
    """A rich bar on a terminal (`doing` before it), a few plain `done_line`s otherwise (logs, CI)."""
    if not console.is_terminal:
        yield _plain_reporter(done_line)
        return
    columns = (
        TextColumn(doing),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("", total=None)

        def report(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, description=name)

        yield report


def _plain_reporter(done_line: str) -> ProgressCallback:
    def report(done: int, total: int, name: str) -> None:
        step = max(1, total // PLAIN_PROGRESS_LINES)
        if done % step == 0 or done == total:
            print(done_line.format(done=done, total=total), file=sys.stderr, flush=True)

    return report


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__
