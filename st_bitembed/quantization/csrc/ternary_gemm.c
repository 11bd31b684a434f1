/* uint8 activation codes x ternary weight codes, for CPUs with AVX512-VNNI or AVX2 (kernels.py, backend "native").
 *
 * Why not an int8 GEMM library: the quantizer writes this kernel's input directly and the kernel applies the rescale
 * and bias (and writes a bf16 model's outputs in bf16), so nothing else passes over the activations or the output.
 * - AVX512-VNNI: the weights stay at 2 bits (w + 1 in {0, 1, 2}, four per byte): a quarter of int8's bytes, which is
 *   what a short query's GEMMs wait for (they stream every weight from memory for a few tokens). Each 64 weights are
 *   unpacked by one shift and one and, then vpdpbusd multiplies 64 uint8 x int8 pairs and adds them, four at a time,
 *   into 16 int32 sums; 8 tokens x 48 outputs in 24 accumulators (of 32 registers). Sum(x * (w + 1)) - sum(x) is the
 *   product: each row's sum of codes is taken once, over the same bytes, padding included.
 * - AVX2: int8 weights. GEMM libraries multiply weights of any value, so each 32 products take vpmaddubsw (u8 x s8 ->
 *   pairs summed in int16), vpmaddwd (-> int32) and vpaddd. With ternary weights a pair sum is at most 2 * 255 in
 *   magnitude, so 64 of them add up in int16 without overflow: the inner loop is vpmaddubsw and vpaddw, 4 tokens x 24
 *   outputs in 12 accumulators, widened to int32 once per 256 inputs. On a 2-core AMD EPYC (Zen 3) that is 1.1-1.6x
 *   FBGEMM and 1.5-3.6x the fp32 product for 256 to 2,048 tokens (benchmarks/kernel_speed.py).
 * ternary_gemm_panel() / ternary_gemm_tile_rows() / ternary_gemm_weight_bits() tell the caller which layout this build
 * uses (panel 0: no kernel).
 *
 * Layouts:
 *   codes   uint8 [rows rounded up to a multiple of TILE_ROWS][code_stride]: signed activation codes + 128; the
 *           padding rows and the bytes past in_features (up to k_padded) may hold anything (padding rows are not
 *           written out; the weights of padding inputs are 0).
 *   packed  8-bit weights: int8 [panels][k_padded / 4][PANEL][4]: panel p holds outputs PANEL*p..PANEL*p+PANEL-1,
 *           four consecutive inputs of one output next to each other (what vpmaddubsw multiplies together).
 *           2-bit weights: uint8 [panels][k_padded / 16][PANEL / 16][64]: the same panels, each byte holding the
 *           codes + 1 of 4 consecutive steps (bits 2s, 2s + 1: step s) of one byte of the 8-bit layout.
 *           Outputs and inputs past the real ones are 0 (k_padded: a multiple of 4, or of 16 for 2-bit weights).
 *   column_sums  int32 [panels * PANEL]: each output's sum of weight codes, to take the zero point 128 back out.
 * out[m, n] = (sum_k codes[m, k] * w[n, k] - 128 * column_sums[n]) * (steps[m] * scale) + bias[n]: the integer
 * product is exact, then one float multiply and one add, as kernels.ternary_linear computes it in PyTorch; out is
 * float32, or bfloat16 (out_bfloat16: rounded as PyTorch converts float32) for bf16 models. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "activations.h"
#include "bfloat16.h"
#include "ternary_gemm.h"
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define VNNI512 1
#define PANEL 48        /* outputs per panel: three 16-lane vectors */
#define TILE_ROWS 8     /* 8 rows x 3 vectors: 24 accumulators, 3 weight vectors, a mask and a broadcast: 29 of 32 */
#define WEIGHT_BITS 2
#define PACKED_BYTES(inputs) ((inputs) * PANEL / 4) /* a panel's bytes for that many inputs */
/* Weights are read in the order they are stored (k-blocks of a panel, then the next panel), and for a few tokens each
 * byte is used by only one or two tiles: the hardware prefetcher alone left a short query's GEMMs waiting on memory.
 * Asking for the bytes 8 KiB (2.7 k-blocks) ahead took 16 tokens through 60 projections 1,024 -> 3,072 from 3.2-3.8x
 * to 4.3-4.5x the bf16 matmul (benchmarks/kernel_speed.py --query-only). */
