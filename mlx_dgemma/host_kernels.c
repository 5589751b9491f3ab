/* The CPU's matmul-heavy blocks, for host_kernels.py (which compiles this file at first use): the experts, the dense
   MLPs, the tied head, self-conditioning (probs @ E and its MLP), and attention layers whole.

   A BLAS packs both operands of every call into its own layout. An expert's matrix meets only the few dozen
   tokens routed to it, so that packing, a pass over its whole weight per call, cost more than the arithmetic;
   for the dense layers and the head it is a fifth of their time. Here the weights are packed once, at load, into
   panels of PANEL output columns, each panel's rows (one per input) contiguous. A tile of up to TILE_ROWS tokens
   keeps its sums for TILE_COLUMNS of a panel's columns in vector registers and reads those columns once, in order;
   the tokens are read in place, by index, with no gather.

   Written with GCC/Clang vector extensions in the machine's own vector width (AVX-512, AVX, or 128-bit SSE and
   NEON), so that no vector operation is split into pieces: GCC expands a vector wider than the hardware's one
   lane at a time (the products ran 40 times slower so). A tile's sums are sized to that width's registers. */

#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <string.h>

#define PANEL 32
/* Per vector width, measured on a Zen 4 (AVX-512 and, built without it, AVX2; NEON's are a guess): a tile of the
   products is TILE_ROWS tokens x TILE_VECTORS vectors of a panel's columns, its sums held in registers, each weight
   vector loaded once for all its rows; expected_embedding's is HIDDEN_TILE outputs x EMBEDDING_VECTORS vectors of
   tokens. GCC spills a tile that leaves it too few registers (AVX2: 6 rows of 2 vectors, 40% slower than 5). */
#if defined(__AVX512F__)
#define LANES 16
#define TILE_ROWS 8 /* 16 sums of the 32 registers, the whole panel */
#define TILE_VECTORS 2
#define EMBEDDING_VECTORS 2
#elif defined(__AVX__)
#define LANES 8
#define TILE_ROWS 5 /* 10 sums of the 16 registers, half a panel */
#define TILE_VECTORS 2
#define EMBEDDING_VECTORS 1
#elif defined(__aarch64__)
#define LANES 4
#define TILE_ROWS 5 /* 20 sums of the 32 registers, half a panel */
#define TILE_VECTORS 4
#define EMBEDDING_VECTORS 2
#else
#define LANES 4
#define TILE_ROWS 5 /* 10 sums of the 16 registers, a quarter of a panel */
#define TILE_VECTORS 2
#define EMBEDDING_VECTORS 1
#endif
#define TILE_COLUMNS (TILE_VECTORS * LANES)
#define HIDDEN_TILE 8
#define EMBEDDING_COLUMNS (EMBEDDING_VECTORS * LANES)
#define MLP_ROWS 32
/* Vocabulary panels per pass of expected_embedding: their weights (hidden x PANEL each) stay in the L2 cache. */
#define VOCAB_PANELS 2

typedef float vec __attribute__((vector_size(LANES * sizeof(float))));
typedef float vec_unaligned __attribute__((vector_size(LANES * sizeof(float)), aligned(4)));

int vector_lanes(void) { return LANES; }
int panel_width(void) { return PANEL; }
int mlp_rows(void) { return MLP_ROWS; }
int hidden_tile(void) { return HIDDEN_TILE; }
int vocab_panels(void) { return VOCAB_PANELS; }

/* y[r, 0:TILE_COLUMNS] = x[r] . columns, for `rows` (<= TILE_ROWS, a constant once inlined) rows; row i of the
   columns (TILE_COLUMNS weights) at columns + i * step. */
static inline __attribute__((always_inline)) void tile_product(const int rows, const float *const *x, int in,
                                                                const float *columns, size_t step, float *y,
                                                                size_t y_stride) {
    vec sums[8][TILE_VECTORS];  /* rows of them used: at most TILE_ROWS, at most 8 */
    for (int r = 0; r < rows; r++)
        for (int v = 0; v < TILE_VECTORS; v++) sums[r][v] = (vec){0};
    for (int i = 0; i < in; i++) {
        const float *weights = columns + (size_t)i * step;
        for (int v = 0; v < TILE_VECTORS; v++) {
            const vec w = *(const vec_unaligned *)(weights + v * LANES);
            for (int r = 0; r < rows; r++) sums[r][v] += x[r][i] * w;
        }
    }
    for (int r = 0; r < rows; r++)
        for (int v = 0; v < TILE_VECTORS; v++) *(vec_unaligned *)(y + r * y_stride + v * LANES) = sums[r][v];
}

