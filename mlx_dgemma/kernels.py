"""A CUDA kernel of our own for the experts' 4-bit matmuls (`mx.fast.cuda_kernel`).

MLX's CUDA `gather_qmm` multiplies one row at a time, reading the expert's
weights again for every row; at the released shape that is most of a step.
Here the rows come in tiles that share an expert (`moe.tile_layout`), and one
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

Used only on CUDA, for quantized experts with 4 bits, groups of 64, bf16
activations, output columns in multiples of 128; `supports` says when.
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx

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

# Grid: (N threads, tiles, 1) in blocks of 128 threads: block (bx, tile) computes rows
# [tile * ROWS, +ROWS) x columns [bx * 128, +128). Warp w owns columns bx * 128 + w * 32 + [0, 32),
# as four mma tiles of 8. Lane = 4 * g + t: mma row g (and g + 8), and in each 64-wide chunk of k the
# sixteen k values 16 t + [0, 16) (words 2t and 2t + 1 of a weight row).
_SOURCE = """
  constexpr int KW = K / 8;          // packed words per weight row
  constexpr int GROUPS = K / 64;
  constexpr int ROWS = 16 * MT;
  const int tile = blockIdx.y;
  if (tile >= tile_count[0]) return;  // padding tiles past the last expert's rows
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const uint32_t expert = tile_experts[tile];
  const int col0 = blockIdx.x * 128 + warp * 32;

  const uint32_t* __restrict__ wrow[4];
  for (int nt = 0; nt < 4; ++nt) {
    wrow[nt] = w + ((size_t)expert * N + col0 + nt * 8 + g) * KW + 2 * t;
  }
  const __nv_bfloat16* __restrict__ srow = scales + ((size_t)expert * N + col0 + 2 * t) * GROUPS;
  const __nv_bfloat16* __restrict__ brow = biases + ((size_t)expert * N + col0 + 2 * t) * GROUPS;
  const uint4* __restrict__ xrow[MT][2];
  for (int m = 0; m < MT; ++m) {
    for (int h = 0; h < 2; ++h) {
      xrow[m][h] = reinterpret_cast<const uint4*>(x + ((size_t)tile * ROWS + m * 16 + h * 8 + g) * K + 16 * t);
    }
  }

  float acc[MT][4][4];
  for (int m = 0; m < MT; ++m)
    for (int nt = 0; nt < 4; ++nt)
      for (int i = 0; i < 4; ++i) acc[m][nt][i] = 0.f;

  uint2 wcur[4], wnext[4];
  for (int nt = 0; nt < 4; ++nt) wcur[nt] = *reinterpret_cast<const uint2*>(wrow[nt]);

  const uint32_t ones = 0x3F803F80u;  // bf16 pair (1, 1)
  #pragma unroll 1
  for (int c = 0; c < GROUPS; ++c) {
    if (c + 1 < GROUPS) {
      for (int nt = 0; nt < 4; ++nt) wnext[nt] = *reinterpret_cast<const uint2*>(wrow[nt] + (c + 1) * 8);
    }
    // x fragments for the four mma steps of this chunk, per 16-row block.
    uint32_t a[MT][4][4];
    float sums[MT][4];
    for (int m = 0; m < MT; ++m) {
      uint4 lo0 = xrow[m][0][c * 8], hi0 = xrow[m][0][c * 8 + 1];  // row g: k 16t + [0, 8), [8, 16)
      uint4 lo1 = xrow[m][1][c * 8], hi1 = xrow[m][1][c * 8 + 1];  // row g + 8
      const uint32_t p0[4] = {lo0.x, lo0.y, lo0.z, lo0.w}, q0[4] = {hi0.x, hi0.y, hi0.z, hi0.w};
      const uint32_t p1[4] = {lo1.x, lo1.y, lo1.z, lo1.w}, q1[4] = {hi1.x, hi1.y, hi1.z, hi1.w};
      for (int i = 0; i < 4; ++i) sums[m][i] = 0.f;
      for (int j = 0; j < 4; ++j) {
        a[m][j][0] = dg_pair(p0, j);
        a[m][j][1] = dg_pair(p1, j);
        a[m][j][2] = dg_pair(q0, j);
        a[m][j][3] = dg_pair(q1, j);
        dg_mma(sums[m], a[m][j], ones, ones);
      }
    }
    for (int nt = 0; nt < 4; ++nt) {
      const float s0 = __bfloat162float(srow[nt * 8 * GROUPS + c]);
      const float s1 = __bfloat162float(srow[(nt * 8 + 1) * GROUPS + c]);
      const float z0 = __bfloat162float(brow[nt * 8 * GROUPS + c]) - 128.f * s0;
      const float z1 = __bfloat162float(brow[(nt * 8 + 1) * GROUPS + c]) - 128.f * s1;
      for (int m = 0; m < MT; ++m) {
        float part[4] = {0.f, 0.f, 0.f, 0.f};
        for (int j = 0; j < 4; ++j) {
          dg_mma(part, a[m][j], dg_codes(wcur[nt].x, j), dg_codes(wcur[nt].y, j));
        }
        acc[m][nt][0] += s0 * part[0] + z0 * sums[m][0];
        acc[m][nt][1] += s1 * part[1] + z1 * sums[m][1];
        acc[m][nt][2] += s0 * part[2] + z0 * sums[m][2];
        acc[m][nt][3] += s1 * part[3] + z1 * sums[m][3];
      }
    }
    if (c + 1 < GROUPS) {
      for (int nt = 0; nt < 4; ++nt) wcur[nt] = wnext[nt];
    }
  }

  for (int m = 0; m < MT; ++m) {
    for (int nt = 0; nt < 4; ++nt) {
      const int col = col0 + nt * 8 + 2 * t;
      const size_t row = (size_t)tile * ROWS + m * 16 + g;
      *reinterpret_cast<__nv_bfloat162*>(y + row * N + col) = __floats2bfloat162_rn(acc[m][nt][0], acc[m][nt][1]);
      *reinterpret_cast<__nv_bfloat162*>(y + (row + 8) * N + col) = __floats2bfloat162_rn(acc[m][nt][2], acc[m][nt][3]);
    }
  }
