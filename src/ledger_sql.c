/* ledger_sql — see include/ledger_sql.h. */
#include "ledger_sql.h"
#include "ledger.h"
#include "pgmq.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#define STR_(x) #x
#define PGMQD_STR(x) STR_(x)

/* Every format takes the schema as %1$s (the read's also the read function
 * as %2$s). The dispatch table has no index on a column that changes after
 * the insert, so its transitions are HOT updates; what changes (who holds
 * a row, until when) lives in the small lease table, one row per
 * unfinished dispatch. */

/* The read and, in the same statement, its rows and their leases: the
 * rows in msg_id order, cut into parts of $8 (batch_size), one `sending`
 * row per part under ($4)[part] — the bodies a read of several batches is
 * sent as, so that no statement re-cuts the read's row after it. $1 queue,
 * $2 vt, $3 qty (as pgmq.read), $4 dispatch ids (one per part), $5
 * endpoint, $6 owner, $7 lease_s, $8 rows per part. An empty read inserts
 * nothing. pgmqd_row (1-based) numbers the rows as they come back. */
const char LEDGER_READ_SQL[] =
	"WITH r AS MATERIALIZED (SELECT " PGMQ_READ_COLUMNS
	", row_number() OVER (ORDER BY msg_id) AS pgmqd_row"
	" FROM %2$s($1::text, $2::integer, $3::integer)), "
	"ins AS (INSERT INTO %1$s.dispatch (dispatch_id, queue, endpoint_id, msg_ids, read_cts, "
	"read_at, vt_until, state, history) "
	/* A read function may return malformed fields (batch.c releases those
	 * rows): they are recorded as NULL rather than failing the read. */
	"SELECT ($4::uuid[])[(pgmqd_row - 1) / $8::integer + 1], $1::text, $5::text, "
	"array_agg(CASE WHEN msg_id::text ~ '^[0-9]{1,18}$' "
	"THEN msg_id::text::bigint END ORDER BY pgmqd_row), array_agg(CASE WHEN read_ct::text ~ "
	"'^[0-9]{1,9}$' THEN read_ct::text::integer END ORDER BY pgmqd_row), now(), "
	"now() + make_interval(secs => $2::integer), "
	"'sending', jsonb_build_array(jsonb_build_object('state', 'sending', 'at', now())) "
	"FROM r GROUP BY (pgmqd_row - 1) / $8::integer RETURNING dispatch_id), "
	"lz AS (INSERT INTO %1$s.lease (dispatch_id, queue, endpoint_id, owner, lease_until, pid, "
	"since) SELECT dispatch_id, $1::text, $5::text, $6::uuid, now() + make_interval(secs => "
	"$7::integer), pg_backend_pid(), now() FROM ins) "
	"SELECT * FROM r ORDER BY pgmqd_row";

/* All transitions noted while the previous statement ran, in one: grouped
 * per row, the last state wins and every one joins the history; a row no
 * longer held gives up its lease, a held one takes its job id. $1 ids,
 * $2 states, $3 http, $4 job ids, $5 errors, $6 epoch times, $7 held. */
const char LEDGER_NOTES_SQL[] =
	"WITH u AS (SELECT * FROM unnest($1::uuid[], $2::text[], $3::integer[], $4::text[], "
	"$5::text[], $6::float8[], $7::boolean[]) WITH ORDINALITY "
	"AS u(id, state, http, job, err, at, held, ord)), "
	"g AS (SELECT id, (array_agg(state ORDER BY ord DESC))[1] AS state, "
	"(array_agg(held ORDER BY ord DESC))[1] AS held, "
	"(array_agg(http ORDER BY ord DESC) FILTER (WHERE http IS NOT NULL))[1] AS http, "
	"(array_agg(job ORDER BY ord DESC) FILTER (WHERE job IS NOT NULL))[1] AS job, "
	"(array_agg(err ORDER BY ord DESC) FILTER (WHERE err IS NOT NULL))[1] AS err, "
	"jsonb_agg(jsonb_build_object('state', state, 'at', to_timestamp(at)) ORDER BY ord) AS h, "
	"max(to_timestamp(at)) AS at FROM u GROUP BY id), "
	"gone AS (DELETE FROM %1$s.lease l USING g WHERE l.dispatch_id = g.id AND NOT g.held), "
	"kept AS (UPDATE %1$s.lease l SET job_id = g.job FROM g WHERE l.dispatch_id = g.id "
	"AND g.held AND g.job IS NOT NULL) "
	"UPDATE %1$s.dispatch d SET state = g.state, http_status = coalesce(g.http, d.http_status), "
	"job_id = coalesce(g.job, d.job_id), error = coalesce(g.err, d.error), "
	"updated_at = greatest(d.updated_at, g.at), history = d.history || g.h "
	"FROM g WHERE d.dispatch_id = g.id";

