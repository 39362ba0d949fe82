/* pg — see include/pg.h. */
#include "pg.h"
#include "backoff.h"
#include "log.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define BACKOFF_BASE_MS 250.0
#define BACKOFF_CAP_MS 30000.0

enum pg_state { PG_IDLE, PG_WAITING, PG_CONNECTING, PG_READY };

struct pg_query {
	char *sql;
	int nparams;
	char **params;
	pg_result_fn fn;
	void *arg;
	struct pg_query *next;
};

struct pg {
	struct ev_loop *loop;
	char *conninfo;
	int connect_timeout_ms;
	struct pg_callbacks cb;

	PGconn *conn;
	enum pg_state state;
	int attempt;            /* failed connects since the last success */
	bool loss_logged;       /* the outage has had its first warning */
	char warned_error[512]; /* error text of the last warning of this outage */
	ev_tstamp warned_at;    /* when that warning was written */
	bool sent;              /* head query was sent */
	bool reconnect_wanted;  /* conninfo changed: reconnect when idle */
	PGresult *result;       /* first result of the running query */

	struct pg_query *head, *tail;
	int nqueued;

	ev_io io;
	ev_timer timer;     /* reconnect backoff or connect deadline */
	ev_timer send_soon; /* sends outside the caller's stack */
};

static void on_io(struct ev_loop *loop, ev_io *w, int revents);
static void on_timer(struct ev_loop *loop, ev_timer *w, int revents);
static void on_send_soon(struct ev_loop *loop, ev_timer *w, int revents);
static void connect_step(struct pg *pg);
static void send_next(struct pg *pg);

struct pg *pg_new(struct ev_loop *loop, const char *conninfo, int connect_timeout_ms,
		  const struct pg_callbacks *cb)
{
	struct pg *pg = calloc(1, sizeof(*pg));

	if (pg == NULL)
		return NULL;
	pg->conninfo = strdup(conninfo ? conninfo : "");
	if (pg->conninfo == NULL) {
		free(pg);
		return NULL;
	}
	pg->loop = loop;
	pg->connect_timeout_ms = connect_timeout_ms;
	if (cb)
		pg->cb = *cb;
	ev_init(&pg->io, on_io);
	pg->io.data = pg;
	ev_init(&pg->timer, on_timer);
	pg->timer.data = pg;
	ev_timer_init(&pg->send_soon, on_send_soon, 0.0, 0.0);
	pg->send_soon.data = pg;
	return pg;
}

bool pg_ready(const struct pg *pg)
{
	return pg->state == PG_READY;
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

static void watch(struct pg *pg, int events)
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

static void free_query(struct pg_query *q)
{
	for (int i = 0; i < q->nparams; i++)
		free(q->params[i]);
	free(q->params);
	free(q->sql);
	free(q);
}

static struct pg_query *pop_head(struct pg *pg)
{
	struct pg_query *q = pg->head;

	if (q) {
		pg->head = q->next;
		if (pg->head == NULL)
			pg->tail = NULL;
		pg->nqueued--;
	}
	return q;
}

bool pg_warn_due(bool first, const char *last_error, const char *error, double since_warn_s)
{
	return first || strcmp(last_error, error) != 0 || since_warn_s >= PG_OUTAGE_WARN_EVERY_S;
}

/* Tears the connection down and schedules the next attempt. The running
 * query (if sent) fails with connection_lost; unsent ones keep waiting. */
static void lose(struct pg *pg, const char *why)
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
		struct pg_error err = { "", line, true, true };
		pg->sent = false;
		q->fn(q->arg, NULL, &err);
		free_query(q);
	}
	pg->sent = false;
	if (was_ready && pg->cb.disconnected)
		pg->cb.disconnected(pg->cb.arg);
	else if (!was_ready && pg->cb.connect_failed)
		pg->cb.connect_failed(pg->cb.arg);
}

