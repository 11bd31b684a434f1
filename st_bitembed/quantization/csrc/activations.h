/* The activation functions the kernels apply where PyTorch would make a pass of its own over a tensor: a gated MLP's
 * gate in its own projection's output or in the down projection's quantizer (ternary_gemm.c, activation_codes.c), an
 * encoder MLP's activation in its first projection's output (ternary_gemm.c). Written in operations the compiler
 * vectorizes (a libm call per element would cost more than the pass it saves); each within an ulp or two of float32
 * of PyTorch's function (native.py: TORCH_ACTIVATIONS). */
#ifndef ST_BITEMBED_ACTIVATIONS_H
#define ST_BITEMBED_ACTIVATIONS_H
#include <math.h>
#include <stdint.h>
#include <string.h>

/* native.py's ACTIVATIONS */
enum activation { ACTIVATION_NONE = 0, ACTIVATION_GELU_TANH = 1, ACTIVATION_GELU = 2, ACTIVATION_SILU = 3 };

/* exp(x): Cephes' expf, 2^n * p(r) with n = round(x / ln 2), r = x - n ln 2 in two parts and p of degree 7, within
 * about an ulp of expf; x clamped to [-87, 88], where 2^n stays a normal float (enough for the functions below). */
static inline float exp_vectorizable(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x); /* a NaN passes through both comparisons */
    const float n = nearbyintf(x * 1.44269504088896341f);
    /* fmaf: fused multiply-adds written out (the kernels' flags fuse nothing): one rounding and instruction each */
    const float r = fmaf(n, 2.12194440e-4f, fmaf(n, -0.693359375f, x));
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    p = fmaf(p, r * r, r + 1.0f);
    const int32_t power = n == n ? (int32_t)n : 0; /* a NaN has no integer value; p is NaN then anyway */
    uint32_t bits;
    memcpy(&bits, &p, 4);
    bits += (uint32_t)power << 23; /* p * 2^n: n added to the exponent (unsigned: wraps, never overflows) */
    memcpy(&p, &bits, 4);
    return p;
}

/* GELU's tanh approximation, 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) = x / (1 + exp(-2 sqrt(2 / pi) (x +
 * 0.044715 x^3))): the same function, which PyTorch computes through tanh. */
static inline float gelu_tanh(float x) {
    return x / (1.0f + exp_vectorizable(-1.5957691216057308f * (x + 0.044715f * x * x * x)));
}

/* SiLU, x sigmoid(x) = x / (1 + exp(-x)): PyTorch's formula. */
static inline float silu(float x) { return x / (1.0f + exp_vectorizable(-x)); }

/* GELU, 0.5 x (1 + erf(x / sqrt(2))), with erf as PyTorch's vectorized CPU kernel computes it (Abramowitz and Stegun
 * 7.1.26: 1 - t (a1 + t (a2 + ... a5 t)) exp(-z^2), t = 1 / (1 + p |z|), sign of z; within 1.5e-7 of erf). */
static inline float gelu_erf(float x) {
    const float z = x * 0.70710678118654752f, magnitude = fabsf(z);
    const float t = 1.0f / fmaf(0.3275911f, magnitude, 1.0f);
    float r = fmaf(1.061405429f, t, -1.453152027f);
    r = fmaf(r, t, 1.421413741f);
    r = fmaf(r, t, -0.284496736f);
    r = fmaf(r, t, 0.254829592f);
    const float erf_magnitude = fmaf(-exp_vectorizable(-z * z) * t, r, 1.0f); /* PyTorch's order of operations */
    const float erf = z < 0.0f ? -erf_magnitude : erf_magnitude;
    return x * 0.5f * (1.0f + erf);
}

/* The function of an activation (enum activation, not ACTIVATION_NONE), for code that applies it a value or 16 at a
 * time; loops the compiler vectorizes pick their function before the loop. */
static inline float activate(int activation, float x) {
    return activation == ACTIVATION_GELU ? gelu_erf(x) : activation == ACTIVATION_SILU ? silu(x) : gelu_tanh(x);
}

#if defined(__AVX512F__)
#include <immintrin.h>

/* The functions above on 16 lanes, operation for operation (the same results), for the GEMM's AVX-512 epilogue: the
 * compiler's own vectorization of them, a row of a panel at a time, cost more than PyTorch's whole pass. */
static inline __m512 exp_512(__m512 x) {
    /* max / min return their second operand where one is a NaN: a NaN passes, as in exp_vectorizable */
    x = _mm512_min_ps(_mm512_set1_ps(88.0f), _mm512_max_ps(_mm512_set1_ps(-87.0f), x));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f),
                                     _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693359375f), x));
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    /* a NaN's lane converts to INT_MIN, whose shifted bits are 0: p stays NaN */
    const __m512i power = _mm512_slli_epi32(_mm512_cvtps_epi32(n), 23);
    return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), power));
}

static inline __m512 gelu_tanh_512(__m512 x) {
    const __m512 cube = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), x), x), x);
    const __m512 inner = _mm512_mul_ps(_mm512_set1_ps(-1.5957691216057308f), _mm512_add_ps(x, cube));
    return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), exp_512(inner)));
}

static inline __m512 silu_512(__m512 x) {
    return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), exp_512(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

static inline __m512 gelu_erf_512(__m512 x) {
    const __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f));
    const __m512 magnitude = _mm512_abs_ps(z);
    const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f),
                                   _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), magnitude, _mm512_set1_ps(1.0f)));
    __m512 r = _mm512_fmadd_ps(_mm512_set1_ps(1.061405429f), t, _mm512_set1_ps(-1.453152027f));
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(1.421413741f));
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(-0.284496736f));
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(0.254829592f));
    const __m512 minus_square = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(z, z));
    const __m512 scaled = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(exp_512(minus_square), t));
    const __m512 erf_magnitude = _mm512_fmadd_ps(scaled, r, _mm512_set1_ps(1.0f));
    const __mmask16 negative = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 erf = _mm512_mask_sub_ps(erf_magnitude, negative, _mm512_setzero_ps(), erf_magnitude);
    return _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.5f)), _mm512_add_ps(_mm512_set1_ps(1.0f), erf));
}

/* activate on 16 lanes. */
static inline __m512 activate_512(int activation, __m512 x) {
    return activation == ACTIVATION_GELU ? gelu_erf_512(x) : activation == ACTIVATION_SILU ? silu_512(x)
                                                                                         : gelu_tanh_512(x);
}
#endif

#endif
