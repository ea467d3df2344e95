/* Kernels of the CPU's lean pass (lean.py), built and loaded by native.py.
 *
 * lora_add: batched LoRA, the updates of a group of layers that read one input (q, k and v; gate and up), for the
 * tokens of a pass grouped by adapter, added into the group's fused output. Block g of tokens
 * order[starts[g] .. starts[g + 1]) uses stack entry stacks[g]. For a token k of block g:
 *   t[k, :]                  = x[order[k], :] @ a[stacks[g]]                        (a: [stacked, in, width])
 *   y[order[k], cols[l] + :] += t[k, l * rank : (l + 1) * rank] @ b[l][stacks[g]]  (b[l]: [stacked, rank, outs[l]])
 * Both products run over chunks of 16 columns for tiles of up to 4 tokens of one adapter, so that a row of a stack
 * is read once per tile and the sums stay in registers. The stacks are read from memory (a decode step streams the
 * whole model through the caches first), so the loops read them in order: A 32 rows at a time, B one adapter's
 * rows left to right per thread. A token's sums are taken in the same order whatever else is in the pass. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define LANES 8
#define CHUNK 16
#define TILE 4
#define ROWS 32

typedef float vec __attribute__((vector_size(LANES * sizeof(float)), aligned(sizeof(float))));

typedef struct {
    int64_t in, width, layers, rank;
    const float *a;
    const float *const *b;
    const int64_t *cols, *outs;
} lora_group_t;

typedef struct {
    int64_t threads, blocks;
    const int64_t *starts, *stacks, *order;
} lora_pass_t;

/* t[j, c:c+16] (+)= x[tokens[j], i0:i1] @ a[i0:i1, c:c+16] for a tile of N tokens (N known at compile time, so that
 * the sums stay in registers); the first rows start the sums, later rows add to them */
#define DOWN(N)                                                                               \
    do {                                                                                      \
        vec acc[N][2] = {{{0}}};                                                              \
        if (i0 > 0)                                                                           \
            for (int j = 0; j < (N); j++) {                                                   \
                acc[j][0] = ((vec *)(t + j * width + c))[0];                                  \
                acc[j][1] = ((vec *)(t + j * width + c))[1];                                  \
            }                                                                                 \
        for (int64_t i = i0; i < i1; i++) {                                                   \
            const vec *column = (const vec *)(a + i * width + c);                             \
            for (int j = 0; j < (N); j++) {                                                   \
                float value = x[tokens[j] * x_stride + i];                                    \
                acc[j][0] += value * column[0];                                               \
                acc[j][1] += value * column[1];                                               \
            }                                                                                 \
        }                                                                                     \
        for (int j = 0; j < (N); j++) {                                                       \
            ((vec *)(t + j * width + c))[0] = acc[j][0];                                      \
            ((vec *)(t + j * width + c))[1] = acc[j][1];                                      \
        }                                                                                     \
    } while (0)

/* y[tokens[j], c:c+16] += t[j, :rank] @ b[:, c:c+16] for a tile of N tokens */
#define UP(N)                                                                                 \
    do {                                                                                      \
        vec acc[N][2];                                                                        \
        for (int j = 0; j < (N); j++) {                                                       \
            acc[j][0] = ((vec *)(y + tokens[j] * y_stride + c))[0];                           \
            acc[j][1] = ((vec *)(y + tokens[j] * y_stride + c))[1];                           \
        }                                                                                     \
        for (int64_t q = 0; q < rank; q++) {                                                  \
            const vec *row = (const vec *)(b + q * out + c);                                  \
            for (int j = 0; j < (N); j++) {                                                   \
                float value = t[j * width + q];                                               \
                acc[j][0] += value * row[0];                                                  \
                acc[j][1] += value * row[1];                                                  \
            }                                                                                 \
        }                                                                                     \
        for (int j = 0; j < (N); j++) {                                                       \
            ((vec *)(y + tokens[j] * y_stride + c))[0] = acc[j][0];                           \
            ((vec *)(y + tokens[j] * y_stride + c))[1] = acc[j][1];                           \
        }                                                                                     \
    } while (0)

/* BODY(N) for the tile's n (1 to TILE) tokens, with N a constant */
#define BY_TILE(n, BODY)            \
    switch (n) {                    \
        case 4: BODY(4); break;     \
        case 3: BODY(3); break;     \
        case 2: BODY(2); break;     \
        default: BODY(1);           \
    }

/* t[j, :] = x[tokens[j]] @ a for the tile's n tokens, ROWS rows of a at a time (read once from memory, then from
 * the L1 cache for each chunk of columns) */
