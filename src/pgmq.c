/* pgmq — see include/pgmq.h. */
#include "pgmq.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define READ_SQL \
	"SELECT " PGMQ_READ_COLUMNS " FROM %s($1::text, $2::integer, $3::integer) ORDER BY msg_id"

/* set_vt and archive exist per id in every pgmq ≥ 1.2; the bigint[] forms
 * only from 1.8 (pgmq-api.md §1.3), and Supabase ships 1.4/1.5. */
static const char SET_VT_SQL[] = "SELECT count(*) FROM unnest($2::bigint[]) AS m(id), "
				 "LATERAL pgmq.set_vt($1::text, m.id, $3::integer) AS r";
static const char ARCHIVE_SQL[] =
	"SELECT count(*) FILTER (WHERE a) FROM unnest($2::bigint[]) AS m(id), "
	"LATERAL pgmq.archive($1::text, m.id) AS a";

int pgmq_read_sql(const char *read_function, char *buf, size_t len)
{
	int n = snprintf(buf, len, READ_SQL, read_function);

	return n < 0 || (size_t)n >= len ? -1 : 0;
}

int pgmq_batch_from_result(PGresult *res, struct pgmq_batch *out, char *err, size_t errlen)
{
	int c_id, c_ct, c_enq, c_msg, c_doc, n;
	const char *missing = NULL;

	memset(out, 0, sizeof(*out));
	c_id = PQfnumber(res, "msg_id");
	if (c_id < 0) {
		snprintf(err, errlen,
			 "the read function returned no column named msg_id (%d %s read, "
			 "%s unknown; visible again after vt_seconds)",
			 PQntuples(res), PQntuples(res) == 1 ? "row" : "rows",
			 PQntuples(res) == 1 ? "its id" : "their ids");
		PQclear(res);
		return -1;
	}
	c_ct = PQfnumber(res, "read_ct");
	c_enq = PQfnumber(res, "enqueued_at");
	c_msg = PQfnumber(res, "message");
	c_doc = PQfnumber(res, "document_id");
	if (c_ct < 0)
		missing = "the read function returned no column named read_ct";
	else if (c_enq < 0)
		missing = "the read function returned no column named enqueued_at";
	else if (c_msg < 0)
		missing = "the read function returned no column named message";
	else if (c_doc < 0)
		missing = "the read function returned no column named document_id";
	n = PQntuples(res);
	out->res = res;
	out->n = n;
	if (n == 0)
		return 0;
	out->msgs = calloc((size_t)n, sizeof(*out->msgs));
	if (out->msgs == NULL) {
		snprintf(err, errlen, "out of memory for %d %s", n, n == 1 ? "row" : "rows");
		pgmq_batch_free(out);
		return -1;
	}
	for (int i = 0; i < n; i++) {
		struct pgmq_message *m = &out->msgs[i];
		char *end;

		m->msg_id = PQgetisnull(res, i, c_id) ? "" : PQgetvalue(res, i, c_id);
		errno = 0;
		m->msg_id_num = strtoll(m->msg_id, &end, 10);
		m->id_ok = !PQgetisnull(res, i, c_id) && errno == 0 && *end == '\0' &&
			   end != m->msg_id;
		if (!m->id_ok) {
			m->invalid = "msg_id is NULL or not a bigint";
			continue;
		}
		if (missing) {
			m->invalid = missing;
			continue;
		}
		if (PQgetisnull(res, i, c_ct) || PQgetisnull(res, i, c_enq)) {
			m->invalid = "read_ct or enqueued_at is NULL";
			continue;
		}
		m->read_ct = PQgetvalue(res, i, c_ct);
		if (m->read_ct[0] == '\0' ||
		    strspn(m->read_ct, "0123456789") != strlen(m->read_ct)) {
			m->invalid = "read_ct is not a non-negative integer";
			continue;
		}
		m->enqueued_at = PQgetvalue(res, i, c_enq);
		if (PQgetisnull(res, i, c_msg)) {
			m->message = "null";
			m->message_len = 4;
		} else {
			m->message = PQgetvalue(res, i, c_msg);
			m->message_len = (size_t)PQgetlength(res, i, c_msg);
		}
		m->document_id = PQgetisnull(res, i, c_doc) ? NULL : PQgetvalue(res, i, c_doc);
	}
	return 0;
}

