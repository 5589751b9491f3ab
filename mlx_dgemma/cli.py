"""`dgemma`: chat, generate, info and convert from the command line.

Every command resolves the model (a directory, or a hub repo id downloaded into
the Hugging Face cache), checks that it fits this machine's memory, then loads
it. Errors users can cause (a missing model, a bad option, a prompt beyond the
context) print one `error: ...` line on stderr and exit 1; `--debug` adds the
traceback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, TextIO

import typer
from rich.cells import cell_len
from rich.console import Console
from rich.text import Text

from .convert.cli import convert_command
from .convert.errors import ConversionError

from .config import ConfigError, ModelConfig
from .constrained import edit as rewrite_span
from .constrained import infill as fill_in
from .files import offset_of, read_text, span_of_lines, write_in_place
from .generate import Chat, Commit, Done, Draft, GenerationResult, stream_generate
from .loader import LoadError, dense_weights_here, load, resolve_model_path
from .memory import (
    DEFAULT_CONTEXT,
    InsufficientMemoryError,
    available_memory,
    check_fits,
    checkpoint_dtype,
    count_parameters,
    dense_weights_that_fit,
    estimate_memory,
    format_bytes,
    format_count,
    model_bytes,
    quantization_summary,
    vision_bytes,
)
from .sampler import SamplerSettings
from .tokenizer import TemplateError

try:  # typer >= 0.22 ships its own copy of click; older typers use click itself
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover
    from click import exceptions as click_errors

DEFAULT_MODEL = "mlx-community/diffusiongemma-26B-A4B-it-4bit"
# Sampler parameters users may set, and the names they may use for them.
SETTABLE = ("steps", "entropy_bound", "t_min", "t_max", "stability_threshold", "confidence_threshold", "seed")
INTEGER_PARAMS = {"steps", "stability_threshold", "seed", "max_new_tokens"}
ALIASES = {"max_tokens": "max_new_tokens"}
SETTABLE_NAMES = (*SETTABLE, "max_tokens")
DRAFT_FPS = 30  # drafts arriving faster than this are skipped: the next one replaces them anyway
HISTORY_LENGTH = 1000
KNOWN_ERRORS = (
    LoadError,
    ConfigError,
    ConversionError,
    TemplateError,
    InsufficientMemoryError,
    ValueError,
    OSError,
)


class _State:
    debug = False


app = typer.Typer(
    name="dgemma",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="On an error, show the full traceback too.")] = False,
) -> None:
    """Run DiffusionGemma, Google's block-diffusion language model, locally on MLX.

    Without --model, chat and generate use the 4-bit MLX conversion
    mlx-community/diffusiongemma-26B-A4B-it-4bit, downloaded into the Hugging
    Face cache on first use.
    """
    _State.debug = debug


app.command("convert")(convert_command)


# ----------------------------------------------------------------- options shared by chat and generate

ModelOption = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        envvar="DGEMMA_MODEL",
        help="Checkpoint directory, or a Hugging Face repo id (downloaded into the HF cache on first use).",
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
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help=f"Any sampler parameter; repeatable. Keys: {', '.join(SETTABLE_NAMES)}.",
    ),
]


def parse_assignments(items: list[str]) -> dict[str, int | float]:
    """`["steps=8", "t_min=0.3"]` -> {"steps": 8, "t_min": 0.3}; one-line ValueError on a bad item."""
    params: dict[str, int | float] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().lower().replace("-", "_")
        if not sep or not key or not raw.strip():
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        name = ALIASES.get(key, key)
        if name not in (*SETTABLE, "max_new_tokens"):
            raise ValueError(f"unknown sampler parameter {key!r}; choose from {', '.join(SETTABLE_NAMES)}")
        raw = raw.strip()
        try:
            value: int | float = int(raw) if name in INTEGER_PARAMS else float(raw)
        except ValueError:
            kind = "an integer" if name in INTEGER_PARAMS else "a number"
            raise ValueError(f"{key} must be {kind}, got {raw!r}") from None
        if name == "seed" and value < 0:
            raise ValueError(f"seed must be >= 0, got {value}")
        params[name] = value
    return params


def _sampler_params(
    assignments: list[str] | None, max_tokens: int | None, steps: int | None, seed: int | None
) -> dict[str, int | float]:
    params = parse_assignments(assignments or [])
    # Dedicated options win over --set.
    for name, value in (("max_new_tokens", max_tokens), ("steps", steps), ("seed", seed)):
        if value is not None:
            params[name] = value
    return params


def _settings_error(error: ValueError) -> ValueError:
    """SamplerSettings' message without its dump of every field."""
    return ValueError(str(error).split(" (got ", 1)[0])


