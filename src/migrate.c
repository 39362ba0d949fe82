/* migrate — see include/migrate.h. */
#include "migrate.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sysexits.h>

/* Version 1: the dispatch table and its msg-id index. A GIN index on the
 * bigint[] keeps one index insert per dispatch (its pending list takes
 * the entries), where a child table would take one row and one btree
 * entry per message. No index is on a column that changes after the
 * insert, and pages keep room (fillfactor), so transitions are HOT. */
static const char V1[] =
	"CREATE SCHEMA IF NOT EXISTS @S@;"
	"CREATE TABLE IF NOT EXISTS @S@.schema_version (version integer NOT NULL);"
	"INSERT INTO @S@.schema_version SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM @S@.schema_version);"
	"CREATE TABLE @S@.dispatch ("
	" dispatch_id uuid PRIMARY KEY,"
	" queue text NOT NULL,"
	" endpoint_id text NOT NULL,"
	" msg_ids bigint[] NOT NULL,"
	" read_cts integer[] NOT NULL,"
	" read_at timestamptz NOT NULL,"
	" vt_until timestamptz NOT NULL,"
	" state text NOT NULL,"
	" http_status integer,"
	" job_id text,"
	" error text,"
	" updated_at timestamptz NOT NULL DEFAULT now(),"
	" history jsonb NOT NULL DEFAULT '[]') WITH (fillfactor = 70);"
	"CREATE INDEX dispatch_msg_ids ON @S@.dispatch USING gin (msg_ids);"
	"CREATE INDEX dispatch_read_at ON @S@.dispatch (read_at);";

/* Version 2: leases, one row per unfinished dispatch, by which one replica
 * at a time holds a row it is sending or a job it follows. */
static const char V2[] = "CREATE TABLE @S@.lease ("
			 " dispatch_id uuid PRIMARY KEY,"
			 " queue text NOT NULL,"
			 " endpoint_id text NOT NULL,"
			 " owner uuid NOT NULL,"
			 " lease_until timestamptz NOT NULL,"
			 " job_id text);"
			 "CREATE INDEX lease_until ON @S@.lease (lease_until);";

/* Version 3: the PostgreSQL session (backend pid, and since when it holds
 * the lease) of the replica holding a lease, so that a replica starting
 * up sees at once that the one which left rows `sending` is dead (its
 * session is gone) instead of waiting for the lease to run out. NULL for
 * leases written by an older build: those wait for lease_until. */
static const char V3[] = "ALTER TABLE @S@.lease ADD COLUMN pid integer,"
			 " ADD COLUMN since timestamptz;";

/* Version 4: the fleet's shared rate caps (budget.h). One row per endpoint
 * and kind ("run", "status") that a grant locks, so that grants are made
 * one at a time; the grants of the counted span (window + margin +
 * validity), pruned by each grant; and the one function a grant calls.
 * The function takes clock_timestamp() after the lock: the database's
 * clock, in the order the grants were made. Its arithmetic is
 * budget_grant_size's. p_spent: requests the caller sent without a grant
 * (its fallback while the database could not be asked), counted from now
 * as a grant of its own, later than they were sent: never less. */
