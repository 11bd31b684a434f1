/* An encoder's scaled dot-product attention, one (sequence, head) pair per item of one parallel loop
 * (native_attention.py). Built where the compiler targets AVX-512; elsewhere attention_available() is 0 and PyTorch's
 * attention runs.
 *
 * Why: PyTorch's CPU attention (its flash kernel, and the math path alike) makes small GEMM calls per (sequence, head,
 * block of 32 to 256 queries), each with microseconds of set-up whatever its size: for a batch of sentences (32 x ~25
 * tokens x 12 heads: 384 pairs of a few thousand multiply-adds each) that set-up is most of the attention's time, a
 * quarter of a MiniLM student's encode; for passages of ~300 tokens, 30% of it. Here each thread lays a pair's keys
 * and values out once in its own buffers, then finishes each block of queries in registers, tiles and L1:
 * - bf16 with AMX tiles (head_dim a multiple of 32): 16 queries x 16 keys of scores per tile product, then the
 *   block's softmax, then 16 queries x 16 features of output per tile product over 32 keys at a time;
 * - bf16 otherwise, with AVX512-BF16: the same blocks on vectors as below, each vdpbf16ps multiplying 16 pairs of
 *   bf16 values (two features of a key, or two keys' weights and values) into float32 sums;
 * - otherwise (float32, or bf16 without AVX512-BF16): 8 queries x 16 keys of scores in 8 vector accumulators, then the
 *   softmax, then 4 queries x up to 64 features of output in vector accumulators.
 *
 * Arithmetic, per query row (as PyTorch's flash kernel, in float32; only the order of the sums differs):
 *   s_j = (q . k_j) * scale, plus the additive mask, or -inf where a boolean mask is false;
 *   p_j = exp(s_j - max s), 0 where s_j is -inf; out = (sum_j p'_j v_j) / sum_j p_j, rounded to the output's dtype
 *   once, where p'_j is p_j rounded to bf16 for bf16 inputs (as that kernel rounds them for its bf16 product);
 *   a row whose keys are all masked is 0 (as PyTorch's kernels give). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "activations.h"
#include "bfloat16.h"
#include "ternary_gemm.h"

#define ATTENTION_MAX_KEYS 512
#define ATTENTION_MAX_HEAD_DIM 256
#define LANES 16      /* keys are padded to whole vectors of 16 (32 for tiles); head_dim must be a multiple of 16 */
#define QUERY_BLOCK 8 /* query rows whose scores are computed together (8 accumulators per 16 keys) */
#define VALUE_ROWS 4  /* query rows whose weighted values are summed together, up to 4 vectors of features each */
#define TILE_ROWS 16  /* query rows per block on AMX tiles */

int attention_max_keys(void) { return ATTENTION_MAX_KEYS; }
int attention_max_head_dim(void) { return ATTENTION_MAX_HEAD_DIM; }

enum attention_mask_kind { MASK_NONE = 0, MASK_BOOL = 1, MASK_ADDITIVE = 2 };

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>

int attention_available(void) { return 1; }

/* The mask of a query row: kind, where its row starts (elements or bytes) and the stride between its keys. */
struct row_mask {
    const void *mask;
    int kind;
    int64_t base;
    int64_t key_stride;
};

/* Which of keys [key, key + 16) a row attends to (below `keys` and allowed by a boolean mask), and the additive mask's
 * values of them (0 elsewhere). */
static inline __mmask16 attended_keys(const struct row_mask *mask, int64_t key, int64_t keys, int in_bfloat16,
                                      __m512 *added) {
    __mmask16 attended = keys - key >= LANES ? 0xffff : (keys > key ? (__mmask16)((1u << (keys - key)) - 1) : 0);
    *added = _mm512_setzero_ps();
    if (mask->kind == MASK_BOOL) {
        const uint8_t *allowed = (const uint8_t *)mask->mask + mask->base + key * mask->key_stride;
        __mmask16 allowed_bits = 0;
        if (mask->key_stride == 1 && keys - key >= LANES)
            allowed_bits = _mm_cmpneq_epi8_mask(_mm_loadu_si128((const __m128i *)allowed), _mm_setzero_si128());
        else
            for (int64_t j = 0; j < LANES && key + j < keys; ++j)
                allowed_bits |= (__mmask16)((allowed[j * mask->key_stride] != 0) << j);
        attended &= allowed_bits;
    } else if (mask->kind == MASK_ADDITIVE) {
        float values[LANES] = {0};
        for (int64_t j = 0; j < LANES && key + j < keys; ++j) {
            const int64_t at = mask->base + (key + j) * mask->key_stride;
            values[j] = load_value(mask->mask, at, in_bfloat16);
        }
        *added = _mm512_loadu_ps(values);
    }
    return attended;
}

/* A query row's softmax: its dot products with the keys (row, padded_keys values) scaled and masked, then the
 * weights exp(s_j - max s) (0 for masked keys and the padding) written over them as float32, rounded to bf16 for
 * bf16 inputs, or, with weights_bfloat16, as bf16 bits there. Returns the sum of the unrounded weights. */