def _stderr() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def _status(message: str) -> None:
    """Progress notes on stderr, only for a person watching: scripts get stderr for errors alone."""
    if sys.stderr.isatty():
        _stderr().print(Text(message, style="dim"))


def _load_model(name: str, params: dict[str, int | float], context: int = DEFAULT_CONTEXT) -> tuple[Any, Any, Path]:
    """Resolve, check the parameters and the memory need (for `context` tokens), then load."""
    if not Path(name).expanduser().exists() and name.count("/") == 1 and not name.startswith((".", "/", "~")):
        _status(f"fetching {name} (cached after the first download)")
    path = resolve_model_path(name)
    try:
        SamplerSettings.from_checkpoint(path).updated(**params)
    except ValueError as error:
        raise _settings_error(error) from None
    estimate = check_fits(path, context)
    dense_weights, _ = dense_weights_that_fit(path, estimate)
    if dense_weights == "quantized":
        _status("keeping the dense layers quantized: dequantized (this GPU's faster path) they would not fit")
    _status(f"loading {path} ({format_bytes(estimate.weights)})")
    start = time.perf_counter()
    model, tokenizer = load(path, dense_weights=dense_weights)
    _status(f"loaded in {time.perf_counter() - start:.1f} s")
    return model, tokenizer, path


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


# ----------------------------------------------------------------- generate


def _read_prompt(prompt: str | None) -> str:
    if prompt is None or prompt == "-":
        if sys.stdin.isatty():
            _status("reading the prompt from stdin; end it with Ctrl-D")
        prompt = sys.stdin.read()
    prompt = prompt.rstrip()
    if not prompt.strip():
        raise ValueError("empty prompt: pass PROMPT or pipe the prompt on stdin")
    return prompt


def _result_json(result: GenerationResult) -> dict[str, Any]:
    return {
        "text": result.text,
        "thinking": result.thinking,
        "tokens": result.tokens,
        "finish_reason": result.finish_reason,
        "stats": asdict(result.stats),
    }


