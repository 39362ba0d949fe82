/* metrics — process-wide counters, gauges and one histogram, rendered in the
 * Prometheus text exposition format 0.0.4.
 *
 * One function per event, no names or string lookups on the hot path: each
 * call is one or two relaxed C11 atomic operations on module state, so any
 * thread may record and any thread may render. Every label value comes from
 * a fixed table in metrics.c (no queue names, msg ids or job ids), so the
 * number of series is bounded.
 *
 * Families rendered (all prefixed "pgmqd_"; counters end in _total):
 *   messages_read_total                       counter
 *   messages_dispatched_total                 counter  (accepted by RunPod)
 *   messages_released_total                   counter  (set_vt after a failure/shutdown)
 *   messages_archived_total{reason}           counter  reason="too_large"|"max_read_ct"
 *   runpod_requests_total{outcome,code}       counter  outcome="accepted"|"rejected"|"unknown",
 *                                                      code="200"|"400"|"401"|"403"|"404"|"408"|
 *                                                      "413"|"429"|"500"|"502"|"503"|"504"|
 *                                                      "other"|"0" (0 = no HTTP response)
 *   pg_reconnects_total                       counter
 *   ledger_recovered_unknown_total            counter
 *   ledger_jobs_claimed_total                 counter
 *   ledger_completed_undeleted_total          counter
 *   reads_total{result}                       counter  result="rows"|"empty"|"error"
 *   in_flight_requests                        gauge
 *   circuit_open                              gauge    0 closed, 1 open
 *   queue_length                              gauge    from pgmq.metrics
 *   queue_oldest_message_age_seconds          gauge    from pgmq.metrics
 *   queue_metrics_refresh_timestamp_seconds   gauge    Unix time of the last refresh, 0 = never
 *   runpod_request_duration_seconds           histogram, buckets .005 … 30, +Inf
 *   start_time_seconds                        gauge    Unix time of metrics_init()
 *   tracked_jobs{status}                      gauge    jobs the tracker follows, by last status:
 *                                                      "IN_QUEUE"|"IN_PROGRESS"|"RUNNING"|"OTHER"
 *   tracker_terminal_total{status}            counter  "COMPLETED"|"FAILED"|"CANCELLED"|"TIMED_OUT"|
 *                                                      "EXPIRED" (/status answered 404)
 *   tracker_heartbeats_total                  counter  set_vt extensions of a running job's messages
 *   tracker_early_releases_total              counter  failed jobs whose messages were made visible
 *                                                      after retry_delay_s
 *   tracker_evicted_total                     counter  jobs dropped past max_tracked_jobs
 *   tracker_heartbeat_ceilings_total          counter  jobs whose heartbeats stopped at
 *                                                      max_heartbeat_s
 *   tracker_oldest_in_queue_seconds           gauge    age of the oldest tracked job still
 *                                                      IN_QUEUE, 0 = none
 *   tracker_queue_cap_reached                 gauge    1 while reads pause at max_queued_jobs
 *   runpod_health_jobs{state}                 gauge    RunPod /health jobs: "completed"|"failed"|
 *                                                      "in_progress"|"in_queue"|"retried"
 *   runpod_health_workers{state}              gauge    RunPod /health workers: "idle"|
 *                                                      "initializing"|"ready"|"running"|
 *                                                      "throttled"|"unhealthy"
 *   runpod_health_timestamp_seconds           gauge    Unix time of the last /health read, 0 = never
 *   fleet_grants_total{kind}                  counter  grants of the fleet budget: kind="run"|"status"
 *   fleet_grants_denied_total{kind}           counter  grant statements that found the cap used up
 *   fleet_slots_granted_total{kind}           counter  slots (requests) granted
 *   fleet_slots_unused_total{kind}            counter  granted slots dropped unused at expiry
 *   fleet_fallback{kind}                      gauge    1 while no grant can be had (local share)
 *
 * Series with labels from a fixed small set (archived, reads) are always
 * rendered, zeros included, so rate() sees them from the first scrape;
 * runpod_requests_total series appear once their (outcome, code) pair has
 * been counted, since most of the 3 × 14 pairs never occur. */
#ifndef PGMQD_METRICS_H
#define PGMQD_METRICS_H

#include <stdbool.h>
#include <stddef.h>

/* The Content-Type a /metrics reply must carry (Prometheus 3 rejects others). */
#define METRICS_CONTENT_TYPE "text/plain; version=0.0.4; charset=utf-8"

enum metrics_outcome { METRICS_ACCEPTED = 0, METRICS_REJECTED, METRICS_UNKNOWN };
enum metrics_archive_reason { METRICS_ARCHIVE_TOO_LARGE = 0, METRICS_ARCHIVE_MAX_READ_CT };
enum metrics_read_result { METRICS_READ_ROWS = 0, METRICS_READ_EMPTY, METRICS_READ_ERROR };

/* Zeroes everything and records the process start time (CLOCK_REALTIME).
 * Call once at start-up before any other thread records; tests call it to
 * reset. Until it is called everything is zero, start time included. */