static const char V4[] =
	"CREATE TABLE @S@.budget (endpoint_id text NOT NULL, kind text NOT NULL,"
	" PRIMARY KEY (endpoint_id, kind));"
	"CREATE TABLE @S@.budget_grant (endpoint_id text NOT NULL, kind text NOT NULL,"
	" owner uuid NOT NULL, granted_at timestamptz NOT NULL, slots integer NOT NULL);"
	"CREATE INDEX budget_grant_at ON @S@.budget_grant (endpoint_id, kind, granted_at);"
	"CREATE FUNCTION @S@.budget_take(p_endpoint text, p_kind text, p_owner uuid,"
	" p_cap integer, p_count_s double precision, p_want integer, p_max integer,"
	" p_spent integer DEFAULT 0, OUT slots integer, OUT retry_s double precision, OUT active integer)"
	" LANGUAGE plpgsql AS $budget$ DECLARE t timestamptz; used integer; oldest timestamptz;"
	" free integer; BEGIN"
	" INSERT INTO @S@.budget VALUES (p_endpoint, p_kind) ON CONFLICT DO NOTHING;"
	" PERFORM 1 FROM @S@.budget b WHERE b.endpoint_id = p_endpoint AND b.kind = p_kind"
	" FOR UPDATE;"
	" t := clock_timestamp();"
	" DELETE FROM @S@.budget_grant g WHERE g.endpoint_id = p_endpoint AND g.kind = p_kind"
	" AND g.granted_at <= t - make_interval(secs => p_count_s);"
	" IF p_spent > 0 THEN INSERT INTO @S@.budget_grant VALUES (p_endpoint, p_kind, p_owner, t,"
	" p_spent); END IF;"
	" SELECT coalesce(sum(g.slots), 0)::integer,"
	" count(DISTINCT g.owner) FILTER (WHERE g.owner <> p_owner)::integer + 1,"
	" min(g.granted_at) INTO used, active, oldest FROM @S@.budget_grant g"
	" WHERE g.endpoint_id = p_endpoint AND g.kind = p_kind;"
	" free := greatest(p_cap - used, 0);"
	" slots := CASE WHEN free < 1 OR p_want < 1 THEN 0 ELSE least(p_want, p_max, free,"
	" (free + active - 1) / active) END;"
	" IF slots > 0 THEN INSERT INTO @S@.budget_grant VALUES (p_endpoint, p_kind, p_owner, t,"
	" slots); retry_s := 0;"
	" ELSE retry_s := greatest(extract(epoch FROM oldest - clock_timestamp())"
	" + p_count_s, 0); END IF;"
	" END $budget$;";

/* Version 5: the runtime control state of each route (pause, drain; see
 * control.c), so that a pause outlasts a reload and a restart. IF NOT
 * EXISTS: builds before this migration created the same table themselves. */
static const char V5[] = "CREATE TABLE IF NOT EXISTS @S@.route_control ("
			 " route text NOT NULL,"
			 " queue_name text NOT NULL,"
			 " state text NOT NULL,"
			 " changed_at timestamptz NOT NULL DEFAULT now(),"
			 " PRIMARY KEY (route, queue_name));";

static const char HEAD[] =
	"DO $pgmqd_migrate$ DECLARE v integer := 0; BEGIN "
	"PERFORM pg_advisory_xact_lock(hashtext('pgmq_dispatcher.migrate.@S@')); "
	/* pg_class read by a query, not to_regclass: the lock above does not
	 * refresh the catalog cache, so to_regclass could miss the tables a
	 * replica or route that held the lock just before made. */
	"IF EXISTS (SELECT 1 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n "
	"ON n.oid = c.relnamespace WHERE n.nspname = lower('@S@') AND c.relname = 'schema_version') "
	"THEN "
	"EXECUTE 'SELECT max(version) FROM @S@.schema_version' INTO v; v := coalesce(v, 0); END IF; "
	"IF v > @T@ THEN RAISE EXCEPTION USING ERRCODE = '" MIGRATE_SQLSTATE_NEWER "', "
	"MESSAGE = format('ledger schema @S@ is at version %s, newer than version @T@ that this "
	"pgmq-dispatcher knows: upgrade pgmq-dispatcher', v); END IF; ";

/* Appends s with @S@ → schema and @T@ → target. */
static char *append(char *out, size_t *len, const char *s, const char *schema, const char *target)
{
	for (; *s; s++) {
		const char *put = NULL;
		size_t n;

		if (s[0] == '@' && s[1] == 'S' && s[2] == '@')
			put = schema;
		else if (s[0] == '@' && s[1] == 'T' && s[2] == '@')
			put = target;
		n = put ? strlen(put) : 1;
		memcpy(out + *len, put ? put : s, n);
		*len += n;
		if (put)
			s += 2;
	}
	out[*len] = '\0';
	return out;
}

char *migrate_sql(const char *schema, int target)
{
	static const char *const steps[] = { V1, V2, V3, V4, V5 };
	char t[16], step[32];
	size_t cap = sizeof(HEAD) + sizeof(V1) + sizeof(V2) + sizeof(V3) + sizeof(V4) + sizeof(V5) +
		     512,
	       len = 0;
	char *out;

	if (target < 1 || target > MIGRATE_VERSION)
		return NULL;
	/* Each marker (three bytes at least) becomes at most strlen(schema). */
	cap += (cap / 3) * (strlen(schema) + 16);
	out = malloc(cap);
	if (out == NULL)
		return NULL;
	snprintf(t, sizeof(t), "%d", target);
	append(out, &len, HEAD, schema, t);
	for (int v = 1; v <= target; v++) {
		snprintf(step, sizeof(step), "IF v < %d THEN ", v);
		append(out, &len, step, schema, t);
		append(out, &len, steps[v - 1], schema, t);
		snprintf(step, sizeof(step), " END IF; ");
		append(out, &len, step, schema, t);
	}
	append(out, &len,
	       "IF v < @T@ THEN UPDATE @S@.schema_version SET version = @T@; END IF; "
	       "END $pgmqd_migrate$",
	       schema, t);
	return out;
}