@app.command()
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
    assignments: SetOption = None,
    json_output: Annotated[
        bool,
        typer.Option("--json", help="Print one JSON object: text, thinking, tokens, finish_reason, stats."),
    ] = False,
    show_stats: Annotated[bool, typer.Option("--stats", help="Print a statistics line on stderr at the end.")] = False,
) -> None:
    """Answer one prompt, streaming the answer to stdout as each canvas is committed.

    Thoughts (with --thinking) go to stderr, so stdout holds the answer alone.
    """
    params = _sampler_params(assignments, max_tokens, steps, seed)
    text = _read_prompt(prompt)
    # A long prompt needs more than the default context; a few characters per token is a safe guess.
    context = max(DEFAULT_CONTEXT, len(text) // 3 + int(params.get("max_new_tokens", 0)))
    loaded, tokenizer, _ = _load_model(model, params, context)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    out, err = sys.stdout, sys.stderr
    # Terminals get the text with control characters defused; pipes get it as generated.
    on_terminal, thoughts_on_terminal = out.isatty(), err.isatty()
    result: GenerationResult | None = None
    ended_line = True
    try:
        for event in stream_generate(loaded, tokenizer, messages, thinking=thinking, drafts=False, **params):
            if isinstance(event, Commit) and not json_output:
                if event.thinking:
                    thoughts = event.thinking
                    err.write(f"{DIM}{_printable(thoughts)}{UNDIM}" if thoughts_on_terminal else thoughts)
                    err.flush()
                if event.text:
                    out.write(_printable(event.text) if on_terminal else event.text)
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
    if json_output:
        out.write(json.dumps(_result_json(result), ensure_ascii=False) + "\n")
    elif not ended_line:
        out.write("\n")
    out.flush()
    if show_stats:
        print(stats_line(result), file=err)


# ----------------------------------------------------------------- chat


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
DIM, UNDIM = "\x1b[2m", "\x1b[22m"


def _printable(text: str) -> str:
    """Text safe to show on a terminal: control characters (escape sequences) become U+FFFD."""
    return _CONTROL.sub("\ufffd", text.replace("\t", "    "))


def _advance(text: str, col: int, width: int) -> tuple[int, int]:
    """Rows moved down and the final column after writing `text` from column `col`.

    Models the terminal's wrap: a character that does not fit wraps first, so a
    line filled exactly leaves the cursor on it (col == width).
    """
    rows = 0
    for char in text:
        if char == "\n":
            rows, col = rows + 1, 0
            continue
        width_of = cell_len(char)
        if col + width_of > width:
            rows, col = rows + 1, 0
        col += width_of
    return rows, col


def _fit(text: str, col: int, width: int, max_rows: int) -> tuple[str, int]:
    """`text` cut (with an ellipsis) to end within `max_rows` rows below the start; the rows it spans."""
    rows = 0
    for index, char in enumerate(text):
        step, col = _advance(char, col, width)
        rows += step
        if rows >= max_rows:
            rest, _ = _advance("…", col, width)
            return text[: index + 1] + "…", rows + rest
    return text, rows


class _PlainReply:
    """A reply written as it is committed: thoughts first (dimmed on a terminal), then the answer."""

    def __init__(self, out: TextIO, style: bool):
        self.out, self.style = out, style
        self.col = 0
        self.thought = self.answered = False

    def start(self) -> None:
        pass

    def draft(self, text: str) -> None:
        pass

    def _write(self, text: str, dim: bool = False) -> None:
        if self.style:
            text = _printable(text)
        _, self.col = _advance(text, self.col, self._width())
        self.out.write(f"{DIM}{text}{UNDIM}" if dim and self.style else text)

    def _width(self) -> int:
        return max(shutil.get_terminal_size().columns, 10)

    def commit(self, answer: str, thinking: str) -> None:
        if thinking:
            self._write(thinking, dim=True)
            self.thought = True
        if answer:
            if self.thought and not self.answered:
                self._write("\n\n" if self.col else "\n")
            self._write(answer)
            self.answered = True
        self.out.flush()

    def finish(self) -> None:
        if self.col:
            self.out.write("\n")
            self.col = 0
        self.out.flush()


class _LiveReply(_PlainReply):
    """On a terminal: the current canvas's draft, dimmed, redrawn in place after the committed text."""

    def __init__(self, out: TextIO):
        super().__init__(out, style=True)
        self.draft_rows: int | None = None  # rows the shown draft reaches below the committed text
        self.last_draft = 0.0

    def start(self) -> None:
        self._show("…")

    def draft(self, text: str) -> None:
        now = time.monotonic()
        if now - self.last_draft < 1 / DRAFT_FPS:
            return
        self.last_draft = now
        self._show(_printable(text) or "…")

    def _show(self, text: str) -> None:
        self._erase()
        size = shutil.get_terminal_size()
        # Never taller than the screen: rows scrolled away could not be erased.
        shown, rows = _fit(text, self.col, max(size.columns, 10), max(1, size.lines - 3))
        self.out.write(f"{DIM}{shown}{UNDIM}")
        self.out.flush()
        self.draft_rows = rows

    def _erase(self) -> None:
        if self.draft_rows is None:
            return
        up = f"\x1b[{self.draft_rows}A" if self.draft_rows else ""
        # Back to where the committed text ends, then clear to the end of the screen.
        self.out.write(f"{up}\x1b[{self.col + 1}G\x1b[J")
        self.draft_rows = None

    def commit(self, answer: str, thinking: str) -> None:
        self._erase()
        super().commit(answer, thinking)
        if self.col >= self._width():
            # The cursor waits on the last column; a draft erased from there
            # would take the line's last character with it. Wrap explicitly.
            self.out.write("\r\n")
            self.col = 0
        self._show("…")

    def finish(self) -> None:
        self._erase()
        super().finish()


def _history_file() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "mlx-dgemma" / "history"


@contextmanager
def _line_editing() -> Iterator[Any]:
    """readline with a persistent history, when the platform has it; otherwise plain input()."""
    try:
        import readline
    except ImportError:
        yield None
        return
    path = _history_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)
        readline.read_history_file(path)
    except OSError:
        pass  # no history is better than no chat
    readline.set_history_length(HISTORY_LENGTH)
    try:
        yield readline
    finally:
        try:
            readline.write_history_file(path)  # trims the file to HISTORY_LENGTH
        except OSError:
            pass