void metrics_init(void);

/* Messages returned by a read (the batch size; 0 is allowed). */
void metrics_add_messages_read(unsigned n);

/* Messages whose /run request RunPod accepted. */
void metrics_add_messages_dispatched(unsigned n);

/* Messages made visible again with set_vt (rejection, shutdown). */
void metrics_add_messages_released(unsigned n);

/* Messages moved to the archive by the dispatcher's guards. An out-of-range
 * reason is ignored. */
void metrics_add_messages_archived(enum metrics_archive_reason reason, unsigned n);

/* One finished /run request. http_code is the HTTP status, 0 (or any value
 * <= 0) when no response arrived; codes outside the fixed table count as
 * "other". An out-of-range outcome is ignored. */
void metrics_inc_requests(enum metrics_outcome outcome, long http_code);

/* One database reconnect attempt after a lost or failed connection. */
void metrics_inc_pg_reconnects(void);
/* Ledger rows a dead replica left sending, now unknown; jobs taken over. */
void metrics_inc_ledger_recovered_unknown(void);
void metrics_inc_ledger_jobs_claimed(void);
/* A COMPLETED job whose messages were still queued after the grace period. */
void metrics_inc_ledger_completed_undeleted(void);

/* One finished pgmq read: rows, empty, or error. Out-of-range is ignored. */
void metrics_inc_reads(enum metrics_read_result result);

/* The number of /run requests currently in flight. */
void metrics_set_in_flight(long n);

/* The circuit breaker's state. */
void metrics_set_circuit_open(bool open);

/* A successful pgmq.metrics refresh: queue length and the age of the
 * oldest message in seconds (pass 0 for an empty queue, where pgmq returns
 * NULL). Also sets the refresh timestamp to now (CLOCK_REALTIME). */
void metrics_set_queue_stats(long long length, double oldest_age_seconds);

/* Duration of one /run request in seconds, whatever its outcome. NaN is
 * ignored; negative values count as 0. */
void metrics_observe_request_seconds(double seconds);

/* The fleet budget (budget.h); kind is enum budget_kind (0 run, 1
 * status), others are ignored. slots 0 counts a denied grant. */
void metrics_inc_fleet_grant(int kind, int slots);
void metrics_add_fleet_unused(int kind, unsigned long long slots);
void metrics_set_fleet_fallback(int kind, bool on);

/* Renders every family as Prometheus text 0.0.4 (UTF-8, '\n' line ends,
 * the last line terminated). Returns a NUL-terminated malloc'd buffer the
 * caller frees, its length without the NUL in *len (len may be NULL), or
 * NULL when out of memory. In each histogram, the +Inf bucket equals
 * _count by construction, even while other threads record. */
char *metrics_render(size_t *len) __attribute__((warn_unused_result));

/* ---- the tracker (/status polling) ---- */

enum metrics_tracked_status {
	METRICS_TRACKED_IN_QUEUE = 0,
	METRICS_TRACKED_IN_PROGRESS,
	METRICS_TRACKED_RUNNING,
	METRICS_TRACKED_OTHER,
};
enum metrics_terminal {
	METRICS_TERMINAL_COMPLETED = 0,
	METRICS_TERMINAL_FAILED,
	METRICS_TERMINAL_CANCELLED,
	METRICS_TERMINAL_TIMED_OUT,
	METRICS_TERMINAL_EXPIRED,
};

/* The number of tracked jobs whose last status falls in s. Out-of-range
 * is ignored. */
void metrics_set_tracked_jobs(enum metrics_tracked_status s, long n);

/* One tracked job reached a terminal status, or expired (404). */
void metrics_inc_tracker_terminal(enum metrics_terminal t);

/* One heartbeat (a set_vt that extended a running job's messages). */
void metrics_inc_tracker_heartbeats(void);

/* One failed job whose messages were made visible early. */
void metrics_inc_tracker_early_releases(void);

/* One job no longer tracked because max_tracked_jobs was reached. */
void metrics_inc_tracker_evicted(void);

/* One job whose heartbeats stopped at max_heartbeat_s. */
void metrics_inc_tracker_heartbeat_ceilings(void);

/* When (Unix time, seconds) the oldest tracked job still IN_QUEUE was
 * accepted; 0 when none is. Rendered as its age at scrape time. */
void metrics_set_oldest_in_queue_since(double since_unix);

/* Whether reads pause because tracker.max_queued_jobs is reached. */
void metrics_set_queue_cap_reached(bool reached);

/* RunPod's /health counters (runpod-serverless-api.md §7), in the order of
 * the enums below (those of struct runpod_health); also stamps the time. */
enum { METRICS_HEALTH_NJOBS = 5, METRICS_HEALTH_NWORKERS = 6 };
void metrics_set_runpod_health(const long long jobs[METRICS_HEALTH_NJOBS],
			       const long long workers[METRICS_HEALTH_NWORKERS]);

#endif
