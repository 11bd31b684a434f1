/* BitLinears at inference in one call: activation_codes_uint8 (activation_codes.c) writes each chunk of tokens' codes
 * into a buffer of the calling thread's own, and ternary_gemm_jobs (ternary_gemm.c) multiplies them into the outputs.
 *
 * Why one call: a short query runs every projection on a few tokens, where the arithmetic takes microseconds and
 * each Python-side step (allocating the codes buffer and the steps, two foreign calls, their argument conversion)
 * costs about as much again. Each layer describes itself once (struct ternary_projection, made again only when its
 * parameters change), and projections that read the same input (q, k and v; gate and up) run in one call whose
 * GEMMs share one parallel loop. The buffer is kept per thread (so that threads encoding at once never share one)
 * and grows to the largest chunk seen: at most count x chunk_rows x k_padded bytes plus the steps. */
#include <stdint.h>
#include <stdlib.h>

#include "ternary_gemm.h"

int activation_codes_uint8(const void *x, const void *factor, int activation, int64_t rows, int64_t cols,
                           int64_t row_stride, const float *norm_weight, const float *rms_weight, float eps,
                           float outer_eps, float min_scale, uint8_t *codes, int64_t code_stride, float *steps,
                           int in_bfloat16, int threads);

/* One BitLinear's operands: its inserted RMSNorm's weight and epsilon (norm_weight NULL: no norm), a folded model
 * norm in front (rms_weight / outer_eps, activation_codes.c; NULL: none), and its GEMM's (ternary_gemm.c). */
struct ternary_projection {
    const float *norm_weight;
    const float *rms_weight;
    float eps;
    float outer_eps;
    const void *packed;
    const int32_t *column_sums;
    int64_t k_padded;
    int64_t out_features;
    float scale;
    const float *bias;
    int output_activation; /* applied to the outputs (enum activation, activations.h) */
};

static _Thread_local uint8_t *scratch;
static _Thread_local size_t scratch_bytes;

/* The `count` projections of one input x (rows x cols, float32 or bfloat16; activation(x) times factor, of the same
 * dtype and row stride, where factor is not NULL: activation_codes.c) into outs[p] (rows x out_features of projection
 * p, float32 or bfloat16); gated: a gated MLP's gate and up projections (count 2, the gate's output activation its
 * activation), whose product activation(gate) * up goes to outs[0] (ternary_gemm_jobs). Returns 0, or -1 when a
 * buffer could not be allocated or a gated call is not such a pair (outputs then incomplete). */
int ternary_linear(const struct ternary_projection *projections, int64_t count, const void *x, const void *factor,
                   int activation, int64_t rows, int64_t cols, int64_t row_stride, int in_bfloat16, float min_scale,
                   void *const *outs, int out_bfloat16, int64_t chunk_rows, int threads, int gated) {
    const int64_t tile_rows = ternary_gemm_tile_rows();
    if (tile_rows <= 0 || count < 1 || count > TERNARY_GEMM_MAX_JOBS) return -1;
    if (chunk_rows > rows) chunk_rows = rows;
    if (chunk_rows < 1) chunk_rows = 1;
    const int64_t padded_rows = chunk_rows + (tile_rows - chunk_rows % tile_rows) % tile_rows;
    /* each projection's codes, then its steps, each part starting on a cache line */
    size_t code_offsets[TERNARY_GEMM_MAX_JOBS], step_offsets[TERNARY_GEMM_MAX_JOBS], needed = 0;
    for (int64_t p = 0; p < count; ++p) {
        code_offsets[p] = needed;
        step_offsets[p] = needed + (size_t)(padded_rows * projections[p].k_padded + 63) / 64 * 64;
        needed = step_offsets[p] + (sizeof(float) * (size_t)padded_rows + 63) / 64 * 64;
    }
    if (needed > scratch_bytes) {
        uint8_t *grown = realloc(scratch, needed);
        if (!grown) return -1;
        scratch = grown;
        scratch_bytes = needed;
    }
    const size_t in_size = in_bfloat16 ? 2 : 4, out_size = out_bfloat16 ? 2 : 4;
    struct ternary_gemm_job jobs[TERNARY_GEMM_MAX_JOBS];
    for (int64_t start = 0; start < rows; start += chunk_rows) {
        const int64_t here = rows - start < chunk_rows ? rows - start : chunk_rows;
        const void *chunk = (const char *)x + (size_t)(start * row_stride) * in_size;
        const void *chunk_factor = factor ? (const char *)factor + (size_t)(start * row_stride) * in_size : NULL;
        for (int64_t p = 0; p < count; ++p) {
            const struct ternary_projection *projection = &projections[p];
            uint8_t *codes = scratch + code_offsets[p];
            float *steps = (float *)(scratch + step_offsets[p]);
            if (activation_codes_uint8(chunk, chunk_factor, activation, here, cols, row_stride,
                                       projection->norm_weight, projection->rms_weight, projection->eps,
                                       projection->outer_eps, min_scale, codes, projection->k_padded, steps,
                                       in_bfloat16, threads))
                return -1;
            void *out = gated ? (p ? outs[0] : NULL) : outs[p]; /* a gated pair's product: the up job's output */
            if (out) out = (char *)out + (size_t)(start * projection->out_features) * out_size;
            jobs[p] = (struct ternary_gemm_job){codes, projection->k_padded, projection->k_padded, projection->packed,
                                                projection->column_sums, projection->out_features, steps,
                                                projection->scale, projection->bias, out,
                                                projection->output_activation};
        }
        if (ternary_gemm_jobs(jobs, count, here, out_bfloat16, threads, gated)) return -1;
    }
    return 0;
}
