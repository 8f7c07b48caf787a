/* The guard's rollback snapshot (see kernels_common.h). */
#include "kernels_common.h"

/* ---------------------------------------------------------------------------------------- */
/* The guard's rollback snapshot: p <- snapshot on an alarm, else snapshot <- p              */
/* ---------------------------------------------------------------------------------------- */

typedef struct {
    void *const *params, *const *snapshots;
    int alarm;
} rollback_ctx; /* on an alarm p <- snapshot, else snapshot <- p */

static void rollback_range(const void *vctx, int thread, int64_t t, int64_t lo, int64_t hi) {
    (void)thread;
    const rollback_ctx *ctx = vctx;
    char *p = (char *)ctx->params[t] + lo, *snap = (char *)ctx->snapshots[t] + lo;
    if (ctx->alarm)
        memcpy(p, snap, (size_t)(hi - lo));
    else
        memcpy(snap, p, (size_t)(hi - lo));
}

/* Byte counts in nbytes: any dtype. With *hold set (a skipped step: no update to undo
 * later) and no alarm, nothing is copied. */
int ss_rollback(int64_t n, void *const *params, void *const *snapshots, const int64_t *nbytes,
                const uint8_t *alarm, const uint8_t *hold, int nthreads) {
    if (!alarm[0] && hold && hold[0]) return 0;
    rollback_ctx ctx = {params, snapshots, alarm[0] != 0};
    parallel_over_grain(&ctx, rollback_range, n, nbytes, nthreads, SS_MIN_COPY_BYTES);
    return 0;
}