/* panel_product's tile of `rows` rows, as a switch case; none where rows > TILE_ROWS. */
#define TILE(rows) \
    case rows: \
        if (rows <= TILE_ROWS) tile_product(rows, xs, in, columns, step, ys, y_stride); \
        break

/* y (rows, out; row stride y_stride) = x (rows given by pointers, in each) @ W.T, where output columns
   p * PANEL .. p * PANEL + PANEL - 1 of W.T's row i are the PANEL floats at w + p * panel_step + i * step.
   TILE_COLUMNS of a panel's columns at a time, so each is read from memory once and from cache for later tiles. */
static void panel_product(const float *const *x, int rows, int in, const float *w, size_t panel_step, size_t step,
                          int out, float *y, size_t y_stride) {
    for (int p = 0; p < out / PANEL; p++) {
        for (int c = 0; c < PANEL; c += TILE_COLUMNS) {
            const float *columns = w + (size_t)p * panel_step + c;
            for (int r = 0; r < rows; r += TILE_ROWS) {
                const float *const *xs = x + r;
                float *ys = y + (size_t)r * y_stride + (size_t)p * PANEL + c;
                switch (rows - r < TILE_ROWS ? rows - r : TILE_ROWS) {
                TILE(8); TILE(7); TILE(6); TILE(5); TILE(4); TILE(3); TILE(2);
                default: tile_product(1, xs, in, columns, step, ys, y_stride); break;
                }
            }
        }
    }
}

/* y (rows, out; row stride y_stride) = x (rows given by pointers, in each) @ W.T, W packed as (out / PANEL, in,
   PANEL). */
static void packed_product(const float *const *x, int rows, int in, const float *packed, int out, float *y,
                           size_t y_stride) {
    panel_product(x, rows, in, packed, (size_t)in * PANEL, PANEL, out, y, y_stride);
}

/* y (rows, out) = x (rows, in) @ W.T, W packed (out / PANEL, in, PANEL): the tied head, over the embeddings packed
   so. */
void linear_forward(const float *x, int rows, int in, const float *packed, int out, float *y) {
    const float *inputs[rows];
    for (int r = 0; r < rows; r++) inputs[r] = x + (size_t)r * in;
    packed_product(inputs, rows, in, packed, out, y, (size_t)out);
}

/* out (rows, hidden) = probs (rows, vocab) @ E, E packed as the head reads it: (vocab / PANEL, hidden, PANEL).

   The sum runs over the vocabulary, which the packing lays along the panels' lanes. So VOCAB_PANELS panels at a
   time, the tokens' probabilities are copied out as (vocabulary, PANEL tokens) blocks, zeros past the last row;
   a tile of HIDDEN_TILE outputs x EMBEDDING_COLUMNS tokens then sums in vector registers, reading the panels'
   weights as scalars. The sums are kept per tile as (hidden, PANEL tokens) and turned back at the end. scratch:
   token_panels * (hidden + VOCAB_PANELS * PANEL) * PANEL floats, tokens_panels = ceil(rows / PANEL); hidden a
   multiple of HIDDEN_TILE. */
