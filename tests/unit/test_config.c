/* Unit tests for config: defaults, precedence, validation, secrets. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"

struct errors {
	int n;
	char lines[16][512];
};

static void collect(void *arg, const char *key, const char *source, const char *problem)
{
	struct errors *e = arg;

	if (e->n < 16)
		snprintf(e->lines[e->n], sizeof(e->lines[0]), "%s|%s|%s", key, source, problem);
	e->n++;
}

#define BASE_ENV "PGMQD_QUEUE_NAME=jobs", "RUNPOD_ENDPOINT_ID=ep1", "RUNPOD_API_KEY=key-123456"

static int load_env(char *const *envp, const char *const *cli, struct config *cfg, struct errors *e)
{
	struct config_input in = { .path = "/nonexistent/pgmq-dispatcher.conf",
				   .envp = envp,
				   .cli_overrides = cli };
	memset(e, 0, sizeof(*e));
	return config_load(&in, cfg, collect, e);
}

static char *write_file(const char *text)
{
	static char path[64];
	int fd;

	snprintf(path, sizeof(path), "/tmp/pgmqd-test-XXXXXX");
	fd = mkstemp(path);
	assert_true(fd >= 0);
	assert_int_equal(write(fd, text, strlen(text)), (ssize_t)strlen(text));
	close(fd);
	return path;
}

static void defaults(void **state)
{
	char *env[] = { BASE_ENV, NULL };
	struct config c;
	struct errors e;

	assert_int_equal(load_env(env, NULL, &c, &e), 0);
	assert_int_equal(c.vt_seconds, 1800);
	assert_int_equal(c.batch_size, 10);
	assert_string_equal(c.read_function, "pgmq.read");
	assert_string_equal(c.base_url, "https://api.runpod.ai/v2");
	assert_string_equal(c.conninfo, "");
	assert_string_equal(c.queue_name, "jobs");
	assert_string_equal(c.endpoint_id, "ep1");
	assert_string_equal(c.api_key, "key-123456");
	config_free(&c);
}

/* Each bad value: exactly one error naming the key. */
static void bad_values(void **state)
{
	static const struct {
		const char *env;
		const char *key;
		const char *problem_part;
	} cases[] = {
		{ "PGMQD_QUEUE_VT_SECONDS=0", "queue.vt_seconds", "between 1 and" },
		{ "PGMQD_QUEUE_VT_SECONDS=-5", "queue.vt_seconds", "between 1 and" },
		{ "PGMQD_QUEUE_BATCH_SIZE=0", "queue.batch_size", "between 1 and" },
		{ "PGMQD_QUEUE_BATCH_SIZE=abc", "queue.batch_size", "not an integer: 'abc'" },
		{ "PGMQD_QUEUE_BATCH_SIZE=10x", "queue.batch_size", "not an integer" },
		{ "PGMQD_QUEUE_BATCH_SIZE= 10", "queue.batch_size", "not an integer" },
		{ "PGMQD_QUEUE_BATCH_SIZE=99999999999999999999", "queue.batch_size",
		  "not an integer" },
		{ "PGMQD_QUEUE_BATCH_SIZE=", "queue.batch_size", "not an integer" },
		{ "PGMQD_QUEUE_POLL_INTERVAL_MS=1", "queue.poll_interval_ms", "between" },
		{ "PGMQD_QUEUE_READ_FUNCTION=pgmq.read; drop table x", "queue.read_function",
		  "[schema.]function" },
		{ "PGMQD_QUEUE_READ_FUNCTION=.read", "queue.read_function", "[schema.]function" },
		{ "PGMQD_QUEUE_READ_FUNCTION=a.b.c", "queue.read_function", "[schema.]function" },
		{ "PGMQD_QUEUE_NAME=", "queue.name", "must not be empty" },
		{ "PGMQD_QUEUE_NAME=a;b", "queue.name", "pgmq rejects" },
		{ "PGMQD_QUEUE_NAME=a--b", "queue.name", "pgmq rejects" },
		{ "PGMQD_QUEUE_NAME=aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "queue.name",
		  "47" },
		{ "PGMQD_RUNPOD_ENDPOINT_ID=a/b", "runpod.endpoint_id", "letters, digits" },
		{ "PGMQD_RUNPOD_BASE_URL=ftp://x", "runpod.base_url", "https://" },
		{ "PGMQD_RUNPOD_BASE_URL=https://", "runpod.base_url", "no host" },
		{ "PGMQD_RUNPOD_BASE_URL=http://api.runpod.ai/v2", "runpod.base_url", "loopback" },
		{ "PGMQD_RUNPOD_BASE_URL=http://127.0.0.1@evil.example/v2", "runpod.base_url",
		  "loopback" },
		{ "PGMQD_RUNPOD_BASE_URL=http://127.0.0.256/v2", "runpod.base_url", "loopback" },
		{ "PGMQD_RUNPOD_BASE_URL=http://[::1]x/v2", "runpod.base_url", "loopback" },
		{ "PGMQD_RUNPOD_CA_FILE=/nonexistent/ca.pem", "runpod.ca_file", "no such file" },
		{ "PGMQD_RUNPOD_CA_FILE=ca.pem", "runpod.ca_file", "absolute" },
		{ "PGMQD_RUNPOD_CA_FILE=/", "runpod.ca_file", "regular file" },
		{ "PGMQD_RUNPOD_API_KEY=has space", "runpod.api_key", "whitespace" },
		{ "PGMQD_LOG_LEVEL=loud", "log.level", "one of error, warn, info, debug, trace" },
		{ "PGMQD_LOG_FORMAT=xml", "log.format", "one of logfmt, json" },
		{ "PGMQD_DATABASE_CONNINFO=host=x port", "database.conninfo", "not a valid libpq" },
		{ "PGMQD_QUEUE_BATCHSIZE=10", "PGMQD_QUEUE_BATCHSIZE",
		  "unknown environment variable" },
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		char *env[] = { (char *)cases[i].env, BASE_ENV, NULL };
		struct config c;
		struct errors e;
		int n = load_env(env, NULL, &c, &e);

		if (n != 1 || strncmp(e.lines[0], cases[i].key, strlen(cases[i].key)) != 0 ||
		    strstr(e.lines[0], cases[i].problem_part) == NULL)
			fail_msg("%s: %d errors, first: %s", cases[i].env, n,
				 e.n ? e.lines[0] : "-");
	}
}

