/* ledger_cli — see include/ledger_cli.h. */
#include "ledger_cli.h"
#include "ledger.h"
#include "migrate.h"
#include "pgmq.h"

#include <cjson/cJSON.h>
#include <ctype.h>
#include <getopt.h>
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sysexits.h>

#define MAX_IDS 1000 /* msg ids one command takes */

bool ledger_cli_known(const char *name)
{
	return strcmp(name, "migrate") == 0 || strcmp(name, "status") == 0 ||
	       strcmp(name, "jobs") == 0 || strcmp(name, "redrive") == 0;
}

long ledger_cli_span_s(const char *s)
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

void ledger_cli_ago(double seconds, char *buf, size_t len)
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

static PGconn *connect_db(const struct config *cfg, const char *cmd)
{
	PGconn *conn = PQconnectdb(cfg->conninfo);
	char line[1024];

	if (PQstatus(conn) != CONNECTION_OK) {
		migrate_explain(cfg->ledger_schema, "", PQerrorMessage(conn), line, sizeof(line));
		fprintf(stderr, "pgmq-dispatcher %s: cannot connect: %s\n", cmd, line);
		PQfinish(conn);
		return NULL;
	}
	return conn;
}

static int fail(const char *cmd, PGresult *res)
{
	char line[1024];
	const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);

	migrate_explain("", state ? state : "", PQresultErrorMessage(res), line, sizeof(line));
	fprintf(stderr, "pgmq-dispatcher %s: %s\n", cmd, line);
	PQclear(res);
	return EX_UNAVAILABLE;
}

/* "{1,2}" from argv, all validated; -1 with one line on stderr. */
static int ids_param(const char *cmd, int argc, char **argv, char *buf, size_t len, int *n)
{
	size_t used = 1;

	memcpy(buf, "{", 2);
	*n = 0;
	for (int i = 0; i < argc; i++) {
		char *end;
		long long v = strtoll(argv[i], &end, 10);
		if (*argv[i] == '\0' || *end != '\0' || v < 1) {
			fprintf(stderr, "pgmq-dispatcher %s: '%s' is not a msg_id\n", cmd, argv[i]);
			return -1;
		}
		if (*n == MAX_IDS || used + 24 >= len) {
			fprintf(stderr, "pgmq-dispatcher %s: at most %d msg ids\n", cmd, MAX_IDS);
			return -1;
		}
		used += (size_t)snprintf(buf + used, len - used, "%s%lld", *n ? "," : "", v);
		(*n)++;
	}
	snprintf(buf + used, len - used, "}");
	return 0;
}

/* Prints a result as JSON (an array of objects, JSON columns embedded) or
 * as an aligned table; columns named in ago are epoch seconds shown as
 * relative times. */
static void print_result(PGresult *res, bool json, const char *const *ago, double now)
{
	int rows = PQntuples(res), cols = PQnfields(res);
	int width[32] = { 0 };
	char tmp[32];

	if (cols > 32)
		cols = 32;
	if (json) {
		cJSON *arr = cJSON_CreateArray();
		char *text;
		for (int i = 0; i < rows; i++) {
			cJSON *o = cJSON_CreateObject();
			for (int c = 0; c < cols; c++) {
				const char *name = PQfname(res, c), *v = PQgetvalue(res, i, c);
				Oid type = PQftype(res, c);
				cJSON *item = NULL;
				if (PQgetisnull(res, i, c)) {
					item = cJSON_CreateNull();
				} else if (type == 1016 ||
					   type == 1007) { /* int8[], int4[]: {1,2} → [1,2] */
					char *t = strdup(v);
					if (t && strlen(t) >= 2) {
						t[0] = '[';
						t[strlen(t) - 1] = ']';
						item = cJSON_Parse(t);
					}
					free(t);
				} else if (type == 114 || type == 3802 || type == 20 ||
					   type == 23 || type == 701) { /* json, jsonb, numbers */
					item = cJSON_Parse(v);
				}
				if (item == NULL)
					item = cJSON_CreateString(v);
				cJSON_AddItemToObject(o, name, item);
			}
			cJSON_AddItemToArray(arr, o);
		}
		text = cJSON_Print(arr);
		if (text)
			printf("%s\n", text);
		free(text);
		cJSON_Delete(arr);
		return;
	}
	for (int c = 0; c < cols; c++) {
		width[c] = (int)strlen(PQfname(res, c));
		for (int i = 0; i < rows; i++) {
			int w = PQgetlength(res, i, c);
			for (const char *const *a = ago; *a; a++)
				if (strcmp(*a, PQfname(res, c)) == 0)
					w = 8;
			if (w > width[c])
				width[c] = w > 60 ? 60 : w;
		}
	}
	for (int c = 0; c < cols; c++) {
		char up[64];
		snprintf(up, sizeof(up), "%s", PQfname(res, c));
		for (char *p = up; *p; p++)
			*p = (char)toupper((unsigned char)*p);
		printf("%-*s%s", width[c], up, c + 1 < cols ? "  " : "\n");
	}
	for (int i = 0; i < rows; i++)
		for (int c = 0; c < cols; c++) {
			const char *v = PQgetisnull(res, i, c) ? "-" : PQgetvalue(res, i, c);
			for (const char *const *a = ago; *a; a++)
				if (strcmp(*a, PQfname(res, c)) == 0 && !PQgetisnull(res, i, c)) {
					char age[16];
					ledger_cli_ago(now - strtod(v, NULL), age, sizeof(age));
					snprintf(tmp, sizeof(tmp), "%s ago", age);
					v = tmp;
				}
			printf("%-*.*s%s", width[c], 60, v, c + 1 < cols ? "  " : "\n");
		}
	if (rows == 0)
		printf("(none)\n");
}

