"""`dgemma`: chat, generate, info, infill, edit, convert, serve, lora and fuse from the command line.

Every command resolves the model (a directory, or a hub repo id downloaded into
the Hugging Face cache), checks its weight files and that it fits this machine's
memory, then loads it. Errors users can cause (a missing model, a bad option, a
prompt beyond the context or not UTF-8) print one `error: ...` line on stderr
and exit 1; `--debug` adds the traceback.

One module per command; `common` holds what they share.
"""

from __future__ import annotations

import sys
import traceback
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated

import typer

from . import chat, convert, edit, fuse, generate, infill, info, lora, serve
from .common import DEFAULT_MODEL, DEFAULT_MODEL_EPILOG, KNOWN_ERRORS, State, one_line

try:  # typer >= 0.22 ships its own copy of click; older typers use click itself
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover
    from click import exceptions as click_errors

__all__ = ["DEFAULT_MODEL", "app", "main", "package_version"]

app = typer.Typer(
    name="dgemma",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def package_version() -> str:
    try:
        return version("mlx-dgemma")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _print_version(value: bool) -> None:
    if value:
        print(f"dgemma (mlx-dgemma) {package_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="On an error, show the full traceback too.")] = False,
    show_version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Run DiffusionGemma, Google's block-diffusion language model, locally on MLX.

    Without --model, chat and generate use the 4-bit MLX conversion
    mlx-community/diffusiongemma-26B-A4B-it-4bit, downloaded into the Hugging
    Face cache on first use.
    """
    State.debug = debug


app.command("convert")(convert.convert_command)
app.command("generate", epilog=DEFAULT_MODEL_EPILOG)(generate.generate)
app.command("chat", epilog=DEFAULT_MODEL_EPILOG)(chat.chat)
app.command("info", epilog=DEFAULT_MODEL_EPILOG)(info.info)
app.command("infill", epilog=DEFAULT_MODEL_EPILOG)(infill.infill)
app.command("edit", epilog=DEFAULT_MODEL_EPILOG)(edit.edit)
app.command("serve", epilog=DEFAULT_MODEL_EPILOG)(serve.serve)
app.command("lora", epilog=DEFAULT_MODEL_EPILOG)(lora.lora)
app.command("fuse", epilog=DEFAULT_MODEL_EPILOG)(fuse.fuse)

_NO_ARGS_IS_HELP = getattr(click_errors, "NoArgsIsHelpError", ())


def main(argv: list[str] | None = None) -> int:
    """The `dgemma` console script: known errors become one `error: ...` line and exit status 1."""
    State.debug = False
    try:
        result = app(args=argv, prog_name="dgemma", standalone_mode=False)
    except _NO_ARGS_IS_HELP:
        return 2  # the help is already printed
    except click_errors.ClickException as error:
        hint = ""
        if isinstance(error, click_errors.UsageError) and error.ctx is not None:
            hint = f" (see '{error.ctx.command_path} --help')"
        print(f"error: {one_line(error.format_message())}{hint}", file=sys.stderr)
        return error.exit_code
    except typer.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except KNOWN_ERRORS as error:
        if State.debug:
            traceback.print_exc()
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 1
    return result if isinstance(result, int) else 0
