/* circuit — see include/circuit.h; the acting half works on the
 * dispatcher's state (include/dispatcher_int.h). */
#include "circuit.h"
#include "backoff.h"
#include "dispatcher_int.h"
#include "log.h"
#include "metrics.h"
#include "tracker.h"

enum circuit_action circuit_next(bool open, enum circuit_event ev, long http_status)
{
	switch (ev) {
	case CIRCUIT_RUN_REPLY:
		return !open && runpod_is_config_error(http_status) ? CIRCUIT_OPEN : CIRCUIT_NONE;
	case CIRCUIT_PROBE_REPLY:
		if (http_status >= 200 && http_status < 300)
			return open ? CIRCUIT_CLOSE : CIRCUIT_NONE;
		return open ? CIRCUIT_PROBE_LATER : CIRCUIT_NONE;
	case CIRCUIT_RELOAD:
		return open ? CIRCUIT_PROBE_NOW : CIRCUIT_NONE;
	}
	return CIRCUIT_NONE;
}

/* Probes back off from backoff_base_ms up to probe_interval_ms. */
static void start_probe_timer(struct dispatcher *d)
{
	double ms = backoff_ms(++d->probe_failures, d->cfg->backoff_base_ms,
			       d->cfg->probe_interval_ms, BACKOFF_MIN_MS, 1.0);

	ms *= 0.5 + 0.5 * backoff_jitter();
	ev_timer_stop(d->loop, &d->probe);
	ev_timer_set(&d->probe, ms / 1000.0, 0.0);
	ev_timer_start(d->loop, &d->probe);
}

void circuit_open(struct dispatcher *d, long http_status)
{
	struct log_line *l;

	if (circuit_next(d->circuit_open, CIRCUIT_RUN_REPLY, http_status) != CIRCUIT_OPEN)
		return;
	d->circuit_open = true;
	d->probe_failures = 0;
	d->circuit_opened_at = d->circuit_reminded_at = ev_now(d->loop);
	metrics_set_circuit_open(true);
	metrics_route_set_circuit_open(d->mroute, true);
	l = log_begin_route(d->cfg->route_name, LOG_ERROR, "circuit_open");
	log_str(l, "endpoint_id", d->cfg->endpoint_id);
	log_int(l, "http_status", http_status);
	/* The /run URL carries no secret (the key goes in a header); a 404
	 * usually means a wrong endpoint id or base_url, which it shows. */
	log_str(l, "url", d->conf.run_url);
	if (d->once)
		log_str(l, "msg",
			"RunPod refuses the API key or the endpoint; --once reads no "
			"more and exits non-zero, the messages are visible again");
	else
		log_str(l, "msg",
			"RunPod refuses the API key or the endpoint; no reads until a "
			"/health probe succeeds or the configuration is reloaded");
	log_end(l);
	start_probe_timer(d);
	dispatcher_state_changed(d);
}

static void close_circuit(struct dispatcher *d, const char *why)
{
	struct log_line *l;

	d->circuit_open = false;
	metrics_set_circuit_open(false);
	metrics_route_set_circuit_open(d->mroute, false);
	ev_timer_stop(d->loop, &d->probe);
	d->failures = 0;
	ev_timer_stop(d->loop, &d->pause);
	l = log_begin_route(d->cfg->route_name, LOG_INFO, "circuit_closed");
	log_str(l, "endpoint_id", d->cfg->endpoint_id);
	log_str(l, "reason", why);
	log_end(l);
	dispatcher_state_changed(d);
	dispatcher_kick(d);
}

/* While the circuit stays open, one warning at most each
 * CIRCUIT_REMIND_S: how long it has been open and how many probes failed,
 * so a daemon at the default level is not silent about reading nothing. */
