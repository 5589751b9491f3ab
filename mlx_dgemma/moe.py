"""Mixture of experts: the router and the expert feed-forward blocks.

How tokens reach their experts is chosen per backend (`moe_dispatch`):
- "gather": MLX's sorted `gather_mm` / `gather_qmm`, one row per call entry,
  the tuned path on Metal that mlx-lm's switch layers use (Metal's default);
- "tiled": the same ops fed tiles of `TILE_ROWS` rows that share an expert:
  each expert's tokens are padded to whole tiles inside a buffer whose size
  depends only on the shapes (no host read). MLX's CUDA `gather_qmm` reads an
  expert's weights once per call entry; tiled, once per tile;
- "fused": the whole block in four CUDA kernels of ours (`kernels.py`: layout,
  gate/up on the tensor cores reading the token rows in place with the GLU in
  its epilogue, down, combine), for 4-bit experts (others take "tiled"):
  CUDA's default;
- "grouped": tokens sorted by expert into (experts, rows, hidden) stacks, one
  per CPU stream's share of the experts, each expert padded to the share's
  largest group, then one batched matmul per share. MLX's
  CPU `gather_mm` is about a thousand times slower than a dense matmul and
  refuses bf16; one batched call beats a matmul per expert there even with
  the padding (measured: 18 vs 24 ms a layer at 32 experts, top-4, 256
  tokens). The CPU's default for experts that "host" cannot run;
- "host": the whole block in C on the CPU's cores (`host_kernels.py`), its
  weights packed once at load: float32 experts, the CPU's default where a C
  compiler is found.
Measured for one layer of the released shape (4-bit, 256 tokens) on an H200:
gather 5.5 ms, tiled 1.3 ms, fused 0.55 ms; of the bench shape (float32) on a
2-core CPU: grouped 15.2 ms, host 5.6 ms (bench/RESULTS.md). All compute the
same thing; tests hold them to float tolerance (fused on a GPU only).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from . import host_kernels, kernels
from .config import TextConfig
from .cpu import RowBlocks, cpu_cores, even_cuts, on_cpu
from .host_kernels import PackedSwitchLinear
from .layers import ACTIVATIONS, GatedMLP, gelu_tanh, rms_normalize

DISPATCHES = ("gather", "tiled", "grouped", "fused", "host")
CUDA_ONLY = ("fused",)
CPU_ONLY = ("host",)
# Dispatches that read back to the host mid-graph (no `mx.compile` around them).
HOST_READING = ("grouped", "host")
# Rows per tile: of the "tiled" dispatch, and of our CUDA kernels' ("fused").
TILE_ROWS = 16
KERNEL_TILE_ROWS = 16
# Whether CUDA picks each token's experts with our one-launch kernel (kernels.top_k_routes) instead of about ten
# stock ops a layer: on the H200, 0.12 against 0.29 ms a layer, the same experts for every token (bench/RESULTS.md).
ROUTER_KERNEL = True
_forced_dispatch: str | None = None


def moe_dispatch() -> str:
    """The MoE dispatch for the current default device."""
    if _forced_dispatch is not None:
        return _forced_dispatch
    if on_cpu():
        return "host" if host_kernels.library() is not None else "grouped"
    if kernels.available():
        return "fused"
    return "gather"


def dispatch_settings() -> tuple:
    """The dispatch in force with the settings that shape its graph (a key for compiled graphs)."""
    return moe_dispatch(), TILE_ROWS, KERNEL_TILE_ROWS, kernels.FUSED_MATMUL, routes_by_kernel()


def available_dispatches() -> tuple[str, ...]:
    """The dispatches that can run on the current default device (our kernels need CUDA; "host", the CPU and a
    C compiler)."""
    cuda, host = kernels.available(), on_cpu() and host_kernels.library() is not None
    return tuple(d for d in DISPATCHES if (cuda or d not in CUDA_ONLY) and (host or d not in CPU_ONLY))


def set_moe_dispatch(dispatch: str | None) -> None:
    """Force a dispatch (tests, benchmarks); None restores the per-backend choice."""
    global _forced_dispatch
    if dispatch is not None and dispatch not in DISPATCHES:
        raise ValueError(f"unknown MoE dispatch {dispatch!r}; choose from {DISPATCHES}")
    _forced_dispatch = dispatch


def routes_by_kernel() -> bool:
    """Whether the router's top-k runs as our CUDA kernel here."""
    return bool(ROUTER_KERNEL) and kernels.available()


