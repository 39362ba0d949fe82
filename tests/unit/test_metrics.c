/* Unit tests for metrics: render after events and read the text back —
 * HELP/TYPE lines, counters, label values, cumulative histogram buckets. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "metrics.h"

static double now_unix(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static char *render(void)
{
	size_t len = 0;
	char *text = metrics_render(&len);

	assert_non_null(text);
	assert_int_equal(len, strlen(text));
	assert_true(len > 0 && text[len - 1] == '\n'); /* last line terminated */
	return text;
}

/* The line that starts with `series` followed by a space, or NULL. */
static const char *find_sample(const char *text, const char *series)
{
	size_t n = strlen(series);

	for (const char *p = text; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL)
		if (strncmp(p, series, n) == 0 && p[n] == ' ')
			return p;
	return NULL;
}

/* The value of one series; fails the test when it is missing or malformed. */
static double sample(const char *text, const char *series)
{
	const char *line = find_sample(text, series);
	char *end;
	double v;

	if (line == NULL)
		fail_msg("series %s not rendered", series);
	v = strtod(line + strlen(series) + 1, &end);
	if (*end != '\n')
		fail_msg("series %s: trailing garbage after the value", series);
	return v;
}

static const struct {
	const char *name, *type;
} families[] = {
	{ "pgmqd_messages_read_total", "counter" },
	{ "pgmqd_messages_dispatched_total", "counter" },
	{ "pgmqd_messages_released_total", "counter" },
	{ "pgmqd_messages_archived_total", "counter" },
	{ "pgmqd_runpod_requests_total", "counter" },
	{ "pgmqd_pg_reconnects_total", "counter" },
	{ "pgmqd_reads_total", "counter" },
	{ "pgmqd_in_flight_requests", "gauge" },
	{ "pgmqd_circuit_open", "gauge" },
	{ "pgmqd_queue_length", "gauge" },
	{ "pgmqd_queue_oldest_message_age_seconds", "gauge" },
	{ "pgmqd_queue_metrics_refresh_timestamp_seconds", "gauge" },
	{ "pgmqd_runpod_request_duration_seconds", "histogram" },
	{ "pgmqd_start_time_seconds", "gauge" },
	{ "pgmqd_tracked_jobs", "gauge" },
	{ "pgmqd_tracker_terminal_total", "counter" },
	{ "pgmqd_tracker_heartbeats_total", "counter" },
	{ "pgmqd_tracker_early_releases_total", "counter" },
	{ "pgmqd_tracker_evicted_total", "counter" },
};
#define N_FAMILIES (sizeof(families) / sizeof(families[0]))

static size_t count_occurrences(const char *text, const char *needle)
{
	size_t n = 0;

	for (const char *p = strstr(text, needle); p; p = strstr(p + 1, needle))
		n++;
	return n;
}

static void help_and_type_lines(void **state)
{
	char *text;

	metrics_init();
	text = render();
	for (size_t i = 0; i < N_FAMILIES; i++) {
		char help[128], type[128];
		const char *h, *t;

		snprintf(help, sizeof(help), "# HELP %s ", families[i].name);
		snprintf(type, sizeof(type), "# TYPE %s %s\n", families[i].name, families[i].type);
		h = strstr(text, help);
		t = strstr(text, type);
		assert_non_null(h);
		assert_non_null(t);
		assert_true(h < t);                      /* HELP, then TYPE */
		assert_true(h == text || h[-1] == '\n'); /* at a line start */
		assert_int_equal(count_occurrences(text, help), 1);
		assert_int_equal(count_occurrences(text, type), 1);
		/* Every sample of the family follows its TYPE line, before the next
		 * family's HELP line. */
		const char *next = strstr(t, "# HELP ");
		for (const char *p = strstr(text, families[i].name); p;
		     p = strstr(p + 1, families[i].name)) {
			if (p != text && p[-1] == '\n' &&
			    strncmp(p, families[i].name, strlen(families[i].name)) == 0) {
				assert_true(p > t);
				if (next)
					assert_true(p < next);
			}
		}
	}
	free(text);
}

