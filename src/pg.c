/* pg — one libpq connection; see include/pg.h. The handles that share it
 * and the pool are in pg_share.c. */
#include "pg.h"
#include "pg_int.h"
#include "backoff.h"
#include "log.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define BACKOFF_BASE_MS 250.0
#define BACKOFF_CAP_MS 30000.0

static void on_io(struct ev_loop *loop, ev_io *w, int revents);
static void on_timer(struct ev_loop *loop, ev_timer *w, int revents);
static void on_send_soon(struct ev_loop *loop, ev_timer *w, int revents);
static void connect_step(struct pg_conn *pg);
static void send_next(struct pg_conn *pg);

struct pg_conn *pg_conn_new(struct ev_loop *loop, const char *conninfo, int connect_timeout_ms)
{
	struct pg_conn *pg = calloc(1, sizeof(*pg));

	if (pg == NULL)
		return NULL;
	pg->conninfo = strdup(conninfo ? conninfo : "");
	if (pg->conninfo == NULL) {
		free(pg);
		return NULL;
	}
	pg->loop = loop;
	pg->connect_timeout_ms = connect_timeout_ms;
	ev_init(&pg->io, on_io);
	pg->io.data = pg;
	ev_init(&pg->timer, on_timer);
	pg->timer.data = pg;
	ev_timer_init(&pg->send_soon, on_send_soon, 0.0, 0.0);
	pg->send_soon.data = pg;
	return pg;
}

/* One line, no trailing newline: libpq messages end with "\n". */
static const char *one_line(const char *msg, char *buf, size_t len)
{
	size_t n;

	snprintf(buf, len, "%s", msg ? msg : "");
	n = strcspn(buf, "\n");
	buf[n] = '\0';
	return buf;
}

static void watch(struct pg_conn *pg, int events)
{
	int fd = PQsocket(pg->conn);

	if (fd < 0)
		return;
	if (ev_is_active(&pg->io) &&
	    (pg->io.fd != fd || (pg->io.events & (EV_READ | EV_WRITE)) != events))
		ev_io_stop(pg->loop, &pg->io);
	if (!ev_is_active(&pg->io)) {
		ev_io_set(&pg->io, fd, events);
		ev_io_start(pg->loop, &pg->io);
	}
}

void pg_query_free(struct pg_query *q)
{
	for (int i = 0; i < q->nparams; i++)
		free(q->params[i]);
	free(q->params);
	free(q->sql);
	free(q);
}

struct pg_query *pg_conn_unlink(struct pg_conn *pg, struct pg_query *q)
{
	struct pg_query **pp = &pg->head, *prev = NULL;

	while (*pp && *pp != q) {
		prev = *pp;
		pp = &(*pp)->next;
	}
	if (*pp == NULL)
		return NULL;
	*pp = q->next;
	if (pg->tail == q)
		pg->tail = prev;
	q->next = NULL;
	pg->nqueued--;
	if (q->owner)
		q->owner->nqueued--;
	return q;
}

void pg_conn_append(struct pg_conn *pg, struct pg_query *q)
{
	q->next = NULL;
	if (pg->tail)
		pg->tail->next = q;
	else
		pg->head = q;
	pg->tail = q;
	pg->nqueued++;
	if (q->owner)
		q->owner->nqueued++;
}

static struct pg_query *pop_head(struct pg_conn *pg)
{
	return pg->head ? pg_conn_unlink(pg, pg->head) : NULL;
}

bool pg_warn_due(bool first, const char *last_error, const char *error, double since_warn_s)
{
	return first || strcmp(last_error, error) != 0 || since_warn_s >= PG_OUTAGE_WARN_EVERY_S;
}

/* Tears the connection down and schedules the next attempt. The running
 * query (if sent) fails with connection_lost; unsent ones keep waiting. */