void expected_embedding(const float *probs, int rows, int vocab, const float *packed, int hidden, float *scratch,
                        float *out) {
    const int token_panels = (rows + PANEL - 1) / PANEL, vocab_panels = vocab / PANEL;
    float *sums = scratch, *blocks = scratch + (size_t)token_panels * hidden * PANEL;
    memset(sums, 0, sizeof(float) * (size_t)token_panels * hidden * PANEL);
    for (int first = 0; first < vocab_panels; first += VOCAB_PANELS) {
        const int count = vocab_panels - first < VOCAB_PANELS ? vocab_panels - first : VOCAB_PANELS;
        const int width = count * PANEL;
        for (int t = 0; t < token_panels * PANEL; t++) {
            float *block = blocks + (size_t)(t / PANEL) * VOCAB_PANELS * PANEL * PANEL + t % PANEL;
            if (t < rows) {
                const float *row = probs + (size_t)t * vocab + (size_t)first * PANEL;
                for (int v = 0; v < width; v++) block[v * PANEL] = row[v];
            } else {
                for (int v = 0; v < width; v++) block[v * PANEL] = 0.0f;
            }
        }
        for (int tp = 0; tp < token_panels; tp++) {
            const float *block = blocks + (size_t)tp * VOCAB_PANELS * PANEL * PANEL;
            for (int c = 0; c < PANEL; c += EMBEDDING_COLUMNS)
                for (int h = 0; h < hidden; h += HIDDEN_TILE) {
                    vec sum[HIDDEN_TILE][EMBEDDING_VECTORS];
                    for (int r = 0; r < HIDDEN_TILE; r++)
                        for (int v = 0; v < EMBEDDING_VECTORS; v++) sum[r][v] = (vec){0};
                    for (int p = 0; p < count; p++) {
                        const float *weights = packed + ((size_t)(first + p) * hidden + h) * PANEL;
                        const float *tokens = block + (size_t)p * PANEL * PANEL + c;
                        for (int lane = 0; lane < PANEL; lane++) {
                            vec token[EMBEDDING_VECTORS];
                            for (int v = 0; v < EMBEDDING_VECTORS; v++)
                                token[v] = *(const vec_unaligned *)(tokens + lane * PANEL + v * LANES);
                            for (int r = 0; r < HIDDEN_TILE; r++) {
                                const float w = weights[r * PANEL + lane];
                                for (int v = 0; v < EMBEDDING_VECTORS; v++) sum[r][v] += w * token[v];
                            }
                        }
                    }
                    float *sums_at = sums + ((size_t)tp * hidden + h) * PANEL + c;
                    for (int r = 0; r < HIDDEN_TILE; r++)
                        for (int v = 0; v < EMBEDDING_VECTORS; v++)
                            *(vec_unaligned *)(sums_at + r * PANEL + v * LANES) += sum[r][v];
                }
        }
    }
    for (int t = 0; t < rows; t++)
        for (int h = 0; h < hidden; h++)
            out[(size_t)t * hidden + h] = sums[((size_t)(t / PANEL) * hidden + h) * PANEL + t % PANEL];
}

/* e^x as layers.gelu_tanh computes it on the CPU (cpu.exp): x held to [-87, 88], 2^n from the exponent bits
   times a degree-5 polynomial for 2^f, f in [-0.5, 0.5]. Plain arithmetic, so the loop below vectorises. */
static inline float fast_exp(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float y = x * 1.4426950408889634f;
    const float n = (y + 12582912.0f) - 12582912.0f;
    const float f = y - n, f2 = f * f;
    const float fraction = (1.0f + 0.6931468559416913f * f) +
                           f2 * ((0.2402223800274111f + 0.05550892952451219f * f) +
                                 f2 * (0.009671697938398751f + 0.0013218672481612153f * f));
    const int32_t bits = ((int32_t)n + 127) << 23;
    float whole;
    memcpy(&whole, &bits, sizeof whole);
    return fraction * whole;
}

/* h[c] = gelu_tanh(gate[c]) * up[c] for c < inner, gelu as x / (1 + e^(-2z)), z = sqrt(2/pi) (x + 0.044715 x^3). */
static void gated_gelu(const float *gate, const float *up, int inner, float *h) {
    for (int c = 0; c < inner; c++) {
        const float x = gate[c];
        const float minus_two_z = x * (1.0f + 0.044715f * x * x) * -1.5957691216057308f;
        h[c] = x / (1.0f + fast_exp(minus_two_z)) * up[c];
    }
}

/* The gated MLP over `rows` inputs given by pointers: out (rows, hidden) = down(gelu(gate(x)) * up(x)). gate and up
   packed (inner / PANEL, hidden, PANEL), down (hidden / PANEL, inner, PANEL). scratch: 3 * inner floats a row. */