void pgmq_batch_free(struct pgmq_batch *b)
{
	if (b == NULL)
		return;
	free(b->msgs);
	if (b->res)
		PQclear(b->res);
	memset(b, 0, sizeof(*b));
}

struct call {
	union {
		pgmq_read_fn read;
		pgmq_count_fn count;
		pgmq_metrics_fn metrics;
	} fn;
	void *arg;
};

static struct call *new_call(void *arg)
{
	struct call *c = calloc(1, sizeof(*c));

	if (c)
		c->arg = arg;
	return c;
}

static void on_read(void *arg, PGresult *res, const struct pg_error *err)
{
	struct call *c = arg;
	struct pgmq_batch *b;
	char why[256];

	if (res == NULL) {
		c->fn.read(c->arg, NULL, err);
		free(c);
		return;
	}
	b = malloc(sizeof(*b));
	if (b == NULL) {
		struct pg_error e = { "", "out of memory", true, false };
		PQclear(res);
		c->fn.read(c->arg, NULL, &e);
	} else if (pgmq_batch_from_result(res, b, why, sizeof(why)) != 0) {
		struct pg_error e = { "", why, true, false };
		free(b);
		c->fn.read(c->arg, NULL, &e);
	} else {
		c->fn.read(c->arg, b, NULL);
	}
	free(c);
}

int pgmq_read_query(struct pg *pg, const char *sql, int nparams, const char *const *params,
		    pgmq_read_fn fn, void *arg)
{
	struct call *c = new_call(arg);

	if (c == NULL)
		return -1;
	c->fn.read = fn;
	if (pg_query(pg, sql, nparams, params, on_read, c) != 0) {
		free(c);
		return -1;
	}
	return 0;
}

int pgmq_read(struct pg *pg, const char *read_function, const char *queue, int vt_seconds, int qty,
	      pgmq_read_fn fn, void *arg)
{
	char sql[512], vt[16], n[16];
	const char *params[3] = { queue, vt, n };
	struct call *c;

	if (pgmq_read_sql(read_function, sql, sizeof(sql)) != 0)
		return -1;
	snprintf(vt, sizeof(vt), "%d", vt_seconds);
	snprintf(n, sizeof(n), "%d", qty);
	c = new_call(arg);
	if (c == NULL)
		return -1;
	c->fn.read = fn;
	if (pg_query(pg, sql, 3, params, on_read, c) != 0) {
		free(c);
		return -1;
	}
	return 0;
}

static char *id_array(const long long *ids, int n);

static void on_count(void *arg, PGresult *res, const struct pg_error *err)
{
	struct call *c = arg;

	if (res == NULL) {
		c->fn.count(c->arg, -1, err);
	} else {
		long count = PQntuples(res) == 1 ? strtol(PQgetvalue(res, 0, 0), NULL, 10) : -1;
		PQclear(res);
		c->fn.count(c->arg, count, NULL);
	}
	free(c);
}

int pgmq_count_query(struct pg *pg, const char *sql, int nparams, const char *const *params,
		     pgmq_count_fn fn, void *arg)
{
	struct call *c = new_call(arg);

	if (c == NULL)
		return -1;
	c->fn.count = fn;
	if (pg_query(pg, sql, nparams, params, on_count, c) != 0) {
		free(c);
		return -1;
	}
	return 0;
}

char *pgmq_id_array(const long long *ids, int n)
{
	return id_array(ids, n);
}

/* "{1,2,3}": the text form of a bigint[] parameter. */
static char *id_array(const long long *ids, int n)
{
	size_t cap = (size_t)n * 21 + 3, used = 0;
	char *s = malloc(cap);

	if (s == NULL)
		return NULL;
	s[used++] = '{';
	for (int i = 0; i < n; i++)
		used += (size_t)snprintf(s + used, cap - used, "%s%lld", i ? "," : "", ids[i]);
	s[used++] = '}';
	s[used] = '\0';
	return s;
}

