/* Unit tests for the all-or-nothing reload (issue 9): every allocation a
 * reload makes is failed in turn (the binary is linked with --wrap for
 * malloc, calloc, realloc and strdup), and after each failure the old
 * configuration must be fully in effect: snapshot, URLs, auth header,
 * envelope, rate cap with its send times, no tracker. Then the reload that
 * succeeds switches everything. Also the pure reload diff, and that a
 * --once run ends when on_read cannot allocate. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "dispatcher_int.h"
#include "log.h"

/* Allocation-failure injection: when fail_at > 0, the fail_at-th
 * allocation from now on fails (once). */
static int fail_at, allocs;

void *__real_malloc(size_t n);
void *__real_calloc(size_t n, size_t size);
void *__real_realloc(void *p, size_t n);
char *__real_strdup(const char *s);
void *__wrap_malloc(size_t n);
void *__wrap_calloc(size_t n, size_t size);
void *__wrap_realloc(void *p, size_t n);
char *__wrap_strdup(const char *s);

static int injected(void)
{
	return fail_at > 0 && ++allocs == fail_at;
}

void *__wrap_malloc(size_t n)
{
	return injected() ? NULL : __real_malloc(n);
}

void *__wrap_calloc(size_t n, size_t size)
{
	return injected() ? NULL : __real_calloc(n, size);
}

void *__wrap_realloc(void *p, size_t n)
{
	return injected() ? NULL : __real_realloc(p, n);
}

char *__wrap_strdup(const char *s)
{
	return injected() ? NULL : __real_strdup(s);
}

static void ignore_error(void *arg, const char *key, const char *source, const char *problem)
{
	(void)arg;
	fprintf(stderr, "config: %s %s %s\n", key, source, problem);
}

static void load(struct config *cfg, char *const *env)
{
	struct config_input in = { .path = "/nonexistent/pgmq-dispatcher.conf", .envp = env };

	assert_int_equal(config_load(&in, cfg, ignore_error, NULL), 0);
}

static void on_done(void *arg, enum dispatcher_result r)
{
	(void)arg;
	(void)r;
}

static void assert_in_effect(const struct dispatcher *d, const struct config *cfg,
			     const char *endpoint, const char *key, int cap, bool tracker)
{
	char want[256];

	assert_ptr_equal(d->cfg, cfg);
	assert_ptr_equal(d->conf.cfg, cfg);
	snprintf(want, sizeof(want), "/%s/run", endpoint);
	assert_non_null(strstr(d->conf.run_url, want));
	snprintf(want, sizeof(want), "/%s/health", endpoint);
	assert_non_null(strstr(d->conf.health_url, want));
	snprintf(want, sizeof(want), "Authorization: Bearer %s", key);
	assert_string_equal(d->conf.auth_header, want);
	assert_true(d->conf.envelope.len > 0);
	assert_int_equal(d->rl.cap, cap);
	assert_int_equal(d->rl.count, 3 < cap ? 3 : cap);
	assert_true(d->rl.sent_at[d->rl.head] == 3.0 - (3 < cap ? 3 : cap) + 1.0);
	assert_int_equal(d->tracker != NULL, tracker);
}

static void every_failing_step_keeps_the_old_configuration(void **state)
{
	char *env_a[] = { "PGMQD_QUEUE_NAME=jobs",
			  "RUNPOD_ENDPOINT_ID=old-endpoint",
			  "RUNPOD_API_KEY=old-key-123456",
			  "PGMQD_DATABASE_CONNINFO=dbname=old",
			  "PGMQD_RUNPOD_MAX_REQUESTS_PER_10S=5",
			  NULL };
	char *env_b[] = { "PGMQD_QUEUE_NAME=jobs",
			  "RUNPOD_ENDPOINT_ID=new-endpoint",
			  "RUNPOD_API_KEY=new-key-abcdefghijklmnop",
			  "PGMQD_DATABASE_CONNINFO=dbname=new",
			  "PGMQD_RUNPOD_MAX_REQUESTS_PER_10S=2",
			  "PGMQD_TRACKER_ENABLED=on",
			  NULL };
	struct config a, b;
	struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
	struct dispatcher *d;
	int k, failures = 0;

	(void)state;
	load(&a, env_a);
	load(&b, env_b);
	d = dispatcher_new(loop, &a, false, on_done, NULL);
	assert_non_null(d);
	for (int i = 1; i <= 3; i++)
		ratelimit_record(&d->rl, (double)i);
	assert_in_effect(d, &a, "old-endpoint", "old-key-123456", 5, false);

	for (k = 1; k < 1000; k++) {
		int rc;

		allocs = 0;
		fail_at = k;
		rc = dispatcher_reload(d, &b);
		fail_at = 0;
		if (allocs < k) {
			/* No k-th allocation: nothing failed, the reload is done. */
			assert_int_equal(rc, 0);
			break;
		}
		/* The k-th allocation failed: the reload must say so and
		 * leave everything as it was. */
		assert_int_equal(rc, -1);
		assert_in_effect(d, &a, "old-endpoint", "old-key-123456", 5, false);
		failures++;
	}
	/* Auth header, envelope, rate-cap ring, tracker, conninfo at least. */
	assert_true(failures >= 5);
	assert_in_effect(d, &b, "new-endpoint", "new-key-abcdefghijklmnop", 2, true);

	dispatcher_free(d);
	config_free(&a);
	config_free(&b);
	ev_loop_destroy(loop);
}

