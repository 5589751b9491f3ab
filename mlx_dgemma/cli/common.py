"""What the commands share: the default model, common options, sampler parameters, loading, and errors."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from ..config import ConfigError
from ..convert.errors import ConversionError
from ..generate import GenerationResult
from ..loader import LoadError, load, resolve_model_path
from ..memory import (
    DEFAULT_CONTEXT,
    InsufficientMemoryError,
    check_fits,
    check_weights,
    cuda_options_that_fit,
    format_bytes,
)
from ..sampler import SPEEDS, SamplerSettings
from ..tokenizer import TemplateError

DEFAULT_MODEL = "mlx-community/diffusiongemma-26B-A4B-it-4bit"
# Rich wraps the options table's [default: ...] inside a narrow column and cuts the model's name;
# command epilogs span the terminal's width, so the name is given there instead.
DEFAULT_MODEL_EPILOG = f"Default model: {DEFAULT_MODEL}"
# Sampler parameters users may set, and the names they may use for them.
SETTABLE = (
    "steps",
    "entropy_bound",
    "t_min",
    "t_max",
    "stability_threshold",
    "confidence_threshold",
    "seed",
    "speed",
)
INTEGER_PARAMS = {"steps", "stability_threshold", "seed", "max_new_tokens"}
WORD_PARAMS = {"speed": SPEEDS}
ALIASES = {"max_tokens": "max_new_tokens"}
SETTABLE_NAMES = (*SETTABLE, "max_tokens")
# Errors users can cause: one `error: ...` line, no traceback (unless --debug).
KNOWN_ERRORS = (
    LoadError,
    ConfigError,
    ConversionError,
    TemplateError,
    InsufficientMemoryError,
    ValueError,
    OSError,
)


class State:
    """Process-wide settings from the root options."""

    debug = False


# ----------------------------------------------------------------- options shared by the commands

ModelOption = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        envvar="DGEMMA_MODEL",
        show_default=False,
        help="Checkpoint directory, or a Hugging Face repo id (downloaded into the HF cache on first use). "
        "Default: see below.",
    ),
]
SystemOption = Annotated[str | None, typer.Option("--system", "-s", help="System prompt.")]
MaxTokensOption = Annotated[
    int | None,
    typer.Option("--max-tokens", "-n", min=1, help="Most new tokens per reply (default: the checkpoint's, or 256)."),
]
StepsOption = Annotated[
    int | None,
    typer.Option(
        "--steps",
        min=1,
        help="Most denoising steps per canvas; fewer is faster and rougher (default: the checkpoint's, or 48).",
    ),
]
SeedOption = Annotated[
    int | None, typer.Option("--seed", min=0, help="Random seed; the same seed gives the same reply (default: 0).")
]
ThinkingOption = Annotated[
    bool, typer.Option("--thinking/--no-thinking", help="Let the model think before it answers (thoughts dimmed).")
]
FastOption = Annotated[
    bool,
    typer.Option(
        "--fast",
        help="Fast mode: forward only the canvas positions still changing. Faster, and approximate: the text may "
        "differ from the exact model's (README: Fast mode).",
    ),
]
ImageOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--image",
        metavar="PATH",
        help="An image (PNG, JPEG, WebP, GIF, BMP, TIFF) for the model to look at; repeatable.",
    ),
]
AdapterOption = Annotated[
    Path | None,
    typer.Option(
        "--adapter",
        metavar="DIR",
        help="A LoRA adapter directory (from dgemma lora: adapters.safetensors, adapter_config.json) to put on "
        "the model; refused if it was trained on another model.",
    ),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help=f"Any sampler parameter; repeatable. Keys: {', '.join(SETTABLE_NAMES)}.",
    ),
]


# ----------------------------------------------------------------- sampler parameters


def parse_assignments(items: list[str]) -> dict[str, int | float | str]:
    """`["steps=8", "t_min=0.3", "speed=fast"]` -> {"steps": 8, "t_min": 0.3, "speed": "fast"}; one-line ValueError
    on a bad item."""
    params: dict[str, int | float | str] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().lower().replace("-", "_")
        if not sep or not key or not raw.strip():
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        name = ALIASES.get(key, key)
        if name not in (*SETTABLE, "max_new_tokens"):
            raise ValueError(f"unknown sampler parameter {key!r}; choose from {', '.join(SETTABLE_NAMES)}")
        raw = raw.strip()
        if name in WORD_PARAMS:
            if raw.lower() not in WORD_PARAMS[name]:
                raise ValueError(f"{key} must be one of {', '.join(WORD_PARAMS[name])}, got {raw!r}")
            params[name] = raw.lower()
            continue
        try:
            value: int | float = int(raw) if name in INTEGER_PARAMS else float(raw)
        except ValueError:
            kind = "an integer" if name in INTEGER_PARAMS else "a number"
            raise ValueError(f"{key} must be {kind}, got {raw!r}") from None
        if name == "seed" and value < 0:
            raise ValueError(f"seed must be >= 0, got {value}")
        params[name] = value
    return params


def sampler_params(
    assignments: list[str] | None, max_tokens: int | None, steps: int | None, seed: int | None, fast: bool = False
) -> dict[str, int | float | str]:
    """--set's parameters, overridden by the dedicated options that were given."""
    params = parse_assignments(assignments or [])
    for name, value in (("max_new_tokens", max_tokens), ("steps", steps), ("seed", seed)):
        if value is not None:
            params[name] = value
    if fast:
        params["speed"] = "fast"
    return params


