/* post — sends batches to /run: the wait behind the /run rate cap (one
 * sliding-window ratelimit), the POST itself, and what each outcome means
 * for the batch (accepted → the tracker, rejected → released after the
 * pause, unknown → logged). Knows nothing of reads, NOTIFY or the body's
 * format (runpod.c builds it). */
#include "backoff.h"
#include "batch.h"
#include "dispatcher_int.h"
#include "log.h"

#include <math.h>
#include <string.h>
#include <time.h>

#define BODY_EXCERPT_BYTES 256

static void log_outcome(struct dispatcher *d, const struct batch *b, enum runpod_outcome outcome,
			const struct http_response *r, const struct runpod_run_reply *reply,
			enum reject_action action, double retry_in_ms)
{
	static const char *const events[] = { "batch_accepted", "batch_rejected",
					      "batch_outcome_unknown" };
	enum log_level level = outcome == RUNPOD_ACCEPTED ? LOG_INFO : LOG_WARN;
	struct log_line *l = log_begin_route(d->cfg->route_name, level, events[outcome]);
	long long duration = (long long)((ev_now(d->loop) - b->started) * 1000.0 + 0.5);

	log_str(l, "queue", d->cfg->queue_name);
	if (outcome == RUNPOD_ACCEPTED) {
		log_str(l, "runpod_job_id", reply->id);
		log_str(l, "status", reply->status);
	} else {
		log_str(l, "outcome", runpod_outcome_name(outcome));
	}
	if (outcome == RUNPOD_UNKNOWN && reply->why[0])
		log_str(l, "reply_problem", reply->why);
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
			log_str(l, "resend",
				"refused: the connection died after the request was sent");
	}
	if (outcome != RUNPOD_ACCEPTED && r->body_len > 0)
		log_excerpt(l, "body", r->body, r->body_len, BODY_EXCERPT_BYTES);
	if (outcome == RUNPOD_REJECTED && action == REJECT_SPLIT) {
		log_str(l, "then", "split in two");
	} else if (outcome == RUNPOD_REJECTED && action == REJECT_TOO_LARGE) {
		log_str(l, "then", "archived as too large");
	} else if (outcome == RUNPOD_REJECTED) {
		log_int(l, "released_for_ms", (long long)retry_in_ms);
		if (r->retry_after)
			log_str(l, "retry_after", r->retry_after);
	}
	log_end(l);
}

static void log_response(const struct dispatcher *d, const struct http_response *r)
{
	struct log_line *l;

	if (!log_enabled(LOG_TRACE))
		return;
	l = log_begin_route(d->cfg->route_name, LOG_TRACE, "http_response");
	log_int(l, "http_status", r->status);
	log_int(l, "body_bytes", (long long)r->body_len);
	log_int(l, "connect_ms", r->connect_ms);
	log_int(l, "first_byte_ms", r->first_byte_ms);
	log_int(l, "total_ms", r->total_ms);
	log_end(l);
}