static void record_done(void *arg, enum dispatcher_result r)
{
	*(int *)arg = (int)r;
}

/* A --once run whose read came back but whose read_result cannot be
 * allocated must still end (it used to return without finishing, and
 * --once hung). */
static void once_ends_when_a_read_cannot_be_kept(void **state)
{
	char *env[] = { "PGMQD_QUEUE_NAME=jobs", "RUNPOD_ENDPOINT_ID=ep",
			"RUNPOD_API_KEY=key-123456", NULL };
	struct config a;
	struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
	struct pgmq_batch *rows = calloc(1, sizeof(*rows));
	int result = -1;
	struct dispatcher *d;

	(void)state;
	load(&a, env);
	d = dispatcher_new(loop, &a, true, record_done, &result);
	assert_non_null(d);
	rows->n = 1;
	rows->msgs = calloc(1, sizeof(*rows->msgs));
	rows->msgs[0] = (struct pgmq_message){ .msg_id = "1",
					       .msg_id_num = 1,
					       .read_ct = "1",
					       .enqueued_at = "\"x\"",
					       .message = "{}",
					       .message_len = 2,
					       .id_ok = true };
	d->reading = true;
	allocs = 0;
	fail_at = 1; /* the read_result */
	dispatcher_on_read(d, rows, NULL);
	fail_at = 0;
	assert_int_equal(allocs, 1);
	assert_int_equal(result, DISPATCH_DONE_FAILED);
	dispatcher_free(d);
	config_free(&a);
	ev_loop_destroy(loop);
}

static void reload_diff_table(void **state)
{
	struct config a = { .conninfo = "dbname=a", .max_requests_per_10s = 5 };
	struct config b = a;
	static const struct {
		bool tracker_on, have, once, stopping, new_tracker;
	} cases[] = {
		{ false, false, false, false, false }, { true, false, false, false, true },
		{ true, true, false, false, false }, /* already running */
		{ true, false, true, false, false }, /* --once never tracks */
		{ true, false, false, true, false }, /* stopping: not now */
	};

	(void)state;
	assert_false(dispatcher_reload_diff(&a, &b, false, false, false).rate_cap);
	assert_false(dispatcher_reload_diff(&a, &b, false, false, false).conninfo);
	b.max_requests_per_10s = 6;
	b.conninfo = "dbname=b";
	assert_true(dispatcher_reload_diff(&a, &b, false, false, false).rate_cap);
	assert_true(dispatcher_reload_diff(&a, &b, false, false, false).conninfo);
	/* Only a new key, endpoint, base URL or CA probes an open circuit at once. */
	assert_false(dispatcher_reload_diff(&a, &b, false, false, false).runpod);
	b.api_key = "rp_new";
	assert_true(dispatcher_reload_diff(&a, &b, false, false, false).runpod);
	b.api_key = NULL;
	b.ca_file = "/etc/ca.pem";
	assert_true(dispatcher_reload_diff(&a, &b, false, false, false).runpod);
	b.ca_file = NULL;
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		b.tracker_enabled = cases[i].tracker_on;
		assert_int_equal(dispatcher_reload_diff(&a, &b, cases[i].have, cases[i].once,
							cases[i].stopping)
					 .new_tracker,
				 cases[i].new_tracker);
	}
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(every_failing_step_keeps_the_old_configuration),
		cmocka_unit_test(reload_diff_table),
		cmocka_unit_test(once_ends_when_a_read_cannot_be_kept),
	};

	log_setup(LOG_ERROR, LOG_FORMAT_LOGFMT);
	return cmocka_run_group_tests(tests, NULL, NULL);
}
