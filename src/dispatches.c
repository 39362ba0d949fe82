/* dispatches — see include/dispatches.h. */
#include "dispatches.h"
#include "ledger_view.h"
#include "log.h"
#include "migrate.h"
#include "pg.h"

#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TEXT_TYPE "text/plain; charset=utf-8"
#define JSON_TYPE "application/json"
#define ID_TEXT_MAX 20 /* digits of a msg id (bigint) */

/* One request: freed by its statement's callback (pg calls it exactly
 * once), whether or not it was answered before (timeout, outage). */
struct call {
	struct dispatches *ds;
	struct call *prev, *next;
	dispatches_done_fn done;
	void *ctx;
	bool answered;
	bool by_msg_id; /* status rows, else jobs */
	ev_timer timer;
};

struct dispatches {
	struct ev_loop *loop;
	struct pg *pg; /* opened at the first request */
	char *conninfo;
	struct call *calls;
	int pending;
};

static void answer(struct call *c, unsigned status, const char *type, char *body, size_t len)
{
	if (c->answered) {
		free(body);
		return;
	}
	c->answered = true;
	ev_timer_stop(c->ds->loop, &c->timer);
	c->done(c->ctx, status, type, body, len);
}

static void answer_text(struct call *c, unsigned status, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static void answer_text(struct call *c, unsigned status, const char *fmt, ...)
{
	char line[512];
	va_list ap;
	size_t n;

	va_start(ap, fmt);
	vsnprintf(line, sizeof(line) - 1, fmt, ap);
	va_end(ap);
	line[strcspn(line, "\r\n")] = '\0'; /* one line */
	n = strlen(line);
	line[n++] = '\n';
	answer(c, status, TEXT_TYPE, strndup(line, n), n);
}

static void unlink_call(struct call *c)
{
	struct dispatches *ds = c->ds;

	if (c->prev)
		c->prev->next = c->next;
	else
		ds->calls = c->next;
	if (c->next)
		c->next->prev = c->prev;
	ds->pending--;
	ev_timer_stop(ds->loop, &c->timer);
}

static void on_timeout(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct call *c = w->data;

	(void)loop;
	(void)revents;
	answer_text(c, 503, "the ledger did not answer within %.0f s; try again",
		    DISPATCHES_TIMEOUT_S);
}

static void on_result(void *arg, PGresult *res, const struct pg_error *err)
{
	struct call *c = arg;
	char line[1024];

	if (c->answered) {
		/* timed out or the database was unreachable: said already */
	} else if (err && strncmp(err->sqlstate, "22", 2) == 0 && !c->by_msg_id) {
		/* Every other parameter was checked here: PostgreSQL refused the time. */
		answer_text(c, 400, "since: not a span (90s, 15m, 2h, 3d) or a timestamp: %s",
			    err->message);
	} else if (err) {
		migrate_explain("", err->sqlstate, err->message, line, sizeof(line));
		answer_text(c, err->connection_lost || err->sqlstate[0] ? 503 : 500,
			    "the ledger cannot answer: %s", line);
	} else if (c->by_msg_id && PQntuples(res) > DISPATCHES_MAX_ROWS) {
		answer_text(c, 400,
			    "msg_id: these messages have more than %d dispatches; ask about fewer "
			    "msg ids",
			    DISPATCHES_MAX_ROWS);
	} else {
		cJSON *arr = ledger_view_json(res);
		char *text = arr ? cJSON_PrintUnformatted(arr) : NULL;
		size_t len = text ? strlen(text) : 0;
		char *body = text ? realloc(text, len + 2) : NULL;

		cJSON_Delete(arr);
		if (body == NULL) {
			free(text);
			answer_text(c, 500, "out of memory");
		} else {
			memcpy(body + len, "\n", 2);
			answer(c, 200, JSON_TYPE, body, len + 1);
		}
	}
	if (res)
		PQclear(res);
	unlink_call(c);
	free(c);
}

/* The database could not be reached: nobody waits for the next attempt. */
static void on_connect_failed(void *arg)
{
	struct dispatches *ds = arg;

	for (struct call *c = ds->calls; c; c = c->next)
		answer_text(c, 503,
			    "cannot connect to the database (see the db_connect_failed line "
			    "in the log)");
}

/* The connection, opened or switched to cfg's conninfo. 0 or -1. */
static int connection(struct dispatches *ds, const struct config *cfg)
{
	struct pg_callbacks cb = { .connect_failed = on_connect_failed, .arg = ds };

	if (ds->pg && strcmp(ds->conninfo, cfg->conninfo) != 0) {
		char *copy = strdup(cfg->conninfo);
		if (copy == NULL || pg_set_conninfo(ds->pg, cfg->conninfo) != 0) {
			free(copy);
			return -1;
		}
		free(ds->conninfo);
		ds->conninfo = copy;
	}
	if (ds->pg)
		return 0;
	if ((ds->conninfo = strdup(cfg->conninfo)) == NULL)
		return -1;
	ds->pg = pg_new(ds->loop, cfg->conninfo, cfg->db_connect_timeout_ms, &cb);
	if (ds->pg == NULL) {
		free(ds->conninfo);
		ds->conninfo = NULL;
		return -1;
	}
	pg_start(ds->pg);
	return 0;
}

/* The request's parameters, checked. */
struct args {
	const char *ids[DISPATCHES_MAX_IDS + 1];
	char idbuf[(DISPATCHES_MAX_IDS + 1) * (ID_TEXT_MAX + 2)];
	int nids;
	const char *state, *since, *limit;
};

/* Splits one msg_id value ("1" or "1,2,3") into a. NULL, or why not. */
static const char *add_ids(struct args *a, const char *v, size_t *used, char *why, size_t len)
{
	if (v == NULL || *v == '\0')
		return "msg_id: empty; give msg_id=1 or msg_id=1,2";
	for (const char *p = v;; p++) {
		size_t n = strcspn(p, ",");
		if (a->nids > DISPATCHES_MAX_IDS) {
			snprintf(why, len, "msg_id: at most %d msg ids", DISPATCHES_MAX_IDS);
			return why;
		}
		if (n == 0 || n > ID_TEXT_MAX) {
			snprintf(why, len, "msg_id: '%.*s' is not a msg_id", n ? 40 : 0, p);
			return why;
		}
		memcpy(a->idbuf + *used, p, n);
		a->idbuf[*used + n] = '\0';
		a->ids[a->nids++] = a->idbuf + *used;
		*used += n + 1;
		p += n;
		if (*p == '\0')
			return NULL;
	}
}

static const char *parse(struct args *a, const char *const *keys, const char *const *vals, int n,
			 char *why, size_t len)
{
	size_t used = 0;

	memset(a, 0, sizeof(*a));
	for (int i = 0; i < n; i++) {
		const char *k = keys[i], *v = vals[i];
		const char **slot = strcmp(k, "state") == 0   ? &a->state
				    : strcmp(k, "since") == 0 ? &a->since
				    : strcmp(k, "limit") == 0 ? &a->limit
							      : NULL;
		if (strcmp(k, "msg_id") == 0) {
			const char *bad = add_ids(a, v, &used, why, len);
			if (bad)
				return bad;
			continue;
		}
		if (slot == NULL) {
			snprintf(why, len,
				 "unknown parameter '%.40s': /dispatches takes msg_id, or state, "
				 "since and limit",
				 k);
			return why;
		}
		if (*slot != NULL) {
			snprintf(why, len, "%s: given twice", k);
			return why;
		}
		if (v == NULL || *v == '\0') {
			snprintf(why, len, "%s: empty", k);
			return why;
		}
		*slot = v;
	}
	if (a->nids > 0 && (a->state || a->since || a->limit))
		return "msg_id: cannot be combined with state, since or limit";
	if (a->state && !ledger_view_state_ok(a->state)) {
		snprintf(why, len, "state: '%.40s' is not a state (letters, digits and _)",
			 a->state);
		return why;
	}
	if (a->limit && ledger_view_limit(a->limit, DISPATCHES_MAX_ROWS) < 0) {
		snprintf(why, len, "limit: '%.20s' is not a number from 1 to %d", a->limit,
			 DISPATCHES_MAX_ROWS);
		return why;
	}
	return NULL;
}

void dispatches_serve(struct dispatches *ds, const struct config *cfg, const char *const *keys,
		      const char *const *vals, int n, dispatches_done_fn done, void *ctx)
{
	char ids[DISPATCHES_MAX_IDS * LEDGER_VIEW_ID_BYTES + 4], rows[16], span[32], why[160];
	char sql[LEDGER_VIEW_SQL_BYTES], limit[16];
	const char *params[5], *bad;
	struct call *c = calloc(1, sizeof(*c));
	struct args *a = malloc(sizeof(*a));
	int nparams, rc;

	if (c == NULL || a == NULL) {
		free(c);
		free(a);
		done(ctx, 503, TEXT_TYPE, strdup("out of memory\n"), 14);
		return;
	}
	c->ds = ds;
	c->done = done;
	c->ctx = ctx;
	ev_timer_init(&c->timer, on_timeout, DISPATCHES_TIMEOUT_S, 0.0);
	c->timer.data = c;
	if (!cfg->ledger_enabled) {
		answer_text(c, 404, "the dispatch ledger is off (ledger.enabled = off)");
		goto done;
	}
	if (ds->pending >= DISPATCHES_MAX_PENDING) {
		answer_text(c, 503, "busy: %d /dispatches requests are being answered; try again",
			    ds->pending);
		goto done;
	}
	if ((bad = parse(a, keys, vals, n, why, sizeof(why))) != NULL) {
		answer_text(c, 400, "%s", bad);
		goto done;
	}
	c->by_msg_id = a->nids > 0;
	if (c->by_msg_id) {
		if (ledger_view_ids(a->ids, a->nids, DISPATCHES_MAX_IDS, ids, sizeof(ids), why,
				    sizeof(why)) != 0) {
			answer_text(c, 400, "msg_id: %s", why);
			goto done;
		}
		snprintf(rows, sizeof(rows), "%d", DISPATCHES_MAX_ROWS + 1);
		params[0] = ids;
		params[1] = rows;
		nparams = 2;
		rc = ledger_view_status_sql(cfg->ledger_schema, cfg->queue_name, false, sql,
					    sizeof(sql));
	} else {
		snprintf(limit, sizeof(limit), "%s", a->limit ? a->limit : "");
		if (a->limit == NULL)
			snprintf(limit, sizeof(limit), "%d", LEDGER_VIEW_JOBS_DEFAULT);
		params[0] = cfg->queue_name;
		params[1] = a->state;
		ledger_view_since(a->since, span, sizeof(span), &params[2]);
		params[3] = span[0] ? span : NULL;
		params[4] = limit;
		nparams = 5;
		rc = ledger_view_jobs_sql(cfg->ledger_schema, sql, sizeof(sql));
	}
	if (rc != 0 || connection(ds, cfg) != 0 ||
	    pg_query(ds->pg, sql, nparams, params, on_result, c) != 0) {
		answer_text(c, 503, "cannot query the ledger now (out of memory or too busy)");
		goto done;
	}
	c->next = ds->calls;
	if (ds->calls)
		ds->calls->prev = c;
	ds->calls = c;
	ds->pending++;
	ev_timer_start(ds->loop, &c->timer);
	free(a);
	return;
done:
	free(a);
	free(c);
}

struct dispatches *dispatches_new(struct ev_loop *loop)
{
	struct dispatches *ds = calloc(1, sizeof(*ds));

	if (ds)
		ds->loop = loop;
	return ds;
}

void dispatches_free(struct dispatches *ds)
{
	if (ds == NULL)
		return;
	/* Statements still waiting fail with connection_lost: answered 503. */
	pg_free(ds->pg);
	free(ds->conninfo);
	free(ds);
}
