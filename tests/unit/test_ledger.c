/* Unit tests for the ledger's pure parts: array literals for parameters,
 * ids back from array text, dispatch ids, the read statement, the
 * migration statement and its explanations, the CLI's spans and relative
 * times, and the dispatch id written into a /run body (issue 12). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "ledger.h"
#include "ledger_cli.h"
#include "ledger_sql.h"
#include "ledger_view.h"
#include "migrate.h"
#include "runpod.h"

#define N(a) (sizeof(a) / sizeof((a)[0]))

static void array_elems(void **state)
{
	static const struct {
		const char *in;
		size_t max;
		const char *out;
	} cases[] = {
		{ "accepted", 32, "{\"accepted\"" },
		{ NULL, 32, "{NULL" },
		{ "say \"hi\" \\ bye", 32, "{\"say \\\"hi\\\" \\\\ bye\"" },
		{ "caf\xc3\xa9\n", 32, "{\"caf???\"" },
		{ "abcdef", 3, "{\"abc\"" },
	};
	char buf[64];

	(void)state;
	for (size_t i = 0; i < N(cases); i++) {
		size_t used = 1;
		strcpy(buf, "{");
		assert_int_equal(ledger_array_elem(buf, sizeof(buf), &used, cases[i].in,
						   cases[i].max),
				 0);
		assert_string_equal(buf, cases[i].out);
		assert_int_equal(used, strlen(cases[i].out));
	}
	{
		size_t used = 1;
		strcpy(buf, "{");
		assert_int_equal(ledger_array_elem(buf, sizeof(buf), &used, "a", 8), 0);
		assert_int_equal(ledger_array_elem(buf, sizeof(buf), &used, NULL, 8), 0);
		assert_string_equal(buf, "{\"a\",NULL");
	}
	{
		char small[8];
		size_t used = 1;
		strcpy(small, "{");
		assert_int_equal(ledger_array_elem(small, sizeof(small), &used, "too long here",
						   99),
				 -1);
	}
}

static void parse_ids(void **state)
{
	long long *ids = NULL;

	(void)state;
	assert_int_equal(ledger_parse_ids("{1,22,9007199254740993}", &ids), 3);
	assert_int_equal(ids[0], 1);
	assert_int_equal(ids[1], 22);
	assert_true(ids[2] == 9007199254740993LL);
	free(ids);
	assert_int_equal(ledger_parse_ids("{}", &ids), 0);
	free(ids);
}

static void dispatch_ids(void **state)
{
	char a[LEDGER_ID_LEN + 1], b[LEDGER_ID_LEN + 1];

	(void)state;
	ledger_new_id(a);
	ledger_new_id(b);
	assert_int_equal(strlen(a), 36);
	assert_string_not_equal(a, b);
	assert_int_equal(a[8], '-');
	assert_int_equal(a[14], '4'); /* version 4 */
	assert_non_null(strchr("89ab", a[19]));
}

static void read_statement(void **state)
{
	char sql[2048];

	(void)state;
	assert_int_equal(ledger_read_sql("pgmq_dispatcher", "public.my_read", sql, sizeof(sql)), 0);
	assert_non_null(strstr(sql, "FROM public.my_read($1::text, $2::integer, $3::integer)"));
	assert_non_null(strstr(sql, "INSERT INTO pgmq_dispatcher.dispatch"));
	/* One row per part of $8 rows, under the part's id: an empty read has
	 * no part and writes nothing. */
	assert_non_null(strstr(sql, "($4::uuid[])[(pgmqd_row - 1) / $8::integer + 1]"));
	assert_non_null(strstr(sql, "GROUP BY (pgmqd_row - 1) / $8::integer"));
	assert_non_null(strstr(sql, "ORDER BY pgmqd_row"));
	assert_int_equal(ledger_read_sql("s", "pgmq.read", sql, 64), -1);
}

/* The archive and its record are one statement; recovery looks at the
 * holder's session, not only at the lease's end. */
static void archive_and_recovery_statements(void **state)
{
	char sql[4096];

	(void)state;
	snprintf(sql, sizeof(sql), LEDGER_ARCHIVE_SQL, "s", "pgmq.\"q_jobs\"");
	assert_non_null(strstr(sql, "LATERAL pgmq.archive($1::text, m.id)"));
	assert_non_null(strstr(sql, "INSERT INTO s.dispatch"));
	assert_non_null(strstr(sql, "ON CONFLICT (dispatch_id) DO UPDATE SET state = 'archived'"));
	assert_non_null(strstr(sql, "FROM pgmq.\"q_jobs\" WHERE msg_id = ANY"));
	assert_non_null(strstr(sql, "HAVING count(*) > 0")); /* nothing archived: no record */
	snprintf(sql, sizeof(sql), LEDGER_TICK_SQL, "s", "pgmq.\"q_jobs\"");
	assert_non_null(strstr(sql, "lease_until < now() OR (pid IS NOT NULL AND NOT EXISTS"));
	assert_non_null(strstr(sql, "pg_stat_activity"));
	assert_non_null(strstr(sql, "pid = pg_backend_pid() WHERE owner = $1::uuid"));
	snprintf(sql, sizeof(sql), LEDGER_CLAIM_SQL, "s");
	assert_non_null(strstr(sql, "FOR UPDATE SKIP LOCKED"));
	assert_non_null(strstr(sql, "h->>'state' = 'accepted'")); /* the job's age */
}