#define PREFETCH_AHEAD 8192
#elif defined(__AVX2__)
#define PANEL 24        /* three 8-lane vectors */
#define TILE_ROWS 4     /* 4 rows x 3 vectors: 12 accumulators, 16 vector registers in all */
#define WEIGHT_BITS 8
#define PACKED_BYTES(inputs) ((inputs) * PANEL)
#endif
#define BLOCK_K 256    /* inputs per pass of a tile: a panel's 256 x PANEL weights stay in L1 while the tiles pass;
                        * on AVX2 also the int16 limit: 64 pair sums of magnitude <= 510 stay below 32,768 */
#define BLOCK_ROWS 64  /* rows whose accumulators and codes stay in L1 while a panel's weights pass */

#if defined(VNNI512) && defined(__AMX_INT8__) && defined(__AMX_TILE__) && defined(__linux__)
#define AMX 1
#define ROW_PADDING 32       /* the AMX tiles read 2 x 16 rows of codes */
#define AMX_BLOCK_ROWS 256   /* rows per unpacking of two panels (ternary_gemm_amx.c) */
#define AMX_PANELS 2         /* panels per item: 6 column tiles, in 3 pairs */
#define AMX_FEW_ROWS 64      /* up to this many rows the weights are streamed (amx_few_rows_[pair_]sums) */
#else
#define ROW_PADDING TILE_ROWS
#endif

#ifdef PANEL
int ternary_gemm_panel(void) { return PANEL; }
int ternary_gemm_tile_rows(void) { return ROW_PADDING; }
int ternary_gemm_weight_bits(void) { return WEIGHT_BITS; }
#else
int ternary_gemm_panel(void) { return 0; }
int ternary_gemm_tile_rows(void) { return 0; }
int ternary_gemm_weight_bits(void) { return 0; }
#endif

#ifdef PANEL
/* GCC's partial redundancy elimination makes it keep most of the accumulators on the stack; without it, the loop
 * keeps them all in registers. */
#if defined(__GNUC__) && !defined(__clang__)
#define ACCUMULATORS_IN_REGISTERS __attribute__((optimize("no-tree-pre")))
#else
#define ACCUMULATORS_IN_REGISTERS
#endif

#endif

#ifdef VNNI512
#define ROW(r)                                                                  \
    {                                                                           \
        int32_t four;                                                           \
        memcpy(&four, codes + (r) * code_stride + 4 * step, 4);                 \
        const __m512i x = _mm512_set1_epi32(four);                              \
        s##r##0 = _mm512_dpbusd_epi32(s##r##0, x, w0);                          \
        s##r##1 = _mm512_dpbusd_epi32(s##r##1, x, w1);                          \
        s##r##2 = _mm512_dpbusd_epi32(s##r##2, x, w2);                          \
    }
