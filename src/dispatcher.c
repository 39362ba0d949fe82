/* dispatcher — see include/dispatcher.h. The pipeline (trigger → read →
 * split → post), the pause after failures, the drain and the lifecycle's
 * start. Batches, /run, the circuit, NOTIFY and the shutdown live in
 * batch.c, post.c, circuit.c, wakeup.c and shutdown.c. */
#include "backoff.h"
#include "batch.h"
#include "dispatcher_int.h"
#include "log.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define OFFSET_OF_TIMER(f) offsetof(struct dispatcher, f)

/* The one list of the dispatcher's timers: stopping them all (finish,
 * free) or all but the shutdown deadline (stop) walks it. */
static const size_t timer_offsets[] = {
	OFFSET_OF_TIMER(poll),       OFFSET_OF_TIMER(pause),          OFFSET_OF_TIMER(probe),
	OFFSET_OF_TIMER(deadline),   OFFSET_OF_TIMER(stats_timer),    OFFSET_OF_TIMER(debounce),
	OFFSET_OF_TIMER(wake_timer), OFFSET_OF_TIMER(selftest_timer), OFFSET_OF_TIMER(rate_timer),
	OFFSET_OF_TIMER(gather),
};

void dispatcher_stop_timers(struct dispatcher *d, const ev_timer *keep)
{
	for (size_t i = 0; i < sizeof(timer_offsets) / sizeof(timer_offsets[0]); i++) {
		ev_timer *t = (ev_timer *)((char *)d + timer_offsets[i]);
		if (t != keep)
			ev_timer_stop(d->loop, t);
	}
}

void dispatcher_state_changed(struct dispatcher *d)
{
	if (d->state_hook && !d->finished)
		d->state_hook(d->state_arg);
}

/* Pauses reads. A failure while a pause is already running does not make
 * the pause longer: the endpoint, not each batch, backs off. Returns the
 * pause left, in ms. hint_ms >= 0 (a Retry-After) replaces the exponential
 * delay. */
double dispatcher_back_off(struct dispatcher *d, enum pause_reason why, double hint_ms)
{
	double ms;

	if (ev_is_active(&d->pause))
		return ev_timer_remaining(d->loop, &d->pause) * 1000.0;
	d->failures++;
	if (hint_ms >= 0)
		ms = hint_ms < BACKOFF_MIN_MS ? BACKOFF_MIN_MS : hint_ms;
	else
		ms = backoff_ms(d->failures, d->cfg->backoff_base_ms, d->cfg->backoff_max_ms,
				BACKOFF_MIN_MS, backoff_jitter());
	d->pause_reason = why;
	ev_timer_set(&d->pause, ms / 1000.0, 0.0);
	ev_timer_start(d->loop, &d->pause);
	return ms;
}