static int run_ids(struct pg *pg, const char *sql, const char *queue, const long long *ids, int n,
		   const char *third, pgmq_count_fn fn, void *arg)
{
	char *arr = id_array(ids, n);
	const char *params[3] = { queue, arr, third };
	struct call *c = new_call(arg);
	int rc = -1;

	if (arr && c) {
		c->fn.count = fn;
		rc = pg_query(pg, sql, third ? 3 : 2, params, on_count, c);
	}
	if (rc != 0)
		free(c);
	free(arr);
	return rc;
}

int pgmq_set_vt(struct pg *pg, const char *queue, const long long *msg_ids, int n, int delay_s,
		pgmq_count_fn fn, void *arg)
{
	char delay[16];

	snprintf(delay, sizeof(delay), "%d", delay_s);
	return run_ids(pg, SET_VT_SQL, queue, msg_ids, n, delay, fn, arg);
}

int pgmq_archive(struct pg *pg, const char *queue, const long long *msg_ids, int n,
		 pgmq_count_fn fn, void *arg)
{
	return run_ids(pg, ARCHIVE_SQL, queue, msg_ids, n, NULL, fn, arg);
}

static void on_metrics(void *arg, PGresult *res, const struct pg_error *err)
{
	struct call *c = arg;

	if (res == NULL) {
		c->fn.metrics(c->arg, -1, 0, err);
	} else if (PQntuples(res) != 1) {
		struct pg_error e = { "", "pgmq.metrics returned no row", true, false };
		c->fn.metrics(c->arg, -1, 0, &e);
	} else {
		long long length = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
		double age = PQgetisnull(res, 0, 1) ? 0 : strtod(PQgetvalue(res, 0, 1), NULL);
		c->fn.metrics(c->arg, length, age, NULL);
	}
	if (res)
		PQclear(res);
	free(c);
}

int pgmq_metrics(struct pg *pg, const char *queue, pgmq_metrics_fn fn, void *arg)
{
	static const char sql[] =
		"SELECT queue_length, oldest_msg_age_sec FROM pgmq.metrics($1::text)";
	const char *params[1] = { queue };
	struct call *c = new_call(arg);

	if (c == NULL)
		return -1;
	c->fn.metrics = fn;
	if (pg_query(pg, sql, 1, params, on_metrics, c) != 0) {
		free(c);
		return -1;
	}
	return 0;
}

int pgmq_table_name(const char *queue, char *buf, size_t len)
{
	int n = snprintf(buf, len, "q_%s", queue);

	if (n < 0 || (size_t)n >= len)
		return -1;
	for (size_t i = 2; buf[i]; i++)
		buf[i] = (char)tolower((unsigned char)buf[i]);
	return 0;
}

int pgmq_quote_literal(const char *s, char *buf, size_t len)
{
	size_t used = 0;

	if (len < 3)
		return -1;
	buf[used++] = '\'';
	for (; *s; s++) {
		if (used + (*s == '\'' ? 2 : 1) + 2 > len) {
			buf[0] = '\0';
			return -1;
		}
		if (*s == '\'')
			buf[used++] = '\'';
		buf[used++] = *s;
	}
	buf[used++] = '\'';
	buf[used] = '\0';
	return 0;
}

int pgmq_create_call(const char *queue, char *buf, size_t len)
{
	char lit[256];
	int n;

	if (pgmq_quote_literal(queue, lit, sizeof(lit)) != 0)
		snprintf(lit, sizeof(lit), "'<queue>'");
	n = snprintf(buf, len, "SELECT pgmq.create(%s);", lit);
	return n < 0 || (size_t)n >= len ? -1 : 0;
}