static float row_weights(float *row, int64_t padded_keys, int64_t keys, float scale, const struct row_mask *mask,
                         int in_bfloat16, uint16_t *weights_bfloat16) {
    __m512 highest = _mm512_set1_ps(-INFINITY);
    __mmask16 unordered = 0;
    for (int64_t key = 0; key < padded_keys; key += LANES) {
        __m512 added;
        __mmask16 attended = attended_keys(mask, key, keys, in_bfloat16, &added);
        const __m512 score = _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(row + key), _mm512_set1_ps(scale)), added);
        attended &= _mm512_cmp_ps_mask(score, _mm512_set1_ps(-INFINITY), _CMP_NEQ_UQ); /* a NaN stays attended */
        unordered |= _mm512_mask_cmp_ps_mask(attended, score, score, _CMP_UNORD_Q);
        const __m512 kept = _mm512_mask_blend_ps(attended, _mm512_set1_ps(-INFINITY), score);
        _mm512_storeu_ps(row + key, kept);
        highest = _mm512_max_ps(highest, kept);
    }
    /* a NaN score (a NaN or an infinity in the row's query or an attended key) makes every weight and output of the
     * row NaN, as PyTorch's softmax does: never a finite row that silently left a key out */
    const float row_max = unordered ? NAN : _mm512_reduce_max_ps(highest);
    __m512 total = _mm512_setzero_ps();
    for (int64_t key = 0; key < padded_keys; key += LANES) {
        const __m512 score = _mm512_loadu_ps(row + key);
        const __mmask16 attended = _mm512_cmp_ps_mask(score, _mm512_set1_ps(-INFINITY), _CMP_NEQ_UQ);
        /* all keys masked: every weight is 0 (and the row's output with them) */
        const __m512 weight = row_max == -INFINITY
                                  ? _mm512_setzero_ps()
                                  : _mm512_maskz_mov_ps(attended, exp_512(_mm512_sub_ps(score, _mm512_set1_ps(row_max))));
        total = _mm512_add_ps(total, weight);
        if (weights_bfloat16 != NULL) {
            /* a weight is 0 or at least exp(-87) (exp_512's clamp): a normal float, rounded as PyTorch rounds it */
            store_bfloat16_512(weights_bfloat16 + key, weight);
        } else {
            _mm512_storeu_ps(row + key, in_bfloat16 ? bfloat16_rounded_512(weight) : weight);
        }
    }
    return _mm512_reduce_add_ps(total);
}

/* 16 float32 outputs times `inverse`, stored in the output's dtype at out + at. */
static inline void store_outputs(__m512 sums, float inverse, void *out, int64_t at, int in_bfloat16) {
    const __m512 result = _mm512_mul_ps(sums, _mm512_set1_ps(inverse));
    if (in_bfloat16)
        store_bfloat16_512((uint16_t *)out + at, result);
    else
        _mm512_storeu_ps((float *)out + at, result);
}

/* --- vector path ------------------------------------------------------------------------------------------------ */

/* The dot products of a block's QUERY_BLOCK rows (query_rows, float32) with the first `scored` keys (a multiple of
 * LANES) of keys_t ([head_dim][padded_keys]), into scores (QUERY_BLOCK rows of padded_keys). Constant row counts keep
 * the accumulators in registers. */
static void block_scores(const float *query_rows, const float *keys_t, int64_t padded_keys, int64_t scored,
                         int64_t head_dim, float *scores) {
    for (int64_t key = 0; key < scored; key += LANES) {
        __m512 sums[QUERY_BLOCK];
        for (int r = 0; r < QUERY_BLOCK; ++r) sums[r] = _mm512_setzero_ps();
        for (int64_t d = 0; d < head_dim; ++d) {
            const __m512 column = _mm512_loadu_ps(keys_t + d * padded_keys + key);
            for (int r = 0; r < QUERY_BLOCK; ++r)
                sums[r] = _mm512_fmadd_ps(_mm512_set1_ps(query_rows[r * head_dim + d]), column, sums[r]);
        }
        for (int r = 0; r < QUERY_BLOCK; ++r) _mm512_storeu_ps(scores + r * padded_keys + key, sums[r]);
    }
}

/* Output rows [first, first + VALUE_ROWS) of a block, features [feature, feature + vectors * LANES): the weights
 * (scores, rows of padded_keys) times the values, over the totals; only rows below `rows` are written. Inlined with
 * `vectors` a constant, so that the VALUE_ROWS x vectors accumulators stay in registers. */
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
        const float inverse = totals[first + r] > 0.0f ? 1.0f / totals[first + r] : 0.0f;
        for (int v = 0; v < vectors; ++v)
            store_outputs(sums[r][v], inverse, out, row_out_bases[first + r] + feature + v * LANES, in_bfloat16);
    }
}