static void required_keys(void **state)
{
	char *env[] = { "PGMQD_QUEUE_NAME=jobs", "RUNPOD_API_KEY=key-123456", NULL };
	struct config c;
	struct errors e;

	assert_int_equal(load_env(env, NULL, &c, &e), 1);
	assert_non_null(strstr(e.lines[0], "runpod.endpoint_id|"));
	assert_non_null(strstr(e.lines[0], "is required"));
}

static void precedence(void **state)
{
	char *path = write_file("[queue]\nname = fromfile\nbatch_size = 5\nvt_seconds = 60\n"
				"[runpod]\nendpoint_id = epfile\napi_key = \"quoted-key\"\n");
	char *env[] = { "PGMQD_QUEUE_BATCH_SIZE=7", "PGMQD_QUEUE_VT_SECONDS=70", NULL };
	const char *cli[] = { "queue.vt_seconds=80", NULL };
	struct config_input in = { .path = path,
				   .path_explicit = true,
				   .envp = env,
				   .cli_overrides = cli };
	struct config c;
	struct errors e = { 0 };

	assert_int_equal(config_load(&in, &c, collect, &e), 0);
	assert_string_equal(c.queue_name, "fromfile"); /* file over default */
	assert_int_equal(c.batch_size, 7);             /* env over file */
	assert_int_equal(c.vt_seconds, 80);            /* cli over env */
	assert_string_equal(c.api_key, "quoted-key");  /* quotes stripped */
	assert_int_equal(c.poll_interval_ms, 1000);    /* default */
	config_free(&c);
	unlink(path);
}

