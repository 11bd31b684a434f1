/* An encoder's residual add and LayerNorm after each block (BERT's SelfOutput and Output:
 * LayerNorm(dense(x) + input)), in one pass per row (residual_norm.py).
 *
 * Why: in PyTorch they are two operators, each a pass over a [tokens, hidden] tensor and a fresh one (the add reads
 * two and writes one; the norm reads its input twice and writes once). Here each row is read once from memory, kept
 * in a float32 buffer, and written once (benchmarks/kernel_speed.py --norm-only).
 *
 * Same arithmetic as PyTorch's, element by element (only the order of the sums differs):
 *   s = x + residual, rounded to bfloat16 as PyTorch's add rounds it, for bf16 input;
 *   mean and variance of s in float32, rstd = 1 / sqrt(variance + eps);
 *   y = (s * rstd + (-rstd * mean)) * weight + bias, rounded to the input's dtype once. */
#include <stdint.h>
#include <math.h>

#include "bfloat16.h"

/* out (rows x cols, contiguous, the input's dtype) = LayerNorm(x + residual) of each row, x and residual rows of
 * x_stride and residual_stride elements (float32 or bfloat16 both), float32 weight and bias of cols values; cols at
 * most RESIDUAL_LAYER_NORM_MAX_COLS (a row's buffer lives on the stack). */
#define RESIDUAL_LAYER_NORM_MAX_COLS 8192
int residual_layer_norm_max_cols(void) { return RESIDUAL_LAYER_NORM_MAX_COLS; }

void residual_layer_norm(const void *x, const void *residual, int64_t rows, int64_t cols, int64_t x_stride,
                         int64_t residual_stride, const float *weight, const float *bias, float eps, int in_bfloat16,
                         void *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * cols >= (1 << 16))
    for (int64_t row = 0; row < rows; ++row) {
        float values[RESIDUAL_LAYER_NORM_MAX_COLS];
        if (in_bfloat16) {
            const uint16_t *in = (const uint16_t *)x + row * x_stride;
            const uint16_t *skip = (const uint16_t *)residual + row * residual_stride;
#pragma omp simd
            for (int64_t col = 0; col < cols; ++col)
                values[col] = from_bfloat16(to_bfloat16(from_bfloat16(in[col]) + from_bfloat16(skip[col])));
        } else {
            const float *in = (const float *)x + row * x_stride;
            const float *skip = (const float *)residual + row * residual_stride;
#pragma omp simd
            for (int64_t col = 0; col < cols; ++col) values[col] = in[col] + skip[col];
        }
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t col = 0; col < cols; ++col) sum += values[col];
        const float mean = sum / (float)cols;
        float squared_deviations = 0.0f;
#pragma omp simd reduction(+ : squared_deviations)
        for (int64_t col = 0; col < cols; ++col) squared_deviations += (values[col] - mean) * (values[col] - mean);
        const float rstd = 1.0f / sqrtf(squared_deviations / (float)cols + eps), shift = -rstd * mean;
        if (in_bfloat16) {
            uint16_t *target = (uint16_t *)out + row * cols;
#pragma omp simd
            for (int64_t col = 0; col < cols; ++col)
                target[col] = to_bfloat16((values[col] * rstd + shift) * weight[col] + bias[col]);
        } else {
            float *target = (float *)out + row * cols;
#pragma omp simd
            for (int64_t col = 0; col < cols; ++col) target[col] = (values[col] * rstd + shift) * weight[col] + bias[col];
        }
    }
}