/* 16 rows of 16 32-bit values transposed in registers: rows[p] then holds value p of every row. */
static inline void transpose_16x16(__m512i rows[LANES]) {
    __m512i pairs[LANES], quads[LANES];
    for (int i = 0; i < LANES; i += 2) { /* in each 128-bit lane: values 0, 1 (lo) or 2, 3 (hi) of rows i, i + 1 */
        pairs[i] = _mm512_unpacklo_epi32(rows[i], rows[i + 1]);
        pairs[i + 1] = _mm512_unpackhi_epi32(rows[i], rows[i + 1]);
    }
    for (int g = 0; g < LANES; g += 4) /* quads[g + c], lane l: value 4 l + c of rows g .. g + 3 */
        for (int half = 0; half < 2; ++half) {
            quads[g + 2 * half] = _mm512_unpacklo_epi64(pairs[g + half], pairs[g + 2 + half]);
            quads[g + 2 * half + 1] = _mm512_unpackhi_epi64(pairs[g + half], pairs[g + 2 + half]);
        }
    for (int c = 0; c < 4; ++c) { /* value 4 l + c of all rows: lane l of quads[c], [4 + c], [8 + c], [12 + c] */
        const __m512i even = _mm512_shuffle_i32x4(quads[c], quads[4 + c], 0x88);
        const __m512i odd = _mm512_shuffle_i32x4(quads[c], quads[4 + c], 0xdd);
        const __m512i even_high = _mm512_shuffle_i32x4(quads[8 + c], quads[12 + c], 0x88);
        const __m512i odd_high = _mm512_shuffle_i32x4(quads[8 + c], quads[12 + c], 0xdd);
        rows[c] = _mm512_shuffle_i32x4(even, even_high, 0x88);
        rows[8 + c] = _mm512_shuffle_i32x4(even, even_high, 0xdd);
        rows[4 + c] = _mm512_shuffle_i32x4(odd, odd_high, 0x88);
        rows[12 + c] = _mm512_shuffle_i32x4(odd, odd_high, 0xdd);
    }
}

/* Keys j .. j + 15 (0 from `keys` on), features d .. d + 2 count - 1 of each as `count` (at most 16) pairs of bf16
 * values, transposed: rows[p] then holds pair p of the 16 keys, as vdpbf16ps and the bf16 tiles multiply them. */
static inline void key_feature_pairs(const uint16_t *key, int64_t key_base, int64_t key_stride, int64_t j, int64_t keys,
                                     int64_t d, int64_t count, __m512i rows[LANES]) {
    const __mmask16 features = (__mmask16)((1u << count) - 1);
    for (int k = 0; k < LANES; ++k)
        rows[k] = j + k < keys ? _mm512_maskz_loadu_epi32(features, key + key_base + (j + k) * key_stride + d)
                               : _mm512_setzero_si512();
    transpose_16x16(rows);
}

/* The 16 bf16 values from feature d on of keys `even` and `even + 1` (0 from `keys` on), interleaved: pairs of keys,
 * as vdpbf16ps and the bf16 tiles multiply them by pairs of weights. */
static inline __m512i value_key_pairs(const uint16_t *value, int64_t value_base, int64_t value_stride, int64_t even,
                                      int64_t keys, int64_t d) {
    /* vpermw index: the 16 values of one key (lanes 0-15) and of the next (16-31) interleaved */
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                                22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const uint16_t *first = value + value_base + even * value_stride + d;
    const __m256i one = even < keys ? _mm256_loadu_si256((const __m256i *)first) : _mm256_setzero_si256();
    const __m256i next =
        even + 1 < keys ? _mm256_loadu_si256((const __m256i *)(first + value_stride)) : _mm256_setzero_si256();
    return _mm512_permutexvar_epi16(interleave, _mm512_inserti64x4(_mm512_castsi256_si512(one), next, 1));
}

/* A pair's keys ([head_dim][padded_keys], float32) and values ([keys][head_dim]) as the vectors read them. */
static void lay_out_floats(const void *key, const void *value, int64_t keys, int64_t padded_keys, int64_t head_dim,
                           int64_t key_base, int64_t key_stride, int64_t value_base, int64_t value_stride,
                           int in_bfloat16, float *keys_t, float *values) {
    for (int64_t j = 0; j < padded_keys; j += LANES) /* 16 keys x 16 features at a time */
        for (int64_t d = 0; d < head_dim; d += LANES) {
            __m512i rows[LANES];
            for (int k = 0; k < LANES; ++k) {
                const __m512 values = j + k < keys ? load_16(key, key_base + (j + k) * key_stride + d, in_bfloat16)
                                                   : _mm512_setzero_ps();
                rows[k] = _mm512_castps_si512(values);
            }
            transpose_16x16(rows); /* rows[f]: feature d + f of the 16 keys */
            for (int f = 0; f < LANES; ++f) _mm512_storeu_si512(keys_t + (d + f) * padded_keys + j, rows[f]);
        }
    for (int64_t j = 0; j < keys; ++j)
        for (int64_t d = 0; d < head_dim; d += LANES)
            _mm512_storeu_ps(values + j * head_dim + d, load_16(value, value_base + j * value_stride + d, in_bfloat16));
}

