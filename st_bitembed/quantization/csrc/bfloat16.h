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

#endif