static void gated_mlp(const float *const *inputs, int rows, int hidden, const float *gate, const float *up, int inner,
                      const float *down, float *scratch, float *out) {
    float *gate_up_out = scratch, *h = scratch + (size_t)rows * 2 * inner;
    packed_product(inputs, rows, hidden, gate, inner, gate_up_out, 2 * (size_t)inner);
    packed_product(inputs, rows, hidden, up, inner, gate_up_out + inner, 2 * (size_t)inner);
    const float *h_rows[rows];
    for (int r = 0; r < rows; r++) {
        const float *row = gate_up_out + (size_t)r * 2 * inner;
        gated_gelu(row, row + inner, inner, h + (size_t)r * inner);
        h_rows[r] = h + (size_t)r * inner;
    }
    packed_product(h_rows, rows, inner, down, hidden, out, (size_t)hidden);
}

/* Experts first..last-1 of one layer, for the tokens routed to them. Expert e's tokens are sorted entries
   starts[e] .. starts[e+1]-1, token tokens[j] of x (tokens, hidden); entry j's output goes to row j of out
   (entries, hidden). gate_up packed (experts, 2 inner / PANEL, hidden, PANEL), each expert's gate then its up;
   down packed (experts, hidden / PANEL, inner, PANEL). scratch: 3 * inner floats per row of the share's largest
   expert. */
void experts_forward(const float *x, int hidden, const int32_t *tokens, const int32_t *starts, int first, int last,
                     const float *gate_up, int inner, const float *down, float *scratch, float *out) {
    for (int e = first; e < last; e++) {
        const int start = starts[e], rows = starts[e + 1] - start;
        if (rows == 0) continue;
        const float *inputs[rows];
        for (int r = 0; r < rows; r++) inputs[r] = x + (size_t)tokens[start + r] * hidden;
        const float *gate = gate_up + (size_t)e * 2 * inner * hidden;
        gated_mlp(inputs, rows, hidden, gate, gate + (size_t)inner * hidden, inner, down + (size_t)e * hidden * inner,
                  scratch, out + (size_t)start * hidden);
    }
}

/* A dense gated MLP over rows first..last-1 of x (rows, hidden), into the same rows of out; MLP_ROWS at a time, so
   that a group's intermediate results stay in the core's cache. gate, up and down packed as for gated_mlp.
   scratch: 3 * inner * MLP_ROWS floats. */
void dense_forward(const float *x, int hidden, int first, int last, const float *gate, const float *up, int inner,
                   const float *down, float *scratch, float *out) {
    for (int start = first; start < last; start += MLP_ROWS) {
        const int rows = last - start < MLP_ROWS ? last - start : MLP_ROWS;
        const float *inputs[MLP_ROWS];
        for (int r = 0; r < rows; r++) inputs[r] = x + (size_t)(start + r) * hidden;
        gated_mlp(inputs, rows, hidden, gate, up, inner, down, scratch, out + (size_t)start * hidden);
    }
}

/* y[t] = sum over j < k of weights[t, j] * out[slots[t, j]], for tokens first..last-1, j in order. */
void combine(const float *out, const int32_t *slots, const float *weights, int first, int last, int k, int hidden,
             float *y) {
    for (int t = first; t < last; t++) {
        float *row = y + (size_t)t * hidden;
        const float *source = out + (size_t)slots[(size_t)t * k] * hidden;
        const float w = weights[(size_t)t * k];
        for (int c = 0; c < hidden; c++) row[c] = source[c] * w;
        for (int j = 1; j < k; j++) {
            source = out + (size_t)slots[(size_t)t * k + j] * hidden;
            const float wj = weights[(size_t)t * k + j];
            for (int c = 0; c < hidden; c++) row[c] += source[c] * wj;
        }
    }
}

/* count keys (dim floats each, key r at keys + r * step) into columns at .. at + count - 1 of a weight packed as
   (padded / PANEL, dim, PANEL) for attention_forward's scores. */
