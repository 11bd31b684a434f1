/* An encoder's scaled dot-product attention over short sequences, one (sequence, head) pair per item of one parallel
 * loop (native_attention.py). Built where the compiler targets AVX-512; elsewhere attention_available() is 0 and
 * PyTorch's attention runs.
 *
 * Why: PyTorch's CPU attention (its flash kernel, and the math path alike) spends microseconds of set-up on each
 * (sequence, head) pair, whatever its size; a batch of 32 sentences of ~25 tokens in 12 heads is 384 pairs of a few
 * thousand multiply-adds each, and took about a quarter of a MiniLM student's encode. Here a pair's keys and values
 * are widened to float32 once into the thread's own buffers (the keys transposed, so that scores are vectors over 16
 * keys), and each block of 8 query rows is finished in registers and L1: its scores with 8 accumulators per 16 keys,
 * its softmax, then its weighted values with 4 rows x 4 vectors of features at a time.
 *
 * Arithmetic, per query row (as PyTorch's flash kernel, in float32; only the order of the sums differs):
 *   s_j = (q . k_j) * scale, plus the additive mask, or -inf where a boolean mask is false;
 *   p_j = exp(s_j - max s), 0 where s_j is -inf; out = (sum_j p'_j v_j) / sum_j p_j, rounded to the output's dtype
 *   once, where p'_j is p_j rounded to bf16 for bf16 inputs (as that kernel rounds them for its bf16 product);
 *   a row whose keys are all masked is 0 (as PyTorch's kernels give). */
#include <stdint.h>
#include <stdlib.h>

#include "activations.h"
#include "bfloat16.h"

#define ATTENTION_MAX_KEYS 512
#define ATTENTION_MAX_HEAD_DIM 256
#define LANES 16      /* keys are padded to whole vectors of 16; head_dim must be a multiple of 16 */
#define QUERY_BLOCK 8 /* query rows whose scores are computed together (8 accumulators per 16 keys) */
#define VALUE_ROWS 4  /* query rows whose weighted values are summed together, up to 4 vectors of features each */

int attention_max_keys(void) { return ATTENTION_MAX_KEYS; }
int attention_max_head_dim(void) { return ATTENTION_MAX_HEAD_DIM; }

enum attention_mask_kind { MASK_NONE = 0, MASK_BOOL = 1, MASK_ADDITIVE = 2 };

#if defined(__AVX512F__)
#include <immintrin.h>

int attention_available(void) { return 1; }

/* 16 values of a float32 or bfloat16 row, widened to float32. */
static inline __m512 load_16(const void *base, int64_t index, int in_bfloat16) {
    return in_bfloat16 ? from_bfloat16_512((const uint16_t *)base + index) : _mm512_loadu_ps((const float *)base + index);
}

/* The scores of the QUERY_BLOCK rows of a query block (row r's queries: query_rows[r], float32) against every key,
 * scaled and masked, then turned into unnormalised weights in place; returns each row's sum of weights in totals.
 * Every loop over the rows has a constant count (rows past the queries' end repeat the first), so that the
 * accumulators stay in registers. */
