/* Unit tests for runpod: /run body (golden bytes), reply parsing, outcome
 * classification. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "runpod.h"

static void body_golden_bytes(void **state)
{
	struct pgmq_message m[2] = {
		{ .msg_id = "9007199254740993",
		  .read_ct = "1",
		  .enqueued_at = "\"2026-11-29T07:30:20.75052+00:00\"",
		  .message =
			  "{\"lang\": \"de\", \"document_id\": \"d-1\", \"title\": \"K\xc3\xb6ln \xf0\x9f\x8e\xac\"}",
		  .document_id = "\"d-1\"" },
		{ .msg_id = "7",
		  .read_ct = "12",
		  .enqueued_at = "\"2026-11-29T07:30:21+00:00\"",
		  .message = "[1, 2.50, \"x\"]",
		  .document_id = NULL },
	};
	size_t len = 0;
	char *body;

	for (int i = 0; i < 2; i++)
		m[i].message_len = strlen(m[i].message);
	body = runpod_run_body("video_audio_transcription", 1800, NULL, m, 2, &len);
	const char *want =
		"{\"input\":{\"queue\":\"video_audio_transcription\",\"vt_seconds\":1800,\"jobs\":["
		"{\"msg_id\":9007199254740993,\"read_ct\":1,"
		"\"enqueued_at\":\"2026-11-29T07:30:20.75052+00:00\",\"document_id\":\"d-1\","
		"\"message\":{\"lang\": \"de\", \"document_id\": \"d-1\", \"title\": \"K\xc3\xb6ln \xf0\x9f\x8e\xac\"}},"
		"{\"msg_id\":7,\"read_ct\":12,\"enqueued_at\":\"2026-11-29T07:30:21+00:00\","
		"\"document_id\":null,\"message\":[1, 2.50, \"x\"]}]}}";

	assert_non_null(body);
	assert_string_equal(body, want);
	assert_int_equal(len, strlen(want));
	free(body);
}

static void body_scalar_messages(void **state)
{
	struct pgmq_message m[3] = {
		{ .msg_id = "1",
		  .read_ct = "1",
		  .enqueued_at = "\"t\"",
		  .message = "\"just a string\"" },
		{ .msg_id = "2", .read_ct = "1", .enqueued_at = "\"t\"", .message = "null" },
		{ .msg_id = "3", .read_ct = "1", .enqueued_at = "\"t\"", .message = "-1.5e+300" },
	};
	char *body;

	for (int i = 0; i < 3; i++)
		m[i].message_len = strlen(m[i].message);
	body = runpod_run_body("q", 30, NULL, m, 3, NULL);

	assert_non_null(body);
	assert_non_null(strstr(body, "\"message\":\"just a string\""));
	assert_non_null(strstr(body, "\"message\":null"));
	assert_non_null(strstr(body, "\"message\":-1.5e+300"));
	assert_non_null(strstr(body, "\"vt_seconds\":30"));
	free(body);
}

static void body_queue_name_is_escaped(void **state)
{
	struct pgmq_message m = { .msg_id = "1",
				  .read_ct = "1",
				  .enqueued_at = "\"t\"",
				  .message = "{}",
				  .message_len = 2 };
	char *body = runpod_run_body("we\"ird\\q", 30, NULL, &m, 1, NULL);

	assert_non_null(strstr(body, "\"queue\":\"we\\\"ird\\\\q\""));
	free(body);
}

static void body_extras(void **state)
{
	struct pgmq_message m = { .msg_id = "1",
				  .read_ct = "1",
				  .enqueued_at = "\"t\"",
				  .message = "{}",
				  .message_len = 2 };
	struct runpod_extras x = { .webhook = "https://hooks.example.com/done",
				   .execution_timeout_ms = 600000,
				   .ttl_ms = 86400000,
				   .low_priority = true };
	struct runpod_extras none = { .webhook = "" };
	char *body = runpod_run_body("q", 30, &x, &m, 1, NULL);

	assert_non_null(strstr(
		body,
		"]},\"webhook\":\"https://hooks.example.com/done\","
		"\"policy\":{\"executionTimeout\":600000,\"ttl\":86400000,\"lowPriority\":true}}"));
	free(body);
	body = runpod_run_body("q", 30, &none, &m, 1, NULL);
	assert_null(strstr(body, "webhook"));
	assert_null(strstr(body, "policy"));
	free(body);
}

static void url_building(void **state)
{
	char buf[64];

	assert_int_equal(runpod_url("https://api.runpod.ai/v2", "abc123", "run", buf, sizeof(buf)),
			 0);
	assert_string_equal(buf, "https://api.runpod.ai/v2/abc123/run");
	assert_int_equal(runpod_url("https://api.runpod.ai/v2", "abc123", "run", buf, 10), -1);
}

static void reply_parsing(void **state)
{
	struct runpod_run_reply r;
	static const struct {
		const char *body;
		int rc;
		const char *id, *status;
	} cases[] = {
		{ "{\"id\":\"0b7f9c52-u1\",\"status\":\"IN_QUEUE\"}", 0, "0b7f9c52-u1",
		  "IN_QUEUE" },
		{ "{\"status\":\"IN_QUEUE\",\"id\":\"x\",\"delayTime\":3,\"extra\":{}}", 0, "x",
		  "IN_QUEUE" },
		{ "{\"id\":\"x\"}", 0, "x", "" },
		{ "{\"id\":\"x\",\"status\":5}", 0, "x", "" },
		{ "{\"id\":\"\"}", -1, "", "" },
		{ "{\"id\":17}", -1, "", "" },
		{ "{\"status\":\"IN_QUEUE\"}", -1, "", "" },
		{ "[\"id\"]", -1, "", "" },
		{ "not json", -1, "", "" },
		{ "", -1, "", "" },
		{ "{\"id\":\"a\\nb\"}", -1, "", "" },
		{ "{\"id\":\"x\",\"status\":\"IN_QUEUE\"", -1, "", "" },
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		int rc = runpod_parse_run_reply(cases[i].body, strlen(cases[i].body), &r);
		assert_int_equal(rc, cases[i].rc);
		assert_string_equal(r.id, cases[i].id);
		assert_string_equal(r.status, cases[i].status);
	}
}

static void reply_parsing_respects_length(void **state)
{
	struct runpod_run_reply r;
	const char *body = "{\"id\":\"x\"}GARBAGE";

	assert_int_equal(runpod_parse_run_reply(body, 10, &r), 0);
	assert_int_equal(runpod_parse_run_reply(body, 9, &r), -1);
}

static void reply_id_too_long(void **state)
{
	char body[400];
	struct runpod_run_reply r;

	snprintf(body, sizeof(body), "{\"id\":\"%0*d\"}", RUNPOD_JOB_ID_MAX + 1, 0);
	assert_int_equal(runpod_parse_run_reply(body, strlen(body), &r), -1);
	snprintf(body, sizeof(body), "{\"id\":\"%0*d\"}", RUNPOD_JOB_ID_MAX, 0);
	assert_int_equal(runpod_parse_run_reply(body, strlen(body), &r), 0);
}

/* Issue 10, defect 3: every string of a reply is judged on its raw bytes.
 * Debian's cJSON reads "job\uX000" as "job" and "abc\u0000def" as "abc". */
