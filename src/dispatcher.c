/* dispatcher — see include/dispatcher.h. */
#include "dispatcher.h"
#include "log.h"
#include "metrics.h"
#include "pgmq.h"
#include "runpod.h"
#include "tracker.h"

#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define BACKOFF_MIN_MS 250.0
#define BODY_EXCERPT_BYTES 256
#define IDS_PER_LINE 100

/* Why reads are paused. */
enum pause_reason { PAUSE_NONE, PAUSE_DB, PAUSE_RUNPOD };

/* LISTEN state of the connection that listens. */
enum notify_state {
	NOTIFY_OFF,     /* not listening (off, or connection down) */
	NOTIFY_TESTING, /* LISTEN sent, waiting for our own self-test NOTIFY */
	NOTIFY_OK,      /* notifications arrive: idle polls may back off */
	NOTIFY_BROKEN,  /* they do not (transaction pooler): poll only */
};

#define SELFTEST_TIMEOUT_S 2.0
#define RATE_WINDOW_S 10.0
#define RATE_MARGIN_S 0.05 /* our send time vs RunPod's receive time */

struct dispatcher {
	struct ev_loop *loop;
	const struct config *cfg;
	struct pg *pg;
	struct http *http;
	struct tracker *tracker; /* NULL unless [tracker] enabled */
	bool once;
	dispatcher_done_fn done;
	void *done_arg;

	char run_url[2048];
	char health_url[2048];
	char auth_header[1100];
	size_t envelope_bytes;  /* the /run body around its jobs */
	struct runpod_envelope envelope; /* printed once per configuration */

	ev_timer poll;          /* periodic trigger */
	ev_timer pause;         /* reads paused until it fires (backoff) */
	ev_timer probe;         /* next /health probe while the circuit is open */
	ev_timer deadline;      /* shutdown deadline */
	ev_timer stats_timer;   /* queue metrics refresh and STATUS counts */
	void (*state_hook)(void *arg);
	void *state_arg;
	bool connected_once;
	bool metrics_pending;   /* a pgmq.metrics query is outstanding */
	long long queue_length; /* from the last pgmq.metrics, -1 unknown */
	enum pause_reason pause_reason;
	bool reading;
	bool read_wanted;       /* a drain read waits for an in-flight slot */
	bool queue_capped;      /* reads pause: tracker.max_queued_jobs jobs wait IN_QUEUE */
	bool stopping;
	bool finished;
	bool once_read_done;
	bool circuit_open;
	bool deadline_passed;   /* shutdown: stop waiting for the database */
	bool probing;           /* a /health request is in flight */
	int probe_failures;
	int in_flight;          /* /run requests outstanding */
	int db_pending;         /* set_vt / archive statements outstanding */
	int failures;           /* consecutive failures behind the current pause */
	enum dispatcher_result once_result;

	struct dispatcher_stats stats;

	/* NOTIFY wake-up */
	struct pg *listen_pg;   /* separate LISTEN connection, or NULL */
	char channel[96];       /* pgmq.q_<lower(queue)>.INSERT (pgmq 1.7 - 1.13.0) */
	char channel2[96];      /* pgmq.q_<queue as created>.INSERT (1.13.1), if different */
	bool has_trigger;       /* the queue table has an insert trigger to notify us */
	bool no_trigger_logged;
	char selftest[64];      /* payload of our own test notification */
	enum notify_state notify_state;
	bool notify_broken_logged;
	ev_timer debounce;
	ev_timer wake_timer;    /* a read when released messages come back */
	ev_timer selftest_timer;
	double idle_poll_ms;    /* current poll period (backs off while idle) */
	bool again;             /* a trigger arrived during a read */

	/* /run rate cap: send times of the last max_requests_per_10s requests */
	double *sent_at;
	int rate_cap, sent_head, sent_count;
	ev_timer rate_timer;
	struct batch *waiting, *waiting_tail; /* read, waiting for a rate slot */
	int nwaiting;
};

/* The rows of one read, shared by the requests it was split into. */
struct read_result {
	struct pgmq_batch rows;
	int refs;
};

/* Messages on their way to one outcome: a /run request, a release or an
 * archive. msgs point into rr's PGresult. */
struct batch {
	struct dispatcher *d;
	struct batch *next;     /* in the rate-cap waiting list */
	enum metrics_archive_reason archive_reason;
	struct read_result *rr;
	struct pgmq_message *msgs;
	long long *ids;
	int n;
	ev_tstamp started;
	ev_tstamp read_at;      /* when the read returned: the vt runs from here */
};

static void kick(struct dispatcher *d);
static void maybe_finish(struct dispatcher *d);
static void on_posted(void *arg, const struct http_response *r);
static void reset_idle(struct dispatcher *d);
static void idle_read(struct dispatcher *d);

static void state_changed(struct dispatcher *d)
{
	if (d->state_hook && !d->finished)
		d->state_hook(d->state_arg);
}
static void start_probe_timer(struct dispatcher *d);

double dispatcher_backoff_ms(int failures, double base_ms, double cap_ms, double min_ms, double rnd)
{
	double ceiling = base_ms * pow(2.0, failures < 1 ? 0 : (failures > 30 ? 30 : failures - 1));

	if (ceiling > cap_ms)
		ceiling = cap_ms;
	ceiling *= rnd;
	return ceiling < min_ms ? min_ms : ceiling;
}

static double jitter(void)
{
	return (double)random() / ((double)RAND_MAX + 1.0);
}

static void read_result_unref(struct read_result *rr)
{
	if (rr && --rr->refs == 0) {
		pgmq_batch_free(&rr->rows);
		free(rr);
	}
}

static void batch_free(struct batch *b)
{
	read_result_unref(b->rr);
	free(b->msgs);
	free(b->ids);
	free(b);
}

/* A batch of n messages (copied) from rr; NULL when out of memory. */
static struct batch *batch_new(struct dispatcher *d, struct read_result *rr,
			       const struct pgmq_message *msgs, int n)
{
	struct batch *b = calloc(1, sizeof(*b));

	if (b == NULL)
		return NULL;
	b->msgs = malloc((size_t)n * sizeof(*b->msgs));
	b->ids = malloc((size_t)n * sizeof(*b->ids));
	if (b->msgs == NULL || b->ids == NULL) {
		free(b->msgs);
		free(b->ids);
		free(b);
		return NULL;
	}
	b->d = d;
	b->rr = rr;
	rr->refs++;
	b->n = n;
	b->started = b->read_at = ev_now(d->loop);
	for (int i = 0; i < n; i++) {
		b->msgs[i] = msgs[i];
		b->ids[i] = msgs[i].msg_id_num;
	}
	return b;
}

/* Logs msg ids in lines of IDS_PER_LINE, so that no id of a batch whose
 * fate needs explaining is cut from the log. */
static void log_ids(enum log_level level, const char *event, const struct dispatcher *d,
		    const long long *ids, int n, const char *why)
{
	char list[IDS_PER_LINE * 21];

	for (int i = 0; i < n; i += IDS_PER_LINE) {
		size_t used = 0;
		struct log_line *l;

		for (int j = i; j < n && j < i + IDS_PER_LINE; j++)
			used += (size_t)snprintf(list + used, sizeof(list) - used, "%s%lld",
						 j > i ? "," : "", ids[j]);
		l = log_begin(level, event);
		log_str(l, "queue", d->cfg->queue_name);
		log_str(l, "outcome", why);
		log_str(l, "msg_ids", list);
		log_end(l);
	}
}

/* Pauses reads. A failure while a pause is already running does not make
 * the pause longer: the endpoint, not each batch, backs off. Returns the
 * pause left, in ms. hint_ms >= 0 (a Retry-After) replaces the exponential
 * delay. */
