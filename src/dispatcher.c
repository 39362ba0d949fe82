/* dispatcher — see include/dispatcher.h. */
#include "dispatcher.h"
#include "log.h"
#include "pgmq.h"
#include "runpod.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BACKOFF_BASE_MS 1000.0
#define BACKOFF_CAP_MS 60000.0
#define BACKOFF_MIN_MS 250.0
#define BODY_EXCERPT_BYTES 256
#define IDS_PER_LINE 100

struct dispatcher {
	struct ev_loop *loop;
	const struct config *cfg;
	struct pg *pg;
	struct http *http;
	bool once;
	dispatcher_done_fn done;
	void *done_arg;

	char run_url[2048];
	char auth_header[1100];

	ev_timer poll;          /* periodic trigger */
	ev_timer pause;         /* reads paused until it fires (backoff) */
	ev_timer deadline;      /* shutdown deadline */
	bool reading;
	bool read_wanted;       /* a drain read waits for an in-flight slot */
	bool stopping;
	bool finished;
	bool once_read_done;
	int in_flight;          /* /run requests outstanding */
	int db_pending;         /* set_vt / archive statements outstanding */
	int failures;           /* consecutive failed reads or rejected requests */
	enum dispatcher_result once_result;

	struct dispatcher_stats stats;
};

/* One batch from read to outcome. */
struct batch {
	struct dispatcher *d;
	struct pgmq_batch rows;
	long long *ids;
	int n;
	ev_tstamp started;
};

static void kick(struct dispatcher *d);
static void maybe_finish(struct dispatcher *d);

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

static void batch_free(struct batch *b)
{
	pgmq_batch_free(&b->rows);
	free(b->ids);
	free(b);
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

/* Pauses reads for the backoff of the current failure streak; returns
 * the pause in ms. */
static double back_off(struct dispatcher *d)
{
	double ms;

	d->failures++;
	ms = dispatcher_backoff_ms(d->failures, BACKOFF_BASE_MS, BACKOFF_CAP_MS, BACKOFF_MIN_MS,
				   jitter());
	ev_timer_stop(d->loop, &d->pause);
	ev_timer_set(&d->pause, ms / 1000.0, 0.0);
	ev_timer_start(d->loop, &d->pause);
	return ms;
}

static void on_released(void *arg, long count, const struct pg_error *err)
{
	struct batch *b = arg;
	struct dispatcher *d = b->d;

	d->db_pending--;
	if (d->finished) {
		batch_free(b);
		return;
	}
	if (err) {
		struct log_line *l = log_begin(LOG_ERROR, "release_failed");
		log_str(l, "queue", d->cfg->queue_name);
		log_str(l, "sqlstate", err->sqlstate);
		log_str(l, "error", err->message);
		log_end(l);
		log_ids(LOG_ERROR, "release_failed_ids", d, b->ids, b->n,
			"visible again after vt_seconds");
	} else {
		struct log_line *l = log_begin(LOG_DEBUG, "released");
		log_str(l, "queue", d->cfg->queue_name);
		log_int(l, "messages", count);
		log_end(l);
		d->stats.messages_released += (unsigned long long)count;
	}
	batch_free(b);
	maybe_finish(d);
}

/* Makes the batch's messages visible again after delay_s. */
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

static void log_outcome(struct dispatcher *d, const struct batch *b, enum runpod_outcome outcome,
			const struct http_response *r, const struct runpod_run_reply *reply)
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
	if (r->code != CURLE_OK)
		log_str(l, "error", r->error);
	if (outcome != RUNPOD_ACCEPTED && r->body_len > 0)
		log_strn(l, "body", r->body,
			 r->body_len < BODY_EXCERPT_BYTES ? r->body_len : BODY_EXCERPT_BYTES);
	log_end(l);
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

	d->in_flight--;
	if (r->status >= 200 && r->status < 300 && !r->body_truncated)
		a.reply_parsed = runpod_parse_run_reply(r->body, r->body_len, &reply) == 0;
	outcome = r->aborted ? RUNPOD_UNKNOWN : runpod_classify(&a);
	log_outcome(d, b, outcome, r, &reply);

	switch (outcome) {
	case RUNPOD_ACCEPTED:
		d->stats.requests_accepted++;
		d->stats.messages_accepted += (unsigned long long)b->n;
		d->failures = 0;
		if (d->once)
			d->once_result = DISPATCH_DONE_DISPATCHED;
		batch_free(b);
		break;
	case RUNPOD_UNKNOWN:
		d->stats.requests_unknown++;
		log_ids(LOG_WARN, "outcome_unknown_ids", d, b->ids, b->n,
			"unknown: job may exist, messages keep their vt");
		if (d->once)
			d->once_result = DISPATCH_DONE_UNKNOWN;
		batch_free(b);
		break;
	case RUNPOD_REJECTED: {
		/* No job was created: bring the messages back after the pause
		 * instead of after vt_seconds, and read no more until then. */
		double pause_ms = d->stopping ? 0 : back_off(d);
		d->stats.requests_rejected++;
		if (d->once)
			d->once_result = DISPATCH_DONE_FAILED;
		release(d, b, (int)ceil(pause_ms / 1000.0));
		break;
	}
	}
	if (d->stopping || d->once)
		maybe_finish(d);
	else if (d->read_wanted)
		kick(d); /* the drain was waiting for this slot */
}

