/* AMX tiles for ternary_gemm.c's 2-bit weights: the integer products, on CPUs with AMX-INT8.
 *
 * Why: one AMX tile product (tdpbusd) multiplies 16 rows x 64 uint8 codes by 64 x 16 int8 weights, 16,384
 * multiply-adds, where vpdpbusd does 64: per core about four times the integer throughput of AVX512-VNNI, and twice
 * what the same tiles do in bf16 (the teacher's matmul on such a CPU).
 *
 * The weights stay at 2 bits in memory; the tiles want int8 weights. Batches (amx_row_pair_sums): each thread unpacks
 * the two panels it works on (96 outputs; the 2-bit layout's panels are 48) into a buffer of its own, once per block
 * of up to AMX_BLOCK_ROWS rows (ternary_gemm.c), which then serves every 32 rows of the block from cache: 2 x 2 tiles
 * of 16 rows x 16 outputs, whose codes stay in L1 while the outputs pass. A short query, whose GEMMs read each weight
 * for a few tiles of codes: the weights are streamed, 64 inputs of the panels unpacked into L1 and used at once, by
 * one tile of 16 rows for two panels (amx_few_rows_sums) or by two for one panel (amx_few_rows_pair_sums): in probes
 * while developing, the tile products and the vector unpacking (its stores above all) did not run in parallel, so
 * each unpacked weight serves as many rows as the tiles allow. Both paths beat AVX512-VNNI at every number of rows
 * (benchmarks/kernel_speed.py): with one vpdpbusd per cycle on such a CPU, 16 tokens already make the AVX512-VNNI
 * kernel wait on arithmetic. The products are exact: uint8 codes (signed + 128) x weight codes in {-1, 0, 1}, summed
 * in int32; ternary_gemm.c takes the zero point back out (128 x column sums) and rescales.
 *
 * The process asks Linux once for the tile state (arch_prctl(ARCH_REQ_XCOMP_PERM)); where that is refused (an older
 * kernel, a hypervisor without AMX), ternary_gemm_amx_available() says so and the AVX512-VNNI kernel runs. */
#include <stdint.h>
#include <stdlib.h>

#include "ternary_gemm.h"

#if defined(__AMX_INT8__) && defined(__AMX_TILE__) && defined(__AVX512BW__) && defined(__linux__)
#include <immintrin.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

static int amx_permitted;
static pthread_once_t amx_request = PTHREAD_ONCE_INIT;
static void request_amx(void) { amx_permitted = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0; }

int ternary_gemm_amx_available(void) {
    pthread_once(&amx_request, request_amx);
    return amx_permitted;
}

/* palette 1, every tile 16 rows of 64 bytes: int32 sums of 16 rows x 16 outputs, uint8 codes of 16 rows x 64 inputs,
 * or int8 weights of 16 outputs (16 groups of 4 inputs x 16 outputs x 4). amx_row_pair_sums: tiles 0-3 sums of 2 x 2
 * blocks, 4-5 codes, 6-7 weights, each tile of codes and of weights serving two products; amx_few_rows_sums: 0-5
 * sums, 6 codes, 7 weights. */
struct tile_config {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} __attribute__((aligned(64)));

/* Static, not built on the stack: GCC 12 drops stores to a stack copy that only ldtilecfg reads. */
static const struct tile_config tile_config = {
    .palette = 1,
    .bytes_per_row = {64, 64, 64, 64, 64, 64, 64, 64},
    .rows = {16, 16, 16, 16, 16, 16, 16, 16},
};

void amx_begin(void) { _tile_loadconfig(&tile_config); }

void amx_end(void) { _tile_release(); }

static _Thread_local int8_t *unpacked;
static _Thread_local size_t unpacked_bytes;

/* One group of 16 inputs of a 2-bit panel (3 vectors of 64 bytes, codes + 1) as 4 rows of each of the panel's 3
 * column tiles: rows[1024 j + 64 s] holds step s of vector j, the codes minus 1. */