/* Every line is a comment or "name[{labels}] value" with a parseable value,
 * every name carries the prefix, and every label value is from the fixed
 * tables. */
static void every_line_is_well_formed(void **state)
{
	static const char *const allowed[] = {
		"reason=\"too_large\"",
		"kind=\"run\"",
		"kind=\"status\"",
		"reason=\"max_read_ct\"",
		"result=\"rows\"",
		"result=\"empty\"",
		"result=\"error\"",
		"outcome=\"accepted\"",
		"outcome=\"rejected\"",
		"outcome=\"unknown\"",
		"le=\"",
		/* the tracker's */
		"status=\"IN_QUEUE\"",
		"status=\"IN_PROGRESS\"",
		"status=\"RUNNING\"",
		"status=\"OTHER\"",
		"status=\"COMPLETED\"",
		"status=\"FAILED\"",
		"status=\"CANCELLED\"",
		"status=\"TIMED_OUT\"",
		"status=\"EXPIRED\"",
		/* RunPod's /health */
		"state=\"completed\"",
		"state=\"failed\"",
		"state=\"in_progress\"",
		"state=\"in_queue\"",
		"state=\"retried\"",
		"state=\"idle\"",
		"state=\"initializing\"",
		"state=\"ready\"",
		"state=\"running\"",
		"state=\"throttled\"",
		"state=\"unhealthy\"",
	};
	char *text, *save = NULL;

	metrics_init();
	metrics_inc_requests(METRICS_ACCEPTED, 200);
	metrics_inc_requests(METRICS_REJECTED, 0);
	metrics_inc_requests(METRICS_UNKNOWN, 777);
	metrics_observe_request_seconds(0.3);
	text = render();
	for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
		char *value, *end;

		if (strncmp(line, "# HELP pgmqd_", 13) == 0 ||
		    strncmp(line, "# TYPE pgmqd_", 13) == 0)
			continue;
		assert_true(strncmp(line, "pgmqd_", 6) == 0);
		value = strrchr(line, ' ');
		assert_non_null(value);
		strtod(value + 1, &end);
		assert_true(end != value + 1 && *end == '\0');
		char *brace = strchr(line, '{');
		if (brace && brace < value) {
			assert_true(value[-1] == '}');
			for (char *l = brace + 1; l < value - 1;) {
				bool ok = false;
				for (size_t i = 0; i < sizeof(allowed) / sizeof(allowed[0]); i++)
					if (strncmp(l, allowed[i], strlen(allowed[i])) == 0)
						ok = true;
				if (strncmp(l, "code=\"", 6) == 0)
					ok = true; /* checked by requests_by_outcome_and_code */
				if (!ok)
					fail_msg("unexpected label in: %s", line);
				l = strchr(l, '"');
				l = l ? strchr(l + 1, '"') : NULL;
				assert_non_null(l);
				l += (l[1] == ',') ? 2 : 1;
			}
		}
	}
	free(text);
}