def settings_error(error: ValueError) -> ValueError:
    """SamplerSettings' message without its dump of every field."""
    return ValueError(str(error).split(" (got ", 1)[0])


# ----------------------------------------------------------------- text from the user


def check_utf8(text: str, what: str = "the prompt") -> str:
    """`text` unchanged, or a one-line ValueError when it holds bytes that are not UTF-8.

    Python hands undecodable bytes of argv (and of stdin under a C locale) over as
    lone surrogates, which the tokenizer refuses with a TypeError deep inside.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        char = ord(text[error.start])
        detail = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"character U+{char:04X}"
        raise ValueError(f"{what} is not valid UTF-8 ({detail} at character {error.start + 1})") from None
    return text


def undecodable(error: UnicodeDecodeError, what: str = "the prompt") -> ValueError:
    """The one-line error for text read with strict decoding."""
    return ValueError(f"{what} is not valid UTF-8 (byte 0x{error.object[error.start]:02x} at byte {error.start + 1})")


def tolerant_stdin() -> None:
    """Undecodable bytes on stdin arrive as surrogates (which `check_utf8` reports) instead of raising
    inside a read, which would drop the rest of the buffered input with them."""
    reconfigure = getattr(sys.stdin, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="surrogateescape")


# ----------------------------------------------------------------- output


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def status(message: str) -> None:
    """Progress notes on stderr, only for a person watching: scripts get stderr for errors alone."""
    if sys.stderr.isatty():
        stderr_console().print(Text(message, style="dim"))


def one_line(error: BaseException | str) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def stats_line(result: GenerationResult) -> str:
    """One line: tokens, speed, denoising steps per canvas, tokens per forward pass."""
    stats = result.stats
    line = (
        f"{stats.generation_tokens} tokens · {stats.generation_tps:.1f} tokens/s · "
        f"{stats.steps_per_canvas:.1f} steps/canvas · {stats.tokens_per_forward:.2f} tokens/forward"
    )
    if result.finish_reason == "length":
        line += " · stopped at the token limit"
    return line


# ----------------------------------------------------------------- loading


def load_checkpoint(
    name: str, params: dict[str, int | float | str], context: int = DEFAULT_CONTEXT, adapter: Path | None = None
) -> tuple[Any, Any, Path]:
    """Resolve, check the parameters, the weight files and the memory need (for `context` tokens), then load,
    with the LoRA adapter at `adapter` if given (its directory and config are checked before the model loads)."""
    if adapter is not None:
        from ..lora.adapters import read_adapter_config  # mlx_lm's tuner loads only for an adapter

        read_adapter_config(adapter.expanduser())  # a missing or unreadable adapter: one line, before the load
    if not Path(name).expanduser().exists() and name.count("/") == 1 and not name.startswith((".", "/", "~")):
        status(f"fetching {name} (cached after the first download)")
    path = resolve_model_path(name)
    try:
        SamplerSettings.from_checkpoint(path).updated(**params)
    except ValueError as error:
        raise settings_error(error) from None
    estimate = check_fits(path, context)  # reads config.json first: its errors come before the weights'
    check_weights(path)
    cuda_options, _ = cuda_options_that_fit(path, estimate)
    if cuda_options is not None:
        status("keeping the dense layers quantized: dequantized (this GPU's faster path) they would not fit")
    status(f"loading {path} ({format_bytes(estimate.weights)})")
    start = time.perf_counter()
    with_adapter = {} if adapter is None else {"adapter_path": adapter}
    model, tokenizer = load(path, cuda_options=cuda_options, **with_adapter)
    if adapter is not None:
        status(f"with the adapter {adapter}")
    status(f"loaded in {time.perf_counter() - start:.1f} s")
    return model, tokenizer, path