#if defined(__AVX512BF16__)
/* bf16 pairs, where the CPU has AVX512-BF16 but the tiles do not apply (no AMX, or heads of 16 or 48 features):
 * vdpbf16ps multiplies 16 pairs of bf16 values exactly in float32 and adds both products to 16 float32 sums, half the
 * instructions of widening to float32 and one fma per product (the same arithmetic as the float path and as PyTorch's
 * flash kernel, only the order of the sums differs; like the AMX tiles it takes denormal inputs as 0). */
static int bfloat16_pairs = 1; /* attention_set_bfloat16_pairs */

/* 16 sums += the 16 pairs of `pairs` times the one pair (two bf16 values) at `pair`, as float32. */
static inline __m512 add_pair_products(__m512 sums, const uint16_t *pair, __m512i pairs) {
    uint32_t both;
    memcpy(&both, pair, 4);
    return _mm512_dpbf16_ps(sums, (__m512bh)_mm512_set1_epi32((int32_t)both), (__m512bh)pairs);
}

/* A pair's keys as pairs of features ([head_dim / 2][padded_keys][2]) and values as pairs of keys ([padded_keys / 2]
 * [head_dim][2]), bf16, the padding 0. */
static void lay_out_pairs(const uint16_t *key, const uint16_t *value, int64_t keys, int64_t padded_keys,
                          int64_t head_dim, int64_t key_base, int64_t key_stride, int64_t value_base,
                          int64_t value_stride, uint16_t *key_pairs, uint16_t *value_pairs) {
    for (int64_t j = 0; j < padded_keys; j += LANES) /* 16 keys x up to 16 pairs of features at a time */
        for (int64_t d = 0; d < head_dim; d += 2 * LANES) {
            const int64_t count = head_dim - d < 2 * LANES ? (head_dim - d) / 2 : LANES; /* 8 or 16 pairs */
            __m512i rows[LANES];
            key_feature_pairs(key, key_base, key_stride, j, keys, d, count, rows);
            for (int64_t p = 0; p < count; ++p)
                _mm512_storeu_si512(key_pairs + ((d / 2 + p) * padded_keys + j) * 2, rows[p]);
        }
    for (int64_t j = 0; j < padded_keys; j += 2)
        for (int64_t d = 0; d < head_dim; d += LANES)
            _mm512_storeu_si512(value_pairs + (j / 2 * head_dim + d) * 2,
                                value_key_pairs(value, value_base, value_stride, j, keys, d));
}

/* block_scores on bf16 queries ([QUERY_BLOCK][head_dim]) and keys as pairs of features. */
static void pair_block_scores(const uint16_t *query_rows, const uint16_t *key_pairs, int64_t padded_keys,
                              int64_t scored, int64_t head_dim, float *scores) {
    for (int64_t key = 0; key < scored; key += LANES) {
        __m512 sums[QUERY_BLOCK];
        for (int r = 0; r < QUERY_BLOCK; ++r) sums[r] = _mm512_setzero_ps();
        for (int64_t d = 0; d < head_dim; d += 2) {
            const __m512i column = _mm512_loadu_si512(key_pairs + (d / 2 * padded_keys + key) * 2);
            for (int r = 0; r < QUERY_BLOCK; ++r)
                sums[r] = add_pair_products(sums[r], query_rows + r * head_dim + d, column);
        }
        for (int r = 0; r < QUERY_BLOCK; ++r) _mm512_storeu_ps(scores + r * padded_keys + key, sums[r]);
    }
}

/* value_rows from the bf16 weights (rows of padded_keys) and the values as pairs of keys, written in bf16. */
static inline __attribute__((always_inline)) void pair_value_rows(const uint16_t *weights, int64_t first, int64_t rows,
                                                                  const float *totals, const uint16_t *value_pairs,
                                                                  int64_t padded_keys, int64_t keys, int64_t head_dim,
                                                                  int64_t feature, int vectors, void *out,
                                                                  const int64_t *row_out_bases) {
    __m512 sums[VALUE_ROWS][4];
    for (int r = 0; r < VALUE_ROWS; ++r)
        for (int v = 0; v < vectors; ++v) sums[r][v] = _mm512_setzero_ps();
    for (int64_t key = 0; key < keys; key += 2) { /* a padding key's weight and value are 0 */
        const uint16_t *pair_row = value_pairs + (key * head_dim + 2 * feature);
        __m512i value_vectors[4];
        for (int v = 0; v < vectors; ++v) value_vectors[v] = _mm512_loadu_si512(pair_row + v * 2 * LANES);
        for (int r = 0; r < VALUE_ROWS; ++r)
            for (int v = 0; v < vectors; ++v)
                sums[r][v] = add_pair_products(sums[r][v], weights + (first + r) * padded_keys + key, value_vectors[v]);
    }
    for (int r = 0; r < VALUE_ROWS; ++r) {
        if (first + r >= rows) break;
        const float inverse = totals[first + r] > 0.0f ? 1.0f / totals[first + r] : 0.0f;
        for (int v = 0; v < vectors; ++v)
            store_outputs(sums[r][v], inverse, out, row_out_bases[first + r] + feature + v * LANES, 1);
    }
}
#endif