HELP = """\
/reset               forget the conversation (the system prompt stays)
/system [TEXT]       set the system prompt and start over; without TEXT, remove it
/set [KEY=VALUE ...] change sampler parameters for the next replies; without arguments, show them
                     keys: {keys}
/stats               statistics of the last reply
/history             the conversation so far
/help                this help
/exit, /quit         leave (Ctrl-D too)
Ctrl-C stops a reply; what was already committed stays in the conversation.
Start a message with // to send one that begins with '/'."""


class ChatRepl:
    """The read-eval-print loop around a `Chat`."""

    def __init__(self, chat: Chat, out: TextIO, live: bool, interactive: bool):
        self.chat, self.out = chat, out
        self.live = live  # redraw drafts in place (stdout is a terminal, drafts wanted)
        self.interactive = interactive  # stdin is a terminal: prompt, line editing, history
        self.console = Console(file=out, highlight=False, soft_wrap=True)
        self.errors = _stderr()
        self.last: GenerationResult | None = None

    def say(self, message: str, style: str | None = None) -> None:
        self.console.print(Text(message, style=style or ""))

    def error(self, message: str) -> None:
        self.errors.print(Text(f"error: {message}", style="red"))

    def run(self) -> None:
        if not self.interactive:
            self._loop(None)
            return
        with _line_editing() as readline:
            self._loop(readline)

    def _loop(self, readline: Any) -> None:
        prompt = "> " if self.interactive else ""
        while True:
            self.out.flush()
            try:
                line = input(prompt)
            except KeyboardInterrupt:
                self.out.write("\n")  # Ctrl-C at the prompt: a fresh prompt
                continue
            except EOFError:
                if self.interactive:
                    self.out.write("\n")
                return
            if readline is not None and line.strip():
                try:
                    readline.append_history_file(1, str(_history_file()))
                except OSError:
                    pass
            line = line.strip()
            if not line:
                continue
            if line.startswith("/") and not line.startswith("//"):
                if not self.command(line):
                    return
                continue
            self.reply(line[1:] if line.startswith("//") else line)

    def reply(self, text: str) -> None:
        view = _LiveReply(self.out) if self.live else _PlainReply(self.out, style=self.out.isatty())
        events = None
        try:
            events = self.chat.stream(text, drafts=self.live)
            view.start()
            for event in events:
                if isinstance(event, Draft):
                    view.draft(event.text)
                elif isinstance(event, Commit):
                    view.commit(event.text, event.thinking)
                elif isinstance(event, Done):
                    self.last = event.result
            view.finish()
            if self.last is not None:
                self.say(stats_line(self.last), "dim")
        except KeyboardInterrupt:
            # Closing the stream lets Chat keep what was committed; it re-encodes
            # the conversation next turn.
            if events is not None:
                events.close()
            view.finish()
            self.say("[reply interrupted; the part already committed stays in the conversation]", "dim yellow")
        except ValueError as error:  # raised before any work: a prompt beyond the context, a template error
            view.finish()
            self.error(_one_line(error))
        finally:
            if events is not None:
                events.close()

    # --- slash commands; each returns False to leave the loop

    def command(self, line: str) -> bool:
        name, _, argument = line.partition(" ")
        argument = argument.strip()
        name = name.lower()
        if name in ("/exit", "/quit"):
            return False
        handlers = {
            "/reset": self._reset,
            "/system": self._system,
            "/set": self._set,
            "/stats": self._stats,
            "/history": self._history,
            "/help": self._help,
        }
        handler = handlers.get(name)
        if handler is None:
            self.error(f"unknown command {name}; /help lists the commands")
        else:
            handler(argument)
        return True

    def _reset(self, argument: str) -> None:
        self.chat.reset()
        self.say("conversation cleared", "dim")

    def _system(self, argument: str) -> None:
        self.chat.reset(system=argument)
        self.say("system prompt set; conversation cleared" if argument else "system prompt removed", "dim")

    def _set(self, argument: str) -> None:
        if not argument:
            self.say(self.describe_settings())
            return
        try:
            params = parse_assignments(argument.split())
            self.chat.set(**params)
        except ValueError as error:
            self.error(str(_settings_error(error)))
            return
        shown = {("max_tokens" if k == "max_new_tokens" else k): getattr(self.chat.settings, k) for k in params}
        self.say(" ".join(f"{k}={v}" for k, v in shown.items()), "dim")

    def describe_settings(self) -> str:
        settings = self.chat.settings
        values = [f"{name}={getattr(settings, name)}" for name in SETTABLE]
        values.append(f"max_tokens={settings.max_new_tokens}")
        system = self.chat.system or "(none)"
        return f"{' '.join(values)}\nthinking {'on' if self.chat.thinking else 'off'} · system prompt: {system}"

    def _stats(self, argument: str) -> None:
        if self.last is None:
            self.say("no reply yet", "dim")
            return
        stats = self.last.stats
        self.say(
            f"last reply   {stats.generation_tokens} tokens, finish_reason {self.last.finish_reason}\n"
            f"prompt       {stats.prompt_tokens} tokens encoded this turn at {stats.prompt_tps:.1f} tokens/s\n"
            f"generation   {stats.generation_tps:.1f} tokens/s\n"
            f"denoising    {stats.canvases} canvas{'es' if stats.canvases != 1 else ''}, {stats.denoising_steps} steps "
            f"({stats.steps_per_canvas:.1f} per canvas), {stats.tokens_per_forward:.2f} tokens per forward\n"
            f"peak memory  {stats.peak_memory_gb:.3f} GB"
        )

    def _history(self, argument: str) -> None:
        if not self.chat.messages:
            self.say("no conversation yet", "dim")
        for message in self.chat.messages:
            self.say(f"{message['role']}: {_printable(str(message['content']))}")

    def _help(self, argument: str) -> None:
        self.say(HELP.format(keys=", ".join(SETTABLE_NAMES)))