static void lose(struct pg_conn *pg, const char *why)
{
	char line[512];
	bool was_ready = pg->state == PG_READY;

	ev_io_stop(pg->loop, &pg->io);
	ev_timer_stop(pg->loop, &pg->timer);
	one_line(why, line, sizeof(line));
	if (pg->conn) {
		PQfinish(pg->conn);
		pg->conn = NULL;
	}
	if (pg->result) {
		PQclear(pg->result);
		pg->result = NULL;
	}
	if (was_ready) {
		struct log_line *l = log_begin(LOG_WARN, "db_connection_lost");
		log_str(l, "error", line);
		log_end(l);
		pg->loss_logged = true;
		snprintf(pg->warned_error, sizeof(pg->warned_error), "%s", line);
		pg->warned_at = ev_now(pg->loop);
	} else {
		bool warn = pg_warn_due(!pg->loss_logged, pg->warned_error, line,
					ev_now(pg->loop) - pg->warned_at);
		struct log_line *l = log_begin(warn ? LOG_WARN : LOG_DEBUG, "db_connect_failed");
		log_str(l, "error", line);
		log_int(l, "attempt", pg->attempt + 1);
		log_end(l);
		if (warn) {
			pg->loss_logged = true;
			snprintf(pg->warned_error, sizeof(pg->warned_error), "%s", line);
			pg->warned_at = ev_now(pg->loop);
		}
	}
	pg->state = PG_WAITING;
	pg->reconnect_wanted = false;
	/* Full jitter, no floor: the first retry may come at once. */
	double delay_ms = backoff_ms(pg->attempt + 1, BACKOFF_BASE_MS, BACKOFF_CAP_MS, 0.0,
				     backoff_jitter());
	pg->attempt++;
	ev_timer_set(&pg->timer, delay_ms / 1000.0, 0.0);
	ev_timer_start(pg->loop, &pg->timer);

	if (pg->sent && pg->head) {
		struct pg_query *q = pop_head(pg);
		struct pg *owner = q->owner;
		struct pg_error err = { "", line, true, true };
		pg->sent = false;
		q->fn(q->arg, NULL, &err);
		pg_query_free(q);
		pg_share_query_done(owner);
	}
	pg->sent = false;
	pg_share_lost(pg, was_ready);
}

static void connect_now(struct pg_conn *pg);

/* Server notices and libpq's own messages (e.g. "FATAL: terminating
 * connection") as one structured line instead of raw stderr. */
static void on_notice(void *arg, const char *message)
{
	char line[512];
	struct log_line *l = log_begin(LOG_WARN, "db_notice");

	(void)arg;
	log_str(l, "message", one_line(message, line, sizeof(line)));
	log_end(l);
}

/* Connects from the loop, never from the caller's stack: a connect that
 * fails at once (no socket directory, unknown host) must report through
 * the callbacks after ev_run() has started. */
void pg_conn_start(struct pg_conn *pg)
{
	if (pg->state == PG_CONNECTING || pg->state == PG_READY)
		return;
	pg->state = PG_WAITING;
	ev_timer_stop(pg->loop, &pg->timer);
	ev_timer_set(&pg->timer, 0.0, 0.0);
	ev_timer_start(pg->loop, &pg->timer);
}

static void connect_now(struct pg_conn *pg)
{
	/* Our defaults come first: a later keyword, or the expanded
	 * conninfo/URI in dbname, overrides them (libpq expand_dbname). */
	const char *kw[] = { "fallback_application_name",
			     "keepalives",
			     "keepalives_idle",
			     "keepalives_interval",
			     "keepalives_count",
			     "dbname",
			     NULL };
	const char *val[] = { "pgmq-dispatcher", "1", "30", "10", "3", pg->conninfo, NULL };

	if (pg->state == PG_CONNECTING || pg->state == PG_READY)
		return;
	ev_timer_stop(pg->loop, &pg->timer);
	/* An empty dbname would be taken literally; leave it to libpq. */
	if (pg->conninfo[0] == '\0')
		kw[5] = NULL;
	pg->conn = PQconnectStartParams(kw, val, 1);
	if (pg->conn == NULL) {
		lose(pg, "out of memory");
		return;
	}
	PQsetNoticeProcessor(pg->conn, on_notice, pg);
	if (PQstatus(pg->conn) == CONNECTION_BAD) {
		lose(pg, PQerrorMessage(pg->conn));
		return;
	}
	pg->state = PG_CONNECTING;
	log_msg(LOG_DEBUG, "db_connecting", "connecting to PostgreSQL");
	ev_timer_set(&pg->timer, pg->connect_timeout_ms / 1000.0, 0.0);
	ev_timer_start(pg->loop, &pg->timer);
	/* libpq's first poll state is "write" (PGRES_POLLING_WRITING). */
	watch(pg, EV_WRITE);
}

