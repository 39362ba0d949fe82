/* Unit tests for routes: [route.NAME] sections (inheritance, overrides,
 * errors) and the runtime control transition. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <limits.h>
#include <unistd.h>

#include "config.h"
#include "batch.h"
#include "dispatcher_int.h"
#include "endpoint.h"
#include "ratelimit.h"

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
	assert_int_equal(a->batch_size, 5);   /* the route's own */
	assert_int_equal(a->vt_seconds, 300); /* from [queue] */
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
	char *env[] = { "PGMQD_QUEUE_NAME=jobs", "RUNPOD_ENDPOINT_ID=ep1",
			"RUNPOD_API_KEY=key-123456", NULL };
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
		  "conninfo = x\n",
		  "route.a.conninfo|" },
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

static void read_qty_fills_free_slots(void **state)
{
	static const struct {
		int batch, batches, free_slots, rate, want;
	} t[] = {
		{ 10, 1, 8, 1000, 10 }, /* read_batches 1: one batch, as before */
		{ 10, 8, 8, 1000, 80 }, /* a backlog fills every free slot */
		{ 10, 8, 3, 1000, 30 }, /* only the free slots */
		{ 10, 8, 8, 2, 20 },    /* only what the rate cap sends within 1 s */
		{ 10, 8, 0, 1000, 10 }, /* never less than one batch */
		{ 10, 8, 8, -5, 10 },   { 100, 50, 50, 1000, 1000 }, /* capped at 1000 */
	};

	for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++)
		assert_int_equal(batch_read_qty(t[i].batch, t[i].batches, t[i].free_slots,
						t[i].rate),
				 t[i].want);
}

/* A drain read waits for half the in-flight ceiling to be free (or for
 * read_batches bodies, if fewer), so that a backlog is not read one batch
 * per answer; never without a backlog or with nothing in flight, and never
 * when the rate budget (or the fleet grant), not the slots, holds it short. */
static void read_waits_for_half_the_slots(void **state)
{
	static const struct {
		bool backlog;
		int in_flight, max_in_flight, batches, slots, rate;
		bool wait;
	} t[] = {
		{ true, 7, 8, 200, 1, 1000, true },   /* one slot free: wait for more */
		{ true, 5, 8, 200, 3, 1000, true },   /* three of the four wanted */
		{ true, 4, 8, 200, 4, 1000, false },  /* half free: read */
		{ false, 7, 8, 200, 1, 1000, false }, /* no backlog: read at once */
		{ true, 0, 8, 200, 1, 1000, false },  /* nothing in flight: nothing to wait for */
		{ true, 7, 8, 1, 1, 1000, false },    /* read_batches 1: one batch, as before */
		{ true, 31, 32, 4, 1, 1000, true },   /* wants min(read_batches, half) */
		{ true, 28, 32, 4, 4, 1000, false },
		{ true, 1, 1, 200, 1, 1000, false }, /* ceiling 1 */
		{ true, 1, 2, 200, 1, 1000, false }, /* half of 2 is 1 */
		{ true, 6, 8, 200, 2, 1, false },    /* the rate budget binds: read now */
		{ true, 30, 32, 200, 2, 0, false },  /* the fleet grant is used up: read one */
		{ true, 6, 8, 200, 2, 2, true },     /* the slots bind as much: wait */
	};

	(void)state;
	for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++)
		assert_int_equal(batch_read_waits(t[i].backlog, t[i].in_flight, t[i].max_in_flight,
						  t[i].batches, t[i].slots, t[i].rate),
				 t[i].wait);
	assert_int_equal(batch_read_bodies(200, 3, 1000), 3);
	assert_int_equal(batch_read_bodies(200, 8, 2), 2);
	assert_int_equal(batch_read_bodies(200, 0, 5), 1);
}

static void pack_respects_batch_size(void **state)
{
	struct pgmq_message m[25];
	int ends[25], runs;

	memset(m, 0, sizeof(m));
	for (int i = 0; i < 25; i++) {
		m[i].msg_id = "1";
		m[i].read_ct = "1";
		m[i].enqueued_at = "\"2024-01-01T00:00:00Z\"";
		m[i].message = "{}";
		m[i].message_len = 2;
	}
	runs = batch_pack(m, 25, 100, 10000000, 10, ends);
	assert_int_equal(runs, 3);
	assert_int_equal(ends[0], 10);
	assert_int_equal(ends[1], 20);
	assert_int_equal(ends[2], 25);
}