static void pack_keys(const float *keys, size_t step, int count, int dim, float *packed, int at) {
    for (int r = 0; r < count; r++) {
        const int key = at + r;
        float *column = packed + (size_t)(key / PANEL) * dim * PANEL + key % PANEL;
        const float *row = keys + (size_t)r * step;
        for (int i = 0; i < dim; i++) column[(size_t)i * PANEL] = row[i];
    }
}

/* The cached keys and values of one (batch row, KV head), `cached` rows of dim floats at element strides key_step
   and value_step, put first: keys packed into columns 0 .. cached - 1, values copied to rows 0 .. cached - 1 of
   (positions, dim). */
void cached_states(const float *keys, int64_t key_step, const float *values, int64_t value_step, int cached, int dim,
                   float *packed_keys, float *all_values) {
    pack_keys(keys, (size_t)key_step, cached, dim, packed_keys, 0);
    for (int r = 0; r < cached; r++) memcpy(all_values + (size_t)r * dim, values + (size_t)r * value_step, sizeof(float) * dim);
}

/* a . b over n floats: 16 lanes of partial sums over whole groups of 16, so that the loop vectorises without
   licence to reorder; the last few one at a time. */
static float dot(const float *a, const float *b, int n) {
    float part[16] = {0}, total = 0.0f;
    const int whole = n / 16 * 16;
    for (int j = 0; j < whole; j += 16)
        for (int lane = 0; lane < 16; lane++) part[lane] += a[j + lane] * b[j + lane];
    for (int j = whole; j < n; j++) total += a[j] * b[j];
    for (int lane = 0; lane < 16; lane++) total += part[lane];
    return total;
}

/* out = x divided by its root mean square (eps added to the mean), times weight (NULL: none); out may be x. */
static void rms_norm(const float *x, float *out, int dim, const float *weight, float eps) {
    const float scale = 1.0f / sqrtf(dot(x, x, dim) / dim + eps);
    if (weight)
        for (int i = 0; i < dim; i++) out[i] = x[i] * scale * weight[i];
    else
        for (int i = 0; i < dim; i++) out[i] = x[i] * scale;
}

/* rms_norm of `count` vectors of dim floats in place. */
static void rms_norm_rows(float *x, int count, int dim, const float *weight, float eps) {
    for (int v = 0; v < count; v++) rms_norm(x + (size_t)v * dim, x + (size_t)v * dim, dim, weight, eps);
}

/* RoPE, rotate-half, of `count` heads of dim floats in place; rotation: cos then sin of the dim / 2 angles. */
static void rotate_heads(float *x, int count, int dim, const float *rotation) {
    const int half = dim / 2;
    for (int v = 0; v < count; v++) {
        float *low = x + (size_t)v * dim, *high = low + half;
        for (int i = 0; i < half; i++) {
            const float a = low[i], b = high[i], c = rotation[i], s = rotation[half + i];
            low[i] = a * c - b * s;
            high[i] = b * c + a * s;
        }
    }
}

/* Attention's inputs for a row block x (batch * block_length rows, hidden), its row r at new position
   first_position + r % block_length of batch row r / block_length: the projections, q and k norms (weighted),
   v norm (unweighted; v_proj NULL: the values are the raw keys), RoPE (rotations: per new position, cos then sin)
   of queries and keys. x is normed first when input_norm (its weight) is given. Writes queries (batch, length,
   heads, dim); new_keys (batch, kv_heads, length, dim); each key also into column cached + position of packed_keys
   (batch, kv_heads, padded / PANEL, dim, PANEL); values into row cached + position of values (batch, kv_heads,
   positions, dim). Projections packed (out / PANEL, hidden, PANEL). MLP_ROWS rows at a time; scratch: MLP_ROWS *
   ((heads + 2 * kv_heads) * dim + hidden) floats. */