PGresult *pgmq_peek(PGconn *conn, const char *queue, int qty, char *err, size_t errlen)
{
	char table[64], sql[512], n[16];
	const char *params[1] = { n };
	char *ident;
	PGresult *res;

	if (pgmq_table_name(queue, table, sizeof(table)) != 0) {
		snprintf(err, errlen, "queue name too long");
		return NULL;
	}
	ident = PQescapeIdentifier(conn, table, strlen(table));
	if (ident == NULL) {
		snprintf(err, errlen, "%s", PQerrorMessage(conn));
		return NULL;
	}
	snprintf(
		sql, sizeof(sql),
		"SELECT msg_id, read_ct + 1 AS read_ct, to_json(enqueued_at) AS enqueued_at, message, "
		"message->'document_id' AS document_id FROM pgmq.%s "
		"WHERE vt <= clock_timestamp() ORDER BY msg_id LIMIT $1::integer",
		ident);
	PQfreemem(ident);
	snprintf(n, sizeof(n), "%d", qty);
	res = PQexecParams(conn, sql, 1, NULL, params, NULL, NULL, 0);
	if (PQresultStatus(res) != PGRES_TUPLES_OK) {
		const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
		snprintf(err, errlen, "%s%s%.*s", state ? state : "", state ? ": " : "",
			 (int)strcspn(PQresultErrorMessage(res), "\n"), PQresultErrorMessage(res));
		PQclear(res);
		return NULL;
	}
	return res;
}

/* ---- set_vt returning the ids it touched (the tracker's heartbeat) ---- */

static const char SET_VT_IDS_SQL[] = "SELECT r.msg_id FROM unnest($2::bigint[]) AS m(id), "
				     "LATERAL pgmq.set_vt($1::text, m.id, $3::integer) AS r";

struct ids_call {
	pgmq_ids_fn fn;
	void *arg;
};

static void on_ids(void *arg, PGresult *res, const struct pg_error *err)
{
	struct ids_call *c = arg;
	long long *ids = NULL;
	int n = 0;

	if (res == NULL) {
		c->fn(c->arg, NULL, 0, err);
		free(c);
		return;
	}
	n = PQntuples(res);
	if (n > 0 && (ids = malloc((size_t)n * sizeof(*ids))) == NULL) {
		struct pg_error e = { "", "out of memory", true, false };
		PQclear(res);
		c->fn(c->arg, NULL, 0, &e);
		free(c);
		return;
	}
	for (int i = 0; i < n; i++)
		ids[i] = strtoll(PQgetvalue(res, i, 0), NULL, 10);
	PQclear(res);
	c->fn(c->arg, ids, n, NULL);
	free(ids);
	free(c);
}

int pgmq_set_vt_ids(struct pg *pg, const char *queue, const long long *msg_ids, int n, int delay_s,
		    pgmq_ids_fn fn, void *arg)
{
	char delay[16];
	char *arr = id_array(msg_ids, n);
	const char *params[3] = { queue, arr, delay };
	struct ids_call *c = calloc(1, sizeof(*c));
	int rc = -1;

	snprintf(delay, sizeof(delay), "%d", delay_s);
	if (arr && c) {
		c->fn = fn;
		c->arg = arg;
		rc = pg_query(pg, SET_VT_IDS_SQL, 3, params, on_ids, c);
	}
	if (rc != 0)
		free(c);
	free(arr);
	return rc;
}

/* ---- rows whose read_ct is about to overflow int4 ---- */

int pgmq_find_read_ct_overflow(struct pg *pg, const char *queue, int margin, int limit,
			       pgmq_ids_fn fn, void *arg)
{
	char table[64], quoted[160], sql[512], lo[16], n[16];
	const char *params[2] = { lo, n };
	struct ids_call *c;

	if (pgmq_table_name(queue, table, sizeof(table)) != 0)
		return -1;
	if (pg_quote_ident(table, quoted, sizeof(quoted)) != 0)
		return -1;
	snprintf(sql, sizeof(sql),
		 "SELECT msg_id FROM pgmq.%s WHERE read_ct >= $1::integer "
		 "ORDER BY read_ct DESC, msg_id LIMIT $2::integer",
		 quoted);
	snprintf(lo, sizeof(lo), "%d", PGMQ_READ_CT_MAX - (margin < 0 ? 0 : margin));
	snprintf(n, sizeof(n), "%d", limit);
	c = calloc(1, sizeof(*c));
	if (c == NULL)
		return -1;
	c->fn = fn;
	c->arg = arg;
	if (pg_query(pg, sql, 2, params, on_ids, c) != 0) {
		free(c);
		return -1;
	}
	return 0;
}