static void reply_strings_judged_on_raw_bytes(void **state)
{
	static const struct {
		const char *body;
		const char *why; /* NULL: accepted */
	} cases[] = {
		{ "{\"id\":\"job\\uX000\"}", "invalid escape in a string" },
		{ "{\"id\":\"abc\\u0000def\"}", "id: control character" },
		{ "{\"id\":\"abc\\u001fdef\"}", "id: control character" },
		{ "{\"id\":\"abc\\u0085def\"}", "id: control character" },
		{ "{\"id\":\"ab\\tc\"}", "id: control character" },
		{ "{\"id\":\"ab\x7f\"}", "id: control character" },
		{ "{\"id\":\"ab\xc3\"}", "invalid UTF-8 in a string" },
		{ "{\"id\":\"ab\xc0\xaf\"}", "invalid UTF-8 in a string" },     /* overlong '/' */
		{ "{\"id\":\"ab\xed\xa0\x80\"}", "invalid UTF-8 in a string" }, /* surrogate */
		{ "{\"id\":\"ab\\ud800\"}", "invalid escape in a string" },     /* lone surrogate */
		{ "{\"id\":\"ab\\udc00\\ud800\"}", "invalid escape in a string" },
		{ "{\"id\":\"a\",\"id\":\"b\"}", "id: appears twice" },
		{ "{\"id\":\"ok\",\"x\":[\"\\uZZZZ\"]}", "invalid escape in a string" },
		{ "{\"id\":\"ok\",\"k\\u0000\":1}", NULL },
		{ "{\"id\\u0000\":\"bad\",\"id\":\"ok\"}", NULL },
		{ "{\"id\":\"K\xc3\xb6ln-\xf0\x9f\x8e\xac\"}", NULL },
		{ "{\"id\":\"\\u00e9\\ud83c\\udfac\\/\"}", NULL },
	};
	struct runpod_run_reply r;
	const char *b;

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		int rc = runpod_parse_run_reply(cases[i].body, strlen(cases[i].body), &r);
		if (cases[i].why == NULL) {
			assert_int_equal(rc, 0);
			assert_true(r.id[0] != '\0');
		} else {
			assert_int_equal(rc, -1);
			assert_string_equal(r.id, "");
			assert_string_equal(r.why, cases[i].why);
		}
	}
	b = "{\"id\":\"\\u00e9\\ud83c\\udfac\"}";
	assert_int_equal(runpod_parse_run_reply(b, strlen(b), &r), 0);
	assert_string_equal(r.id, "\xc3\xa9\xf0\x9f\x8e\xac");
	/* A bad status leaves status empty, the id still counts. */
	b = "{\"id\":\"x\",\"status\":\"IN\\u0000Q\"}";
	assert_int_equal(runpod_parse_run_reply(b, strlen(b), &r), 0);
	assert_string_equal(r.id, "x");
	assert_string_equal(r.status, "");
}