static void pgmqd_name_beats_compat_name(void **state)
{
	char *env[] = { "PGMQD_QUEUE_NAME=q",
			"RUNPOD_ENDPOINT_ID=compat",
			"PGMQD_RUNPOD_ENDPOINT_ID=mine",
			"RUNPOD_API_KEY=key-123456",
			"DATABASE_URL=postgresql://u@h/db",
			NULL };
	struct config c;
	struct errors e;

	assert_int_equal(load_env(env, NULL, &c, &e), 0);
	assert_string_equal(c.endpoint_id, "mine");
	assert_string_equal(c.conninfo, "postgresql://u@h/db");
	config_free(&c);
}

static void file_errors_name_line(void **state)
{
	char *path = write_file("[queue]\nname = q\nbogus = 1\nbatch_size = 0\n[runpod]\n"
				"endpoint_id = e\napi_key = k-123456\n");
	char *env[] = { NULL };
	struct config_input in = { .path = path, .path_explicit = true, .envp = env };
	struct config c;
	struct errors e = { 0 };

	assert_int_equal(config_load(&in, &c, collect, &e), 2);
	assert_non_null(strstr(e.lines[0], "queue.bogus|file "));
	assert_non_null(strstr(e.lines[0], ":3|unknown key"));
	assert_non_null(strstr(e.lines[1], "queue.batch_size|file "));
	assert_non_null(strstr(e.lines[1], ":4|must be between 1 and 1000, got 0"));
	unlink(path);
}

static void file_long_line_and_syntax(void **state)
{
	char text[600];
	char *path;
	char *env[] = { BASE_ENV, NULL };
	struct config c;
	struct errors e = { 0 };
	struct config_input in = { .path_explicit = true, .envp = env };

	snprintf(text, sizeof(text), "[database]\nconninfo = host=%0300d\n", 0);
	in.path = path = write_file(text);
	assert_int_equal(config_load(&in, &c, collect, &e), 1);
	assert_non_null(strstr(e.lines[0], ":2|line of 199 bytes or more"));
	unlink(path);

	memset(&e, 0, sizeof(e));
	in.path = path = write_file("[queue]\nname = x\n[runpod\n");
	assert_int_equal(config_load(&in, &c, collect, &e), 1);
	assert_non_null(strstr(e.lines[0], "config|file "));
	assert_non_null(strstr(e.lines[0], ":3|syntax error"));
	unlink(path);
}

static void missing_files(void **state)
{
	char *env[] = { BASE_ENV, NULL };
	struct config c;
	struct errors e = { 0 };
	struct config_input in = { .path = "/nonexistent/x.conf",
				   .path_explicit = true,
				   .envp = env };

	assert_int_equal(config_load(&in, &c, collect, &e), 1);
	assert_non_null(strstr(e.lines[0], "cannot open the configuration file"));
	in.path_explicit = false;
	memset(&e, 0, sizeof(e));
	assert_int_equal(config_load(&in, &c, collect, &e), 0);
	config_free(&c);
}

static void secret_files(void **state)
{
	char *path = write_file("file-key-999\n");
	char var[128], var2[128];
	struct config c;
	struct errors e;

	snprintf(var, sizeof(var), "RUNPOD_API_KEY_FILE=%s", path);
	{
		char *env[] = { "PGMQD_QUEUE_NAME=q", "RUNPOD_ENDPOINT_ID=e", var, NULL };
		assert_int_equal(load_env(env, NULL, &c, &e), 0);
		assert_string_equal(c.api_key, "file-key-999"); /* newline stripped */
		config_free(&c);
	}
	{
		char *env[] = { "PGMQD_QUEUE_NAME=q", "RUNPOD_ENDPOINT_ID=e", var,
				"RUNPOD_API_KEY=x-123456", NULL };
		assert_int_equal(load_env(env, NULL, &c, &e), 1);
		assert_non_null(strstr(e.lines[0], "both RUNPOD_API_KEY and RUNPOD_API_KEY_FILE"));
	}
	snprintf(var2, sizeof(var2), "PGMQD_RUNPOD_API_KEY_FILE=/nonexistent/key");
	{
		char *env[] = { "PGMQD_QUEUE_NAME=q", "RUNPOD_ENDPOINT_ID=e", var2, NULL };
		assert_int_equal(load_env(env, NULL, &c, &e), 1);
		assert_non_null(strstr(e.lines[0], "cannot read /nonexistent/key"));
	}
	unlink(path);
}