static void down_tile(const float *x, int64_t x_stride, const int64_t *tokens, int64_t n, int64_t in,
                      const float *a, int64_t width, float *t) {
    for (int64_t i0 = 0; i0 < in; i0 += ROWS) {
        int64_t i1 = i0 + ROWS < in ? i0 + ROWS : in, c = 0;
        for (; c + CHUNK <= width; c += CHUNK) BY_TILE(n, DOWN);
        for (int64_t j = 0; j < n; j++)  /* the last columns of a width that is not a multiple of CHUNK */
            for (int64_t col = c; col < width; col++) {
                float sum = i0 > 0 ? t[j * width + col] : 0;
                for (int64_t i = i0; i < i1; i++) sum += x[tokens[j] * x_stride + i] * a[i * width + col];
                t[j * width + col] = sum;
            }
    }
}

static void up_tile(const float *t, int64_t width, const int64_t *tokens, int64_t n, int64_t rank,
                    const float *b, int64_t out, int64_t c, float *y, int64_t y_stride) {
    if (out - c < CHUNK) {
        for (int64_t j = 0; j < n; j++)
            for (int64_t col = c; col < out; col++) {
                float sum = y[tokens[j] * y_stride + col];
                for (int64_t q = 0; q < rank; q++) sum += t[j * width + q] * b[q * out + col];
                y[tokens[j] * y_stride + col] = sum;
            }
        return;
    }
    BY_TILE(n, UP);
}

static int64_t chunks(int64_t columns) { return (columns + CHUNK - 1) / CHUNK; }

static int64_t tile_size(const lora_pass_t *pass, int64_t g, int64_t k0) {
    int64_t left = pass->starts[g + 1] - k0;
    return left < TILE ? left : TILE;
}

void lora_add(const lora_group_t *group, const lora_pass_t *pass, const float *x, int64_t x_stride, float *y,
              int64_t y_stride) {
    int64_t in = group->in, width = group->width, rank = group->rank, blocks = pass->blocks;
    int64_t tiles = 0, up_chunks = 0;
    for (int64_t g = 0; g < blocks; g++) tiles += (pass->starts[g + 1] - pass->starts[g] + TILE - 1) / TILE;
    for (int64_t l = 0; l < group->layers; l++) up_chunks += chunks(group->outs[l]);
    float *t = malloc(pass->starts[blocks] * width * sizeof(float));
    #pragma omp parallel num_threads(pass->threads)
    {
        /* the A products: a task per tile, the tiles block after block */
        #pragma omp for schedule(static)
        for (int64_t task = 0; task < tiles; task++) {
            int64_t tile = task, g = 0, count;
            while (tile >= (count = (pass->starts[g + 1] - pass->starts[g] + TILE - 1) / TILE)) {
                tile -= count;
                g++;
            }
            int64_t k0 = pass->starts[g] + tile * TILE;
            down_tile(x, x_stride, pass->order + k0, tile_size(pass, g, k0), in,
                      group->a + pass->stacks[g] * in * width, width, t + k0 * width);
        }
        /* the B products: (block, layer's column chunk) tasks, so that a thread reads one adapter's B rows left
         * to right */
        #pragma omp for schedule(static)
        for (int64_t task = 0; task < up_chunks * blocks; task++) {
            int64_t g = task / up_chunks, chunk = task % up_chunks, l = 0;
            while (chunk >= chunks(group->outs[l])) chunk -= chunks(group->outs[l++]);
            int64_t out = group->outs[l];
            const float *b = group->b[l] + pass->stacks[g] * rank * out;
            for (int64_t k0 = pass->starts[g]; k0 < pass->starts[g + 1]; k0 += TILE)
                up_tile(t + k0 * width + l * rank, width, pass->order + k0, tile_size(pass, g, k0), rank, b, out,
                        chunk * CHUNK, y + group->cols[l], y_stride);
        }
    }
    free(t);
}

/* out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w, as Llama's RMSNorm, for rows of cols floats; in torch a call on a
 * decode step's few rows cost about 50 us, here a few */
void rms_norm(const float *x, int64_t x_stride, const float *w, float eps, int64_t rows, int64_t cols, float *out,
              int64_t threads) {
    #pragma omp parallel for num_threads(threads) if (rows * cols >= (1 << 16))
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * x_stride;
        float *o = out + r * cols;
        vec squares = {0};
        int64_t c = 0;
        for (; c + LANES <= cols; c += LANES) {
            vec v = *(const vec *)(row + c);
            squares += v * v;
        }
        float sum = 0;
        for (int i = 0; i < LANES; i++) sum += squares[i];
        for (; c < cols; c++) sum += row[c] * row[c];
        float scale = 1.0f / sqrtf(sum / cols + eps);
        for (c = 0; c + LANES <= cols; c += LANES)
            *(vec *)(o + c) = *(const vec *)(row + c) * scale * *(const vec *)(w + c);
        for (; c < cols; c++) o[c] = row[c] * scale * w[c];
    }
}
