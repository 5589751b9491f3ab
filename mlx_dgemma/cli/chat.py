"""`dgemma chat`: a read-eval-print loop around a `Chat`, with slash commands and line editing."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TextIO

import typer
from rich.console import Console
from rich.text import Text

from ..generate import Chat, Commit, Done, Draft, GenerationResult, check_vision, is_image_part
from ..images import load_image
from .common import (
    DEFAULT_MODEL,
    SETTABLE,
    SETTABLE_NAMES,
    AdapterOption,
    FastOption,
    MaxTokensOption,
    ModelOption,
    SeedOption,
    SetOption,
    StepsOption,
    SystemOption,
    ThinkingOption,
    check_utf8,
    load_checkpoint,
    one_line,
    parse_assignments,
    sampler_params,
    settings_error,
    stats_line,
    stderr_console,
    tolerant_stdin,
    undecodable,
)
from .views import LiveReply, PlainReply, printable

HISTORY_LENGTH = 1000
HELP = """\
/reset               forget the conversation (the system prompt stays)
/system [TEXT]       set the system prompt and start over; without TEXT, remove it
/set [KEY=VALUE ...] change sampler parameters for the next replies; without arguments, show them
                     keys: {keys}
                     speed=fast forwards only the positions still changing (approximate), speed=exact
/image [PATH]        attach an image to the next message (repeatable); without PATH, drop the attached ones
/stats               statistics of the last reply
/history             the conversation so far
/help                this help
/exit, /quit         leave (Ctrl-D too)
Ctrl-C stops a reply; what was already committed stays in the conversation.
Start a message with // to send one that begins with '/'."""


def history_file() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "mlx-dgemma" / "history"


@contextmanager
def line_editing() -> Iterator[Any]:
    """readline with a persistent history, when the platform has it; otherwise plain input()."""
    try:
        import readline
    except ImportError:
        yield None
        return
    path = history_file()
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


