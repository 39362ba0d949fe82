/* endpoint — the /run budget of one RunPod endpoint shared by the routes
 * that point at it (same base_url and endpoint_id): one sliding-window rate
 * cap (the largest runpod.max_requests_per_10s of those routes) and one
 * in-flight ceiling (the largest queue.max_in_flight), handed out by strict
 * priority (runpod.priority, lower first; equal priorities take turns).
 * Each route still keeps its own max_in_flight and rate cap inside them.
 *
 * Owns the shared ring, its timer and the choice of who goes next; knows
 * nothing of SQL, bodies, reloads or the admin endpoint. A route alone on
 * its endpoint has no endpoint object and behaves as before. */
#ifndef PGMQD_ENDPOINT_H
#define PGMQD_ENDPOINT_H

#include "config.h"

#include <ev.h>
#include <stdbool.h>
#include <stddef.h>

#define ENDPOINT_KEY_MAX 2304 /* base_url + "/" + endpoint_id */

struct endpoint;
struct dispatcher;

/* What one route wants of the shared budget: its priority and whether it
 * has something to send (a batch waiting, its own cap letting it go) or a
 * read that only the endpoint's ceiling holds back. */
struct endpoint_want {
	int priority;
	bool want;
};

/* Index of the route that goes next: the lowest priority number among
 * those that want; among equals the first after index `last` (turns).
 * -1 when none wants. Pure. */
int endpoint_pick(const struct endpoint_want *w, int n, int last);

/* May a route of `priority` start a read, with in_flight of max_in_flight
 * taken at the endpoint, the best (lowest) priority of the other routes
 * whose reads wait for the endpoint (INT_MAX when none), and keep slots to
 * leave free (the reserve, for a route that is not of the best priority)?
 * Strict priority: a waiting route of a lower number goes first. Pure. */
bool endpoint_read_allowed(int priority, int in_flight, int max_in_flight, int best_waiting,
			   int keep);

/* Routes of a worse priority leave this share of the endpoint's /run
 * window and in-flight ceiling free for the better ones. */
#define ENDPOINT_RESERVE_PCT 10

/* The reserve of a cap: ENDPOINT_RESERVE_PCT of it, at least 1. Pure. */
int endpoint_reserve(int cap);

/* "base_url/endpoint_id" of a snapshot into buf (cut to len). */
void endpoint_key_of(const struct config *cfg, char *buf, size_t len);

/* An endpoint without routes, for key (copied). NULL when out of memory. */
struct endpoint *endpoint_new(struct ev_loop *loop, const char *key);

const char *endpoint_key(const struct endpoint *ep);

/* Makes ds[0..n) the routes sharing ep (n <= CONFIG_MAX_ROUTES); routes
 * no longer listed leave it and go back to their own caps. The ring keeps
 * its send times across calls (resized when the largest cap changed; if
 * that allocation fails the old cap stays and a warning is logged). */
void endpoint_set_members(struct endpoint *ep, struct dispatcher *const *ds, int n);

/* Lets every route leave and frees ep. NULL-safe. */
void endpoint_free(struct endpoint *ep);

#endif