/* The pause a 429 or 503 asks for, capped; -1 to use our own backoff. */
static double retry_after_ms(const struct dispatcher *d, const struct http_response *r)
{
	long long ms = -1;

	if (r->retry_after == NULL ||
	    runpod_parse_retry_after(r->retry_after, time(NULL), &ms) != 0)
		ms = -1;
	return backoff_retry_after_ms((int)r->status, ms, d->cfg->retry_after_max_ms);
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
	enum reject_action action = batch_reject_action(r->status, b->n);
	double pause_ms = 0;

	d->in_flight--;
	metrics_set_in_flight(d->in_flight);
	metrics_route_set_in_flight(d->mroute, d->in_flight);
	memset(&reply, 0, sizeof(reply));
	if (r->status >= 200 && r->status < 300 && !r->body_truncated)
		a.reply_parsed = runpod_parse_run_reply(r->body, r->body_len, &reply) == 0;
	outcome = r->aborted ? RUNPOD_UNKNOWN : runpod_classify(&a);
	/* 401/403/404 open the circuit instead: released at once, no pause. */
	/* A 413 is split, not paused: the body, not the endpoint, is at fault. */
	if (outcome == RUNPOD_REJECTED && !d->stopping && !d->finished &&
	    !runpod_is_config_error(r->status) && action == REJECT_RELEASE)
		pause_ms = dispatcher_back_off(d, PAUSE_RUNPOD, retry_after_ms(d, r));
	log_outcome(d, b, outcome, r, &reply, action, pause_ms);
	/* What the ledger records with the batch's fate. */
	b->http_status = r->status;
	if (outcome == RUNPOD_ACCEPTED) {
		b->job_id = reply.id;
	} else if (r->code != CURLE_OK) {
		b->error = r->error;
		b->error_len = strlen(r->error);
	} else if (r->body_len > 0) {
		b->error = r->body;
		b->error_len = r->body_len;
	}
	metrics_inc_requests((enum metrics_outcome)outcome, r->status);
	metrics_route_add(d->mroute, (enum metrics_route_counter)(MR_REQUESTS_ACCEPTED + outcome),
			  1);
	metrics_observe_request_seconds(r->total_ms / 1000.0);
	log_response(d, r);

	switch (outcome) {
	case RUNPOD_ACCEPTED:
		d->stats.requests_accepted++;
		d->stats.messages_accepted += (unsigned long long)b->n;
		metrics_add_messages_dispatched((unsigned)b->n);
		metrics_route_add(d->mroute, MR_MESSAGES_DISPATCHED, (unsigned)b->n);
		if (d->pause_reason == PAUSE_RUNPOD && !ev_is_active(&d->pause))
			d->failures = 0;
		d->once_result = DISPATCH_DONE_DISPATCHED;
		/* started is reset when the POST leaves (after a rate-cap wait);
		 * the vt has run since the read. */
		tracker_add_dispatch(d->tracker, reply.id, b->dispatch_id, b->ids, b->n,
				     b->read_at);
		batch_end(b, BATCH_ACCEPTED, NULL);
		break;
	case RUNPOD_UNKNOWN:
		d->stats.requests_unknown++;
		if (d->once_result != DISPATCH_DONE_DISPATCHED)
			d->once_result = DISPATCH_DONE_UNKNOWN;
		batch_end(b, BATCH_UNKNOWN, "unknown: a job may exist, messages keep their vt");
		break;
	case RUNPOD_REJECTED:
		/* No job was created: bring the messages back after the pause
		 * instead of after vt_seconds, and read no more until then. */
		d->stats.requests_rejected++;
		if (d->once_result == DISPATCH_DONE_EMPTY)
			d->once_result = DISPATCH_DONE_FAILED;
		if (d->finished) {
			batch_end(b, BATCH_DROPPED, NULL);
		} else if (action == REJECT_TOO_LARGE) {
			batch_archive_too_large(b, b->body_bytes);
		} else if (action == REJECT_SPLIT && !d->stopping) {
			batch_split(b);
		} else {
			/* For 401/403/404 the open circuit stops our reads; the
			 * messages go back at once (another replica may be
			 * configured well). */
			if (runpod_is_config_error(r->status))
				circuit_open(d, r->status);
			ledger_note(d->ledger, b->dispatch_id, "rejected", r->status, NULL,
				    b->error, b->error_len, false);
			b->error = NULL; /* the release is recorded as such */
			b->http_status = 0;
			batch_release(b, (int)ceil(pause_ms / 1000.0));
		}
		break;
	}
	if (d->stopping || d->once || d->finished)
		dispatcher_maybe_finish(d);
	else if (d->read_wanted && d->ep == NULL)
		dispatcher_kick(d); /* the drain was waiting for this slot */
	if (d->ep && !d->finished)
		endpoint_slot_freed(d->ep); /* the best priority takes it */
}

/* Sends one batch now (a rate slot is free). in_flight already counts it.
 * False when nothing was sent (the batch is released). */
