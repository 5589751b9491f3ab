"""Sharded safetensors output, written into a staging directory beside the output and published atomically."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx

from .errors import ConversionError

INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3


class ShardWriter:
    """Collects converted arrays and writes a shard as soon as it reaches the size limit.

    Only the shard being filled is held in memory. Shards get provisional names
    because their count is known only at the end.
    """

    def __init__(self, directory: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, mx.array] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, arrays: dict[str, mx.array]) -> None:
        size = sum(array.nbytes for array in arrays.values())
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending.update(arrays)
        self._pending_bytes += size
        self.total_bytes += size
        if self._pending_bytes >= self.max_shard_bytes:
            self._flush()

    def finish(self) -> dict[str, str]:
        """Write the last shard, give every shard its final name and write the index."""
        if self._pending:
            self._flush()
        count = len(self._shards)
        weight_map = {}
        for number, (path, keys) in enumerate(self._shards, start=1):
            final_name = f"model-{number:05d}-of-{count:05d}.safetensors"
            path.rename(self.directory / final_name)
            weight_map.update(dict.fromkeys(keys, final_name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return weight_map

    def _flush(self) -> None:
        path = self.directory / f"partial-{len(self._shards) + 1:05d}.safetensors"
        try:
            mx.save_safetensors(str(path), self._pending, metadata={"format": "mlx"})
        except RuntimeError as error:  # MLX reports write failures (disk full, permissions) this way
            raise ConversionError(f"cannot write {path}: {error}") from None
        self._shards.append((path, list(self._pending)))
        self._pending = {}
        self._pending_bytes = 0
        # Hand the shard's buffers back to the OS rather than to MLX's cache.
        mx.clear_cache()


# Beside DST, a run keeps `.DST.tmp-HOST-PID-RANDOM` (the checkpoint being written) and, while replacing an
# old DST, `.DST.old-HOST-PID-RANDOM/old`. HOST and PID name the owner, so that a later run can tell the
# leftovers of a killed run from the directories of one still running.
STAGING, RETIRED = "tmp", "old"
_OWNED_NAME = re.compile(r"\.(?P<dst>.+)\.(?P<kind>tmp|old)-(?P<host>\w+)-(?P<pid>\d+)-[0-9a-f]{8}")

# Names of the owned directories this process is using now: its own PID alone cannot tell a finished
# (interrupted) run of a long-lived process from a convert running in another of its threads.
_in_use: set[str] = set()


@contextmanager
def staging_dir(dst: Path) -> Iterator[Path]:
    """A fresh directory beside DST (same filesystem: the final rename is atomic), removed on any exit.

    Once published the directory has already become DST and nothing is left to remove.
    """
    with _owned_dir(dst, STAGING) as path:
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)


def publish(staging: Path, dst: Path) -> None:
    """Move the finished STAGING directory to DST, replacing an old DST only now."""
    _give_normal_modes(staging)
    if not os.path.lexists(dst):
        staging.rename(dst)
        return
    with _owned_dir(dst, RETIRED) as holder:
        retired = holder / "old"
        try:
            dst.rename(retired)
            try:
                staging.rename(dst)
            except BaseException:
                retired.rename(dst)  # put the old checkpoint back
                raise
        finally:
            # Killed or interrupted between the renames, the holder keeps the only copy of the old
            # checkpoint: remove_stale_dirs puts it back.
            if os.path.lexists(dst) or not os.path.lexists(retired):
                shutil.rmtree(holder, ignore_errors=True)


def remove_stale_dirs(dst: Path) -> None:
    """Remove what runs converting into DST left beside it when they died; skip those of live runs.

    When DST is missing because a run died between publishing's two renames, the old checkpoint it had
    moved aside becomes DST again.
    """
    if not dst.parent.is_dir():
        return
    for path in dst.parent.iterdir():
        match = _OWNED_NAME.fullmatch(path.name)
        if match is None or match["dst"] != dst.name or path.is_symlink() or not path.is_dir():
            continue
        if _owner_may_be_running(path.name, match["host"], int(match["pid"])):
            continue
        retired = path / "old"
        if match["kind"] == RETIRED and os.path.lexists(retired) and not os.path.lexists(dst):
            try:
                retired.rename(dst)
            except OSError:
                continue  # never delete the only copy of a checkpoint
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def _owned_dir(dst: Path, kind: str) -> Iterator[Path]:
    dst.parent.mkdir(parents=True, exist_ok=True)
    path = dst.parent / f".{dst.name}.{kind}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"
    _in_use.add(path.name)  # before it exists: another thread's cleanup must never see it unclaimed
    try:
        # A plain mkdir gives the mode a user expects (0o777 & ~umask); mkdtemp's is 0o700.
        path.mkdir()
        yield path
    finally:
        _in_use.discard(path.name)


def _host() -> str:
    # Word characters only, so that names parse back unambiguously.
    return re.sub(r"\W", "_", socket.gethostname()) or "_"


def _owner_may_be_running(name: str, host: str, pid: int) -> bool:
    # Another machine's processes (a shared filesystem) cannot be checked; on Windows os.kill would kill.
    if host != _host() or os.name == "nt":
        return True
    if pid == os.getpid():
        return name in _in_use
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    return True


def _give_normal_modes(directory: Path) -> None:
    """Give every file the mode open() gives (0o666 & ~umask); MLX writes its files 0o644 whatever the umask.

    The directory was made by mkdir (0o777 & ~umask), so its mode says the umask without changing it.
    """
    mode = directory.stat().st_mode & 0o666
    for path in directory.iterdir():
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)
