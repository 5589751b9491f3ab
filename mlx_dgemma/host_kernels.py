"""The CPU's matmul-heavy blocks in C: weights packed once, tokens read in place.

On the CPU each expert's matrix meets a few dozen tokens a step. A BLAS packs
both operands of every call into its own layout, a pass over the whole weight,
and at these row counts the packing costs more than the arithmetic: OpenBLAS
runs 16 experts' 512 x 512 products at 16 rows in 4.5–5 ms on one core of this
machine. `host_kernels.c` keeps the weights packed from the load on and takes
1.5–1.8 ms (bench/RESULTS.md). It runs:
- a whole layer's experts, the gelu between their two products included, for
  exactly the tokens routed to each (no padding), over shares of the experts,
  then weights and sums each token's results in the routing's order;
- the dense MLP beside them in the same pass, 32 rows at a time;
- the tied head and self-conditioning's probs @ E over one copy of the
  embedding table, packed as the head reads it (`PackedEmbedding`), and the
  decoder's input from there: the lookup, self-conditioning's MLP and norms
  (`conditioned_embeddings`);
- attention: projections, q/k/v norms, RoPE (by MLX's own angles), the
  softmax over the cached and new keys, the output projection;
- and so whole decoder layers (`decoder_layer`), their norms, residuals and
  router included: the residual stream leaves MLX once a layer, where the
  glue between MLX's ops and the kernels cost two host reads and about 2 ms.
Packed, even the dense products run at about 110 GFLOP/s a core here, against
OpenBLAS's 80–90 on the same shapes (which packs its operands on every call).

The C file is compiled at first use with the system's C compiler (`cc`, or
`$CC`) for this machine (`-march=native`), in its own vector width, and cached
under ~/.cache/mlx-dgemma (or `$XDG_CACHE_HOME`), per source, compiler and CPU. Without a compiler the CPU keeps
MLX's "grouped" MoE dispatch and its matmuls.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import SwitchLinear

from .cpu import even_cuts
from .host_vocab import in_parallel

SOURCE = Path(__file__).with_name("host_kernels.c")
# Flags tried in turn: the first that compiles wins (-march=native is GCC's and x86 Clang's, -mcpu=native Arm's).
_FLAG_SETS = (("-march=native",), ("-mcpu=native",), ())
# A share's cost per expert it runs, in token rows: reading the expert's weights (cold) costs about what a few rows
# of arithmetic do.
_EXPERT_COST_ROWS = 4

_library: ctypes.CDLL | None = None
_failure: str | None = None


def library() -> ctypes.CDLL | None:
    """The compiled kernels, built at first call and cached on disk; None where they cannot be built (why:
    `unavailable_reason()`)."""
    global _library, _failure
    if _library is None and _failure is None:
        try:
            _library = _load(_built_library())
        except (OSError, subprocess.SubprocessError, RuntimeError) as error:
            _failure = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return _library


def unavailable_reason() -> str | None:
    """Why `library()` is None, once it has been tried."""
    return _failure


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "mlx-dgemma"


def _processor() -> str:
    """What -march=native builds for: the CPU's model and instruction sets, so that a cache shared between
    machines (a network home, a copied image) never hands one CPU a library built for another's instructions."""
    try:
        with open("/proc/cpuinfo") as info:
            lines = [line for line in info if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(dict.fromkeys(lines))
    except OSError:
        pass
    brand = platform.processor()
    if sys.platform == "darwin":  # processor() says only "arm"
        try:
            command = ["sysctl", "-n", "machdep.cpu.brand_string"]
            brand = subprocess.run(command, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return f"{platform.machine()} {brand}"


def _built_library() -> Path:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC)")
    source = SOURCE.read_bytes()
    errors = []
    for flags in _FLAG_SETS:
        identity = repr((compiler, flags, sys.platform, _processor()))
        key = hashlib.sha256(source + identity.encode()).hexdigest()[:16]
        suffix = ".dylib" if sys.platform == "darwin" else ".so"
        for directory in (_cache_dir(), Path(tempfile.gettempdir()) / "mlx-dgemma"):
            target = directory / f"host_kernels-{key}{suffix}"
            if target.is_file():
                return target
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError:
                continue
            # Built beside its final name, then renamed: a process never loads a half-written library.
            partial = directory / f".host_kernels-{key}-{os.getpid()}{suffix}"
            command = [compiler, "-O3", *flags, "-shared", "-fPIC", str(SOURCE), "-o", str(partial), "-lm"]
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
            if result.returncode == 0:
                os.replace(partial, target)
                return target
            partial.unlink(missing_ok=True)
            last_line = (result.stderr.strip().splitlines() or ["no message"])[-1]
            errors.append(f"{' '.join(command[:3])}: {last_line}")
            break  # the directory was fine; the flags were not
    raise RuntimeError(f"cannot compile {SOURCE.name}: {'; '.join(errors) or 'no writable cache directory'}")


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))  # CDLL calls let go of the GIL: the shares run in parallel
    pointer, integer = ctypes.c_void_p, ctypes.c_int
    lib.vector_lanes.restype = integer
    lib.panel_width.restype = integer
    lib.mlp_rows.restype = integer
    lib.hidden_tile.restype = integer
    lib.vocab_panels.restype = integer
    lib.linear_forward.argtypes = [pointer, integer, integer, pointer, integer, pointer]
    lib.expected_embedding.argtypes = [pointer, integer, integer, pointer, integer, pointer, pointer]
    lib.experts_forward.argtypes = [pointer, integer, pointer, pointer, integer, integer, pointer, integer, pointer]
    lib.experts_forward.argtypes += [pointer, pointer]
    lib.combine.argtypes = [pointer, pointer, pointer, integer, integer, integer, integer, pointer]
    lib.dense_forward.argtypes = [pointer, integer, integer, integer, pointer, pointer, integer, pointer, pointer]
    lib.dense_forward.argtypes += [pointer]
    lib.attention_rows.restype = integer
    lib.cached_states.argtypes = [pointer, ctypes.c_int64, pointer, ctypes.c_int64, integer, integer, pointer, pointer]
    lib.attention_inputs.argtypes = [pointer] * 2 + [integer] * 5 + [pointer] * 3 + [integer] * 3 + [pointer] * 2
    lib.attention_inputs.argtypes += [ctypes.c_float, pointer, integer, integer] + [pointer] * 5
    lib.attention_forward.argtypes = [pointer, pointer] + [integer] * 6 + [pointer, integer, pointer, pointer, integer]
    lib.attention_forward.argtypes += [pointer, pointer, pointer, integer, pointer, pointer]
    real = ctypes.c_float
    lib.after_attention.argtypes = [pointer] * 2 + [integer] * 3 + [pointer] * 5 + [integer, real] + [pointer] * 4
    lib.after_feed_forward.argtypes = [pointer] * 3 + [integer] * 3 + [pointer] * 3 + [real, real, pointer]
    lib.conditioned_embeddings.argtypes = [pointer, pointer, integer, real] + [pointer] * 4 + [integer, pointer, real]
    lib.conditioned_embeddings.argtypes += [integer, pointer, pointer]
    return lib