#define ADD(r, j)                                                               \
    {                                                                           \
        int32_t *sum = sums + (r) * PANEL + 16 * (j);                           \
        _mm512_storeu_si512(sum, _mm512_add_epi32(_mm512_loadu_si512(sum), s##r##j)); \
    }
#define ADD_ROW(r) ADD(r, 0) ADD(r, 1) ADD(r, 2)
/* the codes + 1 of step `shift / 2` of a group, for one of the panel's three vectors (reloaded: L1 is cheaper than
 * the registers it would take to keep them) */
#define UNPACK(j, shift) _mm512_and_si512(_mm512_srli_epi16(_mm512_loadu_si512(group + 64 * (j)), (shift)), three)
#define STEP(s)                                                                 \
    {                                                                           \
        const int64_t step = first + (s);                                       \
        const __m512i w0 = UNPACK(0, 2 * (s)), w1 = UNPACK(1, 2 * (s)), w2 = UNPACK(2, 2 * (s)); \
        ROW(0) ROW(1) ROW(2) ROW(3) ROW(4) ROW(5) ROW(6) ROW(7)                 \
    }

/* sums[8][48] += codes[8 rows][4 * steps inputs] . (weights + 1)[4 * steps inputs][48], steps a multiple of 4. */
ACCUMULATORS_IN_REGISTERS static void tile(const uint8_t *codes, int64_t code_stride, const void *packed,
                                           int64_t steps, int32_t *sums) {
    const uint8_t *weights = packed;
    __m512i s00 = _mm512_setzero_si512(), s01 = s00, s02 = s00, s10 = s00, s11 = s00, s12 = s00;
    __m512i s20 = s00, s21 = s00, s22 = s00, s30 = s00, s31 = s00, s32 = s00;
    __m512i s40 = s00, s41 = s00, s42 = s00, s50 = s00, s51 = s00, s52 = s00;
    __m512i s60 = s00, s61 = s00, s62 = s00, s70 = s00, s71 = s00, s72 = s00;
    const __m512i three = _mm512_set1_epi8(3);
    for (int64_t first = 0; first < steps; first += 4) {
        const uint8_t *group = weights + (first / 4) * PACKED_BYTES(16);
        _mm_prefetch((const char *)group + PREFETCH_AHEAD, _MM_HINT_T0); /* a group's 3 cache lines */
        _mm_prefetch((const char *)group + PREFETCH_AHEAD + 64, _MM_HINT_T0);
        _mm_prefetch((const char *)group + PREFETCH_AHEAD + 128, _MM_HINT_T0);
        STEP(0) STEP(1) STEP(2) STEP(3)
    }
    ADD_ROW(0) ADD_ROW(1) ADD_ROW(2) ADD_ROW(3) ADD_ROW(4) ADD_ROW(5) ADD_ROW(6) ADD_ROW(7)
}

/* Each row's sum of its k_padded codes (padding bytes included: their weights + 1 are 1, so they cancel exactly). */
static void row_sums(const uint8_t *codes, int64_t rows, int64_t code_stride, int64_t k_padded, int32_t *sums) {
    for (int64_t row = 0; row < rows; ++row) {
        const uint8_t *in = codes + row * code_stride;
        __m512i total = _mm512_setzero_si512();
        for (int64_t k = 0; k < k_padded; k += 64) {
            const __mmask64 valid = k_padded - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (k_padded - k)) - 1);
            total = _mm512_add_epi64(total, _mm512_sad_epu8(_mm512_maskz_loadu_epi8(valid, in + k), _mm512_setzero_si512()));
        }
        sums[row] = (int32_t)_mm512_reduce_add_epi64(total);
    }
}

/* out[0:48] = activation(v) (* factor), v = (sums - row_sum - 128 * column_sums) * scale (+ bias): the integer
 * correction is exact, then one multiply. Each value is rounded to bfloat16 wherever PyTorch would hold it so
 * (bfloat16_values: a bf16 model's, read by the activation or the factor's product, or written as float32), and
 * written as float32, or as bfloat16 (out_bfloat16), so that no float32 copy of a bf16 model's output is ever made.
 * activation: an enum activation; factor: NULL, or 48 floats (a gated MLP's activated gate, see struct gating). */
#define FINISH_ROW_COMPLETE 1 /* finish_row takes activations, factors and every rounding */
static inline void finish_row(const int32_t *sums, int32_t row_sum, const int32_t *column_sums, float scale,
                              const float *bias, int activation, const float *factor, int bfloat16_values, void *out,
                              int out_bfloat16) {
    const __m512 multiplier = _mm512_set1_ps(scale);
    for (int j = 0; j < PANEL / 16; ++j) {
        const __m512i zero_point = _mm512_slli_epi32(_mm512_loadu_si512(column_sums + 16 * j), 7);
        const __m512i corrected = _mm512_sub_epi32(_mm512_loadu_si512(sums + 16 * j), _mm512_set1_epi32(row_sum));
        const __m512i exact = _mm512_sub_epi32(corrected, zero_point);
        __m512 value = _mm512_mul_ps(_mm512_cvtepi32_ps(exact), multiplier);
        if (bias) value = _mm512_add_ps(value, _mm512_loadu_ps(bias + 16 * j));
        if (bfloat16_values && (activation != ACTIVATION_NONE || factor)) value = bfloat16_rounded_512(value);
        if (activation != ACTIVATION_NONE) value = activate_512(activation, value);
        if (factor) {
            if (bfloat16_values && activation != ACTIVATION_NONE) value = bfloat16_rounded_512(value);
            value = _mm512_mul_ps(value, _mm512_loadu_ps(factor + 16 * j));
        }
        if (out_bfloat16)
            store_bfloat16_512((uint16_t *)out + 16 * j, value);
        else
            _mm512_storeu_ps((float *)out + 16 * j, bfloat16_values ? bfloat16_rounded_512(value) : value);
    }
}
#elif defined(__AVX2__)
#define ROW(r)                                                                  \
    {                                                                           \
        int32_t four;                                                           \
        memcpy(&four, codes + (r) * code_stride + 4 * step, 4);                 \
        const __m256i x = _mm256_set1_epi32(four);                              \
        s##r##0 = _mm256_add_epi16(s##r##0, _mm256_maddubs_epi16(x, w0));       \
        s##r##1 = _mm256_add_epi16(s##r##1, _mm256_maddubs_epi16(x, w1));       \
        s##r##2 = _mm256_add_epi16(s##r##2, _mm256_maddubs_epi16(x, w2));       \
    }
