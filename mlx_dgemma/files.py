"""Positions in text files, and safe in-place rewrites, for `dgemma infill` and `dgemma edit`."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

_POSITION = re.compile(r"^(\d+)(?::(\d+))?$")
_LINES = re.compile(r"^(\d+)(?:-(\d+))?$")


def read_text(path: Path) -> str:
    if not path.is_file():
        raise ValueError(f"no file at {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None


def _line_starts(text: str) -> list[int]:
    starts = [0]
    for match in re.finditer("\n", text):
        starts.append(match.end())
    if starts[-1] == len(text) and len(starts) > 1:
        starts.pop()  # a final newline does not open another line
    return starts


def offset_of(text: str, position: str) -> int:
    """Character offset of `LINE[:COL]` (both 1-based; no COL means the start of the line)."""
    match = _POSITION.match(position.strip())
    if not match:
        raise ValueError(f"--at takes LINE or LINE:COL (1-based numbers), got {position!r}")
    line, column = int(match.group(1)), int(match.group(2) or 1)
    starts = _line_starts(text)
    if not 1 <= line <= len(starts) + 1:
        raise ValueError(f"line {line} is outside the file (it has {len(starts)} lines)")
    if line == len(starts) + 1:  # just past the last line: append
        return len(text)
    start = starts[line - 1]
    end = starts[line] if line < len(starts) else len(text)
    line_length = len(text[start:end].rstrip("\n"))
    if not 1 <= column <= line_length + 1:
        raise ValueError(f"column {column} is outside line {line} ({line_length} characters)")
    return start + column - 1


def span_of_lines(text: str, lines: str) -> tuple[int, int]:
    """Character span of `A-B` (1-based, inclusive), without the last line's newline."""
    match = _LINES.match(lines.strip())
    if not match:
        raise ValueError(f"--lines takes A-B or A (1-based line numbers), got {lines!r}")
    first, last = int(match.group(1)), int(match.group(2) or match.group(1))
    starts = _line_starts(text)
    if first < 1 or last < first:
        raise ValueError(f"bad line range {lines!r}: need 1 <= A <= B")
    if last > len(starts):
        raise ValueError(f"line {last} is outside the file (it has {len(starts)} lines)")
    end = starts[last] if last < len(starts) else len(text)
    if text[:end].endswith("\n"):
        end -= 1
    return starts[first - 1], end


def write_in_place(path: Path, text: str) -> Path:
    """Replace `path` atomically, keeping the old version as `path` + '.bak'. Returns the backup's path.

    A failure raises an OSError whose one-line message names `path` (or its backup), never the
    temporary file, which is removed: that name means nothing to the user.
    """
    backup = path.with_name(path.name + ".bak")
    temporary: str | None = None
    target = path
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        shutil.copymode(path, temporary)
        target = backup
        shutil.copy2(path, backup)
        target = path
        os.replace(temporary, path)
    except BaseException as error:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError):
            reason = error.strerror or "the write failed"
            raise OSError(f"cannot write {target}: {reason}") from None
        raise
    return backup
