/* route — the routes of one daemon: one dispatcher per [route.NAME] (or
 * the one route "default" of a one-queue configuration), all on one loop.
 *
 * Owns the set: creating, starting, stopping and freeing the dispatchers,
 * the configuration snapshots they point into (taken over from main),
 * matching routes by name on reload (changed routes switch all or nothing,
 * added ones start, removed ones stop: their in-flight requests finish and
 * what they read but never sent is released), one --once/shutdown result
 * for all, and the aggregates for /readyz, STATUS and runtime control.
 * Knows nothing of SQL, HTTP or the admin endpoint's wire format. */
#ifndef PGMQD_ROUTE_H
#define PGMQD_ROUTE_H

#include "config.h"
#include "dispatcher.h"

#include <ev.h>
#include <stdbool.h>
#include <stddef.h>

#define ROUTES_MAX_RETIRED 8 /* removed routes still finishing, across reloads */

struct routes;

/* Creates one dispatcher per route of cfg and takes cfg over (freed by
 * routes_free, or after a reload replaced it and nothing points into it).
 * done runs once when every route's --once cycle or shutdown has finished,
 * with the worst result (failed > unknown > dispatched > empty). NULL on
 * failure (logged); cfg is then still the caller's. */
struct routes *routes_new(struct ev_loop *loop, struct config *cfg, bool once,
			  dispatcher_done_fn done, void *arg);

void routes_start(struct routes *r);
void routes_stop(struct routes *r);
void routes_abort(struct routes *r);
void routes_set_state_hook(struct routes *r, void (*fn)(void *arg), void *arg);

/* Switches to next (SIGHUP). Routes are matched by name: a route whose
 * queue is the same is reloaded in place (every such route switches, or
 * none does); a new name starts; a name no longer there (or whose queue
 * changed) stops and finishes in the background. Returns 0 and takes next
 * over, or -1 (nothing changed; next is still the caller's). */
int routes_reload(struct routes *r, struct config *next);

/* The snapshot in use (owned by r). */
const struct config *routes_config(const struct routes *r);

/* True when every route is ready; else the first reason, naming the
 * route when there are several ("route asr: circuit open: ..."). */
bool routes_ready(const struct routes *r, char *why, size_t len);

/* One line for STATUS=: the one route's status, or "route a: ...; route b:
 * ..." cut to len. */
void routes_status(const struct routes *r, char *buf, size_t len);

/* Counters summed over the routes. */
struct dispatcher_stats routes_stats(const struct routes *r);

/* Runtime control of route name: action is "pause", "resume" or "drain".
 * Returns 0, -1 when no such route, -2 when no such action. */
int routes_control(struct routes *r, const char *name, const char *action);

/* A malloc'd JSON array, one object per route: name, queue, endpoint_id,
 * state, ready, reason, in_flight, queue_length. NULL when out of memory. */
char *routes_describe(const struct routes *r);

/* Frees everything, the snapshots included. NULL-safe. */
void routes_free(struct routes *r);

#endif
