/* route — see include/route.h. */
#include "route.h"
#include "endpoint.h"
#include "log.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct route {
	struct routes *owner;
	struct dispatcher *d;
	const struct config *snapshot; /* the top-level snapshot d's route lives in */
	bool done;
	bool retired; /* removed by a reload: finishing */
	enum dispatcher_result result;
};

struct routes {
	struct ev_loop *loop;
	struct config *cfg; /* in use */
	bool once, stopping, reported;
	dispatcher_done_fn done;
	void *done_arg;
	void (*state_hook)(void *arg);
	void *state_arg;
	struct route *live[CONFIG_MAX_ROUTES];
	int n;
	struct route *retired[ROUTES_MAX_RETIRED];
	int nretired;
	struct config *old[ROUTES_MAX_RETIRED]; /* snapshots retired routes point into */
	int nold;
	ev_timer reap;        /* frees finished retired routes outside their callbacks */
	struct http *http;    /* the one libcurl multi handle of every route */
	struct pg_pool *pool; /* their database connections, one per conninfo */
	struct endpoint *eps[CONFIG_MAX_ROUTES]; /* endpoints shared by two or more routes */
	int neps;
};

/* Groups the live routes by endpoint: routes on one endpoint share its /run
 * cap and in-flight ceiling by priority (endpoint.c); a route alone keeps
 * its own. Endpoints kept across reloads keep their send times. */
static void regroup(struct routes *r)
{
	char keys[CONFIG_MAX_ROUTES][ENDPOINT_KEY_MAX];
	struct endpoint *next[CONFIG_MAX_ROUTES] = { 0 };
	bool used[CONFIG_MAX_ROUTES] = { false };
	int nnext = 0;

	for (int i = 0; i < r->n; i++)
		endpoint_key_of(dispatcher_config(r->live[i]->d), keys[i], sizeof(keys[i]));
	for (int i = 0; i < r->n; i++) {
		struct dispatcher *ds[CONFIG_MAX_ROUTES];
		struct endpoint *ep = NULL;
		int n = 0;
		bool first = true;

		for (int k = 0; k < r->n; k++) {
			if (strcmp(keys[k], keys[i]) != 0)
				continue;
			first &= k >= i;
			ds[n++] = r->live[k]->d;
		}
		if (!first || n < 2)
			continue;
		for (int e = 0; e < r->neps; e++)
			if (!used[e] && strcmp(endpoint_key(r->eps[e]), keys[i]) == 0) {
				ep = r->eps[e];
				used[e] = true;
			}
		if (ep == NULL && (ep = endpoint_new(r->loop, keys[i])) == NULL) {
			log_msg(LOG_WARN, "out_of_memory",
				"cannot share the /run cap of %s; each route keeps its own",
				keys[i]);
			continue;
		}
		endpoint_set_members(ep, ds, n);
		next[nnext++] = ep;
	}
	for (int e = 0; e < r->neps; e++)
		if (!used[e]) {
			endpoint_set_members(r->eps[e], NULL,
					     0); /* its routes go back to their own caps */
			endpoint_free(r->eps[e]);
		}
	for (int e = 0; e < nnext; e++)
		r->eps[e] = next[e];
	r->neps = nnext;
}

/* Worst first: what --once reports for several routes. */
static int rank(enum dispatcher_result r)
{
	switch (r) {
	case DISPATCH_DONE_FATAL:
		return 5;
	case DISPATCH_DONE_FAILED:
		return 4;
	case DISPATCH_DONE_UNKNOWN:
		return 3;
	case DISPATCH_DONE_DISPATCHED:
		return 2;
	case DISPATCH_DONE_EMPTY:
		return 1;
	case DISPATCH_DONE_STOPPED:
		return 0;
	}
	return 0;
}

static void check_all_done(struct routes *r)
{
	enum dispatcher_result worst = DISPATCH_DONE_STOPPED;
	bool any = false;

	if (r->reported)
		return;
	for (int i = 0; i < r->n; i++) {
		if (!r->live[i]->done)
			return;
		if (!any || rank(r->live[i]->result) > rank(worst))
			worst = r->live[i]->result;
		any = true;
	}
	if (r->stopping)
		for (int i = 0; i < r->nretired; i++)
			if (!r->retired[i]->done)
				return;
	r->reported = true;
	r->done(r->done_arg, worst);
}