#define WIDEN(r, j)                                                             \
    {                                                                           \
        __m256i *sum = (__m256i *)(sums + (r) * PANEL + 8 * (j));               \
        const __m256i wide = _mm256_madd_epi16(s##r##j, ones);                  \
        _mm256_storeu_si256(sum, _mm256_add_epi32(_mm256_loadu_si256(sum), wide)); \
    }

/* sums[4][24] += codes[4 rows][4 * steps inputs] . weights[4 * steps inputs][24], steps <= BLOCK_K / 4. */
ACCUMULATORS_IN_REGISTERS static void tile(const uint8_t *codes, int64_t code_stride, const void *packed,
                                           int64_t steps, int32_t *sums) {
    const int8_t *weights = packed;
    __m256i s00 = _mm256_setzero_si256(), s01 = s00, s02 = s00, s10 = s00, s11 = s00, s12 = s00;
    __m256i s20 = s00, s21 = s00, s22 = s00, s30 = s00, s31 = s00, s32 = s00;
    for (int64_t step = 0; step < steps; ++step) {
        const int8_t *w = weights + step * 4 * PANEL;
        const __m256i w0 = _mm256_loadu_si256((const __m256i *)w);
        const __m256i w1 = _mm256_loadu_si256((const __m256i *)(w + 32));
        const __m256i w2 = _mm256_loadu_si256((const __m256i *)(w + 64));
        ROW(0) ROW(1) ROW(2) ROW(3)
    }
    const __m256i ones = _mm256_set1_epi16(1);
    WIDEN(0, 0) WIDEN(0, 1) WIDEN(0, 2) WIDEN(1, 0) WIDEN(1, 1) WIDEN(1, 2)
    WIDEN(2, 0) WIDEN(2, 1) WIDEN(2, 2) WIDEN(3, 0) WIDEN(3, 1) WIDEN(3, 2)
}

static inline __m256i to_bfloat16_lanes(__m256 value) {
    const __m256i bits = _mm256_castps_si256(value);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i biased = _mm256_add_epi32(_mm256_add_epi32(bits, lsb), _mm256_set1_epi32(0x7fff));
    const __m256i rounded = _mm256_srli_epi32(biased, 16);
    const __m256i ordered = _mm256_castps_si256(_mm256_cmp_ps(value, value, _CMP_ORD_Q));
    return _mm256_blendv_epi8(_mm256_set1_epi32(0xffff), rounded, ordered);
}

/* out[0:24] = (sums - 128 * column_sums) * scale (+ bias), as the AVX512 one (row_sum is 0 for 8-bit weights);
 * without an activation or a factor, written in the values' own precision (finish_row_portable does the rest). */
#define FINISH_ROW_COMPLETE 0
static inline void finish_row(const int32_t *sums, int32_t row_sum, const int32_t *column_sums, float scale,
                              const float *bias, int activation, const float *factor, int bfloat16_values, void *out,
                              int out_bfloat16) {
    (void)row_sum, (void)activation, (void)factor, (void)bfloat16_values;
    const __m256 multiplier = _mm256_set1_ps(scale);
    __m256 values[PANEL / 8];
    for (int j = 0; j < PANEL / 8; ++j) {
        const __m256i zero_point = _mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)(column_sums + 8 * j)), 7);
        const __m256i exact = _mm256_sub_epi32(_mm256_loadu_si256((const __m256i *)(sums + 8 * j)), zero_point);
        values[j] = _mm256_mul_ps(_mm256_cvtepi32_ps(exact), multiplier);
        if (bias) values[j] = _mm256_add_ps(values[j], _mm256_loadu_ps(bias + 8 * j));
        if (!out_bfloat16) _mm256_storeu_ps((float *)out + 8 * j, values[j]);
    }
    if (out_bfloat16) {
        /* packus interleaves 128-bit lanes; the permute puts the 16 values back in order */
        const __m256i first = _mm256_packus_epi32(to_bfloat16_lanes(values[0]), to_bfloat16_lanes(values[1]));
        _mm256_storeu_si256((__m256i *)out, _mm256_permute4x64_epi64(first, 0xd8));
        const __m256i last = to_bfloat16_lanes(values[2]);
        const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(last), _mm256_extracti128_si256(last, 1));
        _mm_storeu_si128((__m128i *)((uint16_t *)out + 16), packed);
    }
}
#endif