static void connect_step(struct pg_conn *pg)
{
	switch (PQconnectPoll(pg->conn)) {
	case PGRES_POLLING_READING:
		watch(pg, EV_READ);
		return;
	case PGRES_POLLING_WRITING:
		watch(pg, EV_WRITE);
		return;
	case PGRES_POLLING_FAILED:
		lose(pg, PQerrorMessage(pg->conn));
		return;
	case PGRES_POLLING_OK:
	default:
		break;
	}
	ev_timer_stop(pg->loop, &pg->timer);
	if (PQsetnonblocking(pg->conn, 1) != 0) {
		lose(pg, PQerrorMessage(pg->conn));
		return;
	}
	pg->state = PG_READY;
	pg->attempt = 0;
	{
		struct log_line *l = log_begin(LOG_INFO, "db_connected");
		log_str(l, "host", PQhost(pg->conn));
		log_str(l, "port", PQport(pg->conn));
		log_str(l, "dbname", PQdb(pg->conn));
		log_str(l, "user", PQuser(pg->conn));
		log_int(l, "server_version", PQserverVersion(pg->conn));
		log_end(l);
	}
	pg->loss_logged = false;
	watch(pg, EV_READ);
	pg_share_connected(pg);
	/* The callbacks may have queued queries. */
	if (pg->state == PG_READY)
		send_next(pg);
}

/* Closes a healthy connection on purpose (new conninfo) and connects again. */
static void reconnect_now(struct pg_conn *pg)
{
	pg->reconnect_wanted = false;
	ev_io_stop(pg->loop, &pg->io);
	ev_timer_stop(pg->loop, &pg->timer);
	if (pg->conn)
		PQfinish(pg->conn);
	pg->conn = NULL;
	pg->state = PG_IDLE;
	pg->attempt = 0;
	log_msg(LOG_INFO, "db_reconnecting", "conninfo changed: reconnecting");
	pg_share_lost(pg, true);
	pg_conn_start(pg);
}

int pg_conn_set_conninfo(struct pg_conn *pg, const char *conninfo)
{
	char *copy = strdup(conninfo ? conninfo : "");

	if (copy == NULL)
		return -1;
	if (strcmp(copy, pg->conninfo) == 0) {
		free(copy);
		return 0;
	}
	free(pg->conninfo);
	pg->conninfo = copy;
	if (pg->state == PG_READY && pg->sent)
		pg->reconnect_wanted = true;
	else if (pg->state == PG_READY || pg->state == PG_CONNECTING)
		reconnect_now(pg);
	/* PG_WAITING: the next attempt uses the new conninfo. */
	return 0;
}

static void send_next(struct pg_conn *pg)
{
	struct pg_query *q = pg->head;
	int rc;

	if (pg->state == PG_READY && !pg->sent && pg->reconnect_wanted) {
		reconnect_now(pg);
		return;
	}
	if (pg->state != PG_READY || pg->sent || q == NULL)
		return;
	if (log_enabled(LOG_TRACE)) {
		struct log_line *l = log_begin(LOG_TRACE, "sql");
		log_str(l, "sql", q->sql);
		log_int(l, "nparams", q->nparams);
		log_end(l);
	}
	rc = PQsendQueryParams(pg->conn, q->sql, q->nparams, NULL, (const char *const *)q->params,
			       NULL, NULL, 0);
	if (rc == 0) {
		lose(pg, PQerrorMessage(pg->conn));
		return;
	}
	pg->sent = true;
	rc = PQflush(pg->conn);
	if (rc < 0) {
		lose(pg, PQerrorMessage(pg->conn));
		return;
	}
	watch(pg, rc == 1 ? EV_READ | EV_WRITE : EV_READ);
}

/* Finishes the running query: hands the result or the error to its owner. */
static void complete(struct pg_conn *pg)
{
	struct pg_query *q = pop_head(pg);
	struct pg *owner = q->owner;
	PGresult *res = pg->result;
	ExecStatusType st = res ? PQresultStatus(res) : PGRES_FATAL_ERROR;

	pg->result = NULL;
	pg->sent = false;
	if (st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK) {
		q->fn(q->arg, res, NULL);
	} else {
		char line[512];
		const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
		struct pg_error err = {
			.sqlstate = state ? state : "",
			.message = one_line(res ? PQresultErrorMessage(res) : "no result", line,
					    sizeof(line)),
			.sent = true,
			.connection_lost = false,
		};
		q->fn(q->arg, NULL, &err);
		PQclear(res);
	}
	pg_query_free(q);
	pg_share_query_done(owner);
}