static double back_off(struct dispatcher *d, enum pause_reason why, double hint_ms)
{
	double ms;

	if (ev_is_active(&d->pause))
		return ev_timer_remaining(d->loop, &d->pause) * 1000.0;
	d->failures++;
	if (hint_ms >= 0)
		ms = hint_ms < BACKOFF_MIN_MS ? BACKOFF_MIN_MS : hint_ms;
	else
		ms = dispatcher_backoff_ms(d->failures, d->cfg->backoff_base_ms, d->cfg->backoff_max_ms,
					   BACKOFF_MIN_MS, jitter());
	d->pause_reason = why;
	ev_timer_set(&d->pause, ms / 1000.0, 0.0);
	ev_timer_start(d->loop, &d->pause);
	return ms;
}

/* A set_vt or archive statement failed (also while shutting down): one
 * line with the error, then every msg id with why it stays invisible. */
static void log_statement_failed(const struct dispatcher *d, const char *event,
				 const struct pg_error *err, const struct batch *b, const char *why)
{
	char ids_event[64];
	struct log_line *l = log_begin(LOG_ERROR, event);

	log_str(l, "queue", d->cfg->queue_name);
	log_str(l, "sqlstate", err->sqlstate);
	log_str(l, "error", err->message);
	log_end(l);
	snprintf(ids_event, sizeof(ids_event), "%s_ids", event);
	log_ids(LOG_ERROR, ids_event, d, b->ids, b->n, why);
}

static void on_released(void *arg, long count, const struct pg_error *err)
{
	struct batch *b = arg;
	struct dispatcher *d = b->d;

	d->db_pending--;
	if (err) {
		log_statement_failed(d, "release_failed", err, b, "visible again after vt_seconds");
	} else if (!d->finished) {
		struct log_line *l = log_begin(LOG_DEBUG, "released");
		log_str(l, "queue", d->cfg->queue_name);
		log_int(l, "messages", count);
		log_end(l);
		d->stats.messages_released += (unsigned long long)count;
		metrics_add_messages_released((unsigned)count);
	}
	batch_free(b);
	maybe_finish(d);
}

/* Makes the batch's messages visible again after delay_s (one statement). */
static void release(struct dispatcher *d, struct batch *b, int delay_s)
{
	if (pgmq_set_vt(d->pg, d->cfg->queue_name, b->ids, b->n, delay_s, on_released, b) != 0) {
		log_msg(LOG_ERROR, "release_failed", "cannot queue set_vt");
		log_ids(LOG_ERROR, "release_failed_ids", d, b->ids, b->n,
			"visible again after vt_seconds");
		batch_free(b);
		return;
	}
	d->db_pending++;
}

static void on_archived(void *arg, long count, const struct pg_error *err)
{
	struct batch *b = arg;
	struct dispatcher *d = b->d;

	d->db_pending--;
	if (err) {
		log_statement_failed(d, "archive_failed", err, b,
				     "visible again after vt_seconds, archived then");
	} else if (!d->finished) {
		d->stats.messages_archived += (unsigned long long)count;
		metrics_add_messages_archived(b->archive_reason, (unsigned)count);
	}
	batch_free(b);
	maybe_finish(d);
}

/* Moves messages that must never be dispatched to the archive table. */
static void archive(struct dispatcher *d, struct read_result *rr, const struct pgmq_message *msgs,
		    int n, enum metrics_archive_reason reason)
{
	struct batch *b;

	if (n == 0)
		return;
	b = batch_new(d, rr, msgs, n);
	if (b)
		b->archive_reason = reason;
	if (b == NULL || pgmq_archive(d->pg, d->cfg->queue_name, b->ids, n, on_archived, b) != 0) {
		log_msg(LOG_ERROR, "archive_failed", "cannot queue pgmq.archive for %d messages; "
			"they come back after vt_seconds", n);
		if (b)
			batch_free(b);
		return;
	}
	d->db_pending++;
}

static void log_outcome(struct dispatcher *d, const struct batch *b, enum runpod_outcome outcome,
			const struct http_response *r, const struct runpod_run_reply *reply,
			double retry_in_ms)
{
	static const char *const events[] = { "batch_accepted", "batch_rejected",
					      "batch_outcome_unknown" };
	enum log_level level = outcome == RUNPOD_ACCEPTED ? LOG_INFO : LOG_WARN;
	struct log_line *l = log_begin(level, events[outcome]);
	long long duration = (long long)((ev_now(d->loop) - b->started) * 1000.0 + 0.5);

	log_str(l, "queue", d->cfg->queue_name);
	if (outcome == RUNPOD_ACCEPTED) {
		log_str(l, "runpod_job_id", reply->id);
		log_str(l, "status", reply->status);
	} else {
		log_str(l, "outcome", runpod_outcome_name(outcome));
	}
	log_int(l, "jobs", b->n);
	log_int(l, "first_msg_id", b->ids[0]);
	log_int(l, "last_msg_id", b->ids[b->n - 1]);
	log_int(l, "http_status", r->status);
	log_int(l, "duration_ms", duration);
	if (r->code != CURLE_OK) {
		log_int(l, "curl_code", r->code);
		log_str(l, "error", r->error);
		log_str(l, "request_sent", r->request_sent ? "yes" : "no");
		if (r->resend_refused)
			log_str(l, "resend", "refused: the connection died after the request was sent");
	}
	if (outcome != RUNPOD_ACCEPTED && r->body_len > 0)
		log_excerpt(l, "body", r->body, r->body_len, BODY_EXCERPT_BYTES);
	if (outcome == RUNPOD_REJECTED) {
		log_int(l, "released_for_ms", (long long)retry_in_ms);
		if (r->retry_after)
			log_str(l, "retry_after", r->retry_after);
	}
	log_end(l);
}

/* Circuit breaker: the key or endpoint is wrong; read nothing until a
 * /health probe (or a reload) shows it usable. */
static void open_circuit(struct dispatcher *d, const struct http_response *r)
{
	struct log_line *l;

	if (d->circuit_open)
		return;
	d->circuit_open = true;
	d->probe_failures = 0;
	metrics_set_circuit_open(true);
	l = log_begin(LOG_ERROR, "circuit_open");
	log_str(l, "endpoint_id", d->cfg->endpoint_id);
	log_int(l, "http_status", r->status);
	log_str(l, "msg", "RunPod refuses the API key or the endpoint; no reads until a /health "
			  "probe succeeds or the configuration is reloaded");
	log_end(l);
	start_probe_timer(d);
	state_changed(d);
}

static void close_circuit(struct dispatcher *d, const char *why)
{
	struct log_line *l;

	if (!d->circuit_open)
		return;
	d->circuit_open = false;
	metrics_set_circuit_open(false);
	ev_timer_stop(d->loop, &d->probe);
	d->failures = 0;
	ev_timer_stop(d->loop, &d->pause);
	l = log_begin(LOG_INFO, "circuit_closed");
	log_str(l, "endpoint_id", d->cfg->endpoint_id);
	log_str(l, "reason", why);
	log_end(l);
	state_changed(d);
	kick(d);
}

static void on_probe_done(void *arg, const struct http_response *r)
{
	struct dispatcher *d = arg;
	struct log_line *l;

	d->probing = false;
	if (d->finished || d->stopping) {
		maybe_finish(d);
		return;
	}
	l = log_begin(LOG_DEBUG, "health_probe");
	log_int(l, "http_status", r->status);
	if (r->code != CURLE_OK)
		log_str(l, "error", r->error);
	log_end(l);
	if (r->status >= 200 && r->status < 300 && r->code == CURLE_OK)
		close_circuit(d, "health probe succeeded");
	else if (d->circuit_open)
		start_probe_timer(d);
}