/* $1 the read's id, $2 part ids, $3 part states, $4 msg ids, $5 part (1-based). */
const char LEDGER_SPLIT_SQL[] =
	"WITH src AS (SELECT * FROM %1$s.dispatch WHERE dispatch_id = $1::uuid), "
	"ls AS (SELECT * FROM %1$s.lease WHERE dispatch_id = $1::uuid), "
	"m AS (SELECT x.id, x.part, src.read_cts[array_position(src.msg_ids, x.id)] AS rc "
	"FROM src, unnest($4::bigint[], $5::integer[]) AS x(id, part)), "
	"g AS (SELECT part, array_agg(id ORDER BY id) AS ids, array_agg(rc ORDER BY id) AS rcs "
	"FROM m GROUP BY part), "
	"up AS (UPDATE %1$s.dispatch d SET msg_ids = g.ids, read_cts = g.rcs, "
	"state = ($3::text[])[1], history = d.history || jsonb_build_array(jsonb_build_object("
	"'state', ($3::text[])[1], 'at', now(), 'split_into', cardinality($2::uuid[]))) "
	"FROM g WHERE d.dispatch_id = $1::uuid AND g.part = 1 RETURNING 1), "
	"ins AS (INSERT INTO %1$s.dispatch (dispatch_id, queue, endpoint_id, msg_ids, read_cts, "
	"read_at, vt_until, state, history) "
	"SELECT ($2::uuid[])[g.part], src.queue, src.endpoint_id, g.ids, g.rcs, src.read_at, "
	"src.vt_until, ($3::text[])[g.part], "
	"jsonb_build_array(jsonb_build_object('state', 'sending', 'at', src.read_at), "
	"jsonb_build_object('state', ($3::text[])[g.part], 'at', now(), 'split_from', $1::text)) "
	"FROM g, src WHERE g.part > 1 RETURNING dispatch_id), "
	"il AS (INSERT INTO %1$s.lease (dispatch_id, queue, endpoint_id, owner, lease_until, pid, "
	"since) SELECT ins.dispatch_id, ls.queue, ls.endpoint_id, ls.owner, ls.lease_until, ls.pid, "
	"ls.since FROM ins, ls) "
	"SELECT (SELECT count(*) FROM up) + (SELECT count(*) FROM ins)";

/* pgmq.archive and, in the same statement, the ledger's record of it: the
 * dispatch row (%1$s schema) ends `archived` with the reason in its
 * history, or, for messages archived before any row held them (a read
 * that failed on them), a new row with their msg ids and read_ct (from the
 * queue table %2$s, as the statement found them). Nothing is recorded
 * when nothing was archived. $1 queue, $2 msg ids, $3 dispatch id,
 * $4 endpoint, $5 HTTP status, $6 error, $7 reason. One row: the count. */
const char LEDGER_ARCHIVE_SQL[] =
	"WITH q AS MATERIALIZED (SELECT msg_id, read_ct FROM %2$s WHERE msg_id = ANY "
	"($2::bigint[])), "
	"a AS MATERIALIZED (SELECT m.id FROM unnest($2::bigint[]) AS m(id), "
	"LATERAL pgmq.archive($1::text, m.id) AS ok WHERE ok), "
	"ins AS (INSERT INTO %1$s.dispatch AS d (dispatch_id, queue, endpoint_id, msg_ids, "
	"read_cts, read_at, vt_until, state, http_status, error, history) "
	"SELECT $3::uuid, $1::text, $4::text, array_agg(a.id ORDER BY a.id), "
	"array_agg(q.read_ct ORDER BY a.id), now(), now(), 'archived', $5::integer, $6::text, "
	"jsonb_build_array(jsonb_build_object('state', 'archived', 'at', now(), 'reason', "
	"$7::text)) FROM a LEFT JOIN q ON q.msg_id = a.id HAVING count(*) > 0 "
	"ON CONFLICT (dispatch_id) DO UPDATE SET state = 'archived', updated_at = now(), "
	"http_status = coalesce(EXCLUDED.http_status, d.http_status), "
	"error = coalesce(EXCLUDED.error, d.error), history = d.history || EXCLUDED.history "
	"RETURNING 1), "
	"gone AS (DELETE FROM %1$s.lease WHERE dispatch_id = $3::uuid AND EXISTS "
	"(SELECT 1 FROM a)) "
	"SELECT count(*) FROM a";

