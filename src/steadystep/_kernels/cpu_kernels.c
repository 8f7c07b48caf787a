/* steadystep's multi-tensor CPU kernels.
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
 * code that the compiler vectorises. Built with -O3 -fno-math-errno -fno-trapping-math (no FP
 * traps are used; IEEE semantics of NaN and inf are kept).
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

static void run_job(const job_t *job) {
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
}

static void *run_job_thread(void *arg) {
    run_job((const job_t *)arg);
    return NULL;
}

#define SS_MAX_THREADS 256
#define SS_MIN_WORK 32768 /* elements per thread below which threads cost more than they save */

/* How many threads parallel_over uses for `total` elements (at most `nthreads`). */
static int threads_for(int64_t total, int nthreads) {
    int64_t most = (total + SS_MIN_WORK - 1) / SS_MIN_WORK;
    if (nthreads > most) nthreads = (int)most;
    if (nthreads > SS_MAX_THREADS) nthreads = SS_MAX_THREADS;
    return nthreads < 1 ? 1 : nthreads;
}

static int64_t total_of(int64_t n, const int64_t *numel) {
    int64_t total = 0;
    for (int64_t t = 0; t < n; t++) total += numel[t];
    return total;
}

/* Run fn over every element range; thread i of threads_for(total, nthreads) gets range i. */
static void parallel_over(const void *ctx, range_fn fn, int64_t n, const int64_t *numel,
                          int nthreads) {
    int64_t total = total_of(n, numel);
    if (total == 0) return;
    nthreads = threads_for(total, nthreads);
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

/* ---------------------------------------------------------------------------------------- */
/* gradient check: every element finite and |g| <= limit                                    */
/* ---------------------------------------------------------------------------------------- */

typedef struct {
    void *const *grads;
    double limit;
    int *bad; /* one flag per tensor, written by the thread that owns the range */
} check_ctx;

static void check_range(const void *vctx, int thread, int64_t t, int64_t lo, int64_t hi) {
    (void)thread;
    const check_ctx *ctx = vctx;
    const param_t *g = ctx->grads[t];
    const stat_t limit = (stat_t)ctx->limit;
    int bad = 0;
    for (int64_t i = lo; i < hi; i++) bad |= !(FABS(load_p(g, i)) <= limit); /* NaN: bad */
    if (bad) ctx->bad[t] = 1; /* a benign race: every writer writes 1 */
}

/* ok[0] = 1 when every gradient is finite with |g| <= limit, else 0 */
int ss_grads_ok(int64_t n, void *const *grads, const int64_t *numel, double limit, uint8_t *ok,
                int nthreads) {
    int *bad = calloc(n > 0 ? n : 1, sizeof(int));
    if (!bad) return -1;
    check_ctx ctx = {grads, limit, bad};
    parallel_over(&ctx, check_range, n, numel, nthreads);
    int any = 0;
    for (int64_t t = 0; t < n; t++) any |= bad[t];
    free(bad);
    ok[0] = !any;
    return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* CProp's scale                                                                             */
/* ---------------------------------------------------------------------------------------- */

/* Coefficients of one tensor, the same for all its elements (see _kernels/__init__.py). */
typedef struct {
    stat_t neg_step_size, inv_bias_correction2_sqrt, eps, lr_weight_decay, weight_decay;
    stat_t beta1, one_minus_beta1, beta2, one_minus_beta2;
    stat_t cprop_beta, one_minus_cprop_beta;
    stat_t inv_cprop_bias_correction, variance_scale, scaled_cprop_eps, first, cprop_c;
    stat_t momentum_a, momentum_b, momentum;
} coef_t;

#if SS_PARAM == 1
static inline stat_t confidence_normal(stat_t x) { return erf(x); }
#else
/* erf(x / sqrt(2)) for x >= 0 in float32 without exp: Abramowitz & Stegun 7.1.28 (absolute
 * error below 3e-7, 2e-6 after float32 rounding); the argument is scaled into the polynomial's
 * coefficients by the host (the 1/sqrt(2) factor is folded into the scale's coefficients). */
static inline stat_t confidence_normal(stat_t x) {
    x = x < 4.0f ? x : 4.0f; /* erf(4) = 1 in float32; also keeps r^16 clear of subnormals */
    stat_t poly = x * 0.0000430638f + 0.0002765672f;
    poly = poly * x + 0.0001520143f;
    poly = poly * x + 0.0092705272f;
    poly = poly * x + 0.0422820123f;
    poly = poly * x + 0.0705230784f;
    stat_t r = 1.0f / (poly * x + 1.0f);
    r = r * r;
    r = r * r;
    r = r * r;
    return 1.0f - r * r;
}
#endif

/* The scale s from the updated statistics: x = |m_hat| / se with the constants of the cdf
 * folded into variance_scale and scaled_cprop_eps (x here is already erf's or tanh's argument). */
static inline stat_t cprop_scale(stat_t cm, stat_t cv, const coef_t *k) {
#if SS_C_INF
    (void)cm;
    (void)cv;
    (void)k;
    return 1;
#else
#if SS_METHOD == 0
    stat_t centred = cv - (cm * cm) * k->inv_cprop_bias_correction;
    stat_t se = SQRT(s_max(centred, 0) * k->variance_scale);
#elif SS_METHOD == 1
    stat_t se = cv * k->variance_scale;
#else
    stat_t se = SQRT(cv * k->variance_scale);
#endif
    se = se + k->scaled_cprop_eps;
#if SS_EPS_ZERO
    se = s_max(se, S_TINY);
#endif
    stat_t x = FABS(cm) / se;
    stat_t conf;
#if SS_METHOD != 0
    conf = x;
#elif SS_CDF == 0
    conf = confidence_normal(x);
#elif SS_CDF == 1
    conf = TANH(x * (x * x * (stat_t)(0.07056 / 2.0) + (stat_t)(1.5976 / 2.0)));
#else
    conf = TANH(x);
#endif
#if !SS_C_ONE
    conf = s_min(conf * k->cprop_c, 1);
#endif
    return s_max(conf, k->first);
#endif
}

/* ---------------------------------------------------------------------------------------- */
/* per-tensor coefficients                                                                   */
/* ---------------------------------------------------------------------------------------- */

typedef struct {
    double lr, beta1, beta2, eps, weight_decay, cprop_beta, cprop_c, cprop_eps, cdf_constant;
    double momentum, dampening;
} hyper_t;

static void coefficients(const hyper_t *h, double lr, float step, coef_t *k) {
    double t = step < 1.0f ? 1.0 : (double)step;
    double bias_correction1 = 1.0 - pow(h->beta1, t);
    double bias_correction2 = 1.0 - pow(h->beta2, t);
    double cprop_bc = 1.0 - pow(h->cprop_beta, t);
    double n = cprop_bc / (1.0 - h->cprop_beta);
    double inv_cprop_bc = 1.0 / cprop_bc;
    double ratio = inv_cprop_bc * h->cdf_constant; /* x = |cm| * ratio / se */
    double variance_scale;
#if SS_METHOD == 0
    variance_scale = inv_cprop_bc / (n - 1.0 + h->cprop_eps) / (ratio * ratio);
#elif SS_METHOD == 1
    variance_scale = inv_cprop_bc / ratio;
#else
    variance_scale = inv_cprop_bc / (ratio * ratio);
#endif
    int first = step == 1.0f;
    k->neg_step_size = (stat_t)(-lr / bias_correction1);
    k->inv_bias_correction2_sqrt = (stat_t)(1.0 / sqrt(bias_correction2));
    k->eps = (stat_t)h->eps;
    k->lr_weight_decay = (stat_t)(lr * h->weight_decay);
    k->weight_decay = (stat_t)h->weight_decay;
    k->beta1 = (stat_t)h->beta1;
    k->one_minus_beta1 = (stat_t)(1.0 - h->beta1);
    k->beta2 = (stat_t)h->beta2;
    k->one_minus_beta2 = (stat_t)(1.0 - h->beta2);
    k->cprop_beta = (stat_t)h->cprop_beta;
    k->one_minus_cprop_beta = (stat_t)(1.0 - h->cprop_beta);
    k->inv_cprop_bias_correction = (stat_t)inv_cprop_bc;
    k->variance_scale = (stat_t)variance_scale;
    k->scaled_cprop_eps = (stat_t)(h->cprop_eps / ratio);
    k->first = (stat_t)first;
    k->cprop_c = (stat_t)h->cprop_c;
    /* SGD's buffer starts at d on the first step, as torch.optim.SGD's */
    k->momentum_a = (stat_t)(first ? 0.0 : h->momentum);
    k->momentum_b = (stat_t)(first ? 1.0 : 1.0 - h->dampening);
    k->momentum = (stat_t)h->momentum;
}

/* Advance the step counts (each a 0-d float32 tensor) and compute every tensor's coefficients;
 * NULL when the allocation fails. */
static coef_t *advance(const hyper_t *h, double lr, int64_t n, float *const *steps) {
    coef_t *k = malloc((n > 0 ? n : 1) * sizeof(coef_t));
    if (!k) return NULL;
    for (int64_t t = 0; t < n; t++) {
        *steps[t] += 1.0f;
        coefficients(h, lr, *steps[t], &k[t]);
    }
    return k;
}

/* ---------------------------------------------------------------------------------------- */
/* Adam / AdamW with CProp                                                                   */
/* ---------------------------------------------------------------------------------------- */

typedef struct {
    void *const *params, *const *grads;
    stat_t *const *exp_avgs, *const *exp_avg_sqs, *const *max_exp_avg_sqs;
    stat_t *const *cprop_exp_avgs, *const *cprop_seconds;
    const coef_t *coefs;
} adam_ctx;

static void adam_loop(param_t *restrict P, const param_t *restrict G, stat_t *restrict M,
                      stat_t *restrict V, stat_t *restrict VMAX, stat_t *restrict CM,
                      stat_t *restrict CV, const coef_t *restrict kp, int64_t lo, int64_t hi) {
    const coef_t k = *kp;
    (void)VMAX;
    (void)CV;
    for (int64_t i = lo; i < hi; i++) {
        stat_t raw = load_p(G, i);
        stat_t p = load_p(P, i);
#if SS_L2
        stat_t g = raw + k.weight_decay * p;
#else
        stat_t g = raw;
#endif
        stat_t m = M[i] * k.beta1 + k.one_minus_beta1 * g;
        stat_t v = V[i] * k.beta2 + k.one_minus_beta2 * (g * g);
#if SS_AMSGRAD
        stat_t vmax = s_max(VMAX[i], v);
#else
        stat_t vmax = v;
#endif
        stat_t denom = SQRT(vmax) * k.inv_bias_correction2_sqrt + k.eps;
        stat_t update = k.neg_step_size * m / denom;
#if SS_DECOUPLED
        update = update - k.lr_weight_decay * p;
#endif
        stat_t cm = CM[i] * k.cprop_beta + k.one_minus_cprop_beta * raw;
#if SS_SHARED_V
        stat_t cv = v;
#elif SS_METHOD == 1
        stat_t cv = CV[i] * k.cprop_beta + k.one_minus_cprop_beta * FABS(raw);
#else
        stat_t cv = CV[i] * k.cprop_beta + k.one_minus_cprop_beta * (raw * raw);
#endif
        stat_t s = cprop_scale(cm, cv, &k);
        store_p(P, i, p + s * update);
        M[i] = m;
        V[i] = v;
#if SS_AMSGRAD
        VMAX[i] = vmax;
#endif
        CM[i] = cm;
#if !SS_SHARED_V
        CV[i] = cv;
#endif
    }
}

static void adam_range(const void *vctx, int thread, int64_t t, int64_t lo, int64_t hi) {
    (void)thread;
    const adam_ctx *ctx = vctx;
    adam_loop(ctx->params[t], ctx->grads[t], ctx->exp_avgs[t], ctx->exp_avg_sqs[t],
              SS_AMSGRAD ? ctx->max_exp_avg_sqs[t] : NULL, ctx->cprop_exp_avgs[t],
              SS_SHARED_V ? NULL : ctx->cprop_seconds[t], &ctx->coefs[t], lo, hi);
}

/* One Adam(W) + CProp step of n tensors; a no-op (step counts included) unless *found_finite. */
int ss_adam(int64_t n, void *const *params, void *const *grads, stat_t *const *exp_avgs,
            stat_t *const *exp_avg_sqs, stat_t *const *max_exp_avg_sqs,
            stat_t *const *cprop_exp_avgs, stat_t *const *cprop_seconds, float *const *steps,
            const int64_t *numel, const hyper_t *h, const double *lr_scale,
            const uint8_t *found_finite, int nthreads) {
    if (!found_finite[0]) return 0;
    coef_t *k = advance(h, h->lr * lr_scale[0], n, steps);
    if (!k) return -1;
    adam_ctx ctx = {params,         grads,         exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                    cprop_exp_avgs, cprop_seconds, k};
    parallel_over(&ctx, adam_range, n, numel, nthreads);
    free(k);
    return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* SGD with CProp                                                                            */
/* ---------------------------------------------------------------------------------------- */

typedef struct {
    void *const *params, *const *grads;
    stat_t *const *momentum_buffers, *const *cprop_exp_avgs, *const *cprop_seconds;
    const coef_t *coefs;
    stat_t neg_lr;
} sgd_ctx;

static void sgd_range(const void *vctx, int thread, int64_t t, int64_t lo, int64_t hi) {
    (void)thread;
    const sgd_ctx *ctx = vctx;
    const coef_t k = ctx->coefs[t];
    const stat_t neg_lr = ctx->neg_lr;
    param_t *restrict P = ctx->params[t];
    const param_t *restrict G = ctx->grads[t];
    stat_t *restrict CM = ctx->cprop_exp_avgs[t];
    stat_t *restrict CV = ctx->cprop_seconds[t];
#if SS_MOMENTUM
    stat_t *restrict B = ctx->momentum_buffers[t];
#endif
    for (int64_t i = lo; i < hi; i++) {
        stat_t raw = load_p(G, i);
        stat_t p = load_p(P, i);
#if SS_L2
        stat_t d = raw + k.weight_decay * p;
#else
        stat_t d = raw;
#endif
        stat_t cm = CM[i] * k.cprop_beta + k.one_minus_cprop_beta * raw;
#if SS_METHOD == 1
        stat_t cv = CV[i] * k.cprop_beta + k.one_minus_cprop_beta * FABS(raw);
#else
        stat_t cv = CV[i] * k.cprop_beta + k.one_minus_cprop_beta * (raw * raw);
#endif
#if SS_MOMENTUM
        stat_t buf = B[i] * k.momentum_a + k.momentum_b * d;
#if SS_NESTEROV
        d = d + k.momentum * buf;
#else
        d = buf;
#endif
        B[i] = buf;
#endif
        stat_t s = cprop_scale(cm, cv, &k);
        store_p(P, i, p + s * (neg_lr * d));
        CM[i] = cm;
        CV[i] = cv;
    }
}

int ss_sgd(int64_t n, void *const *params, void *const *grads, stat_t *const *momentum_buffers,
           stat_t *const *cprop_exp_avgs, stat_t *const *cprop_seconds, float *const *steps,
           const int64_t *numel, const hyper_t *h, const double *lr_scale,
           const uint8_t *found_finite, int nthreads) {
    if (!found_finite[0]) return 0;
    double lr = h->lr * lr_scale[0];
    coef_t *k = advance(h, lr, n, steps);
    if (!k) return -1;
    sgd_ctx ctx = {params, grads, momentum_buffers, cprop_exp_avgs, cprop_seconds, k,
                   (stat_t)(-lr)};
    parallel_over(&ctx, sgd_range, n, numel, nthreads);
    free(k);
    return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* The CProp wrapper around any optimizer: statistics + snapshot before, scale after         */
/* ---------------------------------------------------------------------------------------- */

typedef struct {
    void *const *params, *const *grads, *const *snapshots;
    stat_t *const *cprop_exp_avgs, *const *cprop_seconds;
    const coef_t *coefs;
} wrap_ctx;

static void wrap_before_range(const void *vctx, int thread, int64_t t, int64_t lo, int64_t hi) {
    (void)thread;
    const wrap_ctx *ctx = vctx;
    const coef_t k = ctx->coefs[t];
    const param_t *restrict P = ctx->params[t];
    const param_t *restrict G = ctx->grads[t];
    param_t *restrict SNAP = ctx->snapshots[t];
    stat_t *restrict CM = ctx->cprop_exp_avgs[t];
    stat_t *restrict CV = ctx->cprop_seconds[t];
    for (int64_t i = lo; i < hi; i++) {
        stat_t raw = load_p(G, i);
        SNAP[i] = P[i];
        CM[i] = CM[i] * k.cprop_beta + k.one_minus_cprop_beta * raw;
#if SS_METHOD == 1
        CV[i] = CV[i] * k.cprop_beta + k.one_minus_cprop_beta * FABS(raw);
#else
        CV[i] = CV[i] * k.cprop_beta + k.one_minus_cprop_beta * (raw * raw);
#endif
    }
}

static void snapshot_range(const void *vctx, int thread, int64_t t, int64_t lo, int64_t hi) {
    (void)thread;
    const wrap_ctx *ctx = vctx;
    const param_t *restrict P = ctx->params[t];
    param_t *restrict SNAP = ctx->snapshots[t];
    memcpy(SNAP + lo, P + lo, (size_t)(hi - lo) * sizeof(param_t));
}

int ss_wrap_before(int64_t n, void *const *params, void *const *grads, void *const *snapshots,
                   stat_t *const *cprop_exp_avgs, stat_t *const *cprop_seconds,
                   float *const *steps, const int64_t *numel, const hyper_t *h,
                   const uint8_t *found_finite, int nthreads) {
    wrap_ctx ctx = {params, grads, snapshots, cprop_exp_avgs, cprop_seconds, NULL};
    if (!found_finite[0]) { /* the snapshot is taken anyway: ss_wrap_after restores it */
        parallel_over(&ctx, snapshot_range, n, numel, nthreads);
        return 0;
    }
    coef_t *k = advance(h, 0.0, n, steps);
    if (!k) return -1;
    ctx.coefs = k;
    parallel_over(&ctx, wrap_before_range, n, numel, nthreads);
    free(k);
    return 0;
}

static void wrap_after_range(const void *vctx, int thread, int64_t t, int64_t lo, int64_t hi) {
    (void)thread;
    const wrap_ctx *ctx = vctx;
    const coef_t k = ctx->coefs[t];
    param_t *restrict P = ctx->params[t];
    const param_t *restrict SNAP = ctx->snapshots[t];
    const stat_t *restrict CM = ctx->cprop_exp_avgs[t];
    const stat_t *restrict CV = ctx->cprop_seconds[t];
    for (int64_t i = lo; i < hi; i++) {
        stat_t s = cprop_scale(CM[i], CV[i], &k);
        stat_t old = load_p(SNAP, i), now = load_p(P, i);
        stat_t diff = now - old;
        /* torch.lerp's two-sided formula: exactly `now` at s = 1 */
        stat_t out = s < (stat_t)0.5 ? old + s * diff : now - diff * (1 - s);
        store_p(P, i, out);
    }
}

static void restore_range(const void *vctx, int thread, int64_t t, int64_t lo, int64_t hi) {
    (void)thread;
    const wrap_ctx *ctx = vctx;
    param_t *restrict P = ctx->params[t];
    const param_t *restrict SNAP = ctx->snapshots[t];
    memcpy(P + lo, SNAP + lo, (size_t)(hi - lo) * sizeof(param_t));
}

/* After the base optimizer's step: p <- lerp(p_old, p, s); p <- p_old on a skipped step (the
 * base may have written anything there). The step counts were advanced by ss_wrap_before. */
int ss_wrap_after(int64_t n, void *const *params, void *const *snapshots,
                  stat_t *const *cprop_exp_avgs, stat_t *const *cprop_seconds,
                  float *const *steps, const int64_t *numel, const hyper_t *h,
                  const uint8_t *found_finite, int nthreads) {
    wrap_ctx ctx = {params, NULL, snapshots, cprop_exp_avgs, cprop_seconds, NULL};
    if (!found_finite[0]) {
        parallel_over(&ctx, restore_range, n, numel, nthreads);
        return 0;
    }
    coef_t *k = malloc((n > 0 ? n : 1) * sizeof(coef_t));
    if (!k) return -1;
    for (int64_t t = 0; t < n; t++) coefficients(h, 0.0, *steps[t], &k[t]);
    ctx.coefs = k;
    parallel_over(&ctx, wrap_after_range, n, numel, nthreads);
    free(k);
    return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* ALeRA and Ag-Adam                                                                         */
/* ---------------------------------------------------------------------------------------- */

/* One step in two passes over the elements with a little scalar work between them:
 *   pass 1: per tensor, in double, S_dd = sum d^2, S_rd = sum r d, S_rr = sum r^2 with
 *           d = g + wd p, and whether some |g| is NaN or above the limit;
 *   between: the units' norms, the skip decision, the step counts, each unit's new squared
 *           relaxed-path norm ||decay r + scale d||^2 = decay^2 S_rr + 2 decay scale S_rd +
 *           scale^2 S_dd (so r is read once per pass), the multipliers (but for "param"
 *           granularity, whose multipliers are per element), each tensor's coefficients;
 *   pass 2: r <- decay r + scale d, then the update: p <- p - lr m d (ALeRA) or Adam's step
 *           with learning rate lr m (Ag-Adam). */

typedef struct {
    double alpha, C, norm_eps, limit, stats_max, stats_tiny, log_bound;
    double total_numel;       /* D: the elements of "param" granularity's one unit */
    double beta1, beta2, eps; /* Ag-Adam's */
    int param_wise, adam;
    int advance_adam_steps; /* 0 when Adam's step counts are among the counters */
} alera_hyper_t;

typedef struct {
    void *const *params, *const *grads;
    stat_t *const *relaxed, *const *elem_m, *const *exp_avgs, *const *exp_avg_sqs;
    const double *wd;
    stat_t limit;
    int64_t n;
    double *sums; /* [thread][tensor][4]: S_dd, S_rd, S_rr, bad */
    /* pass 2, per tensor */
    const double *scale, *coef, *inv_bc2_sqrt;
    stat_t decay, gain, offset, log_bound, stats_max, stats_tiny, beta1, beta2, eps;
} alera_ctx;

static void alera_sums_loop(const param_t *restrict P, const param_t *restrict G,
                            const stat_t *restrict R, stat_t wd, stat_t limit, int64_t lo,
                            int64_t hi, double *out) {
    double dd = 0, rd = 0, rr = 0;
    stat_t amax = 0;
    /* vector lanes keep partial sums (the order is fixed for a given thread count); a NaN or
     * inf in g makes dd NaN or inf, which the caller reads as a bad gradient */
#pragma omp simd reduction(+ : dd, rd, rr) reduction(max : amax)
    for (int64_t i = lo; i < hi; i++) {
        stat_t g = load_p(G, i);
        stat_t d = g + wd * load_p(P, i);
        double r = R[i];
        stat_t a = FABS(g);
        amax = a > amax ? a : amax;
        dd += (double)d * (double)d;
        rd += r * (double)d;
        rr += r * r;
    }
    out[0] += dd;
    out[1] += rd;
    out[2] += rr;
    if (!(amax <= limit) || !isfinite(dd)) out[3] = 1;
}

static void alera_sums_range(const void *vctx, int thread, int64_t t, int64_t lo, int64_t hi) {
    const alera_ctx *ctx = vctx;
    alera_sums_loop(ctx->params[t], ctx->grads[t], ctx->relaxed[t], (stat_t)ctx->wd[t],
                    ctx->limit, lo, hi, ctx->sums + ((int64_t)thread * ctx->n + t) * 4);
}

static inline stat_t apply_log_change(stat_t m, stat_t log_change, stat_t bound, stat_t tiny,
                                      stat_t max) {
    log_change = s_min(s_max(log_change, -bound), bound);
#if SS_PARAM == 1
    stat_t factor = exp(log_change);
#else
    stat_t factor = expf(log_change);
#endif
    return s_min(s_max(m * factor, tiny), max);
}

static void alera_update_loop(param_t *restrict P, const param_t *restrict G,
                              stat_t *restrict R, stat_t *restrict ME, stat_t *restrict M1,
                              stat_t *restrict M2, stat_t wd, stat_t scale, stat_t coef,
                              stat_t inv_bc2_sqrt, const alera_ctx *restrict c, int64_t lo,
                              int64_t hi, int param_wise, int adam) {
    const stat_t decay = c->decay, gain = c->gain, offset = c->offset, bound = c->log_bound;
    const stat_t tiny = c->stats_tiny, max = c->stats_max;
    const stat_t beta1 = c->beta1, beta2 = c->beta2, eps = c->eps;
    for (int64_t i = lo; i < hi; i++) {
        stat_t g = load_p(G, i);
        stat_t p = load_p(P, i);
        stat_t d = adam ? g : g + wd * p;
        stat_t r = R[i] * decay + scale * d;
        R[i] = r;
        stat_t k = coef;
        if (param_wise) {
            stat_t m = apply_log_change(ME[i], gain * r * r + offset, bound, tiny, max);
            ME[i] = m;
            k = coef * m;
        }
        if (adam) {
            stat_t m1 = M1[i] * beta1 + (1 - beta1) * g;
            stat_t m2 = M2[i] * beta2 + (1 - beta2) * (g * g);
            M1[i] = m1;
            M2[i] = m2;
            store_p(P, i, p + k * (m1 / (SQRT(m2) * inv_bc2_sqrt + eps)));
        } else {
            store_p(P, i, p + k * d);
        }
    }
}

/* The four variants as separate loops, so each is branch-free straight-line code. */
static void alera_update_range(const void *vctx, int thread, int64_t t, int64_t lo, int64_t hi) {
    (void)thread;
    const alera_ctx *c = vctx;
    param_t *P = c->params[t];
    const param_t *G = c->grads[t];
    stat_t *R = c->relaxed[t];
    stat_t wd = (stat_t)c->wd[t], scale = (stat_t)c->scale[t], coef = (stat_t)c->coef[t];
    stat_t ib = c->inv_bc2_sqrt ? (stat_t)c->inv_bc2_sqrt[t] : 0;
    stat_t *ME = c->elem_m ? c->elem_m[t] : NULL;
    stat_t *M1 = c->exp_avgs ? c->exp_avgs[t] : NULL;
    stat_t *M2 = c->exp_avg_sqs ? c->exp_avg_sqs[t] : NULL;
    if (ME && M1)
        alera_update_loop(P, G, R, ME, M1, M2, wd, scale, coef, ib, c, lo, hi, 1, 1);
    else if (ME)
        alera_update_loop(P, G, R, ME, NULL, NULL, wd, scale, coef, ib, c, lo, hi, 1, 0);
    else if (M1)
        alera_update_loop(P, G, R, NULL, M1, M2, wd, scale, coef, ib, c, lo, hi, 0, 1);
    else
        alera_update_loop(P, G, R, NULL, NULL, NULL, wd, scale, coef, ib, c, lo, hi, 0, 0);
}

static double random_walk_mean(double alpha, double t) {
    return alpha / (2.0 - alpha) * (1.0 - pow(1.0 - alpha, 2.0 * t));
}

/* One ALeRA / Ag-Adam step. Tensors are grouped in units (tensor_unit[i]); unit u has
 * unit_numel[u] elements, step count *unit_step[u] (advanced with the counters) and multiplier
 * *unit_m[u] (unused for "param" granularity, whose multipliers are elem_m). Each tensor's
 * learning rate is tensor_lr[i] times *tensor_lr_scale[i] when given. counters are every
 * step count to advance by one on a step taken; mirrors receive unit 0's new multiplier
 * ("global" granularity keeps a copy per group). skipped counts steps skipped for a bad
 * gradient (not those masked by *skip). Returns 0, or -1 when out of memory. */
int ss_alera(int64_t n, void *const *params, void *const *grads, stat_t *const *relaxed,
             stat_t *const *elem_m, stat_t *const *exp_avgs, stat_t *const *exp_avg_sqs,
             float *const *adam_steps, const int64_t *numel, const int64_t *tensor_unit,
             const double *tensor_wd, const double *tensor_lr, stat_t *const *tensor_lr_scale,
             int64_t n_units, stat_t *const *unit_m, float *const *unit_step,
             const double *unit_numel, int64_t n_counters, float *const *counters,
             int64_t n_mirrors, stat_t *const *mirrors, int64_t *skipped, const uint8_t *skip,
             const alera_hyper_t *h, int nthreads) {
    int64_t total = total_of(n, numel);
    int threads = threads_for(total, nthreads);
    double *sums = calloc((size_t)(threads * (n > 0 ? n : 1) * 4), sizeof(double));
    double *unit_dd = calloc((size_t)(n_units > 0 ? n_units : 1) * 3, sizeof(double));
    double *per_tensor = malloc((size_t)(n > 0 ? n : 1) * 3 * sizeof(double));
    if (!sums || !unit_dd || !per_tensor) {
        free(sums);
        free(unit_dd);
        free(per_tensor);
        return -1;
    }
    alera_ctx ctx = {.params = params,
                     .grads = grads,
                     .relaxed = relaxed,
                     .elem_m = elem_m,
                     .exp_avgs = exp_avgs,
                     .exp_avg_sqs = exp_avg_sqs,
                     .wd = tensor_wd,
                     .limit = (stat_t)h->limit,
                     .n = n,
                     .sums = sums};
    parallel_over(&ctx, alera_sums_range, n, numel, nthreads);

    /* the decision: every |g| acceptable and every unit's squared norm finite in stat_t */
    int bad = 0;
    double *unit_sq = unit_dd + n_units, *unit_scale = unit_dd + 2 * n_units;
    for (int64_t t = 0; t < n; t++) {
        double dd = 0;
        for (int k = 0; k < threads; k++) {
            dd += sums[((int64_t)k * n + t) * 4];
            bad |= sums[((int64_t)k * n + t) * 4 + 3] != 0;
        }
        unit_dd[tensor_unit[t]] += dd;
    }
    for (int64_t u = 0; u < n_units; u++) bad |= !(unit_dd[u] <= h->stats_max);
    int masked = skip && skip[0];
    if (bad && !masked) skipped[0] += 1;
    if (bad || masked) {
        free(sums);
        free(unit_dd);
        free(per_tensor);
        return 0;
    }
    for (int64_t k = 0; k < n_counters; k++) *counters[k] += 1.0f;

    const double alpha = h->alpha, decay = 1.0 - alpha;
    for (int64_t u = 0; u < n_units; u++) {
        stat_t norm = (stat_t)sqrt(unit_dd[u]); /* the norm the reference computes */
        unit_scale[u] = norm > (stat_t)h->norm_eps ? (double)((stat_t)alpha / norm) : 0.0;
    }
    for (int64_t t = 0; t < n; t++) {
        double rd = 0, rr = 0, dd = 0;
        for (int k = 0; k < threads; k++) {
            const double *s = sums + ((int64_t)k * n + t) * 4;
            dd += s[0];
            rd += s[1];
            rr += s[2];
        }
        double scale = unit_scale[tensor_unit[t]];
        double sq = decay * decay * rr + 2.0 * decay * scale * rd + scale * scale * dd;
        unit_sq[tensor_unit[t]] += sq > 0 ? sq : 0;
        per_tensor[t] = scale;
    }
    const stat_t tiny = (stat_t)h->stats_tiny, smax = (stat_t)h->stats_max;
    const stat_t bound = (stat_t)h->log_bound;
    if (!h->param_wise) {
        for (int64_t u = 0; u < n_units; u++) {
            double mean = random_walk_mean(alpha, (double)*unit_step[u]);
            double log_change = (unit_sq[u] - mean) * h->C * sqrt(unit_numel[u]) / alpha;
            *unit_m[u] = apply_log_change(*unit_m[u], (stat_t)log_change, bound, tiny, smax);
        }
        for (int64_t k = 0; k < n_mirrors; k++) *mirrors[k] = *unit_m[0];
    }
    double *coef = per_tensor + n, *inv_bc2_sqrt = per_tensor + 2 * n;
    for (int64_t t = 0; t < n; t++) {
        double lr = tensor_lr[t] * (tensor_lr_scale && tensor_lr_scale[t] ? *tensor_lr_scale[t] : 1);
        double m = h->param_wise ? 1.0 : (double)*unit_m[tensor_unit[t]];
        coef[t] = -lr * m;
        if (h->adam) {
            if (h->advance_adam_steps) *adam_steps[t] += 1.0f;
            double step = *adam_steps[t];
            coef[t] /= 1.0 - pow(h->beta1, step);
            inv_bc2_sqrt[t] = 1.0 / sqrt(1.0 - pow(h->beta2, step));
        }
    }
    double mean = h->param_wise ? random_walk_mean(alpha, (double)*unit_step[0]) : 0.0;
    ctx.scale = per_tensor;
    ctx.coef = coef;
    ctx.inv_bc2_sqrt = h->adam ? inv_bc2_sqrt : NULL;
    ctx.decay = (stat_t)decay;
    ctx.gain = (stat_t)(h->C * h->total_numel / alpha);
    ctx.offset = (stat_t)(mean * (-h->C / alpha));
    ctx.log_bound = bound;
    ctx.stats_max = smax;
    ctx.stats_tiny = tiny;
    ctx.beta1 = (stat_t)h->beta1;
    ctx.beta2 = (stat_t)h->beta2;
    ctx.eps = (stat_t)h->eps;
    parallel_over(&ctx, alera_update_range, n, numel, nthreads);
    free(sums);
    free(unit_dd);
    free(per_tensor);
    return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* The guard's rollback snapshot: p <- snapshot on an alarm, else snapshot <- p              */
/* ---------------------------------------------------------------------------------------- */

typedef struct {
    void *const *params, *const *snapshots;
    int alarm;
} rollback_ctx;

static void rollback_range(const void *vctx, int thread, int64_t t, int64_t lo, int64_t hi) {
    (void)thread;
    const rollback_ctx *ctx = vctx;
    char *p = (char *)ctx->params[t] + lo, *snap = (char *)ctx->snapshots[t] + lo;
    if (ctx->alarm)
        memcpy(p, snap, (size_t)(hi - lo));
    else
        memcpy(snap, p, (size_t)(hi - lo));
}

/* Byte counts in nbytes: any dtype. */
int ss_rollback(int64_t n, void *const *params, void *const *snapshots, const int64_t *nbytes,
                const uint8_t *alarm, int nthreads) {
    rollback_ctx ctx = {params, snapshots, alarm[0] != 0};
    parallel_over(&ctx, rollback_range, n, nbytes, nthreads);
    return 0;
}
