/* steadystep's multi-tensor CPU kernels: what every kernel file shares (kernels_common.h).
 *
 * One call updates every tensor of a parameter list: the host passes arrays of data pointers and
 * element counts, the work (all elements of all tensors, laid end to end) is cut into one
 * contiguous range per thread, and each thread runs the per-element update over the tensors its
 * range overlaps. The per-element arithmetic follows the reference implementations in
 * steadystep.optim (tests compare them); everything that is the same for a whole tensor (bias
 * corrections, step sizes) is computed once per tensor in double precision.
 *
 * The file is compiled once per configuration: the SS_* macros below select the parameter dtype
 * and the structural choices (method, cdf, amsgrad, ...), so each inner loop is straight-line
 * code that the compiler vectorises. Built with -O3 -fno-math-errno -fno-trapping-math (IEEE
 * semantics of NaN and inf are kept; without -fno-trapping-math GCC keeps every clamp and max
 * as a branch, and the loops stay scalar).
 *
 * Note [subnormals in the kernels]
 *    A vectorised select evaluates both sides: GCC rewrites erf(min(x, 4)) as x < 4 ? erf(x) :
 *    erf(4), evaluating the polynomial at the unclamped x of the lanes it then throws away, where
 *    1/d and its powers underflow to subnormals, a microcode assist each (CPropAdamW's step ran
 *    about 1.7x slower). Each thread therefore runs its range with subnormals flushed to zero
 *    (FTZ and DAZ on x86-64, FZ on AArch64) and restores its mode afterwards: a value below
 *    1.2e-38 in float32 (a moment decayed that far) reads and writes as 0 in these kernels, as
 *    in the GPU kernels' fast math; nothing else changes.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef SS_KERNELS_COMMON_H
#define SS_KERNELS_COMMON_H

#ifndef SS_PARAM
#define SS_PARAM 0 /* 0: float32, 1: float64, 2: bfloat16 parameters */
#endif
#ifndef SS_METHOD
#define SS_METHOD 0 /* 0: conformity, 1: relative, 2: moment */
#endif
#ifndef SS_CDF
#define SS_CDF 0 /* 0: normal, 1: bft, 2: bfo, 3: logistic */
#endif
#ifndef SS_C_INF
#define SS_C_INF 0
#endif
#ifndef SS_C_ONE
#define SS_C_ONE 1
#endif
#ifndef SS_EPS_ZERO
#define SS_EPS_ZERO 0
#endif
#ifndef SS_AMSGRAD
#define SS_AMSGRAD 0
#endif
#ifndef SS_L2
#define SS_L2 0 /* weight decay added to the gradient the base optimizer sees */
#endif
#ifndef SS_DECOUPLED
#define SS_DECOUPLED 0 /* AdamW's decoupled weight decay */
#endif
#ifndef SS_SHARED_V
#define SS_SHARED_V 0 /* CProp's v is Adam's exp_avg_sq */
#endif
#ifndef SS_MOMENTUM
#define SS_MOMENTUM 0
#endif
#ifndef SS_NESTEROV
#define SS_NESTEROV 0
#endif

/* ---------------------------------------------------------------------------------------- */
/* dtypes                                                                                    */
/* ---------------------------------------------------------------------------------------- */

