/* ledger_view — see include/ledger_view.h. */
#include "ledger_view.h"
#include "pg.h"
#include "pgmq.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *const LEDGER_VIEW_AGO_COLS[] = { "read", "updated", "archived", NULL };

int ledger_view_ids(const char *const *texts, int n, int max, char *buf, size_t len, char *why,
		    size_t whylen)
{
	size_t used = 1;

	if (len < 3) {
		snprintf(why, whylen, "no room for msg ids");
		return -1;
	}
	memcpy(buf, "{", 2);
	for (int i = 0; i < n; i++) {
		char *end;
		long long v;

		if (i == max || used + LEDGER_VIEW_ID_BYTES + 2 >= len) {
			snprintf(why, whylen, "at most %d msg ids", max);
			return -1;
		}
		v = strtoll(texts[i], &end, 10);
		if (!isdigit((unsigned char)texts[i][0]) || *end != '\0' || v < 1) {
			snprintf(why, whylen, "'%.40s' is not a msg_id", texts[i]);
			return -1;
		}
		used += (size_t)snprintf(buf + used, len - used, "%s%lld", i ? "," : "", v);
	}
	snprintf(buf + used, len - used, "}");
	return 0;
}

long ledger_view_span_s(const char *s)
{
	char *end;
	long v;

	if (!isdigit((unsigned char)s[0]))
		return -1;
	v = strtol(s, &end, 10);
	if (end[0] == '\0' || end[1] != '\0' || v < 0 || v > 100L * 365 * 86400)
		return -1;
	switch (end[0]) {
	case 's':
		return v;
	case 'm':
		return v * 60;
	case 'h':
		return v * 3600;
	case 'd':
		return v * 86400;
	default:
		return -1;
	}
}

void ledger_view_ago(double seconds, char *buf, size_t len)
{
	long s = seconds < 0 ? 0 : (long)seconds;

	if (s < 120)
		snprintf(buf, len, "%lds", s);
	else if (s < 7200)
		snprintf(buf, len, "%ldm", s / 60);
	else if (s < 2 * 86400)
		snprintf(buf, len, "%ldh", s / 3600);
	else
		snprintf(buf, len, "%ldd", s / 86400);
}

int ledger_view_limit(const char *s, int max)
{
	char *end;
	long v;

	if (s == NULL || !isdigit((unsigned char)s[0]))
		return -1;
	v = strtol(s, &end, 10);
	return *end != '\0' || v < 1 || v > max ? -1 : (int)v;
}

bool ledger_view_state_ok(const char *s)
{
	size_t n = 0;

	for (; s[n]; n++)
		if (!isalnum((unsigned char)s[n]) && s[n] != '_')
			return false;
	return n >= 1 && n <= LEDGER_VIEW_STATE_MAX;
}

void ledger_view_since(const char *since, char *span, size_t spanlen, const char **ts)
{
	long s = since ? ledger_view_span_s(since) : -1;

	span[0] = '\0';
	*ts = NULL;
	if (s >= 0)
		snprintf(span, spanlen, "%ld seconds", s);
	else
		*ts = since;
}

int ledger_view_tables(const char *queue, char *q, char *a, size_t len)
{
	char t[80], quoted[200];

	if (pgmq_table_name(queue, t, sizeof(t)) != 0 ||
	    pg_quote_ident(t, quoted, sizeof(quoted)) != 0)
		return -1;
	snprintf(q, len, "pgmq.%s", quoted);
	t[0] = 'a';
	if (pg_quote_ident(t, quoted, sizeof(quoted)) != 0)
		return -1;
	snprintf(a, len, "pgmq.%s", quoted);
	return 0;
}

