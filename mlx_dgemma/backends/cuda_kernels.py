"""CUDA kernels of our own for the experts' 4-bit matmuls (`mx.fast.cuda_kernel`).

MLX's CUDA `gather_qmm` multiplies one row at a time, reading the expert's
weights again for every row; at the released shape that is most of a step.
Here the rows come in tiles that share an expert (a layout kernel of its own), and one
thread block multiplies a whole tile by 128 of the expert's output columns on
the tensor cores (`mma.sync` m16n8k16, bf16 in, float32 accumulation), so the
weights are read once per tile.

The 4-bit codes go into the tensor cores as they are: q is exact in bf16
(as 128 + q, which sets the exponent with one OR), and the affine
dequantisation is applied per quantisation group afterwards,
sum(x * (s q + b)) = s * sum(x * (128 + q)) + (b - 128 s) * sum(x),
with the row sums from one more mma against ones. This is as exact as
dequantising to float32 first and costs no arithmetic per weight.

The k positions inside each mma are a permutation of the group's 64: any
permutation gives the same dot product as long as the x side follows it,
and this one lets each thread read its weights and x as whole words.

`fused_experts` (the "fused" dispatch, CUDA's default) does the whole block
in four launches; on an H200 at the released shape it takes 0.55 ms a layer,
against 5.5 ms for MLX's sorted `gather_qmm` and 1.14 ms for an earlier
kernel of ours that left the layout, gathers, GLU and combine to stock MLX
ops (bench/RESULTS.md). It runs only on CUDA, for 4-bit experts with groups
of 64, bf16 activations and output columns in multiples of 128; `supports`
says when.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import mlx.core as mx


@dataclass(frozen=True)
class KernelSource:
    """One kernel as `mx.fast.cuda_kernel` takes it (bench/kernel_check.py compiles the same with NVRTC)."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    source: str
    header: str = ""


@cache
def _compiled(kernel: KernelSource):
    return mx.fast.cuda_kernel(
        name=kernel.name,
        input_names=list(kernel.inputs),
        output_names=list(kernel.outputs),
        source=kernel.source,
        header=kernel.header,
    )


GROUP = 64  # k per quantisation group, and per chunk of the kernel's loop
COLUMNS_PER_BLOCK = 128  # 4 warps x 4 mma column tiles of 8
THREADS = 128

_HEADER = """
__device__ __forceinline__ void dg_mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Codes j and j + 4 of a word of eight 4-bit codes, as the bf16 pair (128 + q_j, 128 + q_{j+4}).
__device__ __forceinline__ uint32_t dg_codes(uint32_t word, int j) {
  return ((word >> (4 * j)) & 0x000F000Fu) | 0x43004300u;
}

// x values j and j + 4 of eight bf16 values held as four pairs, as one pair.
__device__ __forceinline__ uint32_t dg_pair(const uint32_t* p, int j) {
  return __byte_perm(p[j >> 1], p[2 + (j >> 1)], (j & 1) ? 0x7632 : 0x5410);
}
"""


def available() -> bool:
    """Whether the kernels can run here: MLX's default device is a CUDA GPU with bf16 `mma.sync` (sm_80 and up)."""
    cuda = getattr(mx, "cuda", None)
    on_cuda = mx.default_device().type == mx.gpu and cuda is not None and cuda.is_available()
    return on_cuda and _compute_capability() >= 8


@cache
def _compute_capability() -> int:
    """The GPU's compute capability major, as MLX's CUDA backend reports it."""
    return int(mx.device_info().get("compute_capability_major", 0))