static void bad_secret_files_and_sources(void **state)
{
	char var[128], nul_path[64];
	struct config c;
	struct errors e;
	int fd;

	snprintf(var, sizeof(var), "RUNPOD_API_KEY_FILE=/tmp");
	{
		char *env[] = { "PGMQD_QUEUE_NAME=q", "RUNPOD_ENDPOINT_ID=e", var, NULL };
		assert_int_equal(load_env(env, NULL, &c, &e), 1);
		assert_non_null(strstr(e.lines[0], "cannot read /tmp: Is a directory"));
	}
	snprintf(var, sizeof(var), "RUNPOD_API_KEY_FILE=%s", write_file("\n"));
	{
		char *env[] = { "PGMQD_QUEUE_NAME=q", "RUNPOD_ENDPOINT_ID=e", var, NULL };
		assert_int_equal(load_env(env, NULL, &c, &e), 1);
		assert_non_null(strstr(e.lines[0], "is empty"));
	}
	snprintf(nul_path, sizeof(nul_path), "/tmp/pgmqd-test-nul-XXXXXX");
	fd = mkstemp(nul_path);
	assert_int_equal(write(fd, "good\0evil", 9), 9);
	close(fd);
	snprintf(var, sizeof(var), "DATABASE_URL_FILE=%s", nul_path);
	{
		char *env[] = { BASE_ENV, var, NULL };
		assert_int_equal(load_env(env, NULL, &c, &e), 1);
		assert_non_null(strstr(e.lines[0], "contains a NUL byte"));
	}
	unlink(nul_path);
	{
		char *env[] = { BASE_ENV, "DATABASE_URL=postgresql://u:My@Secret@127.0.0.1/db",
				NULL };
		assert_int_equal(load_env(env, NULL, &c, &e), 1);
		assert_non_null(strstr(e.lines[0], "percent-encode '@'"));
		assert_null(strstr(e.lines[0], "Secret"));
	}
	{
		char *env[] = { BASE_ENV, NULL };
		struct config_input in = { .path = "/tmp", .path_explicit = true, .envp = env };
		memset(&e, 0, sizeof(e));
		assert_int_equal(config_load(&in, &c, collect, &e), 1);
		assert_non_null(strstr(e.lines[0], "Is a directory"));
	}
	{
		char *env[] = { BASE_ENV, NULL };
		struct config_input in = { .path = write_file("[queue]\nname = \"jo ;bs\"\n"),
					   .path_explicit = true,
					   .envp = env };
		memset(&e, 0, sizeof(e));
		assert_int_equal(config_load(&in, &c, collect, &e), 1);
		assert_non_null(strstr(e.lines[0], "unterminated double quote"));
		unlink(in.path);
	}
}

static void secrets_never_in_errors(void **state)
{
	char *env[] = { "PGMQD_QUEUE_NAME=q", "RUNPOD_ENDPOINT_ID=e", "RUNPOD_API_KEY=top secret",
			"PGMQD_DATABASE_CONNINFO=host=h password=hunter2 port", NULL };
	struct config c;
	struct errors e;

	assert_int_equal(load_env(env, NULL, &c, &e), 2);
	for (int i = 0; i < e.n; i++) {
		assert_null(strstr(e.lines[i], "top secret"));
		assert_null(strstr(e.lines[i], "hunter2"));
	}
}

