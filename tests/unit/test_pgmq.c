/* Unit tests for pgmq: read SQL and decoding rows by column name. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "dispatcher.h"
#include "pg.h"
#include "backoff.h"
#include "pgmq.h"

static PGresult *make_result(const char *const *names, int ncols, const char *const *rows,
			     int nrows)
{
	PGresult *res = PQmakeEmptyPGresult(NULL, PGRES_TUPLES_OK);
	PGresAttDesc attrs[8];

	memset(attrs, 0, sizeof(attrs));
	for (int c = 0; c < ncols; c++) {
		attrs[c].name = (char *)names[c];
		attrs[c].typlen = -1;
	}
	assert_true(PQsetResultAttrs(res, ncols, attrs));
	for (int r = 0; r < nrows; r++)
		for (int c = 0; c < ncols; c++) {
			const char *v = rows[r * ncols + c];
			assert_true(PQsetvalue(res, r, c, (char *)v, v ? (int)strlen(v) : -1));
		}
	return res;
}

static void quote_literal(void **state)
{
	char buf[32], small[6];

	(void)state;
	assert_int_equal(pgmq_quote_literal("jobs", buf, sizeof(buf)), 0);
	assert_string_equal(buf, "'jobs'");
	assert_int_equal(pgmq_quote_literal("it's", buf, sizeof(buf)), 0);
	assert_string_equal(buf, "'it''s'");
	assert_int_equal(pgmq_quote_literal("", buf, sizeof(buf)), 0);
	assert_string_equal(buf, "''");
	/* 'abc' needs 6 bytes with its NUL; a quote that would not fit is refused whole. */
	assert_int_equal(pgmq_quote_literal("abc", small, sizeof(small)), 0);
	assert_int_equal(pgmq_quote_literal("ab'", small, sizeof(small)), -1);
	assert_string_equal(small, "");
	assert_int_equal(pgmq_create_call("Q'x", buf, sizeof(buf)), 0);
	assert_string_equal(buf, "SELECT pgmq.create('Q''x');");
}

static void read_sql(void **state)
{
	char buf[512];

	assert_int_equal(pgmq_read_sql("public.pgmq_read", buf, sizeof(buf)), 0);
	assert_non_null(strstr(buf, "FROM public.pgmq_read($1::text, $2::integer, $3::integer)"));
	assert_non_null(strstr(buf, "to_json(enqueued_at)"));
	assert_non_null(strstr(buf, "message->'document_id'"));
	assert_non_null(strstr(buf, "ORDER BY msg_id"));
	assert_int_equal(pgmq_read_sql("pgmq.read", buf, 20), -1);
}

/* Columns in another order (as with pgmq 1.10's last_read_at) decode the same. */
static void decode_by_name(void **state)
{
	const char *names[] = { "message", "document_id", "enqueued_at", "read_ct", "msg_id" };
	const char *rows[] = {
		"{\"document_id\": \"d\"}",
		"\"d\"",
		"\"2026-01-01T00:00:00+00:00\"",
		"3",
		"9007199254740993",
		NULL,
		NULL,
		"\"2026-01-01T00:00:01+00:00\"",
		"1",
		"12",
	};
	struct pgmq_batch b;
	char err[256];

	assert_int_equal(pgmq_batch_from_result(make_result(names, 5, rows, 2), &b, err,
						sizeof(err)),
			 0);
	assert_int_equal(b.n, 2);
	assert_string_equal(b.msgs[0].msg_id, "9007199254740993");
	assert_true(b.msgs[0].msg_id_num == 9007199254740993LL);
	assert_string_equal(b.msgs[0].read_ct, "3");
	assert_string_equal(b.msgs[0].document_id, "\"d\"");
	assert_string_equal(b.msgs[1].message, "null"); /* SQL NULL message */
	assert_null(b.msgs[1].document_id);
	pgmq_batch_free(&b);
}