/* Renews this replica's leases (with its session: after a reconnect the
 * new backend pid), turns rows that dead replicas left unfinished before
 * any job (sending, archiving, releasing) into `unknown` — dead: their
 * lease ran out, or at once when the session that holds it is gone (no
 * backend with that pid that started before the lease was taken; an
 * unknown start, another role's session, counts as alive) — ends the leases of COMPLETED jobs after the grace period
 * naming the messages still in the queue (%2$s), prunes finished rows
 * older than the retention. $1 owner, $2 lease_s, $3 queue,
 * $4 retention_days, $5 completed_grace_s. Rows: kind, dispatch id, msg
 * ids (or the pruned count), job id. */
const char LEDGER_TICK_SQL[] =
	"WITH renew AS (UPDATE %1$s.lease SET lease_until = now() + make_interval(secs => "
	"$2::integer), since = CASE WHEN pid IS DISTINCT FROM pg_backend_pid() THEN now() "
	"ELSE since END, pid = pg_backend_pid() WHERE owner = $1::uuid RETURNING 1), "
	"dead AS (DELETE FROM %1$s.lease WHERE job_id IS NULL AND queue = $3::text "
	"AND owner <> $1::uuid AND (lease_until < now() OR (pid IS NOT NULL AND NOT EXISTS "
	"(SELECT 1 FROM pg_stat_activity a WHERE a.pid = lease.pid AND (a.backend_start IS NULL "
	"OR a.backend_start <= lease.since)))) RETURNING dispatch_id), "
	"lost AS (UPDATE %1$s.dispatch d SET state = 'unknown', updated_at = now(), "
	"error = 'the replica that read it died before it recorded the outcome', "
	"history = history || jsonb_build_array(jsonb_build_object('state', 'unknown', 'at', "
	"now())) FROM dead WHERE d.dispatch_id = dead.dispatch_id "
	"AND d.state IN ('sending', 'archiving', 'releasing') RETURNING d.dispatch_id, d.msg_ids), "
	"done AS (DELETE FROM %1$s.lease l USING %1$s.dispatch d WHERE l.dispatch_id = "
	"d.dispatch_id AND l.queue = $3::text AND d.state = 'COMPLETED' AND d.updated_at < now() - "
	"make_interval(secs => $5::integer) RETURNING d.dispatch_id, d.job_id, d.msg_ids), "
	"prune AS (DELETE FROM %1$s.dispatch WHERE dispatch_id IN (SELECT p.dispatch_id FROM "
	"%1$s.dispatch p WHERE p.read_at < now() - make_interval(days => $4::integer) "
	"AND NOT EXISTS (SELECT 1 FROM %1$s.lease l WHERE l.dispatch_id = p.dispatch_id) "
	"LIMIT " PGMQD_STR(
		LEDGER_PRUNE_BATCH) ") RETURNING 1) "
				    "SELECT 'unknown', dispatch_id::text, msg_ids::text, NULL FROM lost "
				    "UNION ALL SELECT 'undeleted', done.dispatch_id::text, x.ids::text, done.job_id FROM done, "
				    "LATERAL (SELECT array_agg(q.msg_id ORDER BY q.msg_id) AS ids FROM %2$s q "
				    "WHERE q.msg_id = ANY (done.msg_ids)) x WHERE x.ids IS NOT NULL "
				    "UNION ALL SELECT 'pruned', NULL, (SELECT count(*) FROM prune)::text, NULL";