void attention_inputs(const float *x, const float *input_norm, int rows, int block_length, int first_position,
                      int length, int hidden, const float *q_proj, const float *k_proj, const float *v_proj, int heads, int kv_heads,
                      int dim, const float *q_norm, const float *k_norm, float eps, const float *rotations,
                      int cached, int positions, float *scratch, float *queries, float *new_keys,
                      float *packed_keys, float *values) {
    const int padded = (positions + PANEL - 1) / PANEL * PANEL, q_width = heads * dim, kv_width = kv_heads * dim;
    float *q_out = scratch, *k_out = q_out + (size_t)MLP_ROWS * q_width, *v_out = k_out + (size_t)MLP_ROWS * kv_width;
    float *normed = v_out + (size_t)MLP_ROWS * kv_width;
    for (int start = 0; start < rows; start += MLP_ROWS) {
        const int count = rows - start < MLP_ROWS ? rows - start : MLP_ROWS;
        const float *inputs[MLP_ROWS];
        for (int r = 0; r < count; r++) {
            inputs[r] = x + (size_t)(start + r) * hidden;
            if (input_norm) {
                rms_norm(inputs[r], normed + (size_t)r * hidden, hidden, input_norm, eps);
                inputs[r] = normed + (size_t)r * hidden;
            }
        }
        packed_product(inputs, count, hidden, q_proj, q_width, q_out, q_width);
        packed_product(inputs, count, hidden, k_proj, kv_width, k_out, kv_width);
        if (v_proj) packed_product(inputs, count, hidden, v_proj, kv_width, v_out, kv_width);
        for (int r = 0; r < count; r++) {
            const int b = (start + r) / block_length, position = first_position + (start + r) % block_length;
            const float *rotation = rotations + (size_t)position * dim;
            float *q = q_out + (size_t)r * q_width, *k = k_out + (size_t)r * kv_width;
            const float *v = v_proj ? v_out + (size_t)r * kv_width : k;
            for (int g = 0; g < kv_heads; g++) {  // the values first: they may be the raw keys
                float *value = values + (((size_t)b * kv_heads + g) * positions + cached + position) * dim;
                memcpy(value, v + (size_t)g * dim, sizeof(float) * dim);
                rms_norm_rows(value, 1, dim, NULL, eps);
            }
            rms_norm_rows(q, heads, dim, q_norm, eps);
            rotate_heads(q, heads, dim, rotation);
            memcpy(queries + ((size_t)b * length + position) * q_width, q, sizeof(float) * q_width);
            rms_norm_rows(k, kv_heads, dim, k_norm, eps);
            rotate_heads(k, kv_heads, dim, rotation);
            for (int g = 0; g < kv_heads; g++) {
                const size_t head = (size_t)b * kv_heads + g;
                memcpy(new_keys + (head * length + position) * dim, k + (size_t)g * dim, sizeof(float) * dim);
                pack_keys(k + (size_t)g * dim, dim, 1, dim, packed_keys + head * padded * dim, cached + position);
            }
        }
    }
}

/* A row of scores turned into e^(s - max); returns their sum. Keys not visible (visible: NULL for all) score -inf
   first, which fast_exp floors to e^-87 (1.6e-38: nothing a sum notices, as in cpu.exp). 16 lanes of partial maxima
   and sums over whole groups of 16 keys, so that the loops vectorise without licence to reorder; the last few keys
   one at a time. */
static float exponentiate_row(float *row, int positions, const uint8_t *visible) {
    if (visible)
        for (int j = 0; j < positions; j++) row[j] = visible[j] ? row[j] : -__builtin_inff();
    const int whole = positions / 16 * 16;
    float top[16], sum[16], highest = -__builtin_inff(), total = 0.0f;
    for (int lane = 0; lane < 16; lane++) top[lane] = -__builtin_inff(), sum[lane] = 0.0f;
    for (int j = 0; j < whole; j += 16)
        for (int lane = 0; lane < 16; lane++) top[lane] = row[j + lane] > top[lane] ? row[j + lane] : top[lane];
    for (int j = whole; j < positions; j++) highest = row[j] > highest ? row[j] : highest;
    for (int lane = 0; lane < 16; lane++) highest = top[lane] > highest ? top[lane] : highest;
    for (int j = 0; j < whole; j += 16)
        for (int lane = 0; lane < 16; lane++) {
            row[j + lane] = fast_exp(row[j + lane] - highest);
            sum[lane] += row[j + lane];
        }
    for (int j = whole; j < positions; j++) {
        row[j] = fast_exp(row[j] - highest);
        total += row[j];
    }
    for (int lane = 0; lane < 16; lane++) total += sum[lane];
    return total;
}

