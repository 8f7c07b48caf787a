/* The guard's rollback snapshot (see kernels_common.h).
 *
 * Note [streaming copies]
 *    The snapshot is refreshed every step: a copy of the parameters (and, for a full rollback,
 *    of the optimizer's state) the size of the model. An ordinary store first reads the cache
 *    line it writes, so a copy larger than the caches moves three bytes for every byte it
 *    copies; a non-temporal (streaming) store writes the line without reading it and leaves
 *    the caches to the live tensors, which the optimizer reads next. On the benchmark machine
 *    (benchmarks/bench_speed.py's sets) a copy of 8 MB tensors ran at 8.7 GiB/s with memcpy
 *    and 15.6 GiB/s with streaming stores; below the caches' size memcpy is as fast, so a call
 *    streams only when it copies SS_STREAM_BYTES or more. Streaming stores are x86-64's
 *    (SSE2); elsewhere memcpy. Each range ends with a store fence, before its thread returns.
 */
#include "kernels_common.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#define SS_STREAM_BYTES ((int64_t)16 << 20) /* half the benchmark machine's L3 */

/* ---------------------------------------------------------------------------------------- */
/* The guard's rollback snapshot: p <- snapshot on an alarm, else snapshot <- p              */
/* ---------------------------------------------------------------------------------------- */

typedef struct {
    void *const *params, *const *snapshots;
    int alarm;
    int stream; /* Note [streaming copies] */
} rollback_ctx; /* on an alarm p <- snapshot, else snapshot <- p */

/* memcpy with streaming stores (Note [streaming copies]) */
static void copy_bytes(char *dst, const char *src, int64_t n, int stream) {
#if defined(__SSE2__)
    if (stream) {
        int64_t i = 0;
        while (i < n && ((uintptr_t)(dst + i) & 15)) {
            dst[i] = src[i];
            i++;
        }
        for (; i + 64 <= n; i += 64) {
            __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
            __m128i b = _mm_loadu_si128((const __m128i *)(src + i + 16));
            __m128i c = _mm_loadu_si128((const __m128i *)(src + i + 32));
            __m128i d = _mm_loadu_si128((const __m128i *)(src + i + 48));
            _mm_stream_si128((__m128i *)(dst + i), a);
            _mm_stream_si128((__m128i *)(dst + i + 16), b);
            _mm_stream_si128((__m128i *)(dst + i + 32), c);
            _mm_stream_si128((__m128i *)(dst + i + 48), d);
        }
        _mm_sfence();
        if (i < n) memcpy(dst + i, src + i, (size_t)(n - i));
        return;
    }
#else
    (void)stream;
#endif
    memcpy(dst, src, (size_t)n);
}

static void rollback_range(const void *vctx, int thread, int64_t t, int64_t lo, int64_t hi) {
    (void)thread;
    const rollback_ctx *ctx = vctx;
    char *p = (char *)ctx->params[t] + lo, *snap = (char *)ctx->snapshots[t] + lo;
    if (ctx->alarm)
        copy_bytes(p, snap, hi - lo, ctx->stream);
    else
        copy_bytes(snap, p, hi - lo, ctx->stream);
}

/* Byte counts in nbytes: any dtype. With *hold set (a skipped step: no update to undo
 * later) and no alarm, nothing is copied. */
int ss_rollback(int64_t n, void *const *params, void *const *snapshots, const int64_t *nbytes,
                const uint8_t *alarm, const uint8_t *hold, int nthreads) {
    if (!alarm[0] && hold && hold[0]) return 0;
    rollback_ctx ctx = {params, snapshots, alarm[0] != 0, total_of(n, nbytes) >= SS_STREAM_BYTES};
    parallel_over_grain(&ctx, rollback_range, n, nbytes, nthreads, SS_MIN_COPY_BYTES);
    return 0;
}