"""


@cache
def _kernel():
    return mx.fast.cuda_kernel(
        name="dgemma_tile_qmm",
        input_names=["x", "w", "scales", "biases", "tile_experts", "tile_count"],
        output_names=["y"],
        source=_SOURCE,
        header=_HEADER,
    )


def available() -> bool:
    """Whether the kernel can run here: MLX's default device is a CUDA GPU."""
    return mx.default_device().type == mx.gpu and mx.cuda.is_available()


def supports(layer, x_dtype: mx.Dtype) -> bool:
    """Whether `layer` (a switch linear) can go through the kernel."""
    return (
        getattr(layer, "bits", None) == 4
        and getattr(layer, "group_size", None) == GROUP
        and getattr(layer, "mode", "affine") == "affine"
        and layer.get("biases") is not None
        and x_dtype == mx.bfloat16
        and layer.scales.dtype == mx.bfloat16
        and layer.weight.shape[1] % COLUMNS_PER_BLOCK == 0
        and (layer.weight.shape[2] * 8) % GROUP == 0
    )


def tile_matmul(x: mx.array, layer, tile_experts: mx.array, tile_count: mx.array, tile_rows: int) -> mx.array:
    """Rows of x (tiles * tile_rows, in) times their tile's expert of `layer`: (tiles * tile_rows, out), bf16.

    Rows of tiles at or past `tile_count` (an int32 scalar array) are left unwritten.
    """
    experts, out_features, words = layer.weight.shape
    rows = x.shape[0]
    return _kernel()(
        inputs=[x, layer.weight, layer.scales, layer.biases, tile_experts, tile_count],
        template=[("K", words * 8), ("N", out_features), ("MT", tile_rows // 16)],
        grid=(out_features, rows // tile_rows, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(rows, out_features)],
        output_dtypes=[mx.bfloat16],
    )[0]