def layout_tiles(entries: int, experts: int, tile_rows: int) -> int:
    """Tiles in the tiled buffer of `entries` (token, choice) pairs: room for any routing ."""
    return -(-(entries + experts * (tile_rows - 1)) // tile_rows)


def supports(gate_up, down, x_dtype: mx.Dtype) -> bool:
    """Whether an experts block (its two switch linears) can go through our kernels."""
    return available() and x_dtype == mx.bfloat16 and _suits(gate_up) and _suits(down)


def _suits(layer) -> bool:
    return (
        getattr(layer, "bits", None) == 4
        and getattr(layer, "group_size", None) == GROUP
        and getattr(layer, "mode", "affine") == "affine"
        and layer.get("biases") is not None
        and layer.scales.dtype == mx.bfloat16
        and layer.weight.shape[1] % COLUMNS_PER_BLOCK == 0
        and (layer.weight.shape[2] * 8) % GROUP == 0
    )


# ---------------------------------------------------------------------------------------------------------------
# The fused MoE pipeline ("fused" dispatch): four launches a layer instead of about twenty-five.
#   layout   one block: counts, tile starts, every entry's row, each row's token, each tile's expert;
#   gate/up  the tile matmul reading x's rows through `sources` (no gathered copy) with the GLU in its epilogue;
#   down     the same matmul on the GLU's rows;
#   combine  each token's k results weighted and summed in float32.
# The matmul has every operand of the next 64-wide chunks of k in flight while it multiplies the current one:
# our first kernel loaded only the next chunk's weights and waited on memory latency (0.7-0.9 TB/s).
# ---------------------------------------------------------------------------------------------------------------

ACTIVATION_CODES = {"gelu_pytorch_tanh": 0, "gelu_new": 0, "gelu": 1, "silu": 2, "relu": 3}

_FUSED_HEADER = (
    _HEADER
    + """
template <int ACT>
__device__ __forceinline__ float dg_act(float x) {
  if constexpr (ACT == 0) {
    return 0.5f * x * (1.f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
  } else if constexpr (ACT == 1) {
    return 0.5f * x * (1.f + erff(x * 0.7071067811865476f));
  } else if constexpr (ACT == 2) {
    return x / (1.f + expf(-x));
  } else {
    return fmaxf(x, 0.f);
  }
}

// One 64-wide chunk of k, as loaded: x words of each 16-row block (rows g and g + 8, k 16t + [0, 8) and
// [8, 16)), and per mma column tile the two weight words, scales and biases of columns 2t and 2t + 1.
template <int MT>
struct DgChunk {
  uint4 x[MT][2][2];
  uint2 w[4];
  __nv_bfloat16 s[4][2], b[4][2];
};

// Weight rows (output columns) of mma column tile nt, counted from tile 0's.
template <bool GLU, int N>
__device__ __forceinline__ constexpr int dg_tile_offset(int nt) {
  return GLU ? (nt >= 2 ? N / 2 : 0) + 8 * (nt & 1) : 8 * nt;
}

template <int MT, int GROUPS, bool GLU, int N>
__device__ __forceinline__ void dg_load(
    DgChunk<MT>& o, int c, const uint4* const (&xrow)[MT][2], const uint32_t* wrow, const __nv_bfloat16* srow,
    const __nv_bfloat16* brow) {
  #pragma unroll
  for (int m = 0; m < MT; ++m) {
    #pragma unroll
    for (int h = 0; h < 2; ++h) {
      o.x[m][h][0] = xrow[m][h][c * 8];
      o.x[m][h][1] = xrow[m][h][c * 8 + 1];
    }
  }
  #pragma unroll
  for (int nt = 0; nt < 4; ++nt) {
    const int offset = dg_tile_offset<GLU, N>(nt);
    o.w[nt] = *reinterpret_cast<const uint2*>(wrow + offset * (GROUPS * 8) + c * 8);
    o.s[nt][0] = srow[offset * GROUPS + c];
    o.s[nt][1] = srow[(offset + 1) * GROUPS + c];
    o.b[nt][0] = brow[offset * GROUPS + c];
    o.b[nt][1] = brow[(offset + 1) * GROUPS + c];
  }
}

template <int MT>
__device__ __forceinline__ void dg_multiply(const DgChunk<MT>& o, float (&acc)[MT][4][4]) {
  const uint32_t ones = 0x3F803F80u;  // bf16 pair (1, 1)
  uint32_t a[MT][4][4];
  float sums[MT][4];
  #pragma unroll
  for (int m = 0; m < MT; ++m) {
    const uint32_t p0[4] = {o.x[m][0][0].x, o.x[m][0][0].y, o.x[m][0][0].z, o.x[m][0][0].w};
    const uint32_t q0[4] = {o.x[m][0][1].x, o.x[m][0][1].y, o.x[m][0][1].z, o.x[m][0][1].w};
    const uint32_t p1[4] = {o.x[m][1][0].x, o.x[m][1][0].y, o.x[m][1][0].z, o.x[m][1][0].w};
    const uint32_t q1[4] = {o.x[m][1][1].x, o.x[m][1][1].y, o.x[m][1][1].z, o.x[m][1][1].w};
    #pragma unroll
    for (int i = 0; i < 4; ++i) sums[m][i] = 0.f;
    #pragma unroll
    for (int j = 0; j < 4; ++j) {
      a[m][j][0] = dg_pair(p0, j);
      a[m][j][1] = dg_pair(p1, j);
      a[m][j][2] = dg_pair(q0, j);
      a[m][j][3] = dg_pair(q1, j);
      dg_mma(sums[m], a[m][j], ones, ones);
    }
  }
  #pragma unroll
  for (int nt = 0; nt < 4; ++nt) {
    const float s0 = __bfloat162float(o.s[nt][0]), s1 = __bfloat162float(o.s[nt][1]);
    const float z0 = __bfloat162float(o.b[nt][0]) - 128.f * s0, z1 = __bfloat162float(o.b[nt][1]) - 128.f * s1;
    #pragma unroll
    for (int m = 0; m < MT; ++m) {
      float part[4] = {0.f, 0.f, 0.f, 0.f};
      #pragma unroll
      for (int j = 0; j < 4; ++j) dg_mma(part, a[m][j], dg_codes(o.w[nt].x, j), dg_codes(o.w[nt].y, j));
      acc[m][nt][0] += s0 * part[0] + z0 * sums[m][0];
      acc[m][nt][1] += s1 * part[1] + z1 * sums[m][1];
      acc[m][nt][2] += s0 * part[2] + z0 * sums[m][2];
      acc[m][nt][3] += s1 * part[3] + z1 * sums[m][3];
    }
  }
}

// First of the block's 128 weight rows (with GLU: 64 gate rows, then 64 up rows) in warp w's mma column tile nt.
template <bool GLU>
__device__ __forceinline__ constexpr int dg_warp_rows(int w, int nt) {
  return GLU ? (nt >= 2 ? 64 : 0) + w * 16 + 8 * (nt & 1) : w * 32 + 8 * nt;
}

// The block's results: rows tile * 16 MT + [0, 16 MT) of y, this lane's columns of the warp's mma tiles; with
// GLU, act(gate) * up, the GLU's column j0 + c holding gate row j0 + c and up row N / 2 + j0 + c.
template <int MT, bool GLU, int N, int ACT, typename T>
__device__ __forceinline__ void dg_store(T* y, const float (&acc)[MT][4][4], int tile, int warp, int g, int t) {
  #pragma unroll
  for (int m = 0; m < MT; ++m) {
    const size_t row = (size_t)tile * 16 * MT + m * 16 + g;
    if constexpr (GLU) {
      constexpr int OUT = N / 2;
      #pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const int col = blockIdx.x * 64 + dg_warp_rows<GLU>(warp, nt) + 2 * t;
        const float* gate = acc[m][nt];
        const float* up = acc[m][nt + 2];
        *reinterpret_cast<__nv_bfloat162*>(y + row * OUT + col) =
            __floats2bfloat162_rn(dg_act<ACT>(gate[0]) * up[0], dg_act<ACT>(gate[1]) * up[1]);
        *reinterpret_cast<__nv_bfloat162*>(y + (row + 8) * OUT + col) =
            __floats2bfloat162_rn(dg_act<ACT>(gate[2]) * up[2], dg_act<ACT>(gate[3]) * up[3]);
      }
    } else {
      #pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const int col = blockIdx.x * 128 + dg_warp_rows<GLU>(warp, nt) + 2 * t;
        *reinterpret_cast<__nv_bfloat162*>(y + row * N + col) = __floats2bfloat162_rn(acc[m][nt][0], acc[m][nt][1]);
        *reinterpret_cast<__nv_bfloat162*>(y + (row + 8) * N + col) =
            __floats2bfloat162_rn(acc[m][nt][2], acc[m][nt][3]);
      }
    }
  }
}
"""
)

# Grid (N threads, tiles, 1) in blocks of 128: block (bx, tile) computes the tile's rows [tile * ROWS, +ROWS)
# for 128 weight rows, MT mma row tiles of 16. Lane = 4 * g + t holds mma rows g and g + 8 and, in each 64-wide
# chunk of k, the sixteen k values 16 t + [0, 16) (words 2t and 2t + 1 of a weight row). Without GLU, warp w
# of block bx owns weight rows (output columns) bx * 128 + w * 32 + [0, 32). With GLU (N = 2 * inner: gate
# rows, then up rows), it owns the GLU's columns j0 + [0, 16), j0 = bx * 64 + w * 16: its mma tiles 0 and 1
# are gate rows j0 + [0, 16) and tiles 2 and 3 the up rows inner + j0 + [0, 16), so each thread holds the
# gate and up of the same outputs.
_FUSED_MATMUL_SOURCE = """
  constexpr int KW = K / 8;
  constexpr int GROUPS = K / 64;
  constexpr int ROWS = 16 * MT;
  const int tile = blockIdx.y;
  if (tile >= tile_count[0]) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const size_t expert = tile_experts[tile];

  // Weight row of mma column tile 0; tile nt's is dg_tile_offset(nt) rows further.
  const int col0 = GLU ? blockIdx.x * 64 + warp * 16 : blockIdx.x * 128 + warp * 32;
  const uint32_t* wrow = w + (expert * N + col0 + g) * KW + 2 * t;
  const __nv_bfloat16* srow = scales + (expert * N + col0 + 2 * t) * GROUPS;
  const __nv_bfloat16* brow = biases + (expert * N + col0 + 2 * t) * GROUPS;
  const uint4* xrow[MT][2];
  #pragma unroll
  for (int m = 0; m < MT; ++m) {
    #pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = tile * ROWS + m * 16 + h * 8 + g;
      const size_t source = GATHER ? (size_t)sources[row] : (size_t)row;
      xrow[m][h] = reinterpret_cast<const uint4*>(x + source * K + 16 * t);
    }
  }

  float acc[MT][4][4];
  #pragma unroll
  for (int m = 0; m < MT; ++m)
    #pragma unroll
    for (int nt = 0; nt < 4; ++nt)
      #pragma unroll
      for (int i = 0; i < 4; ++i) acc[m][nt][i] = 0.f;

  // Two chunks' operands in flight: load c + 1 while multiplying c (no runtime index into either, so both
  // stay in registers).
  DgChunk<MT> even, odd;
  dg_load<MT, GROUPS, GLU, N>(even, 0, xrow, wrow, srow, brow);
  #pragma unroll 1
  for (int c = 0; c < GROUPS; c += 2) {
    if (c + 1 < GROUPS) dg_load<MT, GROUPS, GLU, N>(odd, c + 1, xrow, wrow, srow, brow);
    dg_multiply<MT>(even, acc);
    if (c + 2 < GROUPS) dg_load<MT, GROUPS, GLU, N>(even, c + 2, xrow, wrow, srow, brow);
    if (c + 1 < GROUPS) dg_multiply<MT>(odd, acc);
  }

  dg_store<MT, GLU, N, ACT>(y, acc, tile, warp, g, t);
"""

# The same matmul with its operands staged through shared memory: every 64-wide chunk's weights and x rows are
# copied asynchronously (cp.async) STAGES - 1 chunks ahead, and the block's scales and biases for all of k are
# copied once, with the first chunk, so a warp never waits on a load it issued for the chunk it multiplies. Block row r
# (0-127) holds weight row `dg_block_row_weight(r)`; warp w's mma column tile nt reads block rows
# dg_warp_rows(w, nt) + [0, 8). Grid and outputs as above.
_STAGED_HEADER = """
__device__ __forceinline__ void dg_copy16(void* shared, const void* global) {
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(shared));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\\n" ::"r"(address), "l"(global));
}
__device__ __forceinline__ void dg_copy_commit() { asm volatile("cp.async.commit_group;\\n" ::); }
template <int PENDING>
__device__ __forceinline__ void dg_copy_wait() { asm volatile("cp.async.wait_group %0;\\n" ::"n"(PENDING)); }

// Weight row of block row r (0-127) of column block bx.
template <bool GLU, int N>
__device__ __forceinline__ int dg_block_row_weight(int bx, int r) {
  return GLU ? (r < 64 ? 0 : N / 2 - 64) + bx * 64 + r : bx * 128 + r;
}
"""

_STAGED_MATMUL_SOURCE = """
  constexpr int KW = K / 8;
  constexpr int GROUPS = K / 64;
  constexpr int ROWS = 16 * MT;
  constexpr int PITCH = 72;  // bf16 per staged x row: 64 and 8 of padding, so a quarter warp's reads hit 32 banks
  __shared__ __align__(16) uint32_t staged_w[STAGES][128 * 8];
  __shared__ __align__(16) __nv_bfloat16 staged_x[STAGES][ROWS * PITCH];
  __shared__ __align__(16) __nv_bfloat16 block_scales[128 * GROUPS];
  __shared__ __align__(16) __nv_bfloat16 block_biases[128 * GROUPS];
  const int tile = blockIdx.y;
  if (tile >= tile_count[0]) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const size_t expert = tile_experts[tile];

  // The block's scales and biases, copied with chunk 0: block rows 0-63 and 64-127 are each one run of weight
  // rows, contiguous (and 16-byte aligned: N is a multiple of 128) in memory.
  constexpr int PIECES = 64 * GROUPS * 2 / 16;  // 16-byte pieces per run
  for (int i = threadIdx.x; i < 2 * PIECES; i += 128) {
    const int run = i / PIECES, piece = i % PIECES;
    const size_t first = (expert * N + dg_block_row_weight<GLU, N>(blockIdx.x, 64 * run)) * GROUPS + 8 * piece;
    dg_copy16(&block_scales[run * 64 * GROUPS + 8 * piece], scales + first);
    dg_copy16(&block_biases[run * 64 * GROUPS + 8 * piece], biases + first);
  }
  // This thread's copies of each chunk: one 16-byte half of two weight rows, and 16 bytes of MT x rows.
  const uint32_t* w_from[2];
  #pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int r = (threadIdx.x >> 1) + 64 * j;
    w_from[j] = w + (expert * N + dg_block_row_weight<GLU, N>(blockIdx.x, r)) * KW + 4 * (threadIdx.x & 1);
  }
  const __nv_bfloat16* x_from[MT];
  #pragma unroll
  for (int m = 0; m < MT; ++m) {
    const int row = tile * ROWS + (threadIdx.x >> 3) + 16 * m;
    const size_t source = GATHER ? (size_t)sources[row] : (size_t)row;
    x_from[m] = x + source * K + 8 * (threadIdx.x & 7);
  }
  auto stage = [&](int c, int slot) {
    #pragma unroll
    for (int j = 0; j < 2; ++j) {
      dg_copy16(&staged_w[slot][((threadIdx.x >> 1) + 64 * j) * 8 + 4 * (threadIdx.x & 1)], w_from[j] + c * 8);
    }
    #pragma unroll
    for (int m = 0; m < MT; ++m) {
      dg_copy16(&staged_x[slot][((threadIdx.x >> 3) + 16 * m) * PITCH + 8 * (threadIdx.x & 7)], x_from[m] + c * 64);
    }
  };

  float acc[MT][4][4];
  #pragma unroll
  for (int m = 0; m < MT; ++m)
    #pragma unroll
    for (int nt = 0; nt < 4; ++nt)
      #pragma unroll
      for (int i = 0; i < 4; ++i) acc[m][nt][i] = 0.f;

  #pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < GROUPS) stage(s, s);
    dg_copy_commit();
  }
  #pragma unroll 1
  for (int c = 0; c < GROUPS; ++c) {
    dg_copy_wait<STAGES - 2>();  // this thread's copies of chunk c have landed
    __syncthreads();             // everyone's have, and chunk c - 1's slot is free again
    if (c + STAGES - 1 < GROUPS) stage(c + STAGES - 1, (c + STAGES - 1) % STAGES);
    dg_copy_commit();
    const int slot = c % STAGES;
    DgChunk<MT> o;
    #pragma unroll
    for (int m = 0; m < MT; ++m) {
      #pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint4* from = reinterpret_cast<const uint4*>(&staged_x[slot][(m * 16 + h * 8 + g) * PITCH + 16 * t]);
        o.x[m][h][0] = from[0];
        o.x[m][h][1] = from[1];
      }
    }
    #pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      const int rows = dg_warp_rows<GLU>(warp, nt);
      o.w[nt] = *reinterpret_cast<const uint2*>(&staged_w[slot][(rows + g) * 8 + 2 * t]);
      o.s[nt][0] = block_scales[(rows + 2 * t) * GROUPS + c];
      o.s[nt][1] = block_scales[(rows + 2 * t + 1) * GROUPS + c];
      o.b[nt][0] = block_biases[(rows + 2 * t) * GROUPS + c];
      o.b[nt][1] = block_biases[(rows + 2 * t + 1) * GROUPS + c];
    }
    dg_multiply<MT>(o, acc);
  }

  dg_store<MT, GLU, N, ACT>(y, acc, tile, warp, g, t);
"""

# One block. Entries (token, choice) are counted per expert, each expert's rows start at a multiple of TILE
# , and each entry takes the next free row of its expert. Which row an entry
# gets inside its expert depends on the order of the atomic adds; no result does, since every row is multiplied
# on its own and each token's results are combined in choice order.
_LAYOUT_SOURCE = """
  const int k = indices_shape[1];
  const int entries = indices_shape[0] * k;
  const int tiles = (entries + EXPERTS * (TILE - 1) + TILE - 1) / TILE;
  __shared__ int count[EXPERTS];
  __shared__ int start[EXPERTS + 1];
  __shared__ int cursor[EXPERTS];
  for (int e = threadIdx.x; e < EXPERTS; e += blockDim.x) count[e] = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < entries; i += blockDim.x) atomicAdd(&count[(int)indices[i]], 1);
  __syncthreads();
  if (threadIdx.x == 0) {
    int running = 0;
    for (int e = 0; e < EXPERTS; ++e) {
      start[e] = running;
      cursor[e] = running;
      running += (count[e] + TILE - 1) / TILE * TILE;
    }
    start[EXPERTS] = running;
    used[0] = running / TILE;
  }
  __syncthreads();
  for (int r = threadIdx.x; r < tiles * TILE; r += blockDim.x) sources[r] = 0;
  for (int tile = threadIdx.x; tile < tiles; tile += blockDim.x) {
    // The number of experts whose rows end at or before this tile; past the last one's rows, the last expert.
    int expert = 0;
    for (int e = 0; e < EXPERTS; ++e) expert += start[e + 1] <= tile * TILE;
    tile_experts[tile] = expert < EXPERTS ? expert : EXPERTS - 1;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < entries; i += blockDim.x) {
    const int slot = atomicAdd(&cursor[(int)indices[i]], 1);
    slots[i] = slot;
    sources[slot] = i / k;
  }
"""

# Grid (H / 8 threads rounded up, tokens, 1): each thread sums eight columns of one token's k rows.
_COMBINE_SOURCE = """
  const int column = (blockIdx.x * blockDim.x + threadIdx.x) * 8;
  if (column >= H) return;
  const int token = blockIdx.y;
  float sum[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  #pragma unroll
  for (int j = 0; j < TOP_K; ++j) {
    const float weight = weights[token * TOP_K + j];
    const uint4 words = *reinterpret_cast<const uint4*>(rows + (size_t)slots[token * TOP_K + j] * H + column);
    const uint32_t pairs[4] = {words.x, words.y, words.z, words.w};
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 v = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&pairs[i]));
      sum[2 * i] += weight * v.x;
      sum[2 * i + 1] += weight * v.y;
    }
  }
  uint32_t out[4];
  #pragma unroll
  for (int i = 0; i < 4; ++i) {
    __nv_bfloat162 pair = __floats2bfloat162_rn(sum[2 * i], sum[2 * i + 1]);
    out[i] = *reinterpret_cast<uint32_t*>(&pair);
  }
  *reinterpret_cast<uint4*>(y + (size_t)token * H + column) = make_uint4(out[0], out[1], out[2], out[3]);
"""

# One warp per token (grid (32 * tokens, 1, 1) rounded up to whole blocks): the token's TOP_K largest router
# scores, ties going to the lower expert, in descending order; then the softmax over them, each weight times its
# expert's scale. Replaces about ten stock ops a layer (cast, argpartition, gathers, softmax, scale).
_ROUTER_SOURCE = """
  constexpr int PER_LANE = (EXPERTS + 31) / 32;
  const int token = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (token >= scores_shape[0]) return;  // whole warps: 32 * tokens threads come in blocks of 32s
  float score[PER_LANE];
  #pragma unroll
  for (int i = 0; i < PER_LANE; ++i) {
    const int e = lane + 32 * i;
    score[i] = e < EXPERTS ? static_cast<float>(scores[(size_t)token * EXPERTS + e]) : 0.f;
  }
  unsigned taken = 0;  // bit i: this lane's expert lane + 32 i is chosen already
  float chosen[TOP_K];
  int chosen_expert[TOP_K];
  #pragma unroll
  for (int j = 0; j < TOP_K; ++j) {
    float best = 0.f;
    int best_expert = EXPERTS;  // none yet
    #pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
      const int e = lane + 32 * i;
      const bool open = e < EXPERTS && !((taken >> i) & 1u);
      if (open && (best_expert == EXPERTS || score[i] > best)) {  // ascending e: ties keep the lower
        best = score[i];
        best_expert = e;
      }
    }
    #pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      const float other = __shfl_xor_sync(0xffffffffu, best, offset);
      const int other_expert = __shfl_xor_sync(0xffffffffu, best_expert, offset);
      const bool better = other_expert < EXPERTS &&
          (best_expert == EXPERTS || other > best || (other == best && other_expert < best_expert));
      if (better) {
        best = other;
        best_expert = other_expert;
      }
    }
    chosen[j] = best;
    chosen_expert[j] = best_expert;
    if ((best_expert & 31) == lane) taken |= 1u << (best_expert >> 5);
  }
  if (lane != 0) return;
  float weight[TOP_K];
  float total = 0.f;
  #pragma unroll
  for (int j = 0; j < TOP_K; ++j) {
    weight[j] = expf(chosen[j] - chosen[0]);  // chosen[0] is the largest
    total += weight[j];
  }
  #pragma unroll
  for (int j = 0; j < TOP_K; ++j) {
    indices[token * TOP_K + j] = static_cast<uint32_t>(chosen_expert[j]);
    weights[token * TOP_K + j] = weight[j] / total * static_cast<float>(expert_scales[chosen_expert[j]]);
  }
"""

# At 1024 threads the H200 refused the launch ("too many resources requested for launch"), though ptxas reports
# 22 registers a thread (bench.kernel_check); at 256 it runs.
LAYOUT_THREADS = 256
COMBINE_THREADS = 64
ROUTER_THREADS = 128


# The fused pipeline's matmul takes its operands through shared memory where its static shared memory fits
# ("staged"), else straight into registers.
_STATIC_SHARED_BYTES = 48 * 1024


def stages(tile_rows: int) -> int:
    """How many chunks the staged matmul keeps in shared memory at a time."""
    return 3 if tile_rows == 16 else 2


def staged_fits(depth: int, tile_rows: int) -> bool:
    """Whether the staged matmul's shared memory (scales and biases for all of k, plus its stages) fits."""
    groups = depth // GROUP
    return 128 * groups * 4 + stages(tile_rows) * (128 * 32 + tile_rows * 144) <= _STATIC_SHARED_BYTES


_FUSED_QMM_INPUTS = ("x", "w", "scales", "biases", "tile_experts", "tile_count", "sources")
FUSED_QMM = {
    "registers": KernelSource(
        "dgemma_registers_tile_qmm", _FUSED_QMM_INPUTS, ("y",), _FUSED_MATMUL_SOURCE, _FUSED_HEADER
    ),
    "staged": KernelSource(
        "dgemma_staged_tile_qmm", _FUSED_QMM_INPUTS, ("y",), _STAGED_MATMUL_SOURCE, _FUSED_HEADER + _STAGED_HEADER
    ),
}
MOE_LAYOUT = KernelSource(
    "dgemma_moe_layout", ("indices",), ("slots", "tile_experts", "sources", "used"), _LAYOUT_SOURCE
)
MOE_COMBINE = KernelSource("dgemma_moe_combine", ("rows", "slots", "weights"), ("y",), _COMBINE_SOURCE)
ROUTER_TOP_K = KernelSource("dgemma_router_top_k", ("scores", "expert_scales"), ("indices", "weights"), _ROUTER_SOURCE)


def top_k_routes(scores: mx.array, expert_scales: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """Each token's k best experts (tokens, k) uint32, best first, and their weights (tokens, k) float32:
    the softmax over the chosen scores times each expert's scale. scores: (tokens, experts)."""
    tokens, experts = scores.shape
    threads = -(-32 * tokens // ROUTER_THREADS) * ROUTER_THREADS
    return tuple(
        _compiled(ROUTER_TOP_K)(
            inputs=[scores, expert_scales],
            template=[("EXPERTS", experts), ("TOP_K", k)],
            grid=(threads, 1, 1),
            threadgroup=(ROUTER_THREADS, 1, 1),
            output_shapes=[(tokens, k), (tokens, k)],
            output_dtypes=[mx.uint32, mx.float32],
        )
    )


def fused_supports(gate_up, down, x_dtype: mx.Dtype, activation: str) -> bool:
    """Whether the fused pipeline can run these experts: as `supports` asks, with an activation it knows."""
    return supports(gate_up, down, x_dtype) and activation in ACTIVATION_CODES


def fused_experts(
    x: mx.array, indices: mx.array, weights: mx.array, gate_up, down, activation: str, tile_rows: int
) -> mx.array:
    """The experts' block for x (tokens, hidden) bf16, routed by indices and weights (tokens, k): (tokens, hidden)."""
    layout, combine = _compiled(MOE_LAYOUT), _compiled(MOE_COMBINE)
    tokens, k = indices.shape
    experts, _, hidden_words = gate_up.weight.shape
    hidden = hidden_words * 8
    tiles = layout_tiles(tokens * k, experts, tile_rows)
    slots, tile_experts, sources, used = layout(
        inputs=[indices],
        template=[("EXPERTS", experts), ("TILE", tile_rows)],
        grid=(LAYOUT_THREADS, 1, 1),
        threadgroup=(LAYOUT_THREADS, 1, 1),
        output_shapes=[(tokens * k,), (tiles,), (tiles * tile_rows,), (1,)],
        output_dtypes=[mx.int32, mx.uint32, mx.int32, mx.int32],
    )

    def tile_matmul(rows: mx.array, layer, glu: bool) -> mx.array:
        _, columns, words = layer.weight.shape
        depth = words * 8
        staged = staged_fits(depth, tile_rows)
        return _compiled(FUSED_QMM["staged" if staged else "registers"])(
            inputs=[rows, layer.weight, layer.scales, layer.biases, tile_experts, used, sources],
            template=[
                ("K", depth),
                ("N", columns),
                ("MT", tile_rows // 16),
                ("GATHER", glu),
                ("GLU", glu),
                ("ACT", ACTIVATION_CODES[activation]),
                *([("STAGES", stages(tile_rows))] if staged else []),
            ],
            grid=(columns, tiles, 1),
            threadgroup=(THREADS, 1, 1),
            output_shapes=[(tiles * tile_rows, columns // 2 if glu else columns)],  # the GLU halves gate|up
            output_dtypes=[mx.bfloat16],
        )[0]

    inner = tile_matmul(x, gate_up, glu=True)
    rows = tile_matmul(inner, down, glu=False)
    groups = -(-hidden // 8)
    return combine(
        inputs=[rows, slots, weights.astype(mx.float32)],
        template=[("H", hidden), ("TOP_K", k)],
        grid=(-(-groups // COMBINE_THREADS) * COMBINE_THREADS, tokens, 1),
        threadgroup=(COMBINE_THREADS, 1, 1),
        output_shapes=[(tokens, hidden)],
        output_dtypes=[mx.bfloat16],
    )[0]
