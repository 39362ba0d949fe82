/* control — runtime control of one route's reads: pause, resume, drain.
 *
 * Part of the dispatcher (include/dispatcher_int.h). Owns the pure state
 * transition (control_next), the read gate (control_may_read) and the
 * route's persisted state when the ledger is on: one row per (route,
 * queue) in the ledger schema's route_control (migration 5, src/migrate.c),
 * read once before the first read after start; with the ledger off the
 * state lasts until the daemon restarts. Every statement is a single
 * unnamed one, so it works through a transaction pooler. Also what the route reports of its state: /readyz's reason and
 * the STATUS= line (dispatcher_ready, dispatcher_status). Knows nothing of
 * HTTP, the admin endpoint or the CLI. */
#include "dispatcher_int.h"
#include "log.h"

#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const state_names[MRS_STATES] = { "running", "paused", "draining", "drained" };

const char *dispatcher_control_state_name(int state)
{
	return state >= 0 && state < MRS_STATES ? state_names[state] : "unknown";
}

int dispatcher_control_state(const struct dispatcher *d)
{
	return (int)d->ctl;
}

enum metrics_route_state control_next(enum metrics_route_state cur, enum dispatcher_control cmd)
{
	switch (cmd) {
	case CONTROL_PAUSE:
		return MRS_PAUSED;
	case CONTROL_RESUME:
		return MRS_RUNNING;
	case CONTROL_DRAIN:
		/* Draining a drained route finds out again whether it is empty. */
		return MRS_DRAINING;
	case CONTROL_EMPTY:
		return cur == MRS_DRAINING ? MRS_DRAINED : cur;
	}
	return cur;
}

bool control_may_read(enum metrics_route_state s)
{
	return s == MRS_RUNNING || s == MRS_DRAINING;
}

static void log_state(struct dispatcher *d, const char *event, const char *why)
{
	struct log_line *l = log_begin_route(d->cfg->route_name, LOG_INFO, event);

	log_str(l, "queue", d->cfg->queue_name);
	log_str(l, "state", state_names[d->ctl]);
	if (why)
		log_str(l, "reason", why);
	log_end(l);
}

static void set_state(struct dispatcher *d, enum metrics_route_state s)
{
	d->ctl = s;
	metrics_route_set_state(d->mroute, s);
	dispatcher_state_changed(d);
}

static void on_stored(void *arg, PGresult *res, const struct pg_error *err)
{
	struct dispatcher *d = arg;

	PQclear(res);
	if (err && !d->finished) {
		struct log_line *l = log_begin_route(d->cfg->route_name, LOG_WARN,
						     "control_not_stored");
		log_str(l, "sqlstate", err->sqlstate);
		log_str(l, "error", err->message);
		log_str(l, "outcome", "the state applies until the daemon restarts");
		log_end(l);
	}
}

static void store(struct dispatcher *d)
{
	const char *params[3] = { d->cfg->route_name, d->cfg->queue_name, state_names[d->ctl] };
	char sql[256];

	if (!d->cfg->ledger_enabled)
		return; /* nowhere to keep it: until the daemon restarts */
	if (!d->ctl_loaded) {
		/* Before the lookup the table may not exist yet (the migration
		 * is queued at connect, after a statement queued now). */
		d->ctl_store_pending = true;
		return;
	}
	/* ledger.schema is a checked identifier; the migration made the table. */
	snprintf(sql, sizeof(sql),
		 "INSERT INTO %s.route_control (route, queue_name, state) "
		 "VALUES ($1, $2, $3) ON CONFLICT (route, queue_name) DO UPDATE "
		 "SET state = EXCLUDED.state, changed_at = now()",
		 d->cfg->ledger_schema);
	if (pg_query(d->pg, sql, 3, params, on_stored, d) != 0)
		log_msg_route(d->cfg->route_name, LOG_WARN, "control_not_stored",
			      "cannot queue the statement; the state applies until restart");
}