static void mask_conninfo(void **state)
{
	char buf[256];

	config_mask_conninfo("postgresql://app:s3cr3t@db.example.com:6543/postgres", buf,
			     sizeof(buf));
	assert_null(strstr(buf, "s3cr3t"));
	assert_non_null(strstr(buf, "password=***"));
	assert_non_null(strstr(buf, "host=db.example.com"));
	config_mask_conninfo("host=h password='a b'", buf, sizeof(buf));
	assert_null(strstr(buf, "a b"));
	config_mask_conninfo("host=h port", buf, sizeof(buf));
	assert_string_equal(buf, "(invalid)");
}

static void base_url_trailing_slash(void **state)
{
	char *env[] = { BASE_ENV, "PGMQD_RUNPOD_BASE_URL=http://127.0.0.1:8000/v2//", NULL };
	struct config c;
	struct errors e;

	assert_int_equal(load_env(env, NULL, &c, &e), 0);
	assert_string_equal(c.base_url, "http://127.0.0.1:8000/v2");
	assert_string_equal(c.ca_file, "");
	config_free(&c);
}

/* Plain http:// is fine to this machine, under any spelling of loopback. */
static void http_to_loopback_only(void **state)
{
	static const char *const ok[] = {
		"PGMQD_RUNPOD_BASE_URL=http://127.0.0.1/v2",
		"PGMQD_RUNPOD_BASE_URL=http://127.1.2.3:80/v2",
		"PGMQD_RUNPOD_BASE_URL=http://LOCALHOST:8000",
		"PGMQD_RUNPOD_BASE_URL=http://[::1]:8000/v2",
		"PGMQD_RUNPOD_BASE_URL=https://runpod.example/v2",
		"PGMQD_RUNPOD_CA_FILE=/etc/passwd",
	};

	for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
		char *env[] = { BASE_ENV, (char *)ok[i], NULL };
		struct config c;
		struct errors e;

		assert_int_equal(load_env(env, NULL, &c, &e), 0);
		config_free(&c);
	}
}

static void cli_override_errors(void **state)
{
	char *env[] = { BASE_ENV, NULL };
	const char *cli[] = { "log.level=debug", "nosuch.key=1", NULL };
	struct config c;
	struct errors e;

	assert_int_equal(load_env(env, cli, &c, &e), 1);
	assert_non_null(strstr(e.lines[0], "nosuch.key=1|command line|unknown key"));
}

/* Issue 10, first hour: what a new user meets. */
static void unknown_keys_suggest_the_nearest(void **state)
{
	char *path = write_file("[queue]\nname = q\nbatch_sise = 3\nqqqqqqqq = 1\n[runpod]\n"
				"endpoint_id = e\napi_key = k-123456\n");
	char *env[] = { "PGMQD_QUEUE_VT_SECOND=5", NULL };
	const char *cli[] = { "queue.poll_intervall_ms=5", NULL };
	struct config_input in = { .path = path,
				   .path_explicit = true,
				   .envp = env,
				   .cli_overrides = cli };
	struct config c;
	struct errors e = { 0 };

	assert_int_equal(config_load(&in, &c, collect, &e), 4);
	assert_non_null(strstr(e.lines[0], "queue.batch_sise|file "));
	assert_non_null(strstr(e.lines[0], "|unknown key; did you mean queue.batch_size?"));
	assert_non_null(strstr(e.lines[1], "|unknown key"));
	assert_null(strstr(e.lines[1], "did you mean")); /* nothing near: no guess */
	assert_non_null(strstr(e.lines[2], "unknown environment variable; did you mean "
					   "PGMQD_QUEUE_VT_SECONDS?"));
	assert_non_null(strstr(e.lines[3], "did you mean queue.poll_interval_ms?"));
	unlink(path);
}