static void probe_now(struct dispatcher *d)
{
	const char *headers[] = { d->auth_header, "Accept: application/json", NULL };
	struct http_request_opts o = {
		.method = "GET",
		.url = d->health_url,
		.headers = headers,
		.connect_timeout_ms = d->cfg->connect_timeout_ms,
		.timeout_ms = d->cfg->request_timeout_ms,
		.ca_file = d->cfg->ca_file,
	};

	if (d->probing || !d->circuit_open)
		return;
	if (http_start(d->http, &o, on_probe_done, d) != 0) {
		start_probe_timer(d);
		return;
	}
	d->probing = true;
}

static void on_probe_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)loop;
	(void)revents;
	probe_now(w->data);
}

/* Probes back off from backoff_base_ms up to probe_interval_ms. */
static void start_probe_timer(struct dispatcher *d)
{
	double ms = dispatcher_backoff_ms(++d->probe_failures, d->cfg->backoff_base_ms,
					  d->cfg->probe_interval_ms, BACKOFF_MIN_MS, 1.0);

	ms *= 0.5 + 0.5 * jitter();
	ev_timer_stop(d->loop, &d->probe);
	ev_timer_set(&d->probe, ms / 1000.0, 0.0);
	ev_timer_start(d->loop, &d->probe);
}

/* The pause a 429 or 503 asks for, capped; -1 to use our own backoff. */
static double retry_after_ms(const struct dispatcher *d, const struct http_response *r)
{
	long long ms;

	if (d->cfg->retry_after_max_ms == 0 || (r->status != 429 && r->status != 503) ||
	    r->retry_after == NULL ||
	    runpod_parse_retry_after(r->retry_after, time(NULL), &ms) != 0)
		return -1;
	return ms > d->cfg->retry_after_max_ms ? d->cfg->retry_after_max_ms : (double)ms;
}

static void on_posted(void *arg, const struct http_response *r)
{
	struct batch *b = arg;
	struct dispatcher *d = b->d;
	struct runpod_run_reply reply;
	struct runpod_attempt a = {
		.http_status = r->status,
		.transport_error = r->code != CURLE_OK,
		.connected = r->connected,
		.request_sent = r->request_sent,
	};
	enum runpod_outcome outcome;
	double pause_ms = 0;

	d->in_flight--;
	metrics_set_in_flight(d->in_flight);
	memset(&reply, 0, sizeof(reply));
	if (r->status >= 200 && r->status < 300 && !r->body_truncated)
		a.reply_parsed = runpod_parse_run_reply(r->body, r->body_len, &reply) == 0;
	outcome = r->aborted ? RUNPOD_UNKNOWN : runpod_classify(&a);
	/* 401/403/404 open the circuit instead: released at once, no pause. */
	if (outcome == RUNPOD_REJECTED && !d->stopping && !d->finished &&
	    !runpod_is_config_error(r->status))
		pause_ms = back_off(d, PAUSE_RUNPOD, retry_after_ms(d, r));
	log_outcome(d, b, outcome, r, &reply, pause_ms);
	metrics_inc_requests((enum metrics_outcome)outcome, r->status);
	metrics_observe_request_seconds(r->total_ms / 1000.0);
	if (log_enabled(LOG_TRACE)) {
		struct log_line *l = log_begin(LOG_TRACE, "http_response");
		log_int(l, "http_status", r->status);
		log_int(l, "body_bytes", (long long)r->body_len);
		log_int(l, "connect_ms", r->connect_ms);
		log_int(l, "first_byte_ms", r->first_byte_ms);
		log_int(l, "total_ms", r->total_ms);
		log_end(l);
	}

	switch (outcome) {
	case RUNPOD_ACCEPTED:
		d->stats.requests_accepted++;
		d->stats.messages_accepted += (unsigned long long)b->n;
		metrics_add_messages_dispatched((unsigned)b->n);
		if (d->pause_reason == PAUSE_RUNPOD && !ev_is_active(&d->pause))
			d->failures = 0;
		if (d->once)
			d->once_result = DISPATCH_DONE_DISPATCHED;
		/* started is reset when the POST leaves (after a rate-cap wait);
		 * the vt has run since the read. */
		tracker_add(d->tracker, reply.id, b->ids, b->n, b->read_at);
		batch_free(b);
		break;
	case RUNPOD_UNKNOWN:
		d->stats.requests_unknown++;
		log_ids(LOG_WARN, "outcome_unknown_ids", d, b->ids, b->n,
			"unknown: a job may exist, messages keep their vt");
		if (d->once && d->once_result != DISPATCH_DONE_DISPATCHED)
			d->once_result = DISPATCH_DONE_UNKNOWN;
		batch_free(b);
		break;
	case RUNPOD_REJECTED:
		/* No job was created: bring the messages back after the pause
		 * instead of after vt_seconds, and read no more until then. */
		d->stats.requests_rejected++;
		if (d->once && d->once_result == DISPATCH_DONE_EMPTY)
			d->once_result = DISPATCH_DONE_FAILED;
		if (d->finished) {
			batch_free(b);
		} else {
			/* For 401/403/404 the open circuit stops our reads; the
			 * messages go back at once (another replica may be
			 * configured well). */
			if (runpod_is_config_error(r->status))
				open_circuit(d, r);
			release(d, b, (int)ceil(pause_ms / 1000.0));
		}
		break;
	}
	if (d->stopping || d->once || d->finished)
		maybe_finish(d);
	else if (d->read_wanted)
		kick(d); /* the drain was waiting for this slot */
}

/* Sliding-window rate cap: true when fewer than max_requests_per_10s
 * requests went out in the last 10 s; otherwise *wait_s is when a slot
 * frees. Exact, unlike a token bucket, whose burst would allow twice the
 * cap in some window. */
static bool rate_slot(struct dispatcher *d, double now, double *wait_s)
{
	double oldest;

	if (d->sent_count < d->rate_cap)
		return true;
	oldest = d->sent_at[d->sent_head];
	if (now - oldest >= RATE_WINDOW_S + RATE_MARGIN_S)
		return true;
	*wait_s = oldest + RATE_WINDOW_S + RATE_MARGIN_S - now;
	return false;
}

static void rate_record(struct dispatcher *d, double now)
{
	if (d->sent_count < d->rate_cap) {
		d->sent_at[(d->sent_head + d->sent_count) % d->rate_cap] = now;
		d->sent_count++;
	} else {
		d->sent_at[d->sent_head] = now;
		d->sent_head = (d->sent_head + 1) % d->rate_cap;
	}
}

/* Sends one batch now (a rate slot is free). in_flight already counts it. */
static void send_now(struct dispatcher *d, struct batch *b)
{
	const char *headers[] = { d->auth_header, "Content-Type: application/json",
				  "Accept: application/json", NULL };
	struct http_request_opts o = {
		.method = "POST",
		.url = d->run_url,
		.headers = headers,
		.connect_timeout_ms = d->cfg->connect_timeout_ms,
		.timeout_ms = d->cfg->request_timeout_ms,
		.ca_file = d->cfg->ca_file,
	};

	o.body = runpod_envelope_body(&d->envelope, b->msgs, b->n, &o.body_len);
	if (o.body == NULL || http_start(d->http, &o, on_posted, b) != 0) {
		/* Nothing was sent: the messages come back at once. */
		log_msg(LOG_ERROR, "post_failed", "cannot start the /run request; releasing %d messages",
			b->n);
		d->in_flight--;
		metrics_set_in_flight(d->in_flight);
		back_off(d, PAUSE_RUNPOD, -1);
		release(d, b, 0);
		return;
	}
	rate_record(d, ev_now(d->loop));
	b->started = ev_now(d->loop);
	if (log_enabled(LOG_TRACE)) {
		struct log_line *l = log_begin(LOG_TRACE, "http_request");
		log_str(l, "method", "POST");
		log_str(l, "url", d->run_url);
		log_int(l, "body_bytes", (long long)o.body_len);
		log_int(l, "jobs", b->n);
		log_end(l);
	}
}

