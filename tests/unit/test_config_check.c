/* Unit tests for config_check and config_keys: the value rules and the
 * nearest-key suggestion, called directly, table-driven. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "config_check.h"
#include "config_keys.h"

static void loopback_hosts(void **state)
{
	static const struct {
		const char *url;
		bool loopback;
	} cases[] = {
		{ "http://127.0.0.1", true },
		{ "http://127.0.0.1:8080/v2", true },
		{ "http://127.255.3.4/x", true },
		{ "http://localhost:9/v2", true },
		{ "http://LOCALHOST", true },
		{ "http://[::1]:80/", true },
		{ "http://[::1]", true },
		{ "http://user:pw@127.0.0.1/", true },
		{ "http://128.0.0.1/", false },
		{ "http://127.0.0.1.example.com/", false },
		{ "http://localhost.example.com/", false },
		{ "http://[::2]/", false },
		{ "http://[::1]x/", false },
		{ "http://127.0.0.256/", false },
		{ "http://127.0.0.1@evil.example/", false },
		{ "http://10.0.0.1/", false },
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		if (url_host_is_loopback(cases[i].url) != cases[i].loopback)
			fail_msg("url_host_is_loopback(%s) != %d", cases[i].url, cases[i].loopback);
	}
}

static void base_url_rule(void **state)
{
	assert_null(check_base_url("https://api.runpod.ai/v2"));
	assert_null(check_base_url("http://127.0.0.1:8000/v2"));
	assert_non_null(check_base_url("http://api.runpod.ai/v2"));
	assert_non_null(check_base_url("ftp://x/"));
	assert_non_null(check_base_url("https:///v2"));
	assert_non_null(check_base_url("https://a b/"));
	assert_null(check_webhook(""));
	assert_null(check_webhook("http://example.com/hook"));
	assert_non_null(check_webhook("example.com/hook"));
}

static void listen_addresses(void **state)
{
	static const struct {
		const char *v;
		bool ok;
	} cases[] = {
		{ "off", true },
		{ "127.0.0.1:9187", true },
		{ "[::1]:0", true },
		{ "localhost:65535", true },
		{ "127.0.0.1:65536", false },
		{ "127.0.0.1:", false },
		{ ":80", false },
		{ "::1:80", false },
		{ "[]:80", false },
		{ "[::1]80", false },
		{ "host:8x", false },
		{ "a b:80", false },
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		if ((check_listen(cases[i].v) == NULL) != cases[i].ok)
			fail_msg("check_listen(%s) ok != %d", cases[i].v, cases[i].ok);
	}
}

static void integers_are_strict(void **state)
{
	static const struct {
		const char *s;
		bool ok;
		long v;
	} cases[] = {
		{ "0", true, 0 },     { "42", true, 42 },
		{ "-7", true, -7 },   { "+7", false, 0 },
		{ " 7", false, 0 },   { "7 ", false, 0 },
		{ "", false, 0 },     { "1e3", false, 0 },
		{ "0x10", false, 0 }, { "99999999999999999999", false, 0 },
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		long v = -12345;
		bool ok = config_parse_int(cases[i].s, &v);
		if (ok != cases[i].ok || (ok && v != cases[i].v))
			fail_msg("config_parse_int(%s) = %d, %ld", cases[i].s, ok, v);
	}
}

static void placeholders(void **state)
{
	static const char *const yes[] = { "your-endpoint-id", "YOUR_KEY",  "<api key>",
					   "changeme",         "Change-Me", "todo" };
	static const char *const no[] = { "ep1", "yours", "<partial", "abc>", "todolist", "" };

	for (size_t i = 0; i < sizeof(yes) / sizeof(yes[0]); i++)
		if (!config_is_placeholder(yes[i]))
			fail_msg("%s should be a placeholder", yes[i]);
	for (size_t i = 0; i < sizeof(no) / sizeof(no[0]); i++)
		if (config_is_placeholder(no[i]))
			fail_msg("%s should not be a placeholder", no[i]);
}

static void edit_distance(void **state)
{
	assert_int_equal(config_distance("", ""), 0);
	assert_int_equal(config_distance("abc", "abc"), 0);
	assert_int_equal(config_distance("abc", "ABC"), 0);
	assert_int_equal(config_distance("kitten", "sitting"), 3);
	assert_int_equal(config_distance("queue.name", "queue.nmae"), 2);
	assert_int_equal(config_distance("", "abcd"), 4);
	char longer[80];
	memset(longer, 'a', sizeof(longer) - 1);
	longer[sizeof(longer) - 1] = '\0';
	assert_int_equal(config_distance(longer, "a"), 99);
}

static void nearest_key_names(void **state)
{
	char buf[128];

	assert_string_equal(config_nearest_key("queue.batchsize", false, buf, sizeof(buf)),
			    "queue.batch_size");
	assert_string_equal(config_nearest_key("PGMQD_QUEUE_NAM", true, buf, sizeof(buf)),
			    "PGMQD_QUEUE_NAME");
	assert_null(config_nearest_key("completely.different", false, buf, sizeof(buf)));
	assert_string_equal(config_nearest_key("log.lvl", false, buf, sizeof(buf)), "log.level");
	/* Two edits in a four-letter name is another word, not a typo. */
	assert_null(config_nearest_key("a.bc", false, buf, sizeof(buf)));
	/* The name without section and unit suffix counts on its own. */
	assert_string_equal(config_nearest_key("queue.pol_interval", false, buf, sizeof(buf)),
			    "queue.poll_interval_ms");
	assert_string_equal(config_nearest_key("PGMQD_QUEUE_POL_INTERVAL", true, buf, sizeof(buf)),
			    "PGMQD_QUEUE_POLL_INTERVAL_MS");
	assert_string_equal(config_nearest_key("runpod.poll_interval_ms", false, buf, sizeof(buf)),
			    "queue.poll_interval_ms");
	assert_string_equal(config_nearest_key("queue.vt", false, buf, sizeof(buf)),
			    "queue.vt_seconds");
	assert_null(config_nearest_key("queue.colour", false, buf, sizeof(buf)));
	assert_null(config_nearest_key("PGMQD_QUEUE_WIDGETS", true, buf, sizeof(buf)));
}