static void on_read(struct dispatcher *d, struct pgmq_batch *rows, const struct pg_error *err)
{
	struct read_result *rr;
	bool full;

	if (d->finished) {
		/* Being freed: the messages come back after their vt. */
		if (rows) {
			pgmq_batch_free(rows);
			free(rows);
		}
		return;
	}
	d->stats.reads++;
	d->backlog = !err && rows->n >= d->read_qty;
	if (err) {
		bool unknown = err->connection_lost && err->sent;
		/* Its row, if the statement committed, says so rather than sending. */
		for (int k = 0; unknown && k < d->nread_ids; k++)
			ledger_note(d->ledger, d->read_ids[k], "unknown", 0, NULL, err->message,
				    strlen(err->message), false);
		struct log_line *l = log_begin_route(d->cfg->route_name, LOG_ERROR,
						     unknown ? "read_fate_unknown" : "read_failed");
		d->stats.reads_failed++;
		metrics_inc_reads(METRICS_READ_ERROR);
		log_str(l, "queue", d->cfg->queue_name);
		log_str(l, "sqlstate", err->sqlstate);
		log_str(l, "error", err->message);
		if (unknown)
			log_str(l, "outcome",
				"messages it read, if any, are visible again after vt_seconds");
		/* --once does not read again: announce no retry. */
		if (!err->connection_lost && !d->once)
			log_int(l, "retry_in_ms", (long long)dispatcher_back_off(d, PAUSE_DB, -1));
		else if (!err->connection_lost)
			log_str(l, "outcome", "--once: no retry, exit status 69");
		if (strcmp(err->sqlstate, "42P01") == 0) { /* undefined_table: no such queue */
			char call[320];

			pgmq_create_call(d->cfg->queue_name, call, sizeof(call));
			log_str(l, "fix", call);
		}
		log_end(l);
		if (strcmp(err->sqlstate, PGMQ_SQLSTATE_OUT_OF_RANGE) == 0)
			overflow_find(d);
		d->once_result = DISPATCH_DONE_FAILED;
		d->read_done = true;
		dispatcher_maybe_finish(d);
		return;
	}
	d->read_done = true;
	if (rows->n == 0) {
		struct log_line *l = log_begin_route(d->cfg->route_name, LOG_DEBUG, "queue_empty");
		log_str(l, "queue", d->cfg->queue_name);
		log_end(l);
		d->stats.reads_empty++;
		metrics_inc_reads(METRICS_READ_EMPTY);
		pgmq_batch_free(rows);
		free(rows);
		control_on_empty(d);
		if (d->again)
			dispatcher_kick(d);
		else
			wakeup_idle_read(d);
		dispatcher_maybe_finish(d);
		return;
	}
	rr = calloc(1, sizeof(*rr));
	if (rr == NULL) {
		log_msg_route(d->cfg->route_name, LOG_ERROR, "out_of_memory",
			      "dropping a read of %d; visible again after vt", rows->n);
		pgmq_batch_free(rows);
		free(rows);
		/* The read is over all the same: --once must end, not hang. */
		d->once_result = DISPATCH_DONE_FAILED;
		dispatcher_maybe_finish(d);
		return;
	}
	rr->rows = *rows;
	rr->refs = 1;
	rr->part_rows = d->cfg->batch_size;
	rr->nids = d->nread_ids;
	memcpy(rr->dispatch_ids, d->read_ids, (size_t)d->nread_ids * sizeof(d->read_ids[0]));
	free(rows);
	full = rr->rows.n >= d->cfg->batch_size;
	d->stats.messages_read += (unsigned long long)rr->rows.n;
	metrics_inc_reads(METRICS_READ_ROWS);
	metrics_add_messages_read((unsigned)rr->rows.n);
	metrics_route_add(d->mroute, MR_MESSAGES_READ, (unsigned)rr->rows.n);
	/* One line per batch (a /run body of <= batch_size jobs), however
	 * many one read claimed. */
	for (int first = 0; first < rr->rows.n; first += rr->part_rows) {
		int jobs = rr->rows.n - first < rr->part_rows ? rr->rows.n - first : rr->part_rows;
		struct log_line *l = log_begin_route(d->cfg->route_name, LOG_DEBUG, "batch_read");

		log_str(l, "queue", d->cfg->queue_name);
		log_int(l, "jobs", jobs);
		log_num(l, "first_msg_id", rr->rows.msgs[first].msg_id);
		log_num(l, "last_msg_id", rr->rows.msgs[first + jobs - 1].msg_id);
		if (jobs < rr->rows.n)
			log_int(l, "read_jobs", rr->rows.n);
		log_end(l);
	}
	if (d->stopping || !control_may_read(d->ctl)) {
		/* Read while stopping, or out when the route was paused: hand
		 * the messages back at once rather than send them. */
		batch_release_read(d, rr);
	} else {
		batch_dispatch_rows(d, rr);
	}
	read_result_unref(rr);
	wakeup_reset_idle(d);
	/* A full batch means there is probably more: drain. */
	if ((full || d->again) && !d->once && !d->stopping)
		dispatcher_kick(d);
	dispatcher_maybe_finish(d);
}

void dispatcher_on_read(void *arg, struct pgmq_batch *rows, const struct pg_error *err)
{
	struct dispatcher *d = arg;

	d->reading = false;
	on_read(d, rows, err);
	if (d->ep && !d->finished)
		endpoint_slot_freed(d->ep); /* the read no longer holds a slot */
}

