/* tracker — the API, scheduling, and sending /status requests and set_vt
 * statements; the answers are handled in tracker_reply.c. See
 * include/tracker.h. */
#include "tracker.h"
#include "tracker_int.h"
#include "backoff.h"
#include "budget.h"
#include "log.h"
#include "metrics.h"
#include "pgmq.h"
#include "runpod.h"

#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

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

/* ---- the job table ---- */

static struct tjob *job_of(struct jt_node *n)
{
	return n ? (struct tjob *)(void *)((char *)n - offsetof(struct tjob, node)) : NULL;
}

struct tjob *tracker_job_find(const struct tracker *t, const char *id)
{
	return job_of(jobtable_find(&t->jobs, id));
}

/* ---- metrics ---- */

void tracker_set_slot(struct tracker *t, struct tjob *j, int slot)
{
	long queued_before = t->by_slot[METRICS_TRACKED_IN_QUEUE];

	if (j->slot == slot)
		return;
	if (slot == METRICS_TRACKED_IN_QUEUE)
		jobtable_schedule(&t->jobs, JT_QUEUED, &j->node, j->added_at);
	else
		jobtable_unschedule(&t->jobs, JT_QUEUED, &j->node);
	if (j->slot >= 0) {
		t->by_slot[j->slot]--;
		metrics_set_tracked_jobs((enum metrics_tracked_status)j->slot, t->by_slot[j->slot]);
	}
	j->slot = slot;
	if (slot >= 0) {
		t->by_slot[slot]++;
		metrics_set_tracked_jobs((enum metrics_tracked_status)slot, t->by_slot[slot]);
	}
	tracker_queued_changed(t, queued_before);
}

/* ---- logging ---- */

/* msg_ids=1,2,3 (a JSON array of numbers in JSON logs) for the first
 * TRACKER_IDS_PER_LINE ids; past that, msg_count says how many in all. */
void tracker_log_ids(struct log_line *l, const long long *ids, int n)
{
	if (l == NULL)
		return;
	log_int_list(l, "msg_ids", ids,
		     (size_t)(n < TRACKER_IDS_PER_LINE ? n : TRACKER_IDS_PER_LINE));
	if (n > TRACKER_IDS_PER_LINE)
		log_int(l, "msg_count", n);
}

/* ---- jobs ---- */

void tracker_job_remove(struct tracker *t, struct tjob *j)
{
	jobtable_remove(&t->jobs, &j->node);
	tracker_set_slot(t, j, -1);
	free(j->ids);
	free(j);
}

static void evict(struct tracker *t, struct tjob *j, const char *why)
{
	struct log_line *l = log_begin(LOG_WARN, "tracker_evicted");

	log_str(l, "runpod_job_id", j->id);
	log_str(l, "status", j->status);
	tracker_log_ids(l, j->ids, j->n);
	log_int(l, "max_tracked_jobs", t->cfg->tracker_max_tracked_jobs);
	log_str(l, "msg", why);
	log_end(l);
	metrics_inc_tracker_evicted();
	tracker_job_remove(t, j);
}

void tracker_poll_later(struct tracker *t, struct tjob *j, ev_tstamp now)
{
	if (j->state != J_LIVE)
		return;
	jobtable_schedule(&t->jobs, JT_POLL, &j->node,
			  now + tracker_jittered_s(t->cfg->tracker_interval_ms, backoff_jitter()));
}

void tracker_db_at(struct tracker *t, struct tjob *j, ev_tstamp when)
{
	jobtable_schedule(&t->jobs, JT_DB, &j->node, when);
}

