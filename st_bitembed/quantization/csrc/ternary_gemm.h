/* The products ternary_gemm.c computes, as ternary_linear.c hands them over (one per weight). */
#ifndef ST_BITEMBED_TERNARY_GEMM_H
#define ST_BITEMBED_TERNARY_GEMM_H
#include <stdint.h>

/* out = activation((codes x weights - zero point) * steps * scale + bias), in ternary_gemm.c's layouts (activation:
 * an enum activation of activations.h, ACTIVATION_NONE for none). */
struct ternary_gemm_job {
    const uint8_t *codes;
    int64_t code_stride;
    int64_t k_padded;
    const void *packed;
    const int32_t *column_sums;
    int64_t out_features;
    const float *steps;
    float scale;
    const float *bias;
    void *out;
    int activation;
};

/* Jobs per ternary_gemm_jobs call, the projections of one input per ternary_linear call: native.py's MAX_PROJECTIONS */
#define TERNARY_GEMM_MAX_JOBS 8

int ternary_gemm_jobs(const struct ternary_gemm_job *jobs, int64_t count, int64_t rows, int out_bfloat16,
                      int threads, int gated);
int ternary_gemm_tile_rows(void);

/* ternary_gemm_amx.c: AMX tiles on the 2-bit panels (only where ternary_gemm_amx_available()). */
int ternary_gemm_amx_available(void);
void amx_begin(void);
void amx_end(void);

#if defined(__AMX_TILE__)
#include <immintrin.h>
/* GCC's _tile_loadd (12 at least) is an asm that does not say it reads memory: the compiler may then drop the
 * vector stores of the unpacked weights, which nothing else reads, or move them past the tile load (it did, for
 * amx_few_rows_pair_sums). A compiler barrier on each side keeps them in order; clang's builtin needs none. (Its
 * _tile_stored likewise: attention.c reads what it stores only after a barrier.) */
#define load_tile(tile, base, stride)      \
    do {                                   \
        __asm__ volatile("" ::: "memory"); \
        _tile_loadd(tile, base, stride);   \
        __asm__ volatile("" ::: "memory"); \
    } while (0)
#endif
const int8_t *amx_unpack_panels(const uint8_t *panels, int64_t count, int64_t k_padded);
void amx_row_pair_sums(const uint8_t *codes, int64_t code_stride, const int8_t *weights, int64_t tiles,
                       int64_t k_padded, int32_t *sums, int64_t sums_stride);
void amx_few_rows_sums(const uint8_t *codes, int64_t code_stride, const uint8_t *panels, int64_t count,
                       int64_t k_padded, int32_t *sums, int64_t sums_stride);
void amx_few_rows_pair_sums(const uint8_t *codes, int64_t code_stride, const uint8_t *panel, int64_t k_padded,
                            int32_t *sums, int64_t sums_stride);

#endif
