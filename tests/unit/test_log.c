/* Unit tests for log: logfmt/JSON escaping, secret redaction, truncation. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <ev.h>
#include <fcntl.h>
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
	assert_non_null(strstr(
		out,
		" level=info event=batch_accepted queue=jobs "
		"msg=\"two words \\\"quoted\\\" back\\\\slash\\nnewline\" empty=\"\" jobs=10\n"));
	assert_int_equal(strchr(out, '\n') - out + 1, (long)strlen(out)); /* one line */
}

static void json_format(void **state)
{
	const char *out;

	log_setup(LOG_INFO, LOG_FORMAT_JSON);
	out = capture(emit_fields);
	assert_true(strncmp(out, "{\"time\":\"", 9) == 0);
	assert_non_null(
		strstr(out, "\"level\":\"info\",\"event\":\"batch_accepted\",\"queue\":\"jobs\","));
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
	log_excerpt(l, "body", body, 264, 256); /* the cut falls inside the key */
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
	log_str(l, "v",
		"a\x01"
		"b\x7f");
	log_end(l);
}

static void control_bytes(void **state)
{
	const char *out;

	log_setup(LOG_INFO, LOG_FORMAT_LOGFMT);
	out = capture(emit_control);
	assert_non_null(strstr(out, "v=\"a\\u0001b\\u007f\""));
}

static void emit_numbers(void)
{
	static const long long ids[] = { 7, 9007199254740993LL };
	struct log_line *l = log_begin(LOG_INFO, "n");
	log_num(l, "msg_id", "9007199254740993");
	log_num(l, "odd", "12a");
	log_int_list(l, "msg_ids", ids, 2);
	log_end(l);
}

/* Issue 10: numbers as numbers in JSON, exact past 2^53. */
static void numbers_stay_numbers(void **state)
{
	const char *out;

	log_setup(LOG_INFO, LOG_FORMAT_JSON);
	out = capture(emit_numbers);
	assert_non_null(strstr(out, "\"msg_id\":9007199254740993,\"odd\":\"12a\","
				    "\"msg_ids\":[7,9007199254740993]}\n"));
	log_setup(LOG_INFO, LOG_FORMAT_LOGFMT);
	out = capture(emit_numbers);
	assert_non_null(
		strstr(out, " msg_id=9007199254740993 odd=12a msg_ids=7,9007199254740993\n"));
}

/* Issue 10, defect 7: with a loop attached, a full stderr pipe never blocks
 * a log call; lines beyond the buffer are dropped and counted, and once the
 * pipe is read again one line says how many. */
static void stalled_stderr_never_blocks(void **state)
{
	struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
	int fds[2], saved = dup(STDERR_FILENO);
	unsigned long long before = log_lines_dropped();
	static char buf[512 * 1024];
	size_t total = 0;
	bool note = false;
	int i;

	assert_int_equal(pipe(fds), 0);
	fcntl(fds[1], F_SETPIPE_SZ, 4096);
	dup2(fds[1], STDERR_FILENO);
	close(fds[1]);
	log_setup(LOG_INFO, LOG_FORMAT_LOGFMT);
	assert_int_equal(log_attach_loop(loop), 0);
	/* ~1 MiB of lines into a 4 KiB pipe nobody reads: returns at once. */
	for (i = 0; i < 5000; i++)
		log_msg(LOG_INFO, "filler", "%0200d", i);
	assert_true(log_lines_dropped() > before);
	/* Read everything; the loop writes what waited, then the note. */
	fcntl(fds[0], F_SETFL, O_NONBLOCK);
	for (int round = 0; round < 2000 && !note; round++) {
		ssize_t n;
		ev_run(loop, EVRUN_NOWAIT);
		while ((n = read(fds[0], buf + total, sizeof(buf) - 1 - total)) > 0)
			total += (size_t)n;
		buf[total] = '\0';
		note = strstr(buf, "event=log_lines_dropped") != NULL;
	}
	log_detach_loop(100);
	dup2(saved, STDERR_FILENO);
	close(saved);
	close(fds[0]);
	ev_loop_destroy(loop);
	assert_true(note);
	assert_true(total >= 64 * 1024); /* the buffer's worth came out */
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
		cmocka_unit_test(numbers_stay_numbers),
		cmocka_unit_test(stalled_stderr_never_blocks),
	};
	return cmocka_run_group_tests_name("log", tests, NULL, NULL);
}