static void counters(void **state)
{
	char *text;

	metrics_init();
	text = render();
	assert_true(sample(text, "pgmqd_messages_read_total") == 0);
	assert_true(sample(text, "pgmqd_messages_archived_total{reason=\"too_large\"}") == 0);
	assert_true(sample(text, "pgmqd_reads_total{result=\"error\"}") == 0);
	/* No request has been counted: the family is there, its series not yet. */
	assert_null(strstr(text, "pgmqd_runpod_requests_total{"));
	free(text);

	metrics_add_messages_read(10);
	metrics_add_messages_read(5);
	metrics_add_messages_read(0);
	metrics_add_messages_dispatched(7);
	metrics_add_messages_released(3);
	metrics_add_messages_archived(METRICS_ARCHIVE_TOO_LARGE, 2);
	metrics_add_messages_archived(METRICS_ARCHIVE_MAX_READ_CT, 1);
	metrics_add_messages_archived(METRICS_ARCHIVE_MAX_READ_CT, 4);
	metrics_add_messages_archived((enum metrics_archive_reason)7, 100); /* ignored */
	metrics_inc_reads(METRICS_READ_ROWS);
	metrics_inc_reads(METRICS_READ_ROWS);
	metrics_inc_reads(METRICS_READ_EMPTY);
	metrics_inc_reads(METRICS_READ_ERROR);
	metrics_inc_reads((enum metrics_read_result) - 1); /* ignored */
	metrics_inc_pg_reconnects();
	metrics_inc_pg_reconnects();

	text = render();
	assert_true(sample(text, "pgmqd_messages_read_total") == 15);
	assert_true(sample(text, "pgmqd_messages_dispatched_total") == 7);
	assert_true(sample(text, "pgmqd_messages_released_total") == 3);
	assert_true(sample(text, "pgmqd_messages_archived_total{reason=\"too_large\"}") == 2);
	assert_true(sample(text, "pgmqd_messages_archived_total{reason=\"max_read_ct\"}") == 5);
	assert_true(sample(text, "pgmqd_reads_total{result=\"rows\"}") == 2);
	assert_true(sample(text, "pgmqd_reads_total{result=\"empty\"}") == 1);
	assert_true(sample(text, "pgmqd_reads_total{result=\"error\"}") == 1);
	assert_true(sample(text, "pgmqd_pg_reconnects_total") == 2);
	free(text);

	metrics_init(); /* resets */
	text = render();
	assert_true(sample(text, "pgmqd_messages_read_total") == 0);
	assert_true(sample(text, "pgmqd_pg_reconnects_total") == 0);
	free(text);
}

static void requests_by_outcome_and_code(void **state)
{
	static const struct {
		enum metrics_outcome outcome;
		long code;
		const char *series; /* labels as rendered */
		int times;
	} cases[] = {
		{ METRICS_ACCEPTED, 200, "{outcome=\"accepted\",code=\"200\"}", 3 },
		{ METRICS_ACCEPTED, 201, "{outcome=\"accepted\",code=\"other\"}", 1 },
		{ METRICS_REJECTED, 400, "{outcome=\"rejected\",code=\"400\"}", 1 },
		{ METRICS_REJECTED, 401, "{outcome=\"rejected\",code=\"401\"}", 2 },
		{ METRICS_REJECTED, 403, "{outcome=\"rejected\",code=\"403\"}", 1 },
		{ METRICS_REJECTED, 404, "{outcome=\"rejected\",code=\"404\"}", 1 },
		{ METRICS_REJECTED, 408, "{outcome=\"rejected\",code=\"408\"}", 1 },
		{ METRICS_REJECTED, 413, "{outcome=\"rejected\",code=\"413\"}", 1 },
		{ METRICS_REJECTED, 429, "{outcome=\"rejected\",code=\"429\"}", 4 },
		{ METRICS_REJECTED, 500, "{outcome=\"rejected\",code=\"500\"}", 1 },
		{ METRICS_REJECTED, 502, "{outcome=\"rejected\",code=\"502\"}", 1 },
		{ METRICS_REJECTED, 503, "{outcome=\"rejected\",code=\"503\"}", 1 },
		{ METRICS_REJECTED, 0, "{outcome=\"rejected\",code=\"0\"}", 2 },
		{ METRICS_REJECTED, 418, "{outcome=\"rejected\",code=\"other\"}", 1 },
		{ METRICS_REJECTED, 99999, "{outcome=\"rejected\",code=\"other\"}", 1 },
		{ METRICS_UNKNOWN, 504, "{outcome=\"unknown\",code=\"504\"}", 1 },
		{ METRICS_UNKNOWN, 0, "{outcome=\"unknown\",code=\"0\"}", 1 },
		{ METRICS_UNKNOWN, -1, "{outcome=\"unknown\",code=\"0\"}", 1 },
	};
	char *text, series[128];

	metrics_init();
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
		for (int t = 0; t < cases[i].times; t++)
			metrics_inc_requests(cases[i].outcome, cases[i].code);
	metrics_inc_requests((enum metrics_outcome)3, 200); /* ignored */
	text = render();
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		double want = 0;

		/* Several cases may share one series. */
		for (size_t j = 0; j < sizeof(cases) / sizeof(cases[0]); j++)
			if (strcmp(cases[j].series, cases[i].series) == 0)
				want += cases[j].times;
		snprintf(series, sizeof(series), "pgmqd_runpod_requests_total%s", cases[i].series);
		if (sample(text, series) != want)
			fail_msg("%s: got %g, want %g", series, sample(text, series), want);
	}
	/* Pairs never counted are not rendered; nothing unbounded is. */
	assert_null(find_sample(text,
				"pgmqd_runpod_requests_total{outcome=\"accepted\",code=\"500\"}"));
	assert_null(strstr(text, "code=\"418\""));
	assert_null(strstr(text, "code=\"99999\""));
	assert_null(strstr(text, "code=\"-1\""));
	assert_int_equal(count_occurrences(text, "pgmqd_runpod_requests_total{"), 16);
	free(text);
}