/* The same rules for /status: status and id on raw bytes, error kept with
 * its line breaks but never with other control characters. */
static void status_strings_judged_on_raw_bytes(void **state)
{
	struct runpod_status_reply s;
	const char *b;

	b = "{\"status\":\"COMPLETED\\u0000X\"}";
	assert_int_equal(runpod_parse_status_reply(b, strlen(b), &s), -1);
	b = "{\"status\":\"COMPLE\\uX000\"}";
	assert_int_equal(runpod_parse_status_reply(b, strlen(b), &s), -1);
	b = "{\"status\":\"FAILED\",\"id\":\"j\\u0000k\",\"error\":\"Trace:\\n  at x\"}";
	assert_int_equal(runpod_parse_status_reply(b, strlen(b), &s), 0);
	assert_string_equal(s.id, "");
	assert_string_equal(s.error, "Trace:\n  at x");
	b = "{\"status\":\"FAILED\",\"error\":\"boom\\u001b[31m\"}";
	assert_int_equal(runpod_parse_status_reply(b, strlen(b), &s), 0);
	assert_string_equal(s.status, "FAILED");
	assert_string_equal(s.error, "(error text not shown: control character)");
}

static void classification(void **state)
{
	static const struct {
		struct runpod_attempt a;
		enum runpod_outcome want;
	} cases[] = {
		{ { 200, false, true, true, true }, RUNPOD_ACCEPTED },
		{ { 201, false, true, true, true }, RUNPOD_ACCEPTED },
		{ { 200, false, true, true, false }, RUNPOD_UNKNOWN }, /* 2xx, no id */
		{ { 200, true, true, true, true }, RUNPOD_UNKNOWN },   /* reset mid-body */
		{ { 504, false, true, true, false }, RUNPOD_UNKNOWN },
		{ { 0, true, true, true, false }, RUNPOD_UNKNOWN },    /* timeout after sending */
		{ { 0, true, false, false, false }, RUNPOD_REJECTED }, /* connection refused */
		{ { 0, true, true, false, false }, RUNPOD_REJECTED },  /* connected, nothing sent */
		{ { 400, false, true, true, false }, RUNPOD_REJECTED },
		{ { 401, false, true, true, false }, RUNPOD_REJECTED },
		{ { 403, false, true, true, false }, RUNPOD_REJECTED },
		{ { 404, false, true, true, false }, RUNPOD_REJECTED },
		{ { 413, false, true, true, false }, RUNPOD_REJECTED },
		{ { 429, false, true, true, false }, RUNPOD_REJECTED },
		{ { 500, false, true, true, false }, RUNPOD_REJECTED },
		{ { 502, false, true, true, false }, RUNPOD_REJECTED },
		{ { 503, false, true, true, false }, RUNPOD_REJECTED },
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		enum runpod_outcome got = runpod_classify(&cases[i].a);
		if (got != cases[i].want)
			fail_msg("case %zu (status %ld): got %s, want %s", i,
				 cases[i].a.http_status, runpod_outcome_name(got),
				 runpod_outcome_name(cases[i].want));
	}
	assert_true(runpod_is_config_error(401));
	assert_true(runpod_is_config_error(403));
	assert_true(runpod_is_config_error(404));
	assert_false(runpod_is_config_error(429));
	assert_false(runpod_is_config_error(500));
}