static void on_route_done(void *arg, enum dispatcher_result result)
{
	struct route *rt = arg;
	struct routes *r = rt->owner;

	rt->done = true;
	rt->result = result;
	if (result == DISPATCH_DONE_FATAL && !rt->retired && !r->stopping) {
		/* The ledger's schema cannot be used: the daemon stops, all
		 * routes, and exits with this result (the worst). */
		routes_stop(r);
		return;
	}
	if (rt->retired) {
		ev_timer_start(r->loop, &r->reap); /* not here: we are inside d's callback */
		if (r->stopping)
			check_all_done(r);
		return;
	}
	check_all_done(r);
}

static void on_state(void *arg)
{
	struct route *rt = arg;

	if (rt->owner->state_hook)
		rt->owner->state_hook(rt->owner->state_arg);
}

static struct route *route_new(struct routes *r, const struct config *route_cfg,
			       const struct config *snapshot)
{
	struct route *rt = calloc(1, sizeof(*rt));

	if (rt == NULL)
		return NULL;
	rt->owner = r;
	rt->snapshot = snapshot;
	rt->d = dispatcher_new_shared(r->loop, route_cfg, r->http, r->pool, r->once, on_route_done,
				      rt);
	if (rt->d == NULL) {
		free(rt);
		return NULL;
	}
	dispatcher_set_state_hook(rt->d, on_state, rt);
	return rt;
}

static void route_free(struct route *rt)
{
	if (rt == NULL)
		return;
	dispatcher_free(rt->d);
	free(rt);
}

static bool snapshot_used(const struct routes *r, const struct config *s)
{
	if (s == r->cfg)
		return true;
	for (int i = 0; i < r->nretired; i++)
		if (r->retired[i]->snapshot == s)
			return true;
	return false;
}

static void on_reap(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct routes *r = w->data;
	int kept = 0;

	(void)loop;
	(void)revents;
	for (int i = 0; i < r->nretired; i++) {
		if (r->retired[i]->done) {
			struct log_line *l = log_begin_route(dispatcher_route_name(
								     r->retired[i]->d),
							     LOG_INFO, "route_removed");
			log_str(l, "msg", "the removed route has finished");
			log_end(l);
			route_free(r->retired[i]);
		} else {
			r->retired[kept++] = r->retired[i];
		}
	}
	r->nretired = kept;
	kept = 0;
	for (int i = 0; i < r->nold; i++) {
		if (snapshot_used(r, r->old[i])) {
			r->old[kept++] = r->old[i];
		} else {
			config_free(r->old[i]);
			free(r->old[i]);
		}
	}
	r->nold = kept;
}

struct routes *routes_new(struct ev_loop *loop, struct config *cfg, bool once,
			  dispatcher_done_fn done, void *arg)
{
	struct routes *r = calloc(1, sizeof(*r));

	if (r == NULL)
		return NULL;
	if ((r->http = http_new(loop)) == NULL || (r->pool = pg_pool_new(loop)) == NULL) {
		http_free(r->http);
		free(r);
		return NULL;
	}
	r->loop = loop;
	r->once = once;
	r->done = done;
	r->done_arg = arg;
	ev_timer_init(&r->reap, on_reap, 0.0, 0.0);
	r->reap.data = r;
	for (int i = 0; i < cfg->nroutes; i++) {
		r->live[i] = route_new(r, config_route(cfg, i), cfg);
		if (r->live[i] == NULL) {
			for (int k = 0; k < i; k++)
				route_free(r->live[k]);
			pg_pool_free(r->pool);
			http_free(r->http);
			free(r);
			return NULL;
		}
		r->n++;
	}
	r->cfg = cfg;
	return r;
}

void routes_start(struct routes *r)
{
	regroup(r);
	for (int i = 0; i < r->n; i++) {
		const struct config *c = dispatcher_config(r->live[i]->d);
		struct log_line *l = log_begin_route(c->route_name, LOG_INFO, "route_started");
		log_str(l, "queue", c->queue_name);
		log_str(l, "endpoint_id", c->endpoint_id);
		log_int(l, "batch_size", c->batch_size);
		log_int(l, "max_in_flight", c->max_in_flight);
		log_end(l);
		dispatcher_start(r->live[i]->d);
	}
}

void routes_stop(struct routes *r)
{
	r->stopping = true;
	for (int i = 0; i < r->n; i++)
		dispatcher_stop(r->live[i]->d);
	check_all_done(r);
}