static void post(struct dispatcher *d, struct batch *b)
{
	const char *headers[] = { d->auth_header, "Content-Type: application/json",
				  "Accept: application/json", NULL };
	struct http_request_opts o = {
		.method = "POST",
		.url = d->run_url,
		.headers = headers,
		.connect_timeout_ms = d->cfg->connect_timeout_ms,
		.timeout_ms = d->cfg->request_timeout_ms,
	};

	o.body = runpod_run_body(d->cfg->queue_name, d->cfg->vt_seconds, b->rows.msgs, b->n,
				 &o.body_len);
	if (o.body == NULL || http_start(d->http, &o, on_posted, b) != 0) {
		/* Nothing was sent: the messages come back at once. */
		log_msg(LOG_ERROR, "post_failed", "cannot start the /run request; releasing %d messages",
			b->n);
		back_off(d);
		release(d, b, 0);
		return;
	}
	if (log_enabled(LOG_TRACE)) {
		struct log_line *l = log_begin(LOG_TRACE, "http_request");
		log_str(l, "method", "POST");
		log_str(l, "url", d->run_url);
		log_int(l, "body_bytes", (long long)o.body_len);
		log_int(l, "jobs", b->n);
		log_end(l);
	}
	d->in_flight++;
}

static void on_read(void *arg, struct pgmq_batch *rows, const struct pg_error *err)
{
	struct dispatcher *d = arg;
	struct batch *b;
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
		struct log_line *l = log_begin(LOG_ERROR, err->connection_lost && err->sent
							 ? "read_fate_unknown" : "read_failed");
		d->stats.reads_failed++;
		log_str(l, "queue", d->cfg->queue_name);
		log_str(l, "sqlstate", err->sqlstate);
		log_str(l, "error", err->message);
		if (err->connection_lost && err->sent)
			log_str(l, "outcome", "messages it read, if any, are visible again after vt_seconds");
		log_int(l, "retry_in_ms", (long long)back_off(d));
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
		pgmq_batch_free(rows);
		free(rows);
		if (d->once) {
			d->once_result = DISPATCH_DONE_EMPTY;
			d->once_read_done = true;
		}
		maybe_finish(d);
		return;
	}
	b = calloc(1, sizeof(*b));
	if (b == NULL || (b->ids = calloc((size_t)rows->n, sizeof(long long))) == NULL) {
		/* Cannot even remember the ids: they come back after their vt. */
		log_msg(LOG_ERROR, "out_of_memory", "dropping a batch of %d; visible again after vt", rows->n);
		free(b);
		pgmq_batch_free(rows);
		free(rows);
		return;
	}
	b->d = d;
	b->rows = *rows;
	free(rows);
	b->n = b->rows.n;
	b->started = ev_now(d->loop);
	for (int i = 0; i < b->n; i++)
		b->ids[i] = b->rows.msgs[i].msg_id_num;
	d->stats.messages_read += (unsigned long long)b->n;
	{
		struct log_line *l = log_begin(LOG_DEBUG, "batch_read");
		log_str(l, "queue", d->cfg->queue_name);
		log_int(l, "jobs", b->n);
		log_int(l, "first_msg_id", b->ids[0]);
		log_int(l, "last_msg_id", b->ids[b->n - 1]);
		log_end(l);
	}
	if (d->stopping) {
		/* Read while stopping: hand the messages back at once. */
		release(d, b, 0);
		return;
	}
	if (d->once)
		d->once_read_done = true;
	full = b->n >= d->cfg->batch_size;
	post(d, b);
	/* A full batch means there is probably more: drain. */
	if (full && !d->once)
		kick(d);
}

