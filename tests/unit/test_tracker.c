/* Unit tests for the tracker's pure parts: the /status reply parser and
 * terminal set (runpod.c), the /status URL, and the tracker's scheduling
 * helpers (jitter, the /status limiter as configured, heartbeat rule). */
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
			       "\"retries\":0,\"input\":{\"jobs\":[]}}",
			       &r),
			 0);
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
			       "\"executionTime\":-3}",
			       &r),
			 0);
	assert_int_equal(r.delay_ms, -1);
	assert_int_equal(r.execution_ms, -1);
	/* error: null is no error. */
	assert_int_equal(parse("{\"status\":\"FAILED\",\"error\":null}", &r), 0);
	assert_string_equal(r.error, "");
}

static void status_reply_rejects_garbage(void **state)
{
	static const char *const bad[] = {
		"",
		"not json",
		"[]",
		"\"COMPLETED\"",
		"{}",
		"{\"status\":\"\"}",
		"{\"status\":5}",
		"{\"status\":null}",
		"{\"status\":\"IN_\\u0001QUEUE\"}",
		"{\"id\":\"x\"}",
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
			       "\\\"ValueError\\\"}\"}",
			       &r),
			 0);
	assert_string_equal(r.error, "{\"error_type\": \"ValueError\"}");
	assert_false(r.error_truncated);
	/* A handler's own object is kept as compact JSON. */
	assert_int_equal(parse("{\"status\":\"FAILED\",\"error\":{\"code\": 7, \"why\": \"x\"}}",
			       &r),
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

	assert_int_equal(parse("{\"status\":\"A_VERY_LONG_STATUS_NOBODY_HAS_SEEN_BEFORE_X\"}", &r),
			 0);
	assert_int_equal(strlen(r.status), RUNPOD_STATUS_MAX);
	assert_false(runpod_status_is_terminal(r.status));
}

static void terminal_set(void **state)
{
	static const char *const terminal[] = { "COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT" };
	static const char *const live[] = { "IN_QUEUE",  "IN_PROGRESS", "RUNNING",
					    "completed", "COMPLETED ",  "",
					    "PAUSED",    "CANCELED" };

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
					   sizeof(buf)),
			 0);
	assert_string_equal(buf, "https://api.runpod.ai/v2/ep1/status/"
				 "0b7f9c52-3d1e-4a7b-9f60-5c2d8e41a9b3-u1");
	/* Opaque ids: anything outside the unreserved set is percent-encoded. */
	assert_int_equal(runpod_status_url("http://h/v2", "e", "a b/c?d#e%~._", buf, sizeof(buf)),
			 0);
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

/* The /status limiter as the tracker uses it (include/ratelimit.h, cap
 * per_10s, window RATE_WINDOW_S + RATE_MARGIN_S): takes a slot whenever there
 * is one, every step_s for run_s seconds, and checks that no 10 s window
 * (half-open) ever holds more than per_10s. */
static void status_window(int per_10s, double step_s, double run_s)
{
	struct ratelimit rl;
	int cap = (int)(run_s / step_s) + 2, n = 0, lo = 0;
	double *taken = malloc((size_t)cap * sizeof(*taken));
	int best = 0;

	assert_non_null(taken);
	assert_int_equal(ratelimit_init(&rl, per_10s, RATE_WINDOW_S + RATE_MARGIN_S), 0);
	for (int i = 0; i * step_s <= run_s; i++) {
		double now = 100.0 + i * step_s, wait = 0.0;
		bool got = ratelimit_slot(&rl, now, &wait);

		assert_true(got || wait > 0.0);
		if (!got)
			continue;
		ratelimit_record(&rl, now);
		taken[n++] = now;
		while (taken[lo] <= now - 10.0)
			lo++;
		if (n - lo > best)
			best = n - lo;
		if (n - lo > per_10s)
			fail_msg("per_10s=%d: %d events in the 10 s up to %.3f", per_10s, n - lo,
				 now);
	}
	/* And the cap is actually used: close to per_10s in a 10 s window. */
	assert_true(best >= per_10s * 0.9 - 1);
	ratelimit_free(&rl);
	free(taken);
}

static void status_limit_keeps_the_cap(void **state)
{
	status_window(2000, 0.001, 40.0);
	status_window(1000, 0.0005, 25.0);
	status_window(15, 0.01, 60.0);
	status_window(7, 0.01, 60.0);
	status_window(1, 0.01, 60.0);
}

static void status_limit_waits_and_reloads(void **state)
{
	struct ratelimit rl, lower;
	double wait = 0.0;

	assert_int_equal(ratelimit_init(&rl, 10, RATE_WINDOW_S + RATE_MARGIN_S), 0);
	for (int i = 0; i < 10; i++) {
		assert_true(ratelimit_slot(&rl, 0.0, &wait));
		ratelimit_record(&rl, 0.0);
	}
	assert_false(ratelimit_slot(&rl, 0.0, &wait));
	assert_true(fabs(wait - (RATE_WINDOW_S + RATE_MARGIN_S)) < 1e-9);
	assert_true(ratelimit_slot(&rl, RATE_WINDOW_S + RATE_MARGIN_S, &wait));
	/* A reload keeps the recent send times instead of starting empty. */
	assert_int_equal(ratelimit_resized(&rl, 2, &lower), 0);
	assert_false(ratelimit_slot(&lower, 1.0, &wait));
	assert_true(ratelimit_slot(&lower, RATE_WINDOW_S + RATE_MARGIN_S, &wait));
	ratelimit_free(&lower);
	ratelimit_free(&rl);
}