def vector_lanes() -> int | None:
    """Floats per vector in the kernels as built for this machine (16: AVX-512, 8: AVX, 4: SSE or NEON); None
    where they cannot be built."""
    lib = library()
    return None if lib is None else lib.vector_lanes()


def panel_width() -> int:
    lib = library()
    if lib is None:
        raise RuntimeError(f"the CPU's C kernels are not available: {unavailable_reason()}")
    return lib.panel_width()


def pack(weight: mx.array, width: int) -> mx.array:
    """An (..., out, in) weight as (..., out / width, in, width): each panel of `width` outputs' weights in the
    order the kernels read them."""
    *leading, out, inputs = weight.shape
    return mx.contiguous(weight.reshape(*leading, out // width, width, inputs).swapaxes(-1, -2))


def unpack(packed: mx.array) -> mx.array:
    """`pack` undone: the (..., out, in) weight."""
    *leading, panels, inputs, width = packed.shape
    return packed.swapaxes(-1, -2).reshape(*leading, panels * width, inputs)


class PackedWeight(nn.Module):
    """A layer whose weight is held packed for the CPU kernels (`pack`); `weight` unpacks it on each use, for
    MLX's ops (tests, other dispatches and paths)."""

    def __init__(self, layer: nn.Module, width: int):
        super().__init__()
        self.packed = pack(layer.weight, width)

    @property
    def weight(self) -> mx.array:
        return unpack(self.packed)


class PackedSwitchLinear(PackedWeight):
    """An expert stack (a SwitchLinear's), packed."""

    @property
    def num_experts(self) -> int:
        return self.packed.shape[0]

    @property
    def input_dims(self) -> int:
        return self.packed.shape[2]

    @property
    def output_dims(self) -> int:
        return self.packed.shape[1] * self.packed.shape[3]

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_mm(x, self.weight.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)


class PackedLinear(PackedWeight):
    """A linear layer (no bias), packed."""

    def __call__(self, x: mx.array) -> mx.array:
        return x @ self.weight.T


def packable(layer: nn.Module, width: int) -> bool:
    """A float32 linear or expert stack, no bias, whose outputs fill whole panels."""
    return (
        type(layer) in (nn.Linear, SwitchLinear)
        and "bias" not in layer
        and layer.weight.dtype == mx.float32
        and layer.weight.shape[-2] % width == 0
    )


def packed_in_place(owner: nn.Module, names: tuple[str, ...], make: type[nn.Module]) -> bool:
    """Replace `owner`'s layers `names` by `make(layer, panel width)` if the kernels are built and every layer is
    packable (one at a time, so each unpacked weight is freed as its packed copy comes in); returns whether it
    did."""
    if library() is None:
        return False
    width = panel_width()
    if not all(packable(owner[name], width) for name in names):
        return False
    for name in names:
        setattr(owner, name, make(owner[name], width))
        mx.eval(owner[name].packed)
    return True


class PackedEmbedding(PackedWeight):
    """The tied embedding table (vocabulary, hidden) held packed as the head reads it, (vocabulary / width, hidden,
    width), and read so by the lookup and by self-conditioning's probs @ E too: one copy of the table.

    `head` and `expected_embedding` run the C kernels on the calling thread.
    """

    def __call__(self, ids: mx.array) -> mx.array:
        # Row v is packed[v // width, :, v % width]: `hidden` values PANEL apart.
        panels, hidden, width = self.packed.shape
        starts = (ids // width) * (hidden * width) + ids % width
        return mx.take(self.packed.reshape(-1), starts[..., None] + mx.arange(0, hidden * width, width))

    def as_linear(self, x: mx.array) -> mx.array:
        return x @ self.weight.T

    def head(self, x: np.ndarray, out: np.ndarray) -> None:
        """out (rows, vocabulary) = x (rows, hidden) @ Eᵀ, float32, both C-contiguous."""
        table = np.asarray(self.packed)
        vocab = table.shape[0] * table.shape[2]
        library().linear_forward(x.ctypes.data, len(x), x.shape[1], table.ctypes.data, vocab, out.ctypes.data)

    def expected_embedding(self, probs: np.ndarray) -> np.ndarray:
        """probs (rows, vocabulary) @ E, float32 (rows, hidden)."""
        lib, table = library(), np.asarray(self.packed)
        rows, vocab = probs.shape
        hidden, width = table.shape[1:]
        probs = np.ascontiguousarray(probs, dtype=np.float32)
        token_panels = -(-rows // width)
        scratch = np.empty(token_panels * (hidden + lib.vocab_panels() * width) * width, dtype=np.float32)
        out = np.empty((rows, hidden), dtype=np.float32)
        lib.expected_embedding(probs.ctypes.data, rows, vocab, table.ctypes.data, hidden, scratch.ctypes.data,
                               out.ctypes.data)  # fmt: skip
        return out


def embedding_packable(embedding: nn.Module, width: int) -> bool:
    """A float32 table whose vocabulary fills whole panels and whose width the self-conditioning kernel tiles."""
    return (
        type(embedding) is nn.Embedding
        and embedding.weight.dtype == mx.float32
        and embedding.weight.shape[0] % width == 0
        and embedding.weight.shape[1] % library().hidden_tile() == 0
    )


@dataclass(frozen=True)
class ConditioningWeights:
    """Self-conditioning's weights for `conditioned_embeddings`: its pre-norm's weight, its MLP's packed gate, up and
    down, and the norms' epsilon."""

    pre_norm: np.ndarray
    gate: np.ndarray
    up: np.ndarray
    down: np.ndarray
    eps: float


def conditioned_embeddings(
    ids: np.ndarray, soft: np.ndarray | None, table: np.ndarray, scale: float, weights: ConditioningWeights
) -> np.ndarray:
    """The decoder's input (rows, hidden) on the calling thread: norm(E[ids] · scale + MLP(norm(soft · scale))), the
    MLP's term only where `soft` (rows, hidden), probs @ E (`PackedEmbedding.expected_embedding`), is given.
    ids (rows,) token ids; table the embedding packed as `PackedEmbedding` holds it."""
    lib, w = library(), weights
    vocab = table.shape[0] * table.shape[2]
    if len(ids) and not (0 <= ids.min() and ids.max() < vocab):  # the kernel reads the table at each id unchecked
        raise ValueError(f"token ids must lie in [0, {vocab}); got {ids.min()}..{ids.max()}")
    ids = np.ascontiguousarray(ids, dtype=np.int32)
    hidden, inner = table.shape[1], w.down.shape[1]
    rows = len(ids)
    out = np.empty((rows, hidden), dtype=np.float32)
    scratch = np.empty(lib.mlp_rows() * (hidden + 3 * inner), dtype=np.float32)
    soft = None if soft is None else np.ascontiguousarray(soft, dtype=np.float32)
    lib.conditioned_embeddings(
        ids.ctypes.data, table.ctypes.data, hidden, scale, None if soft is None else soft.ctypes.data,
        w.pre_norm.ctypes.data, w.gate.ctypes.data, w.up.ctypes.data, inner, w.down.ctypes.data, w.eps, rows,
        scratch.ctypes.data, out.ctypes.data,
    )  # fmt: skip
    return out


@dataclass(frozen=True)
class DenseMLP:
    """A dense gated MLP's inputs (rows, hidden) and packed weights, for `feed_forward`."""

    x: np.ndarray
    gate: np.ndarray
    up: np.ndarray
    down: np.ndarray


def forward(
    x: np.ndarray, indices: np.ndarray, weights: np.ndarray, gate_up: np.ndarray, down: np.ndarray, threads: int
) -> np.ndarray:
    """The experts' output for every token: x (tokens, hidden) float32; indices and weights (tokens, k), each
    token's experts and their weights; gate_up and down packed stacks (`pack`), gate_up's first half the gate."""
    return feed_forward(x, indices, weights, gate_up, down, threads)[0]


def feed_forward(
    x: np.ndarray,
    indices: np.ndarray,
    weights: np.ndarray,
    gate_up: np.ndarray,
    down: np.ndarray,
    threads: int,
    dense: DenseMLP | None = None,
    finish: Callable[[int, int, np.ndarray, np.ndarray | None], None] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """`forward`, and with it the `dense` MLP over its rows when given: (the experts' output, the dense MLP's).

    The cores take the work as they come free: first a share of the experts each (cut to about equal cost), then
    the dense rows a group at a time, which evens out what the experts' cut could not. `finish(first, last,
    experts' output, dense output)`, when given, runs on each share of tokens as soon as they are summed.
    """
    lib = library()
    tokens, k = indices.shape
    hidden = x.shape[1]
    experts, inner = gate_up.shape[0], down.shape[2]
    x = np.ascontiguousarray(x, dtype=np.float32)
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    flat = indices.reshape(-1)
    order = np.argsort(flat, kind="stable")
    counts = np.bincount(flat, minlength=experts)
    starts = np.zeros(experts + 1, dtype=np.int32)
    np.cumsum(counts, out=starts[1:])
    sources = (order // k).astype(np.int32)
    slots = np.empty(tokens * k, dtype=np.int32)
    slots[order] = np.arange(tokens * k, dtype=np.int32)
    out = np.empty((tokens * k, hidden), dtype=np.float32)
    edges = _shares(counts, threads)
    tasks = [(True, first, last) for first, last in zip(edges[:-1], edges[1:])]
    dense_out = None
    if dense is not None:
        dense_x = np.ascontiguousarray(dense.x, dtype=np.float32)
        dense_out = np.empty_like(dense_x)
        group = lib.mlp_rows()
        tasks += [(False, first, min(first + group, len(dense_x))) for first in range(0, len(dense_x), group)]

    def run(experts_share: bool, first: int, last: int) -> None:
        if experts_share:
            largest = int(counts[first:last].max(initial=0))
            scratch = np.empty(max(1, largest) * 3 * inner, dtype=np.float32)
            lib.experts_forward(
                x.ctypes.data, hidden, sources.ctypes.data, starts.ctypes.data, first, last,
                gate_up.ctypes.data, inner, down.ctypes.data, scratch.ctypes.data, out.ctypes.data,
            )  # fmt: skip
            return
        dense_inner = dense.down.shape[1]
        scratch = np.empty(3 * dense_inner * (last - first), dtype=np.float32)
        lib.dense_forward(
            dense_x.ctypes.data, hidden, first, last, dense.gate.ctypes.data, dense.up.ctypes.data, dense_inner,
            dense.down.ctypes.data, scratch.ctypes.data, dense_out.ctypes.data,
        )  # fmt: skip

    in_parallel(run, *zip(*tasks))
    y = np.empty((tokens, hidden), dtype=np.float32)
    token_edges = even_cuts(tokens, threads)

    def run_combine(first: int, last: int) -> None:
        lib.combine(out.ctypes.data, slots.ctypes.data, weights.ctypes.data, first, last, k, hidden, y.ctypes.data)
        if finish is not None:
            finish(first, last, y, dense_out)

    in_parallel(run_combine, token_edges[:-1], token_edges[1:])
    return y, dense_out


class HostViews:
    """`make(host views of some MLX arrays)`, made again only when one of the arrays is replaced (None stays None).

    The C kernels read weights through numpy views; making them takes microseconds an array, a layer's dozen at
    every call adds up over a step.
    """

    def __init__(self, make: Callable[[list[np.ndarray | None]], object]):
        self.make = make
        self._key: tuple[int, ...] | None = None
        self._made: object = None

    def __call__(self, arrays: list[mx.array | None]) -> object:
        key = tuple(id(array) for array in arrays)  # the views hold the arrays: no id is reused while kept
        if key != self._key:
            self._made = self.make([None if array is None else np.asarray(array) for array in arrays])
            self._key = key
        return self._made


@dataclass(frozen=True)
class AttentionWeights:
    """An attention layer's weights for `attention`: projections packed (`pack`), v_proj None where the values are
    the raw keys; the q and k norms' weights (head_dim,) and their epsilon (the values' norm shares it)."""

    q_proj: np.ndarray
    k_proj: np.ndarray
    v_proj: np.ndarray | None
    o_proj: np.ndarray
    q_norm: np.ndarray
    k_norm: np.ndarray
    eps: float


@dataclass(frozen=True)
class _Projections:
    """An attention layer's projected new positions and its cached states, as `attention_forward` reads them."""

    queries: np.ndarray  # (batch, length, heads, dim)
    new_keys: np.ndarray  # (batch, kv_heads, length, dim)
    packed_keys: np.ndarray  # (batch, kv_heads, padded / width, dim, width): cached and new keys, zero padding
    values: np.ndarray  # (batch, kv_heads, positions, dim): cached and new
    heads: int
    kv_heads: int
    before: int  # cached positions
    positions: int  # cached and new
    padded: int  # positions rounded up to a panel


def _projected(
    xs: list[np.ndarray],
    starts: list[int],
    rotations: np.ndarray,
    cached: tuple[np.ndarray, np.ndarray] | None,
    weights: AttentionWeights,
    input_norm: np.ndarray | None,
) -> _Projections:
    """`attention`'s first pass over the cores: every block's projections, q/k/v norms and RoPE, and the cached
    states packed and copied beside the new ones."""
    lib = library()
    width = lib.panel_width()
    batch, hidden = xs[0].shape[0], xs[0].shape[2]
    length, dim = rotations.shape
    heads, kv_heads = weights.q_proj.shape[0] * width // dim, weights.k_proj.shape[0] * width // dim
    before = 0 if cached is None else cached[0].shape[2]
    positions = before + length
    padded = -(-positions // width) * width
    queries = np.empty((batch, length, heads, dim), dtype=np.float32)
    new_keys = np.empty((batch, kv_heads, length, dim), dtype=np.float32)
    packed_keys = np.empty((batch, kv_heads, padded // width, dim, width), dtype=np.float32)
    packed_keys[:, :, -1] = 0.0  # the padding keys' columns
    values = np.empty((batch, kv_heads, positions, dim), dtype=np.float32)
    xs = [np.ascontiguousarray(x, dtype=np.float32) for x in xs]
    rotations = np.ascontiguousarray(rotations, dtype=np.float32)
    if cached is not None:
        cached = tuple(_rows_in_place(states) for states in cached)
    w = weights

    def prepare(block: int | None, head: tuple[int, int] | None) -> None:
        if head is not None:  # the cached states of one (batch row, KV head)
            keys, old_values = (states[head] for states in cached)
            lib.cached_states(
                keys.ctypes.data, keys.strides[0] // 4, old_values.ctypes.data, old_values.strides[0] // 4, before,
                dim, packed_keys[head].ctypes.data, values[head].ctypes.data,
            )  # fmt: skip
            return
        x = xs[block]
        scratch = np.empty(lib.mlp_rows() * ((heads + 2 * kv_heads) * dim + hidden), dtype=np.float32)
        lib.attention_inputs(
            x.ctypes.data, None if input_norm is None else input_norm.ctypes.data, batch * x.shape[1], x.shape[1],
            starts[block], length, hidden,
            w.q_proj.ctypes.data, w.k_proj.ctypes.data, None if w.v_proj is None else w.v_proj.ctypes.data,
            heads, kv_heads, dim, w.q_norm.ctypes.data, w.k_norm.ctypes.data, w.eps, rotations.ctypes.data,
            before, positions, scratch.ctypes.data, queries.ctypes.data, new_keys.ctypes.data,
            packed_keys.ctypes.data, values.ctypes.data,
        )  # fmt: skip

    tasks = [(block, None) for block in range(len(xs))]
    if before:
        tasks += [(None, head) for head in np.ndindex(batch, kv_heads)]
    in_parallel(prepare, *zip(*tasks))
    return _Projections(queries, new_keys, packed_keys, values, heads, kv_heads, before, positions, padded)


def attention_states(
    xs: list[np.ndarray], starts: list[int], rotations: np.ndarray, weights: AttentionWeights
) -> tuple[np.ndarray, np.ndarray]:
    """The keys and values of new positions alone (batch, kv_heads, length, head_dim), as `attention` makes them:
    what the encoder's last layer needs of its attention. xs, starts and rotations as `attention` takes them."""
    states = _projected(xs, starts, rotations, None, weights, None)
    return states.new_keys, states.values


def attention(
    xs: list[np.ndarray],
    starts: list[int],
    rotations: np.ndarray,
    cached: tuple[np.ndarray, np.ndarray] | None,
    masks: list[np.ndarray | None],
    weights: AttentionWeights,
    threads: int,
    input_norm: np.ndarray | None = None,
    finish: Callable[[int, int, np.ndarray], None] | None = None,
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """A whole attention layer over row blocks, in C: projections, q/k/v norms, RoPE, grouped-query attention
    (scale 1) over the cached states and every block's, the output projection.

    xs: per block, its normed inputs (batch, block, hidden) float32, the block's first position at `starts` (from
    the first new one); rotations (length, head_dim): per new position, RoPE's cos then sin of its angles; cached:
    the cache's keys and values (batch, kv_heads, cached, head_dim), or None; masks per block, None or bool
    (batch|1, 1, block|1, cached + length), True where a query sees a key. Returns each block's output (batch,
    block, hidden), and the new positions' keys and values (batch, kv_heads, length, head_dim) for the cache.

    Two passes over the cores: every block's projections (and the cached states, packed and copied beside the new
    ones); then attention and the output projection, a few tiles of queries per task. `input_norm`, when given, is
    the weight of an RMS norm the inputs take first. The blocks' outputs are views of one (rows, hidden) array, the
    blocks' rows one after another (batch row by batch row within each); `finish(first, last, that array)`, when
    given, runs on its rows first..last-1 as soon as a task has them.
    """
    lib = library()
    tile = lib.attention_rows()
    batch, hidden = xs[0].shape[0], xs[0].shape[2]
    length, dim = rotations.shape
    states = _projected(xs, starts, rotations, cached, weights, input_norm)
    queries, packed_keys, values = states.queries, states.packed_keys, states.values
    heads, kv_heads, positions, padded = states.heads, states.kv_heads, states.positions, states.padded
    w = weights

    query_steps = np.array([length * heads * dim, dim, heads * dim], dtype=np.int64)
    value_steps = np.array([kv_heads * positions * dim, positions * dim, dim], dtype=np.int64)
    flat = np.empty((batch * length, hidden), dtype=np.float32)
    outs, tasks, row = [], [], 0
    for x, start, mask in zip(xs, starts, masks):
        block = x.shape[1]
        visible, visible_steps = None, None
        if mask is not None:
            visible = np.ascontiguousarray(mask[:, 0], dtype=np.bool_).view(np.uint8)
            visible_steps = _steps(visible[..., 0], 1)
        outs.append(flat[row : row + batch * block].reshape(batch, block, hidden))
        # Whole tiles of queries per task, as many tasks as cores.
        tiles = -(-batch * block // tile)
        edges = [min(cut * tile, batch * block) for cut in even_cuts(tiles, min(threads, tiles))]
        tasks += [(start, block, row, a, b, visible, visible_steps, outs[-1]) for a, b in zip(edges, edges[1:])]
        row += batch * block

    def attend(start: int, block: int, row: int, first: int, last: int, visible, visible_steps, out) -> None:
        scratch = np.empty(tile * (padded + heads * dim + 1), dtype=np.float32)
        lib.attention_forward(
            queries[:, start:].ctypes.data, query_steps.ctypes.data, block, first, last, heads, kv_heads, dim,
            packed_keys.ctypes.data, positions, values.ctypes.data, value_steps.ctypes.data, dim,
            None if visible is None else visible.ctypes.data, None if visible is None else visible_steps.ctypes.data,
            w.o_proj.ctypes.data, hidden, scratch.ctypes.data, out.ctypes.data,
        )  # fmt: skip
        if finish is not None:
            finish(row + first, row + last, flat)

    in_parallel(attend, *zip(*tasks))
    return outs, states.new_keys, values[:, :, states.before :]


@dataclass(frozen=True)
class LayerWeights:
    """A decoder layer's weights for `decoder_layer`, besides its attention's: the RMS norms' weights, the router's
    (experts, hidden) weight with its input scale (scale · hidden^-½) and per-expert scales, the experts' and the
    dense MLP's packed stacks, the layer scalar."""

    input_norm: np.ndarray
    post_attention: np.ndarray
    pre_feedforward: np.ndarray
    pre_feedforward_2: np.ndarray
    post_feedforward: np.ndarray
    post_feedforward_1: np.ndarray
    post_feedforward_2: np.ndarray
    router: np.ndarray
    router_scale: np.ndarray
    per_expert_scale: np.ndarray
    top_k: int
    gate_up: np.ndarray
    down: np.ndarray
    dense_gate: np.ndarray
    dense_up: np.ndarray
    dense_down: np.ndarray
    eps: float


def decoder_layer(
    xs: list[np.ndarray],
    starts: list[int],
    rotations: np.ndarray,
    cached: tuple[np.ndarray, np.ndarray] | None,
    masks: list[np.ndarray | None],
    attention_weights: AttentionWeights,
    weights: LayerWeights,
    scalar: float,
    threads: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A whole decoder layer in C over the residual stream's row blocks xs (batch, block, hidden): the input norm
    and `attention`; the residual, the feed-forward's norms and the router's scores as each task's rows come out
    of it; the routes (numpy); the experts and the dense MLP (`feed_forward`); the output norms, residual and
    scalar as each share of tokens is summed. Returns the output as (rows, hidden), the blocks' rows one after
    another (as `attention` lays them), and the new positions' keys and values.
    """
    lib, w = library(), weights
    hidden, experts = xs[0].shape[2], w.router.shape[0]
    h = np.concatenate([np.ascontiguousarray(x, dtype=np.float32).reshape(-1, hidden) for x in xs])
    residual, dense_in, experts_in = (np.empty_like(h) for _ in range(3))
    scores = np.empty((len(h), experts), dtype=np.float32)

    def after_attention(first: int, last: int, attended: np.ndarray) -> None:
        lib.after_attention(
            h.ctypes.data, attended.ctypes.data, first, last, hidden, w.post_attention.ctypes.data,
            w.pre_feedforward.ctypes.data, w.pre_feedforward_2.ctypes.data, w.router_scale.ctypes.data,
            w.router.ctypes.data, experts, w.eps, residual.ctypes.data, dense_in.ctypes.data, experts_in.ctypes.data,
            scores.ctypes.data,
        )  # fmt: skip

    _, keys, values = attention(
        xs, starts, rotations, cached, masks, attention_weights, threads, w.input_norm, after_attention
    )
    indices, route_weights = route(scores, w.top_k, w.per_expert_scale)
    out = np.empty_like(h)

    def after_feed_forward(first: int, last: int, experts_out: np.ndarray, dense_out: np.ndarray) -> None:
        lib.after_feed_forward(
            residual.ctypes.data, dense_out.ctypes.data, experts_out.ctypes.data, first, last, hidden,
            w.post_feedforward_1.ctypes.data, w.post_feedforward_2.ctypes.data, w.post_feedforward.ctypes.data,
            scalar, w.eps, out.ctypes.data,
        )  # fmt: skip

    dense = DenseMLP(dense_in, w.dense_gate, w.dense_up, w.dense_down)
    feed_forward(experts_in, indices, route_weights, w.gate_up, w.down, threads, dense, after_feed_forward)
    return out, keys, values


def route(scores: np.ndarray, top_k: int, per_expert_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's top_k experts by score and their weights: the softmax over the chosen scores (the full softmax
    renormalised over them, as the reference computes it) times each expert's scale. As moe.Router, in numpy."""
    indices = np.argpartition(-scores, top_k - 1, axis=-1)[:, :top_k]
    chosen = np.take_along_axis(scores, indices, axis=-1)
    weights = np.exp(chosen - chosen.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return indices, (weights * per_expert_scale[indices]).astype(np.float32)


def _rows_in_place(x: np.ndarray) -> np.ndarray:
    """x as float32 whose last axis is contiguous (the kernels read rows in place, at any other strides)."""
    return x if x.dtype == np.float32 and x.strides[-1] == 4 else np.ascontiguousarray(x, dtype=np.float32)


def _steps(x: np.ndarray, itemsize: int) -> np.ndarray:
    """x's strides in elements, 0 along a broadcast (length-1) axis, as the kernels take them."""
    return np.array([s // itemsize if n > 1 else 0 for n, s in zip(x.shape, x.strides)], dtype=np.int64)


def _shares(counts: np.ndarray, threads: int) -> list[int]:
    """Expert boundaries cutting the experts into `threads` contiguous shares of about equal cost."""
    cost = np.cumsum(counts + np.where(counts > 0, _EXPERT_COST_ROWS, 0))
    cuts = np.searchsorted(cost, cost[-1] * np.arange(1, threads) / threads)
    return [0, *(int(c) + 1 for c in cuts), len(counts)]
