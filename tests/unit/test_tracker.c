/* Unit tests for the tracker's pure parts: the /status reply parser and
 * terminal set (runpod.c), the /status URL, and the tracker's scheduling
 * helpers (jitter, token bucket, heartbeat rule). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runpod.h"
#include "tracker.h"

static int parse(const char *body, struct runpod_status_reply *r)
{
	return runpod_parse_status_reply(body, strlen(body), r);
}

static void status_reply_full_job_object(void **state)
{
	struct runpod_status_reply r;

	assert_int_equal(parse("{\"id\":\"0b7f-u1\",\"status\":\"COMPLETED\",\"delayTime\":1830,"
			       "\"executionTime\":4120,\"workerId\":\"k3v9\",\"output\":{\"n\":12},"
			       "\"retries\":0,\"input\":{\"jobs\":[]}}", &r), 0);
	assert_string_equal(r.id, "0b7f-u1");
	assert_string_equal(r.status, "COMPLETED");
	assert_int_equal(r.delay_ms, 1830);
	assert_int_equal(r.execution_ms, 4120);
	assert_string_equal(r.error, "");
	assert_false(r.error_truncated);
}

static void status_reply_minimal_and_odd_members(void **state)
{
	struct runpod_status_reply r;

	/* §2.1: only id and status; times absent → -1. */
	assert_int_equal(parse("{\"id\":\"j\",\"status\":\"IN_QUEUE\"}", &r), 0);
	assert_string_equal(r.status, "IN_QUEUE");
	assert_int_equal(r.delay_ms, -1);
	assert_int_equal(r.execution_ms, -1);
	/* No id at all is still a status. */
	assert_int_equal(parse("{\"status\":\"IN_PROGRESS\",\"delayTime\":12.6}", &r), 0);
	assert_string_equal(r.id, "");
	assert_int_equal(r.delay_ms, 13);
	/* Times that are not non-negative numbers are absent. */
	assert_int_equal(parse("{\"status\":\"IN_PROGRESS\",\"delayTime\":\"5\","
			       "\"executionTime\":-3}", &r), 0);
	assert_int_equal(r.delay_ms, -1);
	assert_int_equal(r.execution_ms, -1);
	/* error: null is no error. */
	assert_int_equal(parse("{\"status\":\"FAILED\",\"error\":null}", &r), 0);
	assert_string_equal(r.error, "");
}

static void status_reply_rejects_garbage(void **state)
{
	static const char *const bad[] = {
		"", "not json", "[]", "\"COMPLETED\"", "{}", "{\"status\":\"\"}", "{\"status\":5}",
		"{\"status\":null}", "{\"status\":\"IN_\\u0001QUEUE\"}", "{\"id\":\"x\"}",
		"{\"status\":\"COMPLETED\"", /* cut */
	};
	struct runpod_status_reply r;

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		if (parse(bad[i], &r) != -1)
			fail_msg("accepted: %s", bad[i]);
	}
	assert_int_equal(runpod_parse_status_reply(NULL, 0, &r), -1);
}

static void status_reply_respects_length(void **state)
{
	const char body[] = "{\"status\":\"IN_QUEUE\"}{\"status\":\"FAILED\"}";
	struct runpod_status_reply r;

	assert_int_equal(runpod_parse_status_reply(body, 21, &r), 0);
	assert_string_equal(r.status, "IN_QUEUE");
	assert_int_equal(runpod_parse_status_reply(body, 20, &r), -1);
}

