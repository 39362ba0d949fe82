/* tracker — see include/tracker.h. */
#include "tracker.h"
#include "log.h"
#include "metrics.h"
#include "pgmq.h"
#include "runpod.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define DUE_SLACK_S 0.001       /* a timer may fire a hair early; that counts as due */
#define DB_RETRY_S 1.0          /* retry of a statement that could not be queued or failed */
#define BODY_EXCERPT_BYTES 256
#define N_SLOTS 4               /* enum metrics_tracked_status */

enum jstate {
	J_LIVE,    /* polled; heartbeats while non-terminal */
	J_RELEASE, /* FAILED/CANCELLED/TIMED_OUT: waits for a database slot to release */
};

struct tjob {
	char id[RUNPOD_JOB_ID_MAX + 1];
	char status[RUNPOD_STATUS_MAX + 1]; /* last seen; IN_QUEUE from the /run reply */
	long long *ids;          /* the messages the job carries (for the log) */
	int n;
	long long *live;         /* those still in the heartbeat (same allocation) */
	int n_live;
	enum jstate state;
	int slot;                /* metrics slot counted for it, -1 when none */
	int vt_len;              /* seconds of the vt last set (by the read or a heartbeat) */
	ev_tstamp vt_until;      /* when that vt runs out: an estimate on the early side */
	ev_tstamp seen_at;       /* last time RunPod said the job is alive */
	ev_tstamp next_poll;     /* key in the polls heap */
	ev_tstamp db_due;        /* key in the db heap */
	int poll_idx, db_idx;    /* heap positions, -1 when not in the heap */
	bool polling;            /* a /status request is in flight */
	bool db_busy;            /* a heartbeat statement is in flight */
	bool hb_parked;          /* heartbeats paused: /status silent for too long */
	struct tjob *hnext;      /* hash chain */
	struct tjob *older, *newer; /* insertion order, for eviction */
};

struct heap {
	struct tjob **v;
	int n, cap;
	bool db;                 /* keyed by db_due (else next_poll) */
};

enum op_kind { OP_STATUS, OP_HEARTBEAT, OP_RELEASE };

/* The context of one request or statement. It names its job by id, never
 * by pointer: the job may be evicted or finished before the answer comes. */
struct op {
	struct tracker *t;       /* NULL once the tracker is freed */
	struct op *prev, *next;
	enum op_kind kind;
	char job_id[RUNPOD_JOB_ID_MAX + 1];
	ev_tstamp sent_at;
	int delay_s;
	long long *ids;          /* statements: the ids sent */
	int n;
};

struct tracker {
	struct ev_loop *loop;
	const struct config *cfg;
	struct http *http;
	struct pg *pg;
	ev_timer timer;
	bool enabled, stopped;
	char auth_header[1100];
	struct tjob **buckets;
	size_t nbuckets;         /* a power of two */
	struct tjob *oldest, *newest;
	int count;
	struct heap polls, db;
	int status_in_flight, db_in_flight;
	struct tracker_bucket bucket;
	ev_tstamp paused_until;  /* after a 429 */
	bool failing;            /* /status failing: warned once per streak */
	long by_slot[N_SLOTS];
	struct op *ops;
	void (*wake)(void *arg, double after_s); /* a read is due then */
	void *wake_arg;
};

/* ---- pure helpers ---- */

double tracker_jittered_s(int interval_ms, double rnd)
{
	return interval_ms / 1000.0 * (0.9 + 0.2 * rnd);
}

static void bucket_refill(struct tracker_bucket *b, double now)
{
	if (now > b->at) {
		b->tokens += (now - b->at) * b->rate;
		if (b->tokens > b->burst)
			b->tokens = b->burst;
		b->at = now;
	}
}

void tracker_bucket_setup(struct tracker_bucket *b, int per_10s, double now, bool keep)
{
	double burst = per_10s / 10 > 1 ? (double)(per_10s / 10) : 1.0;
	double rate = (per_10s - burst) / 10.0;

	if (rate <= 0)
		rate = burst / 10.0;
	if (keep) {
		bucket_refill(b, now);
		if (b->tokens > burst)
			b->tokens = burst;
	} else {
		b->tokens = burst;
	}
	b->burst = burst;
	b->rate = rate;
	b->at = now;
}