static double db_now(PGconn *conn)
{
	PGresult *r = PQexec(conn, "SELECT extract(epoch FROM now())::float8");
	double now = PQresultStatus(r) == PGRES_TUPLES_OK ? strtod(PQgetvalue(r, 0, 0), NULL) : 0;

	PQclear(r);
	return now;
}

/* The queue and archive tables, quoted, into q and a. */
static int tables(PGconn *conn, const char *queue, char *q, char *a, size_t len)
{
	char t[80];
	char *e;

	if (pgmq_table_name(queue, t, sizeof(t)) != 0)
		return -1;
	e = PQescapeIdentifier(conn, t, strlen(t));
	snprintf(q, len, "pgmq.%s", e ? e : "");
	PQfreemem(e);
	t[0] = 'a';
	e = PQescapeIdentifier(conn, t, strlen(t));
	snprintf(a, len, "pgmq.%s", e ? e : "");
	PQfreemem(e);
	return 0;
}

static const char *const AGO_COLS[] = { "read", "updated", "archived", NULL };

static int cmd_status(const struct config *cfg, PGconn *conn, bool json, int argc, char **argv)
{
	char ids[MAX_IDS * 22 + 4], q[160], a[160], sql[3072];
	const char *params[1] = { ids };
	PGresult *res;
	int n;

	if (argc < 1) {
		fprintf(stderr, "pgmq-dispatcher status: give one or more msg ids\n");
		return EX_USAGE;
	}
	if (ids_param("status", argc, argv, ids, sizeof(ids), &n) != 0)
		return EX_USAGE;
	if (tables(conn, cfg->queue_name, q, a, sizeof(q)) != 0)
		return EX_USAGE;
	snprintf(sql, sizeof(sql),
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
		 "ORDER BY m.ord, d.read_at NULLS FIRST",
		 q, a, cfg->ledger_schema);
	res = PQexecParams(conn, sql, 1, NULL, params, NULL, NULL, 0);
	if (PQresultStatus(res) != PGRES_TUPLES_OK)
		return fail("status", res);
	if (!json) {
		/* The table leaves out the long columns; --json has them. */
		PGresult *brief;
		char sql2[3400];
		snprintf(sql2, sizeof(sql2),
			 "SELECT msg_id, now_in, dispatch_id, read, read_ct, state, job_id, http, "
			 "updated, states FROM (%s) s",
			 sql);
		brief = PQexecParams(conn, sql2, 1, NULL, params, NULL, NULL, 0);
		PQclear(res);
		if (PQresultStatus(brief) != PGRES_TUPLES_OK)
			return fail("status", brief);
		res = brief;
	}
	print_result(res, json, AGO_COLS, db_now(conn));
	PQclear(res);
	return 0;
}