/* Heartbeats are scheduled while the job lives and has messages left. */
void tracker_schedule_heartbeat(struct tracker *t, struct tjob *j)
{
	if (j->state == J_LIVE && j->n_live > 0 && !j->db_busy && !j->hb_parked && !j->hb_ceiling)
		tracker_db_at(t, j, tracker_heartbeat_at(j->vt_until, j->vt_len));
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

/* ---- scheduling ---- */

/* A /status request due at `at` that the fleet budget must allow: when it
 * is due and no slot is held, a grant is asked for and the budget's ready
 * hook re-arms (INFINITY here); otherwise at. */
static ev_tstamp fleet_due(struct tracker *t, ev_tstamp at, ev_tstamp now)
{
	if (t->budget == NULL || at > now + DUE_SLACK_S || budget_has_slot(t->budget, ev_time()))
		return at;
	budget_ask(t->budget, ev_time(), t->cfg->tracker_max_concurrent - t->status_in_flight);
	return INFINITY;
}

void tracker_arm(struct tracker *t)
{
	ev_tstamp now = ev_now(t->loop), at = INFINITY;
	struct jt_node *p = jobtable_first(&t->jobs, JT_POLL), *d = jobtable_first(&t->jobs, JT_DB);

	ev_timer_stop(t->loop, &t->timer);
	if (!t->enabled || t->stopped)
		return;
	if (p && t->status_in_flight < t->cfg->tracker_max_concurrent) {
		double wait_s = 0.0;
		ev_tstamp slot_at = ratelimit_slot_keep(&t->status_rl, now, tracker_health_keep(t),
							&wait_s)
					    ? now
					    : now + wait_s;

		at = fleet_due(t, fmax(p->key[JT_POLL], fmax(t->paused_until, slot_at)), now);
	}
	if (!isinf(tracker_health_at(t))) {
		double wait_s = 0.0;
		ev_tstamp slot_at = ratelimit_slot(&t->status_rl, now, &wait_s) ? now
										: now + wait_s;

		at = fmin(at,
			  fleet_due(t, fmax(tracker_health_at(t), fmax(t->paused_until, slot_at)),
				    now));
	}
	if (d && t->db_in_flight < TRACKER_MAX_DB && d->key[JT_DB] < at)
		at = d->key[JT_DB];
	if (isinf(at))
		return;
	ev_timer_set(&t->timer, at > now ? at - now : 0.0, 0.0);
	ev_timer_start(t->loop, &t->timer);
}

static void start_status(struct tracker *t, struct tjob *j, ev_tstamp now)
{
	const char *headers[] = { t->auth_header, "Accept: application/json", NULL };
	char url[2048];
	struct http_request_opts o = {
		.method = "GET",
		.url = url,
		.headers = headers,
		.connect_timeout_ms = t->cfg->connect_timeout_ms,
		.timeout_ms = t->cfg->request_timeout_ms,
		.ca_file = t->cfg->ca_file,
	};
	struct op *op;

	if (runpod_status_url(t->cfg->base_url, t->cfg->endpoint_id, j->id, url, sizeof(url)) !=
	    0) {
		struct log_line *l = log_begin(LOG_ERROR, "tracker_dropped");
		log_str(l, "runpod_job_id", j->id);
		tracker_log_ids(l, j->ids, j->n);
		log_str(l, "msg", "the /status URL does not fit; the messages keep their vt");
		log_end(l);
		tracker_job_remove(t, j);
		return;
	}
	op = tracker_op_new(t, OP_STATUS, j);
	if (op == NULL || http_start(t->http, &o, tracker_on_status, op) != 0) {
		if (op)
			tracker_op_free(op);
		log_msg(LOG_DEBUG, "status_not_started",
			"cannot start a /status request; retrying");
		tracker_poll_later(t, j, now);
		return;
	}
	j->polling = true;
	t->status_in_flight++;
	if (log_enabled(LOG_TRACE)) {
		struct log_line *l = log_begin(LOG_TRACE, "http_request");
		log_str(l, "method", "GET");
		log_str(l, "url", url);
		log_end(l);
	}
}

/* Queues set_vt for the job's messages; 0, or -1 when it could not be
 * queued (pg's FIFO full, out of memory). */
static int start_statement(struct tracker *t, struct tjob *j, enum op_kind kind, int delay_s)
{
	struct op *op = tracker_op_new(t, kind, j);

	if (op == NULL)
		return -1;
	op->delay_s = delay_s;
	if (pgmq_set_vt_ids(t->pg, t->cfg->queue_name, op->ids, op->n, delay_s, tracker_on_db,
			    op) != 0) {
		tracker_op_free(op);
		return -1;
	}
	t->db_in_flight++;
	return 0;
}

/* A job whose database action is due: its heartbeat or its early release. */
static void db_work(struct tracker *t, struct tjob *j, ev_tstamp now)
{
	double stale_s = fmax(j->vt_len, 3.0 * t->cfg->tracker_interval_ms / 1000.0);

	if (j->state == J_RELEASE) {
		if (start_statement(t, j, OP_RELEASE, t->cfg->tracker_retry_delay_s) == 0)
			tracker_job_remove(t, j); /* the op carries the ids; the job is done */
		else
			tracker_db_at(t, j, now + DB_RETRY_S);
		return;
	}
	if (j->n_live == 0)
		return;
	if (!tracker_heartbeat_allowed(j->added_at, now, t->cfg->tracker_max_heartbeat_s)) {
		struct log_line *l = log_begin(LOG_WARN, "heartbeat_ceiling");
		log_str(l, "runpod_job_id", j->id);
		log_str(l, "status", j->status);
		tracker_log_ids(l, j->live, j->n_live);
		log_int(l, "tracked_s", (long long)(now - j->added_at));
		log_int(l, "max_heartbeat_s", t->cfg->tracker_max_heartbeat_s);
		log_int(l, "vt_left_s", (long long)fmax(0.0, j->vt_until - now));
		log_str(l, "msg",
			"no more vt extensions for this job: its messages become visible "
			"when their vt runs out and are read again; the job is still followed");
		log_end(l);
		metrics_inc_tracker_heartbeat_ceilings();
		j->hb_ceiling = true;
		return;
	}
	if (now - j->seen_at > stale_s) {
		struct log_line *l = log_begin(LOG_WARN, "heartbeat_paused");
		log_str(l, "runpod_job_id", j->id);
		tracker_log_ids(l, j->live, j->n_live);
		log_int(l, "silent_s", (long long)(now - j->seen_at));
		log_str(l, "msg",
			"no /status answer for too long; the messages keep their vt and come "
			"back when it runs out, unless /status answers again before");
		log_end(l);
		j->hb_parked = true;
		return;
	}
	if (start_statement(t, j, OP_HEARTBEAT, t->cfg->vt_seconds) != 0) {
		tracker_db_at(t, j, now + DB_RETRY_S);
		return;
	}
	j->db_busy = true;
}

static void on_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct tracker *t = w->data;
	ev_tstamp now = ev_now(loop);
	double wait_s;
	struct tjob *j;

	(void)revents;
	if (!t->enabled || t->stopped)
		return;
	/* /health first: one request per interval, never starved by the polls. */
	if (tracker_health_at(t) <= now + DUE_SLACK_S && t->paused_until <= now + DUE_SLACK_S &&
	    ratelimit_slot(&t->status_rl, now, &wait_s) && budget_take(t->budget, ev_time(), 1)) {
		ratelimit_record(&t->status_rl, now);
		tracker_health_start(t, now);
	}
	while ((j = job_of(jobtable_first(&t->jobs, JT_POLL))) != NULL &&
	       t->status_in_flight < t->cfg->tracker_max_concurrent &&
	       j->node.key[JT_POLL] <= now + DUE_SLACK_S && t->paused_until <= now + DUE_SLACK_S &&
	       ratelimit_slot_keep(&t->status_rl, now, tracker_health_keep(t), &wait_s) &&
	       budget_take(t->budget, ev_time(),
			   t->cfg->tracker_max_concurrent - t->status_in_flight)) {
		ratelimit_record(&t->status_rl, now);
		jobtable_unschedule(&t->jobs, JT_POLL, &j->node);
		start_status(t, j, now);
	}
	while ((j = job_of(jobtable_first(&t->jobs, JT_DB))) != NULL &&
	       t->db_in_flight < TRACKER_MAX_DB && j->node.key[JT_DB] <= now + DUE_SLACK_S) {
		jobtable_unschedule(&t->jobs, JT_DB, &j->node);
		db_work(t, j, now);
	}
	tracker_arm(t);
}

