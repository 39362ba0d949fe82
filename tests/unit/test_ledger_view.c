/* Unit tests for what `status`/`jobs` and GET /dispatches share
 * (ledger_view.c) and for /dispatches' answers that need no database
 * (dispatches.c): argument checks, the statements, rows as JSON, 400s
 * naming the parameter, 404 with the ledger off (issue 12). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "dispatches.h"
#include "ledger_view.h"

#define N(a) (sizeof(a) / sizeof((a)[0]))

static void ids(void **state)
{
	const char *good[] = { "1", "42", "9223372036854775807" };
	const char *bad[][1] = {
		{ "" }, { "0" }, { "-3" }, { "1x" }, { " 1" }, { "+1" }, { "abc" }
	};
	char buf[256], why[96];

	assert_int_equal(ledger_view_ids(good, 3, 10, buf, sizeof(buf), why, sizeof(why)), 0);
	assert_string_equal(buf, "{1,42,9223372036854775807}");
	assert_int_equal(ledger_view_ids(good, 0, 10, buf, sizeof(buf), why, sizeof(why)), 0);
	assert_string_equal(buf, "{}");
	assert_int_equal(ledger_view_ids(good, 3, 2, buf, sizeof(buf), why, sizeof(why)), -1);
	assert_string_equal(why, "at most 2 msg ids");
	for (size_t i = 0; i < N(bad); i++) {
		assert_int_equal(ledger_view_ids(bad[i], 1, 10, buf, sizeof(buf), why, sizeof(why)),
				 -1);
		assert_non_null(strstr(why, "is not a msg_id"));
	}
}

static void limits_states_since(void **state)
{
	char span[32];
	const char *ts;

	assert_int_equal(ledger_view_limit("1", 1000), 1);
	assert_int_equal(ledger_view_limit("1000", 1000), 1000);
	assert_int_equal(ledger_view_limit("1001", 1000), -1);
	assert_int_equal(ledger_view_limit("0", 1000), -1);
	assert_int_equal(ledger_view_limit("-1", 1000), -1);
	assert_int_equal(ledger_view_limit("5x", 1000), -1);
	assert_int_equal(ledger_view_limit("", 1000), -1);
	assert_true(ledger_view_state_ok("accepted"));
	assert_true(ledger_view_state_ok("TIMED_OUT"));
	assert_false(ledger_view_state_ok(""));
	assert_false(ledger_view_state_ok("a;b"));
	assert_false(ledger_view_state_ok("a b"));
	assert_false(ledger_view_state_ok("x23456789012345678901234567890123"));
	ledger_view_since("15m", span, sizeof(span), &ts);
	assert_string_equal(span, "900 seconds");
	assert_null(ts);
	ledger_view_since("2026-12-01 10:00", span, sizeof(span), &ts);
	assert_string_equal(span, "");
	assert_string_equal(ts, "2026-12-01 10:00");
	ledger_view_since(NULL, span, sizeof(span), &ts);
	assert_string_equal(span, "");
	assert_null(ts);
}

static void statements(void **state)
{
	char sql[LEDGER_VIEW_SQL_BYTES];

	assert_int_equal(ledger_view_status_sql("pgmq_dispatcher", "Jobs", false, sql, sizeof(sql)),
			 0);
	assert_non_null(strstr(sql, "FROM pgmq.\"q_jobs\" WHERE"));
	assert_non_null(strstr(sql, "FROM pgmq.\"a_jobs\" WHERE"));
	assert_non_null(strstr(sql, "pgmq_dispatcher.dispatch d ON d.msg_ids @> ARRAY[m.id]"));
	assert_non_null(strstr(sql, "d.history, d.error"));
	assert_non_null(strstr(sql, "LIMIT $2::integer"));
	assert_int_equal(ledger_view_status_sql("pgmq_dispatcher", "jobs", true, sql, sizeof(sql)),
			 0);
	assert_true(strncmp(sql, "SELECT msg_id, now_in, dispatch_id, read, read_ct, state", 56) ==
		    0);
	assert_int_equal(ledger_view_status_sql("s", "jobs", false, sql, 100), -1);
	assert_int_equal(ledger_view_jobs_sql("pgmq_dispatcher", sql, sizeof(sql)), 0);
	assert_non_null(strstr(sql, "FROM pgmq_dispatcher.dispatch WHERE queue = $1"));
	assert_non_null(strstr(sql, "LIMIT $5::integer"));
}

static void rows_as_json(void **state)
{
	PGresult *res = PQmakeEmptyPGresult(NULL, PGRES_TUPLES_OK);
	PGresAttDesc cols[] = {
		{ .name = "msg_id", .typid = 20, .format = 0 },
		{ .name = "msg_ids", .typid = 1016, .format = 0 },
		{ .name = "history", .typid = 3802, .format = 0 },
		{ .name = "job_id", .typid = 25, .format = 0 },
	};
	cJSON *arr;
	char *text;

	assert_non_null(res);
	assert_int_equal(PQsetResultAttrs(res, 4, cols), 1);
	assert_int_equal(PQsetvalue(res, 0, 0, "4711", 4), 1);
	assert_int_equal(PQsetvalue(res, 0, 1, "{4711,4712}", 11), 1);
	assert_int_equal(PQsetvalue(res, 0, 2, "[{\"state\": \"sending\"}]", 22), 1);
	assert_int_equal(PQsetvalue(res, 0, 3, NULL, -1), 1);
	arr = ledger_view_json(res);
	text = cJSON_PrintUnformatted(arr);
	assert_string_equal(text, "[{\"msg_id\":4711,\"msg_ids\":[4711,4712],"
				  "\"history\":[{\"state\":\"sending\"}],\"job_id\":null}]");
	free(text);
	cJSON_Delete(arr);
	PQclear(res);
}

/* /dispatches answers that come before any statement. */
struct got {
	unsigned status;
	char body[512];
	int calls;
};

