/* One pass per token for BitLinear inference: the per-token int8 codes of RMSNorm(x) * g (the norm folded into the
 * step, see kernels.py) or of x, written as floats (the GEMM backends take float codes).
 *
 * Same arithmetic, element by element, as st_bitembed.quantization.kernels.activation_codes in PyTorch:
 *   step = max(absmax(x * g) * rsqrt(mean(x^2) + eps), min_scale) / 127,  code = round((x * g) * (rsqrt(...) / step))
 *   without a norm: step = max(absmax(x), min_scale) / 127,               code = round(x / step)
 * rounding half to even (nearbyintf in the default rounding mode, as torch.round). Only the order of the
 * sum of squares differs, so a code can differ by one at a rounding tie. A token with a NaN or an infinity gets a
 * NaN step, as in PyTorch, so that the damage reaches the output instead of vanishing in the codes.
 * Maxima are written as comparisons: fmaxf is not vectorized (a call per element). */
#include <math.h>
#include <stdint.h>

void activation_codes(const float *x, int64_t rows, int64_t cols, int64_t row_stride, const float *norm_weight,
                      float eps, float min_scale, float offset, float *codes, float *steps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * cols >= 65536)
    for (int64_t row = 0; row < rows; ++row) {
        const float *in = x + row * row_stride;
        float *out = codes + row * cols;
        float absmax = 0.0f, sum_of_squares = 0.0f;
        if (norm_weight) {
#pragma omp simd reduction(max : absmax) reduction(+ : sum_of_squares)
            for (int64_t col = 0; col < cols; ++col) {
                const float weighted = fabsf(in[col] * norm_weight[col]);
                absmax = weighted > absmax ? weighted : absmax;
                sum_of_squares += in[col] * in[col];
            }
            const float inverse_rms = 1.0f / sqrtf(sum_of_squares / (float)cols + eps);
            const float normalised_absmax = absmax * inverse_rms;
            const float step = isfinite(sum_of_squares)
                                   ? (normalised_absmax > min_scale ? normalised_absmax : min_scale) / 127.0f
                                   : NAN;
            const float multiplier = inverse_rms / step;
#pragma omp simd
            for (int64_t col = 0; col < cols; ++col)
                out[col] = nearbyintf(in[col] * norm_weight[col] * multiplier + offset);
            steps[row] = step;
        } else {
            float non_finite = 0.0f;  /* x * 0 is NaN exactly for a NaN or an infinity */
#pragma omp simd reduction(max : absmax) reduction(+ : non_finite)
            for (int64_t col = 0; col < cols; ++col) {
                const float magnitude = fabsf(in[col]);
                absmax = magnitude > absmax ? magnitude : absmax;
                non_finite += in[col] * 0.0f;
            }
            const float step = non_finite == 0.0f ? (absmax > min_scale ? absmax : min_scale) / 127.0f : NAN;
#pragma omp simd
            for (int64_t col = 0; col < cols; ++col) out[col] = nearbyintf(in[col] / step + offset);
            steps[row] = step;
        }
    }
}