static void status_reply_error_text(void **state)
{
	struct runpod_status_reply r;
	char body[2048];
	char longtext[1001];

	/* A runpod-python worker's error is a JSON string holding JSON (§4). */
	assert_int_equal(parse("{\"status\":\"FAILED\",\"error\":\"{\\\"error_type\\\": "
			       "\\\"ValueError\\\"}\"}", &r), 0);
	assert_string_equal(r.error, "{\"error_type\": \"ValueError\"}");
	assert_false(r.error_truncated);
	/* A handler's own object is kept as compact JSON. */
	assert_int_equal(parse("{\"status\":\"FAILED\",\"error\":{\"code\": 7, \"why\": \"x\"}}", &r),
			 0);
	assert_string_equal(r.error, "{\"code\":7,\"why\":\"x\"}");
	/* Long text is cut to RUNPOD_ERROR_MAX bytes. */
	memset(longtext, 'e', 1000);
	longtext[1000] = '\0';
	snprintf(body, sizeof(body), "{\"status\":\"FAILED\",\"error\":\"%s\"}", longtext);
	assert_int_equal(parse(body, &r), 0);
	assert_int_equal(strlen(r.error), RUNPOD_ERROR_MAX);
	assert_true(r.error_truncated);
	/* ... never inside a UTF-8 sequence: 255 ASCII bytes, then "ö" (2 bytes). */
	memset(longtext, 'a', 255);
	strcpy(longtext + 255, "\xc3\xb6zzz");
	snprintf(body, sizeof(body), "{\"status\":\"FAILED\",\"error\":\"%s\"}", longtext);
	assert_int_equal(parse(body, &r), 0);
	assert_int_equal(strlen(r.error), 255);
	assert_true(r.error_truncated);
	/* Exactly RUNPOD_ERROR_MAX bytes fit whole. */
	memset(longtext, 'b', RUNPOD_ERROR_MAX);
	longtext[RUNPOD_ERROR_MAX] = '\0';
	snprintf(body, sizeof(body), "{\"status\":\"FAILED\",\"error\":\"%s\"}", longtext);
	assert_int_equal(parse(body, &r), 0);
	assert_int_equal(strlen(r.error), RUNPOD_ERROR_MAX);
	assert_false(r.error_truncated);
}

static void status_reply_long_status_is_cut(void **state)
{
	struct runpod_status_reply r;

	assert_int_equal(parse("{\"status\":\"A_VERY_LONG_STATUS_NOBODY_HAS_SEEN_BEFORE_X\"}", &r), 0);
	assert_int_equal(strlen(r.status), RUNPOD_STATUS_MAX);
	assert_false(runpod_status_is_terminal(r.status));
}

static void terminal_set(void **state)
{
	static const char *const terminal[] = { "COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT" };
	static const char *const live[] = { "IN_QUEUE", "IN_PROGRESS", "RUNNING", "completed",
					    "COMPLETED ", "", "PAUSED", "CANCELED" };

	for (size_t i = 0; i < sizeof(terminal) / sizeof(terminal[0]); i++)
		assert_true(runpod_status_is_terminal(terminal[i]));
	for (size_t i = 0; i < sizeof(live) / sizeof(live[0]); i++)
		assert_false(runpod_status_is_terminal(live[i]));
	assert_false(runpod_status_is_terminal(NULL));
}

static void status_url(void **state)
{
	char buf[128];

	assert_int_equal(runpod_status_url("https://api.runpod.ai/v2", "ep1",
					   "0b7f9c52-3d1e-4a7b-9f60-5c2d8e41a9b3-u1", buf,
					   sizeof(buf)), 0);
	assert_string_equal(buf, "https://api.runpod.ai/v2/ep1/status/"
				 "0b7f9c52-3d1e-4a7b-9f60-5c2d8e41a9b3-u1");
	/* Opaque ids: anything outside the unreserved set is percent-encoded. */
	assert_int_equal(runpod_status_url("http://h/v2", "e", "a b/c?d#e%~._", buf, sizeof(buf)), 0);
	assert_string_equal(buf, "http://h/v2/e/status/a%20b%2Fc%3Fd%23e%25~._");
	assert_int_equal(runpod_status_url("http://h/v2", "e", "\xc3\xb6", buf, sizeof(buf)), 0);
	assert_string_equal(buf, "http://h/v2/e/status/%C3%B6");
	/* Too long: -1, never a cut URL. */
	assert_int_equal(runpod_status_url("http://h/v2", "e", "abcdef", buf, 28), 0);
	assert_string_equal(buf, "http://h/v2/e/status/abcdef");
	assert_int_equal(runpod_status_url("http://h/v2", "e", "abcdef", buf, 27), -1);
	assert_int_equal(runpod_status_url("http://h/v2", "e", "abcde/", buf, 30), 0);
	assert_int_equal(runpod_status_url("http://h/v2", "e", "abcde/", buf, 29), -1);
	assert_int_equal(runpod_status_url("http://h/v2", "endpoint", "x", buf, 20), -1);
}

