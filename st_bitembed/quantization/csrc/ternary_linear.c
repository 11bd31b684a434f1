/* A whole BitLinear at inference in one call: activation_codes_uint8 (activation_codes.c) writes each chunk of tokens'
 * codes into a buffer of the calling thread's own, and ternary_gemm (ternary_gemm.c) multiplies them into `out`.
 *
 * Why one call: a short query runs every projection on a few tokens, where the arithmetic takes microseconds and
 * each Python-side step (allocating the codes buffer and the steps, two foreign calls, their argument conversion)
 * costs about as much again. The buffer is kept per thread (so that threads encoding at once never share one) and
 * grows to the largest chunk seen: at most chunk_rows x k_padded bytes plus the steps. */
#include <stdint.h>
#include <stdlib.h>

void activation_codes_uint8(const void *x, int64_t rows, int64_t cols, int64_t row_stride, const float *norm_weight,
                            const float *rms_weight, float eps, float outer_eps, float min_scale, uint8_t *codes,
                            int64_t code_stride, float *steps, int in_bfloat16, int threads);
void ternary_gemm(const uint8_t *codes, int64_t rows, int64_t code_stride, int64_t k_padded, const void *packed,
                  const int32_t *column_sums, int64_t out_features, const float *steps, float scale,
                  const float *bias, void *out, int out_bfloat16, int threads);
int ternary_gemm_tile_rows(void);

static _Thread_local uint8_t *scratch;
static _Thread_local size_t scratch_bytes;

/* rms_weight / outer_eps: a folded model norm in front (activation_codes.c), or NULL. Returns 0, or -1 when the
 * buffer could not be allocated (nothing written). */
int ternary_linear(const void *x, int64_t rows, int64_t cols, int64_t row_stride, int in_bfloat16,
                   const float *norm_weight, const float *rms_weight, float eps, float outer_eps, float min_scale,
                   const void *packed, const int32_t *column_sums, int64_t k_padded, int64_t out_features,
                   float scale, const float *bias, void *out, int out_bfloat16, int64_t chunk_rows, int threads) {
    const int64_t tile_rows = ternary_gemm_tile_rows();
    if (tile_rows <= 0) return -1;
    if (chunk_rows > rows) chunk_rows = rows;
    if (chunk_rows < 1) chunk_rows = 1;
    const int64_t padded_rows = chunk_rows + (tile_rows - chunk_rows % tile_rows) % tile_rows;
    const size_t code_bytes = (size_t)(padded_rows * k_padded + 63) / 64 * 64; /* steps start on a cache line */
    const size_t needed = code_bytes + sizeof(float) * (size_t)padded_rows;
    if (needed > scratch_bytes) {
        uint8_t *grown = realloc(scratch, needed);
        if (!grown) return -1;
        scratch = grown;
        scratch_bytes = needed;
    }
    float *steps = (float *)(scratch + code_bytes);
    const size_t in_size = in_bfloat16 ? 2 : 4, out_size = out_bfloat16 ? 2 : 4;
    for (int64_t start = 0; start < rows; start += chunk_rows) {
        const int64_t here = rows - start < chunk_rows ? rows - start : chunk_rows;
        activation_codes_uint8((const char *)x + (size_t)(start * row_stride) * in_size, here, cols, row_stride,
                               norm_weight, rms_weight, eps, outer_eps, min_scale, scratch, k_padded, steps,
                               in_bfloat16, threads);
        ternary_gemm(scratch, here, k_padded, k_padded, packed, column_sums, out_features, steps, scale, bias,
                     (char *)out + (size_t)(start * out_features) * out_size, out_bfloat16, threads);
    }
    return 0;
}