static void send_waiting(struct dispatcher *d)
{
	double wait_s = 0;

	while (d->waiting && rate_slot(d, ev_now(d->loop), &wait_s)) {
		struct batch *b = d->waiting;
		d->waiting = b->next;
		if (d->waiting == NULL)
			d->waiting_tail = NULL;
		d->nwaiting--;
		b->next = NULL;
		send_now(d, b);
	}
	if (d->waiting && !ev_is_active(&d->rate_timer)) {
		ev_timer_set(&d->rate_timer, wait_s, 0.0);
		ev_timer_start(d->loop, &d->rate_timer);
	}
}

static void on_rate_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)loop;
	(void)revents;
	send_waiting(w->data);
}

/* Queues a batch behind the rate cap and sends what may go now. Waiting
 * batches count as in flight, so max_in_flight bounds memory. */
static void post(struct dispatcher *d, struct batch *b)
{
	d->in_flight++;
	metrics_set_in_flight(d->in_flight);
	b->next = NULL;
	if (d->waiting_tail)
		d->waiting_tail->next = b;
	else
		d->waiting = b;
	d->waiting_tail = b;
	d->nwaiting++;
	send_waiting(d);
	if (d->waiting) {
		struct log_line *l = log_begin(LOG_DEBUG, "rate_limited");
		log_int(l, "waiting", d->nwaiting);
		log_int(l, "max_requests_per_10s", d->rate_cap);
		log_end(l);
	}
}

/* Hands batches that never went out back to the queue (shutdown). */
static void release_waiting(struct dispatcher *d)
{
	while (d->waiting) {
		struct batch *b = d->waiting;
		d->waiting = b->next;
		d->nwaiting--;
		d->in_flight--;
		release(d, b, 0);
	}
	d->waiting_tail = NULL;
	ev_timer_stop(d->loop, &d->rate_timer);
	metrics_set_in_flight(d->in_flight);
}

static void log_archive(const struct dispatcher *d, const struct pgmq_message *m, const char *reason,
			size_t bytes)
{
	struct log_line *l = log_begin(LOG_ERROR, "message_archived");

	log_str(l, "queue", d->cfg->queue_name);
	log_str(l, "msg_id", m->msg_id);
	log_str(l, "reason", reason);
	log_str(l, "read_ct", m->read_ct);
	if (bytes) {
		log_int(l, "body_bytes", (long long)bytes);
		log_int(l, "max_body_bytes", d->cfg->max_body_bytes);
	} else {
		log_int(l, "max_read_ct", d->cfg->max_read_ct);
	}
	log_end(l);
}

/* Splits the rows of a read into /run requests no larger than
 * max_body_bytes (in msg_id order) and archives the messages that must
 * never be dispatched: read more than max_read_ct times, or too large to
 * fit a request on their own. */
static void dispatch_rows(struct dispatcher *d, struct read_result *rr)
{
	struct pgmq_batch *rows = &rr->rows;
	struct pgmq_message *keep = malloc((size_t)rows->n * sizeof(*keep));
	struct pgmq_message *drop = malloc((size_t)rows->n * sizeof(*drop));
	struct pgmq_message *poison = malloc((size_t)rows->n * sizeof(*poison));
	struct pgmq_message *bad = malloc((size_t)rows->n * sizeof(*bad));
	size_t limit = (size_t)d->cfg->max_body_bytes;
	int *ends = malloc((size_t)rows->n * sizeof(*ends));
	int nkeep = 0, ndrop = 0, npoison = 0, nbad = 0, runs;

	if (keep == NULL || drop == NULL || poison == NULL || bad == NULL || ends == NULL) {
		free(poison);
		free(bad);
		log_msg(LOG_ERROR, "out_of_memory", "dropping a read of %d; visible again after vt",
			rows->n);
		free(keep);
		free(drop);
		free(ends);
		return;
	}
	for (int i = 0; i < rows->n; i++) {
		const struct pgmq_message *m = &rows->msgs[i];
		size_t job;

		if (m->invalid) {
			/* The read hid it; bring it back (after a pause: the read
			 * function is broken and would hide it again). */
			struct log_line *l = log_begin(LOG_ERROR, "row_invalid");
			log_str(l, "queue", d->cfg->queue_name);
			log_str(l, "msg_id", m->msg_id);
			log_str(l, "problem", m->invalid);
			log_str(l, "outcome", m->id_ok ? "released" : "cannot release: visible again after vt_seconds");
			log_end(l);
			if (m->id_ok)
				bad[nbad++] = *m;
			continue;
		}
		job = runpod_job_bytes(m);
		if (d->cfg->max_read_ct > 0 && atol(m->read_ct) > d->cfg->max_read_ct) {
			log_archive(d, m, "max_read_ct", 0);
			poison[npoison++] = *m;
		} else if (d->envelope_bytes + job > limit) {
			log_archive(d, m, "too_large", d->envelope_bytes + job);
			drop[ndrop++] = *m;
		} else {
			keep[nkeep++] = *m;
		}
	}
	if (nbad > 0) {
		struct batch *b = batch_new(d, rr, bad, nbad);
		double ms = back_off(d, PAUSE_DB, -1);
		if (b)
			release(d, b, (int)ceil(ms / 1000.0));
	}
	archive(d, rr, drop, ndrop, METRICS_ARCHIVE_TOO_LARGE);
	archive(d, rr, poison, npoison, METRICS_ARCHIVE_MAX_READ_CT);
	runs = runpod_pack(keep, nkeep, d->envelope_bytes, limit, ends);
	for (int r = 0, start = 0; r < runs; start = ends[r++]) {
		struct batch *b = batch_new(d, rr, keep + start, ends[r] - start);
		if (b)
			post(d, b);
		else
			log_msg(LOG_ERROR, "out_of_memory", "dropping %d messages; visible again "
				"after vt", ends[r] - start);
	}
	free(keep);
	free(drop);
	free(poison);
	free(bad);
	free(ends);
}

static void on_read(void *arg, struct pgmq_batch *rows, const struct pg_error *err)
{
	struct dispatcher *d = arg;
	struct read_result *rr;
	bool full;

	d->reading = false;
	if (d->finished) {
		/* Being freed: the messages come back after their vt. */
		if (rows) {
			pgmq_batch_free(rows);
			free(rows);
		}
		return;
	}
	d->stats.reads++;
	if (err) {
		bool unknown = err->connection_lost && err->sent;
		struct log_line *l = log_begin(LOG_ERROR, unknown ? "read_fate_unknown" : "read_failed");
		d->stats.reads_failed++;
		metrics_inc_reads(METRICS_READ_ERROR);
		log_str(l, "queue", d->cfg->queue_name);
		log_str(l, "sqlstate", err->sqlstate);
		log_str(l, "error", err->message);
		if (unknown)
			log_str(l, "outcome", "messages it read, if any, are visible again after vt_seconds");
		if (!err->connection_lost)
			log_int(l, "retry_in_ms", (long long)back_off(d, PAUSE_DB, -1));
		log_end(l);
		if (d->once) {
			d->once_result = DISPATCH_DONE_FAILED;
			d->once_read_done = true;
		}
		maybe_finish(d);
		return;
	}
	if (rows->n == 0) {
		struct log_line *l = log_begin(LOG_DEBUG, "queue_empty");
		log_str(l, "queue", d->cfg->queue_name);
		log_end(l);
		d->stats.reads_empty++;
		metrics_inc_reads(METRICS_READ_EMPTY);
		pgmq_batch_free(rows);
		free(rows);
		if (d->once)
			d->once_read_done = true;
		if (d->again)
			kick(d);
		else
			idle_read(d);
		maybe_finish(d);
		return;
	}
	rr = calloc(1, sizeof(*rr));
	if (rr == NULL) {
		log_msg(LOG_ERROR, "out_of_memory", "dropping a read of %d; visible again after vt", rows->n);
		pgmq_batch_free(rows);
		free(rows);
		return;
	}
	rr->rows = *rows;
	rr->refs = 1;
	free(rows);
	full = rr->rows.n >= d->cfg->batch_size;
	d->stats.messages_read += (unsigned long long)rr->rows.n;
	metrics_inc_reads(METRICS_READ_ROWS);
	metrics_add_messages_read((unsigned)rr->rows.n);
	{
		struct log_line *l = log_begin(LOG_DEBUG, "batch_read");
		log_str(l, "queue", d->cfg->queue_name);
		log_int(l, "jobs", rr->rows.n);
		log_str(l, "first_msg_id", rr->rows.msgs[0].msg_id);
		log_str(l, "last_msg_id", rr->rows.msgs[rr->rows.n - 1].msg_id);
		log_end(l);
	}
	if (d->stopping) {
		/* Read while stopping: hand the messages back at once. */
		struct batch *b = batch_new(d, rr, rr->rows.msgs, rr->rows.n);
		if (b)
			release(d, b, 0);
	} else {
		if (d->once)
			d->once_read_done = true;
		dispatch_rows(d, rr);
	}
	read_result_unref(rr);
	reset_idle(d);
	/* A full batch means there is probably more: drain. */
	if ((full || d->again) && !d->once && !d->stopping)
		kick(d);
	maybe_finish(d);
}