/* Attention and its output projection for rows first..last-1 of a block's (batch * length) query positions: row
   (b, q) of out is o_proj of the heads' softmax(q_h . K_g^T) V_g side by side, g the KV head of head h, scale 1.
   queries (batch, heads, length, dim) at element strides query_steps {batch, head, position}, rows contiguous;
   keys packed by pack_keys, one (batch, KV head) after another; values at value_steps {batch, KV head, position},
   rows of value_dim contiguous floats; visible: NULL (every key visible) or one flag per key at visible_steps
   {batch, query} (0 for a broadcast axis); o_proj packed (hidden / PANEL, heads * value_dim, PANEL); out (batch *
   length, hidden). ATTENTION_ROWS queries at a time, so a tile's scores stay in the core's cache; each is divided
   by its sum after meeting the values (one division a value, not one a key). scratch: ATTENTION_ROWS * (padded +
   heads * value_dim + 1) floats. */
#define ATTENTION_ROWS 32
int attention_rows(void) { return ATTENTION_ROWS; }

void attention_forward(const float *queries, const int64_t *query_steps, int length, int first, int last, int heads,
                       int kv_heads, int dim, const float *packed_keys, int positions, const float *values,
                       const int64_t *value_steps, int value_dim, const uint8_t *visible,
                       const int64_t *visible_steps, const float *o_proj, int hidden, float *scratch, float *out) {
    const int padded = (positions + PANEL - 1) / PANEL * PANEL, group = heads / kv_heads, width = heads * value_dim;
    float *scores = scratch, *merged = scratch + (size_t)ATTENTION_ROWS * padded;
    float *sums = merged + (size_t)ATTENTION_ROWS * width;
    const float *query_rows[ATTENTION_ROWS], *score_rows[ATTENTION_ROWS], *merged_rows[ATTENTION_ROWS];
    for (int r = 0; r < ATTENTION_ROWS; r++) {
        score_rows[r] = scores + (size_t)r * padded;
        merged_rows[r] = merged + (size_t)r * width;
    }
    for (int start = first; start < last;) {
        const int b = start / length, q = start % length;
        int rows = last - start < ATTENTION_ROWS ? last - start : ATTENTION_ROWS;
        rows = length - q < rows ? length - q : rows;  // a tile stays within one batch row
        for (int h = 0; h < heads; h++) {
            const int g = h / group;
            for (int r = 0; r < rows; r++)
                query_rows[r] = queries + b * query_steps[0] + h * query_steps[1] + (q + r) * query_steps[2];
            packed_product(query_rows, rows, dim, packed_keys + ((size_t)b * kv_heads + g) * padded * dim, padded,
                           scores, padded);
            for (int r = 0; r < rows; r++) {
                const uint8_t *flags = visible ? visible + b * visible_steps[0] + (q + r) * visible_steps[1] : NULL;
                sums[r] = exponentiate_row(scores + (size_t)r * padded, positions, flags);
            }
            float *head_out = merged + (size_t)h * value_dim;
            panel_product(score_rows, rows, positions, values + b * value_steps[0] + g * value_steps[1], PANEL,
                          value_steps[2], value_dim, head_out, width);
            for (int r = 0; r < rows; r++) {
                const float inverse = 1.0f / sums[r];
                for (int c = 0; c < value_dim; c++) head_out[(size_t)r * width + c] *= inverse;
            }
        }
        packed_product(merged_rows, rows, width, o_proj, hidden, out + (size_t)start * hidden, hidden);
        start += rows;
    }
}

/* A decoder layer between attention and its feed-forward, for rows first..last-1 of (rows, hidden): residual = h +
   norm(attended) * post_attention; dense_in and experts_in, the residual normed for the dense MLP and the experts;
   scores (rows, experts), the router's: router (experts, hidden) as stored, times the residual normed and scaled
   by router_scale. */