#ifdef PANEL
/* out[0:outs] as finish_row computes it, for any outs <= PANEL in either build (finish_row takes full panels, and
 * activations and factors where FINISH_ROW_COMPLETE): the same arithmetic and roundings, each step a loop the
 * compiler vectorizes. */
static inline void finish_row_portable(const int32_t *sums, int32_t row_sum, const int32_t *column_sums, float scale,
                                       const float *bias, int64_t outs, int activation, const float *factor,
                                       int bfloat16_values, void *out, int out_bfloat16) {
    float values[PANEL];
    for (int64_t j = 0; j < outs; ++j) {
        const float value = (float)(sums[j] - row_sum - 128 * column_sums[j]) * scale;
        values[j] = bias ? value + bias[j] : value;
    }
    if (bfloat16_values && (activation != ACTIVATION_NONE || factor))
        for (int64_t j = 0; j < outs; ++j) values[j] = from_bfloat16(to_bfloat16(values[j]));
    if (activation == ACTIVATION_GELU) {
#pragma omp simd
        for (int64_t j = 0; j < outs; ++j) values[j] = gelu_erf(values[j]);
    } else if (activation == ACTIVATION_GELU_TANH) {
#pragma omp simd
        for (int64_t j = 0; j < outs; ++j) values[j] = gelu_tanh(values[j]);
    } else if (activation == ACTIVATION_SILU) {
#pragma omp simd
        for (int64_t j = 0; j < outs; ++j) values[j] = silu(values[j]);
    }
    if (factor)
        for (int64_t j = 0; j < outs; ++j) {
            const float activated = bfloat16_values && activation != ACTIVATION_NONE
                                        ? from_bfloat16(to_bfloat16(values[j])) : values[j];
            values[j] = activated * factor[j];
        }
    for (int64_t j = 0; j < outs; ++j) {
        if (out_bfloat16)
            ((uint16_t *)out)[j] = to_bfloat16(values[j]);
        else
            ((float *)out)[j] = bfloat16_values ? from_bfloat16(to_bfloat16(values[j])) : values[j];
    }
}

/* A gated MLP's gate and up projections in one pass (ternary_gemm_jobs with `gated`): each item runs the gate's
 * panels, whose activated outputs wait in `gate` as PyTorch would hold them, then the same panels of the up
 * projection, whose outputs are multiplied by them: activation(gate) * up, the down projection's input, is written
 * once, and neither the gate nor the up projection is ever in memory as a whole. */
#define GATE_COLUMNS (2 * PANEL) /* outputs per item: up to two panels (AMX_PANELS) */
struct gating {
    float *gate;         /* [the item's rows][GATE_COLUMNS] */
    int64_t first_row;   /* the item's first row and first panel */
    int64_t first_panel;
    int multiply;        /* 0: the gate's panels, written to gate; 1: the up projection's, multiplied by them */
};

/* Rows first_row .. first_row + count - 1 of one panel of a job, from their integer sums ([count][sums_stride];
 * code_sums: each row's sum of codes for 2-bit weights stored + 1, NULL where the sums are the products already).
 * gating: NULL, or the item of a gated pair this panel belongs to (the gate's outputs then go to gating->gate). */
