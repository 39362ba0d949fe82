/* tracker_health — the tracker's watch on a queue that does not move: GET
 * /health while jobs are tracked (one per interval, from the /status
 * limiter), RunPod's job and worker counts and the age of the oldest tracked
 * job still IN_QUEUE in /metrics, one warning when workers are unhealthy
 * while jobs wait, the pure read-pause test and the count of jobs waiting
 * IN_QUEUE, and the wake-up that lets paused reads resume when fewer jobs
 * wait (max_queued_jobs). Reply shape: runpod-serverless-api.md
 * §7. Scheduling and the job table are tracker.c's; see include/tracker.h. */
#include "tracker_int.h"
#include "metrics.h"

#include <math.h>
#include <stdlib.h>
#include <time.h>

_Static_assert((int)RUNPOD_HJ_N == (int)METRICS_HEALTH_NJOBS, "one gauge per /health job count");
_Static_assert((int)RUNPOD_HW_N == (int)METRICS_HEALTH_NWORKERS, "one gauge per worker count");

bool tracker_queue_full(long queued, int in_flight, int max_queued_jobs)
{
	return max_queued_jobs > 0 && queued + in_flight >= max_queued_jobs;
}

enum tracker_health_note tracker_health_note(bool warned, long long unhealthy, long in_queue)
{
	if (!warned && unhealthy > 0 && in_queue > 0)
		return TRACKER_HEALTH_WARN;
	if (warned && unhealthy == 0)
		return TRACKER_HEALTH_RECOVERED;
	return TRACKER_HEALTH_QUIET;
}

int tracker_queued_jobs(const struct tracker *t)
{
	return t && t->enabled ? (int)t->by_slot[METRICS_TRACKED_IN_QUEUE] : 0;
}

ev_tstamp tracker_health_at(const struct tracker *t)
{
	if (!t->enabled || t->stopped || t->health_polling || t->health_url[0] == '\0' ||
	    jobtable_count(&t->jobs) == 0)
		return INFINITY;
	return t->health_due;
}

/* Slots of the /status window that polls leave free while /health is
 * polled: its share (TRACKER_HEALTH_SHARE), so a backlog of polls, which
 * takes every slot a sliding window frees, never starves /health. */
int tracker_health_keep(const struct tracker *t)
{
	int keep = (int)(t->cfg->tracker_max_status_per_10s * TRACKER_HEALTH_SHARE);

	if (isinf(tracker_health_at(t)))
		return 0;
	return keep < 1 ? 1 : keep;
}

double tracker_health_interval_s(int interval_ms, int max_status_per_10s)
{
	double share_s = 10.0 / (TRACKER_HEALTH_SHARE * max_status_per_10s);

	return fmax(interval_ms / 1000.0, share_s);
}

static void health_next(struct tracker *t, ev_tstamp now)
{
	double rnd = (double)random() / ((double)RAND_MAX + 1.0);

	t->health_due = now + (0.9 + 0.2 * rnd) *
				      tracker_health_interval_s(t->cfg->tracker_interval_ms,
								t->cfg->tracker_max_status_per_10s);
}

/* Seconds the oldest tracked job has waited IN_QUEUE, -1 when none waits. */
static double oldest_in_queue_s(const struct tracker *t, ev_tstamp now)
{
	struct jt_node *n = jobtable_first(&t->jobs, JT_QUEUED);

	return n ? fmax(0.0, now - n->key[JT_QUEUED]) : -1.0;
}

void tracker_queued_changed(struct tracker *t, long before)
{
	struct jt_node *n = jobtable_first(&t->jobs, JT_QUEUED);

	metrics_set_oldest_in_queue_since(n ? n->key[JT_QUEUED] : 0.0);
	if (t->cfg->tracker_max_queued_jobs > 0 && t->by_slot[METRICS_TRACKED_IN_QUEUE] < before &&
	    t->wake)
		t->wake(t->wake_arg, 0.0);
}

void tracker_health_start(struct tracker *t, ev_tstamp now)
{
	const char *headers[] = { t->auth_header, "Accept: application/json", NULL };
	struct http_request_opts o = {
		.method = "GET",
		.url = t->health_url,
		.headers = headers,
		.connect_timeout_ms = t->cfg->connect_timeout_ms,
		.timeout_ms = t->cfg->request_timeout_ms,
		.ca_file = t->cfg->ca_file,
	};
	struct op *op = tracker_op_new(t, OP_HEALTH, NULL);

	health_next(t, now);
	if (op == NULL || http_start(t->http, &o, tracker_on_health, op) != 0) {
		if (op)
			tracker_op_free(op);
		log_msg_route(t->cfg->route_name, LOG_DEBUG, "health_not_started",
			      "cannot start a /health request; retrying");
		return;
	}
	t->health_polling = true;
	if (log_enabled(LOG_TRACE)) {
		struct log_line *l = log_begin(LOG_TRACE, "http_request");
		log_str(l, "method", "GET");
		log_str(l, "url", t->health_url);
		log_str(l, "route", t->cfg->route_name);
		log_end(l);
	}
}

