/* wakeup — when to read, besides the pipeline's own drain: NOTIFY on
 * inserts (LISTEN on the main or a separate connection, a self-test
 * notification that proves they arrive, a look for the queue's insert
 * trigger), the debounce of a burst, the idle back-off of the poll period
 * up to idle_poll_max_ms, and the wake-up when released messages become
 * visible again. Acts on the dispatcher's state (include/dispatcher_int.h)
 * and asks it to read with dispatcher_kick. Knows nothing of batches,
 * /run or the circuit. */
#include "dispatcher_int.h"
#include "log.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define SELFTEST_TIMEOUT_S 2.0

/* The poll timer is the backstop; while NOTIFY is known to work it backs
 * off when reads come back empty, and any rows or NOTIFY reset it. */
static void set_poll_period(struct dispatcher *d, double ms)
{
	if (ms == d->w.idle_poll_ms)
		return;
	d->w.idle_poll_ms = ms;
	d->poll.repeat = ms / 1000.0;
	{
		struct log_line *l = log_begin_route(d->cfg->route_name, LOG_DEBUG, "poll_period");
		log_int(l, "poll_period_ms", (long long)ms);
		log_end(l);
	}
	if (ev_is_active(&d->poll))
		ev_timer_again(d->loop, &d->poll);
}

void wakeup_reset_idle(struct dispatcher *d)
{
	set_poll_period(d, d->cfg->poll_interval_ms);
}

void wakeup_idle_read(struct dispatcher *d)
{
	double next = d->w.idle_poll_ms * 2;

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
	log_str(l, "reason", "released messages are visible again");
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
			struct log_line *l = log_begin_route(d->cfg->route_name, LOG_DEBUG, "notify_ready");
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
	if (d->w.notify_state != NOTIFY_TESTING)
		return;
	set_notify_state(d, NOTIFY_BROKEN);
	if (!d->w.notify_broken_logged) {
		struct log_line *l = log_begin_route(d->cfg->route_name, LOG_WARN, "notify_unavailable");
		log_str(l, "channel", d->w.channel);
		log_str(l, "msg", "LISTEN receives no notifications on this connection (a transaction "
				  "pooler?); polling every poll_interval_ms. Set database.listen_conninfo "
				  "to a direct or session-mode connection to wake up on inserts.");
		log_end(l);
		d->w.notify_broken_logged = true;
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
		struct log_line *l = log_begin_route(d->cfg->route_name, LOG_WARN, "listen_failed");
		log_str(l, "channel", d->w.channel);
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
	bool had = d->w.has_trigger;

	if (res) {
		d->w.has_trigger = PQntuples(res) == 1 && strcmp(PQgetvalue(res, 0, 0), "0") != 0;
		PQclear(res);
	}
	if (d->finished || err)
		return;
	if (!d->w.has_trigger && (had || !d->w.no_trigger_logged)) {
		d->w.no_trigger_logged = true;
		struct log_line *l = log_begin_route(d->cfg->route_name, LOG_INFO, "notify_no_trigger");
		log_str(l, "queue", d->cfg->queue_name);
		log_str(l, "msg", "no insert trigger on the queue table: polling every poll_interval_ms; "
				  "SELECT pgmq.enable_notify_insert(queue) (pgmq >= 1.7) or the trigger in "
				  "docs/operations.md makes inserts wake the daemon");
		log_end(l);
	}
	if (!d->w.has_trigger)
		wakeup_reset_idle(d);
}

/* After every (re)connect of the listening connection: LISTEN, then a
 * NOTIFY of our own to prove notifications arrive (transaction poolers
 * accept LISTEN but never deliver), and a look for an insert trigger on the
 * queue table (without one, nothing will notify and idle polls must not
 * back off). */
void wakeup_start_listen(struct dispatcher *d, struct pg *pg)
{
	char quoted[sizeof(d->w.channel) * 2 + 3], sql[2 * sizeof(quoted) + 32];
	char qtable[2 * sizeof(d->w.table) + 3], qualified[sizeof(qtable) + 8];
	const char *params[2] = { d->w.channel, d->w.selftest };
	const char *tparams[1] = { qualified };
	if (!d->cfg->notify || d->once || pg_quote_ident(d->w.channel, quoted, sizeof(quoted)) != 0)
		return;
	snprintf(sql, sizeof(sql), "LISTEN %s", quoted);
	if (pg_quote_ident(d->w.table, qtable, sizeof(qtable)) != 0)
		return;
	snprintf(qualified, sizeof(qualified), "pgmq.%s", qtable);
	set_notify_state(d, NOTIFY_TESTING);
	if (d->w.channel2[0] && pg_quote_ident(d->w.channel2, quoted, sizeof(quoted)) == 0) {
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
	struct pg_callbacks lcb = { .connected = on_listen_connected, .disconnected = on_listen_lost_cb,
				    .notify = wakeup_on_notify, .arg = d };

	if (pgmq_table_name(cfg->queue_name, d->w.table, sizeof(d->w.table)) != 0)
		return -1;
	snprintf(d->w.channel, sizeof(d->w.channel), "pgmq.%s.INSERT", d->w.table);
	snprintf(d->w.selftest, sizeof(d->w.selftest), "pgmq-dispatcher self-test %ld",
		 (long)getpid());
	/* pgmq 1.13.1 names the channel after the queue as created. */
	snprintf(d->w.channel2, sizeof(d->w.channel2), "pgmq.q_%s.INSERT", cfg->queue_name);
	if (strcmp(d->w.channel2, d->w.channel) == 0)
		d->w.channel2[0] = '\0';
	if (!cfg->notify || d->once || cfg->listen_conninfo[0] == '\0')
		return 0;
	d->w.listen_pg = pg_new(d->loop, cfg->listen_conninfo, cfg->db_connect_timeout_ms, &lcb);
	return d->w.listen_pg ? 0 : -1;
}