class ChatRepl:
    """The read-eval-print loop around a `Chat`."""

    def __init__(self, chat: Chat, out: TextIO, live: bool, interactive: bool):
        self.chat, self.out = chat, out
        self.live = live  # redraw drafts in place (stdout is a terminal, drafts wanted)
        self.interactive = interactive  # stdin is a terminal: prompt, line editing, history
        self.console = Console(file=out, highlight=False, soft_wrap=True)
        self.errors = stderr_console()
        self.last: GenerationResult | None = None
        self.last_interrupted = False  # the latest reply was stopped before its statistics existed
        self.images: list[Any] = []  # attached with /image, sent with the next message

    def say(self, message: str, style: str | None = None) -> None:
        self.console.print(Text(message, style=style or ""))

    def error(self, message: str) -> None:
        self.errors.print(Text(f"error: {message}", style="red"))

    def run(self) -> None:
        if not self.interactive:
            self._loop(None)
            return
        with line_editing() as readline:
            self._loop(readline)

    def _read_line(self, readline: Any) -> str | None:
        """The next line typed or piped, stripped ("" for none worth handling); None at the end of input."""
        self.out.flush()
        try:
            line = input("> " if self.interactive else "")
        except KeyboardInterrupt:
            self.out.write("\n")  # Ctrl-C at the prompt: a fresh prompt
            return ""
        except EOFError:
            if self.interactive:
                self.out.write("\n")
            return None
        except UnicodeDecodeError as error:  # a stdin that could not be made tolerant
            self.error(str(undecodable(error, "the line")))
            return ""
        if readline is not None and line.strip():
            try:
                readline.append_history_file(1, str(history_file()))
            except OSError:
                pass
        try:
            return check_utf8(line, "the line").strip()
        except ValueError as error:
            self.error(str(error))
            return ""

    def _loop(self, readline: Any) -> None:
        while True:
            line = self._read_line(readline)
            if line is None:
                return
            if not line:
                continue
            if line.startswith("/") and not line.startswith("//"):
                if not self.command(line):
                    return
                continue
            self.reply(line[1:] if line.startswith("//") else line)

    def reply(self, text: str) -> None:
        view = LiveReply(self.out) if self.live else PlainReply(self.out, style=self.out.isatty())
        events = None
        images, self.images = self.images, []  # sent with this message, whatever becomes of it
        try:
            attached = {"images": images} if images else {}
            events = self.chat.stream(text, drafts=self.live, **attached)
            view.start()
            for event in events:
                if isinstance(event, Draft):
                    view.draft(event.text)
                elif isinstance(event, Commit):
                    view.commit(event.text, event.thinking)
                elif isinstance(event, Done):
                    self.last, self.last_interrupted = event.result, False
            view.finish()
            if self.last is not None:
                self.say(stats_line(self.last), "dim")
        except KeyboardInterrupt:
            # Closing the stream lets Chat keep what was committed; it re-encodes
            # the conversation next turn.
            if events is not None:
                events.close()
            # The previous reply's statistics are not this one's: /stats must not show them.
            self.last, self.last_interrupted = None, True
            view.finish()
            self.say("[reply interrupted; the part already committed stays in the conversation]", "dim yellow")
        except ValueError as error:  # raised before any work: a prompt beyond the context, a template error
            view.finish()
            self.error(one_line(error))
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
            "/image": self._image,
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

    def _image(self, argument: str) -> None:
        if not argument:
            dropped, self.images = len(self.images), []
            self.say(
                f"{dropped} attached image{'s' if dropped != 1 else ''} dropped" if dropped else "no image attached",
                "dim",
            )
            return
        path = Path(argument).expanduser()
        try:
            check_vision(self.chat.model)
            image = load_image(path)
        except ValueError as error:
            self.error(one_line(error))
            return
        self.images.append(image)
        count = len(self.images)
        width, height = image.size
        waiting = f"{count} image{'s' if count != 1 else ''}"
        self.say(f"attached {path.name} ({width}x{height}); {waiting} go with the next message", "dim")

    def _reset(self, argument: str) -> None:
        self.images = []
        self.chat.reset()
        self.say("conversation cleared", "dim")

    def _system(self, argument: str) -> None:
        self.images = []
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
            self.error(str(settings_error(error)))
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
            interrupted = "the last reply was interrupted: no statistics for it"
            self.say(interrupted if self.last_interrupted else "no reply yet", "dim")
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
            self.say(f"{message['role']}: {printable(content_text(message['content']))}")

    def _help(self, argument: str) -> None:
        self.say(HELP.format(keys=", ".join(SETTABLE_NAMES)))


def content_text(content: Any) -> str:
    """A message's content as /history shows it: text, with [image] for each image."""
    if not isinstance(content, list):
        return str(content or "")
    pieces = []
    for part in content:
        if is_image_part(part):
            pieces.append("[image]")
        elif isinstance(part, dict) and part.get("type") == "text":
            pieces.append(str(part.get("text", "")))
    return " ".join(pieces)


def chat(
    model: ModelOption = DEFAULT_MODEL,
    system: SystemOption = None,
    max_tokens: MaxTokensOption = None,
    steps: StepsOption = None,
    seed: SeedOption = None,
    thinking: ThinkingOption = False,
    fast: FastOption = False,
    no_draft: Annotated[
        bool, typer.Option("--no-draft", help="Do not show the canvas refining; print each reply as it commits.")
    ] = False,
    assignments: SetOption = None,
    adapter: AdapterOption = None,
) -> None:
    """Talk with the model. The conversation's cache carries over from turn to turn.

    On a terminal each reply's canvas is shown refining (dimmed) until it is
    committed. Type /help for the commands (/reset, /system, /set, /image,
    /stats, /history, /exit). Ctrl-C stops a reply, Ctrl-D leaves.
    """
    params = sampler_params(assignments, max_tokens, steps, seed, fast)
    if system is not None:
        check_utf8(system, "--system")
    loaded, tokenizer, path = load_checkpoint(model, params, adapter=adapter)
    session = Chat(loaded, tokenizer, system=system, thinking=thinking, **params)
    interactive = sys.stdin.isatty()
    tolerant_stdin()
    repl = ChatRepl(session, sys.stdout, live=sys.stdout.isatty() and not no_draft, interactive=interactive)
    if interactive:
        repl.say(f"dgemma chat · {path.name} · /help for commands · Ctrl-D to leave", "dim")
    repl.run()
