"""Sharded safetensors output, written into a temporary directory and published atomically."""

from __future__ import annotations

import json
import shutil
import tempfile
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


def make_staging_dir(dst: Path) -> Path:
    """A fresh directory next to DST, on the same filesystem so the final rename is atomic."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))


def publish(staging: Path, dst: Path) -> None:
    """Move the finished STAGING directory to DST, replacing an old DST only now."""
    if not (dst.exists() or dst.is_symlink()):
        staging.rename(dst)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent)) / "old"
    dst.rename(retired)
    try:
        staging.rename(dst)
    except BaseException:
        retired.rename(dst)  # put the old checkpoint back
        raise
    shutil.rmtree(retired.parent, ignore_errors=True)