void dispatcher_control(struct dispatcher *d, enum dispatcher_control cmd)
{
	static const char *const why[] = { "pause", "resume", "drain", "queue empty" };
	enum metrics_route_state next = control_next(d->ctl, cmd);

	set_state(d, next);
	/* A read already out may have begun before the rows the operator
	 * wants drained: its empty answer does not end the drain. */
	if (cmd == CONTROL_DRAIN)
		d->drain_stale_read = d->reading;
	log_state(d, "route_control", why[cmd]);
	if (!d->cfg->ledger_enabled && cmd != CONTROL_EMPTY)
		log_msg_route(d->cfg->route_name, LOG_INFO, "control_not_stored",
			      "ledger.enabled is off: the state lasts until the daemon restarts");
	if (!d->once)
		store(d);
	if (control_may_read(next))
		dispatcher_kick(d);
}

void control_on_empty(struct dispatcher *d)
{
	if (d->ctl != MRS_DRAINING)
		return;
	if (d->drain_stale_read) {
		d->drain_stale_read = false;
		d->again = true; /* read once more, from after the command */
		return;
	}
	dispatcher_control(d, CONTROL_EMPTY);
}

static void on_loaded(void *arg, PGresult *res, const struct pg_error *err)
{
	struct dispatcher *d = arg;

	d->ctl_loading = false;
	if (d->finished) {
		PQclear(res);
		return;
	}
	if (err && err->connection_lost) {
		/* Looked up again after the reconnect. */
		PQclear(res);
		return;
	}
	d->ctl_loaded = true;
	if (d->ctl_store_pending) {
		/* The operator's command since start wins over what was kept. */
		d->ctl_store_pending = false;
		store(d);
	} else if (res && PQntuples(res) == 1) {
		const char *s = PQgetvalue(res, 0, 0);
		for (int i = 0; i < MRS_STATES; i++)
			if (strcmp(s, state_names[i]) == 0 && i != (int)d->ctl) {
				set_state(d, (enum metrics_route_state)i);
				log_state(d, "route_control_restored",
					  "kept in the ledger schema's route_control");
			}
	}
	/* An error (no table yet: 42P01) means nothing was ever stored. */
	PQclear(res);
	dispatcher_kick(d);
}

void control_load(struct dispatcher *d)
{
	const char *params[2] = { d->cfg->route_name, d->cfg->queue_name };
	char sql[160];

	if (d->ctl_loaded || d->once || !d->cfg->ledger_enabled) {
		d->ctl_loaded = true;
		dispatcher_kick(d);
		return;
	}
	if (d->ctl_loading)
		return;
	/* Queued after the ledger's migration on the same connection. */
	snprintf(sql, sizeof(sql),
		 "SELECT state FROM %s.route_control WHERE route = $1 AND queue_name = $2",
		 d->cfg->ledger_schema);
	if (pg_query(d->pg, sql, 2, params, on_loaded, d) != 0) {
		d->ctl_loaded = true; /* cannot look: read rather than stall */
		dispatcher_kick(d);
		return;
	}
	d->ctl_loading = true;
}

const char *dispatcher_route_name(const struct dispatcher *d)
{
	return d->cfg->route_name;
}

const struct config *dispatcher_config(const struct dispatcher *d)
{
	return d->cfg;
}

void dispatcher_info(const struct dispatcher *d, int *in_flight, long long *queue_length)
{
	*in_flight = d->in_flight;
	*queue_length = d->queue_length;
}

void dispatcher_cancel_requests(struct dispatcher *d)
{
	http_cancel_owner(d->http, d);
	if (d->tracker)
		http_cancel_owner(d->http, d->tracker);
}

bool dispatcher_ready(const struct dispatcher *d, char *why, size_t len)
{
	const char *reason = d->stopping || d->finished ? "draining: shutting down"
			     : !pg_ready(d->pg)         ? "database disconnected"
			     : d->circuit_open ? "circuit open: RunPod refuses the key or endpoint"
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
	snprintf(buf, len,
		 "%s%s%s; in flight %d; accepted %llu msgs in %llu requests, rejected %llu, "
		 "unknown %llu; queue length %lld",
		 d->ctl == MRS_RUNNING ? "" : dispatcher_control_state_name((int)d->ctl),
		 d->ctl == MRS_RUNNING ? "" : ", ", ready && !d->queue_capped ? "dispatching" : why,
		 d->in_flight, d->stats.messages_accepted, d->stats.requests_accepted,
		 d->stats.requests_rejected, d->stats.requests_unknown, d->queue_length);
}