void after_attention(const float *h, const float *attended, int first, int last, int hidden,
                     const float *post_attention, const float *pre_feedforward, const float *pre_feedforward_2,
                     const float *router_scale, const float *router, int experts, float eps, float *residual,
                     float *dense_in, float *experts_in, float *scores) {
    float routed[hidden];
    for (int t = first; t < last; t++) {
        const size_t row = (size_t)t * hidden;
        rms_norm(attended + row, residual + row, hidden, post_attention, eps);
        for (int i = 0; i < hidden; i++) residual[row + i] = h[row + i] + residual[row + i];
        rms_norm(residual + row, dense_in + row, hidden, pre_feedforward, eps);
        rms_norm(residual + row, experts_in + row, hidden, pre_feedforward_2, eps);
        rms_norm(residual + row, routed, hidden, router_scale, eps);
        for (int e = 0; e < experts; e++) scores[(size_t)t * experts + e] = dot(routed, router + (size_t)e * hidden, hidden);
    }
}

/* A decoder layer's output, rows first..last-1: (residual + norm(norm(dense_out) * post_feedforward_1 +
   norm(experts_out) * post_feedforward_2) * post_feedforward) * scalar. */
void after_feed_forward(const float *residual, const float *dense_out, const float *experts_out, int first, int last,
                        int hidden, const float *post_feedforward_1, const float *post_feedforward_2,
                        const float *post_feedforward, float scalar, float eps, float *out) {
    float mixed[hidden], experts_normed[hidden];
    for (int t = first; t < last; t++) {
        const size_t row = (size_t)t * hidden;
        rms_norm(dense_out + row, mixed, hidden, post_feedforward_1, eps);
        rms_norm(experts_out + row, experts_normed, hidden, post_feedforward_2, eps);
        for (int i = 0; i < hidden; i++) mixed[i] += experts_normed[i];
        rms_norm(mixed, out + row, hidden, post_feedforward, eps);
        for (int i = 0; i < hidden; i++) out[row + i] = (residual[row + i] + out[row + i]) * scalar;
    }
}

/* The decoder's input (rows, hidden) for `rows` canvas positions (self-conditioning): each token's embedding, row ids[t] of
   the table packed as the head reads it (vocab / PANEL, hidden, PANEL), times scale; plus, where soft (rows, hidden)
   is given (probs @ E, expected_embedding's), the gated MLP of norm(soft * scale) * pre_norm; the sum normed without
   a weight. gate and up packed (inner / PANEL, hidden, PANEL), down (hidden / PANEL, inner, PANEL). MLP_ROWS rows at
   a time; scratch: MLP_ROWS * (hidden + 3 * inner) floats. */
void conditioned_embeddings(const int32_t *ids, const float *table, int hidden, float scale, const float *soft,
                            const float *pre_norm, const float *gate, const float *up, int inner, const float *down,
                            float eps, int rows, float *scratch, float *out) {
    float *normed = scratch, *mlp_scratch = scratch + (size_t)MLP_ROWS * hidden;
    for (int start = 0; start < rows; start += MLP_ROWS) {
        const int group = rows - start < MLP_ROWS ? rows - start : MLP_ROWS;
        float *group_out = out + (size_t)start * hidden;
        if (soft) {
            const float *inputs[MLP_ROWS];
            for (int r = 0; r < group; r++) {
                float *row = normed + (size_t)r * hidden;
                const float *sums = soft + (size_t)(start + r) * hidden;
                for (int i = 0; i < hidden; i++) row[i] = sums[i] * scale;
                rms_norm(row, row, hidden, pre_norm, eps);
                inputs[r] = row;
            }
            gated_mlp(inputs, group, hidden, gate, up, inner, down, mlp_scratch, group_out);
        }
        for (int r = 0; r < group; r++) {
            const int32_t id = ids[start + r];
            const float *embedding = table + (size_t)(id / PANEL) * hidden * PANEL + id % PANEL;
            float *row = group_out + (size_t)r * hidden;
            if (soft)
                for (int i = 0; i < hidden; i++) row[i] = embedding[(size_t)i * PANEL] * scale + row[i];
            else
                for (int i = 0; i < hidden; i++) row[i] = embedding[(size_t)i * PANEL] * scale;
            rms_norm(row, row, hidden, NULL, eps);
        }
    }
}