@app.command()
def chat(
    model: ModelOption = DEFAULT_MODEL,
    system: SystemOption = None,
    max_tokens: MaxTokensOption = None,
    steps: StepsOption = None,
    seed: SeedOption = None,
    thinking: ThinkingOption = False,
    no_draft: Annotated[
        bool, typer.Option("--no-draft", help="Do not show the canvas refining; print each reply as it commits.")
    ] = False,
    assignments: SetOption = None,
) -> None:
    """Talk with the model. The conversation's cache carries over from turn to turn.

    On a terminal each reply's canvas is shown refining (dimmed) until it is
    committed. Type /help for the commands (/reset, /system, /set, /stats,
    /history, /exit). Ctrl-C stops a reply, Ctrl-D leaves.
    """
    params = _sampler_params(assignments, max_tokens, steps, seed)
    loaded, tokenizer, path = _load_model(model, params)
    session = Chat(loaded, tokenizer, system=system, thinking=thinking, **params)
    interactive = sys.stdin.isatty()
    repl = ChatRepl(session, sys.stdout, live=sys.stdout.isatty() and not no_draft, interactive=interactive)
    if interactive:
        repl.say(f"dgemma chat · {path.name} · /help for commands · Ctrl-D to leave", "dim")
    repl.run()


# ----------------------------------------------------------------- info