static void histogram_buckets(void **state)
{
	static const double obs[] = { 0.001, 0.005, 0.0051, 0.2, 1.0, 7, 29.9, 31, 100, -1 };
	static const struct {
		const char *le;
		double bound;
	} buckets[] = {
		{ "0.005", .005 },    { "0.01", .01 }, { "0.025", .025 }, { "0.05", .05 },
		{ "0.1", .1 },        { "0.25", .25 }, { "0.5", .5 },     { "1", 1 },
		{ "2.5", 2.5 },       { "5", 5 },      { "10", 10 },      { "30", 30 },
		{ "+Inf", INFINITY },
	};
	const size_t nobs = sizeof(obs) / sizeof(obs[0]);
	double sum = 0, prev = 0;
	char *text, series[128];

	metrics_init();
	for (size_t i = 0; i < nobs; i++) {
		metrics_observe_request_seconds(obs[i]);
		sum += obs[i] > 0 ? obs[i] : 0; /* negatives count as 0 */
	}
	metrics_observe_request_seconds(NAN); /* ignored */
	text = render();
	for (size_t b = 0; b < sizeof(buckets) / sizeof(buckets[0]); b++) {
		double want = 0, got;

		for (size_t i = 0; i < nobs; i++)
			if (obs[i] <= buckets[b].bound)
				want++;
		snprintf(series, sizeof(series),
			 "pgmqd_runpod_request_duration_seconds_bucket{le=\"%s\"}", buckets[b].le);
		got = sample(text, series);
		if (got != want)
			fail_msg("%s: got %g, want %g", series, got, want);
		assert_true(got >= prev); /* cumulative */
		prev = got;
	}
	/* Buckets in increasing order, +Inf last. */
	assert_true(strstr(text, "le=\"0.005\"") < strstr(text, "le=\"0.01\""));
	assert_true(strstr(text, "le=\"30\"") < strstr(text, "le=\"+Inf\""));
	assert_true(sample(text, "pgmqd_runpod_request_duration_seconds_count") == (double)nobs);
	assert_true(sample(text, "pgmqd_runpod_request_duration_seconds_bucket{le=\"+Inf\"}") ==
		    sample(text, "pgmqd_runpod_request_duration_seconds_count"));
	assert_true(fabs(sample(text, "pgmqd_runpod_request_duration_seconds_sum") - sum) < 1e-6);
	free(text);
}

