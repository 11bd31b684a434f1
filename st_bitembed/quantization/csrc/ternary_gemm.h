/* The products ternary_gemm.c computes, as ternary_linear.c hands them over (one per weight). */
#ifndef ST_BITEMBED_TERNARY_GEMM_H
#define ST_BITEMBED_TERNARY_GEMM_H
#include <stdint.h>

/* out = (codes x weights - zero point) * steps * scale + bias, in ternary_gemm.c's layouts. */
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
};

void ternary_gemm_jobs(const struct ternary_gemm_job *jobs, int64_t count, int64_t rows, int out_bfloat16,
                       int threads);
int ternary_gemm_tile_rows(void);

#endif
