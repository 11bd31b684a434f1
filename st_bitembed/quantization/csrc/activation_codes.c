/* One pass per token for BitLinear inference: the per-token int8 codes of RMSNorm(x) * g (the norm folded into the
 * step, see kernels.py) or of x, written as floats (activation_codes: the PyTorch GEMM backends take float codes) or
 * as uint8 codes + 128 (activation_codes_uint8: the input of ternary_gemm.c).
 *
 * activation_codes_uint8 also folds the model's own RMSNorm in front (norm_folding.py): for x the raw residual
 * stream, w the model norm's effective weight (rms_weight) and e its epsilon (outer_eps), RMSNorm_g(RMSNorm_w(x)) =
 * u * g / sqrt(mean(u^2) + eps * (mean(x^2) + e)) with u = x * w, exactly: norm_weight then holds w * g, and the
 * sum of squares is taken of x * w, beside that of x.
 *
 * Same arithmetic, element by element, as st_bitembed.quantization.kernels.activation_codes in PyTorch:
 *   step = max(absmax(x * g) * rsqrt(mean(x^2) + eps), min_scale) / 127,  code = round((x * g) * (rsqrt(...) / step))
 *   without a norm: step = max(absmax(x), min_scale) / 127,               code = round(x / step)
 * rounding half to even (nearbyintf in the default rounding mode, as torch.round). Only the order of the
 * sum of squares differs, so a code can differ by one at a rounding tie. A token with a NaN or an infinity gets a
 * NaN step, as in PyTorch, so that the damage reaches the output instead of vanishing in the codes (its uint8 codes
 * are the zero code: a NaN has no integer value).
 * Maxima are written as comparisons: fmaxf is not vectorized (a call per element). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "activations.h"
#include "bfloat16.h"

/* The sums token_step reads from a row: absmax |x * weight| (|x| without a weight); with a weight, the sum of squares
 * of x * rms_weight (of x without one) and, with rms_weight, that of x in raw; without a weight, the sum of x * 0 in
 * squares, NaN exactly where x holds a NaN or an infinity. */
#if defined(__AVX512F__)
/* Four accumulators of 16 lanes per sum: one register would wait on its previous add (4 cycles) for every 16 values.
 * Lanes past the row are loaded as zeros, which change no sum and no maximum; a NaN product leaves the maximum as it
 * is (vmaxps returns its second operand when either is a NaN), as the comparison in the portable loop does.
 * TOKEN_SUMS_STEP: values col .. col + 15 (those `valid`) into accumulators i. */
#define TOKEN_SUMS_STEP(i, col, valid)                                                                 \
    do {                                                                                               \
        const __m512 x = _mm512_maskz_loadu_ps((valid), in + (col));                                   \
        const __m512 weighted = weight ? _mm512_mul_ps(x, _mm512_maskz_loadu_ps((valid), weight + (col))) \
                                       : x;                                                            \
        maximum##i = _mm512_max_ps(_mm512_abs_ps(weighted), maximum##i);                                \
        if (!weight) {                                                                                 \
            sum##i = _mm512_add_ps(sum##i, _mm512_mul_ps(x, _mm512_setzero_ps()));                     \
        } else if (rms_weight) {                                                                       \
            const __m512 scaled = _mm512_mul_ps(x, _mm512_maskz_loadu_ps((valid), rms_weight + (col))); \
            sum##i = _mm512_add_ps(sum##i, _mm512_mul_ps(scaled, scaled));                             \
            raw##i = _mm512_add_ps(raw##i, _mm512_mul_ps(x, x));                                       \
        } else {                                                                                       \
            sum##i = _mm512_add_ps(sum##i, _mm512_mul_ps(x, x));                                       \
        }                                                                                              \
    } while (0)