static void migration_statement(void **state)
{
	char *v1 = migrate_sql("my_schema", 1), *v2 = migrate_sql("my_schema", MIGRATE_VERSION);
	char *prev = migrate_sql("my_schema", 2), *v3 = migrate_sql("my_schema", 3);
	char line[512];

	(void)state;
	assert_int_equal(MIGRATE_VERSION, 5);
	assert_non_null(v1);
	assert_non_null(v2);
	assert_non_null(prev);
	assert_null(strstr(v1, "@S@"));
	assert_null(strstr(v1, "lease_until")); /* version 2 on */
	assert_non_null(strstr(v2, "lease_until"));
	assert_non_null(strstr(v2, "CREATE TABLE my_schema.dispatch"));
	snprintf(line, sizeof(line), "IF v > %d THEN RAISE EXCEPTION", MIGRATE_VERSION);
	assert_non_null(strstr(v2, line));
	/* Version 3: the session holding a lease; the previous version lacks it. */
	assert_null(strstr(prev, "ADD COLUMN pid"));
	assert_non_null(strstr(prev, "IF v > 2 THEN RAISE EXCEPTION"));
	assert_non_null(strstr(v2, "IF v < 3 THEN ALTER TABLE my_schema.lease ADD COLUMN pid"));
	/* Version 4: the fleet budget (budget.h), after the lease's session. */
	assert_non_null(strstr(v2, "IF v < 4 THEN CREATE TABLE my_schema.budget "));
	assert_non_null(strstr(v2, "CREATE FUNCTION my_schema.budget_take("));
	assert_non_null(v3);
	assert_null(strstr(v3, "budget"));
	/* Version 5: the routes' control state (control.c); version 4 lacks it. */
	{
		char *v4 = migrate_sql("my_schema", 4);
		assert_non_null(v4);
		assert_null(strstr(v4, "route_control"));
		free(v4);
	}
	assert_non_null(
		strstr(v2, "IF v < 5 THEN CREATE TABLE IF NOT EXISTS my_schema.route_control"));
	assert_null(migrate_sql("x", 0));
	assert_null(migrate_sql("x", MIGRATE_VERSION + 1));
	free(v1);
	free(v2);
	free(prev);
	free(v3);
	migrate_explain("s", "42501", "permission denied for database d\n", line, sizeof(line));
	assert_non_null(strstr(line, "pgmq-dispatcher migrate"));
	assert_null(strchr(line, '\n'));
	migrate_explain("s", "PD001", "ledger schema s is at version 9", line, sizeof(line));
	assert_string_equal(line, "ledger schema s is at version 9");
}

static void spans_and_ages(void **state)
{
	static const struct {
		const char *in;
		long s;
	} spans[] = { { "90s", 90 },    { "15m", 900 },       { "2h", 7200 },
		      { "3d", 259200 }, { "2024-01-01", -1 }, { "m", -1 },
		      { "5", -1 },      { "5x", -1 },         { "-5m", -1 } };
	static const struct {
		double s;
		const char *out;
	} ages[] = { { 0, "0s" },    { 119, "119s" },     { 120, "2m" }, { 7199, "119m" },
		     { 7200, "2h" }, { 3 * 86400, "3d" }, { -5, "0s" } };
	char buf[16];

	(void)state;
	for (size_t i = 0; i < N(spans); i++)
		assert_int_equal(ledger_view_span_s(spans[i].in), spans[i].s);
	for (size_t i = 0; i < N(ages); i++) {
		ledger_view_ago(ages[i].s, buf, sizeof(buf));
		assert_string_equal(buf, ages[i].out);
	}
}

static void dispatch_id_in_body(void **state)
{
	struct runpod_extras plain = { 0 }, with = { .dispatch_id = true };
	struct runpod_envelope e0, e1;
	struct pgmq_message m = { .msg_id = "7",
				  .msg_id_num = 7,
				  .read_ct = "1",
				  .enqueued_at = "\"2026-01-01T00:00:00+00:00\"",
				  .message = "{}",
				  .message_len = 2 };
	const char *id = "0123abcd-0000-4000-8000-0123456789ab";
	size_t len0, len1;
	char *b0, *b1;

	(void)state;
	assert_int_equal(runpod_envelope_init(&e0, "jobs", 60, &plain), 0);
	assert_int_equal(runpod_envelope_init(&e1, "jobs", 60, &with), 0);
	b0 = runpod_envelope_body(&e0, &m, 1, &len0);
	b1 = runpod_envelope_body(&e1, &m, 1, &len1);
	runpod_envelope_set_dispatch_id(&e0, b0, id); /* no placeholder: unchanged */
	runpod_envelope_set_dispatch_id(&e1, b1, id);
	assert_null(strstr(b0, "dispatch_id"));
	assert_non_null(strstr(
		b1,
		"{\"input\":{\"dispatch_id\":\"0123abcd-0000-4000-8000-0123456789ab\",\"queue\""));
	/* Sizes are exact before the id is known. */
	assert_int_equal(len1, len0 + strlen(",\"dispatch_id\":\"\"") + 36);
	assert_int_equal(strlen(b1), len1);
	free(b0);
	free(b1);
	runpod_envelope_free(&e0);
	runpod_envelope_free(&e1);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(array_elems),
		cmocka_unit_test(parse_ids),
		cmocka_unit_test(dispatch_ids),
		cmocka_unit_test(read_statement),
		cmocka_unit_test(migration_statement),
		cmocka_unit_test(archive_and_recovery_statements),
		cmocka_unit_test(spans_and_ages),
		cmocka_unit_test(dispatch_id_in_body),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