static void on_fleet_ready(void *arg)
{
	tracker_arm(arg);
}

int tracker_set_fleet(struct tracker *t, const struct config *cfg)
{
	if (t == NULL || !cfg->fleet_enabled || t->budget)
		return 0;
	t->budget = budget_new(t->loop, t->pg, cfg, BUDGET_STATUS, on_fleet_ready, t);
	return t->budget ? 0 : -1;
}

void tracker_set_wake(struct tracker *t, void (*wake)(void *arg, double after_s), void *arg)
{
	if (t == NULL)
		return;
	t->wake = wake;
	t->wake_arg = arg;
}

/* ---- the API ---- */

/* Takes cfg; the limits that need memory come ready in next. */
static void apply(struct tracker *t, const struct config *cfg, struct tracker_next *next)
{
	t->cfg = cfg;
	jobtable_set_limit(&t->jobs, cfg->tracker_max_tracked_jobs);
	if (runpod_url(cfg->base_url, cfg->endpoint_id, "health", t->health_url,
		       sizeof(t->health_url)) != 0)
		t->health_url[0] = '\0';
	free(t->auth_header);
	t->auth_header = next->auth_header;
	next->auth_header = NULL;
	if (next->status_rl.sent_at != NULL) {
		ratelimit_free(&t->status_rl);
		t->status_rl = next->status_rl;
		memset(&next->status_rl, 0, sizeof(next->status_rl));
	}
}

