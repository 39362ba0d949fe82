/* tracker_reply — what the tracker does with the answers it gets: /status
 * replies (status changes, terminal states, expiry, failures and 429
 * pauses) and the results of its set_vt statements (heartbeats, early
 * releases), each passed on to the observer (the ledger) as the job's
 * new state. Sending, scheduling and the job table are in tracker.c and
 * jobtable.c; see include/tracker.h for the behaviour. */
#include "tracker_int.h"
#include "backoff.h"
#include "metrics.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int slot_of(const char *status)
{
	if (strcmp(status, "IN_QUEUE") == 0)
		return METRICS_TRACKED_IN_QUEUE;
	if (strcmp(status, "IN_PROGRESS") == 0)
		return METRICS_TRACKED_IN_PROGRESS;
	if (strcmp(status, "RUNNING") == 0)
		return METRICS_TRACKED_RUNNING;
	return METRICS_TRACKED_OTHER;
}

static enum metrics_terminal terminal_of(const char *status)
{
	if (strcmp(status, "COMPLETED") == 0)
		return METRICS_TERMINAL_COMPLETED;
	if (strcmp(status, "FAILED") == 0)
		return METRICS_TERMINAL_FAILED;
	if (strcmp(status, "CANCELLED") == 0)
		return METRICS_TERMINAL_CANCELLED;
	return METRICS_TERMINAL_TIMED_OUT;
}

/* ---- /status answers ---- */

static void log_transition(const struct tracker *t, const struct tjob *j,
			   const struct runpod_status_reply *rep)
{
	struct log_line *l = log_begin_route(t->cfg->route_name, LOG_INFO, "job_status");

	log_str(l, "runpod_job_id", j->id);
	log_str(l, "old", j->status);
	log_str(l, "new", rep->status);
	if (rep->delay_ms >= 0)
		log_int(l, "delay_ms", rep->delay_ms);
	if (rep->execution_ms >= 0)
		log_int(l, "execution_ms", rep->execution_ms);
	tracker_log_ids(l, j->ids, j->n);
	log_end(l);
}

/* Whether j's messages come back after retry_delay_s: some are left and
 * their vt does not end sooner anyway. */
static bool release_wanted(const struct tracker *t, const struct tjob *j, ev_tstamp now)
{
	return j->n_live > 0 && j->vt_until - now > t->cfg->tracker_retry_delay_s;
}

/* Adds what happens to j's messages to l. */
static void log_release(struct log_line *l, const struct tracker *t, const struct tjob *j,
			bool release)
{
	if (release)
		log_int(l, "retry_delay_s", t->cfg->tracker_retry_delay_s);
	else if (j->n_live > 0)
		log_str(l, "release", "no: their vt ends sooner");
	else
		log_str(l, "release", "no: the worker deleted or archived them");
}

/* Ends j: its messages become visible after retry_delay_s (one set_vt
 * for the job) when release, else they keep their vt. */
static void end_job(struct tracker *t, struct tjob *j, bool release, ev_tstamp now)
{
	if (!release) {
		tracker_job_remove(t, j);
		return;
	}
	j->state = J_RELEASE;
	jobtable_unschedule(&t->jobs, JT_POLL, &j->node);
	if (!j->db_busy) /* else when the heartbeat in flight is done */
		tracker_db_at(t, j, now);
}

/* FAILED, CANCELLED, TIMED_OUT: log the error and bring the messages back
 * after retry_delay_s instead of after their vt. */
static void job_failed(struct tracker *t, struct tjob *j, const struct runpod_status_reply *rep,
		       ev_tstamp now)
{
	bool release = release_wanted(t, j, now);
	struct log_line *l = log_begin_route(t->cfg->route_name, LOG_WARN, "job_failed");

	log_str(l, "runpod_job_id", j->id);
	log_str(l, "status", rep->status);
	if (rep->error[0])
		log_str(l, "error", rep->error);
	if (rep->error_truncated)
		log_str(l, "error_truncated", "yes");
	tracker_log_ids(l, j->ids, j->n);
	log_release(l, t, j, release);
	log_end(l);
	end_job(t, j, release, now);
}

static void status_ok(struct tracker *t, struct tjob *j, const struct runpod_status_reply *rep,
		      ev_tstamp now)
{
	bool terminal = runpod_status_is_terminal(rep->status);

	if (t->failing) {
		t->failing = false;
		log_msg_route(t->cfg->route_name, LOG_INFO, "status_recovered",
			      "/status answers again");
	}
	if (strcmp(rep->status, j->status) != 0) {
		log_transition(t, j, rep);
		snprintf(j->status, sizeof(j->status), "%s", rep->status);
		tracker_observe(t, j, j->status, rep->error[0] ? rep->error : NULL);
	}
	if (!terminal) {
		tracker_set_slot(t, j, slot_of(j->status));
		j->seen_at = now;
		if (j->hb_parked) {
			j->hb_parked = false;
			tracker_schedule_heartbeat(t, j);
		}
		tracker_poll_later(t, j, now);
		return;
	}
	tracker_set_slot(t, j, -1);
	metrics_inc_tracker_terminal(terminal_of(rep->status));
	if (strcmp(rep->status, "COMPLETED") == 0)
		tracker_job_remove(t, j); /* the worker owns the messages */
	else
		job_failed(t, j, rep, now);
}