static bool send_now(struct dispatcher *d, struct batch *b)
{
	char idempotency[64];
	const char *headers[] = { d->conf.auth_header, "Content-Type: application/json",
				  "Accept: application/json", NULL, NULL };
	struct http_request_opts o = {
		.method = "POST",
		.url = d->conf.run_url,
		.headers = headers,
		.connect_timeout_ms = d->cfg->connect_timeout_ms,
		.timeout_ms = d->cfg->request_timeout_ms,
		.ca_file = d->cfg->ca_file,
		.owner = d,
	};

	if (b->dispatch_id[0]) {
		/* RunPod ignores it today; proxies and later APIs may not. */
		snprintf(idempotency, sizeof(idempotency), "Idempotency-Key: %s", b->dispatch_id);
		headers[3] = idempotency;
	}
	o.body = runpod_envelope_body(&d->conf.envelope, b->msgs, b->n, &o.body_len);
	if (o.body && b->dispatch_id[0])
		runpod_envelope_set_dispatch_id(&d->conf.envelope, o.body, b->dispatch_id);
	if (o.body == NULL || http_start(d->http, &o, on_posted, b) != 0) {
		/* Nothing was sent: the messages come back at once. */
		log_msg_route(d->cfg->route_name, LOG_ERROR, "post_failed",
			      "cannot start the /run request; releasing %d message%s", b->n,
			      b->n == 1 ? "" : "s");
		d->in_flight--;
		metrics_set_in_flight(d->in_flight);
		metrics_route_set_in_flight(d->mroute, d->in_flight);
		dispatcher_back_off(d, PAUSE_RUNPOD, -1);
		batch_release(b, 0);
		return false;
	}
	/* The wall clock now, not the loop's cached ev_now: that is from the
	 * start of this iteration, and a busy one would make the window start
	 * early and let a request out too soon. */
	ratelimit_record(&d->rl, ev_time());
	b->body_bytes = o.body_len;
	b->started = ev_now(d->loop);
	if (log_enabled(LOG_TRACE)) {
		/* route last: "event=http_request method=..." stays as it was. */
		struct log_line *l = log_begin(LOG_TRACE, "http_request");
		log_str(l, "method", "POST");
		log_str(l, "url", d->conf.run_url);
		log_int(l, "body_bytes", (long long)o.body_len);
		log_int(l, "jobs", b->n);
		log_str(l, "route", d->cfg->route_name);
		log_end(l);
	}
	return true;
}

static struct batch *pop_waiting(struct dispatcher *d)
{
	struct batch *b = d->waiting;

	d->waiting = b->next;
	if (d->waiting == NULL)
		d->waiting_tail = NULL;
	d->nwaiting--;
	b->next = NULL;
	return b;
}

bool post_own_slot(struct dispatcher *d, double now)
{
	double wait_s = 0;

	/* With the fleet budget a wait may outlast the database: a batch
	 * whose vt ran out meanwhile may be another reader's now, so it is
	 * never sent. */
	while (d->budget && d->waiting &&
	       ev_now(d->loop) - d->waiting->read_at >= d->cfg->vt_seconds - 1.0) {
		d->in_flight--;
		metrics_set_in_flight(d->in_flight);
		metrics_route_set_in_flight(d->mroute, d->in_flight);
		batch_end(pop_waiting(d), BATCH_UNSENT,
			  "its vt ran out while it waited for the fleet budget");
	}
	if (d->waiting == NULL)
		return false;
	if (!ratelimit_slot(&d->rl, now, &wait_s)) {
		if (!ev_is_active(&d->rate_timer)) {
			ev_timer_set(&d->rate_timer, wait_s, 0.0);
			ev_timer_start(d->loop, &d->rate_timer);
		}
		return false;
	}
	/* The fleet's share (off: always there); without a slot, one grant
	 * is asked for and its ready hook (post_on_budget) comes back. */
	if (!budget_has_slot(d->budget, now)) {
		budget_ask(d->budget, now, d->nwaiting);
		return false;
	}
	return true;
}

bool post_send_next(struct dispatcher *d)
{
	/* post_own_slot found a fleet slot; none left now: nothing sent. */
	if (!budget_take(d->budget, ev_time(), d->nwaiting))
		return false;
	return send_now(d, pop_waiting(d));
}

void post_send_waiting(struct dispatcher *d)
{
	if (d->ep) {
		endpoint_pump(d->ep);
		return;
	}
	while (d->waiting && post_own_slot(d, ev_time())) {
		if (!budget_take(d->budget, ev_time(), d->nwaiting))
			return; /* its ready hook comes back */
		send_now(d, pop_waiting(d));
	}
}

