/* The rolling-window detectors' update in one call (built and loaded with the other kernels:
 * Note [CPU kernels] in _cpu.py).
 *
 * Note [the detector kernel]
 *    A detector's update is a few dozen operations on a handful of scalars and two windows of
 *    128 values; as torch operations on the CPU each one costs a dispatch of a few
 *    microseconds, and the spike detector's update alone cost about half a millisecond a step,
 *    more than a small model's whole training step. This kernel does the same update of a
 *    RollingZScore or a SpikeDetector (steadystep/detectors/rolling.py and spike.py, with the
 *    shell's rules of detectors/_base.py: non-finite values, overflow, ``skip``, the counters,
 *    the copy that ``revert`` restores) in one call, and the torch code stays the reference:
 *    tests/test_detectors.py runs both on the same sequences. The one difference is the order
 *    of the two sums over a window (here in double precision, rounded once; torch sums in the
 *    window's dtype by blocks): the mean and the spread can differ in their last bits, so a
 *    value within rounding of its threshold can alarm on one path and not the other. On
 *    ordinary losses that is rare (the tests' sequences alarm alike); on a plateau whose
 *    spread is a few ulps it is every value, and RollingZScore, whose spread has no floor,
 *    alarms differently there (SpikeDetector's floor of 1e-3 |mean| keeps its threshold
 *    clear of rounding).
 *
 *    Every product the reference rounds on its own is rounded on its own here (``mul``): with
 *    -ffp-contract=fast, GCC's default, ``mean + sigma * scale`` would become one fused
 *    multiply-add and round differently from torch's two operations.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels_values.h"

typedef struct {
    double sigma;         /* the threshold in spreads */
    double warmup_factor; /* the spike detector's warm-up factor on the loss; 0: none */
    double scale_floor;   /* the spike detector's floor of the spread, a fraction of |mean| */
    int64_t size;         /* values in a window */
    int64_t warmup;       /* values (the current one included) before the z-test */
    int clip;             /* 1: the spike detector's winsorized test; 0: the rolling z-score */
} window_hyper_t;

/* One value x (finite) against a window whose first min(count, size) slots hold the last stored
 * values: the change flag, and in *stored what enters the window (detectors/spike.py's
 * clipped_window_test, detectors/rolling.py's window_test). NaN-aware as the reference: a NaN
 * statistic alarms and makes *stored NaN. */
#define WINDOW_TEST(T, SQRT, ABS)                                                               \
    static inline T mul_##T(T a, T b) {                                                         \
        volatile T r = a * b;                                                                   \
        return r;                                                                               \
    }                                                                                           \
    static int test_##T(const T *w, int64_t count, T x, const window_hyper_t *h, int early,     \
                        T *stored) {                                                            \
        int64_t n = count < h->size ? count : h->size;                                          \
        T nf = (T)n;                                                                            \
        double acc = 0.0;                                                                       \
        for (int64_t i = 0; i < n; i++) acc += (double)w[i];                                    \
        T mean = (T)acc / nf;                                                                   \
        acc = 0.0;                                                                              \
        for (int64_t i = 0; i < n; i++) {                                                       \
            T d = w[i] - mean;                                                                  \
            acc += (double)mul_##T(d, d);                                                       \
        }                                                                                       \
        T std = SQRT((T)acc / (nf - (T)1));                                                     \
        T sigma = (T)h->sigma;                                                                  \
        int warm = count >= h->warmup - 1;                                                      \
        if (!h->clip) {                                                                         \
            *stored = x;                                                                        \
            return !(x - mean <= mul_##T(sigma, std)) && warm;                                  \
        }                                                                                       \
        T floor_ = mul_##T((T)h->scale_floor, ABS(mean));                                       \
        T scale = (isnan(std) || isnan(floor_)) ? (T)NAN : (std > floor_ ? std : floor_);       \
        T threshold = (T)INFINITY;                                                              \
        if (warm) {                                                                             \
            threshold = mean + mul_##T(sigma, scale);                                           \
        } else if (early && count > 0) {                                                        \
            T low = (T)INFINITY;                                                                \
            for (int64_t i = 0; i < n; i++)                                                     \
                if (isnan(w[i]) || w[i] < low) low = isnan(low) ? low : w[i];                   \
            threshold = low + mul_##T((T)(h->warmup_factor - 1.0), ABS(low));                   \
        }                                                                                       \
        *stored = isnan(threshold) ? threshold : (x <= threshold ? x : threshold);              \
        return !(x <= threshold);                                                               \
    }

/* The whole update of a window-pair detector (detectors/_base.py's Detector.update): the loss
 * (and the gradient norm when gp is not NULL) tested and, where committed, stored; the state
 * before it copied to the b* arrays (what revert() restores); last_loss, the counters and the
 * alarm written. skip (NULL: none) makes the observation of a finite loss a no-op. */
#define WINDOW_UPDATE(T)                                                                        \
    int ss_window_update_##T(T *lw, int64_t *lc, T *gw, int64_t *gc, T *blw, int64_t *blc,      \
                             T *bgw, int64_t *bgc, int64_t *observations, int64_t *alarms,      \
                             T *last_loss, const void *xp, int xcode, const void *gp,           \
                             int gcode, const uint8_t *skip, const window_hyper_t *h,           \
                             uint8_t *alarm_out) {                                              \
        int64_t size = h->size;                                                                 \
        T x = (T)read_value(xp, xcode);                                                         \
        T g = gp ? (T)read_value(gp, gcode) : (T)0;                                             \
        int finite = isfinite(x) && (!gp || isfinite(g));                                       \
        memcpy(blw, lw, (size_t)size * sizeof(T));                                              \
        memcpy(bgw, gw, (size_t)size * sizeof(T));                                              \
        *blc = *lc;                                                                             \
        *bgc = *gc;                                                                             \
        /* the core sees 0 in place of a non-finite value; its result is then discarded */      \
        T stored_l, stored_g = (T)0;                                                            \
        int change = test_##T(lw, *lc, finite ? x : (T)0, h, h->warmup_factor > 0, &stored_l);  \
        /* torch's remainder: never negative (a count loaded from a checkpoint may be) */      \
        int64_t il = ((*lc % size) + size) % size, ig = ((*gc % size) + size) % size;           \
        int ok = finite;                                                                        \
        for (int64_t i = 0; i < size; i++) ok &= isfinite(i == il ? stored_l : lw[i]) != 0;     \
        if (gp) {                                                                               \
            change |= test_##T(gw, *gc, finite ? g : (T)0, h, 0, &stored_g);                    \
            for (int64_t i = 0; i < size; i++) ok &= isfinite(i == ig ? stored_g : gw[i]) != 0; \
        }                                                                                       \
        int tested = !(skip && skip[0] && isfinite(x));                                         \
        int alarm = (!ok || change) && tested;                                                  \
        if (ok && tested) {                                                                     \
            lw[il] = stored_l;                                                                  \
            *lc += 1;                                                                           \
            if (gp) {                                                                           \
                gw[ig] = stored_g;                                                              \
                *gc += 1;                                                                       \
            }                                                                                   \
        }                                                                                       \
        if (tested) *last_loss = x;                                                             \
        *observations += tested;                                                                \
        *alarms += alarm;                                                                       \
        *alarm_out = (uint8_t)alarm;                                                            \
        return 0;                                                                               \
    }

WINDOW_TEST(float, sqrtf, fabsf)
WINDOW_TEST(double, sqrt, fabs)
WINDOW_UPDATE(float)
WINDOW_UPDATE(double)
