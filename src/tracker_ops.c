/* tracker_ops — the tracker's pure timing decisions (the jittered poll
 * interval, when a heartbeat is due, whether one is still allowed) and its
 * list of outstanding operations (a /status request or a set_vt statement
 * on its way). Knows nothing of HTTP, SQL or the loop's timers. See
 * include/tracker.h and src/tracker_int.h. */
#include "tracker.h"
#include "tracker_int.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- pure helpers ---- */

double tracker_jittered_s(int interval_ms, double rnd)
{
	return interval_ms / 1000.0 * (0.9 + 0.2 * rnd);
}

double tracker_heartbeat_at(double vt_until, int vt_seconds)
{
	return vt_until - vt_seconds / 3.0;
}

bool tracker_heartbeat_allowed(double accepted_at, double now, int max_heartbeat_s)
{
	return max_heartbeat_s <= 0 || now - accepted_at < max_heartbeat_s;
}

/* ---- ops ---- */

struct op *tracker_op_new(struct tracker *t, enum op_kind kind, const struct tjob *j)
{
	struct op *op = calloc(1, sizeof(*op));

	if (op == NULL)
		return NULL;
	if (j != NULL && kind != OP_STATUS && j->n_live > 0) {
		op->ids = malloc((size_t)j->n_live * sizeof(*op->ids));
		if (op->ids == NULL) {
			free(op);
			return NULL;
		}
		memcpy(op->ids, j->live, (size_t)j->n_live * sizeof(*op->ids));
		op->n = j->n_live;
	}
	op->t = t;
	op->kind = kind;
	if (j != NULL) {
		memcpy(op->job_id, j->id, sizeof(op->job_id));
		memcpy(op->dispatch_id, j->dispatch_id, sizeof(op->dispatch_id));
	}
	op->sent_at = ev_now(t->loop);
	op->next = t->ops;
	if (t->ops)
		t->ops->prev = op;
	t->ops = op;
	return op;
}

static void op_unlink(struct op *op)
{
	struct tracker *t = op->t;

	if (t == NULL)
		return;
	if (op->prev)
		op->prev->next = op->next;
	else
		t->ops = op->next;
	if (op->next)
		op->next->prev = op->prev;
	op->prev = op->next = NULL;
}

void tracker_op_free(struct op *op)
{
	op_unlink(op);
	free(op->ids);
	free(op);
}
