/* wakeup — when to read, besides the pipeline's own drain: NOTIFY on
 * inserts (LISTEN on the main or a separate connection, a self-test
 * notification sent from another session that proves they arrive, a look
 * for the queue's insert trigger, again while running), the debounce of a burst, the idle back-off of the poll period
 * up to idle_poll_max_ms, and the wake-up when released messages become
 * visible again. Acts on the dispatcher's state (include/dispatcher_int.h)
 * and asks it to read with dispatcher_kick. Knows nothing of batches,
 * /run or the circuit. */
#include "dispatcher_int.h"
#include "log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define SELFTEST_TIMEOUT_S 5.0 /* a connect of its own, then the NOTIFY must arrive */
#define TRIGGER_RECHECK_S 10.0 /* at least this often while reads come back empty */

static void trigger_check(struct dispatcher *d);
static void sender_free(struct dispatcher *d);

/* The poll timer is the backstop; while NOTIFY is known to work it backs
 * off when reads come back empty, and any rows or NOTIFY reset it. */
static void set_poll_period(struct dispatcher *d, double ms)
{
	if (ms == d->w.idle_poll_ms)
		return;
	d->w.idle_poll_ms = ms;
	{
		struct log_line *l = log_begin_route(d->cfg->route_name, LOG_DEBUG, "poll_period");
		log_int(l, "poll_period_ms", (long long)ms);
		log_end(l);
	}
	dispatcher_timer_retime(d->loop, &d->poll, ms / 1000.0);
}

void wakeup_reset_idle(struct dispatcher *d)
{
	set_poll_period(d, d->cfg->poll_interval_ms);
}

void wakeup_reload(struct dispatcher *d)
{
	double ms = d->w.idle_poll_ms;

	if (d->w.notify_state != NOTIFY_OK || !d->w.has_trigger || ms > d->cfg->idle_poll_max_ms)
		ms = d->cfg->idle_poll_max_ms;
	if (d->w.notify_state != NOTIFY_OK || !d->w.has_trigger || ms < d->cfg->poll_interval_ms)
		ms = d->cfg->poll_interval_ms;
	set_poll_period(d, ms);
}

void wakeup_idle_read(struct dispatcher *d)
{
	double next = d->w.idle_poll_ms * 2;

	/* Triggers come and go while we run: look again at each backed-off
	 * read (they double apart, so few) and every TRIGGER_RECHECK_S. */
	if (d->cfg->notify && !d->once &&
	    (d->w.idle_poll_ms > d->cfg->poll_interval_ms ||
	     ev_now(d->loop) - d->w.trigger_checked_at >= TRIGGER_RECHECK_S))
		trigger_check(d);

	/* Without a working LISTEN and an insert trigger to fire it, the timer
	 * is the only way new messages are found: keep it at poll_interval_ms. */
	if (d->w.notify_state != NOTIFY_OK || !d->w.has_trigger)
		return;
	if (next > d->cfg->idle_poll_max_ms)
		next = d->cfg->idle_poll_max_ms;
	if (next < d->cfg->poll_interval_ms)
		next = d->cfg->poll_interval_ms;
	set_poll_period(d, next);
}

static void set_notify_state(struct dispatcher *d, enum notify_state st)
{
	d->w.notify_state = st;
	if (st != NOTIFY_OK)
		wakeup_reset_idle(d);
}

void wakeup_on_debounce(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)loop;
	(void)revents;
	dispatcher_kick(w->data);
}

void wakeup_on_wake_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct dispatcher *d = w->data;
	struct log_line *l = log_begin_route(d->cfg->route_name, LOG_DEBUG, "wake_read");

	(void)loop;
	(void)revents;
	log_str(l, "reason",
		((struct dispatcher *)w->data)->queue_capped
			? "fewer jobs wait IN_QUEUE (max_queued_jobs)"
			: "released messages are visible again");
	log_end(l);
	wakeup_reset_idle(w->data);
	dispatcher_kick(w->data);
}

/* Messages we made visible again after_s from now: read then, whatever
 * the idle poll period has grown to. The earliest request wins. */