static void connect_now(struct pg *pg);

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
void pg_start(struct pg *pg)
{
	if (pg->state == PG_CONNECTING || pg->state == PG_READY)
		return;
	pg->state = PG_WAITING;
	ev_timer_stop(pg->loop, &pg->timer);
	ev_timer_set(&pg->timer, 0.0, 0.0);
	ev_timer_start(pg->loop, &pg->timer);
}

static void connect_now(struct pg *pg)
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

static void connect_step(struct pg *pg)
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
	if (pg->cb.connected)
		pg->cb.connected(pg->cb.arg);
	/* The callback may have freed nothing but may have queued queries. */
	if (pg->state == PG_READY)
		send_next(pg);
}

/* Closes a healthy connection on purpose (new conninfo) and connects again. */
static void reconnect_now(struct pg *pg)
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
	if (pg->cb.disconnected)
		pg->cb.disconnected(pg->cb.arg);
	pg_start(pg);
}

int pg_set_conninfo(struct pg *pg, const char *conninfo)
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

static void send_next(struct pg *pg)
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
static void complete(struct pg *pg)
{
	struct pg_query *q = pop_head(pg);
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
	free_query(q);
}

static void drain_notifies(struct pg *pg)
{
	PGnotify *n;

	while (pg->conn && (n = PQnotifies(pg->conn)) != NULL) {
		if (pg->cb.notify)
			pg->cb.notify(pg->cb.arg, n->relname, n->extra ? n->extra : "");
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

static void on_ready_io(struct pg *pg, int revents)
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

static void on_io(struct ev_loop *loop, ev_io *w, int revents)
{
	struct pg *pg = w->data;

	(void)loop;
	if (pg->state == PG_CONNECTING)
		connect_step(pg);
	else if (pg->state == PG_READY)
		on_ready_io(pg, revents);
}

static void on_send_soon(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)loop;
	(void)revents;
	send_next(w->data);
}

static void on_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct pg *pg = w->data;

	(void)loop;
	(void)revents;
	if (pg->state == PG_CONNECTING)
		lose(pg, "connect timed out");
	else if (pg->state == PG_WAITING)
		connect_now(pg);
}

int pg_query(struct pg *pg, const char *sql, int nparams, const char *const *params,
	     pg_result_fn fn, void *arg)
{
	struct pg_query *q;

	if (pg->nqueued >= PG_MAX_QUEUED)
		return -1;
	q = calloc(1, sizeof(*q));
	if (q == NULL)
		return -1;
	q->sql = strdup(sql);
	q->params = nparams ? calloc((size_t)nparams, sizeof(char *)) : NULL;
	if (q->sql == NULL || (nparams && q->params == NULL)) {
		free_query(q);
		return -1;
	}
	for (int i = 0; i < nparams; i++) {
		q->params[i] = params[i] ? strdup(params[i]) : NULL;
		q->nparams = i + 1;
		if (params[i] && q->params[i] == NULL) {
			free_query(q);
			return -1;
		}
	}
	q->nparams = nparams;
	q->fn = fn;
	q->arg = arg;
	if (pg->tail)
		pg->tail->next = q;
	else
		pg->head = q;
	pg->tail = q;
	pg->nqueued++;
	/* Never call back into the caller from inside pg_query(). */
	if (pg->state == PG_READY && !pg->sent && !ev_is_active(&pg->send_soon))
		ev_timer_start(pg->loop, &pg->send_soon);
	return 0;
}

void pg_free(struct pg *pg)
{
	struct pg_query *q;

	if (pg == NULL)
		return;
	ev_io_stop(pg->loop, &pg->io);
	ev_timer_stop(pg->loop, &pg->timer);
	ev_timer_stop(pg->loop, &pg->send_soon);
	if (pg->result)
		PQclear(pg->result);
	if (pg->conn)
		PQfinish(pg->conn);
	pg->conn = NULL;
	pg->state = PG_IDLE;
	while ((q = pop_head(pg)) != NULL) {
		struct pg_error err = { "", "shutting down", pg->sent, true };
		pg->sent = false;
		q->fn(q->arg, NULL, &err);
		free_query(q);
	}
	free(pg->conninfo);
	free(pg);
}