void post_on_budget(void *arg)
{
	struct dispatcher *d = arg;

	if (!d->finished)
		post_send_waiting(d);
}

void post_on_rate_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)loop;
	(void)revents;
	post_send_waiting(w->data);
}

void post_batch(struct dispatcher *d, struct batch *b)
{
	d->in_flight++;
	metrics_set_in_flight(d->in_flight);
	metrics_route_set_in_flight(d->mroute, d->in_flight);
	b->next = NULL;
	if (d->waiting_tail)
		d->waiting_tail->next = b;
	else
		d->waiting = b;
	d->waiting_tail = b;
	d->nwaiting++;
	post_send_waiting(d);
	if (d->waiting) {
		struct log_line *l = log_begin_route(d->cfg->route_name, LOG_DEBUG, "rate_limited");
		log_int(l, "waiting", d->nwaiting);
		log_int(l, "max_requests_per_10s", d->rl.cap);
		log_end(l);
	}
}

void post_release_waiting(struct dispatcher *d)
{
	while (d->waiting) {
		d->in_flight--;
		batch_release(pop_waiting(d), 0);
	}
	ev_timer_stop(d->loop, &d->rate_timer);
	metrics_set_in_flight(d->in_flight);
	metrics_route_set_in_flight(d->mroute, d->in_flight);
}

void post_drop_waiting(struct dispatcher *d)
{
	while (d->waiting)
		batch_end(pop_waiting(d), BATCH_UNSENT,
			  "never sent (exit): visible again after vt_seconds");
}

/* The bodies a read could send now: free slots (the endpoint's too when
 * shared; no more than tracker.max_queued_jobs leaves room for) and the
 * rate budget of the next second (no more than the fleet's grant holds
 * now), capped by read_batches. */
static int bodies_now(const struct dispatcher *d, int *slots_out, int *rate_out)
{
	double now = ev_time();
	int slots = d->cfg->max_in_flight - d->in_flight;
	int rate = ratelimit_available(&d->rl, now, 1.0) - d->nwaiting;
	int granted = budget_slots_now(d->budget, now) - d->nwaiting;

	if (granted < rate)
		rate = granted;
	if (d->tracker && d->cfg->tracker_max_queued_jobs > 0) {
		long room = (long)d->cfg->tracker_max_queued_jobs -
			    tracker_queued_jobs(d->tracker) - d->in_flight;
		if (room < slots)
			slots = (int)room;
	}

	if (d->ep) { /* and what the endpoint has left */
		int ep_slots = endpoint_free_slots(d->ep),
		    ep_rate = endpoint_rate_available(d->ep, now, 1.0);
		slots = ep_slots < slots ? ep_slots : slots;
		rate = ep_rate < rate ? ep_rate : rate;
	}
	*slots_out = slots;
	*rate_out = rate;
	return batch_read_bodies(d->cfg->read_batches, slots, rate);
}

int post_read_qty(const struct dispatcher *d)
{
	int slots, rate;

	if (d->cfg->read_batches <= 1 || d->once)
		return d->cfg->batch_size;
	bodies_now(d, &slots, &rate);
	return batch_read_qty(d->cfg->batch_size, d->cfg->read_batches, slots, rate);
}

bool post_read_waits(struct dispatcher *d)
{
	int slots, rate;

	/* A shared endpoint hands its slots out by priority (endpoint.c). */
	if (d->cfg->read_batches <= 1 || d->once || d->ep || d->gather_over)
		return false;
	bodies_now(d, &slots, &rate);
	if (!batch_read_waits(d->backlog, d->in_flight, d->cfg->max_in_flight, d->cfg->read_batches,
			      slots, rate))
		return false;
	if (!ev_is_active(&d->gather)) {
		ev_timer_set(&d->gather, BATCH_READ_GATHER_S, 0.0);
		ev_timer_start(d->loop, &d->gather);
	}
	return true;
}

void post_on_gather_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct dispatcher *d = w->data;

	(void)loop;
	(void)revents;
	d->gather_over = true;
	dispatcher_kick(d);
}