bool tracker_bucket_take(struct tracker_bucket *b, double now)
{
	bucket_refill(b, now);
	if (b->tokens < 1.0)
		return false;
	b->tokens -= 1.0;
	return true;
}

double tracker_bucket_wait_s(const struct tracker_bucket *b, double now)
{
	struct tracker_bucket c = *b;

	bucket_refill(&c, now);
	return c.tokens >= 1.0 ? 0.0 : (1.0 - c.tokens) / c.rate;
}

double tracker_heartbeat_at(double vt_until, int vt_seconds)
{
	return vt_until - vt_seconds / 3.0;
}

static double rnd(void)
{
	return (double)random() / ((double)RAND_MAX + 1.0);
}

/* ---- heaps ---- */

static ev_tstamp hkey(const struct heap *h, const struct tjob *j)
{
	return h->db ? j->db_due : j->next_poll;
}

static int *hidx(const struct heap *h, struct tjob *j)
{
	return h->db ? &j->db_idx : &j->poll_idx;
}

static void hset(struct heap *h, int i, struct tjob *j)
{
	h->v[i] = j;
	*hidx(h, j) = i;
}

static void sift_up(struct heap *h, int i)
{
	struct tjob *j = h->v[i];

	while (i > 0) {
		int parent = (i - 1) / 2;
		if (hkey(h, h->v[parent]) <= hkey(h, j))
			break;
		hset(h, i, h->v[parent]);
		i = parent;
	}
	hset(h, i, j);
}

static void sift_down(struct heap *h, int i)
{
	struct tjob *j = h->v[i];

	for (;;) {
		int c = 2 * i + 1;
		if (c >= h->n)
			break;
		if (c + 1 < h->n && hkey(h, h->v[c + 1]) < hkey(h, h->v[c]))
			c++;
		if (hkey(h, j) <= hkey(h, h->v[c]))
			break;
		hset(h, i, h->v[c]);
		i = c;
	}
	hset(h, i, j);
}

/* Room for n entries, so that pushes never fail later. */
static int heap_reserve(struct heap *h, int n)
{
	struct tjob **v;
	int cap = h->cap ? h->cap : 64;

	if (n <= h->cap)
		return 0;
	while (cap < n)
		cap *= 2;
	v = realloc(h->v, (size_t)cap * sizeof(*v));
	if (v == NULL)
		return -1;
	h->v = v;
	h->cap = cap;
	return 0;
}

static void heap_push(struct heap *h, struct tjob *j)
{
	if (*hidx(h, j) >= 0)
		return;
	h->n++;
	hset(h, h->n - 1, j);
	sift_up(h, h->n - 1);
}

static void heap_remove(struct heap *h, struct tjob *j)
{
	int i = *hidx(h, j);
	struct tjob *last;

	if (i < 0)
		return;
	*hidx(h, j) = -1;
	h->n--;
	if (i == h->n)
		return;
	last = h->v[h->n];
	hset(h, i, last);
	sift_up(h, i);
	if (*hidx(h, last) == i)
		sift_down(h, i);
}

static struct tjob *heap_top(const struct heap *h)
{
	return h->n > 0 ? h->v[0] : NULL;
}

/* ---- the job map ---- */

static uint64_t hash(const char *s)
{
	uint64_t h = 1469598103934665603ULL; /* FNV-1a */

	for (; *s; s++)
		h = (h ^ (unsigned char)*s) * 1099511628211ULL;
	return h;
}

static struct tjob *job_find(const struct tracker *t, const char *id)
{
	struct tjob *j = t->buckets[hash(id) & (t->nbuckets - 1)];

	while (j && strcmp(j->id, id) != 0)
		j = j->hnext;
	return j;
}