void routes_abort(struct routes *r)
{
	for (int i = 0; i < r->n; i++)
		dispatcher_abort(r->live[i]->d);
	for (int i = 0; i < r->nretired; i++)
		dispatcher_abort(r->retired[i]->d);
}

void routes_set_state_hook(struct routes *r, void (*fn)(void *arg), void *arg)
{
	r->state_hook = fn;
	r->state_arg = arg;
}

const struct config *routes_config(const struct routes *r)
{
	return r->cfg;
}

/* The route of next named like live route rt, with the same queue, or -1. */
static int match(const struct config *next, const struct route *rt)
{
	const struct config *c = dispatcher_config(rt->d);

	for (int i = 0; i < next->nroutes; i++) {
		const struct config *n = config_route(next, i);
		if (strcmp(n->route_name, c->route_name) == 0 &&
		    strcmp(n->queue_name, c->queue_name) == 0)
			return i;
	}
	return -1;
}

int routes_reload(struct routes *r, struct config *next)
{
	struct dispatcher_reload_plan *plan[CONFIG_MAX_ROUTES] = { 0 };
	struct route *fresh[CONFIG_MAX_ROUTES] = { 0 };
	struct route *keep[CONFIG_MAX_ROUTES] = { 0 };
	int to[CONFIG_MAX_ROUTES] = { 0 }, removed = 0, n = 0;

	for (int i = 0; i < r->n; i++) {
		to[i] = match(next, r->live[i]);
		removed += to[i] < 0;
	}
	if (removed &&
	    (r->nretired + removed > ROUTES_MAX_RETIRED || r->nold == ROUTES_MAX_RETIRED)) {
		log_msg(LOG_ERROR, "reload_failed",
			"routes removed by earlier reloads are still finishing");
		return -1;
	}
	/* Build everything first. */
	for (int i = 0; i < r->n; i++)
		if (to[i] >= 0 &&
		    (plan[i] = dispatcher_reload_prepare(r->live[i]->d,
							 config_route(next, to[i]))) == NULL)
			goto fail;
	for (int k = 0; k < next->nroutes; k++) {
		bool known = false;
		for (int i = 0; i < r->n; i++)
			known |= to[i] == k;
		if (known)
			continue;
		if ((fresh[k] = route_new(r, config_route(next, k), next)) == NULL) {
			log_msg(LOG_ERROR, "reload_failed", "cannot create route %s",
				config_route(next, k)->route_name);
			goto fail;
		}
	}
	/* Commit: nothing below can fail. */
	for (int i = 0; i < r->n; i++) {
		if (to[i] >= 0) {
			dispatcher_reload_commit(r->live[i]->d, plan[i]);
			r->live[i]->snapshot = next;
			keep[to[i]] = r->live[i];
		} else {
			struct log_line *l = log_begin_route(dispatcher_route_name(r->live[i]->d),
							     LOG_INFO, "route_removing");
			log_str(l, "msg",
				"removed by the reload: in-flight requests finish, read "
				"messages are released");
			log_end(l);
			r->live[i]->retired = true;
			r->retired[r->nretired++] = r->live[i];
			dispatcher_stop(r->live[i]->d);
		}
	}
	for (int k = 0; k < next->nroutes; k++) {
		if (fresh[k]) {
			struct log_line *l = log_begin_route(config_route(next, k)->route_name,
							     LOG_INFO, "route_added");
			log_str(l, "queue", config_route(next, k)->queue_name);
			log_end(l);
			keep[k] = fresh[k];
		}
		r->live[n++] = keep[k];
	}
	r->n = n;
	r->old[r->nold++] = r->cfg;
	r->cfg = next;
	regroup(r); /* before the new routes start: they read under the shared cap */
	for (int k = 0; k < next->nroutes; k++)
		if (fresh[k])
			dispatcher_start(fresh[k]->d);
	ev_timer_start(r->loop, &r->reap); /* frees the old snapshot if nothing uses it */
	return 0;
fail:
	for (int i = 0; i < r->n; i++)
		dispatcher_reload_abort(plan[i]);
	for (int k = 0; k < next->nroutes; k++)
		route_free(fresh[k]);
	return -1;
}

bool routes_ready(const struct routes *r, char *why, size_t len)
{
	for (int i = 0; i < r->n; i++) {
		char reason[256];
		if (dispatcher_ready(r->live[i]->d, reason, sizeof(reason)))
			continue;
		if (r->n == 1)
			snprintf(why, len, "%s", reason);
		else
			snprintf(why, len, "route %s: %s", dispatcher_route_name(r->live[i]->d),
				 reason);
		return false;
	}
	return true;
}