/* Where a pair's work lives in its thread's buffer (within vector_buffer_floats floats). Floats: keys transposed
 * ([head_dim][padded_keys]), values ([keys][head_dim]), the block's queries ([QUERY_BLOCK][head_dim]) and scores,
 * whose weights are written over them. bf16 pairs (uint16 unless said): keys and values as pairs ([head_dim / 2]
 * [padded_keys][2], [padded_keys / 2][head_dim][2]), the block's queries, scores (float) and their weights in bf16
 * ([QUERY_BLOCK][padded_keys]). */
struct vector_buffers {
    void *keys, *values, *query_rows, *weights;
    float *scores;
};

static struct vector_buffers vector_buffers(float *buffer, int64_t padded_keys, int64_t head_dim, int bf16_pairs) {
    const int64_t element = bf16_pairs ? 2 : 4;
    char *at = (char *)buffer;
    struct vector_buffers buffers = {.keys = at, .values = at + element * padded_keys * head_dim};
    buffers.query_rows = at + 2 * element * padded_keys * head_dim;
    buffers.scores = (float *)((char *)buffers.query_rows + element * QUERY_BLOCK * head_dim);
    buffers.weights = bf16_pairs ? (void *)(buffers.scores + QUERY_BLOCK * padded_keys) : (void *)buffers.scores;
    return buffers;
}

/* Output rows [group, group + VALUE_ROWS) of a block, features from `feature` on (vectors of them: a constant where
 * inlined), from bf16 pairs or float32 values as vector_pair laid them out. */
static inline __attribute__((always_inline)) void block_values(const struct vector_buffers *buffers, int bf16_pairs,
                                                               int64_t group, int64_t rows, const float *totals,
                                                               int64_t padded_keys, int64_t keys, int64_t head_dim,
                                                               int64_t feature, int vectors, void *out,
                                                               const int64_t *out_bases, int in_bfloat16) {
#if defined(__AVX512BF16__)
    if (bf16_pairs) {
        pair_value_rows(buffers->weights, group, rows, totals, buffers->values, padded_keys, keys, head_dim, feature,
                        vectors, out, out_bases);
        return;
    }
#endif
    (void)bf16_pairs;
    value_rows(buffers->scores, group, rows, totals, buffers->values, padded_keys, keys, head_dim, feature, vectors,
               out, out_bases, in_bfloat16);
}

/* One pair on vectors: float32 values, or bf16 ones widened to float32 or (bf16_pairs) multiplied as bf16 pairs.
 * causal: the mask masks every key after a query's own position (keys - queries ahead of its index), so a block of
 * queries scores, weighs and sums only the keys up to its last row's: the same sums, the masked keys' weights being 0. */