void wakeup_after(void *arg, double after_s)
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

void wakeup_on_notify(void *arg, const char *channel, const char *payload)
{
	struct dispatcher *d = arg;

	if (d->finished || (strcmp(channel, d->w.channel) != 0 &&
			    (d->w.channel2[0] == '\0' || strcmp(channel, d->w.channel2) != 0)))
		return;
	if (strcmp(payload, d->w.selftest) == 0) {
		if (d->w.notify_state == NOTIFY_TESTING) {
			struct log_line *l = log_begin_route(d->cfg->route_name, LOG_DEBUG,
							     "notify_ready");
			log_str(l, "channel", d->w.channel);
			log_end(l);
			ev_timer_stop(d->loop, &d->selftest_timer);
			d->w.notify_broken_logged = false;
			set_notify_state(d, NOTIFY_OK);
		}
		return;
	}
	/* A burst of inserts becomes one read after the debounce. */
	wakeup_reset_idle(d);
	if (!ev_is_active(&d->debounce)) {
		ev_timer_set(&d->debounce, d->cfg->notify_debounce_ms / 1000.0, 0.0);
		ev_timer_start(d->loop, &d->debounce);
	}
}

void wakeup_on_selftest_timeout(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct dispatcher *d = w->data;

	(void)loop;
	(void)revents;
	sender_free(d);
	if (d->w.notify_state != NOTIFY_TESTING)
		return;
	set_notify_state(d, NOTIFY_BROKEN);
	if (!d->w.notify_broken_logged) {
		struct log_line *l = log_begin_route(d->cfg->route_name, LOG_WARN,
						     "notify_unavailable");
		log_str(l, "channel", d->w.channel);
		log_str(l, "msg",
			"LISTEN receives no notifications on this connection (a transaction "
			"pooler?); polling every poll_interval_ms. Set database.listen_conninfo "
			"to a direct or session-mode connection to wake up on inserts.");
		log_end(l);
		d->w.notify_broken_logged = true;
	}
}

/* The self-test NOTIFY is sent from a session of its own: one short,
 * non-blocking libpq connection to database.conninfo that runs one
 * pg_notify and closes. PostgreSQL delivers a session its own
 * notifications, and a transaction pooler forwards those while it drops
 * the ones other sessions send (PgBouncer: "got packet 'A' from server
 * when not linked"), so only a notification from another session proves
 * that inserts will wake us. */
struct notify_sender {
	struct dispatcher *d;
	PGconn *conn;
	ev_io io;
	bool sending; /* connected, the pg_notify is on its way */
};

static void sender_free(struct dispatcher *d)
{
	struct notify_sender *s = d->w.sender;

	if (s == NULL)
		return;
	ev_io_stop(d->loop, &s->io);
	PQfinish(s->conn);
	free(s);
	d->w.sender = NULL;
}

static void sender_failed(struct dispatcher *d, const char *error)
{
	struct log_line *l = log_begin_route(d->cfg->route_name, LOG_WARN,
					     "notify_selftest_failed");
	char line[256];
	size_t n;

	snprintf(line, sizeof(line), "%s", error ? error : "unknown error");
	n = strlen(line);
	while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r'))
		line[--n] = '\0';
	log_str(l, "channel", d->w.channel);
	log_str(l, "error", line);
	log_end(l);
	sender_free(d); /* the self-test timer decides */
}

static void sender_watch(struct notify_sender *s, int events)
{
	int fd = PQsocket(s->conn);

	ev_io_stop(s->d->loop, &s->io);
	if (fd < 0)
		return;
	ev_io_set(&s->io, fd, events);
	ev_io_start(s->d->loop, &s->io);
}

static void sender_send(struct notify_sender *s)
{
	struct dispatcher *d = s->d;
	const char *params[2] = { d->w.channel, d->w.selftest };

	if (PQsetnonblocking(s->conn, 1) != 0 ||
	    !PQsendQueryParams(s->conn, "SELECT pg_notify($1, $2)", 2, NULL, params, NULL, NULL,
			       0)) {
		sender_failed(d, PQerrorMessage(s->conn));
		return;
	}
	s->sending = true;
	sender_watch(s, PQflush(s->conn) == 1 ? EV_READ | EV_WRITE : EV_READ);
}

