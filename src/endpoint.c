/* endpoint — see include/endpoint.h. Strict priority, not weights: a
 * backfill route must never delay live work, and RunPod's cap is a hard
 * ceiling shared by all, so the route of the lowest runpod.priority number
 * takes every free slot it can use; the others get what is left. Equal
 * priorities take turns. A sliding window spent by a burst stays spent for
 * its whole length, so routes of a worse priority also leave a reserve
 * (ENDPOINT_RESERVE_PCT of the window and of the in-flight ceiling) free:
 * the best route finds slots at once instead of ten seconds later, and are
 * paced to a tenth of the cap per second (the window spread evenly), so
 * that slots keep coming free for the best route all the time. */
#include "endpoint.h"
#include "dispatcher_int.h"
#include "log.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct endpoint {
	struct ev_loop *loop;
	char key[ENDPOINT_KEY_MAX];
	struct dispatcher *m[CONFIG_MAX_ROUTES];
	int n;
	int last;              /* index that went last (turns among equals) */
	struct ratelimit rl;   /* the shared /run window */
	struct ratelimit pace; /* a tenth of the cap per second: worse priorities */
	ev_timer rate_timer;   /* a shared slot frees */
};

int endpoint_pick(const struct endpoint_want *w, int n, int last)
{
	int best = -1;

	for (int k = 1; k <= n; k++) {
		int i = (last + k) % n;
		if (i < 0)
			i += n;
		if (w[i].want && (best < 0 || w[i].priority < w[best].priority))
			best = i;
	}
	return best;
}

bool endpoint_read_allowed(int priority, int in_flight, int max_in_flight, int best_waiting,
			   int keep)
{
	return in_flight + keep < max_in_flight && best_waiting >= priority;
}

int endpoint_reserve(int cap)
{
	int keep = cap * ENDPOINT_RESERVE_PCT / 100;

	return keep < 1 ? 1 : keep;
}

/* The best (lowest) priority number of ep's routes. */
static int best_priority(const struct endpoint *ep)
{
	int best = INT_MAX;

	for (int i = 0; i < ep->n; i++)
		if (ep->m[i]->cfg->priority < best)
			best = ep->m[i]->cfg->priority;
	return best;
}

void endpoint_key_of(const struct config *cfg, char *buf, size_t len)
{
	snprintf(buf, len, "%s/%s", cfg->base_url, cfg->endpoint_id);
}

static void on_rate_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)loop;
	(void)revents;
	endpoint_pump(w->data);
}

struct endpoint *endpoint_new(struct ev_loop *loop, const char *key)
{
	struct endpoint *ep = calloc(1, sizeof(*ep));

	if (ep == NULL)
		return NULL;
	ep->loop = loop;
	snprintf(ep->key, sizeof(ep->key), "%s", key);
	ev_timer_init(&ep->rate_timer, on_rate_timer, 0.0, 0.0);
	ep->rate_timer.data = ep;
	return ep;
}

const char *endpoint_key(const struct endpoint *ep)
{
	return ep->key;
}

static int largest_cap(struct dispatcher *const *ds, int n)
{
	int cap = 1;

	for (int i = 0; i < n; i++)
		if (ds[i]->cfg->max_requests_per_10s > cap)
			cap = ds[i]->cfg->max_requests_per_10s;
	return cap;
}

/* Sizes the shared ring and the pace for cap; the ring keeps its newest
 * send times (for a new endpoint, those of its first route). False when
 * out of memory with nothing to fall back on. */
static bool size_rings(struct endpoint *ep, int cap, const struct ratelimit *first)
{
	int pace = cap / 10 < 1 ? 1 : cap / 10;
	struct ratelimit next = { 0 };

	if (ep->rl.sent_at == NULL || ep->rl.cap != cap) {
		if (ratelimit_resized(ep->rl.sent_at ? &ep->rl : first, cap, &next) == 0) {
			ratelimit_free(&ep->rl);
			ep->rl = next;
		} else {
			log_msg(LOG_WARN, "out_of_memory", "cannot size the shared /run cap of %s",
				ep->key);
		}
	}
	if (ep->pace.sent_at == NULL || ep->pace.cap != pace) {
		struct ratelimit p = { 0 };
		if (ratelimit_init(&p, pace, 1.0) == 0) {
			ratelimit_free(&ep->pace);
			ep->pace = p;
		}
	}
	return ep->rl.sent_at != NULL && ep->pace.sent_at != NULL;
}

void endpoint_set_members(struct endpoint *ep, struct dispatcher *const *ds, int n)
{
	struct dispatcher *left[CONFIG_MAX_ROUTES];
	int nleft = 0;

	if (n > CONFIG_MAX_ROUTES)
		n = CONFIG_MAX_ROUTES;
	if (n > 0 && !size_rings(ep, largest_cap(ds, n), &ds[0]->rl)) {
		log_msg(LOG_WARN, "out_of_memory",
			"cannot share the /run cap of %s; each route keeps its own", ep->key);
		n = 0;
	}
	for (int i = 0; i < ep->n; i++) {
		bool kept = false;
		for (int k = 0; k < n; k++)
			kept |= ds[k] == ep->m[i];
		if (!kept)
			left[nleft++] = ep->m[i];
	}
	ep->n = 0;
	for (int k = 0; k < n; k++) {
		ds[k]->ep = ep;
		ep->m[ep->n++] = ds[k];
	}
	ep->last = 0;
	for (int i = 0; i < nleft; i++) {
		bool wanted = left[i]->ep_wanted;
		left[i]->ep = NULL;
		left[i]->ep_wanted = false;
		post_send_waiting(left[i]); /* on its own cap again */
		if (wanted)
			dispatcher_kick(left[i]);
	}
	if (ep->n)
		endpoint_pump(ep);
	else
		ev_timer_stop(ep->loop, &ep->rate_timer);
}

