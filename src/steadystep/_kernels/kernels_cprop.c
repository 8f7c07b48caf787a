/* CProp's native Adam/AdamW and SGD steps and the wrapper's passes (see kernels_common.h). */
#include "kernels_common.h"

/* ---------------------------------------------------------------------------------------- */
/* gradient statistics: every element finite with |g| <= limit, and the sum of squares      */
/* ---------------------------------------------------------------------------------------- */

typedef struct {
    void *const *grads;
    double limit;
    double *acc; /* [thread][2]: sum of squares, bad */
} check_ctx;

static void check_loop(const param_t *restrict G, stat_t limit, int64_t lo, int64_t hi,
                       double *acc) {
    double sq = 0, bad = 0;
    /* bad counts the elements that are NaN (a NaN compares False), inf or above the limit */
#pragma omp simd reduction(+ : sq, bad)
    for (int64_t i = lo; i < hi; i++) {
        stat_t g = load_p(G, i);
        bad += FABS(g) <= limit ? 0.0 : 1.0;
        sq += (double)g * (double)g;
    }
    acc[0] += sq;
    if (bad != 0) acc[1] = 1;
}

static void check_range(const void *vctx, int thread, int64_t t, int64_t lo, int64_t hi) {
    const check_ctx *ctx = vctx;
    check_loop(ctx->grads[t], (stat_t)ctx->limit, lo, hi, ctx->acc + 2 * (int64_t)thread);
}

/* ok[0] = 1 when every gradient is finite with |g| <= limit, else 0; sumsq[0] = the sum of the
 * squares of every element (double; the order of the sum is fixed for a given thread count) */
int ss_grads_ok(int64_t n, void *const *grads, const int64_t *numel, double limit, uint8_t *ok,
                double *sumsq, int nthreads) {
    int threads = threads_for(total_of(n, numel), nthreads);
    double *acc = calloc((size_t)threads * 2, sizeof(double));
    if (!acc) return -1;
    check_ctx ctx = {grads, limit, acc};
    parallel_over(&ctx, check_range, n, numel, nthreads);
    double total = 0;
    int bad = 0;
    for (int k = 0; k < threads; k++) {
        total += acc[2 * k];
        bad |= acc[2 * k + 1] != 0;
    }
    free(acc);
    ok[0] = !bad;
    sumsq[0] = total;
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
    x = x < 4.0f ? x : 4.0f; /* erf(4) = 1 in float32 */
    stat_t poly = x * 0.0000430638f + 0.0002765672f;
    poly = poly * x + 0.0001520143f;
    poly = poly * x + 0.0092705272f;
    poly = poly * x + 0.0422820123f;
    poly = poly * x + 0.0705230784f;
    /* vectorised, the lanes above 4 may be evaluated unclamped and thrown away: Note
     * [subnormals in the kernels] */
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
        stat_t g = l2_grad(raw, p, k.weight_decay);
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
        stat_t d = l2_grad(raw, p, k.weight_decay);
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