def _info(path: Path, context: int | None) -> dict[str, Any]:
    config = ModelConfig.from_path(path)
    text = config.text
    limit = text.max_position_embeddings
    if context is None:
        context = min(DEFAULT_CONTEXT, limit)
    elif context > limit:
        raise ValueError(f"--context {context} is beyond the model's context of {limit} positions")
    counts = count_parameters(config)
    estimate = estimate_memory(path, context)
    available, source = available_memory()
    # As loading will do: under CUDA the dense layers dequantized, when that fits.
    fits_stored = estimate.total <= available
    dense, extra = dense_weights_that_fit(path, estimate) if fits_stored else ("quantized", 0)
    dense = dense_weights_here(dense)
    sliding = [shape for shape in text.layers if shape.is_sliding]
    full = [shape for shape in text.layers if not shape.is_sliding]
    return {
        "path": str(path),
        "architecture": {
            "model_type": config.model_type,
            "layers": len(text.layers),
            "sliding_layers": len(sliding),
            "full_layers": len(full),
            "sliding_window": text.sliding_window,
            "hidden_size": text.hidden_size,
            "intermediate_size": text.intermediate_size,
            "attention_heads": text.num_attention_heads,
            "sliding_kv_heads": sliding[0].num_key_value_heads if sliding else None,
            "sliding_head_dim": sliding[0].head_dim if sliding else None,
            "full_kv_heads": full[0].num_key_value_heads if full else None,
            "full_head_dim": full[0].head_dim if full else None,
            "experts": text.num_experts,
            "top_k_experts": text.top_k_experts,
            "moe_intermediate_size": text.moe_intermediate_size,
            "vocab_size": text.vocab_size,
            "canvas_length": config.canvas_length,
            "max_position_embeddings": limit,
        },
        "parameters": {"total": counts.total, "active": counts.active, "groups": counts.groups},
        "quantization": quantization_summary(config, checkpoint_dtype(path)),
        "disk_bytes": model_bytes(path),
        "safetensors_files": len(list(path.glob("*.safetensors"))),
        "vision_bytes": vision_bytes(path) if config.has_vision else 0,
        "memory": {
            "context": context,
            "weights": estimate.weights,
            "kv_cache": estimate.kv_cache,
            "activations": estimate.activations,
            "dense_layers": dense,
            "dequantized_dense": extra,
            "total": estimate.total + extra,
            "available": available,
            "available_source": source,
            "fits": fits_stored,
        },
    }


def _heads(count: int | None, dim: int | None) -> str:
    return f"{count} KV head{'s' if count != 1 else ''} × {dim}"


def _format_info(info: dict[str, Any]) -> str:
    arch, params, memory = info["architecture"], info["parameters"], info["memory"]
    attention = f"{arch['attention_heads']} query heads"
    if arch["sliding_layers"]:
        attention += f"; sliding layers {_heads(arch['sliding_kv_heads'], arch['sliding_head_dim'])}"
    if arch["full_layers"]:
        attention += f"; full layers {_heads(arch['full_kv_heads'], arch['full_head_dim'])} (keys serve as values)"
    groups = " · ".join(f"{name.replace('_', ' ')} {count:,}" for name, count in params["groups"].items())
    files = info["safetensors_files"]
    vision = (
        f"{format_bytes(info['vision_bytes'])} on disk, not loaded (text generation only)"
        if info["vision_bytes"]
        else "none"
    )
    verdict = "fits" if memory["fits"] else "does NOT fit"
    rows = [
        ("model", info["path"]),
        (
            "architecture",
            f"{arch['model_type']}, {arch['layers']} layers: {arch['sliding_layers']} sliding "
            f"(window {arch['sliding_window']}) + {arch['full_layers']} full attention",
        ),
        ("hidden size", f"{arch['hidden_size']}; dense MLP {arch['intermediate_size']}"),
        ("attention", attention),
        (
            "experts",
            f"{arch['experts']} per layer, top {arch['top_k_experts']} per token, {arch['moe_intermediate_size']} wide",
        ),
        ("vocabulary", f"{arch['vocab_size']:,} tokens (embedding tied to the output head)"),
        ("canvas", f"{arch['canvas_length']} tokens denoised together"),
        ("context", f"{arch['max_position_embeddings']:,} positions"),
        (
            "parameters",
            f"{params['total']:,} total ({format_count(params['total'])}), "
            f"{params['active']:,} active per token ({format_count(params['active'])})",
        ),
        ("", groups),
        ("quantization", info["quantization"]),
        ("vision tower", vision),
        ("size on disk", f"{format_bytes(info['disk_bytes'])} in {files} safetensors file{'s' if files != 1 else ''}"),
        (
            "peak memory",
            f"about {format_bytes(memory['total'])} at {memory['context']:,} tokens: weights "
            f"{format_bytes(memory['weights'])}"
            + (
                f" + dense layers dequantized on this GPU {format_bytes(memory['dequantized_dense'])}"
                if memory["dequantized_dense"]
                else ""
            )
            + f" + KV cache {format_bytes(memory['kv_cache'])} + activations {format_bytes(memory['activations'])}",
        ),
        ("this machine", f"{format_bytes(memory['available'])} ({memory['available_source']}): {verdict}"),
    ]
    return "\n".join(f"{label:<14} {value}".rstrip() for label, value in rows)