static void vector_pair(const void *query, const void *key, const void *value, int64_t queries, int64_t keys,
                        int64_t head_dim, int64_t query_base, int64_t query_stride, int64_t key_base,
                        int64_t key_stride, int64_t value_base, int64_t value_stride, struct row_mask mask,
                        int64_t mask_query_stride, void *out, int64_t out_base, int64_t out_stride, int in_bfloat16,
                        int bf16_pairs, int causal, float scale, float *buffer) {
    const int64_t padded_keys = (keys + LANES - 1) / LANES * LANES;
    const struct vector_buffers buffers = vector_buffers(buffer, padded_keys, head_dim, bf16_pairs);
#if defined(__AVX512BF16__)
    if (bf16_pairs)
        lay_out_pairs(key, value, keys, padded_keys, head_dim, key_base, key_stride, value_base, value_stride,
                      buffers.keys, buffers.values);
    else
#endif
        lay_out_floats(key, value, keys, padded_keys, head_dim, key_base, key_stride, value_base, value_stride,
                       in_bfloat16, buffers.keys, buffers.values);
    for (int64_t first = 0; first < queries; first += QUERY_BLOCK) {
        const int64_t rows = queries - first < QUERY_BLOCK ? queries - first : QUERY_BLOCK;
        const int64_t seen = first + rows + keys - queries; /* keys up to the block's last row's position */
        const int64_t block_keys = causal && seen < keys ? (seen > 1 ? seen : 1) : keys;
        const int64_t scored = (block_keys + LANES - 1) / LANES * LANES;
        int64_t out_bases[QUERY_BLOCK];
        float totals[QUERY_BLOCK];
        for (int64_t r = 0; r < QUERY_BLOCK; ++r) {
            const int64_t i = first + (r < rows ? r : 0); /* rows past the end repeat the first */
            if (bf16_pairs)
                memcpy((uint16_t *)buffers.query_rows + r * head_dim,
                       (const uint16_t *)query + query_base + i * query_stride, 2 * head_dim);
            else
                for (int64_t d = 0; d < head_dim; d += LANES)
                    _mm512_storeu_ps((float *)buffers.query_rows + r * head_dim + d,
                                     load_16(query, query_base + i * query_stride + d, in_bfloat16));
            out_bases[r] = out_base + i * out_stride;
        }
#if defined(__AVX512BF16__)
        if (bf16_pairs)
            pair_block_scores(buffers.query_rows, buffers.keys, padded_keys, scored, head_dim, buffers.scores);
        else
#endif
            block_scores(buffers.query_rows, buffers.keys, padded_keys, scored, head_dim, buffers.scores);
        for (int64_t r = 0; r < QUERY_BLOCK; ++r) {
            struct row_mask row_mask = mask;
            row_mask.base += (first + (r < rows ? r : 0)) * mask_query_stride;
            uint16_t *weights = bf16_pairs ? (uint16_t *)buffers.weights + r * padded_keys : NULL;
            totals[r] = row_weights(buffers.scores + r * padded_keys, scored, block_keys, scale, &row_mask,
                                    in_bfloat16, weights);
        }
        for (int64_t group = 0; group < rows; group += VALUE_ROWS)
            for (int64_t feature = 0; feature < head_dim; feature += 4 * LANES) {
                const int64_t left = (head_dim - feature) / LANES;
                const int vectors = left >= 4 ? 4 : (int)left;
                if (vectors == 4)
                    block_values(&buffers, bf16_pairs, group, rows, totals, padded_keys, block_keys, head_dim, feature, 4,
                                 out, out_bases, in_bfloat16);
                else if (vectors == 3)
                    block_values(&buffers, bf16_pairs, group, rows, totals, padded_keys, block_keys, head_dim, feature, 3,
                                 out, out_bases, in_bfloat16);
                else if (vectors == 2)
                    block_values(&buffers, bf16_pairs, group, rows, totals, padded_keys, block_keys, head_dim, feature, 2,
                                 out, out_bases, in_bfloat16);
                else
                    block_values(&buffers, bf16_pairs, group, rows, totals, padded_keys, block_keys, head_dim, feature, 1,
                                 out, out_bases, in_bfloat16);
            }
    }
}

/* Whether bf16 heads off the tiles multiply bf16 pairs (1: the default where the build has AVX512-BF16) or float32
 * values widened from them (0); returns the previous setting, -1 where the build has no pairs: for tests and
 * benchmarks of either path. */
int attention_set_bfloat16_pairs(int enabled) {
#if defined(__AVX512BF16__)
    const int previous = bfloat16_pairs;
    bfloat16_pairs = enabled;
    return previous;
#else
    (void)enabled;
    return -1;
#endif
}

static size_t vector_buffer_floats(int64_t keys, int64_t head_dim) {
    const int64_t padded_keys = (keys + LANES - 1) / LANES * LANES;
    return (size_t)(2 * padded_keys * head_dim + QUERY_BLOCK * (head_dim + padded_keys));
}

/* --- AMX path (bf16) -------------------------------------------------------------------------------------------- */

#if defined(__AMX_BF16__) && defined(__AMX_INT8__) && defined(__AMX_TILE__) && defined(__linux__)
#define ATTENTION_AMX 1
/* Tiles (amx_begin's configuration: 16 rows of 64 bytes each): scores 0 and 3 (two blocks of keys) from queries 1
 * and keys 2 and 5; outputs 3 and 6 (two blocks of features) from weights 4 and values 5 and 7. */

/* Keys padded to 32 for the tiles: buffer bytes of a pair (uint16 unless said): keys as tiles
 * ([padded / 16][head_dim / 32][16 pairs of features][16 keys x 2]), values as tiles ([padded / 32][head_dim / 16][16
 * pairs of keys][16 features x 2]), a block's queries ([16][head_dim]), scores (float [16][padded]), weights
 * ([16][padded]) and two tiles of outputs side by side (float [16][32]). */
static size_t amx_buffer_bytes(int64_t keys, int64_t head_dim) {
    const int64_t padded = (keys + 31) / 32 * 32;
    return (size_t)(2 * (2 * padded * head_dim + TILE_ROWS * head_dim + TILE_ROWS * padded) +
                    4 * (TILE_ROWS * padded + TILE_ROWS * 2 * LANES));
}

