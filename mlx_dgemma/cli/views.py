"""How a reply appears: written as it is committed, or (on a terminal) with the canvas's draft redrawn in place."""

from __future__ import annotations

import re
import shutil
import time
from typing import TextIO

from rich.cells import cell_len

DRAFT_FPS = 30  # drafts arriving faster than this are skipped: the next one replaces them anyway
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
DIM, UNDIM = "\x1b[2m", "\x1b[22m"


def printable(text: str) -> str:
    """Text safe to show on a terminal: control characters (escape sequences) become U+FFFD."""
    return _CONTROL.sub("\ufffd", text.replace("\t", "    "))


def advance(text: str, col: int, width: int) -> tuple[int, int]:
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


def fit(text: str, col: int, width: int, max_rows: int) -> tuple[str, int]:
    """`text` cut (with an ellipsis) to end within `max_rows` rows below the start; the rows it spans."""
    rows = 0
    for index, char in enumerate(text):
        step, col = advance(char, col, width)
        rows += step
        if rows >= max_rows:
            rest, _ = advance("…", col, width)
            return text[: index + 1] + "…", rows + rest
    return text, rows


class PlainReply:
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
            text = printable(text)
        _, self.col = advance(text, self.col, self._width())
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


class LiveReply(PlainReply):
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
        self._show(printable(text) or "…")

    def _show(self, text: str) -> None:
        self._erase()
        size = shutil.get_terminal_size()
        # Never taller than the screen: rows scrolled away could not be erased.
        shown, rows = fit(text, self.col, max(size.columns, 10), max(1, size.lines - 3))
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