static int cmd_jobs(const struct config *cfg, PGconn *conn, bool json, int argc, char **argv)
{
	static const struct option opts[] = {
		{ "state", required_argument, NULL, 's' },
		{ "since", required_argument, NULL, 'S' },
		{ "limit", required_argument, NULL, 'l' },
		{ NULL, 0, NULL, 0 },
	};
	const char *state = NULL, *since = NULL;
	char span[32], limit[16] = "100", sql[1536];
	const char *params[5] = { cfg->queue_name, NULL, NULL, NULL, limit };
	PGresult *res;
	int opt;

	optind = 1;
	while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (opt) {
		case 's':
			state = optarg;
			break;
		case 'S':
			since = optarg;
			break;
		case 'l':
			if (atoi(optarg) < 1 || atoi(optarg) > 100000) {
				fprintf(stderr,
					"pgmq-dispatcher jobs: --limit takes 1 to 100000\n");
				return EX_USAGE;
			}
			snprintf(limit, sizeof(limit), "%d", atoi(optarg));
			break;
		default:
			fprintf(stderr,
				"usage: pgmq-dispatcher jobs [--state S] [--since 15m|TIME] "
				"[--limit N] [--json]\n");
			return EX_USAGE;
		}
	}
	params[1] = state;
	if (since && ledger_cli_span_s(since) >= 0) {
		snprintf(span, sizeof(span), "%ld seconds", ledger_cli_span_s(since));
		params[3] = span;
	} else {
		params[2] = since;
	}
	snprintf(
		sql, sizeof(sql),
		"SELECT dispatch_id::text AS dispatch_id, extract(epoch FROM read_at)::float8 AS read, "
		"state, job_id, cardinality(msg_ids) AS messages, msg_ids[1] AS first_msg_id, "
		"http_status AS http, extract(epoch FROM updated_at)::float8 AS updated, error "
		"FROM %s.dispatch WHERE queue = $1 AND ($2::text IS NULL OR state = $2) "
		"AND ($3::timestamptz IS NULL OR read_at >= $3::timestamptz) "
		"AND ($4::interval IS NULL OR read_at >= now() - $4::interval) "
		"ORDER BY read_at DESC LIMIT $5::integer",
		cfg->ledger_schema);
	res = PQexecParams(conn, sql, 5, NULL, params, NULL, NULL, 0);
	if (PQresultStatus(res) != PGRES_TUPLES_OK)
		return fail("jobs", res);
	print_result(res, json, AGO_COLS, db_now(conn));
	PQclear(res);
	return 0;
}

/* Moves one archived message back into the queue, visible now with
 * read_ct 0, and records it; one statement, so one transaction. */
static int redrive_one(const struct config *cfg, PGconn *conn, const char *q, const char *a,
		       const char *msg_id, bool *moved)
{
	char sql[2048], id[LEDGER_ID_LEN + 1];
	const char *params[4] = { msg_id, id, cfg->queue_name, cfg->endpoint_id };
	PGresult *res;

	ledger_new_id(id);
	snprintf(
		sql, sizeof(sql),
		"WITH a AS (DELETE FROM %s WHERE msg_id = $1::bigint RETURNING *), "
		"q AS (INSERT INTO %s (msg_id, read_ct, enqueued_at, vt, message) "
		"OVERRIDING SYSTEM VALUE SELECT msg_id, 0, enqueued_at, clock_timestamp(), message "
		"FROM a RETURNING msg_id), "
		"l AS (INSERT INTO %s.dispatch (dispatch_id, queue, endpoint_id, msg_ids, read_cts, "
		"read_at, vt_until, state, history) SELECT $2::uuid, $3, $4, ARRAY[a.msg_id], "
		"ARRAY[a.read_ct], now(), now(), 'redriven', jsonb_build_array(jsonb_build_object("
		"'state', 'redriven', 'at', now(), 'archived_at', a.archived_at)) FROM a) "
		"SELECT msg_id FROM q",
		a, q, cfg->ledger_schema);
	res = PQexecParams(conn, sql, 4, NULL, params, NULL, NULL, 0);
	if (PQresultStatus(res) != PGRES_TUPLES_OK)
		return fail("redrive", res);
	*moved = PQntuples(res) == 1;
	PQclear(res);
	return 0;
}