void routes_status(const struct routes *r, char *buf, size_t len)
{
	size_t used = 0;

	if (r->n == 1) {
		dispatcher_status(r->live[0]->d, buf, len);
		return;
	}
	buf[0] = '\0';
	for (int i = 0; i < r->n && used + 1 < len; i++) {
		char one[512];
		dispatcher_status(r->live[i]->d, one, sizeof(one));
		used += (size_t)snprintf(buf + used, len - used, "%sroute %s: %s", i ? "; " : "",
					 dispatcher_route_name(r->live[i]->d), one);
	}
}

struct dispatcher_stats routes_stats(const struct routes *r)
{
	struct dispatcher_stats sum = { 0 };

	for (int i = 0; i < r->n; i++) {
		const struct dispatcher_stats *s = dispatcher_stats(r->live[i]->d);
		sum.reads += s->reads;
		sum.reads_empty += s->reads_empty;
		sum.reads_failed += s->reads_failed;
		sum.messages_read += s->messages_read;
		sum.messages_accepted += s->messages_accepted;
		sum.messages_released += s->messages_released;
		sum.messages_archived += s->messages_archived;
		sum.requests_accepted += s->requests_accepted;
		sum.requests_rejected += s->requests_rejected;
		sum.requests_unknown += s->requests_unknown;
	}
	return sum;
}

int routes_control(struct routes *r, const char *name, const char *action)
{
	static const char *const actions[] = { "pause", "resume", "drain" };
	static const enum dispatcher_control cmds[] = { CONTROL_PAUSE, CONTROL_RESUME,
							CONTROL_DRAIN };
	int a = -1;

	for (int i = 0; i < 3; i++)
		if (strcmp(action, actions[i]) == 0)
			a = i;
	if (a < 0)
		return -2;
	for (int i = 0; i < r->n; i++) {
		if (strcmp(dispatcher_route_name(r->live[i]->d), name) == 0) {
			dispatcher_control(r->live[i]->d, cmds[a]);
			return 0;
		}
	}
	return -1;
}

char *routes_describe(const struct routes *r)
{
	cJSON *arr = cJSON_CreateArray();
	char *out;

	for (int i = 0; arr && i < r->n; i++) {
		const struct dispatcher *d = r->live[i]->d;
		const struct config *c = dispatcher_config(d);
		cJSON *o = cJSON_CreateObject();
		char why[256] = "";
		bool ready = dispatcher_ready(d, why, sizeof(why));
		int in_flight;
		long long queue_length;

		dispatcher_info(d, &in_flight, &queue_length);
		if (o == NULL || !cJSON_AddItemToArray(arr, o) ||
		    !cJSON_AddStringToObject(o, "name", c->route_name) ||
		    !cJSON_AddStringToObject(o, "queue", c->queue_name) ||
		    !cJSON_AddStringToObject(o, "endpoint_id", c->endpoint_id) ||
		    !cJSON_AddStringToObject(o, "state",
					     dispatcher_control_state_name(
						     dispatcher_control_state(d))) ||
		    !cJSON_AddBoolToObject(o, "ready", ready) ||
		    !cJSON_AddStringToObject(o, "reason", ready ? "" : why) ||
		    !cJSON_AddNumberToObject(o, "in_flight", in_flight) ||
		    !cJSON_AddNumberToObject(o, "queue_length", (double)queue_length)) {
			cJSON_Delete(arr);
			return NULL;
		}
	}
	out = arr ? cJSON_PrintUnformatted(arr) : NULL;
	cJSON_Delete(arr);
	return out;
}

void routes_free(struct routes *r)
{
	if (r == NULL)
		return;
	ev_timer_stop(r->loop, &r->reap);
	for (int e = 0; e < r->neps; e++)
		endpoint_free(r->eps[e]);
	for (int i = 0; i < r->n; i++)
		route_free(r->live[i]);
	for (int i = 0; i < r->nretired; i++)
		route_free(r->retired[i]);
	for (int i = 0; i < r->nold; i++) {
		config_free(r->old[i]);
		free(r->old[i]);
	}
	pg_pool_free(r->pool); /* after every dispatcher: the last handle closes each */
	http_free(r->http);    /* after every dispatcher: they cancel their own requests */
	config_free(r->cfg);
	free(r->cfg);
	free(r);
}