/* Takes expired leases of accepted jobs. $1 owner, $2 lease_s, $3 queue,
 * $4 endpoint. Rows: dispatch id, job id, msg ids, seconds of vt left,
 * seconds since /run accepted the job (the history's `accepted`). */
const char LEDGER_CLAIM_SQL[] =
	"UPDATE %1$s.lease l SET owner = $1::uuid, lease_until = now() + make_interval(secs => "
	"$2::integer) FROM %1$s.dispatch d WHERE d.dispatch_id = l.dispatch_id "
	"AND l.dispatch_id IN (SELECT dispatch_id FROM %1$s.lease WHERE job_id IS NOT NULL "
	"AND lease_until < now() AND queue = $3::text AND endpoint_id = $4::text "
	"AND NOT EXISTS (SELECT 1 FROM %1$s.dispatch c WHERE c.dispatch_id = lease.dispatch_id "
	"AND c.state = 'COMPLETED') "
	"ORDER BY lease_until LIMIT " PGMQD_STR(
		LEDGER_CLAIM_BATCH) " FOR UPDATE SKIP LOCKED) "
				    "RETURNING l.dispatch_id::text, l.job_id, d.msg_ids::text, "
				    "extract(epoch FROM d.vt_until - now())::float8, "
				    "extract(epoch FROM now() - coalesce((SELECT min((h->>'at')::timestamptz) "
				    "FROM jsonb_array_elements(d.history) h WHERE h->>'state' = 'accepted'), "
				    "d.read_at))::float8";

void ledger_new_id(char *out)
{
	unsigned char b[16];
	size_t got = 0;

	while (got < sizeof(b)) {
		ssize_t r = getrandom(b + got, sizeof(b) - got, 0);
		if (r <= 0) { /* no entropy source: fall back, still unique enough per process */
			for (; got < sizeof(b); got++)
				b[got] = (unsigned char)random();
			break;
		}
		got += (size_t)r;
	}
	b[6] = (unsigned char)((b[6] & 0x0f) | 0x40);
	b[8] = (unsigned char)((b[8] & 0x3f) | 0x80);
	snprintf(out, LEDGER_ID_LEN + 1,
		 "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0], b[1],
		 b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14],
		 b[15]);
}

int ledger_read_sql(const char *schema, const char *read_function, char *buf, size_t len)
{
	int n = snprintf(buf, len, LEDGER_READ_SQL, schema, read_function);

	return n < 0 || (size_t)n >= len ? -1 : 0;
}

int ledger_array_elem(char *buf, size_t cap, size_t *used, const char *s, size_t max)
{
	size_t u = *used;

	if (u > 0 && buf[u - 1] != '{') {
		if (u + 1 >= cap)
			return -1;
		buf[u++] = ',';
	}
	if (s == NULL) {
		if (u + 5 >= cap)
			return -1;
		memcpy(buf + u, "NULL", 4);
		*used = u + 4;
		buf[*used] = '\0';
		return 0;
	}
	if (u + 1 >= cap)
		return -1;
	buf[u++] = '"';
	for (size_t i = 0; i < max && s[i]; i++) {
		unsigned char c = (unsigned char)s[i];
		if (u + 3 >= cap)
			return -1;
		if (c == '"' || c == '\\')
			buf[u++] = '\\';
		buf[u++] = c >= 0x20 && c < 0x7f ? (char)c : '?';
	}
	if (u + 2 >= cap)
		return -1;
	buf[u++] = '"';
	buf[u] = '\0';
	*used = u;
	return 0;
}

/* "{1,2,3}" → ids; returns the count, -1 when out of memory. */
int ledger_parse_ids(const char *s, long long **out)
{
	int n = 1, k = 0;
	long long *ids;

	for (const char *p = s; *p; p++)
		n += *p == ',';
	ids = malloc((size_t)n * sizeof(*ids));
	if (ids == NULL)
		return -1;
	for (const char *p = s; *p;) {
		char *end;
		long long v;
		while (*p == '{' || *p == ',' || *p == '}')
			p++;
		if (*p == '\0')
			break;
		v = strtoll(p, &end, 10);
		if (end == p) {
			p++;
			continue;
		}
		ids[k++] = v;
		p = end;
	}
	*out = ids;
	return k;
}
