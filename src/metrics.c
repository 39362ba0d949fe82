/* metrics — see include/metrics.h. */
#include "metrics.h"
#include "log.h"

#include <math.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define PREFIX "pgmqd_"

#define N_OUTCOMES 3
#define N_ARCHIVE_REASONS 2
#define N_READ_RESULTS 3

/* HTTP codes with a series of their own; then "other", then "0" (none). */
static const long code_table[] = { 200, 400, 401, 403, 404, 408, 413, 429, 500, 502, 503, 504 };
#define N_CODES (sizeof(code_table) / sizeof(code_table[0]))
#define CODE_OTHER N_CODES
#define CODE_NONE (N_CODES + 1)
#define N_CODE_SLOTS (N_CODES + 2)

static const char *const outcome_names[N_OUTCOMES] = { "accepted", "rejected", "unknown" };
static const char *const archive_names[N_ARCHIVE_REASONS] = { "too_large", "max_read_ct" };
static const char *const read_names[N_READ_RESULTS] = { "rows", "empty", "error" };

/* Upper bounds of the duration buckets, as numbers and as their le labels. */
static const double bucket_bounds[] = { .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30 };
static const char *const bucket_labels[] = { "0.005", "0.01", "0.025", "0.05", "0.1", "0.25",
					     "0.5",   "1",    "2.5",   "5",    "10",  "30" };
#define N_BOUNDS (sizeof(bucket_bounds) / sizeof(bucket_bounds[0]))
_Static_assert(sizeof(bucket_labels) / sizeof(bucket_labels[0]) == N_BOUNDS,
	       "one label per bucket bound");

/* Observations are summed in integer nanoseconds: exact, and lock-free
 * without a compare-and-swap loop on a double. Longer ones are clamped. */
#define MAX_OBSERVATION_SECONDS 1e9

typedef atomic_uint_least64_t counter_t;

static void tracker_metrics_init(void);
struct buf;
static void render_tracker(struct buf *b);
static void render_fleet(struct buf *b);

static struct {
	counter_t messages_read, messages_dispatched, messages_released;
	counter_t messages_archived[N_ARCHIVE_REASONS];
	counter_t requests[N_OUTCOMES][N_CODE_SLOTS];
	counter_t pg_reconnects;
	counter_t ledger_recovered_unknown;
	counter_t ledger_jobs_claimed;
	counter_t ledger_completed_undeleted;
	counter_t reads[N_READ_RESULTS];
	atomic_long in_flight;
	atomic_int circuit_open;
	atomic_llong queue_length;
	atomic_uint_least64_t queue_oldest_age_bits; /* doubles, stored as their bits */
	atomic_uint_least64_t queue_refresh_time_bits;
	atomic_uint_least64_t start_time_bits;
	counter_t duration_buckets[N_BOUNDS + 1]; /* not cumulative; last is > 30 s */
	counter_t duration_sum_ns;
} m;

static void add(counter_t *c, uint64_t n)
{
	atomic_fetch_add_explicit(c, n, memory_order_relaxed);
}

static uint64_t get(counter_t *c)
{
	return atomic_load_explicit(c, memory_order_relaxed);
}

static void store_double(atomic_uint_least64_t *a, double v)
{
	uint64_t bits;

	memcpy(&bits, &v, sizeof(bits));
	atomic_store_explicit(a, bits, memory_order_relaxed);
}

static double load_double(atomic_uint_least64_t *a)
{
	uint64_t bits = atomic_load_explicit(a, memory_order_relaxed);
	double v;

	memcpy(&v, &bits, sizeof(v));
	return v;
}

