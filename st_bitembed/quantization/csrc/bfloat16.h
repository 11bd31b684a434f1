/* bfloat16 <-> float32 for the kernels that read or write a bf16 model's activations, as PyTorch converts them. */
#ifndef ST_BITEMBED_BFLOAT16_H
#define ST_BITEMBED_BFLOAT16_H
#include <stdint.h>
#include <string.h>

static inline float from_bfloat16(uint16_t bits) {
    const uint32_t wide = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &wide, 4);
    return value;
}

/* float32 -> bfloat16 rounding half to even, as PyTorch's conversion (a NaN stays a NaN). */
static inline uint16_t to_bfloat16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, 4);
    if (value != value) return 0xffff;
    return (uint16_t)((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

/* Element `index` of a float32 or bfloat16 array (in_bfloat16), as float32 (exact). */
static inline float load_value(const void *base, int64_t index, int in_bfloat16) {
    return in_bfloat16 ? from_bfloat16(((const uint16_t *)base)[index]) : ((const float *)base)[index];
}

#if defined(__AVX512F__)
#include <immintrin.h>

/* 16 bfloat16 values widened to float32 (exact). */
static inline __m512 from_bfloat16_512(const uint16_t *in) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)in)), 16));
}

/* Elements index .. index + 15 of a float32 or bfloat16 array (in_bfloat16), as float32 (exact). */
static inline __m512 load_16(const void *base, int64_t index, int in_bfloat16) {
    return in_bfloat16 ? from_bfloat16_512((const uint16_t *)base + index) : _mm512_loadu_ps((const float *)base + index);
}

/* 16 floats rounded to bfloat16 and widened back (as from_bfloat16(to_bfloat16(x))): what PyTorch holds. */
static inline __m512 bfloat16_rounded_512(__m512 value) {
    const __m512i bits = _mm512_castps_si512(value);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(bits, lsb), _mm512_set1_epi32(0x7fff));
    const __m512 kept = _mm512_castsi512_ps(_mm512_and_si512(rounded, _mm512_set1_epi32((int)0xffff0000u)));
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(value, value, _CMP_ORD_Q), value, kept); /* a NaN stays */
}

/* 16 floats stored as bfloat16, rounded half to even as PyTorch converts them: one instruction with AVX512-BF16,
 * which takes a denormal float (|x| < 1.2e-38) as 0; the kernels' outputs are 0 or normal floats unless their inputs
 * are that small themselves. */
static inline void store_bfloat16_512(uint16_t *out, __m512 value) {
#if defined(__AVX512BF16__)
    _mm256_storeu_si256((__m256i *)out, (__m256i)_mm512_cvtneps_pbh(value));
#else
    const __m512i bits = _mm512_castps_si512(bfloat16_rounded_512(value));
    _mm256_storeu_si256((__m256i *)out, _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
#endif
}
#endif

#endif