static void example_placeholders_are_refused(void **state)
{
	char *env[] = { "PGMQD_QUEUE_NAME=jobs", "RUNPOD_API_KEY=key-123456", NULL };
	struct config_input in = { .path = "config/pgmq-dispatcher.conf",
				   .path_explicit = true,
				   .envp = env };
	char *env2[] = { BASE_ENV, "PGMQD_RUNPOD_WEBHOOK=<your-webhook>", NULL };
	struct config c;
	struct errors e = { 0 };

	/* The shipped example, with only the key added, still fails on its placeholder. */
	assert_true(config_load(&in, &c, collect, &e) >= 1);
	assert_non_null(strstr(e.lines[0], "runpod.endpoint_id|file config/pgmq-dispatcher.conf:"));
	assert_non_null(strstr(e.lines[0], "placeholder"));
	assert_int_equal(load_env(env2, NULL, &c, &e), 1);
	assert_non_null(strstr(e.lines[0], "runpod.webhook|"));
	assert_non_null(strstr(e.lines[0], "placeholder"));
}

static void missing_default_file_and_credential_named(void **state)
{
	char *env[] = { "PGMQD_QUEUE_NAME=jobs", "RUNPOD_ENDPOINT_ID=ep1", NULL };
	struct config c;
	struct errors e;

	assert_int_equal(load_env(env, NULL, &c, &e), 1);
	assert_non_null(strstr(e.lines[0], "runpod.api_key|default|is required"));
	assert_non_null(strstr(e.lines[0], "systemd credential runpod_api_key"));
	assert_non_null(strstr(e.lines[0], "/nonexistent/pgmq-dispatcher.conf does not exist"));
}

static void describe_names_file_and_sources(void **state)
{
	char *path = write_file("[queue]\nname = q\n[runpod]\nendpoint_id = e\n");
	char *env[] = { "RUNPOD_API_KEY=key-123456", NULL };
	struct config_input in = { .path = path, .path_explicit = true, .envp = env };
	const char *cli[] = { "log.level=debug", NULL };
	struct config c;
	struct errors e = { 0 };
	char buf[512], want[600];

	in.cli_overrides = cli;
	assert_int_equal(config_load(&in, &c, collect, &e), 0);
	config_describe(&c, path, buf, sizeof(buf));
	snprintf(want, sizeof(want),
		 "file %s (2 keys); command line: 1 key; environment: 1 key; "
		 "default: ",
		 path);
	assert_memory_equal(buf, want, strlen(want));
	config_free(&c);
	unlink(path);
	char *env2[] = { BASE_ENV, NULL };
	assert_int_equal(load_env(env2, NULL, &c, &e), 0);
	config_describe(&c, "/nonexistent/pgmq-dispatcher.conf", buf, sizeof(buf));
	assert_non_null(strstr(buf, "no file (/nonexistent/pgmq-dispatcher.conf does not exist); "
				    "environment: 3 keys"));
	config_free(&c);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(defaults),
		cmocka_unit_test(bad_values),
		cmocka_unit_test(required_keys),
		cmocka_unit_test(precedence),
		cmocka_unit_test(pgmqd_name_beats_compat_name),
		cmocka_unit_test(file_errors_name_line),
		cmocka_unit_test(file_long_line_and_syntax),
		cmocka_unit_test(missing_files),
		cmocka_unit_test(secret_files),
		cmocka_unit_test(bad_secret_files_and_sources),
		cmocka_unit_test(secrets_never_in_errors),
		cmocka_unit_test(mask_conninfo),
		cmocka_unit_test(base_url_trailing_slash),
		cmocka_unit_test(http_to_loopback_only),
		cmocka_unit_test(cli_override_errors),
		cmocka_unit_test(unknown_keys_suggest_the_nearest),
		cmocka_unit_test(example_placeholders_are_refused),
		cmocka_unit_test(missing_default_file_and_credential_named),
		cmocka_unit_test(describe_names_file_and_sources),
	};
	return cmocka_run_group_tests_name("config", tests, NULL, NULL);
}