static int cmd_redrive(const struct config *cfg, PGconn *conn, bool json, int argc, char **argv)
{
	static const struct option opts[] = {
		{ "dry-run", no_argument, NULL, 'n' },
		{ "archived-from", required_argument, NULL, 'f' },
		{ "archived-to", required_argument, NULL, 't' },
		{ NULL, 0, NULL, 0 },
	};
	const char *from = NULL, *to = NULL;
	char ids[MAX_IDS * 22 + 4], q[160], a[160], sql[1024];
	const char *params[3] = { ids, NULL, NULL };
	bool dry = false;
	int opt, n = 0, moved = 0, rc = 0;
	PGresult *res;

	optind = 1;
	while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		if (opt == 'n')
			dry = true;
		else if (opt == 'f')
			from = optarg;
		else if (opt == 't')
			to = optarg;
		else
			goto usage;
	}
	if ((optind < argc) == (from != NULL || to != NULL))
		goto usage;
	if (optind < argc) {
		if (ids_param("redrive", argc - optind, argv + optind, ids, sizeof(ids), &n) != 0)
			return EX_USAGE;
		params[0] = ids;
	} else {
		params[0] = NULL;
	}
	params[1] = from;
	params[2] = to;
	if (tables(conn, cfg->queue_name, q, a, sizeof(q)) != 0)
		return EX_USAGE;
	snprintf(
		sql, sizeof(sql),
		"SELECT msg_id, read_ct, extract(epoch FROM archived_at)::float8 AS archived FROM %s "
		"WHERE ($1::bigint[] IS NULL OR msg_id = ANY ($1::bigint[])) "
		"AND ($2::timestamptz IS NULL OR archived_at >= $2::timestamptz) "
		"AND ($3::timestamptz IS NULL OR archived_at < $3::timestamptz) "
		"ORDER BY msg_id LIMIT "
		"1000",
		a);
	res = PQexecParams(conn, sql, 3, NULL, params, NULL, NULL, 0);
	if (PQresultStatus(res) != PGRES_TUPLES_OK)
		return fail("redrive", res);
	if (dry) {
		if (!json)
			printf("would redrive %d archived message(s) of queue %s:\n",
			       PQntuples(res), cfg->queue_name);
		print_result(res, json, AGO_COLS, db_now(conn));
		PQclear(res);
		return 0;
	}
	for (int i = 0; i < PQntuples(res) && rc == 0; i++) {
		bool ok = false;
		rc = redrive_one(cfg, conn, q, a, PQgetvalue(res, i, 0), &ok);
		if (rc == 0 && ok) {
			moved++;
			if (!json)
				printf("redriven msg_id %s (was read %s times)\n",
				       PQgetvalue(res, i, 0), PQgetvalue(res, i, 1));
		}
	}
	if (json)
		printf("{\"redriven\": %d, \"found\": %d}\n", moved, PQntuples(res));
	else
		printf("%d message(s) redriven to queue %s\n", moved, cfg->queue_name);
	PQclear(res);
	return rc;
usage:
	fprintf(stderr, "usage: pgmq-dispatcher redrive [--dry-run] [--json] (MSG_ID... | "
			"--archived-from TIME [--archived-to TIME])\n");
	return EX_USAGE;
}

int ledger_cli_main(const struct config *cfg, const char *command, int argc, char **argv)
{
	int (*fn)(const struct config *, PGconn *, bool, int,
		  char **) = strcmp(command, "status") == 0 ? cmd_status
			     : strcmp(command, "jobs") == 0 ? cmd_jobs
							    : cmd_redrive;
	bool json = false;
	int rest = 0, rc;
	PGconn *conn;
	char **args;

	if (strcmp(command, "migrate") == 0)
		return migrate_main(cfg, argc, argv);
	/* --json anywhere; the rest goes to the command (argv[0] kept). */
	args = calloc((size_t)argc + 1, sizeof(*args));
	if (args == NULL)
		return EX_OSERR;
	for (int i = 0; i < argc; i++) {
		if (strcmp(argv[i], "--json") == 0)
			json = true;
		else
			args[rest++] = argv[i];
	}
	conn = connect_db(cfg, command);
	if (conn == NULL) {
		free(args);
		return EX_UNAVAILABLE;
	}
	if (fn == cmd_status)
		rc = fn(cfg, conn, json, rest - 1, args + 1);
	else
		rc = fn(cfg, conn, json, rest, args);
	PQfinish(conn);
	free(args);
	return rc;
}