int migrate_current(PGconn *conn, const char *schema, char *err, size_t errlen)
{
	char sql[256];
	PGresult *res;
	int v;

	snprintf(sql, sizeof(sql), "SELECT to_regclass('%s.schema_version') IS NOT NULL", schema);
	res = PQexec(conn, sql);
	if (PQresultStatus(res) != PGRES_TUPLES_OK) {
		snprintf(err, errlen, "%s", PQresultErrorMessage(res));
		PQclear(res);
		return -1;
	}
	v = strcmp(PQgetvalue(res, 0, 0), "t") == 0;
	PQclear(res);
	if (!v)
		return 0;
	snprintf(sql, sizeof(sql), "SELECT coalesce(max(version), 0) FROM %s.schema_version",
		 schema);
	res = PQexec(conn, sql);
	if (PQresultStatus(res) != PGRES_TUPLES_OK) {
		snprintf(err, errlen, "%s", PQresultErrorMessage(res));
		PQclear(res);
		return -1;
	}
	v = atoi(PQgetvalue(res, 0, 0));
	PQclear(res);
	return v;
}

void migrate_explain(const char *schema, const char *sqlstate, const char *message, char *buf,
		     size_t len)
{
	size_t n;

	if (strcmp(sqlstate, "42501") == 0)
		snprintf(
			buf, len,
			"this role may not create or change the ledger schema %s (%s): run "
			"`pgmq-dispatcher migrate` once as a role that may, or set ledger.enabled = off",
			schema, message);
	else
		snprintf(buf, len, "%s", message);
	/* One line. */
	n = strlen(buf);
	while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == ' '))
		buf[--n] = '\0';
	for (char *p = buf; *p; p++)
		if (*p == '\n')
			*p = ' ';
}

int migrate_main(const struct config *cfg, int argc, char **argv)
{
	static const struct option opts[] = {
		{ "target-version", required_argument, NULL, 't' },
		{ NULL, 0, NULL, 0 },
	};
	int target = MIGRATE_VERSION, opt, before, after;
	char err[512], line[1024];
	PGconn *conn;
	PGresult *res;
	char *sql;

	optind = 1;
	while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		if (opt != 't' || (target = atoi(optarg)) < 1 || target > MIGRATE_VERSION) {
			fprintf(stderr, "pgmq-dispatcher migrate: --target-version takes 1 to %d\n",
				MIGRATE_VERSION);
			return EX_USAGE;
		}
	}
	conn = PQconnectdb(cfg->conninfo);
	if (PQstatus(conn) != CONNECTION_OK) {
		migrate_explain(cfg->ledger_schema, "", PQerrorMessage(conn), line, sizeof(line));
		fprintf(stderr, "pgmq-dispatcher migrate: cannot connect: %s\n", line);
		PQfinish(conn);
		return EX_UNAVAILABLE;
	}
	before = migrate_current(conn, cfg->ledger_schema, err, sizeof(err));
	sql = migrate_sql(cfg->ledger_schema, target);
	res = sql ? PQexec(conn, sql) : NULL;
	free(sql);
	if (PQresultStatus(res) != PGRES_COMMAND_OK) {
		const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
		migrate_explain(cfg->ledger_schema, state ? state : "",
				res ? PQresultErrorMessage(res) : "out of memory", line,
				sizeof(line));
		/* state points into res: decided before PQclear. */
		int rc = state && strcmp(state, MIGRATE_SQLSTATE_NEWER) == 0 ? EX_CONFIG
									     : EX_UNAVAILABLE;
		fprintf(stderr, "pgmq-dispatcher migrate: %s\n", line);
		PQclear(res);
		PQfinish(conn);
		return rc;
	}
	PQclear(res);
	after = migrate_current(conn, cfg->ledger_schema, err, sizeof(err));
	PQfinish(conn);
	if (before == after)
		printf("ledger schema %s: version %d, up to date\n", cfg->ledger_schema, after);
	else
		printf("ledger schema %s: version %d (was %d)\n", cfg->ledger_schema, after,
		       before);
	return 0;
}
