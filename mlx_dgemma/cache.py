"""The encoder's KV cache, which the decoder reads without changing.

Full-attention layers keep every position. Sliding layers keep only the last
`window - 1` positions: that is all a later encoder chunk can see, and it is
exactly what the reference's decoder attends to on those layers.
"""

from __future__ import annotations

import mlx.core as mx


class LayerCache:
    """Keys and values of one layer, shaped (batch, kv_heads, positions, head_dim)."""

    def __init__(self, keep: int | None):
        self.keep = keep  # None keeps everything
        self.keys: mx.array | None = None
        self.values: mx.array | None = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def extended(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Cached states followed by `keys`/`values`, without storing them."""
        if self.keys is None:
            return keys, values
        return mx.concatenate([self.keys, keys], axis=2), mx.concatenate([self.values, values], axis=2)

    def store(self, keys: mx.array, values: mx.array) -> None:
        """Keep the given full states, trimmed to what later chunks can see."""
        if self.keep is not None and keys.shape[2] > self.keep:
            keys, values = keys[:, :, -self.keep :], values[:, :, -self.keep :]
        self.keys, self.values = keys, values


class EncoderCache:
    """Per-layer KV states plus which cached positions are real tokens.

    `valid` is None while no padding has been seen (the common case, which lets
    attention run without a mask); otherwise a (batch, offset) bool array.
    """

    def __init__(self, sliding_window: int, layer_is_sliding: list[bool]):
        self.layers = [LayerCache(sliding_window - 1 if sliding else None) for sliding in layer_is_sliding]
        self.offset = 0
        self.valid: mx.array | None = None
        self.batch_size: int | None = None

    def __len__(self) -> int:
        return len(self.layers)

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
        arrays = [a for layer in self.layers for a in (layer.keys, layer.values) if a is not None]
        return arrays + ([self.valid] if self.valid is not None else [])
