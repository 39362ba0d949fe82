/* tracker — follows accepted RunPod jobs through /status (opt-in,
 * [tracker] enabled).
 *
 * For each job the dispatcher hands over, it asks
 * GET {base_url}/{endpoint_id}/status/{job_id} every interval_ms (±10 %
 * jitter) through the dispatcher's curl multi handle, with at most
 * max_concurrent requests in flight and the sliding-window limiter of
 * include/ratelimit.h keeping to max_status_per_10s in any 10 s window
 * (RunPod allows 2000). A 429 pauses /status for its Retry-After (capped by
 * the backoff policy, include/backoff.h) or one interval.
 *
 * - Every status change is logged once (event=job_status). COMPLETED,
 *   FAILED, CANCELLED and TIMED_OUT end tracking; any other string,
 *   RUNNING included, is non-terminal. A 404 means the job expired:
 *   tracking ends (event=job_expired), the messages keep their vt.
 * - Heartbeat: while the last status RunPod gave is non-terminal, the
 *   job's messages get set_vt(vt_seconds) whenever less than a third of
 *   their vt remains, so a long job is never handed out again. A message
 *   the worker deleted gives no row and leaves the heartbeat quietly. When
 *   /status has not answered for max(vt_seconds, 3 intervals), heartbeats
 *   pause (the messages then behave as without the tracker) until it does.
 * - Early release: on FAILED, CANCELLED or TIMED_OUT the messages that
 *   still exist become visible after retry_delay_s (unless their vt ends
 *   sooner anyway); the RunPod error text is logged, cut at 256 bytes.
 * - At most max_tracked_jobs jobs; past it the oldest is dropped with a
 *   warning (event=tracker_evicted) and a counter.
 * - Stuck queues: while any job is tracked, GET {base_url}/{endpoint_id}/health
 *   once per interval_ms (from the same /status limiter, at most a tenth of it;
 *   runpod-serverless-api.md §7); its
 *   job and worker counts go to /metrics with the age of the oldest job
 *   still IN_QUEUE. Unhealthy workers while jobs wait IN_QUEUE give one
 *   warning (event=runpod_workers_unhealthy), and one line when no worker
 *   is unhealthy any more (event=runpod_workers_recovered).
 * - max_heartbeat_s (0 = off): a job tracked that long gets no more
 *   heartbeats (event=heartbeat_ceiling, once); its messages come back when
 *   their vt runs out. It is still followed.
 * - max_queued_jobs (0 = off): the dispatcher asks tracker_queued_jobs()
 *   before each read and pauses reads at the cap.
 *
 * State lives in memory; with the ledger on, each job's changes go to an
 * observer, and after a restart the ledger hands jobs whose replica died
 * back to a tracker (tracker_add_dispatch).
 *
 * Database work goes through the shared pg connection, at most
 * TRACKER_MAX_DB statements queued at once, so the dispatcher's reads keep
 * their room in pg's FIFO. Scheduling is one ev_timer over the bounded job
 * table of include/jobtable.h (a map by job id, a list in insertion order,
 * three binary heaps: next /status, next database action, oldest
 * IN_QUEUE): O(log n) per job event.
 *
 * Files: tracker.c (the API, scheduling, sending /status and set_vt),
 * tracker_reply.c (what each answer does), tracker_health.c (/health and
 * the IN_QUEUE watch), jobtable.c (the table);
 * src/tracker_int.h is what the first two share. */
#ifndef PGMQD_TRACKER_H
#define PGMQD_TRACKER_H

#include "config.h"
#include "http.h"
#include "pg.h"
#include "ratelimit.h"

#include <ev.h>
#include <stdbool.h>

#define TRACKER_MAX_DB 4         /* tracker statements on the pg connection at once */
#define TRACKER_IDS_PER_LINE 100 /* msg ids named in one log line; the rest are counted */
#define TRACKER_HEALTH_SHARE 0.1 /* /health takes at most this share of max_status_per_10s */

struct tracker;

/* Creates a tracker that polls through http and extends visibility through
 * pg (both owned by the caller, who must outlive the tracker or call
 * tracker_free() first; see there). cfg must outlive the tracker or the
 * next reload. Returns NULL when out of memory (logged). */
struct tracker *tracker_new(struct ev_loop *loop, const struct config *cfg, struct http *http,
			    struct pg *pg);

/* Starts following job_id, whose /run carried msg_ids[0..n) (copied), read
 * at read_at (ev_now() of the read: the vt runs out at read_at +
 * vt_seconds). Ignored when stopped or disabled, for an empty id or n < 1,
 * and for a job id already tracked. NULL-safe. */
void tracker_add(struct tracker *t, const char *job_id, const long long *msg_ids, int n,
		 ev_tstamp read_at);

/* Like tracker_add, for the ledger's row dispatch_id (copied; NULL or ""
 * when there is none): its state changes reach the observer. */
void tracker_add_dispatch(struct tracker *t, const char *job_id, const char *dispatch_id,
			  const long long *msg_ids, int n, ev_tstamp read_at);

