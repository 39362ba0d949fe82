/* tracker — follows accepted RunPod jobs through /status (opt-in,
 * [tracker] enabled).
 *
 * For each job the dispatcher hands over, it asks
 * GET {base_url}/{endpoint_id}/status/{job_id} every interval_ms (±10 %
 * jitter) through the dispatcher's curl multi handle, with at most
 * max_concurrent requests in flight and a token bucket that keeps to
 * max_status_per_10s in any 10 s window (RunPod allows 2000).
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
 *
 * State lives in memory only: after a restart the messages of jobs that
 * were tracked behave as they do without the tracker.
 *
 * Database work goes through the shared pg connection, at most
 * TRACKER_MAX_DB statements queued at once, so the dispatcher's reads keep
 * their room in pg's FIFO. Scheduling is one ev_timer over the bounded job
 * table of include/jobtable.h (a map by job id, a list in insertion order,
 * two binary heaps: next /status, next database action): O(log n) per job
 * event.
 *
 * Files: tracker.c (the API, scheduling, sending /status and set_vt),
 * tracker_reply.c (what each answer does), jobtable.c (the table);
 * src/tracker_int.h is what the first two share. */
#ifndef PGMQD_TRACKER_H
#define PGMQD_TRACKER_H

#include "config.h"
#include "http.h"
#include "pg.h"

#include <ev.h>
#include <stdbool.h>

#define TRACKER_MAX_DB 4        /* tracker statements on the pg connection at once */
#define TRACKER_IDS_PER_LINE 100 /* msg ids named in one log line; the rest are counted */

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

/* Follows a new validated snapshot: URLs, key, interval, limits. enabled =
 * off forgets every job (their messages keep their vt) and ignores later
 * adds until it is on again; a lower max_tracked_jobs evicts the oldest.
 * NULL-safe. */
void tracker_reload(struct tracker *t, const struct config *cfg);

/* Registers wake(arg, after_s): called when an early release makes messages
 * visible again after_s seconds from now, so that the owner reads then
 * (no NOTIFY announces them). NULL-safe. */
void tracker_set_wake(struct tracker *t, void (*wake)(void *arg, double after_s), void *arg);

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

/* A token bucket that admits at most per_10s events in any 10 s window:
 * it holds up to burst = max(1, per_10s / 10) tokens and refills at
 * (per_10s - burst) / 10 per second (burst / 10 when that is 0), so burst +
 * 10 s of refill never exceeds per_10s. Times in seconds. */
struct tracker_bucket {
	double tokens, burst, rate, at;
};

/* (Re)configures; tokens start full, or keep their level (capped) when the
 * bucket was set up before (reload). */
void tracker_bucket_setup(struct tracker_bucket *b, int per_10s, double now, bool keep);

/* Takes one token if there is one. */
bool tracker_bucket_take(struct tracker_bucket *b, double now);

/* Seconds until a token is available (0 when one is). */
double tracker_bucket_wait_s(const struct tracker_bucket *b, double now);

/* When a heartbeat is due for messages whose vt of vt_seconds runs out at
 * vt_until: as soon as less than a third of it remains. */
double tracker_heartbeat_at(double vt_until, int vt_seconds);

#endif