/* A 404 before any terminal status: RunPod lost the job (its queue is
 * not durable) or its TTL ran out. Nobody works on the messages: they
 * come back after retry_delay_s, as after FAILED. */
static void status_expired(struct tracker *t, struct tjob *j, ev_tstamp now)
{
	bool release = release_wanted(t, j, now);
	struct log_line *l = log_begin_route(t->cfg->route_name, LOG_WARN, "job_expired");

	log_str(l, "runpod_job_id", j->id);
	log_str(l, "status", j->status);
	tracker_log_ids(l, j->ids, j->n);
	log_str(l, "msg", "/status answered 404: the job was lost or expired; tracking ends");
	log_release(l, t, j, release);
	log_end(l);
	tracker_observe(t, j, "lost", "/status answered 404: the job expired or never existed");
	tracker_set_slot(t, j, -1);
	metrics_inc_tracker_terminal(METRICS_TERMINAL_EXPIRED);
	end_job(t, j, release, now);
}

static void status_failed(struct tracker *t, struct tjob *j, const struct http_response *r,
			  ev_tstamp now)
{
	struct log_line *l = log_begin_route(t->cfg->route_name, t->failing ? LOG_DEBUG : LOG_WARN,
					     "status_failed");

	log_str(l, "runpod_job_id", j->id);
	log_int(l, "http_status", r->status);
	if (r->code != CURLE_OK)
		log_str(l, "error", r->error);
	else if (r->body_len > 0)
		log_strn(l, "body", r->body,
			 r->body_len < BODY_EXCERPT_BYTES ? r->body_len : BODY_EXCERPT_BYTES);
	if (!t->failing)
		log_str(l, "msg",
			"retrying every interval; heartbeats go on from the last status "
			"(further failures at debug level until /status answers again)");
	log_end(l);
	t->failing = true;
	if (r->status == 429) { /* a 503 is a failure like any other: retried next interval */
		long long parsed_ms = -1;
		double pause_ms;

		if (r->retry_after != NULL &&
		    runpod_parse_retry_after(r->retry_after, time(NULL), &parsed_ms) != 0)
			parsed_ms = -1;
		pause_ms = backoff_retry_after_ms((int)r->status, parsed_ms,
						  t->cfg->retry_after_max_ms);
		if (pause_ms < 0)
			pause_ms = t->cfg->tracker_interval_ms;
		if (now + pause_ms / 1000.0 > t->paused_until)
			t->paused_until = now + pause_ms / 1000.0;
	}
	tracker_poll_later(t, j, now);
}

void tracker_on_status(void *arg, const struct http_response *r)
{
	struct op *op = arg;
	struct tracker *t = op->t;
	struct runpod_status_reply rep;
	struct tjob *j;
	ev_tstamp now;

	if (t == NULL) { /* the tracker is gone */
		tracker_op_free(op);
		return;
	}
	now = ev_now(t->loop);
	t->status_in_flight--;
	j = tracker_job_find(t, op->job_id);
	tracker_op_free(op);
	if (j == NULL) { /* evicted or forgotten meanwhile */
		tracker_arm(t);
		return;
	}
	j->polling = false;
	if (r->aborted || t->stopped) {
		tracker_poll_later(t, j, now);
	} else if (r->status == 200 && !r->body_truncated &&
		   runpod_parse_status_reply(r->body, r->body_len, &rep) == 0) {
		status_ok(t, j, &rep, now);
	} else if (r->status == 404) {
		status_expired(t, j, now);
	} else {
		status_failed(t, j, r, now);
	}
	tracker_arm(t);
}

/* ---- statement answers ---- */

static int cmp_ll(const void *a, const void *b)
{
	long long x = *(const long long *)a, y = *(const long long *)b;

	return (x > y) - (x < y);
}

/* Keeps in j only the ids set_vt found (the rest were deleted or archived
 * by the worker). sorted: the returned ids, sorted. */
static void keep_found(const struct tracker *t, struct tjob *j, const long long *sorted, int n)
{
	int kept = 0;

	for (int i = 0; i < j->n_live; i++)
		if (n > 0 && bsearch(&j->live[i], sorted, (size_t)n, sizeof(*sorted), cmp_ll))
			j->live[kept++] = j->live[i];
	if (kept < j->n_live) {
		struct log_line *l = log_begin_route(t->cfg->route_name, LOG_DEBUG,
						     "heartbeat_ended");
		log_str(l, "runpod_job_id", j->id);
		log_int(l, "messages_gone", j->n_live - kept);
		log_int(l, "messages_left", kept);
		log_end(l);
	}
	j->n_live = kept;
}

