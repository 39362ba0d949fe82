/* ledger_cli — see include/ledger_cli.h. */
#include "ledger_cli.h"
#include "ledger.h"
#include "ledger_view.h"
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

#define MAX_IDS 1000           /* msg ids one command takes */
#define MAX_STATUS_ROWS 100000 /* dispatches `status` prints */
#define MAX_JOBS_ROWS 100000   /* dispatches `jobs --limit` may ask for */

bool ledger_cli_known(const char *name)
{
	return strcmp(name, "migrate") == 0 || strcmp(name, "status") == 0 ||
	       strcmp(name, "jobs") == 0 || strcmp(name, "redrive") == 0;
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
static int ids_param(const char *cmd, int argc, char **argv, char *buf, size_t len)
{
	char why[96];

	if (ledger_view_ids((const char *const *)argv, argc, MAX_IDS, buf, len, why, sizeof(why)) !=
	    0) {
		fprintf(stderr, "pgmq-dispatcher %s: %s\n", cmd, why);
		return -1;
	}
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
		cJSON *arr = ledger_view_json(res);
		char *text = arr ? cJSON_Print(arr) : NULL;
		if (text)
			printf("%s\n", text);
		else
			fprintf(stderr, "pgmq-dispatcher: out of memory\n");
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
					ledger_view_ago(now - strtod(v, NULL), age, sizeof(age));
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

static int cmd_status(const struct config *cfg, PGconn *conn, bool json, int argc, char **argv)
{
	char ids[MAX_IDS * LEDGER_VIEW_ID_BYTES + 4], rows[16], sql[LEDGER_VIEW_SQL_BYTES];
	const char *params[2] = { ids, rows };
	PGresult *res;

	if (argc < 1) {
		fprintf(stderr, "pgmq-dispatcher status: give one or more msg ids\n");
		return EX_USAGE;
	}
	if (ids_param("status", argc, argv, ids, sizeof(ids)) != 0)
		return EX_USAGE;
	if (ledger_view_status_sql(cfg->ledger_schema, cfg->queue_name, !json, sql, sizeof(sql)) !=
	    0)
		return EX_USAGE;
	snprintf(rows, sizeof(rows), "%d", MAX_STATUS_ROWS);
	res = PQexecParams(conn, sql, 2, NULL, params, NULL, NULL, 0);
	if (PQresultStatus(res) != PGRES_TUPLES_OK)
		return fail("status", res);
	print_result(res, json, LEDGER_VIEW_AGO_COLS, db_now(conn));
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
	char span[32], limit[16], sql[LEDGER_VIEW_SQL_BYTES];
	const char *params[5] = { cfg->queue_name, NULL, NULL, NULL, limit };
	int opt;
	PGresult *res;

	snprintf(limit, sizeof(limit), "%d", LEDGER_VIEW_JOBS_DEFAULT);
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
			if (ledger_view_limit(optarg, MAX_JOBS_ROWS) < 0) {
				fprintf(stderr, "pgmq-dispatcher jobs: --limit takes 1 to %d\n",
					MAX_JOBS_ROWS);
				return EX_USAGE;
			}
			snprintf(limit, sizeof(limit), "%s", optarg);
			break;
		default:
			fprintf(stderr,
				"usage: pgmq-dispatcher jobs [--state S] [--since 15m|TIME] "
				"[--limit N] [--json]\n");
			return EX_USAGE;
		}
	}
	params[1] = state;
	ledger_view_since(since, span, sizeof(span), &params[2]);
	params[3] = span[0] ? span : NULL;
	if (ledger_view_jobs_sql(cfg->ledger_schema, sql, sizeof(sql)) != 0)
		return EX_SOFTWARE;
	res = PQexecParams(conn, sql, 5, NULL, params, NULL, NULL, 0);
	if (PQresultStatus(res) != PGRES_TUPLES_OK)
		return fail("jobs", res);
	print_result(res, json, LEDGER_VIEW_AGO_COLS, db_now(conn));
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
	char ids[MAX_IDS * LEDGER_VIEW_ID_BYTES + 4], q[220], a[220], sql[1024];
	const char *params[3] = { ids, NULL, NULL };
	bool dry = false;
	int opt, moved = 0, rc = 0;
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
		if (ids_param("redrive", argc - optind, argv + optind, ids, sizeof(ids)) != 0)
			return EX_USAGE;
		params[0] = ids;
	} else {
		params[0] = NULL;
	}
	params[1] = from;
	params[2] = to;
	if (ledger_view_tables(cfg->queue_name, q, a, sizeof(q)) != 0)
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
		print_result(res, json, LEDGER_VIEW_AGO_COLS, db_now(conn));
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