static inline void token_sums(const float *in, int64_t cols, const float *weight, const float *rms_weight,
                              float *absmax, float *squares, float *raw_squares) {
    __m512 maximum0 = _mm512_setzero_ps(), maximum1 = maximum0, maximum2 = maximum0, maximum3 = maximum0;
    __m512 sum0 = maximum0, sum1 = maximum0, sum2 = maximum0, sum3 = maximum0;
    __m512 raw0 = maximum0, raw1 = maximum0, raw2 = maximum0, raw3 = maximum0;
    const __mmask16 all = 0xffff;
    int64_t col = 0;
    for (; col + 64 <= cols; col += 64) {
        TOKEN_SUMS_STEP(0, col, all);
        TOKEN_SUMS_STEP(1, col + 16, all);
        TOKEN_SUMS_STEP(2, col + 32, all);
        TOKEN_SUMS_STEP(3, col + 48, all);
    }
    for (; col < cols; col += 16) {
        const __mmask16 valid = cols - col >= 16 ? all : (__mmask16)((1u << (cols - col)) - 1);
        TOKEN_SUMS_STEP(0, col, valid);
    }
    const __m512 maximum = _mm512_max_ps(_mm512_max_ps(maximum0, maximum1), _mm512_max_ps(maximum2, maximum3));
    *absmax = _mm512_reduce_max_ps(maximum);
    *squares = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(sum0, sum1), _mm512_add_ps(sum2, sum3)));
    *raw_squares = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(raw0, raw1), _mm512_add_ps(raw2, raw3)));
}
#undef TOKEN_SUMS_STEP
#else
static inline void token_sums(const float *in, int64_t cols, const float *weight, const float *rms_weight,
                              float *absmax, float *squares, float *raw_squares) {
    float maximum = 0.0f, sum = 0.0f, raw = 0.0f;
    if (!weight) {
#pragma omp simd reduction(max : maximum) reduction(+ : sum)
        for (int64_t col = 0; col < cols; ++col) {
            const float magnitude = fabsf(in[col]);
            maximum = magnitude > maximum ? magnitude : maximum;
            sum += in[col] * 0.0f;
        }
    } else if (rms_weight) {
#pragma omp simd reduction(max : maximum) reduction(+ : sum, raw)
        for (int64_t col = 0; col < cols; ++col) {
            const float weighted = fabsf(in[col] * weight[col]);
            const float scaled = in[col] * rms_weight[col];
            maximum = weighted > maximum ? weighted : maximum;
            sum += scaled * scaled;
            raw += in[col] * in[col];
        }
    } else {
#pragma omp simd reduction(max : maximum) reduction(+ : sum)
        for (int64_t col = 0; col < cols; ++col) {
            const float weighted = fabsf(in[col] * weight[col]);
            maximum = weighted > maximum ? weighted : maximum;
            sum += in[col] * in[col];
        }
    }
    *absmax = maximum, *squares = sum, *raw_squares = raw;
}
#endif

/* The token's step; with a norm also the factor that turns x * g into codes (without one, the codes are x / step).
 * With rms_weight (a folded model norm, see above), the mean square is that of x * rms_weight, plus eps times the
 * model norm's own mean square of x (its epsilon outer_eps included). */
static inline float token_step(const float *in, int64_t cols, const float *norm_weight, const float *rms_weight,
                               float eps, float outer_eps, float min_scale, float *multiplier) {
    float absmax, sum_of_squares, raw_squares;
    token_sums(in, cols, norm_weight, norm_weight ? rms_weight : NULL, &absmax, &sum_of_squares, &raw_squares);
    if (!norm_weight) /* sum_of_squares holds the sum of x * 0 */
        return sum_of_squares == 0.0f ? (absmax > min_scale ? absmax : min_scale) / 127.0f : NAN;
    float mean_square = sum_of_squares / (float)cols + eps;
    if (rms_weight) {
        mean_square = sum_of_squares / (float)cols + eps * (raw_squares / (float)cols + outer_eps);
        sum_of_squares += raw_squares; /* only its finiteness is read below */
    }
    const float inverse_rms = 1.0f / sqrtf(mean_square);
    const float normalised_absmax = absmax * inverse_rms;
    const float step = isfinite(sum_of_squares)
                           ? (normalised_absmax > min_scale ? normalised_absmax : min_scale) / 127.0f
                           : NAN;
    *multiplier = inverse_rms / step;
    return step;
}

void activation_codes(const float *x, int64_t rows, int64_t cols, int64_t row_stride, const float *norm_weight,
                      float eps, float min_scale, float offset, float *codes, float *steps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * cols >= 65536)
    for (int64_t row = 0; row < rows; ++row) {
        const float *in = x + row * row_stride;
        float *out = codes + row * cols;
        float multiplier;
        const float step = token_step(in, cols, norm_weight, NULL, eps, 0.0f, min_scale, &multiplier);
        if (norm_weight) {
#pragma omp simd
            for (int64_t col = 0; col < cols; ++col)
                out[col] = nearbyintf(in[col] * norm_weight[col] * multiplier + offset);
        } else {
#pragma omp simd
            for (int64_t col = 0; col < cols; ++col) out[col] = nearbyintf(in[col] / step + offset);
        }
        steps[row] = step;
    }
}

/* bfloat16 -> float32 is exact: the 16 bits are the float's top half. */
static inline const float *widen_bfloat16(const uint16_t *in, int64_t cols, float *out) {
#pragma omp simd
    for (int64_t col = 0; col < cols; ++col) out[col] = from_bfloat16(in[col]);
    return out;
}

/* The row activation(x) * factor, as PyTorch computes act_fn(x) * factor for two such tensors: in float32, the
 * activation and then the product each rounded to bfloat16 for bf16 ones. The activation's own float32 rounding can
 * differ from PyTorch's by an ulp or two, which moves a bf16 value only where it lies on a rounding boundary. */