static void amx_pair(const uint16_t *query, const uint16_t *key, const uint16_t *value, int64_t queries,
                     int64_t keys, int64_t head_dim, int64_t query_base, int64_t query_stride, int64_t key_base,
                     int64_t key_stride, int64_t value_base, int64_t value_stride, struct row_mask mask,
                     int64_t mask_query_stride, uint16_t *out, int64_t out_base, int64_t out_stride, float scale,
                     uint8_t *buffer) {
    const int64_t padded = (keys + 31) / 32 * 32, chunks = head_dim / 32, feature_blocks = head_dim / LANES;
    uint16_t *key_tiles = (uint16_t *)buffer, *value_tiles = key_tiles + padded * head_dim;
    uint16_t *query_rows = value_tiles + padded * head_dim, *weights = query_rows + TILE_ROWS * head_dim;
    float *scores = (float *)(weights + TILE_ROWS * padded), *outputs = scores + TILE_ROWS * padded;
    /* keys: tile (block of 16 keys, chunk of 32 features), row p, key j holds features 2p, 2p + 1 of key j: the
     * block's rows as 16 x 16 pairs of features, transposed */
    for (int64_t block = 0; block < padded / LANES; ++block)
        for (int64_t chunk = 0; chunk < chunks; ++chunk) {
            __m512i rows[LANES];
            key_feature_pairs(key, key_base, key_stride, block * LANES, keys, chunk * 32, LANES, rows);
            uint16_t *tile = key_tiles + (block * chunks + chunk) * 512;
            for (int p = 0; p < LANES; ++p) _mm512_storeu_si512(tile + p * 32, rows[p]);
        }
    /* values: tile (block of 32 keys, 16 features), row p holds keys 2p and 2p + 1 of each feature, interleaved */
    for (int64_t block = 0; block < padded / 32; ++block)
        for (int64_t feature_block = 0; feature_block < feature_blocks; ++feature_block) {
            uint16_t *tile = value_tiles + (block * feature_blocks + feature_block) * 512;
            for (int p = 0; p < LANES; ++p)
                _mm512_storeu_si512(tile + p * 32, value_key_pairs(value, value_base, value_stride, block * 32 + 2 * p,
                                                                   keys, feature_block * LANES));
        }
    for (int64_t first = 0; first < queries; first += TILE_ROWS) {
        const int64_t rows = queries - first < TILE_ROWS ? queries - first : TILE_ROWS;
        for (int64_t r = 0; r < TILE_ROWS; ++r) {
            if (r < rows) memcpy(query_rows + r * head_dim, query + query_base + (first + r) * query_stride, 2 * head_dim);
            else memset(query_rows + r * head_dim, 0, 2 * head_dim);
        }
        for (int64_t block = 0; block < padded / LANES; block += 2) { /* two blocks of keys: two sums in flight */
            _tile_zero(0);
            _tile_zero(3);
            for (int64_t chunk = 0; chunk < chunks; ++chunk) {
                load_tile(1, query_rows + chunk * 32, 2 * head_dim);
                load_tile(2, key_tiles + (block * chunks + chunk) * 512, 64);
                _tile_dpbf16ps(0, 1, 2);
                load_tile(5, key_tiles + ((block + 1) * chunks + chunk) * 512, 64);
                _tile_dpbf16ps(3, 1, 5);
            }
            _tile_stored(0, scores + block * LANES, 4 * padded);
            _tile_stored(3, scores + (block + 1) * LANES, 4 * padded);
        }
        __asm__ volatile("" ::: "memory"); /* the tile stores happen before the scores are read (see load_tile) */
        float totals[TILE_ROWS];
        for (int64_t r = 0; r < rows; ++r) {
            struct row_mask row_mask = mask;
            row_mask.base += (first + r) * mask_query_stride;
            totals[r] = row_weights(scores + r * padded, padded, keys, scale, &row_mask, 1, weights + r * padded);
        }
        for (int64_t r = rows; r < TILE_ROWS; ++r) memset(weights + r * padded, 0, 2 * padded);
        for (int64_t feature_block = 0; feature_block < feature_blocks; feature_block += 2) { /* two sums in flight */
            _tile_zero(3);
            _tile_zero(6);
            for (int64_t block = 0; block < padded / 32; ++block) {
                load_tile(4, weights + block * 32, 2 * padded);
                load_tile(5, value_tiles + (block * feature_blocks + feature_block) * 512, 64);
                _tile_dpbf16ps(3, 4, 5);
                load_tile(7, value_tiles + (block * feature_blocks + feature_block + 1) * 512, 64);
                _tile_dpbf16ps(6, 4, 7);
            }
            _tile_stored(3, outputs, 128);
            _tile_stored(6, outputs + LANES, 128);
            __asm__ volatile("" ::: "memory");
            for (int64_t r = 0; r < rows; ++r)
                for (int half = 0; half < 2; ++half)
                    store_outputs(_mm512_loadu_ps(outputs + r * 2 * LANES + half * LANES),
                                  totals[r] > 0.0f ? 1.0f / totals[r] : 0.0f, out,
                                  out_base + (first + r) * out_stride + (feature_block + half) * LANES, 1);
        }
    }
}
#endif