static void finish_rows(const struct ternary_gemm_job *job, int64_t first_row, int64_t count, int64_t panel,
                        const int32_t *sums, int64_t sums_stride, const int32_t *code_sums, int out_bfloat16,
                        const struct gating *gating) {
    const int64_t out_features = job->out_features, first_out = panel * PANEL;
    const int64_t outs = out_features - first_out < PANEL ? out_features - first_out : PANEL;
    const float *bias = job->bias;
    const int32_t *column_sums = job->column_sums;
    const int activation = job->activation;
    const int to_gate = gating && !gating->multiply;
    const int row_out_bfloat16 = to_gate ? 0 : out_bfloat16; /* the gate waits in float32 */
    for (int64_t r = 0; r < count; ++r) {
        const float row_scale = job->steps[first_row + r] * job->scale;
        const int32_t row_sum = code_sums ? code_sums[r] : 0;
        const int32_t *row_sums = sums + r * sums_stride;
        const float *row_bias = bias ? bias + first_out : NULL;
        const float *factor = NULL;
        void *row_out = NULL;
        if (gating) {
            float *gate = gating->gate + (first_row + r - gating->first_row) * GATE_COLUMNS +
                          (panel - gating->first_panel) * PANEL;
            factor = gating->multiply ? gate : NULL;
            row_out = gating->multiply ? NULL : gate;
        }
        if (!to_gate) {
            const int64_t offset = (first_row + r) * out_features + first_out;
            row_out = out_bfloat16 ? (void *)((uint16_t *)job->out + offset) : (void *)((float *)job->out + offset);
        }
        const int plain = activation == ACTIVATION_NONE && !factor && row_out_bfloat16 == out_bfloat16;
        if (outs == PANEL && (plain || FINISH_ROW_COMPLETE))
            finish_row(row_sums, row_sum, column_sums + first_out, row_scale, row_bias, activation, factor,
                       out_bfloat16, row_out, row_out_bfloat16);
        else
            finish_row_portable(row_sums, row_sum, column_sums + first_out, row_scale, row_bias, outs, activation,
                                factor, out_bfloat16, row_out, row_out_bfloat16);
    }
}

/* One panel of one block of BLOCK_ROWS rows of a job: its integer product, then its rescaled outputs (gating: as
 * finish_rows). */
static void block_panel(const struct ternary_gemm_job *job, int64_t rows, int64_t block, int64_t panel,
                        int out_bfloat16, const struct gating *gating) {
    int32_t sums[BLOCK_ROWS * PANEL] __attribute__((aligned(64)));
    const uint8_t *codes = job->codes;
    const int64_t code_stride = job->code_stride, k_padded = job->k_padded;
    const int64_t first_row = block * BLOCK_ROWS;
    const int64_t block_rows = rows - first_row < BLOCK_ROWS ? rows - first_row : BLOCK_ROWS;
    const int64_t tiles = (block_rows + TILE_ROWS - 1) / TILE_ROWS;
    memset(sums, 0, sizeof(int32_t) * tiles * TILE_ROWS * PANEL);
    int32_t code_sums[BLOCK_ROWS] = {0}; /* stay 0 for 8-bit weights */
#if WEIGHT_BITS == 2 /* per block, beside its panel: 1/48 of the panel's multiply-adds, no allocation */
    row_sums(codes + first_row * code_stride, block_rows, code_stride, k_padded, code_sums);
#endif
    const uint8_t *weights = (const uint8_t *)job->packed + panel * PACKED_BYTES(k_padded);
    for (int64_t k = 0; k < k_padded; k += BLOCK_K) {
        const int64_t steps_here = (k_padded - k < BLOCK_K ? k_padded - k : BLOCK_K) / 4;
        for (int64_t t = 0; t < tiles; ++t)
            tile(codes + (first_row + t * TILE_ROWS) * code_stride + k, code_stride,
                 (const void *)(weights + PACKED_BYTES(k)), steps_here, sums + t * TILE_ROWS * PANEL);
    }
    finish_rows(job, first_row, block_rows, panel, sums, PANEL, code_sums, out_bfloat16, gating);
}
#endif

#ifdef AMX
/* Up to AMX_PANELS panels (from `panel`) of one block of AMX_BLOCK_ROWS rows of a job on AMX tiles
 * (ternary_gemm_amx.c): up to AMX_FEW_ROWS rows in all, the panels' weights streamed, 32 rows at a time; more, the
 * panels unpacked to int8 once, then 32 rows at a time; between amx_begin and amx_end (gating: as finish_rows). */
