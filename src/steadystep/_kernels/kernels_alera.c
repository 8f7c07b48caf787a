/* ALeRA / Ag-Adam (see kernels_common.h). */
#include "kernels_common.h"

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
 * gradient (not those masked by *skip); found_finite, when given, is a decision made before
 * (every rank's, under torch.distributed) that a step with its gradients would be taken.
 * Returns 0, or -1 when out of memory. */
int ss_alera(int64_t n, void *const *params, void *const *grads, stat_t *const *relaxed,
             stat_t *const *elem_m, stat_t *const *exp_avgs, stat_t *const *exp_avg_sqs,
             float *const *adam_steps, const int64_t *numel, const int64_t *tensor_unit,
             const double *tensor_wd, const double *tensor_lr, stat_t *const *tensor_lr_scale,
             int64_t n_units, stat_t *const *unit_m, float *const *unit_step,
             const double *unit_numel, int64_t n_counters, float *const *counters,
             int64_t n_mirrors, stat_t *const *mirrors, int64_t *skipped, const uint8_t *skip,
             const uint8_t *found_finite, const alera_hyper_t *h, int nthreads) {
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
    if (found_finite && !found_finite[0]) bad = 1; /* every rank's decision (torch.distributed) */
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
