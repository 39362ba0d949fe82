/* Table-driven unit tests for the dispatcher's decisions, reached directly
 * as pure functions (issue 9): the /run rate slot, the fate of each row of
 * a read (too large, max_read_ct, invalid), backoff, the Retry-After
 * policy, circuit transitions and the finish predicate. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <math.h>
#include <string.h>

#include "backoff.h"
#include "batch.h"
#include "circuit.h"
#include "dispatcher_int.h"
#include "pg.h"
#include "ratelimit.h"

#define N(a) (sizeof(a) / sizeof((a)[0]))

static void rate_slot_table(void **state)
{
	/* cap 3 per 10 s: sends at the given times, then a question at now. */
	static const struct {
		int sends;
		double at[4];
		double now;
		bool slot;
		double wait_s;
	} cases[] = {
		{ 0, { 0 }, 0.0, true, 0 },
		{ 2, { 0, 1 }, 1.5, true, 0 },
		{ 3, { 0, 1, 2 }, 2.5, false, 7.5 }, /* the oldest frees at 10 */
		{ 3, { 0, 1, 2 }, 9.999, false, 0.001 },
		{ 3, { 0, 1, 2 }, 10.0, true, 0 },        /* exactly one window later */
		{ 4, { 0, 1, 2, 10 }, 10.5, false, 0.5 }, /* ring wrapped: oldest is 1 */
		{ 4, { 0, 1, 2, 10 }, 11.0, true, 0 },
	};

	(void)state;
	for (size_t i = 0; i < N(cases); i++) {
		struct ratelimit rl;
		double wait_s = -1;

		assert_int_equal(ratelimit_init(&rl, 3, 10.0), 0);
		for (int s = 0; s < cases[i].sends; s++)
			ratelimit_record(&rl, cases[i].at[s]);
		assert_int_equal(ratelimit_slot(&rl, cases[i].now, &wait_s), cases[i].slot);
		if (!cases[i].slot)
			assert_true(fabs(wait_s - cases[i].wait_s) < 1e-9);
		ratelimit_free(&rl);
	}
}

/* keep: slots held back for another kind of request (the tracker's
 * /health share). Cap 4, window 10. */
static void rate_slot_keep_table(void **state)
{
	static const struct {
		int sends, keep;
		double at[4];
		double now;
		bool slot;
		double wait_s;
	} cases[] = {
		{ 2, 1, { 0, 1 }, 1.5, true, 0 },       /* 2 used + 1 kept < 4 */
		{ 3, 1, { 0, 1, 2 }, 2.5, false, 7.5 }, /* the oldest must age out */
		{ 3, 1, { 0, 1, 2 }, 10.0, true, 0 },
		{ 3, 2, { 0, 1, 2 }, 10.5, false, 0.5 },    /* two must age out: 0 and 1 */
		{ 4, 1, { 0, 1, 2, 3 }, 10.5, false, 0.5 }, /* full: 0 and 1 must age out */
		{ 4, 1, { 0, 1, 2, 3 }, 11.0, true, 0 },
		{ 4, 9, { 0, 1, 2, 3 }, 12.5, false, 0.5 }, /* keep clamps to cap - 1 = 3 */
		{ 1, -1, { 0 }, 0.5, true, 0 },             /* negative keep is 0 */
	};

	(void)state;
	for (size_t i = 0; i < N(cases); i++) {
		struct ratelimit rl;
		double wait_s = -1;

		assert_int_equal(ratelimit_init(&rl, 4, 10.0), 0);
		for (int s = 0; s < cases[i].sends; s++)
			ratelimit_record(&rl, cases[i].at[s]);
		assert_int_equal(ratelimit_slot_keep(&rl, cases[i].now, cases[i].keep, &wait_s),
				 cases[i].slot);
		if (!cases[i].slot)
			assert_true(fabs(wait_s - cases[i].wait_s) < 1e-9);
		ratelimit_free(&rl);
	}
}

static void rate_resize_keeps_newest(void **state)
{
	struct ratelimit rl, small, big;
	double wait_s = 0;

	(void)state;
	assert_int_equal(ratelimit_init(&rl, 4, 10.0), 0);
	for (int i = 0; i < 6; i++)
		ratelimit_record(&rl, (double)i); /* keeps 2, 3, 4, 5 */
	assert_int_equal(ratelimit_resized(&rl, 2, &small), 0);
	assert_int_equal(small.count, 2);
	assert_false(ratelimit_slot(&small, 10.0, &wait_s)); /* 4 and 5 are in the window */
	assert_true(fabs(wait_s - 4.0) < 1e-9);
	assert_int_equal(ratelimit_resized(&rl, 8, &big), 0);
	assert_int_equal(big.count, 4);
	assert_true(ratelimit_slot(&big, 10.0, &wait_s));
	/* The source is unchanged: a reload can still give up. */
	assert_int_equal(rl.cap, 4);
	assert_int_equal(rl.count, 4);
	ratelimit_free(&rl);
	ratelimit_free(&small);
	ratelimit_free(&big);
}