@app.command()
def info(
    model: Annotated[
        str,
        typer.Argument(
            metavar="MODEL", help="Checkpoint directory or Hugging Face repo id (downloaded if not cached)."
        ),
    ] = DEFAULT_MODEL,
    context: Annotated[
        int | None,
        typer.Option(
            "--context",
            "-c",
            min=1,
            help=f"Tokens of context for the memory estimate (default: {DEFAULT_CONTEXT}, or the model's maximum).",
        ),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the same facts as one JSON object.")] = False,
) -> None:
    """Describe a checkpoint: shape, parameters, quantization, size, and memory needed here.

    Shows the architecture, parameters in total and active per token, the
    quantization, the size on disk, and the estimated peak memory for a context
    of --context tokens compared with this machine's memory. Reads config.json
    and the safetensors headers only; nothing is loaded.
    """
    facts = _info(resolve_model_path(model), context)
    print(json.dumps(facts, indent=2) if json_output else _format_info(facts))


# ----------------------------------------------------------------- infill and edit

InPlaceOption = Annotated[
    bool,
    typer.Option(
        "--in-place", "-i", help="Write the result back to FILE (atomically; the old file is kept as FILE.bak)."
    ),
]
FileArgument = Annotated[Path, typer.Argument(metavar="FILE", help="A UTF-8 text file.")]


def _emit(path: Path, text: str, in_place: bool) -> None:
    if in_place:
        backup = write_in_place(path, text)
        _status(f"wrote {path} (previous version in {backup})")
    else:
        sys.stdout.write(text)
        sys.stdout.flush()


@app.command()
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
    in_place: InPlaceOption = False,
) -> None:
    """Fill in text at a position of FILE, using what comes before and after it.

    Every canvas position sees every other, so the fill fits the text on both
    sides. Prints the whole file with the fill (or writes it back with
    --in-place). Example: dgemma infill app.py --at 12 --tokens 48
    """
    text = read_text(file)
    offset = offset_of(text, at)
    params = _sampler_params(None, None, steps, seed)
    loaded, tokenizer, _ = _load_model(model, params, max(DEFAULT_CONTEXT, len(text) // 3 + tokens))
    result = fill_in(loaded, tokenizer, text[:offset], text[offset:], hole_tokens=tokens, **params)
    _emit(file, result.text, in_place)


@app.command()
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
    in_place: InPlaceOption = False,
) -> None:
    """Rewrite lines A-B of FILE, starting from their current text instead of noise.

    The rest of the file stays as it is (the text after the span is pinned in
    the canvas). Prints the whole file (or writes it back with --in-place).
    Example: dgemma edit app.py --lines 10-14 --instruction "add type hints"
    """
    text = read_text(file)
    start, end = span_of_lines(text, lines)
    params = _sampler_params(None, None, steps, seed)
    loaded, tokenizer, _ = _load_model(model, params, max(DEFAULT_CONTEXT, len(text) // 2))
    result = rewrite_span(loaded, tokenizer, text, start, end, instruction, **params)
    _emit(file, result.text, in_place)


# ----------------------------------------------------------------- entry point


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


_NO_ARGS_IS_HELP = getattr(click_errors, "NoArgsIsHelpError", ())


def main(argv: list[str] | None = None) -> int:
    """The `dgemma` console script: known errors become one `error: ...` line and exit status 1."""
    _State.debug = False
    try:
        result = app(args=argv, prog_name="dgemma", standalone_mode=False)
    except _NO_ARGS_IS_HELP:
        return 2  # the help is already printed
    except click_errors.ClickException as error:
        hint = ""
        if isinstance(error, click_errors.UsageError) and error.ctx is not None:
            hint = f" (see '{error.ctx.command_path} --help')"
        print(f"error: {_one_line(error.format_message())}{hint}", file=sys.stderr)
        return error.exit_code
    except typer.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except KNOWN_ERRORS as error:
        if _State.debug:
            traceback.print_exc()
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