static void log_counts(struct log_line *l, const struct runpod_health *h)
{
	log_int(l, "unhealthy", h->workers[RUNPOD_HW_UNHEALTHY]);
	log_int(l, "idle", h->workers[RUNPOD_HW_IDLE]);
	log_int(l, "initializing", h->workers[RUNPOD_HW_INITIALIZING]);
	log_int(l, "running", h->workers[RUNPOD_HW_RUNNING]);
	log_int(l, "throttled", h->workers[RUNPOD_HW_THROTTLED]);
	log_int(l, "runpod_in_queue", h->jobs[RUNPOD_HJ_IN_QUEUE]);
}

static void health_ok(struct tracker *t, const struct runpod_health *h, ev_tstamp now)
{
	long in_queue = t->by_slot[METRICS_TRACKED_IN_QUEUE];
	struct log_line *l;

	metrics_set_runpod_health(h->jobs, h->workers);
	if (t->health_failing) {
		t->health_failing = false;
		log_msg_route(t->cfg->route_name, LOG_INFO, "health_recovered",
			      "/health answers again");
	}
	switch (tracker_health_note(t->unhealthy_warned, h->workers[RUNPOD_HW_UNHEALTHY],
				    in_queue)) {
	case TRACKER_HEALTH_WARN:
		t->unhealthy_warned = true;
		l = log_begin_route(t->cfg->route_name, LOG_WARN, "runpod_workers_unhealthy");
		log_counts(l, h);
		log_int(l, "jobs_in_queue", in_queue);
		log_int(l, "oldest_in_queue_s", (long long)oldest_in_queue_s(t, now));
		log_str(l, "msg",
			"RunPod reports unhealthy workers while jobs wait IN_QUEUE: workers "
			"that crash at start look like a long queue; see the endpoint's worker "
			"logs (said once until no worker is unhealthy)");
		log_end(l);
		break;
	case TRACKER_HEALTH_RECOVERED:
		t->unhealthy_warned = false;
		l = log_begin_route(t->cfg->route_name, LOG_INFO, "runpod_workers_recovered");
		log_counts(l, h);
		log_int(l, "jobs_in_queue", in_queue);
		log_end(l);
		break;
	case TRACKER_HEALTH_QUIET:
		break;
	}
}

static void health_failed(struct tracker *t, const struct http_response *r, ev_tstamp now)
{
	struct log_line *l = log_begin_route(t->cfg->route_name,
					     t->health_failing ? LOG_DEBUG : LOG_WARN,
					     "health_failed");
	long long pause_ms;

	log_int(l, "http_status", r->status);
	if (r->code != CURLE_OK)
		log_str(l, "error", r->error);
	else if (r->body_len > 0)
		log_excerpt(l, "body", r->body, r->body_len, BODY_EXCERPT_BYTES);
	if (!t->health_failing)
		log_str(l, "msg",
			"worker counts in /metrics are stale until /health answers again "
			"(further failures at debug level)");
	log_end(l);
	t->health_failing = true;
	if (r->status == 429) { /* the same budget as /status: both wait */
		if (r->retry_after == NULL ||
		    runpod_parse_retry_after(r->retry_after, time(NULL), &pause_ms) != 0)
			pause_ms = t->cfg->tracker_interval_ms;
		if (pause_ms > t->cfg->retry_after_max_ms)
			pause_ms = t->cfg->retry_after_max_ms;
		if (now + pause_ms / 1000.0 > t->paused_until)
			t->paused_until = now + pause_ms / 1000.0;
	}
}

void tracker_on_health(void *arg, const struct http_response *r)
{
	struct op *op = arg;
	struct tracker *t = op->t;
	struct runpod_health h;
	ev_tstamp now;

	tracker_op_free(op);
	if (t == NULL) /* the tracker is gone */
		return;
	now = ev_now(t->loop);
	t->health_polling = false;
	if (r->aborted || t->stopped) {
		/* nothing: shutdown or a reload's abort */
	} else if (r->status == 200 && !r->body_truncated &&
		   runpod_parse_health_reply(r->body, r->body_len, &h) == 0) {
		health_ok(t, &h, now);
	} else {
		health_failed(t, r, now);
	}
	tracker_arm(t);
}