static void conninfo_placeholders(void **state)
{
	static const char *const yes[] = {
		"postgresql://postgres.<ref>:<password>@aws-0-<region>.pooler.supabase.com:5432/postgres",
		"postgresql://postgres:s3cret@db.your-ref.supabase.co:5432/postgres",
		"host=localhost password=<password>",
		"host=your_host dbname=app",
	};
	static const char *const no[] = {
		"postgresql://app:s3cret@db.example.com:5432/app?sslmode=require",
		"host=localhost password=a<b dbname=app",
		"host=yourhost dbname=app",
		"",
	};

	for (size_t i = 0; i < sizeof(yes) / sizeof(yes[0]); i++) {
		const char *p = check_conninfo(yes[i]);
		if (p == NULL || strstr(p, "placeholder") == NULL)
			fail_msg("%s should be flagged as a placeholder", yes[i]);
	}
	for (size_t i = 0; i < sizeof(no) / sizeof(no[0]); i++)
		if (config_has_placeholder_part(no[i]) || check_conninfo(no[i]) != NULL)
			fail_msg("%s should be accepted", no[i]);
}

static void key_table_names(void **state)
{
	char buf[128];
	int i = config_find_key("runpod", "api_key");

	assert_true(i >= 0);
	assert_true(config_keys[i].flags & F_SECRET);
	config_env_name(&config_keys[i], buf, sizeof(buf));
	assert_string_equal(buf, "PGMQD_RUNPOD_API_KEY");
	config_key_label(&config_keys[i], buf, sizeof(buf));
	assert_string_equal(buf, "runpod.api_key");
	assert_int_equal(config_find_key("runpod", "nope"), -1);
	assert_true(config_nkeys <= CONFIG_MAX_KEYS);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(loopback_hosts),        cmocka_unit_test(base_url_rule),
		cmocka_unit_test(listen_addresses),      cmocka_unit_test(integers_are_strict),
		cmocka_unit_test(placeholders),          cmocka_unit_test(edit_distance),
		cmocka_unit_test(nearest_key_names),     cmocka_unit_test(key_table_names),
		cmocka_unit_test(conninfo_placeholders),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