static void gauges(void **state)
{
	double before, after, t;
	char *text;

	before = now_unix();
	metrics_init();
	after = now_unix();
	text = render();
	t = sample(text, "pgmqd_start_time_seconds");
	assert_true(t >= before - 0.001 && t <= after + 0.001);
	assert_true(sample(text, "pgmqd_queue_metrics_refresh_timestamp_seconds") == 0);
	assert_true(sample(text, "pgmqd_in_flight_requests") == 0);
	assert_true(sample(text, "pgmqd_circuit_open") == 0);
	free(text);

	metrics_set_in_flight(3);
	metrics_set_circuit_open(true);
	before = now_unix();
	metrics_set_queue_stats(1234567890123LL, 12.5);
	after = now_unix();
	text = render();
	assert_true(sample(text, "pgmqd_in_flight_requests") == 3);
	assert_true(sample(text, "pgmqd_circuit_open") == 1);
	assert_non_null(find_sample(text, "pgmqd_queue_length"));
	assert_non_null(strstr(text, "\npgmqd_queue_length 1234567890123\n")); /* exact integer */
	assert_true(sample(text, "pgmqd_queue_oldest_message_age_seconds") == 12.5);
	t = sample(text, "pgmqd_queue_metrics_refresh_timestamp_seconds");
	assert_true(t >= before - 0.001 && t <= after + 0.001);
	free(text);

	metrics_set_in_flight(0);
	metrics_set_circuit_open(false);
	metrics_set_queue_stats(0, 0);
	text = render();
	assert_true(sample(text, "pgmqd_in_flight_requests") == 0);
	assert_true(sample(text, "pgmqd_circuit_open") == 0);
	assert_true(sample(text, "pgmqd_queue_length") == 0);
	free(text);
}

/* The tracker's families: every label value rendered from the start, gauges
 * set (not added), out-of-range values ignored, metrics_init() resets. */
static void tracker_series(void **state)
{
	static const char *const tracked[] = { "IN_QUEUE", "IN_PROGRESS", "RUNNING", "OTHER" };
	static const char *const terminal[] = { "COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT",
						"EXPIRED" };
	char series[128], *text;

	metrics_init();
	text = render();
	for (size_t i = 0; i < 4; i++) {
		snprintf(series, sizeof(series), "pgmqd_tracked_jobs{status=\"%s\"}", tracked[i]);
		assert_true(sample(text, series) == 0);
	}
	for (size_t i = 0; i < 5; i++) {
		snprintf(series, sizeof(series), "pgmqd_tracker_terminal_total{status=\"%s\"}",
			 terminal[i]);
		assert_true(sample(text, series) == 0);
	}
	assert_true(sample(text, "pgmqd_tracker_heartbeats_total") == 0);
	assert_true(sample(text, "pgmqd_tracker_early_releases_total") == 0);
	assert_true(sample(text, "pgmqd_tracker_evicted_total") == 0);
	free(text);

	metrics_set_tracked_jobs(METRICS_TRACKED_IN_QUEUE, 5);
	metrics_set_tracked_jobs(METRICS_TRACKED_IN_QUEUE, 3); /* a gauge: set, not added */
	metrics_set_tracked_jobs(METRICS_TRACKED_IN_PROGRESS, 2);
	metrics_set_tracked_jobs(METRICS_TRACKED_OTHER, 1);
	metrics_set_tracked_jobs((enum metrics_tracked_status)4, 99); /* ignored */
	metrics_inc_tracker_terminal(METRICS_TERMINAL_COMPLETED);
	metrics_inc_tracker_terminal(METRICS_TERMINAL_COMPLETED);
	metrics_inc_tracker_terminal(METRICS_TERMINAL_FAILED);
	metrics_inc_tracker_terminal(METRICS_TERMINAL_TIMED_OUT);
	metrics_inc_tracker_terminal(METRICS_TERMINAL_EXPIRED);
	metrics_inc_tracker_terminal((enum metrics_terminal)5); /* ignored */
	for (int i = 0; i < 7; i++)
		metrics_inc_tracker_heartbeats();
	metrics_inc_tracker_early_releases();
	metrics_inc_tracker_evicted();
	metrics_inc_tracker_evicted();
	text = render();
	assert_true(sample(text, "pgmqd_tracked_jobs{status=\"IN_QUEUE\"}") == 3);
	assert_true(sample(text, "pgmqd_tracked_jobs{status=\"IN_PROGRESS\"}") == 2);
	assert_true(sample(text, "pgmqd_tracked_jobs{status=\"RUNNING\"}") == 0);
	assert_true(sample(text, "pgmqd_tracked_jobs{status=\"OTHER\"}") == 1);
	assert_true(sample(text, "pgmqd_tracker_terminal_total{status=\"COMPLETED\"}") == 2);
	assert_true(sample(text, "pgmqd_tracker_terminal_total{status=\"FAILED\"}") == 1);
	assert_true(sample(text, "pgmqd_tracker_terminal_total{status=\"CANCELLED\"}") == 0);
	assert_true(sample(text, "pgmqd_tracker_terminal_total{status=\"TIMED_OUT\"}") == 1);
	assert_true(sample(text, "pgmqd_tracker_terminal_total{status=\"EXPIRED\"}") == 1);
	assert_true(sample(text, "pgmqd_tracker_heartbeats_total") == 7);
	assert_true(sample(text, "pgmqd_tracker_early_releases_total") == 1);
	assert_true(sample(text, "pgmqd_tracker_evicted_total") == 2);
	free(text);

	metrics_init();
	text = render();
	assert_true(sample(text, "pgmqd_tracked_jobs{status=\"IN_QUEUE\"}") == 0);
	assert_true(sample(text, "pgmqd_tracker_heartbeats_total") == 0);
	assert_true(sample(text, "pgmqd_tracker_terminal_total{status=\"COMPLETED\"}") == 0);
	free(text);
}