static void on_sender_io(struct ev_loop *loop, ev_io *w, int revents)
{
	struct notify_sender *s = w->data;
	struct dispatcher *d = s->d;
	bool ok = false;
	PGresult *res;

	(void)loop;
	if (!s->sending) {
		switch (PQconnectPoll(s->conn)) {
		case PGRES_POLLING_OK:
			sender_send(s);
			return;
		case PGRES_POLLING_READING:
			sender_watch(s, EV_READ);
			return;
		case PGRES_POLLING_WRITING:
			sender_watch(s, EV_WRITE);
			return;
		default:
			sender_failed(d, PQerrorMessage(s->conn));
			return;
		}
	}
	if (revents & EV_WRITE) {
		int f = PQflush(s->conn);
		if (f < 0) {
			sender_failed(d, PQerrorMessage(s->conn));
			return;
		}
		sender_watch(s, f == 1 ? EV_READ | EV_WRITE : EV_READ);
	}
	if (!(revents & EV_READ))
		return;
	if (!PQconsumeInput(s->conn)) {
		sender_failed(d, PQerrorMessage(s->conn));
		return;
	}
	while (!PQisBusy(s->conn)) {
		res = PQgetResult(s->conn);
		if (res == NULL) {
			if (!ok) {
				sender_failed(d, "pg_notify returned no rows");
				return;
			}
			sender_free(d); /* sent: now it must arrive on the listening session */
			return;
		}
		if (PQresultStatus(res) != PGRES_TUPLES_OK) {
			char err[256];
			snprintf(err, sizeof(err), "%s", PQresultErrorMessage(res));
			PQclear(res);
			sender_failed(d, err);
			return;
		}
		ok = true;
		PQclear(res);
	}
}

/* Sends this round's self-test notification from a new session and starts
 * the deadline for it to arrive on the listening one. */
static void selftest_send(struct dispatcher *d)
{
	/* application_name after the expanded conninfo overrides one set in
	 * it (libpq's PQconnectdbParams: later entries win), so the session
	 * is always named for what it is, not after the daemon's sessions. */
	const char *kw[] = { "dbname", "application_name", NULL };
	const char *val[] = { d->cfg->conninfo, "pgmq-dispatcher self-test", NULL };
	int first = d->cfg->conninfo[0] == '\0'; /* no conninfo: libpq's defaults */
	struct notify_sender *s;

	sender_free(d);
	ev_timer_stop(d->loop, &d->selftest_timer);
	ev_timer_set(&d->selftest_timer, SELFTEST_TIMEOUT_S, 0.0);
	ev_timer_start(d->loop, &d->selftest_timer);
	d->w.selftest_seq++;
	snprintf(d->w.selftest, sizeof(d->w.selftest), "pgmq-dispatcher self-test %ld %u",
		 (long)getpid(), d->w.selftest_seq);
	s = calloc(1, sizeof(*s));
	if (s == NULL) {
		log_msg_route(d->cfg->route_name, LOG_ERROR, "out_of_memory",
			      "cannot send the NOTIFY self-test");
		return;
	}
	s->d = d;
	s->conn = PQconnectStartParams(kw + first, val + first, 1);
	d->w.sender = s;
	if (s->conn == NULL || PQstatus(s->conn) == CONNECTION_BAD) {
		sender_failed(d, s->conn ? PQerrorMessage(s->conn) : "out of memory");
		return;
	}
	ev_init(&s->io, on_sender_io);
	s->io.data = s;
	sender_watch(s, EV_WRITE); /* libpq's first poll state is "write" */
}

static void on_listen_done(void *arg, PGresult *res, const struct pg_error *err)
{
	struct dispatcher *d = arg;

	if (res)
		PQclear(res);
	if (d->finished || err == NULL)
		return;
	{
		struct log_line *l = log_begin_route(d->cfg->route_name, LOG_WARN, "listen_failed");
		log_str(l, "channel", d->w.channel);
		log_str(l, "sqlstate", err->sqlstate);
		log_str(l, "error", err->message);
		log_end(l);
	}
	ev_timer_stop(d->loop, &d->selftest_timer);
	sender_free(d);
	set_notify_state(d, NOTIFY_BROKEN);
}