static void missing_column(void **state)
{
	const char *names[] = { "msg_id", "read_ct", "enqueued_at", "message" };
	const char *no_id[] = { "read_ct", "enqueued_at", "message", "document_id" };
	const char *rows[] = { "7", "1", "\"t\"", "{}" };
	struct pgmq_batch b;
	char err[256];

	/* document_id missing: the row is kept (its id is known) but marked. */
	assert_int_equal(pgmq_batch_from_result(make_result(names, 4, rows, 1), &b, err,
						sizeof(err)),
			 0);
	assert_int_equal(b.n, 1);
	assert_true(b.msgs[0].id_ok && b.msgs[0].msg_id_num == 7);
	assert_string_equal(b.msgs[0].invalid,
			    "the read function returned no column named document_id");
	pgmq_batch_free(&b);
	/* no msg_id column: nothing can be named. */
	assert_int_equal(pgmq_batch_from_result(make_result(no_id, 4, rows, 1), &b, err,
						sizeof(err)),
			 -1);
	assert_non_null(strstr(err, "no column named msg_id (1 row read, its id unknown"));
}

/* One bad row does not take the good ones with it. */
static void malformed_values(void **state)
{
	const char *names[] = { "msg_id", "read_ct", "enqueued_at", "message", "document_id" };
	const char *rows[] = {
		"12abc", "1",  "\"t\"", "{}",    NULL,    "2",  "-1", "\"t\"", "{}",
		NULL,    NULL, "1",     "\"t\"", "{}",    NULL, "4",  "1",     NULL,
		"{}",    NULL, "5",     "1",     "\"t\"", "{}", NULL,
	};
	struct pgmq_batch b;
	char err[256];

	assert_int_equal(pgmq_batch_from_result(make_result(names, 5, rows, 5), &b, err,
						sizeof(err)),
			 0);
	assert_int_equal(b.n, 5);
	assert_false(b.msgs[0].id_ok);
	assert_non_null(strstr(b.msgs[0].invalid, "not a bigint"));
	assert_true(b.msgs[1].id_ok && b.msgs[1].msg_id_num == 2);
	assert_non_null(strstr(b.msgs[1].invalid, "read_ct"));
	assert_false(b.msgs[2].id_ok);
	assert_true(b.msgs[3].id_ok);
	assert_non_null(strstr(b.msgs[3].invalid, "NULL"));
	assert_null(b.msgs[4].invalid);
	assert_string_equal(b.msgs[4].read_ct, "1");
	pgmq_batch_free(&b);
}

static void empty_result(void **state)
{
	const char *names[] = { "msg_id", "read_ct", "enqueued_at", "message", "document_id" };
	struct pgmq_batch b;
	char err[256];

	assert_int_equal(pgmq_batch_from_result(make_result(names, 5, NULL, 0), &b, err,
						sizeof(err)),
			 0);
	assert_int_equal(b.n, 0);
	pgmq_batch_free(&b);
}

static void backoff(void **state)
{
	/* Full jitter: rnd scales the capped exponential ceiling. */
	assert_true(backoff_ms(1, 250, 30000, 0, 0.999) < 250.0);
	assert_true(backoff_ms(4, 250, 30000, 0, 0.5) == 1000.0);
	assert_true(backoff_ms(21, 250, 30000, 0, 0.5) == 15000.0);
	assert_true(backoff_ms(1, 1000, 60000, 250, 0.5) == 500.0);
	assert_true(backoff_ms(3, 1000, 60000, 250, 0.5) == 2000.0);
	assert_true(backoff_ms(40, 1000, 60000, 250, 0.999) <= 60000.0);
	assert_true(backoff_ms(2, 1000, 60000, 250, 0.0) == 250.0);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(quote_literal),    cmocka_unit_test(read_sql),
		cmocka_unit_test(decode_by_name),   cmocka_unit_test(missing_column),
		cmocka_unit_test(malformed_values), cmocka_unit_test(empty_result),
		cmocka_unit_test(backoff),
	};
	return cmocka_run_group_tests_name("pgmq", tests, NULL, NULL);
}