void dispatcher_kick(struct dispatcher *d)
{
	if (d->reading) {
		d->again = true; /* e.g. a NOTIFY for rows the running read may miss */
		return;
	}
	if (d->stopping || d->finished || d->circuit_open || !pg_ready(d->pg) ||
	    ev_is_active(&d->pause) || !ledger_ready(d->ledger) || !d->ctl_loaded ||
	    !control_may_read(d->ctl))
		return;
	if (d->in_flight >= d->cfg->max_in_flight || circuit_queue_capped(d)) {
		d->read_wanted = true;
		return;
	}
	if (d->once && d->read_done)
		return;
	if (d->ep && !endpoint_may_read(d->ep, d)) {
		d->ep_wanted = true; /* endpoint_slot_freed kicks again */
		return;
	}
	if (post_read_waits(d)) {
		d->read_wanted = true; /* a few more free slots make one fuller read */
		return;
	}
	d->ep_wanted = false;
	d->read_wanted = false;
	d->again = false;
	d->gather_over = false;
	ev_timer_stop(d->loop, &d->gather);
	d->read_qty = post_read_qty(d);
	d->nread_ids = 0;
	if (ledger_recording(d->ledger)) {
		/* Before the read: its rows, one per body, are made with it. */
		d->nread_ids = (d->read_qty + d->cfg->batch_size - 1) / d->cfg->batch_size;
		if (d->nread_ids > READ_MAX_BODIES)
			d->nread_ids = READ_MAX_BODIES; /* post_read_qty keeps below */
		for (int k = 0; k < d->nread_ids; k++)
			ledger_new_id(d->read_ids[k]);
	}
	if (d->nread_ids ? ledger_read(d->ledger, (const char(*)[LEDGER_ID_LEN + 1]) d->read_ids,
				       d->nread_ids, d->cfg->batch_size, d->cfg->vt_seconds,
				       d->read_qty, dispatcher_on_read, d) != 0
			 : pgmq_read(d->pg, d->cfg->read_function, d->cfg->queue_name,
				     d->cfg->vt_seconds, d->read_qty, dispatcher_on_read, d) != 0) {
		log_msg_route(d->cfg->route_name, LOG_ERROR, "read_failed",
			      "cannot queue the read statement");
		dispatcher_back_off(d, PAUSE_DB, -1);
		return;
	}
	d->reading = true;
}

static void on_poll(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)loop;
	(void)revents;
	dispatcher_kick(w->data);
}

static void on_pause_over(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct dispatcher *d = w->data;

	(void)loop;
	(void)revents;
	d->pause_reason = PAUSE_NONE;
	dispatcher_kick(d);
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
	if (d->connected_once && pg_primary(d->pg)) /* once per connection */
		metrics_inc_pg_reconnects();
	d->connected_once = true;
	if (d->w.listen_pg == NULL)
		/* re-LISTEN first: the read below is queued after it */
		wakeup_start_listen(d, d->pg);
	ledger_connected(d->ledger); /* the migration, once; reads wait for it */
	budget_connected(d->budget, d->ledger == NULL);
	dispatcher_state_changed(d);
	control_load(d); /* then kicks */
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

	if (d->w.listen_pg == NULL)
		wakeup_listen_lost(d);
	dispatcher_state_changed(d);
}