static void rate_available_in_the_next_second(void **state)
{
	struct ratelimit rl;

	assert_int_equal(ratelimit_init(&rl, 5, 10.0), 0);
	assert_int_equal(ratelimit_available(&rl, 100.0, 1.0), 5);
	ratelimit_record(&rl, 90.5); /* frees at 100.5: within the next second */
	ratelimit_record(&rl, 95.0); /* frees at 105 */
	ratelimit_record(&rl, 99.0);
	assert_int_equal(ratelimit_available(&rl, 100.0, 1.0), 3);
	assert_int_equal(ratelimit_available(&rl, 100.0, 0.0), 2);
	ratelimit_free(&rl);
}

/* PGMQD_ROUTE_<NAME>__<SECTION>_<KEY>: a route's keys from the environment,
 * over the file's; a whole route may come from there. */
static void route_keys_from_the_environment(void **state)
{
	char *env[] = { "PGMQD_ROUTE_ASR__QUEUE_BATCH_SIZE=7", "PGMQD_ROUTE_OCR__QUEUE_NAME=scans",
			"PGMQD_ROUTE_OCR__RUNPOD_ENDPOINT_ID=ep-ocr",
			"PGMQD_ROUTE_OCR__RUNPOD_PRIORITY=5", NULL };
	struct config c;
	struct errors e;
	const struct config *asr = NULL, *ocr = NULL;

	(void)state;
	assert_int_equal(load_text(two_routes, env, &c, &e), 0);
	assert_int_equal(c.nroutes, 3);
	for (int i = 0; i < c.nroutes; i++) {
		if (strcmp(config_route(&c, i)->route_name, "asr") == 0)
			asr = config_route(&c, i);
		if (strcmp(config_route(&c, i)->route_name, "ocr") == 0)
			ocr = config_route(&c, i);
	}
	assert_non_null(asr);
	assert_non_null(ocr);
	assert_int_equal(asr->batch_size, 7); /* the file said 5 */
	assert_string_equal(ocr->queue_name, "scans");
	assert_string_equal(ocr->endpoint_id, "ep-ocr");
	assert_int_equal(ocr->priority, 5);
	assert_int_equal(ocr->batch_size, 20); /* from [queue] */
	config_free(&c);
}

static void route_env_bad_names_say_so(void **state)
{
	static const struct {
		const char *var, *key, *problem;
	} cases[] = {
		{ "PGMQD_ROUTE_ASR_QUEUE_BATCH_SIZE=3", "PGMQD_ROUTE_ASR_QUEUE_BATCH_SIZE",
		  "PGMQD_ROUTE_<NAME>__<SECTION>_<KEY>" },
		{ "PGMQD_ROUTE_ASR__QUEUE_BATCHSIZE=3", "PGMQD_ROUTE_ASR__QUEUE_BATCHSIZE",
		  "unknown key QUEUE_BATCHSIZE for a route" },
		{ "PGMQD_ROUTE_ASR__ADMIN_LISTEN=x", "PGMQD_ROUTE_ASR__ADMIN_LISTEN",
		  "unknown key ADMIN_LISTEN" },
		{ "PGMQD_ROUTE_ASR__QUEUE_BATCH_SIZE=0", "route.asr.batch_size",
		  "between 1 and 1000" },
		{ "PGMQD_ROUTE_A.B__QUEUE_BATCH_SIZE=2", "route.a.b.batch_size",
		  "route name must" },
	};

	(void)state;
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		char *env[] = { (char *)cases[i].var, NULL };
		struct config c;
		struct errors e;
		assert_int_not_equal(load_text(two_routes, env, &c, &e), 0);
		assert_int_equal(e.n, 1);
		assert_non_null(strstr(e.lines[0], cases[i].key));
		assert_non_null(strstr(e.lines[0], cases[i].problem));
	}
}

/* A drain ends at an empty read, but not at one that was already out when
 * the drain was asked for: it may predate the rows to drain. */