static void drain_notifies(struct pg_conn *pg)
{
	PGnotify *n;

	while (pg->conn && (n = PQnotifies(pg->conn)) != NULL) {
		pg_share_notify(pg, n->relname, n->extra ? n->extra : "");
		PQfreemem(n);
	}
}

int pg_quote_ident(const char *name, char *buf, size_t len)
{
	size_t j = 0;

	if (len < 3)
		return -1;
	buf[j++] = '"';
	for (const char *p = name; *p; p++) {
		if (j + 3 > len)
			return -1;
		if (*p == '"')
			buf[j++] = '"';
		buf[j++] = *p;
	}
	buf[j++] = '"';
	buf[j] = '\0';
	return 0;
}

static void on_ready_io(struct pg_conn *pg, int revents)
{
	if (revents & EV_WRITE) {
		int rc = PQflush(pg->conn);
		if (rc < 0) {
			lose(pg, PQerrorMessage(pg->conn));
			return;
		}
		if (rc == 0)
			watch(pg, EV_READ);
	}
	if (!(revents & EV_READ))
		return;
	if (!PQconsumeInput(pg->conn)) {
		lose(pg, PQerrorMessage(pg->conn));
		return;
	}
	drain_notifies(pg);
	while (pg->sent && !PQisBusy(pg->conn)) {
		PGresult *r = PQgetResult(pg->conn);
		if (r == NULL) {
			complete(pg);
			if (pg->state != PG_READY)
				return;
			send_next(pg);
			return;
		}
		/* Keep the first result; later ones (none for one statement) go. */
		if (pg->result == NULL)
			pg->result = r;
		else
			PQclear(r);
		/* libpq may have parsed notifications while reading results. */
		drain_notifies(pg);
	}
	if (PQstatus(pg->conn) == CONNECTION_BAD)
		lose(pg, PQerrorMessage(pg->conn));
}

void pg_conn_hold(struct pg_conn *pg)
{
	pg->busy++;
}

void pg_conn_release(struct pg_conn *pg)
{
	if (--pg->busy > 0)
		return;
	pg_share_bury(pg);
	if (pg->dead)
		pg_conn_destroy(pg);
}

static void on_io(struct ev_loop *loop, ev_io *w, int revents)
{
	struct pg_conn *pg = w->data;

	(void)loop;
	pg_conn_hold(pg);
	if (pg->state == PG_CONNECTING)
		connect_step(pg);
	else if (pg->state == PG_READY)
		on_ready_io(pg, revents);
	pg_conn_release(pg);
}

static void on_send_soon(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct pg_conn *pg = w->data;

	(void)loop;
	(void)revents;
	pg_conn_hold(pg);
	send_next(pg);
	pg_conn_release(pg);
}

static void on_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct pg_conn *pg = w->data;

	(void)loop;
	(void)revents;
	pg_conn_hold(pg);
	if (pg->state == PG_CONNECTING)
		lose(pg, "connect timed out");
	else if (pg->state == PG_WAITING)
		connect_now(pg);
	pg_conn_release(pg);
}

void pg_conn_kick(struct pg_conn *pg)
{
	/* Never call back into the caller from inside pg_query(). */
	if (pg->state == PG_READY && !pg->sent && !ev_is_active(&pg->send_soon))
		ev_timer_start(pg->loop, &pg->send_soon);
}

void pg_conn_close(struct pg_conn *pg)
{
	ev_io_stop(pg->loop, &pg->io);
	ev_timer_stop(pg->loop, &pg->timer);
	ev_timer_stop(pg->loop, &pg->send_soon);
	if (pg->result)
		PQclear(pg->result);
	pg->result = NULL;
	if (pg->conn)
		PQfinish(pg->conn);
	pg->conn = NULL;
	pg->state = PG_IDLE;
}

void pg_conn_destroy(struct pg_conn *pg)
{
	struct pg_query *q;

	if (pg->busy > 0) {
		pg->dead = true;
		return;
	}
	pg_conn_close(pg);
	pg_share_bury(pg);
	/* Only orphans are left: their handles are gone. */
	while ((q = pop_head(pg)) != NULL)
		pg_query_free(q);
	free(pg->conninfo);
	free(pg);
}