static void on_metrics(void *arg, long long length, double oldest_age_s, const struct pg_error *err)
{
	struct dispatcher *d = arg;

	d->metrics_pending = false;
	if (d->finished)
		return;
	if (err) {
		struct log_line *l = log_begin_route(d->cfg->route_name, LOG_DEBUG,
						     "queue_metrics_failed");
		log_str(l, "sqlstate", err->sqlstate);
		log_str(l, "error", err->message);
		log_end(l);
	} else {
		d->queue_length = length;
		metrics_set_queue_stats(length, oldest_age_s);
		metrics_route_set_queue_length(d->mroute, length);
	}
	dispatcher_state_changed(d);
	dispatcher_maybe_finish(d);
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

static void on_ledger_ready(void *arg)
{
	dispatcher_kick(arg);
}

static void on_ledger_settled(void *arg)
{
	dispatcher_maybe_finish(arg);
}

static void on_ledger_fatal(void *arg)
{
	struct dispatcher *d = arg;

	d->fatal = true;
	d->read_done = true;
	dispatcher_stop(d);
}

/* A job whose replica died: follow it as if it had just been accepted,
 * its heartbeat due at once when its vt is short. */
static void on_ledger_claimed(void *arg, const char *dispatch_id, const char *job_id,
			      const long long *ids, int n, double vt_left_s, double age_s)
{
	struct dispatcher *d = arg;
	double left = vt_left_s < 0 ? 0 : vt_left_s, now = ev_now(d->loop);

	tracker_add_claimed(d->tracker, job_id, dispatch_id, ids, n,
			    now + left - d->cfg->vt_seconds, now - (age_s > 0 ? age_s : 0));
}

void dispatcher_tracker_state(void *arg, const char *dispatch_id, const char *state,
			      const char *error)
{
	struct dispatcher *d = arg;
	/* A COMPLETED job keeps its lease until the ledger has checked, after
	 * the grace period, that the worker deleted its messages. */
	bool held = (!runpod_status_is_terminal(state) || strcmp(state, "COMPLETED") == 0) &&
		    strcmp(state, "lost") != 0 && strcmp(state, "released") != 0;

	ledger_note(d->ledger, dispatch_id, state, 0, NULL, error, error ? strlen(error) : 0, held);
}

static void on_connect_failed(void *arg)
{
	struct dispatcher *d = arg;

	/* A one-shot run does not wait for a database that is down. */
	if (d->once && !d->finished) {
		d->once_result = DISPATCH_DONE_FAILED;
		d->read_done = true;
		dispatcher_maybe_finish(d);
	}
}

struct dispatcher *dispatcher_new(struct ev_loop *loop, const struct config *cfg, bool once,
				  dispatcher_done_fn done, void *arg)
{
	return dispatcher_new_shared(loop, cfg, NULL, NULL, once, done, arg);
}

struct dispatcher *dispatcher_new_shared(struct ev_loop *loop, const struct config *cfg,
					 struct http *http, struct pg_pool *pool, bool once,
					 dispatcher_done_fn done, void *arg)
{
	static const struct {
		size_t off;
		void (*cb)(struct ev_loop *, ev_timer *, int);
	} timers[] = {
		{ OFFSET_OF_TIMER(poll), on_poll },
		{ OFFSET_OF_TIMER(pause), on_pause_over },
		{ OFFSET_OF_TIMER(probe), circuit_on_probe_timer },
		{ OFFSET_OF_TIMER(deadline), dispatcher_on_deadline },
		{ OFFSET_OF_TIMER(stats_timer), on_stats },
		{ OFFSET_OF_TIMER(debounce), wakeup_on_debounce },
		{ OFFSET_OF_TIMER(wake_timer), wakeup_on_wake_timer },
		{ OFFSET_OF_TIMER(selftest_timer), wakeup_on_selftest_timeout },
		{ OFFSET_OF_TIMER(rate_timer), post_on_rate_timer },
		{ OFFSET_OF_TIMER(gather), post_on_gather_timer },
	};
	struct dispatcher *d = calloc(1, sizeof(*d));
	struct pg_callbacks cb = { .connected = on_connected,
				   .disconnected = on_disconnected,
				   .connect_failed = on_connect_failed,
				   .notify = wakeup_on_notify };

	if (d == NULL)
		return NULL;
	_Static_assert(sizeof(timers) / sizeof(timers[0]) ==
			       sizeof(timer_offsets) / sizeof(timer_offsets[0]),
		       "every timer is in both lists");
	d->loop = loop;
	d->once = once;
	d->done = done;
	d->done_arg = arg;
	d->once_result = DISPATCH_DONE_EMPTY;
	d->queue_length = -1;
	d->mroute = metrics_route(cfg->route_name[0] ? cfg->route_name : "default");
	metrics_route_set_state(d->mroute, MRS_RUNNING);
	for (size_t i = 0; i < sizeof(timers) / sizeof(timers[0]); i++) {
		ev_timer *t = (ev_timer *)((char *)d + timers[i].off);
		ev_init(t, timers[i].cb);
		t->data = d;
	}
	if (dispatcher_conf_build(&d->conf, cfg) != 0) {
		free(d);
		return NULL;
	}
	d->cfg = cfg;
	ev_timer_set(&d->poll, cfg->poll_interval_ms / 1000.0, cfg->poll_interval_ms / 1000.0);
	ev_timer_set(&d->stats_timer, 0.0, cfg->metrics_interval_ms / 1000.0);
	d->w.idle_poll_ms = cfg->poll_interval_ms;
	cb.arg = d;
	d->pool = pool;
	d->pg = pg_new_pooled(loop, pool, cfg->conninfo, cfg->db_connect_timeout_ms, &cb);
	d->http_shared = http != NULL;
	d->http = http ? http : http_new(loop);
	if (d->pg == NULL || d->http == NULL ||
	    ratelimit_init(&d->rl, cfg->max_requests_per_10s,
			   cfg->rate_window_ms / 1000.0 + RATE_MARGIN_S) != 0 ||
	    wakeup_init(d, cfg) != 0) {
		dispatcher_free(d);
		return NULL;
	}
	if (cfg->tracker_enabled && !once &&
	    (d->tracker = tracker_new(loop, cfg, d->http, d->pg)) == NULL) {
		dispatcher_free(d);
		return NULL;
	}
	tracker_set_wake(d->tracker, wakeup_after, d);
	if (cfg->fleet_enabled) {
		if ((d->budget = budget_new(loop, d->pg, cfg, BUDGET_RUN, post_on_budget, d)) ==
			    NULL ||
		    tracker_set_fleet(d->tracker, cfg) != 0) {
			dispatcher_free(d);
			return NULL;
		}
	}
	if (cfg->ledger_enabled) {
		struct ledger_hooks h = { .ready = on_ledger_ready,
					  .fatal = on_ledger_fatal,
					  .settled = on_ledger_settled,
					  .claimed = once ? NULL : on_ledger_claimed,
					  .arg = d };
		if ((d->ledger = ledger_new(loop, cfg, d->pg, &h)) == NULL) {
			dispatcher_free(d);
			return NULL;
		}
		tracker_set_observer(d->tracker, dispatcher_tracker_state, d);
	}
	return d;
}

void dispatcher_start(struct dispatcher *d)
{
	pg_start(d->pg);
	if (d->w.listen_pg)
		pg_start(d->w.listen_pg);
	if (!d->once) {
		ev_timer_start(d->loop, &d->poll);
		ev_timer_again(d->loop, &d->stats_timer);
	}
}

const struct dispatcher_stats *dispatcher_stats(const struct dispatcher *d)
{
	return &d->stats;
}

void dispatcher_set_state_hook(struct dispatcher *d, void (*fn)(void *arg), void *arg)
{
	d->state_hook = fn;
	d->state_arg = arg;
}

void dispatcher_free(struct dispatcher *d)
{
	if (d == NULL)
		return;
	dispatcher_stop_timers(d, NULL);
	d->finished = true;
	post_drop_waiting(d); /* never sent: they come back after their vt */
	/* Callbacks still run from here: aborted requests end as outcome
	 * unknown (logged with their msg ids), pending queries fail; finished
	 * keeps them from starting new work. */
	if (d->http)
		dispatcher_cancel_requests(d);
	tracker_free(d->tracker); /* after the aborts above, before http_free drops requests */
	ledger_free(d->ledger);   /* its statements' callbacks find it gone */
	/* pg_free below fails the statements still queued (the database
	 * gone at exit): their callbacks end batches, which note them in the
	 * ledger and look at the tracker; they must find neither. */
	d->tracker = NULL;
	d->ledger = NULL;
	if (!d->http_shared)
		http_free(d->http);
	wakeup_free(d);
	pg_free(d->pg);
	dispatcher_conf_free(&d->conf);
	ratelimit_free(&d->rl);
	budget_free(d->budget);
	free(d);
}