/* Doubles the buckets when the map is full; keeps the old ones when out of
 * memory (chains just get longer). */
static void map_grow(struct tracker *t)
{
	size_t nb = t->nbuckets * 2;
	struct tjob **b;

	if ((size_t)t->count < t->nbuckets || (b = calloc(nb, sizeof(*b))) == NULL)
		return;
	for (size_t i = 0; i < t->nbuckets; i++) {
		struct tjob *j = t->buckets[i], *next;
		for (; j; j = next) {
			size_t k = hash(j->id) & (nb - 1);
			next = j->hnext;
			j->hnext = b[k];
			b[k] = j;
		}
	}
	free(t->buckets);
	t->buckets = b;
	t->nbuckets = nb;
}

static void map_unlink(struct tracker *t, struct tjob *j)
{
	struct tjob **p = &t->buckets[hash(j->id) & (t->nbuckets - 1)];

	while (*p && *p != j)
		p = &(*p)->hnext;
	if (*p)
		*p = j->hnext;
}

/* ---- metrics ---- */

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

static void set_slot(struct tracker *t, struct tjob *j, int slot)
{
	if (j->slot == slot)
		return;
	if (j->slot >= 0) {
		t->by_slot[j->slot]--;
		metrics_set_tracked_jobs((enum metrics_tracked_status)j->slot, t->by_slot[j->slot]);
	}
	j->slot = slot;
	if (slot >= 0) {
		t->by_slot[slot]++;
		metrics_set_tracked_jobs((enum metrics_tracked_status)slot, t->by_slot[slot]);
	}
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

/* ---- logging ---- */

/* "1,2,3" for the first TRACKER_IDS_PER_LINE ids; more are counted. */
static void log_ids(struct log_line *l, const long long *ids, int n)
{
	char list[TRACKER_IDS_PER_LINE * 21 + 48];
	size_t used = 0;

	if (l == NULL)
		return;
	list[0] = '\0';
	for (int i = 0; i < n && i < TRACKER_IDS_PER_LINE; i++)
		used += (size_t)snprintf(list + used, sizeof(list) - used, "%s%lld", i ? "," : "",
					 ids[i]);
	if (n > TRACKER_IDS_PER_LINE)
		snprintf(list + used, sizeof(list) - used, ",...(%d in all)", n);
	log_str(l, "msg_ids", list);
}

/* ---- jobs ---- */

static void job_remove(struct tracker *t, struct tjob *j)
{
	map_unlink(t, j);
	heap_remove(&t->polls, j);
	heap_remove(&t->db, j);
	if (j->older)
		j->older->newer = j->newer;
	else
		t->oldest = j->newer;
	if (j->newer)
		j->newer->older = j->older;
	else
		t->newest = j->older;
	set_slot(t, j, -1);
	t->count--;
	free(j->ids);
	free(j);
}

static void evict(struct tracker *t, struct tjob *j, const char *why)
{
	struct log_line *l = log_begin(LOG_WARN, "tracker_evicted");

	log_str(l, "job_id", j->id);
	log_str(l, "status", j->status);
	log_ids(l, j->ids, j->n);
	log_int(l, "max_tracked_jobs", t->cfg->tracker_max_tracked_jobs);
	log_str(l, "msg", why);
	log_end(l);
	metrics_inc_tracker_evicted();
	job_remove(t, j);
}

static void poll_later(struct tracker *t, struct tjob *j, ev_tstamp now)
{
	if (j->state != J_LIVE)
		return;
	j->next_poll = now + tracker_jittered_s(t->cfg->tracker_interval_ms, rnd());
	heap_push(&t->polls, j);
}

static void db_at(struct tracker *t, struct tjob *j, ev_tstamp when)
{
	heap_remove(&t->db, j);
	j->db_due = when;
	heap_push(&t->db, j);
}

/* Heartbeats are scheduled while the job lives and has messages left. */
static void schedule_heartbeat(struct tracker *t, struct tjob *j)
{
	if (j->state == J_LIVE && j->n_live > 0 && !j->db_busy && !j->hb_parked)
		db_at(t, j, tracker_heartbeat_at(j->vt_until, j->vt_len));
}

/* ---- ops ---- */

static struct op *op_new(struct tracker *t, enum op_kind kind, const struct tjob *j)
{
	struct op *op = calloc(1, sizeof(*op));

	if (op == NULL)
		return NULL;
	if (kind != OP_STATUS && j->n_live > 0) {
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
	memcpy(op->job_id, j->id, sizeof(op->job_id));
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

static void op_free(struct op *op)
{
	op_unlink(op);
	free(op->ids);
	free(op);
}

/* ---- scheduling ---- */

static void arm(struct tracker *t)
{
	ev_tstamp now = ev_now(t->loop), at = INFINITY;
	struct tjob *p = heap_top(&t->polls), *d = heap_top(&t->db);

	ev_timer_stop(t->loop, &t->timer);
	if (!t->enabled || t->stopped)
		return;
	if (p && t->status_in_flight < t->cfg->tracker_max_concurrent) {
		ev_tstamp token_at = now + tracker_bucket_wait_s(&t->bucket, now);
		at = fmax(p->next_poll, fmax(t->paused_until, token_at));
	}
	if (d && t->db_in_flight < TRACKER_MAX_DB && d->db_due < at)
		at = d->db_due;
	if (isinf(at))
		return;
	ev_timer_set(&t->timer, at > now ? at - now : 0.0, 0.0);
	ev_timer_start(t->loop, &t->timer);
}

static void on_status(void *arg, const struct http_response *r);
static void on_db(void *arg, const long long *ids, int n, const struct pg_error *err);

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

	if (runpod_status_url(t->cfg->base_url, t->cfg->endpoint_id, j->id, url, sizeof(url)) != 0) {
		struct log_line *l = log_begin(LOG_ERROR, "tracker_dropped");
		log_str(l, "job_id", j->id);
		log_ids(l, j->ids, j->n);
		log_str(l, "msg", "the /status URL does not fit; the messages keep their vt");
		log_end(l);
		job_remove(t, j);
		return;
	}
	op = op_new(t, OP_STATUS, j);
	if (op == NULL || http_start(t->http, &o, on_status, op) != 0) {
		if (op)
			op_free(op);
		log_msg(LOG_DEBUG, "status_not_started", "cannot start a /status request; retrying");
		poll_later(t, j, now);
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
	struct op *op = op_new(t, kind, j);

	if (op == NULL)
		return -1;
	op->delay_s = delay_s;
	if (pgmq_set_vt_ids(t->pg, t->cfg->queue_name, op->ids, op->n, delay_s, on_db, op) != 0) {
		op_free(op);
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
			job_remove(t, j); /* the op carries the ids; the job is done */
		else
			db_at(t, j, now + DB_RETRY_S);
		return;
	}
	if (j->n_live == 0)
		return;
	if (now - j->seen_at > stale_s) {
		struct log_line *l = log_begin(LOG_WARN, "heartbeat_paused");
		log_str(l, "job_id", j->id);
		log_ids(l, j->live, j->n_live);
		log_int(l, "silent_s", (long long)(now - j->seen_at));
		log_str(l, "msg", "no /status answer for too long; the messages keep their vt and come "
				  "back when it runs out, unless /status answers again before");
		log_end(l);
		j->hb_parked = true;
		return;
	}
	if (start_statement(t, j, OP_HEARTBEAT, t->cfg->vt_seconds) != 0) {
		db_at(t, j, now + DB_RETRY_S);
		return;
	}
	j->db_busy = true;
}

static void on_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct tracker *t = w->data;
	ev_tstamp now = ev_now(loop);
	struct tjob *j;

	(void)revents;
	if (!t->enabled || t->stopped)
		return;
	while ((j = heap_top(&t->polls)) != NULL &&
	       t->status_in_flight < t->cfg->tracker_max_concurrent &&
	       j->next_poll <= now + DUE_SLACK_S && t->paused_until <= now + DUE_SLACK_S &&
	       tracker_bucket_take(&t->bucket, now)) {
		heap_remove(&t->polls, j);
		start_status(t, j, now);
	}
	while ((j = heap_top(&t->db)) != NULL && t->db_in_flight < TRACKER_MAX_DB &&
	       j->db_due <= now + DUE_SLACK_S) {
		heap_remove(&t->db, j);
		db_work(t, j, now);
	}
	arm(t);
}

/* ---- /status answers ---- */

static void log_transition(const struct tjob *j, const struct runpod_status_reply *rep)
{
	struct log_line *l = log_begin(LOG_INFO, "job_status");

	log_str(l, "job_id", j->id);
	log_str(l, "old", j->status);
	log_str(l, "new", rep->status);
	if (rep->delay_ms >= 0)
		log_int(l, "delay_ms", rep->delay_ms);
	if (rep->execution_ms >= 0)
		log_int(l, "execution_ms", rep->execution_ms);
	log_ids(l, j->ids, j->n);
	log_end(l);
}

/* FAILED, CANCELLED, TIMED_OUT: log the error and bring the messages back
 * after retry_delay_s instead of after their vt. */
static void job_failed(struct tracker *t, struct tjob *j, const struct runpod_status_reply *rep,
		       ev_tstamp now)
{
	int delay = t->cfg->tracker_retry_delay_s;
	double vt_left = j->vt_until - now;
	bool release = j->n_live > 0 && vt_left > delay;
	struct log_line *l = log_begin(LOG_WARN, "job_failed");

	log_str(l, "job_id", j->id);
	log_str(l, "status", rep->status);
	if (rep->error[0])
		log_str(l, "error", rep->error);
	if (rep->error_truncated)
		log_str(l, "error_truncated", "yes");
	log_ids(l, j->ids, j->n);
	if (release)
		log_int(l, "retry_delay_s", delay);
	else if (j->n_live > 0)
		log_str(l, "release", "no: their vt ends sooner");
	else
		log_str(l, "release", "no: the worker deleted or archived them");
	log_end(l);
	if (!release) {
		job_remove(t, j);
		return;
	}
	j->state = J_RELEASE;
	heap_remove(&t->polls, j);
	if (!j->db_busy) /* else when the heartbeat in flight is done */
		db_at(t, j, now);
}

static void status_ok(struct tracker *t, struct tjob *j, const struct runpod_status_reply *rep,
		      ev_tstamp now)
{
	bool terminal = runpod_status_is_terminal(rep->status);

	if (t->failing) {
		t->failing = false;
		log_msg(LOG_INFO, "status_recovered", "/status answers again");
	}
	if (strcmp(rep->status, j->status) != 0) {
		log_transition(j, rep);
		snprintf(j->status, sizeof(j->status), "%s", rep->status);
	}
	if (!terminal) {
		set_slot(t, j, slot_of(j->status));
		j->seen_at = now;
		if (j->hb_parked) {
			j->hb_parked = false;
			schedule_heartbeat(t, j);
		}
		poll_later(t, j, now);
		return;
	}
	set_slot(t, j, -1);
	metrics_inc_tracker_terminal(terminal_of(rep->status));
	if (strcmp(rep->status, "COMPLETED") == 0)
		job_remove(t, j); /* the worker owns the messages */
	else
		job_failed(t, j, rep, now);
}

static void status_expired(struct tracker *t, struct tjob *j)
{
	struct log_line *l = log_begin(LOG_WARN, "job_expired");

	log_str(l, "job_id", j->id);
	log_str(l, "status", j->status);
	log_ids(l, j->ids, j->n);
	log_str(l, "msg", "/status answered 404: tracking ends, the messages keep their vt");
	log_end(l);
	metrics_inc_tracker_terminal(METRICS_TERMINAL_EXPIRED);
	job_remove(t, j);
}

static void status_failed(struct tracker *t, struct tjob *j, const struct http_response *r,
			  ev_tstamp now)
{
	struct log_line *l = log_begin(t->failing ? LOG_DEBUG : LOG_WARN, "status_failed");
	long long pause_ms;

	log_str(l, "job_id", j->id);
	log_int(l, "http_status", r->status);
	if (r->code != CURLE_OK)
		log_str(l, "error", r->error);
	else if (r->body_len > 0)
		log_strn(l, "body", r->body,
			 r->body_len < BODY_EXCERPT_BYTES ? r->body_len : BODY_EXCERPT_BYTES);
	if (!t->failing)
		log_str(l, "msg", "retrying every interval; heartbeats go on from the last status "
				  "(further failures at debug level until /status answers again)");
	log_end(l);
	t->failing = true;
	if (r->status == 429) {
		if (r->retry_after == NULL ||
		    runpod_parse_retry_after(r->retry_after, time(NULL), &pause_ms) != 0)
			pause_ms = t->cfg->tracker_interval_ms;
		if (pause_ms > t->cfg->retry_after_max_ms)
			pause_ms = t->cfg->retry_after_max_ms;
		if (now + pause_ms / 1000.0 > t->paused_until)
			t->paused_until = now + pause_ms / 1000.0;
	}
	poll_later(t, j, now);
}

static void on_status(void *arg, const struct http_response *r)
{
	struct op *op = arg;
	struct tracker *t = op->t;
	struct runpod_status_reply rep;
	struct tjob *j;
	ev_tstamp now;

	if (t == NULL) { /* the tracker is gone */
		op_free(op);
		return;
	}
	now = ev_now(t->loop);
	t->status_in_flight--;
	j = job_find(t, op->job_id);
	op_free(op);
	if (j == NULL) { /* evicted or forgotten meanwhile */
		arm(t);
		return;
	}
	j->polling = false;
	if (r->aborted || t->stopped) {
		poll_later(t, j, now);
	} else if (r->status == 200 && !r->body_truncated &&
		   runpod_parse_status_reply(r->body, r->body_len, &rep) == 0) {
		status_ok(t, j, &rep, now);
	} else if (r->status == 404) {
		status_expired(t, j);
	} else {
		status_failed(t, j, r, now);
	}
	arm(t);
}

/* ---- statement answers ---- */

static int cmp_ll(const void *a, const void *b)
{
	long long x = *(const long long *)a, y = *(const long long *)b;

	return (x > y) - (x < y);
}

/* Keeps in j only the ids set_vt found (the rest were deleted or archived
 * by the worker). sorted: the returned ids, sorted. */
static void keep_found(struct tjob *j, const long long *sorted, int n)
{
	int kept = 0;

	for (int i = 0; i < j->n_live; i++)
		if (n > 0 && bsearch(&j->live[i], sorted, (size_t)n, sizeof(*sorted), cmp_ll))
			j->live[kept++] = j->live[i];
	if (kept < j->n_live) {
		struct log_line *l = log_begin(LOG_DEBUG, "heartbeat_ended");
		log_str(l, "job_id", j->id);
		log_int(l, "messages_gone", j->n_live - kept);
		log_int(l, "messages_left", kept);
		log_end(l);
	}
	j->n_live = kept;
}

static void on_release_done(struct op *op, const long long *ids, int n, const struct pg_error *err)
{
	struct log_line *l;

	if (err) {
		l = log_begin(LOG_ERROR, "early_release_failed");
		log_str(l, "job_id", op->job_id);
		log_str(l, "sqlstate", err->sqlstate);
		log_str(l, "error", err->message);
		log_ids(l, op->ids, op->n);
		log_str(l, "outcome", "visible again after their vt");
		log_end(l);
		return;
	}
	l = log_begin(LOG_INFO, "early_release");
	log_str(l, "job_id", op->job_id);
	log_ids(l, ids, n);
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

void tracker_set_wake(struct tracker *t, void (*wake)(void *arg, double after_s), void *arg)
{
	if (t == NULL)
		return;
	t->wake = wake;
	t->wake_arg = arg;
}

static void on_heartbeat_done(struct tracker *t, struct op *op, struct tjob *j, long long *ids,
			      int n, const struct pg_error *err, ev_tstamp now)
{
	struct log_line *l;

	if (err) {
		l = log_begin(LOG_WARN, "heartbeat_failed");
		log_str(l, "job_id", op->job_id);
		log_str(l, "sqlstate", err->sqlstate);
		log_str(l, "error", err->message);
		log_ids(l, op->ids, op->n);
		log_end(l);
		if (j && j->state == J_LIVE)
			db_at(t, j, now + DB_RETRY_S);
		return;
	}
	if (n > 0) {
		l = log_begin(LOG_INFO, "heartbeat");
		log_str(l, "job_id", op->job_id);
		log_ids(l, ids, n);
		log_int(l, "vt_seconds", op->delay_s);
		log_end(l);
		metrics_inc_tracker_heartbeats();
	}
	if (j == NULL)
		return;
	if (n > 0)
		qsort(ids, (size_t)n, sizeof(*ids), cmp_ll);
	keep_found(j, ids, n);
	/* The statement ran after it was sent: the vt ends no earlier. */
	j->vt_len = op->delay_s;
	j->vt_until = op->sent_at + op->delay_s;
	schedule_heartbeat(t, j);
}

static void on_db(void *arg, const long long *ids, int n, const struct pg_error *err)
{
	struct op *op = arg;
	struct tracker *t = op->t;
	long long *copy = NULL;
	struct tjob *j;
	ev_tstamp now;

	if (t == NULL) {
		op_free(op);
		return;
	}
	now = ev_now(t->loop);
	t->db_in_flight--;
	if (op->kind == OP_RELEASE) {
		on_release_done(op, ids, n, err);
		op_free(op);
		arm(t);
		return;
	}
	j = job_find(t, op->job_id);
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
			db_at(t, j, now);
		else
			job_remove(t, j);
	}
	op_free(op);
	arm(t);
}

/* ---- the API ---- */

static void apply(struct tracker *t, const struct config *cfg, bool keep_tokens)
{
	t->cfg = cfg;
	snprintf(t->auth_header, sizeof(t->auth_header), "Authorization: Bearer %s", cfg->api_key);
	tracker_bucket_setup(&t->bucket, cfg->tracker_max_status_per_10s, ev_now(t->loop),
			     keep_tokens);
}

struct tracker *tracker_new(struct ev_loop *loop, const struct config *cfg, struct http *http,
			    struct pg *pg)
{
	struct tracker *t = calloc(1, sizeof(*t));

	if (t == NULL || (t->buckets = calloc(64, sizeof(*t->buckets))) == NULL) {
		free(t);
		log_msg(LOG_ERROR, "tracker_failed", "out of memory");
		return NULL;
	}
	t->nbuckets = 64;
	t->loop = loop;
	t->http = http;
	t->pg = pg;
	t->db.db = true;
	t->enabled = cfg->tracker_enabled != 0;
	ev_init(&t->timer, on_timer);
	t->timer.data = t;
	apply(t, cfg, false);
	{
		struct log_line *l = log_begin(LOG_INFO, "tracker_started");
		log_int(l, "interval_ms", cfg->tracker_interval_ms);
		log_int(l, "max_tracked_jobs", cfg->tracker_max_tracked_jobs);
		log_int(l, "max_concurrent", cfg->tracker_max_concurrent);
		log_int(l, "max_status_per_10s", cfg->tracker_max_status_per_10s);
		log_int(l, "retry_delay_s", cfg->tracker_retry_delay_s);
		log_end(l);
	}
	return t;
}

void tracker_add(struct tracker *t, const char *job_id, const long long *msg_ids, int n,
		 ev_tstamp read_at)
{
	struct tjob *j;
	ev_tstamp now;

	if (t == NULL || !t->enabled || t->stopped || job_id == NULL || job_id[0] == '\0' || n < 1 ||
	    strlen(job_id) > RUNPOD_JOB_ID_MAX)
		return;
	if (job_find(t, job_id)) {
		log_msg(LOG_DEBUG, "tracker_duplicate", "job %s is tracked already", job_id);
		return;
	}
	while (t->count >= t->cfg->tracker_max_tracked_jobs && t->oldest)
		evict(t, t->oldest, "max_tracked_jobs reached: the oldest job is no longer tracked; its "
				    "messages keep their vt");
	j = calloc(1, sizeof(*j));
	if (j == NULL || (j->ids = malloc(2 * (size_t)n * sizeof(*j->ids))) == NULL ||
	    heap_reserve(&t->polls, t->count + 1) != 0 || heap_reserve(&t->db, t->count + 1) != 0) {
		if (j)
			free(j->ids);
		free(j);
		log_msg(LOG_ERROR, "tracker_add_failed", "out of memory: job %s is not tracked", job_id);
		return;
	}
	now = ev_now(t->loop);
	snprintf(j->id, sizeof(j->id), "%s", job_id);
	snprintf(j->status, sizeof(j->status), "IN_QUEUE"); /* what /run answers (§2.1) */
	memcpy(j->ids, msg_ids, (size_t)n * sizeof(*j->ids));
	j->n = n;
	j->live = j->ids + n;
	memcpy(j->live, msg_ids, (size_t)n * sizeof(*j->live));
	j->n_live = n;
	j->state = J_LIVE;
	j->slot = -1;
	j->poll_idx = j->db_idx = -1;
	j->vt_len = t->cfg->vt_seconds;
	j->vt_until = read_at + j->vt_len;
	j->seen_at = now;
	{
		size_t k = hash(j->id) & (t->nbuckets - 1);
		j->hnext = t->buckets[k];
		t->buckets[k] = j;
	}
	j->older = t->newest;
	if (t->newest)
		t->newest->newer = j;
	else
		t->oldest = j;
	t->newest = j;
	t->count++;
	map_grow(t);
	set_slot(t, j, METRICS_TRACKED_IN_QUEUE);
	poll_later(t, j, now);
	schedule_heartbeat(t, j);
	{
		struct log_line *l = log_begin(LOG_DEBUG, "job_tracked");
		log_str(l, "job_id", j->id);
		log_ids(l, j->ids, j->n);
		log_int(l, "vt_left_ms", (long long)((j->vt_until - now) * 1000.0));
		log_int(l, "tracked", t->count);
		log_end(l);
	}
	arm(t);
}

static void forget_all(struct tracker *t)
{
	while (t->oldest)
		job_remove(t, t->oldest);
}

void tracker_reload(struct tracker *t, const struct config *cfg)
{
	if (t == NULL)
		return;
	apply(t, cfg, true);
	if (!cfg->tracker_enabled && t->enabled) {
		struct log_line *l = log_begin(LOG_INFO, "tracker_disabled");
		log_int(l, "jobs", t->count);
		log_str(l, "msg", "no longer following jobs; their messages keep their vt");
		log_end(l);
		forget_all(t);
		t->enabled = false;
	} else if (cfg->tracker_enabled && !t->enabled) {
		log_msg(LOG_INFO, "tracker_enabled", "following accepted jobs from now on");
		t->enabled = true;
	}
	while (t->count > cfg->tracker_max_tracked_jobs && t->oldest)
		evict(t, t->oldest, "max_tracked_jobs lowered: the oldest job is no longer tracked; its "
				    "messages keep their vt");
	arm(t);
}

void tracker_stop(struct tracker *t)
{
	if (t == NULL || t->stopped)
		return;
	t->stopped = true;
	ev_timer_stop(t->loop, &t->timer);
	{
		struct log_line *l = log_begin(LOG_DEBUG, "tracker_stopped");
		log_int(l, "jobs", t->count);
		log_end(l);
	}
}

int tracker_count(const struct tracker *t)
{
	return t ? t->count : 0;
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
	forget_all(t);
	free(t->polls.v);
	free(t->db.v);
	free(t->buckets);
	free(t);
}