/* Like tracker_add_dispatch, for a job taken over from a replica that
 * died: accepted_at (Unix time, when /run accepted it, from the ledger)
 * is its start for max_heartbeat_s and its age, not the takeover. */
void tracker_add_claimed(struct tracker *t, const char *job_id, const char *dispatch_id,
			 const long long *msg_ids, int n, ev_tstamp read_at, ev_tstamp accepted_at);

/* What the tracker learns of a dispatch: RunPod's status on each change,
 * "lost" for a 404, "released" after an early release; error is RunPod's
 * error text or NULL. Strings valid during the call. */
typedef void (*tracker_observer_fn)(void *arg, const char *dispatch_id, const char *state,
				    const char *error);

/* Registers the observer (the ledger). NULL-safe. */
void tracker_set_observer(struct tracker *t, tracker_observer_fn fn, void *arg);

/* What a reload needs that can fail, built before anything changes. */
struct tracker_next {
	struct ratelimit status_rl; /* the /status limiter resized (empty: cap unchanged) */
	char *auth_header;          /* malloc'd */
};

/* Builds into next what tracker_reload(t, cfg, next) needs. Returns 0, or
 * -1 when out of memory (next empty, t unchanged). t NULL: 0, next empty. */
int tracker_reload_prepare(const struct tracker *t, const struct config *cfg,
			   struct tracker_next *next);

/* Frees what next still holds. NULL-safe. */
void tracker_next_free(struct tracker_next *next);

/* Follows a new validated snapshot: URLs, key, interval, limits; takes
 * next's contents (from tracker_reload_prepare with the same cfg) and
 * cannot fail. The /status limiter keeps its recent send times. enabled =
 * off forgets every job (their messages keep their vt) and ignores later
 * adds until it is on again; a lower max_tracked_jobs evicts the oldest.
 * NULL-safe. */
void tracker_reload(struct tracker *t, const struct config *cfg, struct tracker_next *next);

/* Registers wake(arg, after_s): called when an early release makes messages
 * visible again after_s seconds from now, so that the owner reads then
 * (no NOTIFY announces them). NULL-safe. */
/* fleet.enabled: /status and /health take their slots from the fleet's
 * shared budget (budget.h) as well as from max_status_per_10s. 0, or -1
 * when out of memory. NULL-safe. */
int tracker_set_fleet(struct tracker *t, const struct config *cfg);

void tracker_set_wake(struct tracker *t, void (*wake)(void *arg, double after_s), void *arg);

/* Jobs accepted and not started: tracked jobs whose last status is
 * IN_QUEUE (0 when t is NULL or disabled). For tracker.max_queued_jobs;
 * when the count drops while that cap is on, the wake hook is called with
 * 0 s so that paused reads resume. */
int tracker_queued_jobs(const struct tracker *t);

/* Shutdown: no new /status requests or statements from now on. Requests
 * and statements in flight may still complete; their callbacks only do
 * bookkeeping. NULL-safe. */
void tracker_stop(struct tracker *t);

/* Frees everything. Callbacks of requests and statements still in flight
 * stay safe (they find the tracker gone and only free their own context),
 * so it may run before pg_free(); call it after http_cancel_all() and
 * before http_free(), since http_free() drops requests without callbacks.
 * NULL-safe. */
void tracker_free(struct tracker *t);

/* ---- pure helpers (unit-tested) ---- */

/* The pause before a job's next /status: interval_ms ± 10 %, in seconds,
 * for rnd in [0, 1). */
double tracker_jittered_s(int interval_ms, double rnd);

/* Seconds between /health polls: interval_ms, but never more often than
 * TRACKER_HEALTH_SHARE of the max_status_per_10s budget allows, so /status
 * keeps the rest. ±10 % jitter is added by the caller. */
double tracker_health_interval_s(int interval_ms, int max_status_per_10s);

/* Whether a job accepted at accepted_at may still get a heartbeat at now
 * under tracker.max_heartbeat_s (0: no ceiling). Seconds. */
bool tracker_heartbeat_allowed(double accepted_at, double now, int max_heartbeat_s);

/* Whether reads pause under tracker.max_queued_jobs (0: never): queued
 * jobs accepted and not started (last status IN_QUEUE) plus in_flight /run
 * requests (each may add one) reach the cap. */
bool tracker_queue_full(long queued, int in_flight, int max_queued_jobs);

/* What to say after a /health answer: warn once when workers are unhealthy
 * (unhealthy > 0) while in_queue tracked jobs wait IN_QUEUE; say it
 * recovered once no worker is unhealthy. warned: the warning was given
 * and recovery not yet said. */
enum tracker_health_note { TRACKER_HEALTH_QUIET, TRACKER_HEALTH_WARN, TRACKER_HEALTH_RECOVERED };
enum tracker_health_note tracker_health_note(bool warned, long long unhealthy, long in_queue);

/* When a heartbeat is due for messages whose vt of vt_seconds runs out at
 * vt_until: as soon as less than a third of it remains. */
double tracker_heartbeat_at(double vt_until, int vt_seconds);

#endif