static inline const float *product_row(const void *x, const void *factor, int activation, int64_t offset,
                                       int64_t cols, int in_bfloat16, float *out) {
/* ACTIVATE: the activation of a float32 value; ROUNDED: the value as PyTorch holds the activated bf16 tensor. */
#define PRODUCT_LOOP(ACTIVATE, ROUNDED)                                                                    \
    if (in_bfloat16) {                                                                                     \
        const uint16_t *a = (const uint16_t *)x + offset, *b = (const uint16_t *)factor + offset;         \
        _Pragma("omp simd") for (int64_t col = 0; col < cols; ++col) {                                     \
            const float activated = ROUNDED(ACTIVATE(from_bfloat16(a[col])));                              \
            out[col] = from_bfloat16(to_bfloat16(activated * from_bfloat16(b[col])));                      \
        }                                                                                                  \
    } else {                                                                                               \
        const float *a = (const float *)x + offset, *b = (const float *)factor + offset;                   \
        _Pragma("omp simd") for (int64_t col = 0; col < cols; ++col) out[col] = ACTIVATE(a[col]) * b[col]; \
    }
#define AS_IS(value) (value)
#define TO_BFLOAT16(value) from_bfloat16(to_bfloat16(value))
#if defined(__AVX512F__)
    /* 16 lanes at a time: faster than the compiler's vectorization of the loops below (kernel_speed.py
     * --activation-only), with the same results (activations.h) */
    if (activation != ACTIVATION_NONE && in_bfloat16) {
        const uint16_t *a = (const uint16_t *)x + offset, *b = (const uint16_t *)factor + offset;
        int64_t col = 0;
        for (; col + 16 <= cols; col += 16) {
            const __m512 gate = from_bfloat16_512(a + col);
            const __m512 activated = activate_512(activation, gate);
            const __m512 product = _mm512_mul_ps(bfloat16_rounded_512(activated), from_bfloat16_512(b + col));
            _mm512_storeu_ps(out + col, bfloat16_rounded_512(product));
        }
        for (; col < cols; ++col) {
            const float gate = from_bfloat16(a[col]);
            const float activated = TO_BFLOAT16(activate(activation, gate));
            out[col] = TO_BFLOAT16(activated * from_bfloat16(b[col]));
        }
        return out;
    }
#endif
    if (activation == ACTIVATION_GELU_TANH) {
        PRODUCT_LOOP(gelu_tanh, TO_BFLOAT16)
    } else if (activation == ACTIVATION_GELU) {
        PRODUCT_LOOP(gelu_erf, TO_BFLOAT16)
    } else if (activation == ACTIVATION_SILU) {
        PRODUCT_LOOP(silu, TO_BFLOAT16)
    } else {
        PRODUCT_LOOP(AS_IS, AS_IS) /* a bf16 value widened is already what PyTorch holds */
    }
#undef TO_BFLOAT16
#undef AS_IS
#undef PRODUCT_LOOP
    return out;
}

/* x is float32, or bfloat16 (in_bfloat16: a bf16 model's activations), each row widened to float32 in a buffer of
 * the thread's own that stays in L1, so that no float32 copy of the whole input is ever made. rms_weight (with
 * outer_eps) folds the model's norm in front, as above; NULL for none. factor (NULL: none; else of x's dtype and row
 * stride) makes the input activation(x) * factor (enum activation), computed row by row into that buffer: a gated
 * MLP's gate, activated here, times its up projection (mlp_fusion.py); neither the activated gate nor the product
 * is ever materialised. Returns 0, or -1 when a thread's buffer could not be allocated (codes and steps then
 * undefined). */
int activation_codes_uint8(const void *x, const void *factor, int activation, int64_t rows, int64_t cols,
                           int64_t row_stride, const float *norm_weight, const float *rms_weight, float eps,
                           float outer_eps, float min_scale, uint8_t *codes, int64_t code_stride, float *steps,
                           int in_bfloat16, int threads) {
    const int buffered = in_bfloat16 || factor != NULL;
    int failed = 0;
#pragma omp parallel num_threads(threads) if (rows * cols >= 65536)
    {
        float *widened = buffered ? malloc(sizeof(float) * (size_t)cols) : NULL;
        if (buffered && !widened) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t row = 0; row < rows; ++row) {
            if (buffered && !widened) continue; /* every thread still takes part in the loop */
            const float *in = factor
                                  ? product_row(x, factor, activation, row * row_stride, cols, in_bfloat16, widened)
                              : in_bfloat16 ? widen_bfloat16((const uint16_t *)x + row * row_stride, cols, widened)
                                            : (const float *)x + row * row_stride;
            uint8_t *out = codes + row * code_stride;
            float multiplier;
            const float step = token_step(in, cols, norm_weight, rms_weight, eps, outer_eps, min_scale, &multiplier);
            steps[row] = step;
            if (!isfinite(step)) {
                memset(out, 128, (size_t)cols);
            } else if (norm_weight) {
#pragma omp simd
                for (int64_t col = 0; col < cols; ++col)
                    out[col] = (uint8_t)(int32_t)(nearbyintf(in[col] * norm_weight[col] * multiplier) + 128.0f);
            } else {
#pragma omp simd
                for (int64_t col = 0; col < cols; ++col)
                    out[col] = (uint8_t)(int32_t)(nearbyintf(in[col] / step) + 128.0f);
            }
        }
        free(widened);
    }
    return failed ? -1 : 0;
}
