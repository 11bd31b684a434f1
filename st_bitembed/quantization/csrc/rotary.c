/* A decoder's rotary position embedding of its query or key heads, after the heads' own RMSNorm where the model has
 * one (Qwen3's and Gemma3's q_norm and k_norm), in one pass per head (native_decoder_attention.py).
 *
 * Why: transformers rotates q and k in about seven PyTorch operators each (two slices, a negation, a concatenation,
 * two products and a sum), each a pass over the heads and a fresh tensor, after the norms' own calls: for one short
 * query of Qwen3-0.6B these small operators and the Python between them took about as long as the layer's q, k and v
 * projections. Here each head is read once and written once.
 *
 * Same arithmetic as transformers, element by element (only the order of the norm's sum of squares differs):
 *   the norm, as rms_norm.c: r = 1 / sqrt(sum(x^2) / head_dim + eps) in float32; Llama, Qwen (round_before_scale):
 *   n = round(scale * round(x * r)); Gemma: n = round(x * r * scale); without a norm, n = x;
 *   rotate_half(n)[i] = -n[i + head_dim / 2] for i < head_dim / 2, else n[i - head_dim / 2];
 *   out = round(round(n * cos) + round(rotate_half(n) * sin)), as PyTorch's separate products and sum;
 * round(): to bfloat16 half to even for bf16 activations (cos and sin are bf16 then too); nothing for float32. */
#include <math.h>
#include <stdint.h>

#include "bfloat16.h"

#define ROTARY_MAX_HEAD_DIM 512

int rotary_max_head_dim(void) { return ROTARY_MAX_HEAD_DIM; }

/* value as a tensor of the activations' dtype holds it */
static inline float kept(float value, int in_bfloat16) {
    return in_bfloat16 ? from_bfloat16(to_bfloat16(value)) : value;
}

#if defined(__AVX512F__)
#include <immintrin.h>

static inline __m512 kept_16(__m512 value, int in_bfloat16) {
    return in_bfloat16 ? bfloat16_rounded_512(value) : value;
}

static inline void store_16(void *base, int64_t index, __m512 value, int in_bfloat16) {
    if (in_bfloat16)
        store_bfloat16_512((uint16_t *)base + index, value);
    else
        _mm512_storeu_ps((float *)base + index, value);
}

#endif

/* One head's n (head_dim features, float32) as the header says: normalised in place with norm_scale (if not NULL). */
static void normalise(float *n, int64_t head_dim, const float *norm_scale, float eps, int round_before_scale,
                      int in_bfloat16) {
    float sum_of_squares = 0.0f;
#pragma omp simd reduction(+ : sum_of_squares)
    for (int64_t d = 0; d < head_dim; ++d) sum_of_squares += n[d] * n[d];
    const float inverse_rms = 1.0f / sqrtf(sum_of_squares / (float)head_dim + eps);
    for (int64_t d = 0; d < head_dim; ++d)
        n[d] = round_before_scale ? kept(norm_scale[d] * kept(n[d] * inverse_rms, in_bfloat16), in_bfloat16)
                                  : kept(n[d] * inverse_rms * norm_scale[d], in_bfloat16);
}

#if defined(__AVX512F__)
/* normalise, 16 features at a time (head_dim a multiple of 16). */
static void normalise_16(float *n, int64_t head_dim, const float *norm_scale, float eps, int round_before_scale,
                         int in_bfloat16) {
    __m512 squares = _mm512_setzero_ps();
    for (int64_t d = 0; d < head_dim; d += 16) {
        const __m512 value = _mm512_loadu_ps(n + d);
        squares = _mm512_add_ps(squares, _mm512_mul_ps(value, value));
    }
    const __m512 inverse_rms = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(squares) / (float)head_dim + eps));
    for (int64_t d = 0; d < head_dim; d += 16) {
        const __m512 normalised = _mm512_mul_ps(_mm512_loadu_ps(n + d), inverse_rms), scale = _mm512_loadu_ps(norm_scale + d);
        _mm512_storeu_ps(n + d, round_before_scale
                                    ? kept_16(_mm512_mul_ps(scale, kept_16(normalised, in_bfloat16)), in_bfloat16)
                                    : kept_16(_mm512_mul_ps(normalised, scale), in_bfloat16));
    }
}

