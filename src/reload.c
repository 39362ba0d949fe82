/* reload — SIGHUP: what a new snapshot changes (a pure diff), the
 * derived strings of a snapshot (URLs, auth header, /run envelope), and the
 * all-or-nothing switch: everything new is built first, then committed in
 * steps that cannot fail, so a failure leaves the old configuration fully
 * in effect, rate cap included. Knows nothing of reads, batches or NOTIFY
 * beyond asking wakeup and circuit to follow the new timers. */
#include "dispatcher_int.h"
#include "log.h"

#include <stdlib.h>
#include <string.h>

struct runpod_extras dispatcher_extras_of(const struct config *cfg)
{
	return (struct runpod_extras){
		.webhook = cfg->webhook,
		.execution_timeout_ms = cfg->policy_execution_timeout_ms,
		.ttl_ms = cfg->policy_ttl_ms,
		.low_priority = cfg->policy_low_priority != 0,
		.dispatch_id = cfg->dispatch_id_in_input && cfg->ledger_enabled,
	};
}

/* Builds everything a snapshot's URLs, key and envelope give; the old
 * conf is untouched. 0, or -1 (logged, out cleared). */
int dispatcher_conf_build(struct dispatcher_conf *out, const struct config *cfg)
{
	struct runpod_extras extras = dispatcher_extras_of(cfg);

	memset(out, 0, sizeof(*out));
	if (runpod_url(cfg->base_url, cfg->endpoint_id, "run", out->run_url,
		       sizeof(out->run_url)) != 0 ||
	    runpod_url(cfg->base_url, cfg->endpoint_id, "health", out->health_url,
		       sizeof(out->health_url)) != 0) {
		log_msg(LOG_ERROR, "config_invalid",
			"runpod.base_url and runpod.endpoint_id are too long");
		return -1;
	}
	out->auth_header = runpod_auth_header(cfg->api_key);
	if (out->auth_header == NULL ||
	    runpod_envelope_init(&out->envelope, cfg->queue_name, cfg->vt_seconds, &extras) != 0) {
		log_msg(LOG_ERROR, "out_of_memory", "cannot build the /run envelope");
		free(out->auth_header);
		out->auth_header = NULL;
		return -1;
	}
	out->cfg = cfg;
	return 0;
}

void dispatcher_conf_free(struct dispatcher_conf *c)
{
	free(c->auth_header);
	c->auth_header = NULL;
	runpod_envelope_free(&c->envelope);
}

static bool differs(const char *a, const char *b)
{
	return strcmp(a ? a : "", b ? b : "") != 0;
}

struct reload_diff dispatcher_reload_diff(const struct config *old, const struct config *cfg,
					  bool have_tracker, bool once, bool stopping)
{
	return (struct reload_diff){
		.rate_cap = old->max_requests_per_10s != cfg->max_requests_per_10s,
		.conninfo = strcmp(old->conninfo, cfg->conninfo) != 0,
		.new_tracker = !have_tracker && cfg->tracker_enabled && !once && !stopping,
		.runpod = differs(old->api_key, cfg->api_key) ||
			  differs(old->endpoint_id, cfg->endpoint_id) ||
			  differs(old->base_url, cfg->base_url) ||
			  differs(old->ca_file, cfg->ca_file),
	};
}

void dispatcher_timer_retime(struct ev_loop *loop, ev_timer *t, double period_s)
{
	double since_s, next_s;

	if (!ev_is_active(t)) {
		t->repeat = period_s;
		return;
	}
	if (t->repeat == period_s)
		return;
	/* A repeating timer is due repeat after its last fire. */
	since_s = t->repeat - ev_timer_remaining(loop, t);
	if (since_s < 0)
		since_s = 0;
	next_s = period_s - since_s;
	ev_timer_stop(loop, t);
	ev_timer_set(t, next_s > 0 ? next_s : 0.0, period_s);
	ev_timer_start(loop, t);
}

/* All or nothing: everything new is built first, and the old state stays
 * in effect if any of it fails; then commits in steps that cannot fail. */
int dispatcher_reload(struct dispatcher *d, const struct config *cfg)
{
	struct reload_diff diff = dispatcher_reload_diff(d->cfg, cfg, d->tracker != NULL, d->once,
							 d->stopping);
	struct dispatcher_conf conf;
	struct ratelimit rl = { 0 };
	struct tracker *tracker = NULL;
	struct tracker_next tracker_next = { 0 };

	if (dispatcher_conf_build(&conf, cfg) != 0)
		return -1;
	if (diff.rate_cap && ratelimit_resized(&d->rl, cfg->max_requests_per_10s, &rl) != 0) {
		log_msg(LOG_ERROR, "out_of_memory", "cannot resize the /run rate cap");
		goto fail;
	}
	if (diff.new_tracker && (tracker = tracker_new(d->loop, cfg, d->http, d->pg)) == NULL) {
		log_msg(LOG_ERROR, "reload_failed", "cannot start the tracker");
		goto fail;
	}
	if (tracker_reload_prepare(d->tracker, cfg, &tracker_next) != 0) {
		log_msg(LOG_ERROR, "out_of_memory", "cannot resize the /status rate cap");
		goto fail;
	}
	/* The last step that can fail, and it changes nothing when it does. */
	if (pg_set_conninfo(d->pg, cfg->conninfo) != 0) {
		log_msg(LOG_ERROR, "out_of_memory", "cannot take the new conninfo");
		goto fail;
	}

	/* Commit: nothing below can fail. */
	dispatcher_conf_free(&d->conf);
	d->conf = conf;
	d->cfg = cfg;
	if (diff.rate_cap) {
		ratelimit_free(&d->rl);
		d->rl = rl;
	}
	if (tracker) {
		/* Turned on by this reload: follow jobs accepted from now on. */
		d->tracker = tracker;
		tracker_set_wake(d->tracker, wakeup_after, d);
		if (tracker_set_fleet(d->tracker, cfg) != 0)
			log_msg(LOG_WARN, "out_of_memory", "the tracker keeps its own /status cap");
		if (d->ledger)
			tracker_set_observer(d->tracker, dispatcher_tracker_state, d);
	} else {
		tracker_reload(d->tracker, cfg, &tracker_next);
	}
	ledger_reload(d->ledger, cfg);
	budget_reload(d->budget, cfg);
	tracker_next_free(&tracker_next); /* what the tracker did not take */
	/* Running timers keep their phase: a SIGHUP now and then must not
	 * push the next poll or stats refresh away; only a changed period
	 * moves them, counted from their last fire. */
	wakeup_reload(d);
	dispatcher_timer_retime(d->loop, &d->stats_timer, cfg->metrics_interval_ms / 1000.0);
	if (diff.runpod)
		circuit_reload(d);
	return 0;
fail:
	tracker_next_free(&tracker_next);
	tracker_free(tracker);
	ratelimit_free(&rl);
	dispatcher_conf_free(&conf);
	return -1;
}