int tracker_reload_prepare(const struct tracker *t, const struct config *cfg,
			   struct tracker_next *next)
{
	memset(next, 0, sizeof(*next));
	if (t == NULL)
		return 0;
	if ((next->auth_header = runpod_auth_header(cfg->api_key)) == NULL ||
	    (cfg->tracker_max_status_per_10s != t->status_rl.cap &&
	     ratelimit_resized(&t->status_rl, cfg->tracker_max_status_per_10s, &next->status_rl) !=
		     0)) {
		tracker_next_free(next);
		return -1;
	}
	return 0;
}

void tracker_next_free(struct tracker_next *next)
{
	if (next == NULL)
		return;
	ratelimit_free(&next->status_rl);
	free(next->auth_header);
	next->auth_header = NULL;
}

struct tracker *tracker_new(struct ev_loop *loop, const struct config *cfg, struct http *http,
			    struct pg *pg)
{
	struct tracker *t = calloc(1, sizeof(*t));
	struct tracker_next next = { 0 };

	if (t == NULL || jobtable_init(&t->jobs, cfg->tracker_max_tracked_jobs) != 0 ||
	    ratelimit_init(&t->status_rl, cfg->tracker_max_status_per_10s,
			   cfg->rate_window_ms / 1000.0 + RATE_MARGIN_S) != 0 ||
	    (next.auth_header = runpod_auth_header(cfg->api_key)) == NULL) {
		if (t) { /* calloc'd: freeing what was not set up is a no-op */
			ratelimit_free(&t->status_rl);
			jobtable_free(&t->jobs);
		}
		free(t);
		log_msg(LOG_ERROR, "tracker_failed", "out of memory");
		return NULL;
	}
	t->loop = loop;
	t->http = http;
	t->pg = pg;
	t->enabled = cfg->tracker_enabled != 0;
	ev_init(&t->timer, on_timer);
	t->timer.data = t;
	apply(t, cfg, &next);
	{
		struct log_line *l = log_begin(LOG_INFO, "tracker_started");
		log_int(l, "interval_ms", cfg->tracker_interval_ms);
		log_int(l, "max_tracked_jobs", cfg->tracker_max_tracked_jobs);
		log_int(l, "max_concurrent", cfg->tracker_max_concurrent);
		log_int(l, "max_status_per_10s", cfg->tracker_max_status_per_10s);
		log_int(l, "retry_delay_s", cfg->tracker_retry_delay_s);
		log_int(l, "max_queued_jobs", cfg->tracker_max_queued_jobs);
		log_int(l, "max_heartbeat_s", cfg->tracker_max_heartbeat_s);
		log_end(l);
	}
	return t;
}

void tracker_add(struct tracker *t, const char *job_id, const long long *msg_ids, int n,
		 ev_tstamp read_at)
{
	tracker_add_dispatch(t, job_id, NULL, msg_ids, n, read_at);
}

void tracker_add_dispatch(struct tracker *t, const char *job_id, const char *dispatch_id,
			  const long long *msg_ids, int n, ev_tstamp read_at)
{
	struct tjob *j;
	ev_tstamp now;

	if (t == NULL || !t->enabled || t->stopped || job_id == NULL || job_id[0] == '\0' ||
	    n < 1 || strlen(job_id) > RUNPOD_JOB_ID_MAX)
		return;
	if (tracker_job_find(t, job_id)) {
		log_msg(LOG_DEBUG, "tracker_duplicate", "job %s is tracked already", job_id);
		return;
	}
	while (jobtable_full(&t->jobs) && jobtable_oldest(&t->jobs))
		evict(t, job_of(jobtable_oldest(&t->jobs)),
		      "max_tracked_jobs reached: the oldest job is no longer tracked; its "
		      "messages keep their vt");
	j = calloc(1, sizeof(*j));
	if (j != NULL) {
		snprintf(j->id, sizeof(j->id), "%s", job_id);
		j->node.id = j->id;
	}
	if (j == NULL || (j->ids = malloc(2 * (size_t)n * sizeof(*j->ids))) == NULL ||
	    jobtable_insert(&t->jobs, &j->node) != 0) {
		if (j)
			free(j->ids);
		free(j);
		log_msg(LOG_ERROR, "tracker_add_failed", "out of memory: job %s is not tracked",
			job_id);
		return;
	}
	now = ev_now(t->loop);
	snprintf(j->status, sizeof(j->status), "IN_QUEUE"); /* what /run answers (§2.1) */
	snprintf(j->dispatch_id, sizeof(j->dispatch_id), "%s", dispatch_id ? dispatch_id : "");
	memcpy(j->ids, msg_ids, (size_t)n * sizeof(*j->ids));
	j->n = n;
	j->live = j->ids + n;
	memcpy(j->live, msg_ids, (size_t)n * sizeof(*j->live));
	j->n_live = n;
	j->state = J_LIVE;
	j->slot = -1;
	j->vt_len = t->cfg->vt_seconds;
	j->vt_until = read_at + j->vt_len;
	j->seen_at = now;
	j->added_at = now;
	tracker_set_slot(t, j, METRICS_TRACKED_IN_QUEUE);
	tracker_poll_later(t, j, now);
	tracker_schedule_heartbeat(t, j);
	{
		struct log_line *l = log_begin(LOG_DEBUG, "job_tracked");
		log_str(l, "runpod_job_id", j->id);
		tracker_log_ids(l, j->ids, j->n);
		log_int(l, "vt_left_ms", (long long)((j->vt_until - now) * 1000.0));
		log_int(l, "tracked", jobtable_count(&t->jobs));
		log_end(l);
	}
	tracker_arm(t);
}