#define CIRCUIT_REMIND_S 60.0
static void remind_still_open(struct dispatcher *d, const struct http_response *r)
{
	ev_tstamp now = ev_now(d->loop);
	struct log_line *l;

	if (now - d->circuit_reminded_at < CIRCUIT_REMIND_S)
		return;
	d->circuit_reminded_at = now;
	l = log_begin_route(d->cfg->route_name, LOG_WARN, "circuit_still_open");
	log_str(l, "endpoint_id", d->cfg->endpoint_id);
	log_int(l, "open_s", (long)(now - d->circuit_opened_at));
	log_int(l, "probes", d->probe_failures);
	log_int(l, "last_http_status", r->code == CURLE_OK ? r->status : 0);
	log_str(l, "url", d->conf.health_url);
	log_str(l, "msg",
		"no reads while RunPod refuses the API key or the endpoint; fix it "
		"and reload (SIGHUP) to probe at once");
	log_end(l);
}

static void on_probe_done(void *arg, const struct http_response *r)
{
	struct dispatcher *d = arg;
	struct log_line *l;

	d->probing = false;
	if (d->finished || d->stopping) {
		dispatcher_maybe_finish(d);
		return;
	}
	l = log_begin_route(d->cfg->route_name, LOG_DEBUG, "health_probe");
	log_int(l, "http_status", r->status);
	if (r->code != CURLE_OK)
		log_str(l, "error", r->error);
	log_end(l);
	switch (circuit_next(d->circuit_open, CIRCUIT_PROBE_REPLY,
			     r->code == CURLE_OK ? r->status : 0)) {
	case CIRCUIT_CLOSE:
		close_circuit(d, "health probe succeeded");
		break;
	case CIRCUIT_PROBE_LATER:
		remind_still_open(d, r);
		start_probe_timer(d);
		break;
	default:
		break;
	}
}

void circuit_probe_now(struct dispatcher *d)
{
	const char *headers[] = { d->conf.auth_header, "Accept: application/json", NULL };
	struct http_request_opts o = {
		.method = "GET",
		.url = d->conf.health_url,
		.headers = headers,
		.connect_timeout_ms = d->cfg->connect_timeout_ms,
		.timeout_ms = d->cfg->request_timeout_ms,
		.ca_file = d->cfg->ca_file,
		.owner = d,
	};

	if (d->probing || !d->circuit_open)
		return;
	if (http_start(d->http, &o, on_probe_done, d) != 0) {
		start_probe_timer(d);
		return;
	}
	d->probing = true;
}

void circuit_on_probe_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)loop;
	(void)revents;
	circuit_probe_now(w->data);
}

void circuit_reload(struct dispatcher *d)
{
	/* The key or endpoint may have been fixed: probe at once. */
	if (circuit_next(d->circuit_open, CIRCUIT_RELOAD, 0) != CIRCUIT_PROBE_NOW)
		return;
	d->probe_failures = 0;
	ev_timer_stop(d->loop, &d->probe);
	circuit_probe_now(d);
}

/* Like the open circuit, a queue that does not move stops reads: the
 * tracker counts the jobs waiting IN_QUEUE and its wake hook asks for a
 * read when fewer wait. */
bool circuit_queue_capped(struct dispatcher *d)
{
	long queued = tracker_queued_jobs(d->tracker);
	bool full = tracker_queue_full(queued, d->in_flight, d->cfg->tracker_max_queued_jobs);
	struct log_line *l;

	if (full == d->queue_capped)
		return full;
	l = log_begin_route(d->cfg->route_name, full ? LOG_WARN : LOG_INFO,
			    full ? "reads_paused" : "reads_resumed");
	log_int(l, "queued_jobs", queued);
	log_int(l, "in_flight", d->in_flight);
	log_int(l, "max_queued_jobs", d->cfg->tracker_max_queued_jobs);
	if (full)
		log_str(l, "msg",
			"RunPod is not starting the jobs sent: no new /run until fewer "
			"wait IN_QUEUE; the messages wait in the queue");
	log_end(l);
	d->queue_capped = full;
	metrics_set_queue_cap_reached(full);
	dispatcher_state_changed(d);
	return full;
}