static void amx_block_panels(const struct ternary_gemm_job *job, int64_t rows, int64_t block, int64_t panel,
                             int out_bfloat16, const struct gating *gating) {
    int32_t sums[32 * AMX_PANELS * PANEL] __attribute__((aligned(64)));
    const int64_t first_row = block * AMX_BLOCK_ROWS, k_padded = job->k_padded;
    const int64_t block_rows = rows - first_row < AMX_BLOCK_ROWS ? rows - first_row : AMX_BLOCK_ROWS;
    const int64_t panels_left = (job->out_features + PANEL - 1) / PANEL - panel;
    const int64_t count = panels_left < AMX_PANELS ? panels_left : AMX_PANELS;
    const uint8_t *packed = (const uint8_t *)job->packed + panel * PACKED_BYTES(k_padded);
    const int64_t sums_stride = count * PANEL;
    if (rows <= AMX_FEW_ROWS) { /* a short query (one block): the weights streamed, unpacked 64 inputs at a time */
        for (int64_t t = 0; t < rows; t += 32) {
            const int64_t here = rows - t < 32 ? rows - t : 32;
            const uint8_t *codes = job->codes + t * job->code_stride;
            if (here <= 16)
                amx_few_rows_sums(codes, job->code_stride, packed, count, k_padded, sums, sums_stride);
            else /* two tiles of rows: each panel's weights unpacked once for both */
                for (int64_t p = 0; p < count; ++p)
                    amx_few_rows_pair_sums(codes, job->code_stride, packed + p * PACKED_BYTES(k_padded), k_padded,
                                           sums + p * PANEL, sums_stride);
            for (int64_t p = 0; p < count; ++p)
                finish_rows(job, t, here, panel + p, sums + p * PANEL, sums_stride, NULL, out_bfloat16, gating);
        }
        return;
    }
    const int8_t *weights = amx_unpack_panels(packed, count, k_padded);
    if (!weights) { /* no memory for the unpacked panels: the AVX512-VNNI tiles, which need none */
        for (int64_t p = panel; p < panel + count; ++p)
            for (int64_t start = first_row; start < first_row + block_rows; start += BLOCK_ROWS)
                block_panel(job, rows, start / BLOCK_ROWS, p, out_bfloat16, gating);
        return;
    }
    for (int64_t t = 0; t < block_rows; t += 32) {
        amx_row_pair_sums(job->codes + (first_row + t) * job->code_stride, job->code_stride, weights, 3 * count,
                          k_padded, sums, sums_stride);
        for (int64_t p = 0; p < count; ++p)
            finish_rows(job, first_row + t, block_rows - t < 32 ? block_rows - t : 32, panel + p, sums + p * PANEL,
                        sums_stride, NULL, out_bfloat16, gating);
    }
}

/* From how many rows the AMX tiles run (below: AVX512-VNNI); negative: never. They are faster at every size
 * (benchmarks/kernel_speed.py): 0. See ternary_gemm_set_amx_min_rows. */
static int64_t amx_min_rows = 0;
#endif

/* Sets from how many rows the AMX tiles run (negative: never; 0: always), where they are available, and returns
 * the previous setting (-1 without AMX): for tests and benchmarks of either path. */
int64_t ternary_gemm_set_amx_min_rows(int64_t min_rows) {
#ifdef AMX
    const int64_t previous = amx_min_rows;
    amx_min_rows = min_rows;
    return previous;
#else
    (void)min_rows;
    return -1;
#endif
}

#ifdef PANEL
/* One item of ternary_gemm_jobs: up to panels_per_item panels of one block of rows of a job. */
static void run_item(const struct ternary_gemm_job *job, int64_t rows, int64_t block, int64_t panel, int use_amx,
                     int out_bfloat16, const struct gating *gating) {
#ifdef AMX
    if (use_amx) {
        amx_block_panels(job, rows, block, panel, out_bfloat16, gating);
        return;
    }
#endif
    (void)use_amx;
    block_panel(job, rows, block, panel, out_bfloat16, gating);
}
#endif