class Router(nn.Module):
    """Picks top-k experts per token from the un-normed residual stream."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.proj = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.scale = mx.ones((config.hidden_size,))
        self.per_expert_scale = mx.ones((config.num_experts,))
        self.top_k = config.top_k_experts
        self.eps = config.rms_norm_eps
        self.root_size = config.hidden_size**-0.5

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        x = rms_normalize(x, self.eps) * (self.scale * self.root_size)
        scores = self.proj(x)
        if routes_by_kernel():
            return kernels.top_k_routes(scores, self.per_expert_scale, self.top_k)
        scores = scores.astype(mx.float32)
        indices = mx.argpartition(-scores, kth=self.top_k - 1, axis=-1)[..., : self.top_k]
        # Softmax over the chosen scores equals the full softmax renormalised
        # over the top k, as the reference computes it.
        weights = mx.softmax(mx.take_along_axis(scores, indices, axis=-1), axis=-1)
        return indices, weights * self.per_expert_scale[indices].astype(mx.float32)


class Experts(nn.Module):
    """The experts' gated feed-forward blocks, stacked as (experts, out, in)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        hidden, inner, count = config.hidden_size, config.moe_intermediate_size, config.num_experts
        self.gate_up_proj = SwitchLinear(hidden, 2 * inner, count, bias=False)
        self.down_proj = SwitchLinear(inner, hidden, count, bias=False)
        self.inner = inner
        self.activation = config.hidden_activation
        self.act = ACTIVATIONS[config.hidden_activation]

    def __call__(
        self, blocks: RowBlocks, xs: list[mx.array], indices: list[mx.array], weights: list[mx.array]
    ) -> list[mx.array]:
        """Per row block: xs (tokens, hidden), indices and weights (tokens, k). Returns (tokens, hidden) per block."""
        dispatch = moe_dispatch()
        if dispatch == "host" and self.runs_on_host(xs[0].dtype):
            return self.on_host(blocks, xs, indices, weights)[0]
        if dispatch in ("grouped", "host"):
            return self._grouped(blocks, xs, indices, weights)
        if dispatch == "fused" and kernels.fused_supports(
            self.gate_up_proj, self.down_proj, xs[0].dtype, self.activation
        ):
            return blocks.map(self._fused, xs, indices, weights)
        if dispatch in ("tiled", "fused"):
            return blocks.map(self._tiled, xs, indices, weights)
        return blocks.map(self._gathered, xs, indices, weights)

    def runs_on_host(self, dtype: mx.Dtype) -> bool:
        """Whether the "host" dispatch runs these experts: packed at load (`pack_for_host`), float32 inputs, gelu."""
        packed = all(isinstance(layer, PackedSwitchLinear) for layer in (self.gate_up_proj, self.down_proj))
        return packed and dtype == mx.float32 and self.act is gelu_tanh

    def pack_for_host(self) -> bool:
        """Hold the expert stacks packed for the "host" dispatch, if it can run them; returns whether it did."""
        # The kernels compute gelu_tanh between the two products.
        return self.act is gelu_tanh and host_kernels.packed_in_place(
            self, ("gate_up_proj", "down_proj"), PackedSwitchLinear
        )

    def on_host(
        self,
        blocks: RowBlocks,
        xs: list[mx.array],
        indices: list[mx.array],
        weights: list[mx.array],
        dense: tuple[GatedMLP, list[mx.array]] | None = None,
    ) -> tuple[list[mx.array], list[mx.array] | None]:
        """The "host" dispatch, per row block: (the experts' outputs, (tokens, hidden) each; with `dense`, a
        packed MLP and its inputs per block, (batch, block, hidden) each, run in the same pass, its outputs)."""
        x, index, weight = (blocks.join(part, axis=0) for part in (xs, indices, weights))
        dense_x = None
        if dense is not None:
            mlp, inputs = dense
            dense_x = blocks.join([block.reshape(-1, block.shape[-1]) for block in inputs], axis=0)
        mx.eval(x, index, weight, dense_x)  # the block's one host read: the tokens and their routes
        packed_dense = None
        if dense is not None:
            layers = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
            packed_dense = host_kernels.DenseMLP(np.asarray(dense_x), *(np.asarray(layer.packed) for layer in layers))
        out, dense_out = host_kernels.feed_forward(
            np.asarray(x),
            np.asarray(index),
            np.asarray(weight),
            np.asarray(self.gate_up_proj.packed),
            np.asarray(self.down_proj.packed),
            cpu_cores(),
            packed_dense,
        )
        edges = np.cumsum([0, *(block.shape[0] for block in xs)])
        experts = [mx.array(out[a:b]) for a, b in zip(edges[:-1], edges[1:])]
        if dense is None:
            return experts, None
        return experts, [mx.array(dense_out[a:b]).reshape(block.shape) for a, b, block in zip(edges, edges[1:], inputs)]

    def _glu(self, gate_up: mx.array) -> mx.array:
        return self.act(gate_up[..., : self.inner]) * gate_up[..., self.inner :]

    def _gathered(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        tokens, k = indices.shape
        flat = indices.flatten()
        order = mx.argsort(flat)
        rows = mx.expand_dims(x[order // k], -2)  # (tokens*k, 1, hidden), sorted by expert
        sorted_experts = flat[order]
        hidden = self._glu(self.gate_up_proj(rows, sorted_experts, sorted_indices=True))
        out = self.down_proj(hidden, sorted_experts, sorted_indices=True).squeeze(-2)
        out = out[mx.argsort(order)].reshape(tokens, k, -1)
        return (out * weights[..., None].astype(out.dtype)).sum(axis=1)

    def _tiled(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        slots, tile_experts, sources = _compiled_tile_layout(indices, self.gate_up_proj.num_experts, TILE_ROWS)
        rows = x[sources].reshape(tile_experts.shape[0], TILE_ROWS, -1)
        hidden = self._glu(self.gate_up_proj(rows, tile_experts, sorted_indices=True))
        out = self.down_proj(hidden, tile_experts, sorted_indices=True).reshape(-1, x.shape[-1])
        return self._combine(out, slots, weights)

    def _fused(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        return kernels.fused_experts(
            x, indices, weights, self.gate_up_proj, self.down_proj, self.activation, KERNEL_TILE_ROWS
        )

    def _grouped(
        self, blocks: RowBlocks, xs: list[mx.array], indices: list[mx.array], weights: list[mx.array]
    ) -> list[mx.array]:
        """Every block's tokens sorted by expert; each block's stream multiplies a share of the experts as one
        stack padded to that share's largest group, then each block gathers its own tokens' results."""
        x, flat = blocks.join(xs, axis=0), blocks.join(indices, axis=0).flatten()
        k, experts = indices[0].shape[-1], self.gate_up_proj.num_experts
        order = mx.argsort(flat)
        counts = mx.zeros((experts,), dtype=mx.int32).at[flat].add(1)
        starts = mx.cumsum(counts) - counts
        # One host read per MoE block: each share's largest group sets its padded width.
        sizes = counts.tolist()
        shares = min(len(blocks), experts)
        edges = even_cuts(experts, shares)
        widths = [max(1, *sizes[first:last]) for first, last in zip(edges[:-1], edges[1:])]
        sources = order // k

        def share(first: int, last: int, width: int) -> mx.array:
            # Row `slot` of expert e is sorted entry starts[e] + slot; padding rows repeat entry 0 and are dropped.
            slots = mx.arange(width)
            sorted_entry = mx.where(slots < counts[first:last, None], starts[first:last, None] + slots, 0)
            rows = x[sources[sorted_entry]]  # (experts of the share, width, hidden)
            return self._expert_range(rows, slice(first, last)).reshape(-1, x.shape[-1])

        stacked = blocks.join(blocks.map(share, edges[:-1], edges[1:], widths), axis=0)
        # Entry j (token j // k, its (j % k)-th expert e) sits at its expert's first row plus its rank there.
        first_rows, row = [], 0
        for first, last, width in zip(edges[:-1], edges[1:], widths):
            first_rows += [row + width * i for i in range(last - first)]
            row += width * (last - first)
        position = (mx.array(first_rows)[flat] + mx.argsort(order) - starts[flat]).reshape(-1, k)
        token_edges = [0]
        for block in xs:
            token_edges.append(token_edges[-1] + block.shape[0])
        positions = [position[a:b] for a, b in zip(token_edges[:-1], token_edges[1:])]
        return blocks.map(self._combine, [stacked] * len(blocks), positions, weights)

    def _expert_range(self, rows: mx.array, experts: slice) -> mx.array:
        return _stacked_matmul(self.down_proj, self._glu(_stacked_matmul(self.gate_up_proj, rows, experts)), experts)

    @staticmethod
    def _combine(stacked: mx.array, positions: mx.array, weights: mx.array) -> mx.array:
        """Each token's k expert outputs (rows `positions` of `stacked`), weighted and summed."""
        out = stacked[positions.flatten()].reshape(*positions.shape, -1)
        return (out * weights[..., None].astype(out.dtype)).sum(axis=1)


def tile_layout(indices: mx.array, experts: int, tile: int) -> tuple[mx.array, mx.array, mx.array]:
    """Where each (token, choice) goes when every expert's tokens fill whole tiles of `tile` rows.

    indices: (tokens, k) expert ids. Returns `slots` (tokens, k), each entry's
    row in the tiled buffer; `tile_experts` (tiles,), the expert of each tile;
    `sources` (rows,), the token each row of the buffer reads (padding rows
    read token 0; their results are never picked). The buffer holds
    tokens * k + experts * (tile - 1) rows rounded up to a tile: the most any
    routing can need, so every shape is fixed. (The fused CUDA dispatch makes
    the same layout in one kernel.)
    """
    tokens, k = indices.shape
    flat = indices.flatten()
    entries = tokens * k
    tiles = kernels.layout_tiles(entries, experts, tile)
    order = mx.argsort(flat)
    counts = mx.zeros((experts,), dtype=mx.int32).at[flat].add(1)
    padded = (counts + tile - 1) // tile * tile
    padded_ends = mx.cumsum(padded)
    # Sorted entry j of expert e sits at row padded_start[e] + (j - start[e]).
    shift = (padded_ends - padded) - (mx.cumsum(counts) - counts)
    sorted_slots = mx.arange(entries, dtype=mx.int32) + shift[flat[order]]
    slots = mx.zeros((entries,), dtype=mx.int32).at[order].add(sorted_slots)
    sources = mx.zeros((tiles * tile,), dtype=mx.int32).at[sorted_slots].add((order // k).astype(mx.int32))
    # A tile's expert is the number of experts whose padded rows end at or before it (empty ones included);
    # tiles past the last expert's rows are padding and take the last expert.
    tile_starts = mx.arange(tiles, dtype=mx.int32) * tile
    tile_experts = mx.minimum((padded_ends[None, :] <= tile_starts[:, None]).sum(axis=-1), experts - 1)
    return slots.reshape(tokens, k), tile_experts.astype(mx.uint32), sources


# One compiled graph per (shape, experts, tile): a step makes this layout in every layer, and its twenty small
# ops took 0.21 ms a layer compiled against 0.36 ms uncompiled on the H200.
_compiled_tile_layout = mx.compile(tile_layout)


def _stacked_matmul(layer: SwitchLinear | QuantizedSwitchLinear, x: mx.array, experts: slice) -> mx.array:
    """x[i] @ W[e].T for the experts e in `experts` at once: x (experts, rows, in), a plain or quantized stack."""
    if isinstance(layer, QuantizedSwitchLinear):
        return mx.quantized_matmul(
            x,
            layer.weight[experts],
            layer.scales[experts],
            None if getattr(layer, "biases", None) is None else layer.biases[experts],
            transpose=True,
            group_size=layer.group_size,
            bits=layer.bits,
            mode=layer.mode,
        )
    return x @ layer.weight[experts].swapaxes(-1, -2)