/* The last LISTEN is in place: now a notification from elsewhere. */
static void on_listen_last(void *arg, PGresult *res, const struct pg_error *err)
{
	struct dispatcher *d = arg;

	on_listen_done(arg, res, err);
	if (err == NULL && !d->finished && !d->stopping && d->w.notify_state == NOTIFY_TESTING)
		selftest_send(d);
}

static void on_trigger_check(void *arg, PGresult *res, const struct pg_error *err)
{
	struct dispatcher *d = arg;
	bool had = d->w.has_trigger, exists = true;

	d->w.trigger_check_pending = false;
	if (res) {
		if (err == NULL && PQntuples(res) == 1) {
			exists = strcmp(PQgetvalue(res, 0, 0), "t") == 0;
			d->w.has_trigger = exists && strcmp(PQgetvalue(res, 0, 1), "0") != 0;
		}
		PQclear(res);
	}
	if (d->finished || err)
		return;
	if (!exists) {
		if (!d->w.missing_logged) {
			char call[320];
			d->w.missing_logged = true;
			pgmq_create_call(d->cfg->queue_name, call, sizeof(call));
			struct log_line *l = log_begin_route(d->cfg->route_name, LOG_WARN,
							     "queue_missing");
			log_str(l, "queue", d->cfg->queue_name);
			log_str(l, "table", d->w.table);
			log_str(l, "fix", call);
			log_str(l, "msg",
				"the queue does not exist in this database: create it with the "
				"call in fix, or correct queue.name");
			log_end(l);
		}
		d->w.no_trigger_logged = false;
	} else if (!d->w.has_trigger && (had || !d->w.no_trigger_logged)) {
		d->w.missing_logged = false;
		d->w.no_trigger_logged = true;
		struct log_line *l = log_begin_route(d->cfg->route_name, LOG_INFO,
						     "notify_no_trigger");
		log_str(l, "queue", d->cfg->queue_name);
		log_str(l, "msg",
			"no insert trigger on the queue table: polling every poll_interval_ms; "
			"SELECT pgmq.enable_notify_insert(queue) (pgmq >= 1.7) or the trigger in "
			"docs/operations.md makes inserts wake the daemon");
		log_end(l);
	} else if (d->w.has_trigger && !had && d->w.no_trigger_logged) {
		struct log_line *l = log_begin_route(d->cfg->route_name, LOG_INFO,
						     "notify_trigger_found");
		log_str(l, "queue", d->cfg->queue_name);
		log_str(l, "msg",
			"an insert trigger is on the queue table now: idle polls may back off");
		log_end(l);
		d->w.no_trigger_logged = false;
	}
	if (exists)
		d->w.missing_logged = false;
	if (!d->w.has_trigger)
		wakeup_reset_idle(d);
}

/* Does pgmq.q_<queue> exist, and how many enabled triggers fire on INSERT
 * on it (pg_trigger.tgtype bit 2, TRIGGER_TYPE_INSERT in PostgreSQL's
 * catalog/pg_trigger.h; tgenabled 'D' is disabled). An UPDATE- or
 * DELETE-only trigger notifies nobody of an insert. */
static void trigger_check(struct dispatcher *d)
{
	char qtable[2 * sizeof(d->w.table) + 3], qualified[sizeof(qtable) + 8];
	const char *params[1] = { qualified };

	if (d->w.trigger_check_pending || pg_quote_ident(d->w.table, qtable, sizeof(qtable)) != 0)
		return;
	snprintf(qualified, sizeof(qualified), "pgmq.%s", qtable);
	if (pg_query(d->pg,
		     "SELECT to_regclass($1) IS NOT NULL, (SELECT count(*) FROM pg_trigger "
		     "WHERE tgrelid = to_regclass($1) AND NOT tgisinternal AND tgenabled <> 'D' "
		     "AND (tgtype::int & 4) <> 0)",
		     1, params, on_trigger_check, d) == 0) {
		d->w.trigger_check_pending = true;
		d->w.trigger_checked_at = ev_now(d->loop);
	}
}