static void block_weights(const float *query_rows, const float *keys_t, int64_t padded_keys,
                          int64_t keys, int64_t head_dim, float scale, const void *mask, int mask_kind,
                          const int64_t *row_mask_bases, int64_t mask_key_stride, int in_bfloat16, float *scores,
                          float *totals) {
    for (int64_t key = 0; key < padded_keys; key += LANES) {
        __m512 sums[QUERY_BLOCK];
        for (int r = 0; r < QUERY_BLOCK; ++r) sums[r] = _mm512_setzero_ps();
        for (int64_t d = 0; d < head_dim; ++d) {
            const __m512 column = _mm512_loadu_ps(keys_t + d * padded_keys + key);
            for (int r = 0; r < QUERY_BLOCK; ++r)
                sums[r] = _mm512_fmadd_ps(_mm512_set1_ps(query_rows[r * head_dim + d]), column, sums[r]);
        }
        const __mmask16 real_keys = keys - key >= LANES ? 0xffff : (__mmask16)((1u << (keys - key)) - 1);
        for (int r = 0; r < QUERY_BLOCK; ++r) {
            __m512 row = _mm512_mul_ps(sums[r], _mm512_set1_ps(scale));
            __mmask16 attended = real_keys;
            if (mask_kind == MASK_BOOL) {
                const uint8_t *allowed = (const uint8_t *)mask + row_mask_bases[r] + key * mask_key_stride;
                __mmask16 allowed_bits = 0;
                if (mask_key_stride == 1 && keys - key >= LANES)
                    allowed_bits = _mm_cmpneq_epi8_mask(_mm_loadu_si128((const __m128i *)allowed), _mm_setzero_si128());
                else
                    for (int64_t j = 0; j < LANES && key + j < keys; ++j)
                        allowed_bits |= (__mmask16)((allowed[j * mask_key_stride] != 0) << j);
                attended &= allowed_bits;
            } else if (mask_kind == MASK_ADDITIVE) {
                float added[LANES] = {0};
                for (int64_t j = 0; j < LANES && key + j < keys; ++j)
                    added[j] = in_bfloat16 ? from_bfloat16(((const uint16_t *)mask)[row_mask_bases[r] + (key + j) *
                                                                                     mask_key_stride])
                                           : ((const float *)mask)[row_mask_bases[r] + (key + j) * mask_key_stride];
                row = _mm512_add_ps(row, _mm512_loadu_ps(added));
                attended &= _mm512_cmp_ps_mask(row, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
            }
            _mm512_storeu_ps(scores + r * padded_keys + key, _mm512_mask_blend_ps(attended, _mm512_set1_ps(-INFINITY), row));
        }
    }
    for (int r = 0; r < QUERY_BLOCK; ++r) {
        float *row = scores + r * padded_keys;
        __m512 highest = _mm512_set1_ps(-INFINITY);
        for (int64_t key = 0; key < padded_keys; key += LANES) highest = _mm512_max_ps(highest, _mm512_loadu_ps(row + key));
        const float row_max = _mm512_reduce_max_ps(highest);
        __m512 total = _mm512_setzero_ps();
        for (int64_t key = 0; key < padded_keys; key += LANES) {
            const __m512 score = _mm512_loadu_ps(row + key);
            const __mmask16 attended = _mm512_cmp_ps_mask(score, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
            /* all keys masked: every weight is 0 (and the row's output with them) */
            const __m512 weight = row_max == -INFINITY
                                      ? _mm512_setzero_ps()
                                      : _mm512_maskz_mov_ps(attended, exp_512(_mm512_sub_ps(score, _mm512_set1_ps(row_max))));
            /* bf16: the weights rounded as PyTorch's kernel rounds them for its bf16 product (their sum is not) */
            _mm512_storeu_ps(row + key, in_bfloat16 ? bfloat16_rounded_512(weight) : weight);
            total = _mm512_add_ps(total, weight);
        }
        totals[r] = _mm512_reduce_add_ps(total);
    }
}

/* Output rows [first, first + VALUE_ROWS) of a query block, features [feature, feature + vectors * LANES): the
 * weights (scores, rows of padded_keys) times the values, over the totals; only rows below `rows` are written.
 * Inlined with `vectors` a constant, so that the VALUE_ROWS x vectors accumulators stay in registers. */
static inline __attribute__((always_inline)) void value_rows(const float *scores, int64_t first, int64_t rows,
                                                             const float *totals, const float *values,
                                                             int64_t padded_keys, int64_t keys, int64_t head_dim,
                                                             int64_t feature, int vectors, void *out,
                                                             const int64_t *row_out_bases, int in_bfloat16) {
    __m512 sums[VALUE_ROWS][4];
    for (int r = 0; r < VALUE_ROWS; ++r)
        for (int v = 0; v < vectors; ++v) sums[r][v] = _mm512_setzero_ps();
    for (int64_t key = 0; key < keys; ++key) {
        const float *value_row = values + key * head_dim + feature;
        __m512 value_vectors[4];
        for (int v = 0; v < vectors; ++v) value_vectors[v] = _mm512_loadu_ps(value_row + v * LANES);
        for (int r = 0; r < VALUE_ROWS; ++r) {
            const __m512 weight = _mm512_set1_ps(scores[(first + r) * padded_keys + key]);
            for (int v = 0; v < vectors; ++v) sums[r][v] = _mm512_fmadd_ps(weight, value_vectors[v], sums[r][v]);
        }
    }
    for (int r = 0; r < VALUE_ROWS; ++r) {
        if (first + r >= rows) break;
        const __m512 inverse = _mm512_set1_ps(totals[first + r] > 0.0f ? 1.0f / totals[first + r] : 0.0f);
        for (int v = 0; v < vectors; ++v) {
            const __m512 result = _mm512_mul_ps(sums[r][v], inverse);
            const int64_t at = row_out_bases[first + r] + feature + v * LANES;
            if (in_bfloat16) {
                const __m512i bits = _mm512_castps_si512(bfloat16_rounded_512(result));
                _mm256_storeu_si256((__m256i *)((uint16_t *)out + at), _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
            } else {
                _mm512_storeu_ps((float *)out + at, result);
            }
        }
    }
}

/* Output rows [0, rows) of a query block: value_rows over groups of VALUE_ROWS rows and up to 4 vectors of
 * features. */
static void block_outputs(const float *scores, int64_t rows, const float *totals, const float *values,
                          int64_t padded_keys, int64_t keys, int64_t head_dim, void *out, const int64_t *row_out_bases,
                          int in_bfloat16) {
    for (int64_t first = 0; first < rows; first += VALUE_ROWS)
        for (int64_t feature = 0; feature < head_dim; feature += 4 * LANES) {
            const int64_t left = (head_dim - feature) / LANES;
            if (left >= 4)
                value_rows(scores, first, rows, totals, values, padded_keys, keys, head_dim, feature, 4, out,
                           row_out_bases, in_bfloat16);
            else if (left == 3)
                value_rows(scores, first, rows, totals, values, padded_keys, keys, head_dim, feature, 3, out,
                           row_out_bases, in_bfloat16);
            else if (left == 2)
                value_rows(scores, first, rows, totals, values, padded_keys, keys, head_dim, feature, 2, out,
                           row_out_bases, in_bfloat16);
            else
                value_rows(scores, first, rows, totals, values, padded_keys, keys, head_dim, feature, 1, out,
                           row_out_bases, in_bfloat16);
        }
}

/* out[b, h, i, :] = attention of query row i of head h of sequence b over that head's keys and values.
 * query, key, value and out: float32 or bfloat16 (all one dtype), addressed by strides in elements of (sequence, head,
 * position), the last dimension (head_dim features, a multiple of 16) contiguous; mask (NULL with MASK_NONE): bool
 * bytes or additive values of the query's dtype, addressed by strides of (sequence, head, query, key), 0 for a
 * broadcast dimension. Returns 0, or -1 where the sizes are not ones the kernel takes or a buffer cannot be allocated. */
int attention(const void *query, const void *key, const void *value, const void *mask, void *out, int64_t batch,
              int64_t heads, int64_t queries, int64_t keys, int64_t head_dim, const int64_t *query_strides,
              const int64_t *key_strides, const int64_t *value_strides, const int64_t *mask_strides,
              const int64_t *out_strides, int in_bfloat16, int mask_kind, float scale, int threads) {
    if (keys < 1 || keys > ATTENTION_MAX_KEYS || head_dim < LANES || head_dim > ATTENTION_MAX_HEAD_DIM ||
        head_dim % LANES != 0)
        return -1;
    const int64_t padded_keys = (keys + LANES - 1) / LANES * LANES;
    const int64_t pairs = batch * heads;
    int failed = 0;
#pragma omp parallel num_threads(threads) if (pairs * queries * keys * head_dim >= (1 << 16))
    {
        /* keys transposed ([head_dim][padded_keys]), values ([keys][head_dim]), a block's queries and scores */
        const size_t floats = (size_t)(2 * padded_keys * head_dim + QUERY_BLOCK * (head_dim + padded_keys));
        float *buffer = aligned_alloc(64, (floats * sizeof(float) + 63) / 64 * 64);
        if (buffer == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
            float *keys_t = buffer, *values = keys_t + padded_keys * head_dim;
            float *query_rows = values + padded_keys * head_dim, *scores = query_rows + QUERY_BLOCK * head_dim;
#pragma omp for schedule(static)
            for (int64_t pair = 0; pair < pairs; ++pair) {
                const int64_t b = pair / heads, h = pair % heads;
                const int64_t key_base = b * key_strides[0] + h * key_strides[1];
                const int64_t value_base = b * value_strides[0] + h * value_strides[1];
                for (int64_t j = 0; j < padded_keys; ++j)
                    for (int64_t d = 0; d < head_dim; d += LANES) {
                        float widened[LANES];
                        _mm512_storeu_ps(widened, j < keys ? load_16(key, key_base + j * key_strides[2] + d, in_bfloat16)
                                                           : _mm512_setzero_ps());
                        for (int lane = 0; lane < LANES; ++lane) keys_t[(d + lane) * padded_keys + j] = widened[lane];
                    }
                for (int64_t j = 0; j < keys; ++j)
                    for (int64_t d = 0; d < head_dim; d += LANES)
                        _mm512_storeu_ps(values + j * head_dim + d,
                                         load_16(value, value_base + j * value_strides[2] + d, in_bfloat16));
                for (int64_t first = 0; first < queries; first += QUERY_BLOCK) {
                    const int64_t rows = queries - first < QUERY_BLOCK ? queries - first : QUERY_BLOCK;
                    int64_t mask_bases[QUERY_BLOCK], out_bases[QUERY_BLOCK];
                    float totals[QUERY_BLOCK];
                    for (int64_t r = 0; r < QUERY_BLOCK; ++r) {
                        const int64_t i = first + (r < rows ? r : 0); /* rows past the end repeat the first */
                        const int64_t query_base = b * query_strides[0] + h * query_strides[1] + i * query_strides[2];
                        for (int64_t d = 0; d < head_dim; d += LANES)
                            _mm512_storeu_ps(query_rows + r * head_dim + d, load_16(query, query_base + d, in_bfloat16));
                        mask_bases[r] = b * mask_strides[0] + h * mask_strides[1] + i * mask_strides[2];
                        out_bases[r] = b * out_strides[0] + h * out_strides[1] + i * out_strides[2];
                    }
                    block_weights(query_rows, keys_t, padded_keys, keys, head_dim, scale, mask, mask_kind,
                                  mask_bases, mask_strides[3], in_bfloat16, scores, totals);
                    block_outputs(scores, rows, totals, values, padded_keys, keys, head_dim, out, out_bases,
                                  in_bfloat16);
                }
            }
        }
        free(buffer);
    }
    return failed ? -1 : 0;
}

#else

int attention_available(void) { return 0; }

int attention(const void *query, const void *key, const void *value, const void *mask, void *out, int64_t batch,
              int64_t heads, int64_t queries, int64_t keys, int64_t head_dim, const int64_t *query_strides,
              const int64_t *key_strides, const int64_t *value_strides, const int64_t *mask_strides,
              const int64_t *out_strides, int in_bfloat16, int mask_kind, float scale, int threads) {
    return -1;
}

#endif