static void jitter_is_ten_percent(void **state)
{
	assert_true(fabs(tracker_jittered_s(10000, 0.0) - 9.0) < 1e-9);
	assert_true(fabs(tracker_jittered_s(10000, 0.5) - 10.0) < 1e-9);
	assert_true(tracker_jittered_s(10000, 0.999999) < 11.0);
	assert_true(tracker_jittered_s(10000, 0.999999) > 10.99);
	assert_true(fabs(tracker_jittered_s(300, 0.0) - 0.27) < 1e-9);
}

/* Takes tokens as fast as they come, every step_s for run_s seconds, and
 * checks that no 10 s window (half-open) ever holds more than per_10s. */
static void bucket_window(int per_10s, double step_s, double run_s)
{
	struct tracker_bucket b = { 0 };
	int cap = (int)(run_s / step_s) + 2, n = 0, lo = 0;
	double *taken = malloc((size_t)cap * sizeof(*taken));
	int best = 0;

	assert_non_null(taken);
	tracker_bucket_setup(&b, per_10s, 100.0, false);
	for (int i = 0; i * step_s <= run_s; i++) {
		double now = 100.0 + i * step_s;
		double wait = tracker_bucket_wait_s(&b, now);
		bool got = tracker_bucket_take(&b, now);

		assert_true(got == (wait == 0.0));
		if (!got)
			continue;
		taken[n++] = now;
		while (taken[lo] <= now - 10.0)
			lo++;
		if (n - lo > best)
			best = n - lo;
		if (n - lo > per_10s)
			fail_msg("per_10s=%d: %d events in the 10 s up to %.3f", per_10s, n - lo, now);
	}
	/* And the cap is actually used: close to per_10s in a 10 s window. */
	assert_true(best >= per_10s * 0.9 - 1);
	free(taken);
}

static void bucket_keeps_the_cap(void **state)
{
	bucket_window(2000, 0.001, 40.0);
	bucket_window(1000, 0.0005, 25.0);
	bucket_window(15, 0.01, 60.0);
	bucket_window(7, 0.01, 60.0);
	bucket_window(1, 0.01, 60.0);
}

static void bucket_waits_and_reloads(void **state)
{
	struct tracker_bucket b = { 0 };

	tracker_bucket_setup(&b, 100, 0.0, false); /* burst 10, 9 per s */
	for (int i = 0; i < 10; i++)
		assert_true(tracker_bucket_take(&b, 0.0));
	assert_false(tracker_bucket_take(&b, 0.0));
	assert_true(fabs(tracker_bucket_wait_s(&b, 0.0) - 1.0 / 9.0) < 1e-9);
	assert_true(tracker_bucket_take(&b, 1.0 / 9.0 + 1e-9));
	/* A reload keeps the level (capped by the new burst) instead of refilling. */
	tracker_bucket_setup(&b, 2000, 1.0, true);
	assert_true(b.tokens < 10.0);
	tracker_bucket_setup(&b, 20, 100.0, true); /* burst 2: a full bucket is cut to 2 */
	assert_true(b.tokens <= 2.0);
	assert_true(tracker_bucket_take(&b, 100.0));
	assert_true(tracker_bucket_take(&b, 100.0));
	assert_false(tracker_bucket_take(&b, 100.0));
}

static void heartbeat_when_a_third_is_left(void **state)
{
	assert_true(fabs(tracker_heartbeat_at(106.0, 6) - 104.0) < 1e-9);
	assert_true(fabs(tracker_heartbeat_at(1800.0, 1800) - 1200.0) < 1e-9);
	assert_true(fabs(tracker_heartbeat_at(10.0, 1) - (10.0 - 1.0 / 3.0)) < 1e-9);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(status_reply_full_job_object),
		cmocka_unit_test(status_reply_minimal_and_odd_members),
		cmocka_unit_test(status_reply_rejects_garbage),
		cmocka_unit_test(status_reply_respects_length),
		cmocka_unit_test(status_reply_error_text),
		cmocka_unit_test(status_reply_long_status_is_cut),
		cmocka_unit_test(terminal_set),
		cmocka_unit_test(status_url),
		cmocka_unit_test(jitter_is_ten_percent),
		cmocka_unit_test(bucket_keeps_the_cap),
		cmocka_unit_test(bucket_waits_and_reloads),
		cmocka_unit_test(heartbeat_when_a_third_is_left),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