/* tracker.max_queued_jobs: true while reads pause because that many jobs
 * wait IN_QUEUE (in-flight /run requests counted). Each change is logged
 * once and shown in /metrics and STATUS=; the tracker's wake hook asks for
 * a read when fewer wait. */
static bool queue_capped(struct dispatcher *d)
{
	long queued = tracker_queued_jobs(d->tracker);
	bool full = tracker_queue_full(queued, d->in_flight, d->cfg->tracker_max_queued_jobs);

	if (full != d->queue_capped) {
		struct log_line *l = log_begin(full ? LOG_WARN : LOG_INFO,
					       full ? "reads_paused" : "reads_resumed");
		log_int(l, "queued_jobs", queued);
		log_int(l, "in_flight", d->in_flight);
		log_int(l, "max_queued_jobs", d->cfg->tracker_max_queued_jobs);
		if (full)
			log_str(l, "msg", "RunPod is not starting the jobs sent: no new /run until "
					  "fewer wait IN_QUEUE; the messages wait in the queue");
		log_end(l);
		d->queue_capped = full;
		metrics_set_queue_cap_reached(full);
		state_changed(d);
	}
	return full;
}

static void kick(struct dispatcher *d)
{
	if (d->reading) {
		d->again = true; /* e.g. a NOTIFY for rows the running read may miss */
		return;
	}
	if (d->stopping || d->finished || d->circuit_open || !pg_ready(d->pg) ||
	    ev_is_active(&d->pause))
		return;
	if (d->in_flight >= d->cfg->max_in_flight || queue_capped(d)) {
		d->read_wanted = true;
		return;
	}
	if (d->once && d->once_read_done)
		return;
	d->read_wanted = false;
	d->again = false;
	if (pgmq_read(d->pg, d->cfg->read_function, d->cfg->queue_name, d->cfg->vt_seconds,
		      d->cfg->batch_size, on_read, d) != 0) {
		log_msg(LOG_ERROR, "read_failed", "cannot queue the read statement");
		back_off(d, PAUSE_DB, -1);
		return;
	}
	d->reading = true;
}

static void maybe_finish(struct dispatcher *d)
{
	if (d->finished)
		return;
	if (d->once && !d->once_read_done && !d->stopping)
		return;
	if (!d->deadline_passed &&
	    (d->reading || d->in_flight > 0 || d->db_pending > 0 || d->probing || d->metrics_pending))
		return;
	if (!d->once && !d->stopping)
		return;
	d->finished = true;
	ev_timer_stop(d->loop, &d->poll);
	ev_timer_stop(d->loop, &d->pause);
	ev_timer_stop(d->loop, &d->probe);
	ev_timer_stop(d->loop, &d->deadline);
	ev_timer_stop(d->loop, &d->stats_timer);
	ev_timer_stop(d->loop, &d->debounce);
	ev_timer_stop(d->loop, &d->wake_timer);
	ev_timer_stop(d->loop, &d->selftest_timer);
	ev_timer_stop(d->loop, &d->rate_timer);
	d->done(d->done_arg, d->stopping && !d->once ? DISPATCH_DONE_STOPPED : d->once_result);
}

static void on_poll(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)loop;
	(void)revents;
	kick(w->data);
}

static void on_pause_over(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct dispatcher *d = w->data;

	(void)loop;
	(void)revents;
	d->pause_reason = PAUSE_NONE;
	kick(d);
}

static void on_deadline(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct dispatcher *d = w->data;

	(void)loop;
	(void)revents;
	if (d->in_flight > 0) {
		struct log_line *l = log_begin(LOG_WARN, "shutdown_deadline");
		log_int(l, "in_flight", d->in_flight);
		log_str(l, "outcome", "aborted requests are counted as outcome unknown");
		log_end(l);
	}
	/* Aborted requests end as outcome unknown (their callbacks run now). */
	http_cancel_all(d->http);
	if (!d->finished && (d->db_pending > 0 || d->reading)) {
		/* Their callbacks still run when the connection closes, and
		 * name every msg id that stays invisible. */
		log_msg(LOG_WARN, "shutdown_deadline", "%d database statements unfinished",
			d->db_pending + (d->reading ? 1 : 0));
		d->deadline_passed = true;
	}
	maybe_finish(d);
}

/* The poll timer is the backstop; while NOTIFY is known to work it backs
 * off when reads come back empty, and any rows or NOTIFY reset it. */
static void set_poll_period(struct dispatcher *d, double ms)
{
	if (ms == d->idle_poll_ms)
		return;
	d->idle_poll_ms = ms;
	d->poll.repeat = ms / 1000.0;
	{
		struct log_line *l = log_begin(LOG_DEBUG, "poll_period");
		log_int(l, "poll_period_ms", (long long)ms);
		log_end(l);
	}
	if (ev_is_active(&d->poll))
		ev_timer_again(d->loop, &d->poll);
}

static void reset_idle(struct dispatcher *d)
{
	set_poll_period(d, d->cfg->poll_interval_ms);
}

static void idle_read(struct dispatcher *d)
{
	double next = d->idle_poll_ms * 2;

	/* Without a working LISTEN and an insert trigger to fire it, the timer
	 * is the only way new messages are found: keep it at poll_interval_ms. */
	if (d->notify_state != NOTIFY_OK || !d->has_trigger)
		return;
	if (next > d->cfg->idle_poll_max_ms)
		next = d->cfg->idle_poll_max_ms;
	if (next < d->cfg->poll_interval_ms)
		next = d->cfg->poll_interval_ms;
	set_poll_period(d, next);
}

static void set_notify_state(struct dispatcher *d, enum notify_state st)
{
	d->notify_state = st;
	if (st != NOTIFY_OK)
		reset_idle(d);
}

static void on_debounce(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)loop;
	(void)revents;
	kick(w->data);
}

static void on_wake_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct log_line *l = log_begin(LOG_DEBUG, "wake_read");

	(void)loop;
	(void)revents;
	log_str(l, "reason", ((struct dispatcher *)w->data)->queue_capped
				     ? "fewer jobs wait IN_QUEUE (max_queued_jobs)"
				     : "released messages are visible again");
	log_end(l);
	reset_idle(w->data);
	kick(w->data);
}

/* Messages we made visible again after_s from now: read then, whatever
 * the idle poll period has grown to. The earliest request wins. */