static void heartbeat_when_a_third_is_left(void **state)
{
	assert_true(fabs(tracker_heartbeat_at(106.0, 6) - 104.0) < 1e-9);
	assert_true(fabs(tracker_heartbeat_at(1800.0, 1800) - 1200.0) < 1e-9);
	assert_true(fabs(tracker_heartbeat_at(10.0, 1) - (10.0 - 1.0 / 3.0)) < 1e-9);
}

/* §7: counters read leniently, unknown keys ignored, no jobs/workers
 * object is not a /health reply. */
static void health_reply(void **state)
{
	struct runpod_health h;
	const char *full = "{\"jobs\":{\"completed\":7,\"failed\":1,\"inProgress\":2,"
			   "\"inQueue\":5,\"retried\":0},\"workers\":{\"idle\":1,"
			   "\"initializing\":4,\"ready\":1,\"running\":2,\"throttled\":3,"
			   "\"unhealthy\":6,\"outdated\":9}}";
	const char *odd = "{\"workers\":{\"unhealthy\":\"3\",\"idle\":-1,\"running\":2.0}}";

	assert_int_equal(runpod_parse_health_reply(full, strlen(full), &h), 0);
	assert_int_equal(h.jobs[RUNPOD_HJ_COMPLETED], 7);
	assert_int_equal(h.jobs[RUNPOD_HJ_IN_PROGRESS], 2);
	assert_int_equal(h.jobs[RUNPOD_HJ_IN_QUEUE], 5);
	assert_int_equal(h.workers[RUNPOD_HW_INITIALIZING], 4);
	assert_int_equal(h.workers[RUNPOD_HW_THROTTLED], 3);
	assert_int_equal(h.workers[RUNPOD_HW_UNHEALTHY], 6);
	/* Missing jobs, a string, a negative number: 0. */
	assert_int_equal(runpod_parse_health_reply(odd, strlen(odd), &h), 0);
	assert_int_equal(h.jobs[RUNPOD_HJ_IN_QUEUE], 0);
	assert_int_equal(h.workers[RUNPOD_HW_UNHEALTHY], 0);
	assert_int_equal(h.workers[RUNPOD_HW_IDLE], 0);
	assert_int_equal(h.workers[RUNPOD_HW_RUNNING], 2);
	assert_int_equal(runpod_parse_health_reply("{\"status\":\"ok\"}", 15, &h), -1);
	assert_int_equal(runpod_parse_health_reply("[1]", 3, &h), -1);
	assert_int_equal(runpod_parse_health_reply("{\"jobs\":", 8, &h), -1);
	assert_int_equal(runpod_parse_health_reply(NULL, 0, &h), -1);
	assert_int_equal(h.workers[RUNPOD_HW_RUNNING], 0); /* cleared on failure */
}

/* Warn once while unhealthy workers meet waiting jobs; recovered once no
 * worker is unhealthy; nothing in between. */
static void health_note_warns_once(void **state)
{
	assert_int_equal(tracker_health_note(false, 0, 10), TRACKER_HEALTH_QUIET);
	assert_int_equal(tracker_health_note(false, 3, 0), TRACKER_HEALTH_QUIET);
	assert_int_equal(tracker_health_note(false, 3, 1), TRACKER_HEALTH_WARN);
	assert_int_equal(tracker_health_note(true, 3, 1), TRACKER_HEALTH_QUIET);
	assert_int_equal(tracker_health_note(true, 3, 0), TRACKER_HEALTH_QUIET);
	assert_int_equal(tracker_health_note(true, 0, 5), TRACKER_HEALTH_RECOVERED);
	assert_int_equal(tracker_health_note(true, 0, 0), TRACKER_HEALTH_RECOVERED);
}

static void heartbeat_ceiling(void **state)
{
	assert_true(tracker_heartbeat_allowed(100.0, 1e9, 0)); /* off */
	assert_true(tracker_heartbeat_allowed(100.0, 159.9, 60));
	assert_false(tracker_heartbeat_allowed(100.0, 160.0, 60));
	assert_false(tracker_heartbeat_allowed(100.0, 500.0, 60));
}

/* /health: every interval, but at most a tenth of the /status budget. */
static void health_interval(void **state)
{
	assert_true(fabs(tracker_health_interval_s(10000, 2000) - 10.0) < 1e-9);
	assert_true(fabs(tracker_health_interval_s(300, 2000) - 0.3) < 1e-9);
	assert_true(fabs(tracker_health_interval_s(100, 20) - 5.0) < 1e-9); /* 1 of 20 per 10 s */
	assert_true(fabs(tracker_health_interval_s(100, 30) - 10.0 / 3.0) < 1e-9);
}

static void queue_cap(void **state)
{
	assert_false(tracker_queue_full(1000000, 100, 0)); /* off */
	assert_false(tracker_queue_full(4, 0, 5));
	assert_true(tracker_queue_full(5, 0, 5));
	assert_true(tracker_queue_full(3, 2, 5)); /* in-flight /run may each add a job */
	assert_false(tracker_queue_full(3, 1, 5));
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
		cmocka_unit_test(status_limit_keeps_the_cap),
		cmocka_unit_test(status_limit_waits_and_reloads),
		cmocka_unit_test(heartbeat_when_a_third_is_left),
		cmocka_unit_test(health_reply),
		cmocka_unit_test(health_note_warns_once),
		cmocka_unit_test(heartbeat_ceiling),
		cmocka_unit_test(queue_cap),
		cmocka_unit_test(health_interval),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
