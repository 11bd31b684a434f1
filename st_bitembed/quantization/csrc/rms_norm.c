/* A model's own RMSNorms whose output no BitLinear reads (Qwen3's q_norm and k_norm over each head, the final norm,
 * Gemma3's norms of the attention's and the MLP's outputs), in one pass per row (native_norm.py).
 *
 * Why: in PyTorch such a norm of a bf16 model is six operators (a float32 copy, its squares, their mean, the rescale,
 * a copy back to bf16, the weight), each a pass over the activations and a fresh tensor: for a batch of Qwen3-0.6B
 * the q and k norms alone moved about 20 times the bytes of their input. Here each row is read twice from cache
 * (its sum of squares, then its output) and written once.
 *
 * Same arithmetic as transformers' norms, element by element (only the order of the sum of squares differs):
 *   r = 1 / sqrt(sum(x^2) / cols + eps), in float32;
 *   round_before_scale (Llama, Qwen: weight * (x * r).to(dtype)): y = scale * round(x * r), rounded again;
 *   otherwise (Gemma: ((x * r) * (1 + weight)).to(dtype)): y = round(x * r * scale);
 * round(): to bfloat16 as PyTorch converts float32 (half to even), for bf16 input; nothing for float32. */
#include <math.h>
#include <stdint.h>

#include "bfloat16.h"

/* out (rows x cols, contiguous, the input's dtype) = the norm of each row of x (rows of row_stride elements, float32
 * or bfloat16) with per-column float32 scale (the norm's weight, plus 1 for Gemma). */
void rms_norm(const void *x, int64_t rows, int64_t cols, int64_t row_stride, const float *scale, float eps,
              int round_before_scale, int in_bfloat16, void *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * cols >= (1 << 16))
    for (int64_t row = 0; row < rows; ++row) {
        float sum_of_squares = 0.0f;
        if (in_bfloat16) {
            const uint16_t *in = (const uint16_t *)x + row * row_stride;
#pragma omp simd reduction(+ : sum_of_squares)
            for (int64_t col = 0; col < cols; ++col) sum_of_squares += from_bfloat16(in[col]) * from_bfloat16(in[col]);
        } else {
            const float *in = (const float *)x + row * row_stride;
#pragma omp simd reduction(+ : sum_of_squares)
            for (int64_t col = 0; col < cols; ++col) sum_of_squares += in[col] * in[col];
        }
        const float inverse_rms = 1.0f / sqrtf(sum_of_squares / (float)cols + eps);
        if (in_bfloat16) {
            const uint16_t *in = (const uint16_t *)x + row * row_stride;
            uint16_t *target = (uint16_t *)out + row * cols;
#pragma omp simd
            for (int64_t col = 0; col < cols; ++col) {
                const float normalised = from_bfloat16(in[col]) * inverse_rms;
                const float kept = round_before_scale ? from_bfloat16(to_bfloat16(normalised)) : normalised;
                target[col] = to_bfloat16(kept * scale[col]);
            }
        } else {
            const float *in = (const float *)x + row * row_stride;
            float *target = (float *)out + row * cols;
#pragma omp simd
            for (int64_t col = 0; col < cols; ++col) {
                target[col] = in[col] * inverse_rms * scale[col];
            }
        }
    }
}