static void drain_ignores_a_read_older_than_the_command(void **state)
{
	struct config cfg = { .route_name = "r", .queue_name = (char *)"q" };
	struct dispatcher *d = calloc(1, sizeof(*d));

	(void)state;
	assert_non_null(d);
	d->cfg = &cfg;
	d->once = true; /* nothing to store */
	d->mroute = -1;
	d->ctl_loaded = true;
	d->reading = true; /* the poll's read is out */
	dispatcher_control(d, CONTROL_DRAIN);
	assert_int_equal(d->ctl, MRS_DRAINING);
	d->reading = false;
	control_on_empty(d); /* that read's answer */
	assert_int_equal(d->ctl, MRS_DRAINING);
	assert_true(d->again);
	control_on_empty(d); /* a read begun after the command */
	assert_int_equal(d->ctl, MRS_DRAINED);
	/* Without a read out, the first empty read ends it (the open circuit
	 * keeps the kick from reading: there is no connection here). */
	d->circuit_open = true;
	dispatcher_control(d, CONTROL_DRAIN);
	control_on_empty(d);
	assert_int_equal(d->ctl, MRS_DRAINED);
	free(d);
}

/* Connections are one per route: the number of routes is capped. */
static void at_most_sixteen_routes(void **state)
{
	char text[4096];
	size_t used = (size_t)snprintf(text, sizeof(text), "[runpod]\napi_key = key-123456\n");
	struct config c;
	struct errors e;

	(void)state;
	for (int i = 0; i <= CONFIG_MAX_ROUTES; i++)
		used += (size_t)snprintf(text + used, sizeof(text) - used,
					 "[route.r%d]\nqueue = q%d\nendpoint_id = ep%d\n", i, i, i);
	assert_int_not_equal(load_text(text, NULL, &c, &e), 0);
	assert_true(e.n >= 1); /* one line per key of the 17th route */
	assert_non_null(strstr(e.lines[0], "route.r16.queue"));
	assert_non_null(strstr(e.lines[0], "more than 16 routes"));
}

/* Strict priority: the lowest number that wants goes; equals take turns. */
static void endpoint_pick_is_strict_priority(void **state)
{
	struct endpoint_want w[3] = { { 10, true }, { 0, true }, { 10, true } };

	(void)state;
	assert_int_equal(endpoint_pick(w, 3, 0), 1);
	assert_int_equal(endpoint_pick(w, 3, 1), 1); /* it goes again: no turn for worse */
	w[1].want = false;
	assert_int_equal(endpoint_pick(w, 3, 0), 2); /* equals: the one after the last */
	assert_int_equal(endpoint_pick(w, 3, 2), 0);
	w[0].want = w[2].want = false;
	assert_int_equal(endpoint_pick(w, 3, 0), -1);
}

static void endpoint_reads_by_priority_with_a_reserve(void **state)
{
	(void)state;
	assert_int_equal(endpoint_reserve(300), 30);
	assert_int_equal(endpoint_reserve(4), 1);
	/* The ceiling: 16 in flight at 16 holds everyone. */
	assert_false(endpoint_read_allowed(0, 16, 16, INT_MAX, 0));
	assert_true(endpoint_read_allowed(0, 15, 16, INT_MAX, 0));
	/* A worse route keeps the reserve free; the best does not. */
	assert_false(endpoint_read_allowed(10, 15, 16, INT_MAX, 1));
	assert_true(endpoint_read_allowed(10, 14, 16, INT_MAX, 1));
	/* A better route waiting for the endpoint goes first. */
	assert_false(endpoint_read_allowed(10, 3, 16, 0, 1));
	assert_true(endpoint_read_allowed(0, 3, 16, 10, 0));
	assert_true(endpoint_read_allowed(5, 3, 16, 5, 0));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(routes_inherit_and_override),
		cmocka_unit_test(one_queue_is_route_default),
		cmocka_unit_test(route_errors_name_the_route),
		cmocka_unit_test(control_transitions),
		cmocka_unit_test(read_qty_fills_free_slots),
		cmocka_unit_test(read_waits_for_half_the_slots),
		cmocka_unit_test(pack_respects_batch_size),
		cmocka_unit_test(rate_available_in_the_next_second),
		cmocka_unit_test(route_keys_from_the_environment),
		cmocka_unit_test(drain_ignores_a_read_older_than_the_command),
		cmocka_unit_test(at_most_sixteen_routes),
		cmocka_unit_test(route_env_bad_names_say_so),
		cmocka_unit_test(endpoint_pick_is_strict_priority),
		cmocka_unit_test(endpoint_reads_by_priority_with_a_reserve),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