int ledger_view_status_sql(const char *schema, const char *queue, bool brief, char *buf, size_t len)
{
	char q[220], a[220], full[LEDGER_VIEW_SQL_BYTES];
	int n;

	if (ledger_view_tables(queue, q, a, sizeof(q)) != 0)
		return -1;
	n = snprintf(
		full, sizeof(full),
		"SELECT m.id AS msg_id, CASE WHEN EXISTS (SELECT 1 FROM %s WHERE msg_id = m.id) "
		"THEN 'queue' WHEN EXISTS (SELECT 1 FROM %s WHERE msg_id = m.id) THEN 'archive' "
		"ELSE 'gone' END AS now_in, d.dispatch_id::text AS dispatch_id, "
		"extract(epoch FROM d.read_at)::float8 AS read, "
		"d.read_cts[array_position(d.msg_ids, m.id)] AS read_ct, d.state, d.job_id, "
		"d.http_status AS http, extract(epoch FROM d.updated_at)::float8 AS updated, "
		"(SELECT string_agg(h->>'state', '>') FROM jsonb_array_elements(d.history) h) "
		"AS states, d.history, d.error "
		"FROM unnest($1::bigint[]) WITH ORDINALITY AS m(id, ord) "
		"LEFT JOIN %s.dispatch d ON d.msg_ids @> ARRAY[m.id] "
		"ORDER BY m.ord, d.read_at NULLS FIRST LIMIT $2::integer",
		q, a, schema);
	if (n < 0 || (size_t)n >= sizeof(full))
		return -1;
	if (brief) /* the table leaves out the long columns; JSON has them */
		n = snprintf(buf, len,
			     "SELECT msg_id, now_in, dispatch_id, read, read_ct, state, job_id, "
			     "http, updated, states FROM (%s) s",
			     full);
	else
		n = snprintf(buf, len, "%s", full);
	return n < 0 || (size_t)n >= len ? -1 : 0;
}

int ledger_view_jobs_sql(const char *schema, char *buf, size_t len)
{
	int n = snprintf(
		buf, len,
		"SELECT dispatch_id::text AS dispatch_id, extract(epoch FROM read_at)::float8 AS read, "
		"state, job_id, cardinality(msg_ids) AS messages, msg_ids[1] AS first_msg_id, "
		"http_status AS http, extract(epoch FROM updated_at)::float8 AS updated, error "
		"FROM %s.dispatch WHERE queue = $1 AND ($2::text IS NULL OR state = $2) "
		"AND ($3::timestamptz IS NULL OR read_at >= $3::timestamptz) "
		"AND ($4::interval IS NULL OR read_at >= now() - $4::interval) "
		"ORDER BY read_at DESC LIMIT $5::integer",
		schema);

	return n < 0 || (size_t)n >= len ? -1 : 0;
}

/* OIDs of the types given as JSON values (pg_type.h). */
enum {
	OID_INT8 = 20,
	OID_INT4 = 23,
	OID_JSON = 114,
	OID_FLOAT8 = 701,
	OID_INT4_ARRAY = 1007,
	OID_INT8_ARRAY = 1016,
	OID_JSONB = 3802
};

static cJSON *value(const PGresult *res, int row, int col)
{
	const char *v = PQgetvalue(res, row, col);
	Oid type = PQftype(res, col);
	cJSON *item = NULL;

	if (PQgetisnull(res, row, col))
		return cJSON_CreateNull();
	if (type == OID_INT8_ARRAY || type == OID_INT4_ARRAY) { /* {1,2} → [1,2] */
		char *t = strdup(v);
		size_t n = t ? strlen(t) : 0;
		if (n >= 2) {
			t[0] = '[';
			t[n - 1] = ']';
			item = cJSON_Parse(t);
		}
		free(t);
	} else if (type == OID_JSON || type == OID_JSONB || type == OID_INT8 || type == OID_INT4 ||
		   type == OID_FLOAT8) {
		item = cJSON_Parse(v);
	}
	return item ? item : cJSON_CreateString(v);
}

cJSON *ledger_view_json(const PGresult *res)
{
	int rows = PQntuples(res), cols = PQnfields(res);
	cJSON *arr = cJSON_CreateArray();

	for (int i = 0; arr && i < rows; i++) {
		cJSON *o = cJSON_CreateObject();
		if (o == NULL || !cJSON_AddItemToArray(arr, o)) {
			cJSON_Delete(o);
			cJSON_Delete(arr);
			return NULL;
		}
		for (int c = 0; c < cols; c++) {
			cJSON *item = value(res, i, c);
			if (item == NULL || !cJSON_AddItemToObject(o, PQfname(res, c), item)) {
				cJSON_Delete(item);
				cJSON_Delete(arr);
				return NULL;
			}
		}
	}
	return arr;
}