static void on_done(void *ctx, unsigned status, const char *type, char *body, size_t len)
{
	struct got *g = ctx;

	(void)type;
	g->status = status;
	snprintf(g->body, sizeof(g->body), "%.*s", (int)len, body ? body : "");
	g->calls++;
	free(body);
}

static struct got serve(struct dispatches *ds, const struct config *cfg, const char *query)
{
	const char *keys[16], *vals[16];
	char copy[1024], *save = NULL;
	int n = 0;
	struct got g = { 0 };

	snprintf(copy, sizeof(copy), "%s", query);
	for (char *kv = strtok_r(copy, "&", &save); kv && n < 16; kv = strtok_r(NULL, "&", &save)) {
		char *eq = strchr(kv, '=');
		keys[n] = kv;
		vals[n++] = eq ? (*eq = '\0', eq + 1) : NULL;
	}
	dispatches_serve(ds, cfg, keys, vals, n, on_done, &g);
	assert_int_equal(g.calls, 1); /* answered at once: no statement */
	return g;
}

static void bad_requests(void **state)
{
	static const struct {
		const char *query, *starts;
	} cases[] = {
		{ "msg_id=abc", "msg_id: 'abc' is not a msg_id\n" },
		{ "msg_id=", "msg_id: empty" },
		{ "msg_id", "msg_id: empty" },
		{ "msg_id=1,,2", "msg_id: '' is not a msg_id" },
		{ "msg_id=0", "msg_id: '0' is not a msg_id" },
		{ "msg_id=123456789012345678901", "msg_id: '123456789012345678901' is not" },
		{ "msg_id=1&limit=2", "msg_id: cannot be combined" },
		{ "limit=0", "limit: '0' is not a number from 1 to 1000" },
		{ "limit=1001", "limit: '1001' is not" },
		{ "state=a;b", "state: 'a;b' is not a state" },
		{ "state=A&state=B", "state: given twice" },
		{ "since=", "since: empty" },
		{ "colour=red", "unknown parameter 'colour'" },
	};
	struct dispatches *ds = dispatches_new(EV_DEFAULT);
	struct config cfg = { .conninfo = "",
			      .queue_name = "jobs",
			      .ledger_enabled = 1,
			      .ledger_schema = "pgmq_dispatcher" };
	char many[1024] = "msg_id=1";
	struct got g;

	for (size_t i = 0; i < N(cases); i++) {
		g = serve(ds, &cfg, cases[i].query);
		assert_int_equal(g.status, 400);
		if (strncmp(g.body, cases[i].starts, strlen(cases[i].starts)) != 0)
			fail_msg("%s: %s", cases[i].query, g.body);
		/* one line */
		assert_ptr_equal(strchr(g.body, '\n'), g.body + strlen(g.body) - 1);
	}
	for (int i = 2; i <= DISPATCHES_MAX_IDS + 1; i++)
		snprintf(many + strlen(many), sizeof(many) - strlen(many), ",%d", i);
	g = serve(ds, &cfg, many);
	assert_int_equal(g.status, 400);
	assert_string_equal(g.body, "msg_id: at most 100 msg ids\n");
	cfg.ledger_enabled = 0;
	g = serve(ds, &cfg, "msg_id=1");
	assert_int_equal(g.status, 404);
	assert_string_equal(g.body, "the dispatch ledger is off (ledger.enabled = off)\n");
	dispatches_free(ds);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(ids),          cmocka_unit_test(limits_states_since),
		cmocka_unit_test(statements),   cmocka_unit_test(rows_as_json),
		cmocka_unit_test(bad_requests),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
