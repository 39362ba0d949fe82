/* metrics_route — the per-route series of include/metrics.h (a route
 * label on pgmqd_route_*): registration of a route's slot, its counters and
 * gauges, and their text. Knows nothing of dispatchers. */
#include "metrics.h"
#include "metrics_int.h"

#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

static const char *const route_counter_names[MR_COUNTERS][2] = {
	{ "route_messages_read_total", "Messages read from the route's queue." },
	{ "route_messages_dispatched_total",
	  "Messages of the route in /run requests RunPod accepted." },
	{ "route_messages_released_total",
	  "Messages of the route made visible again with set_vt." },
	{ "route_messages_archived_total", "Messages of the route archived by the dispatcher." },
	{ "route_requests_accepted_total", "/run requests of the route that RunPod accepted." },
	{ "route_requests_rejected_total", "/run requests of the route that RunPod rejected." },
	{ "route_requests_unknown_total", "/run requests of the route whose outcome is unknown." },
};
static const char *const route_state_names[MRS_STATES] = { "running", "paused", "draining",
							   "drained" };

/* Written and read on the loop's thread only (routes register there). */
static struct {
	int n;
	char name[METRICS_MAX_ROUTES][40];
	counter_t counters[METRICS_MAX_ROUTES][MR_COUNTERS];
	atomic_long in_flight[METRICS_MAX_ROUTES];
	atomic_int circuit_open[METRICS_MAX_ROUTES];
	atomic_llong queue_length[METRICS_MAX_ROUTES];
	atomic_int state[METRICS_MAX_ROUTES];
} mr;

int metrics_route(const char *name)
{
	for (int i = 0; i < mr.n; i++)
		if (strcmp(mr.name[i], name) == 0)
			return i;
	if (mr.n == METRICS_MAX_ROUTES || strlen(name) >= sizeof(mr.name[0]))
		return -1;
	snprintf(mr.name[mr.n], sizeof(mr.name[0]), "%s", name);
	for (int c = 0; c < MR_COUNTERS; c++)
		atomic_init(&mr.counters[mr.n][c], 0);
	atomic_init(&mr.in_flight[mr.n], 0);
	atomic_init(&mr.circuit_open[mr.n], 0);
	atomic_init(&mr.queue_length[mr.n], 0);
	atomic_init(&mr.state[mr.n], MRS_RUNNING);
	return mr.n++;
}

void metrics_route_add(int r, enum metrics_route_counter c, unsigned n)
{
	if (r >= 0 && r < mr.n && (unsigned)c < MR_COUNTERS)
		metrics_add_counter(&mr.counters[r][c], n);
}

void metrics_route_set_in_flight(int r, long n)
{
	if (r >= 0 && r < mr.n)
		atomic_store_explicit(&mr.in_flight[r], n, memory_order_relaxed);
}

void metrics_route_set_circuit_open(int r, bool open)
{
	if (r >= 0 && r < mr.n)
		atomic_store_explicit(&mr.circuit_open[r], open ? 1 : 0, memory_order_relaxed);
}

void metrics_route_set_queue_length(int r, long long length)
{
	if (r >= 0 && r < mr.n)
		atomic_store_explicit(&mr.queue_length[r], length, memory_order_relaxed);
}

void metrics_route_set_state(int r, enum metrics_route_state s)
{
	if (r >= 0 && r < mr.n && (unsigned)s < MRS_STATES)
		atomic_store_explicit(&mr.state[r], (int)s, memory_order_relaxed);
}

/* With routes registered, the process-wide gauges are their sums (the
 * circuit: open when any is). Returns whether any route is registered. */
bool metrics_route_gauges(long *in_flight, int *circuit_open, long long *queue_length)
{
	if (mr.n == 0)
		return false;
	*in_flight = 0;
	*circuit_open = 0;
	*queue_length = 0;
	for (int i = 0; i < mr.n; i++) {
		*in_flight += atomic_load_explicit(&mr.in_flight[i], memory_order_relaxed);
		*circuit_open |= atomic_load_explicit(&mr.circuit_open[i], memory_order_relaxed);
		*queue_length += atomic_load_explicit(&mr.queue_length[i], memory_order_relaxed);
	}
	return true;
}

void metrics_render_routes(struct buf *b)
{
	if (mr.n == 0)
		return;
	for (int c = 0; c < MR_COUNTERS; c++) {
		metrics_family(b, route_counter_names[c][0], "counter", route_counter_names[c][1]);
		for (int i = 0; i < mr.n; i++)
			bprintf(b, PREFIX "%s{route=\"%s\"} %llu\n", route_counter_names[c][0],
				mr.name[i],
				(unsigned long long)metrics_get_counter(&mr.counters[i][c]));
	}
	metrics_family(b, "route_in_flight_requests", "gauge",
		       "/run requests of the route in flight.");
	for (int i = 0; i < mr.n; i++)
		bprintf(b, PREFIX "route_in_flight_requests{route=\"%s\"} %ld\n", mr.name[i],
			atomic_load_explicit(&mr.in_flight[i], memory_order_relaxed));
	metrics_family(b, "route_circuit_open", "gauge",
		       "1 while the route's circuit is open, else 0.");
	for (int i = 0; i < mr.n; i++)
		bprintf(b, PREFIX "route_circuit_open{route=\"%s\"} %d\n", mr.name[i],
			atomic_load_explicit(&mr.circuit_open[i], memory_order_relaxed));
	metrics_family(b, "route_queue_length", "gauge",
		       "Messages in the route's queue (pgmq.metrics).");
	for (int i = 0; i < mr.n; i++)
		bprintf(b, PREFIX "route_queue_length{route=\"%s\"} %lld\n", mr.name[i],
			atomic_load_explicit(&mr.queue_length[i], memory_order_relaxed));
	metrics_family(b, "route_state", "gauge",
		       "1 for the route's read state: running, paused, draining or drained.");
	for (int i = 0; i < mr.n; i++) {
		int st = atomic_load_explicit(&mr.state[i], memory_order_relaxed);
		for (int s = 0; s < MRS_STATES; s++)
			bprintf(b, PREFIX "route_state{route=\"%s\",state=\"%s\"} %d\n", mr.name[i],
				route_state_names[s], st == s ? 1 : 0);
	}
}
