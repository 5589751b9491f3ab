"""The encoder's KV cache, which the decoder reads without changing.

Full-attention layers keep every position. Sliding layers keep only the last
`window - 1` positions: that is all a later encoder chunk can see, and it is
exactly what the reference's decoder attends to on those layers.

The states live in buffers allocated ahead, with room after the kept
positions: a decoder pass writes its canvas's states into that room and
attends over the filled part, an encoder chunk does the same and keeps them,
so neither copies the cache at every step (what concatenating would do).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import mlx.core as mx


class LayerCache:
    """Keys and values of one layer, (batch, kv_heads, positions, head_dim), in buffers with room to spare.

    The buffers grow by whole steps of `STEP` positions; a sliding layer drops
    its oldest positions by moving where the kept ones start, and moves them
    back to the front only when the room runs out.
    """

    STEP = 256

    def __init__(self, keep: int | None):
        self.keep = keep  # None keeps everything
        self.length = 0  # positions kept
        self._start = 0  # where they start in the buffers
        self._written = 0  # positions the last `extended` wrote after them
        self._keys: mx.array | None = None
        self._values: mx.array | None = None

    @property
    def keys(self) -> mx.array | None:
        return None if self._keys is None else self._keys[:, :, self._start : self._start + self.length]

    @property
    def values(self) -> mx.array | None:
        return None if self._values is None else self._values[:, :, self._start : self._start + self.length]

    @property
    def written(self) -> int:
        """Positions the last `extended` wrote after the kept ones and did not keep (a decoder pass's canvas)."""
        return self._written

    @property
    def buffers(self) -> list[mx.array]:
        """The key and value buffers (empty before the first chunk)."""
        return [] if self._keys is None else [self._keys, self._values]

    def extended(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Cached states followed by `keys`/`values`, without keeping the new ones (see `commit`)."""
        count = keys.shape[2]
        self._make_room(keys, values, count)
        first = self._start + self.length
        self._keys[:, :, first : first + count] = keys
        self._values[:, :, first : first + count] = values
        self._written = count
        end = first + count
        return self._keys[:, :, self._start : end], self._values[:, :, self._start : end]

    def rewritten(self, keys: mx.array, values: mx.array, positions: mx.array) -> tuple[mx.array, mx.array]:
        """`extended`'s result for the canvas it last wrote, with `keys`/`values` (batch, kv_heads, n, head_dim)
        written over its positions `positions` (batch, n) and the rest left as they were: a fast-mode step
        forwards only some canvas positions, the others keep the states of the pass that last forwarded them."""
        if not self._written:
            raise ValueError("no canvas to rewrite: a pass over the whole canvas comes first")
        first = self._start + self.length
        where = (first + positions)[:, None, :, None]
        self._keys = mx.put_along_axis(self._keys, where, keys, axis=2)
        self._values = mx.put_along_axis(self._values, where, values, axis=2)
        end = first + self._written
        return self._keys[:, :, self._start : end], self._values[:, :, self._start : end]

    def copy(self) -> LayerCache:
        """A cache holding the same states that later writes to either leave the other unchanged (MLX arrays
        assigned into are replaced, not changed: the copy only needs arrays of its own)."""
        twin = copy.copy(self)
        if self._keys is not None:
            twin._keys, twin._values = mx.array(self._keys), mx.array(self._values)
        return twin

    def append(self, keys: mx.array, values: mx.array) -> None:
        """`extended` and `commit`: keep new states computed elsewhere (the last encoder layer's, the C kernels')."""
        self.extended(keys, values)
        self.commit()

    def commit(self) -> None:
        """Keep the states the last `extended` wrote, trimmed to what later chunks can see."""
        self.length += self._written
        self._written = 0
        if self.keep is not None and self.length > self.keep:
            self._start += self.length - self.keep
            self.length = self.keep

    @classmethod
    def stacked(cls, rows: Sequence[LayerCache], room: int) -> LayerCache:
        """One-row caches of the same layer as one batch, each row's states right-aligned to the longest, with
        `room` positions after them for a canvas."""
        stacked = cls(rows[0].keep)
        stacked.length = max(row.length for row in rows)

        def aligned(states: mx.array, length: int) -> mx.array:
            # Zeros before the row's states (never attended to: the cache's validity says so), room after.
            return mx.pad(states, [(0, 0), (0, 0), (stacked.length - length, room), (0, 0)])

        stacked._keys = mx.concatenate([aligned(row.keys, row.length) for row in rows])
        stacked._values = mx.concatenate([aligned(row.values, row.length) for row in rows])
        return stacked

    def _make_room(self, keys: mx.array, values: mx.array, count: int) -> None:
        if self._keys is not None and self._start + self.length + count <= self._keys.shape[2]:
            return
        # New buffers with the kept positions at the front and at least one step of room after the new ones.
        capacity = (self.length + count + self.STEP - 1) // self.STEP * self.STEP + self.STEP
        batch, heads, _, key_dim = keys.shape
        new_keys = mx.zeros((batch, heads, capacity, key_dim), dtype=keys.dtype)
        new_values = mx.zeros((batch, heads, capacity, values.shape[3]), dtype=values.dtype)
        if self.length:
            new_keys[:, :, : self.length] = self.keys
            new_values[:, :, : self.length] = self.values
        self._keys, self._values, self._start = new_keys, new_values, 0


class EncoderCache:
    """Per-layer KV states plus which cached positions are real tokens.

    `valid` is None while no padding has been seen (the common case, which lets
    attention run without a mask); otherwise a (batch, offset) bool array.

    A position's slot in the cache is its position in the sequence, except in a
    batch `stacked` from caches of different lengths: there row r's slots run
    `position_shift[r]` ahead of its positions, which RoPE reads (`rope_offset`),
    so each row is computed as it would be alone.
    """

    def __init__(self, sliding_window: int, layer_is_sliding: list[bool]):
        self.layers = [LayerCache(sliding_window - 1 if sliding else None) for sliding in layer_is_sliding]
        self.offset = 0
        self.valid: mx.array | None = None
        self.batch_size: int | None = None
        self.position_shift: mx.array | None = None

    @classmethod
    def stacked(cls, rows: Sequence[EncoderCache], room: int) -> EncoderCache:
        """One-row caches as one batch (a copy: the rows are left as they are), each row left-padded to the
        longest and keeping its own positions, with `room` positions after them for a canvas: what the decoder
        computes for a row of it is what it computes for that row's cache alone, up to float rounding."""
        if any(row.batch_size != 1 or row.position_shift is not None or not row.offset for row in rows):
            raise ValueError("only one-row caches holding a prompt are stacked")
        batch = copy.copy(rows[0])
        batch.layers = [LayerCache.stacked(layers, room) for layers in zip(*(row.layers for row in rows))]
        batch.offset = max(row.offset for row in rows)
        batch.batch_size = len(rows)
        shifts = [batch.offset - row.offset for row in rows]
        if any(shifts) or any(row.valid is not None for row in rows):

            def padded_validity(row: EncoderCache, shift: int) -> mx.array:
                own = row.valid if row.valid is not None else mx.ones((1, row.offset), dtype=mx.bool_)
                return mx.concatenate([mx.zeros((1, shift), dtype=mx.bool_), own], axis=1)

            batch.valid = mx.concatenate([padded_validity(row, shift) for row, shift in zip(rows, shifts)])
        batch.position_shift = mx.array(shifts, dtype=mx.int32) if any(shifts) else None
        return batch

    @property
    def rope_offset(self) -> int | mx.array:
        """The position of the next slot: one for every row, or per row (batch,) in a stacked batch."""
        return self.offset if self.position_shift is None else self.offset - self.position_shift

    def __len__(self) -> int:
        return len(self.layers)

    def copy(self) -> EncoderCache:
        """An independent copy (see LayerCache.copy): a prompt's cache reused by several requests."""
        twin = copy.copy(self)
        twin.layers = [layer.copy() for layer in self.layers]
        return twin

    def check_batch(self, batch_size: int) -> None:
        if self.batch_size is not None and batch_size != self.batch_size:
            raise ValueError(f"this cache holds a batch of {self.batch_size}, got {batch_size} rows")

    def append_validity(self, attention_mask: mx.array | None, length: int, batch_size: int) -> None:
        """Record which of `length` new positions are real tokens, then advance."""
        self.check_batch(batch_size)
        if attention_mask is not None or self.valid is not None:
            new = (
                mx.ones((batch_size, length), dtype=mx.bool_)
                if attention_mask is None
                else attention_mask.astype(mx.bool_)
            )
            old = self.valid if self.valid is not None else mx.ones((batch_size, self.offset), dtype=mx.bool_)
            self.valid = mx.concatenate([old, new], axis=1)
        self.offset += length
        self.batch_size = batch_size

    def validity_of_last(self, count: int) -> mx.array | None:
        """Validity of the last `count` cached positions, or None without padding."""
        if self.valid is None:
            return None
        return self.valid[:, self.offset - count : self.offset]

    @property
    def state(self) -> list[mx.array]:
        arrays = [a for layer in self.layers for a in layer.buffers]
        return arrays + ([self.valid] if self.valid is not None else [])