static double realtime_now(void)
{
	struct timespec ts;

	if (clock_gettime(CLOCK_REALTIME, &ts) != 0)
		return 0.0;
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

void metrics_init(void)
{
	for (size_t i = 0; i < N_ARCHIVE_REASONS; i++)
		atomic_init(&m.messages_archived[i], 0);
	for (size_t o = 0; o < N_OUTCOMES; o++)
		for (size_t c = 0; c < N_CODE_SLOTS; c++)
			atomic_init(&m.requests[o][c], 0);
	for (size_t i = 0; i < N_READ_RESULTS; i++)
		atomic_init(&m.reads[i], 0);
	for (size_t i = 0; i <= N_BOUNDS; i++)
		atomic_init(&m.duration_buckets[i], 0);
	atomic_init(&m.messages_read, 0);
	atomic_init(&m.messages_dispatched, 0);
	atomic_init(&m.messages_released, 0);
	atomic_init(&m.pg_reconnects, 0);
	atomic_init(&m.ledger_recovered_unknown, 0);
	atomic_init(&m.ledger_jobs_claimed, 0);
	atomic_init(&m.ledger_completed_undeleted, 0);
	atomic_init(&m.in_flight, 0);
	atomic_init(&m.circuit_open, 0);
	atomic_init(&m.queue_length, 0);
	atomic_init(&m.duration_sum_ns, 0);
	store_double(&m.queue_oldest_age_bits, 0.0);
	store_double(&m.queue_refresh_time_bits, 0.0);
	store_double(&m.start_time_bits, realtime_now());
	tracker_metrics_init();
}

void metrics_add_messages_read(unsigned n)
{
	add(&m.messages_read, n);
}

void metrics_add_messages_dispatched(unsigned n)
{
	add(&m.messages_dispatched, n);
}

void metrics_add_messages_released(unsigned n)
{
	add(&m.messages_released, n);
}

void metrics_add_messages_archived(enum metrics_archive_reason reason, unsigned n)
{
	if ((unsigned)reason < N_ARCHIVE_REASONS)
		add(&m.messages_archived[reason], n);
}

static size_t code_slot(long http_code)
{
	if (http_code <= 0)
		return CODE_NONE;
	for (size_t i = 0; i < N_CODES; i++)
		if (code_table[i] == http_code)
			return i;
	return CODE_OTHER;
}

void metrics_inc_requests(enum metrics_outcome outcome, long http_code)
{
	if ((unsigned)outcome < N_OUTCOMES)
		add(&m.requests[outcome][code_slot(http_code)], 1);
}

void metrics_inc_ledger_recovered_unknown(void)
{
	add(&m.ledger_recovered_unknown, 1);
}

void metrics_inc_ledger_completed_undeleted(void)
{
	add(&m.ledger_completed_undeleted, 1);
}

void metrics_inc_ledger_jobs_claimed(void)
{
	add(&m.ledger_jobs_claimed, 1);
}

void metrics_inc_pg_reconnects(void)
{
	add(&m.pg_reconnects, 1);
}

void metrics_inc_reads(enum metrics_read_result result)
{
	if ((unsigned)result < N_READ_RESULTS)
		add(&m.reads[result], 1);
}

void metrics_set_in_flight(long n)
{
	atomic_store_explicit(&m.in_flight, n, memory_order_relaxed);
}

void metrics_set_circuit_open(bool open)
{
	atomic_store_explicit(&m.circuit_open, open ? 1 : 0, memory_order_relaxed);
}

void metrics_set_queue_stats(long long length, double oldest_age_seconds)
{
	atomic_store_explicit(&m.queue_length, length, memory_order_relaxed);
	store_double(&m.queue_oldest_age_bits, oldest_age_seconds);
	store_double(&m.queue_refresh_time_bits, realtime_now());
}

void metrics_observe_request_seconds(double seconds)
{
	size_t i = 0;

	if (isnan(seconds))
		return;
	if (seconds < 0)
		seconds = 0;
	if (seconds > MAX_OBSERVATION_SECONDS)
		seconds = MAX_OBSERVATION_SECONDS;
	while (i < N_BOUNDS && seconds > bucket_bounds[i])
		i++;
	add(&m.duration_buckets[i], 1);
	add(&m.duration_sum_ns, (uint64_t)llround(seconds * 1e9));
}

/* ---- rendering ---- */

struct buf {
	char *p;
	size_t len, cap;
	bool failed;
};

static void bprintf(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void bprintf(struct buf *b, const char *fmt, ...)
{
	va_list ap;
	int n;

	if (b->failed)
		return;
	for (;;) {
		va_start(ap, fmt);
		n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
		va_end(ap);
		if (n < 0) {
			b->failed = true;
			return;
		}
		if ((size_t)n < b->cap - b->len) {
			b->len += (size_t)n;
			return;
		}
		size_t cap = b->cap * 2;
		while (cap - b->len <= (size_t)n)
			cap *= 2;
		char *p = realloc(b->p, cap);
		if (p == NULL) {
			b->failed = true;
			return;
		}
		b->p = p;
		b->cap = cap;
	}
}

/* Shortest of %.15g / %.17g that reads back as the same double;
 * Prometheus spellings for the non-finite values. */
static void format_double(char *out, size_t outlen, double v)
{
	if (isnan(v)) {
		snprintf(out, outlen, "NaN");
	} else if (isinf(v)) {
		snprintf(out, outlen, v > 0 ? "+Inf" : "-Inf");
	} else {
		snprintf(out, outlen, "%.15g", v);
		if (strtod(out, NULL) != v)
			snprintf(out, outlen, "%.17g", v);
	}
}

static void family(struct buf *b, const char *name, const char *type, const char *help)
{
	bprintf(b, "# HELP " PREFIX "%s %s\n# TYPE " PREFIX "%s %s\n", name, help, name, type);
}

static void counter(struct buf *b, const char *name, const char *help, counter_t *c)
{
	family(b, name, "counter", help);
	bprintf(b, PREFIX "%s %llu\n", name, (unsigned long long)get(c));
}

static void labelled(struct buf *b, const char *name, const char *label, const char *const *values,
		     counter_t *c, size_t n)
{
	for (size_t i = 0; i < n; i++)
		bprintf(b, PREFIX "%s{%s=\"%s\"} %llu\n", name, label, values[i],
			(unsigned long long)get(&c[i]));
}

static void gauge_double(struct buf *b, const char *name, const char *help, double v)
{
	char num[32];

	format_double(num, sizeof(num), v);
	family(b, name, "gauge", help);
	bprintf(b, PREFIX "%s %s\n", name, num);
}

static void render_requests(struct buf *b)
{
	static const char name[] = "runpod_requests_total";

	family(b, name, "counter",
	       "RunPod /run requests by outcome and HTTP status (code 0: no response).");
	for (size_t o = 0; o < N_OUTCOMES; o++) {
		for (size_t c = 0; c < N_CODE_SLOTS; c++) {
			uint64_t v = get(&m.requests[o][c]);
			char code[16];

			if (v == 0)
				continue;
			if (c == CODE_OTHER)
				snprintf(code, sizeof(code), "other");
			else if (c == CODE_NONE)
				snprintf(code, sizeof(code), "0");
			else
				snprintf(code, sizeof(code), "%ld", code_table[c]);
			bprintf(b, PREFIX "%s{outcome=\"%s\",code=\"%s\"} %llu\n", name,
				outcome_names[o], code, (unsigned long long)v);
		}
	}
}

static void render_histogram(struct buf *b)
{
	static const char name[] = "runpod_request_duration_seconds";
	uint64_t cumulative = 0;
	char num[32];

	family(b, name, "histogram", "Duration of RunPod /run requests, whatever their outcome.");
	for (size_t i = 0; i < N_BOUNDS; i++) {
		cumulative += get(&m.duration_buckets[i]);
		bprintf(b, PREFIX "%s_bucket{le=\"%s\"} %llu\n", name, bucket_labels[i],
			(unsigned long long)cumulative);
	}
	/* +Inf and _count come from the same snapshot, so they always agree. */
	cumulative += get(&m.duration_buckets[N_BOUNDS]);
	bprintf(b, PREFIX "%s_bucket{le=\"+Inf\"} %llu\n", name, (unsigned long long)cumulative);
	format_double(num, sizeof(num), (double)get(&m.duration_sum_ns) / 1e9);
	bprintf(b, PREFIX "%s_sum %s\n", name, num);
	bprintf(b, PREFIX "%s_count %llu\n", name, (unsigned long long)cumulative);
}

char *metrics_render(size_t *len)
{
	struct buf b = { .cap = 4096 };

	b.p = malloc(b.cap);
	if (b.p == NULL)
		return NULL;
	b.p[0] = '\0';

	counter(&b, "messages_read_total", "Messages read from the queue.", &m.messages_read);
	counter(&b, "messages_dispatched_total", "Messages in /run requests that RunPod accepted.",
		&m.messages_dispatched);
	counter(&b, "messages_released_total",
		"Messages made visible again with set_vt after a failure or at shutdown.",
		&m.messages_released);
	family(&b, "messages_archived_total", "counter",
	       "Messages archived by the dispatcher, by reason.");
	labelled(&b, "messages_archived_total", "reason", archive_names, m.messages_archived,
		 N_ARCHIVE_REASONS);
	render_requests(&b);
	counter(&b, "pg_reconnects_total",
		"Successful database reconnects after the first connection.", &m.pg_reconnects);
	counter(&b, "ledger_recovered_unknown_total",
		"Ledger dispatches a dead replica left sending, recorded as unknown.",
		&m.ledger_recovered_unknown);
	counter(&b, "ledger_jobs_claimed_total",
		"Accepted jobs taken over from a replica whose lease ran out.",
		&m.ledger_jobs_claimed);
	counter(&b, "ledger_completed_undeleted_total",
		"COMPLETED jobs whose messages were still queued after ledger.completed_grace_s.",
		&m.ledger_completed_undeleted);
	family(&b, "reads_total", "counter", "Queue reads by result.");
	labelled(&b, "reads_total", "result", read_names, m.reads, N_READ_RESULTS);

	family(&b, "in_flight_requests", "gauge", "RunPod /run requests in flight.");
	bprintf(&b, PREFIX "in_flight_requests %ld\n",
		atomic_load_explicit(&m.in_flight, memory_order_relaxed));
	family(&b, "circuit_open", "gauge", "1 while the circuit breaker is open, else 0.");
	bprintf(&b, PREFIX "circuit_open %d\n",
		atomic_load_explicit(&m.circuit_open, memory_order_relaxed));
	family(&b, "queue_length", "gauge", "Messages in the queue, from pgmq.metrics.");
	bprintf(&b, PREFIX "queue_length %lld\n",
		atomic_load_explicit(&m.queue_length, memory_order_relaxed));
	gauge_double(&b, "queue_oldest_message_age_seconds",
		     "Age of the oldest message in the queue, from pgmq.metrics.",
		     load_double(&m.queue_oldest_age_bits));
	gauge_double(&b, "queue_metrics_refresh_timestamp_seconds",
		     "Unix time of the last successful pgmq.metrics refresh (0: never).",
		     load_double(&m.queue_refresh_time_bits));
	render_histogram(&b);
	gauge_double(&b, "start_time_seconds", "Unix time the process started.",
		     load_double(&m.start_time_bits));
	render_tracker(&b);
	render_fleet(&b);
	family(&b, "log_lines_dropped_total", "counter",
	       "Log lines dropped because stderr was not being read.");
	bprintf(&b, PREFIX "log_lines_dropped_total %llu\n", log_lines_dropped());

	if (b.failed) {
		free(b.p);
		return NULL;
	}
	if (len)
		*len = b.len;
	return b.p;
}

/* ---- the tracker ---- */

#define N_TRACKED 4
#define N_TERMINAL 5

static const char *const tracked_names[N_TRACKED] = { "IN_QUEUE", "IN_PROGRESS", "RUNNING",
						      "OTHER" };
static const char *const terminal_names[N_TERMINAL] = { "COMPLETED", "FAILED", "CANCELLED",
							"TIMED_OUT", "EXPIRED" };

static struct {
	atomic_long tracked[N_TRACKED];
	counter_t terminal[N_TERMINAL];
	counter_t heartbeats, early_releases, evicted, heartbeat_ceilings;
	atomic_uint_least64_t oldest_in_queue_since_bits; /* Unix time, 0 = none */
	atomic_int queue_cap_reached;
	atomic_llong health_jobs[METRICS_HEALTH_NJOBS];
	atomic_llong health_workers[METRICS_HEALTH_NWORKERS];
	atomic_uint_least64_t health_time_bits;
} mt;

static const char *const health_job_names[METRICS_HEALTH_NJOBS] = { "completed", "failed",
								    "in_progress", "in_queue",
								    "retried" };
static const char *const health_worker_names[METRICS_HEALTH_NWORKERS] = {
	"idle", "initializing", "ready", "running", "throttled", "unhealthy"
};

static void tracker_metrics_init(void)
{
	for (size_t i = 0; i < N_TRACKED; i++)
		atomic_init(&mt.tracked[i], 0);
	for (size_t i = 0; i < N_TERMINAL; i++)
		atomic_init(&mt.terminal[i], 0);
	atomic_init(&mt.heartbeats, 0);
	atomic_init(&mt.early_releases, 0);
	atomic_init(&mt.evicted, 0);
	atomic_init(&mt.heartbeat_ceilings, 0);
	atomic_init(&mt.queue_cap_reached, 0);
	for (size_t i = 0; i < METRICS_HEALTH_NJOBS; i++)
		atomic_init(&mt.health_jobs[i], 0);
	for (size_t i = 0; i < METRICS_HEALTH_NWORKERS; i++)
		atomic_init(&mt.health_workers[i], 0);
	store_double(&mt.oldest_in_queue_since_bits, 0.0);
	store_double(&mt.health_time_bits, 0.0);
}

void metrics_inc_tracker_heartbeat_ceilings(void)
{
	add(&mt.heartbeat_ceilings, 1);
}

void metrics_set_oldest_in_queue_since(double since_unix)
{
	store_double(&mt.oldest_in_queue_since_bits, since_unix > 0 ? since_unix : 0.0);
}

void metrics_set_queue_cap_reached(bool reached)
{
	atomic_store_explicit(&mt.queue_cap_reached, reached ? 1 : 0, memory_order_relaxed);
}

void metrics_set_runpod_health(const long long jobs[METRICS_HEALTH_NJOBS],
			       const long long workers[METRICS_HEALTH_NWORKERS])
{
	for (size_t i = 0; i < METRICS_HEALTH_NJOBS; i++)
		atomic_store_explicit(&mt.health_jobs[i], jobs[i], memory_order_relaxed);
	for (size_t i = 0; i < METRICS_HEALTH_NWORKERS; i++)
		atomic_store_explicit(&mt.health_workers[i], workers[i], memory_order_relaxed);
	store_double(&mt.health_time_bits, realtime_now());
}

void metrics_set_tracked_jobs(enum metrics_tracked_status s, long n)
{
	if ((unsigned)s < N_TRACKED)
		atomic_store_explicit(&mt.tracked[s], n, memory_order_relaxed);
}

void metrics_inc_tracker_terminal(enum metrics_terminal t)
{
	if ((unsigned)t < N_TERMINAL)
		add(&mt.terminal[t], 1);
}

void metrics_inc_tracker_heartbeats(void)
{
	add(&mt.heartbeats, 1);
}

void metrics_inc_tracker_early_releases(void)
{
	add(&mt.early_releases, 1);
}

void metrics_inc_tracker_evicted(void)
{
	add(&mt.evicted, 1);
}

static const char *const fleet_kinds[2] = { "run", "status" };
static struct {
	counter_t grants[2], denied[2], granted[2], unused[2];
	atomic_int fallback[2];
} mf; /* zero-initialised (static storage); never reset */

void metrics_inc_fleet_grant(int kind, int slots)
{
	if (kind < 0 || kind > 1)
		return;
	add(slots > 0 ? &mf.grants[kind] : &mf.denied[kind], 1);
	if (slots > 0)
		add(&mf.granted[kind], (unsigned long long)slots);
}

void metrics_add_fleet_unused(int kind, unsigned long long slots)
{
	if (kind >= 0 && kind <= 1)
		add(&mf.unused[kind], slots);
}

void metrics_set_fleet_fallback(int kind, bool on)
{
	if (kind >= 0 && kind <= 1)
		atomic_store_explicit(&mf.fallback[kind], on ? 1 : 0, memory_order_relaxed);
}

static void render_fleet(struct buf *b)
{
	family(b, "fleet_grants_total", "counter", "Grants of the fleet budget, by kind.");
	labelled(b, "fleet_grants_total", "kind", fleet_kinds, mf.grants, 2);
	family(b, "fleet_grants_denied_total", "counter",
	       "Grant statements that found the fleet's cap used up.");
	labelled(b, "fleet_grants_denied_total", "kind", fleet_kinds, mf.denied, 2);
	family(b, "fleet_slots_granted_total", "counter", "Requests granted by the fleet budget.");
	labelled(b, "fleet_slots_granted_total", "kind", fleet_kinds, mf.granted, 2);
	family(b, "fleet_slots_unused_total", "counter",
	       "Granted requests dropped unused when their grant expired.");
	labelled(b, "fleet_slots_unused_total", "kind", fleet_kinds, mf.unused, 2);
	family(b, "fleet_fallback", "gauge",
	       "1 while no grant can be had and the local share of the cap applies.");
	for (size_t i = 0; i < 2; i++)
		bprintf(b, PREFIX "fleet_fallback{kind=\"%s\"} %d\n", fleet_kinds[i],
			atomic_load_explicit(&mf.fallback[i], memory_order_relaxed));
}

static void render_tracker(struct buf *b)
{
	family(b, "tracked_jobs", "gauge",
	       "Jobs the tracker follows through /status, by last status.");
	for (size_t i = 0; i < N_TRACKED; i++)
		bprintf(b, PREFIX "tracked_jobs{status=\"%s\"} %ld\n", tracked_names[i],
			atomic_load_explicit(&mt.tracked[i], memory_order_relaxed));
	family(b, "tracker_terminal_total", "counter",
	       "Tracked jobs that ended, by terminal status (EXPIRED: /status answered 404).");
	labelled(b, "tracker_terminal_total", "status", terminal_names, mt.terminal, N_TERMINAL);
	counter(b, "tracker_heartbeats_total",
		"Visibility extensions (set_vt) of the messages of running jobs.", &mt.heartbeats);
	counter(b, "tracker_early_releases_total",
		"Failed, cancelled or timed-out jobs whose messages were made visible early.",
		&mt.early_releases);
	counter(b, "tracker_evicted_total",
		"Jobs no longer tracked because max_tracked_jobs was reached.", &mt.evicted);
	counter(b, "tracker_heartbeat_ceilings_total",
		"Jobs whose heartbeats stopped at max_heartbeat_s.", &mt.heartbeat_ceilings);
	{
		double since = load_double(&mt.oldest_in_queue_since_bits), age = 0.0;

		if (since > 0) {
			age = realtime_now() - since;
			if (age < 0)
				age = 0.0;
		}
		family(b, "tracker_oldest_in_queue_seconds", "gauge",
		       "Age of the oldest tracked job still IN_QUEUE (since /run accepted it), 0 = none.");
		bprintf(b, PREFIX "tracker_oldest_in_queue_seconds %.3f\n", age);
	}
	family(b, "tracker_queue_cap_reached", "gauge",
	       "1 while reads pause because max_queued_jobs jobs wait IN_QUEUE, else 0.");
	bprintf(b, PREFIX "tracker_queue_cap_reached %d\n",
		atomic_load_explicit(&mt.queue_cap_reached, memory_order_relaxed));
	family(b, "runpod_health_jobs", "gauge", "Job counts from RunPod's /health, by state.");
	for (size_t i = 0; i < METRICS_HEALTH_NJOBS; i++)
		bprintf(b, PREFIX "runpod_health_jobs{state=\"%s\"} %lld\n", health_job_names[i],
			atomic_load_explicit(&mt.health_jobs[i], memory_order_relaxed));
	family(b, "runpod_health_workers", "gauge",
	       "Worker counts from RunPod's /health, by state.");
	for (size_t i = 0; i < METRICS_HEALTH_NWORKERS; i++)
		bprintf(b, PREFIX "runpod_health_workers{state=\"%s\"} %lld\n",
			health_worker_names[i],
			atomic_load_explicit(&mt.health_workers[i], memory_order_relaxed));
	family(b, "runpod_health_timestamp_seconds", "gauge",
	       "Unix time of the last /health answer read, 0 = never.");
	bprintf(b, PREFIX "runpod_health_timestamp_seconds %.3f\n",
		load_double(&mt.health_time_bits));
}
