/* Unit tests for log: logfmt/JSON escaping, secret redaction, truncation. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"

static char captured[16384];

/* Runs fn with stderr redirected to a temporary file; returns what it wrote. */
static const char *capture(void (*fn)(void))
{
	FILE *tmp = tmpfile();
	int saved = dup(STDERR_FILENO);
	size_t n;

	assert_non_null(tmp);
	dup2(fileno(tmp), STDERR_FILENO);
	fn();
	dup2(saved, STDERR_FILENO);
	close(saved);
	rewind(tmp);
	n = fread(captured, 1, sizeof(captured) - 1, tmp);
	captured[n] = '\0';
	fclose(tmp);
	return captured;
}

static void emit_fields(void)
{
	struct log_line *l = log_begin(LOG_INFO, "batch_accepted");
	log_str(l, "queue", "jobs");
	log_str(l, "msg", "two words \"quoted\" back\\slash\nnewline");
	log_str(l, "empty", "");
	log_int(l, "jobs", 10);
	log_end(l);
}

static void logfmt_escaping(void **state)
{
	const char *out;

	unsetenv("JOURNAL_STREAM");
	log_setup(LOG_INFO, LOG_FORMAT_LOGFMT);
	out = capture(emit_fields);
	assert_true(strncmp(out, "time=", 5) == 0);
	assert_non_null(strstr(out, " level=info event=batch_accepted queue=jobs "
				    "msg=\"two words \\\"quoted\\\" back\\\\slash\\nnewline\" empty=\"\" jobs=10\n"));
	assert_int_equal(strchr(out, '\n') - out + 1, (long)strlen(out)); /* one line */
}

static void json_format(void **state)
{
	const char *out;

	log_setup(LOG_INFO, LOG_FORMAT_JSON);
	out = capture(emit_fields);
	assert_true(strncmp(out, "{\"time\":\"", 9) == 0);
	assert_non_null(strstr(out, "\"level\":\"info\",\"event\":\"batch_accepted\",\"queue\":\"jobs\","));
	assert_non_null(strstr(out, "\"jobs\":10}\n"));
	log_setup(LOG_INFO, LOG_FORMAT_LOGFMT);
}

static void emit_debug(void)
{
	log_msg(LOG_DEBUG, "hidden", "should not appear");
	log_msg(LOG_WARN, "shown", "x");
}

static void level_threshold(void **state)
{
	const char *out;

	log_setup(LOG_INFO, LOG_FORMAT_LOGFMT);
	out = capture(emit_debug);
	assert_null(strstr(out, "hidden"));
	assert_non_null(strstr(out, "event=shown"));
	assert_int_equal(log_level_parse("trace"), LOG_TRACE);
	assert_int_equal(log_level_parse("loud"), -1);
}

static void emit_secret(void)
{
	log_msg(LOG_ERROR, "oops", "key is rp_SECRETKEY_123 and again rp_SECRETKEY_123!");
}

static void redaction(void **state)
{
	const char *out;

	log_setup(LOG_INFO, LOG_FORMAT_LOGFMT);
	assert_int_equal(log_secret_add("rp_SECRETKEY_123"), 0);
	out = capture(emit_secret);
	assert_null(strstr(out, "rp_SECRETKEY_123"));
	assert_non_null(strstr(out, "key is *** and again ***!"));
	log_secret_clear();
	out = capture(emit_secret);
	assert_non_null(strstr(out, "rp_SECRETKEY_123"));
}

static void emit_tricky_secret(void)
{
	static char body[300];
	struct log_line *l = log_begin(LOG_INFO, "rejected");

	log_str(l, "echo", "bad key rp_AB\"CD\\1234xyz here");
	memset(body, 'x', 240);
	memcpy(body + 240, "Bearer rp_AB\"CD\\1234xyz", 24);
	log_excerpt(l, "body", body, 264, 256);   /* the cut falls inside the key */
	log_str(l, "raw", "caf\xc3\xa9 \xe9 end");
	log_end(l);
}

static void secrets_with_quotes_and_cuts(void **state)
{
	const char *out;

	log_setup(LOG_INFO, LOG_FORMAT_LOGFMT);
	assert_int_equal(log_secret_add("rp_AB\"CD\\1234xyz"), 0);
	out = capture(emit_tricky_secret);
	log_secret_clear();
	assert_null(strstr(out, "1234xyz"));
	assert_null(strstr(out, "rp_AB"));
	assert_non_null(strstr(out, "echo=\"bad key *** here\""));
	assert_non_null(strstr(out, "Bearer ***"));
	/* Invalid UTF-8 from the network becomes U+FFFD; valid text stays. */
	assert_non_null(strstr(out, "raw=\"caf\xc3\xa9 \\ufffd end\""));
}

static void emit_huge(void)
{
	static char big[20000];
	struct log_line *l;

	memset(big, 'x', sizeof(big) - 1);
	l = log_begin(LOG_INFO, "huge");
	for (int i = 0; i < 6; i++)
		log_str(l, "field", big);
	log_int(l, "after", 1);
	log_end(l);
}

static void truncation_keeps_lines_whole(void **state)
{
	const char *out;

	log_setup(LOG_INFO, LOG_FORMAT_JSON);
	out = capture(emit_huge);
	assert_true(strlen(out) <= 8192 + 1);
	assert_non_null(strstr(out, ",\"truncated\":true}\n"));
	assert_int_equal(strchr(out, '\n') - out + 1, (long)strlen(out));
	log_setup(LOG_INFO, LOG_FORMAT_LOGFMT);
	out = capture(emit_huge);
	assert_non_null(strstr(out, " truncated=true\n"));
}

static void emit_control(void)
{
	struct log_line *l = log_begin(LOG_INFO, "ctl");
	log_str(l, "v", "a\x01" "b\x7f");
	log_end(l);
}

static void control_bytes(void **state)
{
	const char *out;

	log_setup(LOG_INFO, LOG_FORMAT_LOGFMT);
	out = capture(emit_control);
	assert_non_null(strstr(out, "v=\"a\\u0001b\\u007f\""));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(logfmt_escaping),
		cmocka_unit_test(json_format),
		cmocka_unit_test(level_threshold),
		cmocka_unit_test(redaction),
		cmocka_unit_test(secrets_with_quotes_and_cuts),
		cmocka_unit_test(truncation_keeps_lines_whole),
		cmocka_unit_test(control_bytes),
	};
	return cmocka_run_group_tests_name("log", tests, NULL, NULL);
}
