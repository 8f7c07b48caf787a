/* A 0-d value the decision kernels read (kernels_detect.c, kernels_ladder.c), as torch's .to()
 * reads it: dtype code 0 float32, 1 float64, 2 bfloat16 (_kernels/decision.py's _VALUE_CODE).
 * Every such value is exact in double, so casting the result to float rounds once, as a
 * direct conversion would. */
#ifndef SS_KERNELS_VALUES_H
#define SS_KERNELS_VALUES_H

#include <stdint.h>
#include <string.h>

static inline double read_value(const void *ptr, int code) {
    if (code == 0) return (double)(*(const float *)ptr);
    if (code == 1) return *(const double *)ptr;
    uint32_t bits = (uint32_t)(*(const uint16_t *)ptr) << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return (double)f;
}

#endif /* SS_KERNELS_VALUES_H */