void tracker_add_claimed(struct tracker *t, const char *job_id, const char *dispatch_id,
			 const long long *msg_ids, int n, ev_tstamp read_at, ev_tstamp accepted_at)
{
	struct tjob *j;

	tracker_add_dispatch(t, job_id, dispatch_id, msg_ids, n, read_at);
	j = t ? tracker_job_find(t, job_id) : NULL;
	if (j == NULL || accepted_at >= j->added_at)
		return;
	/* max_heartbeat_s and the job's age count from its real start. */
	j->added_at = accepted_at;
	if (j->slot == METRICS_TRACKED_IN_QUEUE)
		jobtable_schedule(&t->jobs, JT_QUEUED, &j->node, j->added_at);
}

static void forget_all(struct tracker *t)
{
	struct tjob *j;

	while ((j = job_of(jobtable_oldest(&t->jobs))) != NULL)
		tracker_job_remove(t, j);
}

void tracker_reload(struct tracker *t, const struct config *cfg, struct tracker_next *next)
{
	int old_cap;

	if (t == NULL)
		return;
	old_cap = t->cfg->tracker_max_queued_jobs;
	apply(t, cfg, next);
	budget_reload(t->budget, cfg);
	/* Reads paused at the old max_queued_jobs look again now. */
	if (cfg->tracker_max_queued_jobs != old_cap && t->wake)
		t->wake(t->wake_arg, 0.0);
	if (!cfg->tracker_enabled && t->enabled) {
		struct log_line *l = log_begin(LOG_INFO, "tracker_disabled");
		log_int(l, "jobs", jobtable_count(&t->jobs));
		log_str(l, "msg", "no longer following jobs; their messages keep their vt");
		log_end(l);
		forget_all(t);
		t->enabled = false;
	} else if (cfg->tracker_enabled && !t->enabled) {
		log_msg(LOG_INFO, "tracker_enabled", "following accepted jobs from now on");
		t->enabled = true;
	}
	while (jobtable_count(&t->jobs) > cfg->tracker_max_tracked_jobs &&
	       jobtable_oldest(&t->jobs))
		evict(t, job_of(jobtable_oldest(&t->jobs)),
		      "max_tracked_jobs lowered: the oldest job is no longer tracked; its "
		      "messages keep their vt");
	tracker_arm(t);
}

void tracker_stop(struct tracker *t)
{
	if (t == NULL || t->stopped)
		return;
	t->stopped = true;
	ev_timer_stop(t->loop, &t->timer);
	{
		struct log_line *l = log_begin(LOG_DEBUG, "tracker_stopped");
		log_int(l, "jobs", jobtable_count(&t->jobs));
		log_end(l);
	}
}

void tracker_free(struct tracker *t)
{
	if (t == NULL)
		return;
	ev_timer_stop(t->loop, &t->timer);
	/* Requests and statements in flight find op->t NULL and free themselves. */
	for (struct op *op = t->ops, *next; op; op = next) {
		next = op->next;
		op->t = NULL;
		op->prev = op->next = NULL;
	}
	t->wake = NULL; /* forgetting jobs asks for no read now */
	forget_all(t);
	jobtable_free(&t->jobs);
	ratelimit_free(&t->status_rl);
	budget_free(t->budget);
	free(t->auth_header);
	free(t);
}