static void wake_after(void *arg, double after_s)
{
	struct dispatcher *d = arg;

	if (d->finished || d->stopping)
		return;
	if (ev_is_active(&d->wake_timer) && ev_timer_remaining(d->loop, &d->wake_timer) <= after_s)
		return;
	ev_timer_stop(d->loop, &d->wake_timer);
	ev_timer_set(&d->wake_timer, after_s, 0.0);
	ev_timer_start(d->loop, &d->wake_timer);
}

static void on_notify(void *arg, const char *channel, const char *payload)
{
	struct dispatcher *d = arg;

	if (d->finished || (strcmp(channel, d->channel) != 0 &&
			    (d->channel2[0] == '\0' || strcmp(channel, d->channel2) != 0)))
		return;
	if (strcmp(payload, d->selftest) == 0) {
		if (d->notify_state == NOTIFY_TESTING) {
			struct log_line *l = log_begin(LOG_DEBUG, "notify_ready");
			log_str(l, "channel", d->channel);
			log_end(l);
			ev_timer_stop(d->loop, &d->selftest_timer);
			d->notify_broken_logged = false;
			set_notify_state(d, NOTIFY_OK);
		}
		return;
	}
	/* A burst of inserts becomes one read after the debounce. */
	reset_idle(d);
	if (!ev_is_active(&d->debounce)) {
		ev_timer_set(&d->debounce, d->cfg->notify_debounce_ms / 1000.0, 0.0);
		ev_timer_start(d->loop, &d->debounce);
	}
}

static void on_selftest_timeout(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct dispatcher *d = w->data;

	(void)loop;
	(void)revents;
	if (d->notify_state != NOTIFY_TESTING)
		return;
	set_notify_state(d, NOTIFY_BROKEN);
	if (!d->notify_broken_logged) {
		struct log_line *l = log_begin(LOG_WARN, "notify_unavailable");
		log_str(l, "channel", d->channel);
		log_str(l, "msg", "LISTEN receives no notifications on this connection (a transaction "
				  "pooler?); polling every poll_interval_ms. Set database.listen_conninfo "
				  "to a direct or session-mode connection to wake up on inserts.");
		log_end(l);
		d->notify_broken_logged = true;
	}
}

static void on_listen_done(void *arg, PGresult *res, const struct pg_error *err)
{
	struct dispatcher *d = arg;

	if (res)
		PQclear(res);
	if (d->finished || err == NULL)
		return;
	{
		struct log_line *l = log_begin(LOG_WARN, "listen_failed");
		log_str(l, "channel", d->channel);
		log_str(l, "sqlstate", err->sqlstate);
		log_str(l, "error", err->message);
		log_end(l);
	}
	ev_timer_stop(d->loop, &d->selftest_timer);
	set_notify_state(d, NOTIFY_BROKEN);
}

static void on_trigger_count(void *arg, PGresult *res, const struct pg_error *err)
{
	struct dispatcher *d = arg;
	bool had = d->has_trigger;

	if (res) {
		d->has_trigger = PQntuples(res) == 1 && strcmp(PQgetvalue(res, 0, 0), "0") != 0;
		PQclear(res);
	}
	if (d->finished || err)
		return;
	if (!d->has_trigger && (had || !d->no_trigger_logged)) {
		d->no_trigger_logged = true;
		struct log_line *l = log_begin(LOG_INFO, "notify_no_trigger");
		log_str(l, "queue", d->cfg->queue_name);
		log_str(l, "msg", "no insert trigger on the queue table: polling every poll_interval_ms; "
				  "SELECT pgmq.enable_notify_insert(queue) (pgmq >= 1.7) or the trigger in "
				  "docs/operations.md makes inserts wake the daemon");
		log_end(l);
	}
	if (!d->has_trigger)
		reset_idle(d);
}

/* After every (re)connect of the listening connection: LISTEN, then a
 * NOTIFY of our own to prove notifications arrive (transaction poolers
 * accept LISTEN but never deliver), and a look for an insert trigger on the
 * queue table (without one, nothing will notify and idle polls must not
 * back off). */
static void start_listen(struct dispatcher *d, struct pg *pg)
{
	char quoted[sizeof(d->channel) * 2 + 3], sql[2 * sizeof(quoted) + 32];
	char table[80], qtable[2 * sizeof(table) + 3], qualified[sizeof(qtable) + 8];
	const char *params[2] = { d->channel, d->selftest };
	const char *tparams[1] = { qualified };
	if (!d->cfg->notify || d->once || pg_quote_ident(d->channel, quoted, sizeof(quoted)) != 0)
		return;
	snprintf(sql, sizeof(sql), "LISTEN %s", quoted);
	snprintf(table, sizeof(table), "q_%s", d->channel + strlen("pgmq.q_"));
	table[strlen(table) - strlen(".INSERT")] = '\0';
	if (pg_quote_ident(table, qtable, sizeof(qtable)) != 0)
		return;
	snprintf(qualified, sizeof(qualified), "pgmq.%s", qtable);
	set_notify_state(d, NOTIFY_TESTING);
	if (d->channel2[0] && pg_quote_ident(d->channel2, quoted, sizeof(quoted)) == 0) {
		/* One statement per query: the extended protocol allows no more. */
		char sql2[sizeof(quoted) + 16];
		snprintf(sql2, sizeof(sql2), "LISTEN %s", quoted);
		if (pg_query(pg, sql2, 0, NULL, on_listen_done, d) != 0) {
			set_notify_state(d, NOTIFY_BROKEN);
			return;
		}
	}
	if (pg_query(pg, sql, 0, NULL, on_listen_done, d) != 0 ||
	    pg_query(pg, "SELECT pg_notify($1, $2)", 2, params, on_listen_done, d) != 0 ||
	    pg_query(d->pg, "SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass($1) "
			    "AND NOT tgisinternal AND tgenabled <> 'D'", 1, tparams, on_trigger_count,
		     d) != 0) {
		set_notify_state(d, NOTIFY_BROKEN);
		return;
	}
	ev_timer_stop(d->loop, &d->selftest_timer);
	ev_timer_set(&d->selftest_timer, SELFTEST_TIMEOUT_S, 0.0);
	ev_timer_start(d->loop, &d->selftest_timer);
}

static void on_listen_connected(void *arg)
{
	struct dispatcher *d = arg;

	start_listen(d, d->listen_pg);
	kick(d); /* catch up on what was inserted while we were not listening */
}

static void on_listen_lost(void *arg)
{
	struct dispatcher *d = arg;

	ev_timer_stop(d->loop, &d->selftest_timer);
	set_notify_state(d, NOTIFY_OFF);
}

static void on_connected(void *arg)
{
	struct dispatcher *d = arg;

	/* Catch up at once: messages may have arrived while we were away. A
	 * pause that was only waiting for the database is over. */
	if (d->pause_reason == PAUSE_DB && ev_is_active(&d->pause)) {
		ev_timer_stop(d->loop, &d->pause);
		d->pause_reason = PAUSE_NONE;
		d->failures = 0;
	}
	if (d->connected_once)
		metrics_inc_pg_reconnects();
	d->connected_once = true;
	if (d->listen_pg == NULL)
		start_listen(d, d->pg); /* re-LISTEN first: the read below is queued after it */
	state_changed(d);
	kick(d);
	if (!d->once && !d->stopping) {
		/* Queue gauges right away rather than one interval later. */
		ev_timer_stop(d->loop, &d->stats_timer);
		ev_timer_set(&d->stats_timer, 0.0, d->cfg->metrics_interval_ms / 1000.0);
		ev_timer_start(d->loop, &d->stats_timer);
	}
}

static void on_disconnected(void *arg)
{
	struct dispatcher *d = arg;

	if (d->listen_pg == NULL)
		on_listen_lost(d);
	state_changed(d);
}