/* After every (re)connect of the listening connection: LISTEN, then a
 * NOTIFY from another session to prove notifications arrive (transaction
 * poolers accept LISTEN but never deliver), and a look for an insert
 * trigger on the queue table (without one, nothing will notify and idle
 * polls must not back off). */
void wakeup_start_listen(struct dispatcher *d, struct pg *pg)
{
	char quoted[sizeof(d->w.channel) * 2 + 3], sql[2 * sizeof(quoted) + 32];

	if (!d->cfg->notify || d->once || pg_quote_ident(d->w.channel, quoted, sizeof(quoted)) != 0)
		return;
	snprintf(sql, sizeof(sql), "LISTEN %s", quoted);
	set_notify_state(d, NOTIFY_TESTING);
	ev_timer_stop(d->loop, &d->selftest_timer);
	sender_free(d);
	if (d->w.channel2[0] && pg_quote_ident(d->w.channel2, quoted, sizeof(quoted)) == 0) {
		/* One statement per query: the extended protocol allows no more. */
		char sql2[sizeof(quoted) + 16];
		snprintf(sql2, sizeof(sql2), "LISTEN %s", quoted);
		if (pg_query(pg, sql2, 0, NULL, on_listen_done, d) != 0) {
			set_notify_state(d, NOTIFY_BROKEN);
			return;
		}
	}
	if (pg_query(pg, sql, 0, NULL, on_listen_last, d) != 0) {
		set_notify_state(d, NOTIFY_BROKEN);
		return;
	}
	d->w.trigger_check_pending = false; /* a new connection: the old query is gone */
	trigger_check(d);
}

static void on_listen_connected(void *arg)
{
	struct dispatcher *d = arg;

	wakeup_start_listen(d, d->w.listen_pg);
	/* Catch up on what was inserted while we were not listening, unless
	 * the main connection's own catch-up read is still to start (it waits
	 * for the route's control state and is sent after this LISTEN). */
	if (d->ctl_loaded)
		dispatcher_kick(d);
}

void wakeup_listen_lost(struct dispatcher *d)
{
	ev_timer_stop(d->loop, &d->selftest_timer);
	sender_free(d);
	set_notify_state(d, NOTIFY_OFF);
}

static void on_listen_lost_cb(void *arg)
{
	wakeup_listen_lost(arg);
}

/* Table q_<lower(queue)> and channel pgmq.q_<lower(queue)>.INSERT (pgmq-api.md §1.5) and, with
 * database.listen_conninfo, the separate LISTEN connection. */
int wakeup_init(struct dispatcher *d, const struct config *cfg)
{
	struct pg_callbacks lcb = { .connected = on_listen_connected,
				    .disconnected = on_listen_lost_cb,
				    .notify = wakeup_on_notify,
				    .arg = d };

	if (pgmq_table_name(cfg->queue_name, d->w.table, sizeof(d->w.table)) != 0)
		return -1;
	snprintf(d->w.channel, sizeof(d->w.channel), "pgmq.%s.INSERT", d->w.table);
	/* pgmq 1.13.1 names the channel after the queue as created. */
	snprintf(d->w.channel2, sizeof(d->w.channel2), "pgmq.q_%s.INSERT", cfg->queue_name);
	if (strcmp(d->w.channel2, d->w.channel) == 0)
		d->w.channel2[0] = '\0';
	if (!cfg->notify || d->once || cfg->listen_conninfo[0] == '\0')
		return 0;
	d->w.listen_pg = pg_new_pooled(d->loop, d->pool, cfg->listen_conninfo,
				       cfg->db_connect_timeout_ms, &lcb);
	return d->w.listen_pg ? 0 : -1;
}

void wakeup_free(struct dispatcher *d)
{
	sender_free(d);
	pg_free(d->w.listen_pg);
	d->w.listen_pg = NULL;
}