static void job_bytes_match_the_body(void **state)
{
	struct pgmq_message m[3] = {
		{ .msg_id = "9007199254740993",
		  .read_ct = "1",
		  .enqueued_at = "\"2026-11-29T07:30:20+00:00\"",
		  .message = "{\"a\": \"\u00e9\"}",
		  .document_id = NULL },
		{ .msg_id = "7",
		  .read_ct = "12",
		  .enqueued_at = "\"t\"",
		  .message = "[1]",
		  .document_id = "\"doc\"" },
		{ .msg_id = "8", .read_ct = "1", .enqueued_at = "\"t\"", .message = "null" },
	};
	for (int i = 0; i < 3; i++)
		m[i].message_len = strlen(m[i].message);
	for (int n = 0; n <= 3; n++) {
		struct runpod_extras x = { .webhook = "https://hooks.example.com/rp?a=1",
					   .ttl_ms = 60000,
					   .low_priority = true };
		size_t len = 0, want = runpod_envelope_bytes("q\"x", 1800, &x);
		char *body = runpod_run_body("q\"x", 1800, &x, m, n, &len);
		for (int i = 0; i < n; i++)
			want += runpod_job_bytes(&m[i]) + (i ? 1 : 0);
		assert_int_equal(len, want);
		free(body);
	}
}

static void retry_after(void **state)
{
	/* 2026-11-29 08:00:00 UTC */
	const time_t now = 1795939200;
	static const struct {
		const char *v;
		int rc;
		long long ms;
	} cases[] = {
		{ "0", 0, 0 },
		{ "120", 0, 120000 },
		{ "Sun, 29 Nov 2026 08:00:30 GMT", 0, 30000 },
		{ "Sunday, 29-Nov-26 08:01:00 GMT", 0, 60000 },
		{ "Sun Nov 29 08:00:05 2026", 0, 5000 },
		{ "Sun, 29 Nov 2026 07:59:00 GMT", 0, 0 }, /* in the past */
		{ "", -1, 0 },
		{ "-5", -1, 0 },
		{ "1.5", -1, 0 },
		{ " 5", -1, 0 },
		{ "5s", -1, 0 },
		{ "soon", -1, 0 },
		{ "Sun, 29 Nov 2026 08:00:30 CET", 0, 0 }, /* curl_getdate: 07:00:30 GMT, past */
		{ "Sun, 32 Nov 2026 08:00:30 GMT", -1, 0 },
		{ "Sun, 29 Foo 2026 08:00:30 GMT", -1, 0 },
		{ "Sun, 29 Nov 2026 25:00:30 GMT", -1, 0 },
		{ "Sun, 29 Nov 2026 08:00:30 GMT trailing", 0, 30000 }, /* curl ignores the word */
		{ "99999999999999999999999", -1, 0 },
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		long long ms = -7;
		int rc = runpod_parse_retry_after(cases[i].v, now, &ms);
		if (rc != cases[i].rc || (rc == 0 && ms != cases[i].ms))
			fail_msg("'%s': rc %d ms %lld, want rc %d ms %lld", cases[i].v, rc, ms,
				 cases[i].rc, cases[i].ms);
	}
	assert_int_equal(runpod_parse_retry_after(NULL, now, NULL), -1);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(body_golden_bytes),
		cmocka_unit_test(body_scalar_messages),
		cmocka_unit_test(body_queue_name_is_escaped),
		cmocka_unit_test(body_extras),
		cmocka_unit_test(url_building),
		cmocka_unit_test(reply_parsing),
		cmocka_unit_test(reply_parsing_respects_length),
		cmocka_unit_test(reply_id_too_long),
		cmocka_unit_test(reply_strings_judged_on_raw_bytes),
		cmocka_unit_test(status_strings_judged_on_raw_bytes),
		cmocka_unit_test(classification),
		cmocka_unit_test(job_bytes_match_the_body),
		cmocka_unit_test(retry_after),
	};
	return cmocka_run_group_tests_name("runpod", tests, NULL, NULL);
}