/* The rotation of one head (n, float32) into out, 16 features of each half at a time (half a multiple of 16). */
static void rotate_16(const float *n, int64_t head_dim, const void *cos, const void *sin, int64_t table,
                      int in_bfloat16, void *out, int64_t out_base) {
    const int64_t half = head_dim / 2;
    const __m512 sign = _mm512_set1_ps(-0.0f);
    for (int64_t d = 0; d < half; d += 16) {
        const __m512 first = _mm512_loadu_ps(n + d), second = _mm512_loadu_ps(n + half + d);
        const __m512 low = _mm512_add_ps(
            kept_16(_mm512_mul_ps(first, load_16(cos, table + d, in_bfloat16)), in_bfloat16),
            kept_16(_mm512_mul_ps(_mm512_xor_ps(second, sign), load_16(sin, table + d, in_bfloat16)), in_bfloat16));
        const __m512 high = _mm512_add_ps(
            kept_16(_mm512_mul_ps(second, load_16(cos, table + half + d, in_bfloat16)), in_bfloat16),
            kept_16(_mm512_mul_ps(first, load_16(sin, table + half + d, in_bfloat16)), in_bfloat16));
        store_16(out, out_base + d, low, in_bfloat16);
        store_16(out, out_base + half + d, high, in_bfloat16);
    }
}
#endif

/* The rotation of one head (n, float32) into out, feature by feature. */
static void rotate(const float *n, int64_t head_dim, const void *cos, const void *sin, int64_t table, int in_bfloat16,
                   void *out, int64_t out_base) {
    const int64_t half = head_dim / 2;
    for (int64_t d = 0; d < head_dim; ++d) {
        const float rotated = d < half ? -n[d + half] : n[d - half];
        const float first = kept(n[d] * load_value(cos, table + d, in_bfloat16), in_bfloat16);
        const float second = kept(rotated * load_value(sin, table + d, in_bfloat16), in_bfloat16);
        if (in_bfloat16)
            ((uint16_t *)out)[out_base + d] = to_bfloat16(first + second);
        else
            ((float *)out)[out_base + d] = first + second;
    }
}

/* out ([batch][positions][heads][head_dim], contiguous, the activations' dtype) = the rotated (and normalised, with
 * norm_scale) heads of x, addressed by strides in elements of (sequence, position, head), features contiguous; cos
 * and sin addressed by strides of (sequence, position), features contiguous, 0 for a broadcast sequence; norm_scale:
 * NULL (no norm) or head_dim float32 factors (the norm's weight, plus 1 for Gemma). Returns 0, or -1 for a head_dim
 * the kernel does not take (odd, or above ROTARY_MAX_HEAD_DIM). */
int rotary_heads(const void *x, int64_t batch, int64_t positions, int64_t heads, int64_t head_dim,
                 const int64_t *x_strides, const float *norm_scale, float eps, int round_before_scale, const void *cos,
                 const void *sin, const int64_t *table_strides, int in_bfloat16, void *out, int threads) {
    if (head_dim < 2 || head_dim % 2 != 0 || head_dim > ROTARY_MAX_HEAD_DIM) return -1;
    const int64_t rows = batch * positions * heads;
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * head_dim >= (1 << 17))
    for (int64_t row = 0; row < rows; ++row) {
        const int64_t b = row / (positions * heads), p = row / heads % positions, h = row % heads;
        const int64_t base = b * x_strides[0] + p * x_strides[1] + h * x_strides[2];
        const int64_t table = b * table_strides[0] + p * table_strides[1];
        float n[ROTARY_MAX_HEAD_DIM];
#if defined(__AVX512F__)
        if (head_dim % 32 == 0) {
            for (int64_t d = 0; d < head_dim; d += 16) _mm512_storeu_ps(n + d, load_16(x, base + d, in_bfloat16));
            if (norm_scale != NULL) normalise_16(n, head_dim, norm_scale, eps, round_before_scale, in_bfloat16);
            rotate_16(n, head_dim, cos, sin, table, in_bfloat16, out, row * head_dim);
            continue;
        }
#endif
        for (int64_t d = 0; d < head_dim; ++d) n[d] = load_value(x, base + d, in_bfloat16);
        if (norm_scale != NULL) normalise(n, head_dim, norm_scale, eps, round_before_scale, in_bfloat16);
        rotate(n, head_dim, cos, sin, table, in_bfloat16, out, row * head_dim);
    }
    return 0;
}
