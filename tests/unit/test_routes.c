/* Unit tests for routes: [route.NAME] sections (inheritance, overrides,
 * errors) and the runtime control transition. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "dispatcher_int.h"

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

static int load_text(const char *text, char *const *envp, struct config *cfg, struct errors *e)
{
	char path[64];
	int fd, rc;
	struct config_input in = { .path = path, .path_explicit = true, .envp = envp };

	snprintf(path, sizeof(path), "/tmp/pgmqd-routes-XXXXXX");
	fd = mkstemp(path);
	assert_true(fd >= 0);
	assert_int_equal(write(fd, text, strlen(text)), (ssize_t)strlen(text));
	close(fd);
	memset(e, 0, sizeof(*e));
	rc = config_load(&in, cfg, collect, e);
	unlink(path);
	return rc;
}

static const char two_routes[] =
	"[queue]\nbatch_size = 20\nvt_seconds = 300\n"
	"[runpod]\napi_key = key-123456\nmax_requests_per_10s = 500\n"
	"[route.asr]\nqueue = audio\nendpoint_id = ep-asr\nbatch_size = 5\n"
	"policy_low_priority = on\ntracker.enabled = on\n"
	"[route.summary]\nqueue = texts\nendpoint_id = ep-sum\nmax_in_flight = 3\n";

static void routes_inherit_and_override(void **state)
{
	char *env[] = { "PGMQD_RUNPOD_REQUEST_TIMEOUT_MS=7000", NULL };
	struct config c;
	struct errors e;
	const struct config *a, *s;

	assert_int_equal(load_text(two_routes, env, &c, &e), 0);
	assert_int_equal(c.nroutes, 2);
	a = config_route(&c, 0);
	s = config_route(&c, 1);
	assert_string_equal(a->route_name, "asr");
	assert_string_equal(a->queue_name, "audio");
	assert_string_equal(a->endpoint_id, "ep-asr");
	assert_int_equal(a->batch_size, 5);           /* the route's own */
	assert_int_equal(a->vt_seconds, 300);         /* from [queue] */
	assert_int_equal(a->max_requests_per_10s, 500);
	assert_int_equal(a->request_timeout_ms, 7000); /* from the environment */
	assert_true(a->policy_low_priority);
	assert_true(a->tracker_enabled);
	assert_string_equal(s->route_name, "summary");
	assert_string_equal(s->queue_name, "texts");
	assert_int_equal(s->batch_size, 20);
	assert_int_equal(s->max_in_flight, 3);
	assert_false(s->policy_low_priority);
	assert_false(s->tracker_enabled);
	assert_string_equal(c.queue_name, "audio"); /* the top level is routes[0]'s copy */
	config_free(&c);
}

static void one_queue_is_route_default(void **state)
{
	char *env[] = { "PGMQD_QUEUE_NAME=jobs", "RUNPOD_ENDPOINT_ID=ep1", "RUNPOD_API_KEY=key-123456",
			NULL };
	struct config c;
	struct errors e;
	struct config_input in = { .path = "/nonexistent/x.conf", .envp = env };

	memset(&e, 0, sizeof(e));
	assert_int_equal(config_load(&in, &c, collect, &e), 0);
	assert_int_equal(c.nroutes, 1);
	assert_null(c.routes);
	assert_ptr_equal(config_route(&c, 0), &c);
	assert_string_equal(c.route_name, "default");
	config_free(&c);
}

static void route_errors_name_the_route(void **state)
{
	static const struct {
		const char *text, *want;
	} cases[] = {
		{ "[runpod]\napi_key = key-123456\n[route.a]\nqueue = q\nendpoint_id = e\nbogus = 1\n",
		  "route.a.bogus|" },
		{ "[runpod]\napi_key = key-123456\n[route.a]\nqueue = q\nendpoint_id = e\nbatch_size = 0\n",
		  "route.a.batch_size|" },
		{ "[runpod]\napi_key = key-123456\n[route.a]\nqueue = q\nendpoint_id = e\n"
		  "[route.b]\nqueue = q\nendpoint_id = f\n",
		  "route.b.queue|file|queue 'q' is already read by route a" },
		{ "[runpod]\napi_key = key-123456\n[route.Bad]\nqueue = q\nendpoint_id = e\n",
		  "route.Bad.queue|" },
		{ "[runpod]\napi_key = key-123456\n[route.a]\nqueue = q\n", "runpod.endpoint_id|" },
		{ "[runpod]\napi_key = key-123456\n[route.a]\nqueue = q\nendpoint_id = e\n"
		  "conninfo = x\n", "route.a.conninfo|" },
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		char *env[] = { NULL };
		struct config c;
		struct errors e;

		assert_true(load_text(cases[i].text, env, &c, &e) >= 1);
		assert_non_null(strstr(e.lines[0], cases[i].want));
	}
}

static void control_transitions(void **state)
{
	static const struct {
		enum metrics_route_state from;
		enum dispatcher_control cmd;
		enum metrics_route_state to;
		bool reads;
	} t[] = {
		{ MRS_RUNNING, CONTROL_PAUSE, MRS_PAUSED, false },
		{ MRS_PAUSED, CONTROL_RESUME, MRS_RUNNING, true },
		{ MRS_RUNNING, CONTROL_DRAIN, MRS_DRAINING, true },
		{ MRS_PAUSED, CONTROL_DRAIN, MRS_DRAINING, true },
		{ MRS_DRAINING, CONTROL_EMPTY, MRS_DRAINED, false },
		{ MRS_RUNNING, CONTROL_EMPTY, MRS_RUNNING, true },
		{ MRS_PAUSED, CONTROL_EMPTY, MRS_PAUSED, false },
		{ MRS_DRAINED, CONTROL_RESUME, MRS_RUNNING, true },
		{ MRS_DRAINING, CONTROL_PAUSE, MRS_PAUSED, false },
	};

	for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
		enum metrics_route_state s = control_next(t[i].from, t[i].cmd);
		assert_int_equal(s, t[i].to);
		assert_int_equal(control_may_read(s), t[i].reads);
	}
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(routes_inherit_and_override),
		cmocka_unit_test(one_queue_is_route_default),
		cmocka_unit_test(route_errors_name_the_route),
		cmocka_unit_test(control_transitions),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