static inline void unpack_group(const uint8_t *group, int8_t *rows) {
    const __m512i three = _mm512_set1_epi8(3), one = _mm512_set1_epi8(1);
    for (int j = 0; j < 3; ++j) {
        const __m512i packed = _mm512_loadu_si512(group + 64 * j);
        for (int step = 0; step < 4; ++step) {
            const __m512i codes = _mm512_and_si512(_mm512_srli_epi16(packed, 2 * step), three);
            _mm512_storeu_si512(rows + j * 1024 + step * 64, _mm512_sub_epi8(codes, one));
        }
    }
}

/* `count` consecutive 2-bit panels (each [k_padded / 16][3][64], codes + 1) as the tiles read them: int8 codes
 * [k_padded / 64][3 * count][16][64], row r of column tile j of k-block b holding inputs 64b + 4r .. 64b + 4r + 3 of
 * outputs 16j .. 16j + 15 (4 bytes each), which is one step of one vector of the 2-bit layout. Returns NULL when the
 * buffer cannot grow. */
const int8_t *amx_unpack_panels(const uint8_t *panels, int64_t count, int64_t k_padded) {
    const int64_t tiles = 3 * count;
    const size_t needed = (size_t)(k_padded * 16 * tiles);
    if (needed > unpacked_bytes) {
        int8_t *grown = realloc(unpacked, needed);
        if (!grown) return NULL;
        unpacked = grown;
        unpacked_bytes = needed;
    }
    for (int64_t panel = 0; panel < count; ++panel) {
        const uint8_t *source = panels + panel * k_padded * 12; /* a panel: k_padded x 48 outputs at 2 bits */
        for (int64_t group = 0; group < k_padded / 16; ++group) /* 16 inputs: 4 rows of each of 3 tiles */
            unpack_group(source + group * 192,
                         unpacked + ((group / 4) * tiles + 3 * panel) * 1024 + (group % 4) * 4 * 64);
    }
    return unpacked;
}

/* sums[32][16 * tiles] (row stride sums_stride int32) = codes[32 rows][k_padded] . weights (an amx_unpack_panels
 * result of `tiles` column tiles, a multiple of 3), k_padded a multiple of 64; between amx_begin and amx_end. Column
 * tiles go in pairs; with an odd count the last one is paired with itself. */
void amx_row_pair_sums(const uint8_t *codes, int64_t code_stride, const int8_t *weights, int64_t tiles,
                       int64_t k_padded, int32_t *sums, int64_t sums_stride) {
    const uint8_t *second_codes = codes + 16 * code_stride;
    const int64_t stride_bytes = sums_stride * 4;
    for (int64_t j = 0; j < tiles; j += 2) {
        const int64_t other = j + 1 < tiles ? j + 1 : j;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t k = 0; k < k_padded; k += 64) {
            const int8_t *block = weights + (k / 64) * tiles * 1024;
            load_tile(4, codes + k, code_stride);
            load_tile(5, second_codes + k, code_stride);
            load_tile(6, block + j * 1024, 64);
            load_tile(7, block + other * 1024, 64);
            _tile_dpbusd(0, 4, 6);
            _tile_dpbusd(1, 4, 7);
            _tile_dpbusd(2, 5, 6);
            _tile_dpbusd(3, 5, 7);
        }
        _tile_stored(0, sums + 16 * j, stride_bytes);
        _tile_stored(2, sums + 16 * sums_stride + 16 * j, stride_bytes);
        if (other != j) {
            _tile_stored(1, sums + 16 * other, stride_bytes);
            _tile_stored(3, sums + 16 * sums_stride + 16 * other, stride_bytes);
        }
    }
}

#define UNPACK_AHEAD 4096 /* bytes of packed weights asked for ahead of the one being unpacked (as ternary_gemm.c) */

/* The 64 inputs of one 2-bit panel from `source` (4 groups of 16 inputs, 12 cache lines) as its 3 column tiles in
 * block, the lines UNPACK_AHEAD bytes further asked for meanwhile. */
static inline void unpack_panel_step(const uint8_t *source, int8_t *block) {
    for (int line = 0; line < 12; ++line)
        _mm_prefetch((const char *)source + UNPACK_AHEAD + 64 * line, _MM_HINT_T0);
    for (int group = 0; group < 4; ++group) unpack_group(source + group * 192, block + group * 4 * 64);
}