/* The stuck-queue series: the oldest IN_QUEUE age grows with the clock,
 * /health counts are set whole, the cap flag is 0/1. */
static void stuck_queue_series(void **state)
{
	const long long jobs[METRICS_HEALTH_NJOBS] = { 7, 1, 2, 5, 0 };
	const long long workers[METRICS_HEALTH_NWORKERS] = { 1, 0, 1, 2, 0, 3 };
	char *text;
	double age;

	metrics_init();
	text = render();
	assert_true(sample(text, "pgmqd_tracker_oldest_in_queue_seconds") == 0);
	assert_true(sample(text, "pgmqd_tracker_queue_cap_reached") == 0);
	assert_true(sample(text, "pgmqd_runpod_health_workers{state=\"unhealthy\"}") == 0);
	assert_true(sample(text, "pgmqd_runpod_health_timestamp_seconds") == 0);
	free(text);

	metrics_set_oldest_in_queue_since(now_unix() - 42.0);
	metrics_set_queue_cap_reached(true);
	metrics_set_runpod_health(jobs, workers);
	metrics_inc_tracker_heartbeat_ceilings();
	text = render();
	age = sample(text, "pgmqd_tracker_oldest_in_queue_seconds");
	assert_true(age >= 42.0 && age < 52.0);
	assert_true(sample(text, "pgmqd_tracker_queue_cap_reached") == 1);
	assert_true(sample(text, "pgmqd_runpod_health_jobs{state=\"in_queue\"}") == 5);
	assert_true(sample(text, "pgmqd_runpod_health_jobs{state=\"completed\"}") == 7);
	assert_true(sample(text, "pgmqd_runpod_health_workers{state=\"unhealthy\"}") == 3);
	assert_true(sample(text, "pgmqd_runpod_health_workers{state=\"running\"}") == 2);
	assert_true(sample(text, "pgmqd_runpod_health_timestamp_seconds") > now_unix() - 60);
	assert_true(sample(text, "pgmqd_tracker_heartbeat_ceilings_total") == 1);
	free(text);

	metrics_set_oldest_in_queue_since(0); /* none waits */
	metrics_set_queue_cap_reached(false);
	text = render();
	assert_true(sample(text, "pgmqd_tracker_oldest_in_queue_seconds") == 0);
	assert_true(sample(text, "pgmqd_tracker_queue_cap_reached") == 0);
	free(text);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(help_and_type_lines),
		cmocka_unit_test(every_line_is_well_formed),
		cmocka_unit_test(counters),
		cmocka_unit_test(requests_by_outcome_and_code),
		cmocka_unit_test(histogram_buckets),
		cmocka_unit_test(gauges),
		cmocka_unit_test(tracker_series),
		cmocka_unit_test(stuck_queue_series),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