#if SS_PARAM == 1
typedef double param_t;
typedef double stat_t;
static inline stat_t load_p(const param_t *x, int64_t i) { return x[i]; }
static inline void store_p(param_t *x, int64_t i, stat_t v) { x[i] = v; }
#elif SS_PARAM == 2
typedef uint16_t param_t;
typedef float stat_t;
static inline stat_t load_p(const param_t *x, int64_t i) {
    uint32_t u = (uint32_t)x[i] << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
/* round to nearest even, as torch's float -> bfloat16 conversion */
static inline void store_p(param_t *x, int64_t i, stat_t v) {
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    x[i] = (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? 0x7fc0u : rounded);
}
#else
typedef float param_t;
typedef float stat_t;
static inline stat_t load_p(const param_t *x, int64_t i) { return x[i]; }
static inline void store_p(param_t *x, int64_t i, stat_t v) { x[i] = v; }
#endif

#if SS_PARAM == 1
#define SQRT sqrt
#define FABS fabs
#define TANH tanh
#define S_TINY 2.2250738585072014e-308
#else
#define SQRT sqrtf
#define FABS fabsf
#define TANH tanhf
#define S_TINY 1.17549435e-38f
#endif

static inline stat_t s_max(stat_t a, stat_t b) { return a > b ? a : b; }
static inline stat_t s_min(stat_t a, stat_t b) { return a < b ? a : b; }

/* The gradient the base optimizer sees: the raw one, plus weight_decay * p with SS_L2 (L2 weight
   decay added to the gradient, as torch.optim's weight_decay without decoupling). */
static inline stat_t l2_grad(stat_t raw, stat_t p, stat_t weight_decay) {
#if SS_L2
    return raw + weight_decay * p;
#else
    (void)p;
    (void)weight_decay;
    return raw;
#endif
}

/* ---------------------------------------------------------------------------------------- */
/* running a per-range function over all elements of all tensors, on several threads        */
/* ---------------------------------------------------------------------------------------- */

typedef void (*range_fn)(const void *ctx, int thread, int64_t tensor, int64_t lo, int64_t hi);

typedef struct {
    const void *ctx;
    range_fn fn;
    int thread;
    int64_t n;
    const int64_t *numel;
    int64_t start, end; /* in the concatenated index space */
} job_t;

#if defined(__x86_64__) || defined(__SSE2__)
#include <xmmintrin.h>
static unsigned flush_subnormals(void) { /* Note [subnormals in the kernels] */
    unsigned mode = _mm_getcsr();
    _mm_setcsr(mode | 0x8040u); /* FTZ (bit 15) and DAZ (bit 6) */
    return mode;
}
static void restore_mode(unsigned mode) { _mm_setcsr(mode); }
#elif defined(__aarch64__)
static unsigned flush_subnormals(void) {
    uint64_t mode;
    __asm__ volatile("mrs %0, fpcr" : "=r"(mode));
    __asm__ volatile("msr fpcr, %0" : : "r"(mode | (1ull << 24))); /* FZ */
    return (unsigned)mode;
}
static void restore_mode(unsigned mode) {
    uint64_t m = mode;
    __asm__ volatile("msr fpcr, %0" : : "r"(m));
}
#else
static unsigned flush_subnormals(void) { return 0; }
static void restore_mode(unsigned mode) { (void)mode; }
#endif

static void run_job(const job_t *job) {
    unsigned mode = flush_subnormals();
    int64_t offset = 0;
    for (int64_t t = 0; t < job->n; t++) {
        int64_t lo = offset, hi = offset + job->numel[t];
        offset = hi;
        if (hi <= job->start) continue;
        if (lo >= job->end) break;
        int64_t a = job->start > lo ? job->start - lo : 0;
        int64_t b = (job->end < hi ? job->end : hi) - lo;
        if (b > a) job->fn(job->ctx, job->thread, t, a, b);
    }
    restore_mode(mode);
}

static void *run_job_thread(void *arg) {
    run_job((const job_t *)arg);
    return NULL;
}

#define SS_MAX_THREADS 256
/* Elements per thread below which a thread costs more than it saves: each call starts its
 * threads afresh (about 0.1 ms a thread on the 2-core machine of benchmarks/), so a kernel
 * over fewer than about half a million elements runs on the calling thread alone. */
#define SS_MIN_WORK 524288
#define SS_MIN_COPY_BYTES (8 * SS_MIN_WORK) /* the same for a plain copy, in bytes */

/* How many threads parallel_over uses for `total` elements (at most `nthreads`). */
static int threads_for_grain(int64_t total, int nthreads, int64_t grain) {
    int64_t most = (total + grain - 1) / grain;
    if (nthreads > most) nthreads = (int)most;
    if (nthreads > SS_MAX_THREADS) nthreads = SS_MAX_THREADS;
    return nthreads < 1 ? 1 : nthreads;
}

static int threads_for(int64_t total, int nthreads) {
    return threads_for_grain(total, nthreads, SS_MIN_WORK);
}

static int64_t total_of(int64_t n, const int64_t *numel) {
    int64_t total = 0;
    for (int64_t t = 0; t < n; t++) total += numel[t];
    return total;
}

/* Run fn over every element range; thread i of threads_for_grain(total, nthreads, grain) gets
 * range i. */
static void parallel_over_grain(const void *ctx, range_fn fn, int64_t n, const int64_t *numel,
                                int nthreads, int64_t grain) {
    int64_t total = total_of(n, numel);
    if (total == 0) return;
    nthreads = threads_for_grain(total, nthreads, grain);
    job_t jobs[SS_MAX_THREADS];
    pthread_t threads[SS_MAX_THREADS];
    int started[SS_MAX_THREADS];
    /* ranges aligned to 64 elements, so no two threads write one cache line */
    int64_t chunk = ((total + nthreads - 1) / nthreads + 63) & ~(int64_t)63;
    for (int i = 0; i < nthreads; i++) {
        int64_t start = i * chunk, end = start + chunk;
        jobs[i] = (job_t){ctx, fn, i, n, numel, start < total ? start : total, end < total ? end : total};
    }
    for (int i = 1; i < nthreads; i++)
        started[i] = pthread_create(&threads[i], NULL, run_job_thread, &jobs[i]) == 0;
    run_job(&jobs[0]);
    for (int i = 1; i < nthreads; i++) {
        if (started[i])
            pthread_join(threads[i], NULL);
        else
            run_job(&jobs[i]); /* no thread to spare: do its share here */
    }
}

static void parallel_over(const void *ctx, range_fn fn, int64_t n, const int64_t *numel,
                          int nthreads) {
    parallel_over_grain(ctx, fn, n, numel, nthreads, SS_MIN_WORK);
}


#endif /* SS_KERNELS_COMMON_H */