/* Whether bf16 attention over heads of head_dim features runs on AMX tiles here. */
int attention_tiles(int64_t head_dim) {
#if defined(ATTENTION_AMX)
    return head_dim % 32 == 0 && head_dim <= ATTENTION_MAX_HEAD_DIM && ternary_gemm_amx_available();
#else
    return 0;
#endif
}

/* out[b, h, i, :] = attention of query row i of head h of sequence b over the keys and values of key head
 * h / (heads / key_heads) (grouped-query attention; key_heads = heads: each head its own).
 * query, key, value and out: float32 or bfloat16 (all one dtype), addressed by strides in elements of (sequence, head,
 * position), the last dimension (head_dim features, a multiple of 16) contiguous; mask (NULL with MASK_NONE): bool
 * bytes or additive values of the query's dtype, addressed by strides of (sequence, head, query, key), 0 for a
 * broadcast dimension; causal: the mask masks every key after a query's position (keys - queries ahead of its index),
 * which the vector path then skips (a hint: the mask alone decides what is attended). Returns 0, or -1 where the
 * sizes are not ones the kernel takes or a buffer cannot be allocated. */
int attention(const void *query, const void *key, const void *value, const void *mask, void *out, int64_t batch,
              int64_t heads, int64_t key_heads, int64_t queries, int64_t keys, int64_t head_dim,
              const int64_t *query_strides, const int64_t *key_strides, const int64_t *value_strides,
              const int64_t *mask_strides, const int64_t *out_strides, int in_bfloat16, int mask_kind, int causal,
              float scale, int threads) {
    if (keys < 1 || keys > ATTENTION_MAX_KEYS || head_dim < LANES || head_dim > ATTENTION_MAX_HEAD_DIM ||
        head_dim % LANES != 0 || key_heads < 1 || heads % key_heads != 0)
        return -1;
    const int64_t pairs = batch * heads, heads_per_key = heads / key_heads;
#if defined(__AVX512BF16__)
    const int bf16_pairs = in_bfloat16 && bfloat16_pairs;
#else
    const int bf16_pairs = 0;
#endif
#if defined(ATTENTION_AMX)
    const int use_amx = in_bfloat16 && attention_tiles(head_dim);
    const size_t buffer_bytes = use_amx ? amx_buffer_bytes(keys, head_dim) : 4 * vector_buffer_floats(keys, head_dim);
#else
    const size_t buffer_bytes = 4 * vector_buffer_floats(keys, head_dim);
#endif
    int failed = 0;
#pragma omp parallel num_threads(threads) if (pairs * queries * keys * head_dim >= (1 << 16))
    {
        void *buffer = aligned_alloc(64, (buffer_bytes + 63) / 64 * 64);
        if (buffer == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
#if defined(ATTENTION_AMX)
            if (use_amx) amx_begin(); /* the tile configuration is each thread's own */
#endif
#pragma omp for schedule(static)
            for (int64_t pair = 0; pair < pairs; ++pair) {
                const int64_t b = pair / heads, h = pair % heads;
                const struct row_mask row_mask = {mask, mask_kind, b * mask_strides[0] + h * mask_strides[1],
                                                  mask_strides[3]};
                const int64_t query_base = b * query_strides[0] + h * query_strides[1];
                const int64_t key_base = b * key_strides[0] + h / heads_per_key * key_strides[1];
                const int64_t value_base = b * value_strides[0] + h / heads_per_key * value_strides[1];
                const int64_t out_base = b * out_strides[0] + h * out_strides[1];
#if defined(ATTENTION_AMX)
                if (use_amx) {
                    amx_pair(query, key, value, queries, keys, head_dim, query_base, query_strides[2], key_base,
                             key_strides[2], value_base, value_strides[2], row_mask, mask_strides[2], out, out_base,
                             out_strides[2], scale, buffer);
                    continue;
                }
#endif
                vector_pair(query, key, value, queries, keys, head_dim, query_base, query_strides[2], key_base,
                            key_strides[2], value_base, value_strides[2], row_mask, mask_strides[2], out, out_base,
                            out_strides[2], in_bfloat16, bf16_pairs, causal, scale, buffer);
            }
#if defined(ATTENTION_AMX)
            if (use_amx) amx_end();
#endif
        }
        free(buffer);
    }
    return failed ? -1 : 0;
}

#else

int attention_available(void) { return 0; }

int attention_tiles(int64_t head_dim) { return 0; }

int attention_set_bfloat16_pairs(int enabled) { return -1; }

int attention(const void *query, const void *key, const void *value, const void *mask, void *out, int64_t batch,
              int64_t heads, int64_t key_heads, int64_t queries, int64_t keys, int64_t head_dim,
              const int64_t *query_strides, const int64_t *key_strides, const int64_t *value_strides,
              const int64_t *mask_strides, const int64_t *out_strides, int in_bfloat16, int mask_kind, int causal,
              float scale, int threads) {
    return -1;
}

#endif
