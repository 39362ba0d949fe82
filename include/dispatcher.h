/* dispatcher — the pipeline: trigger → read a batch → POST /run → outcome.
 *
 * Triggers are the poll timer, every (re)connect (catch-up read) and a full
 * batch (drain: read again at once while fewer than max_in_flight requests
 * are outstanding). Outcomes follow DESIGN.md's delivery semantics:
 * accepted → logged, the worker owns the messages; rejected → messages
 * released with set_vt(backoff) and reads paused for that backoff; unknown →
 * messages keep their vt, logged distinctly.
 *
 * The public face of a dispatcher split into modules (docs/architecture.md):
 * dispatcher.c (pipeline, drain, start), shutdown.c, reload.c, batch.c, post.c,
 * circuit.c, wakeup.c, with the decisions in backoff.c and ratelimit.c.
 * It writes no SQL (pgmq.c does, apart from the LISTEN statements in
 * wakeup.c) and no /run body (runpod.c), but it does choose the HTTP
 * headers of its requests. */
#ifndef PGMQD_DISPATCHER_H
#define PGMQD_DISPATCHER_H

#include "config.h"
#include "http.h"
#include "pg.h"

#include <ev.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

struct dispatcher;

/* Counters since start. */
struct dispatcher_stats {
	unsigned long long reads, reads_empty, reads_failed;
	unsigned long long messages_read, messages_accepted, messages_released, messages_archived;
	unsigned long long requests_accepted, requests_rejected, requests_unknown;
};

/* How a --once cycle or a shutdown ended; main maps it to an exit code. */
enum dispatcher_result {
	DISPATCH_DONE_DISPATCHED, /* at least one batch accepted */
	DISPATCH_DONE_EMPTY,      /* nothing to do */
	DISPATCH_DONE_FAILED,     /* database error or request rejected */
	DISPATCH_DONE_UNKNOWN,    /* outcome unknown */
	DISPATCH_DONE_STOPPED,    /* shutdown finished */
	DISPATCH_DONE_FATAL,      /* the ledger's schema cannot be used (logged) */
};

/* Called once when a --once cycle or a shutdown has finished. */
typedef void (*dispatcher_done_fn)(void *arg, enum dispatcher_result result);

/* Creates the dispatcher; cfg must outlive it. It creates and owns its pg
 * connection and http multi handle. once: one read-and-dispatch cycle.
 * Returns NULL on failure (logged). */
struct dispatcher *dispatcher_new(struct ev_loop *loop, const struct config *cfg, bool once,
				  dispatcher_done_fn done, void *arg);

/* dispatcher_new on a libcurl multi handle and database connections shared
 * with other routes (http and pool must outlive the dispatcher; NULL: one
 * of its own). */
struct dispatcher *dispatcher_new_shared(struct ev_loop *loop, const struct config *cfg,
					 struct http *http, struct pg_pool *pool, bool once,
					 dispatcher_done_fn done, void *arg);

/* Starts connecting and the poll timer. */
void dispatcher_start(struct dispatcher *d);

/* Graceful stop: no new reads; batches read but not sent are released
 * (set_vt 0); in-flight POSTs get until cfg->shutdown_timeout_ms, then are
 * aborted and counted as outcome unknown. done() runs when finished. */
void dispatcher_stop(struct dispatcher *d);

/* Switches to a new validated snapshot (SIGHUP): URLs, key, timers and
 * limits follow it, a changed conninfo reconnects once the running query is
 * done, and an open circuit is probed at once. cfg must outlive the
 * dispatcher or the next reload; the caller keeps the old one alive until
 * this returns. Returns 0, or -1 (the old snapshot stays in use). */
int dispatcher_reload(struct dispatcher *d, const struct config *cfg);

/* dispatcher_reload in two halves, for switching several routes at once:
 * prepare builds everything new (NULL on failure, logged; the old state
 * fully in effect, except that the connection may follow a new conninfo),
 * then either commit (cannot fail; frees the plan) or abort (frees it). */
struct dispatcher_reload_plan;
struct dispatcher_reload_plan *dispatcher_reload_prepare(struct dispatcher *d,
							 const struct config *cfg);
void dispatcher_reload_commit(struct dispatcher *d, struct dispatcher_reload_plan *p);
void dispatcher_reload_abort(struct dispatcher_reload_plan *p);

const struct dispatcher_stats *dispatcher_stats(const struct dispatcher *d);

/* Aborts every in-flight request now (second TERM/INT): each ends as
 * outcome unknown, logged with its msg ids; their messages keep the vt. */
void dispatcher_abort(struct dispatcher *d);

/* Registers fn, called on the loop whenever the state changes (database
 * connected or lost, circuit opened or closed, stopping) and after each
 * queue metrics refresh. */
void dispatcher_set_state_hook(struct dispatcher *d, void (*fn)(void *arg), void *arg);

/* True when connected, the circuit closed and not draining; otherwise
 * false with a one-line reason in why (len bytes). For /readyz. */
bool dispatcher_ready(const struct dispatcher *d, char *why, size_t len);

/* One line for systemd's STATUS=: state and counts. */
void dispatcher_status(const struct dispatcher *d, char *buf, size_t len);

/* Runtime control of the route's reads. pause: no new reads, in-flight
 * requests finish; resume: reads again; drain: reads until one finds the
 * queue empty, then none (state drained). CONTROL_EMPTY is internal. */
enum dispatcher_control { CONTROL_PAUSE, CONTROL_RESUME, CONTROL_DRAIN, CONTROL_EMPTY };

/* Applies cmd, persists the resulting state in the database table
 * pgmq_dispatcher.route_control (created on first use; a failure to store
 * is logged and the state still applies in memory) and kicks a read when
 * reads may start. */
void dispatcher_control(struct dispatcher *d, enum dispatcher_control cmd);

/* The route's read state (enum metrics_route_state: running, paused,
 * draining, drained) and its name. */
int dispatcher_control_state(const struct dispatcher *d);
const char *dispatcher_control_state_name(int state);

/* The route's name, its snapshot in use, and its in-flight requests and
 * last known queue length (-1 unknown). */
const char *dispatcher_route_name(const struct dispatcher *d);
const struct config *dispatcher_config(const struct dispatcher *d);
void dispatcher_info(const struct dispatcher *d, int *in_flight, long long *queue_length);

/* Frees everything (no callbacks into done). NULL-safe. */
void dispatcher_free(struct dispatcher *d);

/* --dry-run: connects (blocking), looks at the next batch_size visible
 * messages without locking or changing them, and writes to out the /run
 * bodies a read would send now (split under max_body_bytes), one per line.
 * Returns 0, or -1 after logging why. */
int dispatcher_dry_run(const struct config *cfg, FILE *out);

#endif