static void kick(struct dispatcher *d)
{
	if (d->in_flight >= d->cfg->max_in_flight) {
		d->read_wanted = true;
		return;
	}
	if (d->stopping || d->finished || d->reading || !pg_ready(d->pg) ||
	    ev_is_active(&d->pause))
		return;
	d->read_wanted = false;
	if (d->once && d->once_read_done)
		return;
	if (pgmq_read(d->pg, d->cfg->read_function, d->cfg->queue_name, d->cfg->vt_seconds,
		      d->cfg->batch_size, on_read, d) != 0) {
		log_msg(LOG_ERROR, "read_failed", "cannot queue the read statement");
		back_off(d);
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
	if (d->reading || d->in_flight > 0 || d->db_pending > 0)
		return;
	if (!d->once && !d->stopping)
		return;
	d->finished = true;
	ev_timer_stop(d->loop, &d->poll);
	ev_timer_stop(d->loop, &d->pause);
	ev_timer_stop(d->loop, &d->deadline);
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
	(void)loop;
	(void)revents;
	kick(w->data);
}

static void on_deadline(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct dispatcher *d = w->data;

	(void)loop;
	(void)revents;
	if (d->in_flight > 0) {
		struct log_line *l = log_begin(LOG_WARN, "shutdown_deadline");
		log_int(l, "in_flight", d->in_flight);
		log_end(l);
	}
	/* Aborted requests end as outcome unknown (their callbacks run now). */
	http_cancel_all(d->http);
	if (!d->finished && (d->db_pending > 0 || d->reading)) {
		log_msg(LOG_WARN, "shutdown_deadline", "%d database statements unfinished; their messages "
			"are visible again after their vt", d->db_pending + (d->reading ? 1 : 0));
		d->db_pending = 0;
		d->reading = false;
	}
	maybe_finish(d);
}

static void on_connected(void *arg)
{
	struct dispatcher *d = arg;

	/* Catch up at once: messages may have arrived while we were away. */
	kick(d);
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

struct dispatcher *dispatcher_new(struct ev_loop *loop, const struct config *cfg, bool once,
				  dispatcher_done_fn done, void *arg)
{
	struct dispatcher *d = calloc(1, sizeof(*d));
	struct pg_callbacks cb = { .connected = on_connected, .connect_failed = on_connect_failed };

	if (d == NULL)
		return NULL;
	d->loop = loop;
	d->cfg = cfg;
	d->once = once;
	d->done = done;
	d->done_arg = arg;
	d->once_result = DISPATCH_DONE_EMPTY;
	if (runpod_url(cfg->base_url, cfg->endpoint_id, "run", d->run_url, sizeof(d->run_url)) != 0) {
		log_msg(LOG_ERROR, "config_invalid", "runpod.base_url and runpod.endpoint_id are too long");
		free(d);
		return NULL;
	}
	snprintf(d->auth_header, sizeof(d->auth_header), "Authorization: Bearer %s", cfg->api_key);
	cb.arg = d;
	d->pg = pg_new(loop, cfg->conninfo, cfg->db_connect_timeout_ms, &cb);
	d->http = http_new(loop);
	if (d->pg == NULL || d->http == NULL) {
		dispatcher_free(d);
		return NULL;
	}
	ev_timer_init(&d->poll, on_poll, cfg->poll_interval_ms / 1000.0, cfg->poll_interval_ms / 1000.0);
	d->poll.data = d;
	ev_init(&d->pause, on_pause_over);
	d->pause.data = d;
	ev_init(&d->deadline, on_deadline);
	d->deadline.data = d;
	return d;
}

void dispatcher_start(struct dispatcher *d)
{
	pg_start(d->pg);
	if (!d->once)
		ev_timer_start(d->loop, &d->poll);
}

void dispatcher_stop(struct dispatcher *d)
{
	if (d->stopping || d->finished)
		return;
	d->stopping = true;
	ev_timer_stop(d->loop, &d->poll);
	ev_timer_stop(d->loop, &d->pause);
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

void dispatcher_free(struct dispatcher *d)
{
	if (d == NULL)
		return;
	ev_timer_stop(d->loop, &d->poll);
	ev_timer_stop(d->loop, &d->pause);
	ev_timer_stop(d->loop, &d->deadline);
	d->finished = true;
	/* Callbacks may still run from here (aborted requests, failed
	 * queries); finished keeps them from starting new work. */
	http_free(d->http);
	pg_free(d->pg);
	free(d);
}
