/* The guard's decision of a step in one call (built and loaded with the other kernels: Note
 * [CPU kernels] in _cpu.py).
 *
 * Note [the ladder kernel]
 *    After the detector, the guard decides what to do with the step (Note [the ladder] in
 *    steadystep/ladder.py: skip, roll back and cut, accept a new level, give a cut back),
 *    then writes its state and counters (steadystep/guard.py: CatastropheGuard._decide and
 *    _record). On the device that is about a hundred operations on 0-d tensors, each a
 *    dispatch of a few microseconds on the CPU; this kernel does the same on the CPU in one
 *    call, reading the flags from memory instead of selecting with torch.where. The torch code
 *    is the reference and the path everywhere else (CUDA, torch.compile, an escalation rung,
 *    STEADYSTEP_FUSED=0); tests/test_ladder.py runs both and compares them bitwise: the only
 *    floating-point work is a product, a quotient and a reciprocal in double precision, each
 *    rounded once, as torch does.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels_values.h"

enum { PHASE_NORMAL = 0, PHASE_SUSPECT = 1, PHASE_ROLLED_BACK = 2 };

typedef struct {
    double lr_factor;      /* a cut multiplies the scale by this */
    int64_t accept_after;  /* alarms in a row at the restored weights that make a new level */
    int64_t recover_every; /* calm steps that give one cut back; < 0: never */
    int64_t history;       /* slots of the alarm history */
    int rollback_only;     /* response="rollback": every alarm rolls back and cuts */
    int backtrack;         /* the guard rolls back (counts its rollbacks) */
} ladder_hyper_t;

/* torch.minimum: NaN-propagating */
static double minimum(double a, double b) {
    if (isnan(a) || isnan(b)) return NAN;
    return a < b ? a : b;
}

/* flags (read): alarm, bad_grads. observed: the loss the detector tested (finite or not), loss:
 * the value the history keeps. Written: the flags update, rollback, accept and revert (an alarm
 * not accepted: the detector takes the observation back), and *factor_out, what multiplies the
 * learning-rate scale this step (already applied to *lr_scale). */
int ss_ladder_step(const uint8_t *alarm_p, const uint8_t *bad_grads_p, const void *observed,
                   int observed_code, const void *loss, int loss_code, int64_t *phase,
                   int64_t *waited, double *lr_scale, double *episode_scale, int64_t *calm,
                   int64_t *alarms, int64_t *rollbacks, int64_t *skips, int64_t *level_shifts,
                   int64_t *steps, int64_t *history_step, float *history_loss,
                   const ladder_hyper_t *h, uint8_t *update_out, uint8_t *rollback_out,
                   uint8_t *accept_out, uint8_t *revert_out, double *factor_out) {
    int alarm = alarm_p[0] != 0, bad_grads = bad_grads_p[0] != 0;
    int finite = isfinite(read_value(observed, observed_code)) != 0;
    int64_t ph = *phase, wt = *waited;
    /* ladder.decide */
    int update, rollback, accept;
    int64_t next_phase, waited_next = 0;
    if (h->rollback_only) {
        update = !alarm;
        rollback = alarm;
        accept = 0;
        next_phase = PHASE_NORMAL;
    } else {
        int suspect = ph == PHASE_SUSPECT, rolled = ph == PHASE_ROLLED_BACK;
        int confirmed = wt + 1 >= h->accept_after;
        accept = alarm && rolled && finite && confirmed;
        rollback = alarm && (suspect || (rolled && !finite));
        int skip = alarm && !rollback && !accept;
        next_phase = (rollback || (skip && rolled)) ? PHASE_ROLLED_BACK
                     : skip                         ? PHASE_SUSPECT
                                                    : PHASE_NORMAL;
        if (skip && rolled) waited_next = wt + 1;
        update = !alarm || accept;
    }
    int cut = rollback;
    /* ladder.rescale */
    double scale = *lr_scale;
    double episode = (alarm && ph == PHASE_NORMAL) ? scale : *episode_scale;
    double factor = cut ? h->lr_factor : 1.0;
    if (accept) factor = episode / scale;
    int quiet = update && !accept && next_phase == PHASE_NORMAL;
    int64_t calm_next = quiet ? *calm + 1 : 0;
    if (h->recover_every >= 0 && quiet && calm_next >= h->recover_every && scale < 1.0) {
        factor = minimum(1.0 / h->lr_factor, 1.0 / scale);
        calm_next = 0;
    }
    /* a step the detector did not observe (non-finite gradients) is no evidence */
    int unseen = bad_grads && !alarm;
    if (unseen) {
        next_phase = ph;
        calm_next = *calm;
        waited_next = wt;
        factor = 1.0;
    }
    *lr_scale = scale * factor;
    *phase = next_phase;
    *waited = waited_next;
    *episode_scale = episode;
    *calm = calm_next;
    /* CatastropheGuard._record */
    if (alarm) {
        int64_t i = *alarms % h->history;
        history_step[i] = *steps;
        history_loss[i] = (float)read_value(loss, loss_code);
    }
    *alarms += alarm;
    if (h->backtrack) *rollbacks += rollback;
    *skips += alarm && !rollback && !accept;
    *level_shifts += accept;
    *steps += 1;
    *update_out = (uint8_t)update;
    *rollback_out = (uint8_t)rollback;
    *accept_out = (uint8_t)accept;
    *revert_out = (uint8_t)(alarm && !accept);
    *factor_out = factor;
    return 0;
}