static void on_release_done(struct op *op, const long long *ids, int n, const struct pg_error *err)
{
	const char *route = op->t ? op->t->cfg->route_name : "";
	struct log_line *l;

	if (err) {
		l = log_begin_route(route, LOG_ERROR, "early_release_failed");
		log_str(l, "runpod_job_id", op->job_id);
		log_str(l, "sqlstate", err->sqlstate);
		log_str(l, "error", err->message);
		tracker_log_ids(l, op->ids, op->n);
		log_str(l, "outcome", "visible again after their vt");
		log_end(l);
		return;
	}
	if (op->t && op->t->observe && op->dispatch_id[0])
		op->t->observe(op->t->observe_arg, op->dispatch_id, "released", NULL);
	l = log_begin_route(route, LOG_INFO, "early_release");
	log_str(l, "runpod_job_id", op->job_id);
	tracker_log_ids(l, ids, n);
	log_int(l, "messages", n);
	log_int(l, "retry_delay_s", op->delay_s);
	log_end(l);
	if (n > 0) {
		metrics_inc_tracker_early_releases();
		/* Nothing notifies when they become visible: ask for a read then. */
		if (op->t && op->t->wake)
			op->t->wake(op->t->wake_arg, op->delay_s + 0.05);
	}
}

static void on_heartbeat_done(struct tracker *t, struct op *op, struct tjob *j, long long *ids,
			      int n, const struct pg_error *err, ev_tstamp now)
{
	struct log_line *l;

	if (err) {
		l = log_begin_route(t->cfg->route_name, LOG_WARN, "heartbeat_failed");
		log_str(l, "runpod_job_id", op->job_id);
		log_str(l, "sqlstate", err->sqlstate);
		log_str(l, "error", err->message);
		tracker_log_ids(l, op->ids, op->n);
		log_end(l);
		if (j && j->state == J_LIVE)
			tracker_db_at(t, j, now + DB_RETRY_S);
		return;
	}
	if (n > 0) {
		l = log_begin_route(t->cfg->route_name, LOG_INFO, "heartbeat");
		log_str(l, "runpod_job_id", op->job_id);
		tracker_log_ids(l, ids, n);
		log_int(l, "vt_seconds", op->delay_s);
		log_end(l);
		metrics_inc_tracker_heartbeats();
	}
	if (j == NULL)
		return;
	if (n > 0)
		qsort(ids, (size_t)n, sizeof(*ids), cmp_ll);
	keep_found(t, j, ids, n);
	/* The statement ran after it was sent: the vt ends no earlier. */
	j->vt_len = op->delay_s;
	j->vt_until = op->sent_at + op->delay_s;
	tracker_schedule_heartbeat(t, j);
}

void tracker_on_db(void *arg, const long long *ids, int n, const struct pg_error *err)
{
	struct op *op = arg;
	struct tracker *t = op->t;
	long long *copy = NULL;
	struct tjob *j;
	ev_tstamp now;

	if (t == NULL) {
		tracker_op_free(op);
		return;
	}
	now = ev_now(t->loop);
	t->db_in_flight--;
	if (op->kind == OP_RELEASE) {
		on_release_done(op, ids, n, err);
		tracker_op_free(op);
		tracker_arm(t);
		return;
	}
	j = tracker_job_find(t, op->job_id);
	if (j)
		j->db_busy = false;
	if (n > 0 && (copy = malloc((size_t)n * sizeof(*copy))) == NULL) {
		struct pg_error oom = { "", "out of memory", true, false };
		on_heartbeat_done(t, op, j, NULL, 0, &oom, now);
	} else {
		if (n > 0)
			memcpy(copy, ids, (size_t)n * sizeof(*copy));
		on_heartbeat_done(t, op, j, copy, n, err, now);
	}
	free(copy);
	/* The job failed while its heartbeat ran: release what is left now. */
	if (j && j->state == J_RELEASE) {
		if (j->n_live > 0)
			tracker_db_at(t, j, now);
		else
			tracker_job_remove(t, j);
	}
	tracker_op_free(op);
	tracker_arm(t);
}

/* ---- the ledger's observer ---- */

void tracker_observe(const struct tracker *t, const struct tjob *j, const char *state,
		     const char *error)
{
	if (t->observe && j && j->dispatch_id[0])
		t->observe(t->observe_arg, j->dispatch_id, state, error);
}

void tracker_set_observer(struct tracker *t, tracker_observer_fn fn, void *arg)
{
	if (t == NULL)
		return;
	t->observe = fn;
	t->observe_arg = arg;
}