/* The products of several weights (e.g. q, k and v of one input) in one parallel loop over all their panels: one
 * fork and join instead of one per weight, and threads share out the panels of all of them. gated: jobs are a gated
 * MLP's gate (its activation in jobs[0].activation; jobs[0].out unused) and up projection, of as many outputs, and
 * jobs[1].out receives activation(gate) * up (struct gating). Returns 0, or -1 for a gated call that is not such a
 * pair or whose buffer could not be allocated (nothing written then). */
int ternary_gemm_jobs(const struct ternary_gemm_job *jobs, int64_t count, int64_t rows, int out_bfloat16,
                      int threads, int gated) {
#ifdef PANEL
    int use_amx = 0;
#ifdef AMX
    use_amx = amx_min_rows >= 0 && rows >= amx_min_rows && ternary_gemm_amx_available();
    for (int64_t j = 0; j < count; ++j) use_amx = use_amx && jobs[j].k_padded % 64 == 0; /* whole tiles */
    const int64_t block_rows = use_amx ? AMX_BLOCK_ROWS : BLOCK_ROWS, panels_per_item = use_amx ? AMX_PANELS : 1;
#else
    const int64_t block_rows = BLOCK_ROWS, panels_per_item = 1;
#endif
    const int64_t row_blocks = (rows + block_rows - 1) / block_rows;
    if (count < 1 || count > TERNARY_GEMM_MAX_JOBS) return -1;
    if (gated && (count != 2 || jobs[0].out_features != jobs[1].out_features)) return -1;
    int64_t items = 0, work = 0, job_items[TERNARY_GEMM_MAX_JOBS];
    for (int64_t j = 0; j < count; ++j) {
        const int64_t panels = (jobs[j].out_features + PANEL - 1) / PANEL;
        job_items[j] = row_blocks * ((panels + panels_per_item - 1) / panels_per_item);
        items += gated && j ? 0 : job_items[j]; /* a gated item runs both jobs */
        work += rows * jobs[j].out_features * jobs[j].k_padded;
    }
    const int64_t gate_floats = (rows < block_rows ? rows : block_rows) * GATE_COLUMNS; /* per thread */
    float *gates = gated ? malloc(sizeof(float) * (size_t)(gate_floats * (threads > 1 ? threads : 1))) : NULL;
    if (gated && !gates) return -1;
#pragma omp parallel num_threads(threads) if (work >= (1 << 18))
    {
#ifdef AMX
        if (use_amx) amx_begin(); /* the tile configuration is each thread's own */
#endif
#ifdef _OPENMP
        struct gating gating = {gates ? gates + omp_get_thread_num() * gate_floats : NULL, 0, 0, 0};
#else
        struct gating gating = {gates, 0, 0, 0};
#endif
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; ++item) {
            int64_t j = 0, rest = item; /* the job, then (block, panel group) within it, in the order of one job's loop */
            for (; j < count && rest >= job_items[j]; ++j) rest -= job_items[j];
            const int64_t groups = job_items[j] / row_blocks, block = rest / groups;
            const int64_t panel = (rest % groups) * panels_per_item;
            if (gated) {
                gating.first_row = block * block_rows;
                gating.first_panel = panel;
                gating.multiply = 0;
                run_item(&jobs[0], rows, block, panel, use_amx, out_bfloat16, &gating);
                gating.multiply = 1;
                run_item(&jobs[1], rows, block, panel, use_amx, out_bfloat16, &gating);
            } else {
                run_item(&jobs[j], rows, block, panel, use_amx, out_bfloat16, NULL);
            }
        }
#ifdef AMX
        if (use_amx) amx_end();
#endif
    }
    free(gates);
    return 0;
#else
    (void)jobs, (void)count, (void)rows, (void)out_bfloat16, (void)threads, (void)gated;
    return -1;
#endif
}

void ternary_gemm(const uint8_t *codes, int64_t rows, int64_t code_stride, int64_t k_padded, const void *packed,
                  const int32_t *column_sums, int64_t out_features, const float *steps, float scale,
                  const float *bias, void *out, int out_bfloat16, int threads) {
    const struct ternary_gemm_job job = {codes, code_stride, k_padded, packed, column_sums, out_features, steps,
                                         scale, bias, out, ACTIVATION_NONE};
    ternary_gemm_jobs(&job, 1, rows, out_bfloat16, threads, 0);
}