/* Sums tiles a, b, c += the codes in tile 6 . the 3 column tiles unpacked at `block` (through tile 7). Tile numbers
 * are literals: the intrinsics paste them into the instruction. */
#define THREE_PRODUCTS(a, b, c, block)    \
    do {                                  \
        load_tile(7, (block), 64);        \
        _tile_dpbusd(a, 6, 7);            \
        load_tile(7, (block) + 1024, 64); \
        _tile_dpbusd(b, 6, 7);            \
        load_tile(7, (block) + 2048, 64); \
        _tile_dpbusd(c, 6, 7);            \
    } while (0)

/* sums[16 rows][48 outputs] at `sums` (stride_bytes between rows) = sums tiles a, b, c. */
#define STORE_THREE(a, b, c, sums, stride_bytes)     \
    do {                                             \
        _tile_stored(a, (sums), (stride_bytes));      \
        _tile_stored(b, (sums) + 16, (stride_bytes)); \
        _tile_stored(c, (sums) + 32, (stride_bytes)); \
    } while (0)

static inline void zero_sums(void) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    _tile_zero(4);
    _tile_zero(5);
}

/* sums[16][48 * count] (row stride sums_stride int32) = codes[16 rows][k_padded] . `count` (1 or 2) consecutive
 * 2-bit panels, k_padded a multiple of 64; between amx_begin and amx_end. For a few rows (a short query), where each
 * weight serves one tile of codes: every 64 inputs of the panels are unpacked into an L1 buffer and used at once, the
 * weights read from memory once, and one tile of codes serves the 3 * count products (tiles 0-5: sums, 6: codes, 7:
 * weights). */
void amx_few_rows_sums(const uint8_t *codes, int64_t code_stride, const uint8_t *panels, int64_t count,
                       int64_t k_padded, int32_t *sums, int64_t sums_stride) {
    int8_t block[6 * 1024] __attribute__((aligned(64)));
    const int64_t panel_bytes = k_padded * 12;
    zero_sums();
    for (int64_t k = 0; k < k_padded; k += 64) {
        for (int64_t panel = 0; panel < count; ++panel)
            unpack_panel_step(panels + panel * panel_bytes + (k / 16) * 192, block + 3 * panel * 1024);
        load_tile(6, codes + k, code_stride);
        THREE_PRODUCTS(0, 1, 2, block);
        if (count == 2) THREE_PRODUCTS(3, 4, 5, block + 3072);
    }
    const int64_t stride_bytes = sums_stride * 4;
    STORE_THREE(0, 1, 2, sums, stride_bytes);
    if (count == 2) STORE_THREE(3, 4, 5, sums + 48, stride_bytes);
}

/* sums[32][48] (row stride sums_stride int32) = codes[32 rows][k_padded] . one 2-bit panel, as amx_few_rows_sums for
 * 17 to 32 rows: each 64 inputs of the panel are unpacked once for both tiles of 16 rows, where two calls of
 * amx_few_rows_sums would unpack every weight twice (tiles 0-5: sums of 2 x 3 blocks, 6: codes, 7: weights). */
void amx_few_rows_pair_sums(const uint8_t *codes, int64_t code_stride, const uint8_t *panel, int64_t k_padded,
                            int32_t *sums, int64_t sums_stride) {
    int8_t block[3 * 1024] __attribute__((aligned(64)));
    zero_sums();
    for (int64_t k = 0; k < k_padded; k += 64) {
        unpack_panel_step(panel + (k / 16) * 192, block);
        load_tile(6, codes + k, code_stride);
        THREE_PRODUCTS(0, 1, 2, block);
        load_tile(6, codes + 16 * code_stride + k, code_stride);
        THREE_PRODUCTS(3, 4, 5, block);
    }
    const int64_t stride_bytes = sums_stride * 4;
    STORE_THREE(0, 1, 2, sums, stride_bytes);
    STORE_THREE(3, 4, 5, sums + 16 * sums_stride, stride_bytes);
}
#else
int ternary_gemm_amx_available(void) { return 0; }
#endif