static void on_metrics(void *arg, long long length, double oldest_age_s, const struct pg_error *err)
{
	struct dispatcher *d = arg;

	d->metrics_pending = false;
	if (d->finished)
		return;
	if (err) {
		struct log_line *l = log_begin(LOG_DEBUG, "queue_metrics_failed");
		log_str(l, "sqlstate", err->sqlstate);
		log_str(l, "error", err->message);
		log_end(l);
	} else {
		d->queue_length = length;
		metrics_set_queue_stats(length, oldest_age_s);
	}
	state_changed(d);
	maybe_finish(d);
}

/* Refreshes queue length and age on a timer, never inside a scrape. */
static void on_stats(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct dispatcher *d = w->data;

	(void)loop;
	(void)revents;
	if (d->stopping || d->metrics_pending || !pg_ready(d->pg))
		return;
	if (pgmq_metrics(d->pg, d->cfg->queue_name, on_metrics, d) == 0)
		d->metrics_pending = true;
}

static void on_connect_failed(void *arg)
{
	struct dispatcher *d = arg;

	/* A one-shot run does not wait for a database that is down. */
	if (d->once && !d->finished) {
		d->once_result = DISPATCH_DONE_FAILED;
		d->once_read_done = true;
		maybe_finish(d);
	}
}

/* Derived strings of a snapshot; 0, or -1 if they do not fit. */
static struct runpod_extras extras_of(const struct config *cfg)
{
	return (struct runpod_extras){
		.webhook = cfg->webhook,
		.execution_timeout_ms = cfg->policy_execution_timeout_ms,
		.ttl_ms = cfg->policy_ttl_ms,
		.low_priority = cfg->policy_low_priority != 0,
	};
}

static int apply_config(struct dispatcher *d, const struct config *cfg)
{
	char run_url[sizeof(d->run_url)], health_url[sizeof(d->health_url)];
	struct runpod_extras extras = extras_of(cfg);
	struct runpod_envelope envelope;

	if (runpod_url(cfg->base_url, cfg->endpoint_id, "run", run_url, sizeof(run_url)) != 0 ||
	    runpod_url(cfg->base_url, cfg->endpoint_id, "health", health_url, sizeof(health_url)) != 0) {
		log_msg(LOG_ERROR, "config_invalid", "runpod.base_url and runpod.endpoint_id are too long");
		return -1;
	}
	if (runpod_envelope_init(&envelope, cfg->queue_name, cfg->vt_seconds, &extras) != 0) {
		log_msg(LOG_ERROR, "out_of_memory", "cannot build the /run envelope");
		return -1;
	}
	memcpy(d->run_url, run_url, sizeof(run_url));
	memcpy(d->health_url, health_url, sizeof(health_url));
	snprintf(d->auth_header, sizeof(d->auth_header), "Authorization: Bearer %s", cfg->api_key);
	runpod_envelope_free(&d->envelope);
	d->envelope = envelope;
	d->envelope_bytes = envelope.len;
	d->cfg = cfg;
	return 0;
}

/* (Re)sizes the rate-cap window, keeping the newest send times. */
static int set_rate_cap(struct dispatcher *d, int cap)
{
	double *ring;
	int keep;

	if (cap == d->rate_cap)
		return 0;
	ring = malloc((size_t)cap * sizeof(*ring));
	if (ring == NULL)
		return -1;
	keep = d->sent_count < cap ? d->sent_count : cap;
	for (int i = 0; i < keep; i++)
		ring[i] = d->sent_at[(d->sent_head + d->sent_count - keep + i) % d->rate_cap];
	free(d->sent_at);
	d->sent_at = ring;
	d->rate_cap = cap;
	d->sent_head = 0;
	d->sent_count = keep;
	return 0;
}

/* Channel pgmq.q_<lower(queue)>.INSERT (pgmq-api.md §1.5) and, with
 * database.listen_conninfo, the separate LISTEN connection. */
static int init_notify(struct dispatcher *d, const struct config *cfg)
{
	struct pg_callbacks lcb = { .connected = on_listen_connected, .disconnected = on_listen_lost,
				    .notify = on_notify, .arg = d };
	size_t i;

	snprintf(d->channel, sizeof(d->channel), "pgmq.q_%s.INSERT", cfg->queue_name);
	for (i = 7; d->channel[i] && strcmp(d->channel + i, ".INSERT") != 0; i++)
		d->channel[i] = (char)tolower((unsigned char)d->channel[i]);
	snprintf(d->selftest, sizeof(d->selftest), "pgmq-dispatcher self-test %ld",
		 (long)getpid());
	/* pgmq 1.13.1 names the channel after the queue as created. */
	snprintf(d->channel2, sizeof(d->channel2), "pgmq.q_%s.INSERT", cfg->queue_name);
	if (strcmp(d->channel2, d->channel) == 0)
		d->channel2[0] = '\0';
	if (!cfg->notify || d->once || cfg->listen_conninfo[0] == '\0')
		return 0;
	d->listen_pg = pg_new(d->loop, cfg->listen_conninfo, cfg->db_connect_timeout_ms, &lcb);
	return d->listen_pg ? 0 : -1;
}

struct dispatcher *dispatcher_new(struct ev_loop *loop, const struct config *cfg, bool once,
				  dispatcher_done_fn done, void *arg)
{
	struct dispatcher *d = calloc(1, sizeof(*d));
	struct pg_callbacks cb = { .connected = on_connected, .disconnected = on_disconnected,
				   .connect_failed = on_connect_failed, .notify = on_notify };

	if (d == NULL)
		return NULL;
	d->loop = loop;
	d->once = once;
	d->done = done;
	d->done_arg = arg;
	d->once_result = DISPATCH_DONE_EMPTY;
	if (apply_config(d, cfg) != 0) {
		free(d);
		return NULL;
	}
	cb.arg = d;
	d->pg = pg_new(loop, cfg->conninfo, cfg->db_connect_timeout_ms, &cb);
	d->http = http_new(loop);
	if (d->pg == NULL || d->http == NULL) {
		dispatcher_free(d);
		return NULL;
	}
	if (cfg->tracker_enabled && !once &&
	    (d->tracker = tracker_new(loop, cfg, d->http, d->pg)) == NULL) {
		dispatcher_free(d);
		return NULL;
	}
	tracker_set_wake(d->tracker, wake_after, d);
	ev_timer_init(&d->poll, on_poll, cfg->poll_interval_ms / 1000.0, cfg->poll_interval_ms / 1000.0);
	d->poll.data = d;
	ev_init(&d->pause, on_pause_over);
	d->pause.data = d;
	ev_init(&d->probe, on_probe_timer);
	d->probe.data = d;
	ev_init(&d->deadline, on_deadline);
	d->deadline.data = d;
	ev_timer_init(&d->stats_timer, on_stats, 0.0, cfg->metrics_interval_ms / 1000.0);
	d->stats_timer.data = d;
	d->queue_length = -1;
	ev_init(&d->debounce, on_debounce);
	d->debounce.data = d;
	ev_init(&d->wake_timer, on_wake_timer);
	d->wake_timer.data = d;
	ev_init(&d->selftest_timer, on_selftest_timeout);
	d->selftest_timer.data = d;
	ev_init(&d->rate_timer, on_rate_timer);
	d->rate_timer.data = d;
	d->idle_poll_ms = cfg->poll_interval_ms;
	if (set_rate_cap(d, cfg->max_requests_per_10s) != 0 || init_notify(d, cfg) != 0) {
		dispatcher_free(d);
		return NULL;
	}
	return d;
}

void dispatcher_start(struct dispatcher *d)
{
	pg_start(d->pg);
	if (d->listen_pg)
		pg_start(d->listen_pg);
	if (!d->once) {
		ev_timer_start(d->loop, &d->poll);
		ev_timer_again(d->loop, &d->stats_timer);
	}
}