static void db_outage_warn_table(void **state)
{
	static const struct {
		bool first;
		const char *last, *now;
		double since_s;
		bool warn;
	} cases[] = {
		{ true, "", "connection refused", 0, true }, /* first failure */
		{ false, "connection refused", "connection refused", 1, false },
		{ false, "connection refused", "connection refused", 59.9, false },
		{ false, "connection refused", "connection refused", 60, true }, /* once a minute */
		{ false, "connection refused", "password authentication failed", 1,
		  true }, /* changed */
	};

	(void)state;
	for (size_t i = 0; i < N(cases); i++)
		assert_int_equal(pg_warn_due(cases[i].first, cases[i].last, cases[i].now,
					     cases[i].since_s),
				 cases[i].warn);
}

static void reject_action_table(void **state)
{
	static const struct {
		long status;
		int n;
		enum reject_action action;
	} cases[] = {
		{ 413, 100, REJECT_SPLIT },   { 413, 2, REJECT_SPLIT },
		{ 413, 1, REJECT_TOO_LARGE }, /* nothing left to split */
		{ 400, 100, REJECT_RELEASE }, /* may be our configuration: never archive on it */
		{ 400, 1, REJECT_RELEASE },   { 429, 5, REJECT_RELEASE },
		{ 500, 5, REJECT_RELEASE },   { 503, 1, REJECT_RELEASE },
		{ 0, 5, REJECT_RELEASE },   /* not connected */
		{ 401, 5, REJECT_RELEASE }, /* the circuit handles it */
	};

	(void)state;
	for (size_t i = 0; i < N(cases); i++)
		assert_int_equal(batch_reject_action(cases[i].status, cases[i].n), cases[i].action);
}

static void row_fate_table(void **state)
{
	static const struct {
		const char *invalid;
		bool id_ok;
		const char *read_ct;
		size_t message_len;
		int max_read_ct;
		enum row_fate fate;
	} cases[] = {
		{ NULL, true, "1", 10, 5, ROW_SEND },
		{ NULL, true, "5", 10, 5, ROW_SEND }, /* at the limit */
		{ NULL, true, "6", 10, 5, ROW_MAX_READ_CT },
		{ NULL, true, "600", 10, 0, ROW_SEND }, /* 0: no limit */
		{ NULL, true, "1", 5000, 5, ROW_TOO_LARGE },
		{ NULL, true, "6", 5000, 5, ROW_MAX_READ_CT }, /* poison wins */
		{ NULL, true, "2147483647", 10, 1000000,
		  ROW_MAX_READ_CT }, /* int4 max, config max */
		{ "message is NULL", true, "1", 10, 5, ROW_INVALID },
		{ "msg_id is NULL", false, "1", 10, 5, ROW_INVALID_LOST },
	};
	static char big[5001];

	(void)state;
	memset(big, 'x', sizeof(big) - 1);
	for (size_t i = 0; i < N(cases); i++) {
		struct pgmq_message m = {
			.msg_id = "7",
			.msg_id_num = 7,
			.read_ct = cases[i].read_ct,
			.enqueued_at = "\"2026-01-01T00:00:00+00:00\"",
			.message = big,
			.message_len = cases[i].message_len,
			.invalid = cases[i].invalid,
			.id_ok = cases[i].id_ok,
		};
		assert_int_equal(batch_row_fate(&m, 200, 1000, cases[i].max_read_ct),
				 cases[i].fate);
	}
}

static void backoff_table(void **state)
{
	static const struct {
		int failures;
		double base, cap, min, rnd, want;
	} cases[] = {
		{ 1, 1000, 60000, 250, 0.5, 500 },
		{ 3, 1000, 60000, 250, 0.5, 2000 },
		{ 0, 1000, 60000, 250, 0.5, 500 },    /* < 1 counts as 1 */
		{ 2, 1000, 60000, 250, 0.0, 250 },    /* floor */
		{ 40, 1000, 60000, 250, 0.5, 30000 }, /* cap, then jitter */
		{ 4, 250, 30000, 0, 0.5, 1000 },      /* the database's reconnects */
		{ 21, 250, 30000, 0, 0.5, 15000 },
		{ 1, 250, 30000, 0, 0.0, 0 }, /* no floor: at once */
	};

	(void)state;
	for (size_t i = 0; i < N(cases); i++)
		assert_true(fabs(backoff_ms(cases[i].failures, cases[i].base, cases[i].cap,
					    cases[i].min, cases[i].rnd) -
				 cases[i].want) < 1e-9);
	for (int i = 0; i < 100; i++) {
		double r = backoff_jitter();
		assert_true(r >= 0.0 && r < 1.0);
	}
}