void endpoint_free(struct endpoint *ep)
{
	if (ep == NULL)
		return;
	for (int i = 0; i < ep->n; i++) { /* no sends: the routes are being freed */
		ep->m[i]->ep = NULL;
		ep->m[i]->ep_wanted = false;
	}
	ev_timer_stop(ep->loop, &ep->rate_timer);
	ratelimit_free(&ep->rl);
	ratelimit_free(&ep->pace);
	free(ep);
}

void endpoint_pump(struct endpoint *ep)
{
	for (;;) {
		struct endpoint_want w[CONFIG_MAX_ROUTES];
		double now = ev_time(), wait_s = 0;
		bool worse;
		int k;

		for (int i = 0; i < ep->n; i++) {
			w[i].priority = ep->m[i]->cfg->priority;
			w[i].want = ep->m[i]->waiting && post_own_slot(ep->m[i], now);
		}
		if ((k = endpoint_pick(w, ep->n, ep->last)) < 0)
			return;
		/* A worse priority leaves the reserve of the window free and
		 * keeps to the pace. */
		worse = ep->m[k]->cfg->priority > best_priority(ep);
		if (!ratelimit_slot_keep(&ep->rl, now, worse ? endpoint_reserve(ep->rl.cap) : 0,
					 &wait_s) ||
		    (worse && !ratelimit_slot(&ep->pace, now, &wait_s))) {
			if (!ev_is_active(&ep->rate_timer)) {
				ev_timer_set(&ep->rate_timer, wait_s, 0.0);
				ev_timer_start(ep->loop, &ep->rate_timer);
			}
			return;
		}
		ep->last = k;
		if (post_send_next(ep->m[k])) {
			ratelimit_record(&ep->rl, ev_time());
			ratelimit_record(&ep->pace, ev_time());
		}
	}
}

/* The endpoint's in-flight count: requests of every route, plus one for
 * each read on its way (its rows are not counted until it comes back). */
static int taken(const struct endpoint *ep, int *ceiling)
{
	int sum = 0;

	*ceiling = 1;
	for (int i = 0; i < ep->n; i++) {
		const struct dispatcher *d = ep->m[i];
		sum += d->in_flight + (d->reading ? 1 : 0);
		if (d->cfg->max_in_flight > *ceiling)
			*ceiling = d->cfg->max_in_flight;
	}
	return sum;
}

/* A route whose read waits for the endpoint alone: nothing of its own
 * (pause, circuit, its own max_in_flight, stopping) holds it back. */
static bool waits_for_endpoint(const struct dispatcher *d)
{
	return d->ep_wanted && !d->reading && !d->stopping && !d->finished && !d->circuit_open &&
	       !ev_is_active(&d->pause) && d->ctl_loaded && control_may_read(d->ctl) &&
	       d->in_flight < d->cfg->max_in_flight;
}

bool endpoint_may_read(const struct endpoint *ep, const struct dispatcher *d)
{
	int ceiling, best = INT_MAX;
	int sum = taken(ep, &ceiling);

	for (int i = 0; i < ep->n; i++)
		if (ep->m[i] != d && waits_for_endpoint(ep->m[i]) && ep->m[i]->cfg->priority < best)
			best = ep->m[i]->cfg->priority;
	return endpoint_read_allowed(d->cfg->priority, sum, ceiling, best,
				     d->cfg->priority > best_priority(ep)
					     ? endpoint_reserve(ceiling)
					     : 0);
}

void endpoint_slot_freed(struct endpoint *ep)
{
	struct dispatcher *order[CONFIG_MAX_ROUTES];
	int n = 0;

	for (int i = 0; i < ep->n; i++)
		if (ep->m[i]->ep_wanted || ep->m[i]->read_wanted)
			order[n++] = ep->m[i];
	/* Lowest number first (insertion sort of at most 16). */
	for (int i = 1; i < n; i++)
		for (int k = i; k > 0 && order[k]->cfg->priority < order[k - 1]->cfg->priority;
		     k--) {
			struct dispatcher *t = order[k];
			order[k] = order[k - 1];
			order[k - 1] = t;
		}
	for (int i = 0; i < n; i++)
		if (order[i]->ep == ep) /* a kick cannot make one leave, but be sure */
			dispatcher_kick(order[i]);
}

int endpoint_free_slots(const struct endpoint *ep)
{
	int ceiling;
	int sum = taken(ep, &ceiling);

	return ceiling - sum;
}

int endpoint_rate_available(const struct endpoint *ep, double now, double horizon_s)
{
	int waiting = 0;

	for (int i = 0; i < ep->n; i++)
		waiting += ep->m[i]->nwaiting;
	return ratelimit_available(&ep->rl, now, horizon_s) - waiting;
}