int dispatcher_reload(struct dispatcher *d, const struct config *cfg)
{
	const struct config *old = d->cfg;

	if (set_rate_cap(d, cfg->max_requests_per_10s) != 0)
		return -1;
	if (apply_config(d, cfg) != 0)
		return -1;
	if (pg_set_conninfo(d->pg, cfg->conninfo) != 0) {
		apply_config(d, old);
		return -1;
	}
	/* Turned on by this reload: follow jobs accepted from now on. */
	if (d->tracker == NULL && cfg->tracker_enabled && !d->once && !d->stopping) {
		d->tracker = tracker_new(d->loop, cfg, d->http, d->pg);
		tracker_set_wake(d->tracker, wake_after, d);
	} else {
		tracker_reload(d->tracker, cfg);
	}
	ev_timer_stop(d->loop, &d->poll);
	ev_timer_set(&d->poll, cfg->poll_interval_ms / 1000.0, cfg->poll_interval_ms / 1000.0);
	d->stats_timer.repeat = cfg->metrics_interval_ms / 1000.0;
	d->idle_poll_ms = -1;
	reset_idle(d);
	if (!d->once && !d->stopping && !d->finished) {
		ev_timer_start(d->loop, &d->poll);
		ev_timer_again(d->loop, &d->stats_timer);
	}
	/* The key or endpoint may have been fixed: probe at once. */
	if (d->circuit_open) {
		d->probe_failures = 0;
		ev_timer_stop(d->loop, &d->probe);
		probe_now(d);
	}
	return 0;
}

void dispatcher_stop(struct dispatcher *d)
{
	if (d->stopping || d->finished)
		return;
	d->stopping = true;
	tracker_stop(d->tracker);
	ev_timer_stop(d->loop, &d->poll);
	ev_timer_stop(d->loop, &d->pause);
	ev_timer_stop(d->loop, &d->probe);
	ev_timer_stop(d->loop, &d->stats_timer);
	ev_timer_stop(d->loop, &d->debounce);
	ev_timer_stop(d->loop, &d->wake_timer);
	ev_timer_stop(d->loop, &d->selftest_timer);
	release_waiting(d); /* read but never sent: visible again at once */
	state_changed(d);
	{
		struct log_line *l = log_begin(LOG_INFO, "stopping");
		log_int(l, "in_flight", d->in_flight);
		log_int(l, "timeout_ms", d->cfg->shutdown_timeout_ms);
		log_end(l);
	}
	ev_timer_set(&d->deadline, d->cfg->shutdown_timeout_ms / 1000.0, 0.0);
	ev_timer_start(d->loop, &d->deadline);
	maybe_finish(d);
}

const struct dispatcher_stats *dispatcher_stats(const struct dispatcher *d)
{
	return &d->stats;
}

void dispatcher_abort(struct dispatcher *d)
{
	http_cancel_all(d->http);
}

bool dispatcher_circuit_open(const struct dispatcher *d)
{
	return d->circuit_open;
}

void dispatcher_set_state_hook(struct dispatcher *d, void (*fn)(void *arg), void *arg)
{
	d->state_hook = fn;
	d->state_arg = arg;
}

bool dispatcher_ready(const struct dispatcher *d, char *why, size_t len)
{
	const char *reason = d->stopping || d->finished ? "draining: shutting down"
			     : !pg_ready(d->pg)             ? "database disconnected"
			     : d->circuit_open              ? "circuit open: RunPod refuses the key or endpoint"
							    : NULL;

	if (reason && why && len)
		snprintf(why, len, "%s", reason);
	return reason == NULL;
}

void dispatcher_status(const struct dispatcher *d, char *buf, size_t len)
{
	char why[96];
	bool ready = dispatcher_ready(d, why, sizeof(why));

	if (ready && d->queue_capped)
		snprintf(why, sizeof(why), "reads paused at max_queued_jobs %d (IN_QUEUE %d)",
			 d->cfg->tracker_max_queued_jobs, tracker_queued_jobs(d->tracker));
	snprintf(buf, len, "%s; in flight %d; accepted %llu msgs in %llu requests, rejected %llu, "
		 "unknown %llu; queue length %lld", ready && !d->queue_capped ? "dispatching" : why, d->in_flight,
		 d->stats.messages_accepted, d->stats.requests_accepted, d->stats.requests_rejected,
		 d->stats.requests_unknown, d->queue_length);
}

void dispatcher_free(struct dispatcher *d)
{
	if (d == NULL)
		return;
	ev_timer_stop(d->loop, &d->poll);
	ev_timer_stop(d->loop, &d->pause);
	ev_timer_stop(d->loop, &d->probe);
	ev_timer_stop(d->loop, &d->deadline);
	ev_timer_stop(d->loop, &d->stats_timer);
	ev_timer_stop(d->loop, &d->debounce);
	ev_timer_stop(d->loop, &d->wake_timer);
	ev_timer_stop(d->loop, &d->selftest_timer);
	ev_timer_stop(d->loop, &d->rate_timer);
	d->finished = true;
	while (d->waiting) {
		/* Never sent: they come back after their vt. */
		struct batch *b = d->waiting;
		d->waiting = b->next;
		log_ids(LOG_WARN, "unsent_ids", d, b->ids, b->n,
			"never sent (exit): visible again after vt_seconds");
		batch_free(b);
	}
	/* Callbacks still run from here: aborted requests end as outcome
	 * unknown (logged with their msg ids), pending queries fail; finished
	 * keeps them from starting new work. */
	if (d->http)
		http_cancel_all(d->http);
	tracker_free(d->tracker); /* after the aborts above, before http_free drops requests */
	http_free(d->http);
	pg_free(d->listen_pg);
	pg_free(d->pg);
	runpod_envelope_free(&d->envelope);
	free(d->sent_at);
	free(d);
}

int dispatcher_dry_run(const struct config *cfg, FILE *out)
{
	const char *kw[] = { "fallback_application_name", "dbname", NULL };
	const char *val[] = { "pgmq-dispatcher --dry-run", cfg->conninfo, NULL };
	struct runpod_extras extras = extras_of(cfg);
	size_t envelope = runpod_envelope_bytes(cfg->queue_name, cfg->vt_seconds, &extras);
	PGconn *conn;
	PGresult *res;
	struct pgmq_batch rows;
	char err[512];
	int *ends, runs;

	if (cfg->conninfo[0] == '\0')
		kw[1] = NULL;
	conn = PQconnectdbParams(kw, val, 1);
	if (PQstatus(conn) != CONNECTION_OK) {
		log_msg(LOG_ERROR, "dry_run_failed", "%.*s", (int)strcspn(PQerrorMessage(conn), "\n"),
			PQerrorMessage(conn));
		PQfinish(conn);
		return -1;
	}
	res = pgmq_peek(conn, cfg->queue_name, cfg->batch_size, err, sizeof(err));
	PQfinish(conn);
	if (res == NULL || pgmq_batch_from_result(res, &rows, err, sizeof(err)) != 0) {
		log_msg(LOG_ERROR, "dry_run_failed", "%s", err);
		return -1;
	}
	ends = malloc(((size_t)rows.n + 1) * sizeof(*ends));
	if (ends == NULL) {
		pgmq_batch_free(&rows);
		return -1;
	}
	runs = runpod_pack(rows.msgs, rows.n, envelope, (size_t)cfg->max_body_bytes, ends);
	for (int r = 0, start = 0; r < runs; start = ends[r++]) {
		char *body = runpod_run_body(cfg->queue_name, cfg->vt_seconds, &extras, rows.msgs + start,
					     ends[r] - start, NULL);
		if (body)
			fprintf(out, "%s\n", body);
		free(body);
	}
	log_msg(LOG_INFO, "dry_run", "%d visible messages would go out in %d /run requests; "
		"nothing was changed", rows.n, runs);
	free(ends);
	pgmq_batch_free(&rows);
	return 0;
}