static void retry_after_policy_table(void **state)
{
	static const struct {
		int status;
		long long header_ms, max_ms;
		double want;
	} cases[] = {
		{ 429, 2000, 60000, 2000 },  { 503, 2000, 60000, 2000 },
		{ 429, 999000, 2500, 2500 }, /* capped once, here */
		{ 429, -1, 60000, -1 },      /* missing or unparsable */
		{ 500, 2000, 60000, -1 },    /* only 429 and 503 */
		{ 429, 2000, 0, -1 },        /* retry_after_max_ms = 0: ignored */
		{ 429, 0, 60000, 0 },
	};

	(void)state;
	for (size_t i = 0; i < N(cases); i++)
		assert_true(backoff_retry_after_ms(cases[i].status, cases[i].header_ms,
						   cases[i].max_ms) == cases[i].want);
}

static void circuit_table(void **state)
{
	static const struct {
		bool open;
		enum circuit_event ev;
		long status;
		enum circuit_action want;
	} cases[] = {
		{ false, CIRCUIT_RUN_REPLY, 401, CIRCUIT_OPEN },
		{ false, CIRCUIT_RUN_REPLY, 403, CIRCUIT_OPEN },
		{ false, CIRCUIT_RUN_REPLY, 404, CIRCUIT_OPEN },
		{ false, CIRCUIT_RUN_REPLY, 429, CIRCUIT_NONE },
		{ false, CIRCUIT_RUN_REPLY, 200, CIRCUIT_NONE },
		{ true, CIRCUIT_RUN_REPLY, 401, CIRCUIT_NONE }, /* already open */
		{ true, CIRCUIT_PROBE_REPLY, 200, CIRCUIT_CLOSE },
		{ true, CIRCUIT_PROBE_REPLY, 401, CIRCUIT_PROBE_LATER },
		{ true, CIRCUIT_PROBE_REPLY, 0, CIRCUIT_PROBE_LATER }, /* transport error */
		{ false, CIRCUIT_PROBE_REPLY, 200, CIRCUIT_NONE },
		{ true, CIRCUIT_RELOAD, 0, CIRCUIT_PROBE_NOW },
		{ false, CIRCUIT_RELOAD, 0, CIRCUIT_NONE },
	};

	(void)state;
	for (size_t i = 0; i < N(cases); i++)
		assert_int_equal(circuit_next(cases[i].open, cases[i].ev, cases[i].status),
				 cases[i].want);
}

static void finish_table(void **state)
{
	static const struct {
		struct finish_inputs in;
		bool want;
	} cases[] = {
		/* finished, once, read_done, stopping, deadline_passed, busy */
		{ { false, false, false, false, false, false }, false }, /* daemon runs on */
		{ { false, true, false, false, false, false }, false },  /* --once: read not back */
		{ { false, true, true, false, false, true }, false },  /* --once: POST in flight */
		{ { false, true, true, false, false, false }, true },  /* --once done */
		{ { false, false, false, true, false, true }, false }, /* draining */
		{ { false, false, false, true, false, false }, true }, /* drained */
		{ { false, false, false, true, true, true }, true },   /* deadline passed */
		{ { false, true, false, true, false, false }, true },  /* --once stopped early */
		{ { true, true, true, true, false, false }, false },   /* only once */
	};

	(void)state;
	for (size_t i = 0; i < N(cases); i++)
		assert_int_equal(dispatcher_should_finish(&cases[i].in), cases[i].want);
}

static void table_name(void **state)
{
	char buf[16];

	(void)state;
	assert_int_equal(pgmq_table_name("Jobs_1", buf, sizeof(buf)), 0);
	assert_string_equal(buf, "q_jobs_1");
	assert_int_equal(pgmq_table_name("abcdefghijklmn", buf, sizeof(buf)), -1);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(rate_slot_table),
		cmocka_unit_test(rate_slot_keep_table),
		cmocka_unit_test(rate_resize_keeps_newest),
		cmocka_unit_test(reject_action_table),
		cmocka_unit_test(db_outage_warn_table),
		cmocka_unit_test(row_fate_table),
		cmocka_unit_test(backoff_table),
		cmocka_unit_test(retry_after_policy_table),
		cmocka_unit_test(circuit_table),
		cmocka_unit_test(finish_table),
		cmocka_unit_test(table_name),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
