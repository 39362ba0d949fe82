/* runpod — the RunPod Serverless API as plain data: the /run body, the
 * reply, and what an HTTP outcome means for the messages behind it.
 * Pure functions: no loop, no network, no SQL.
 * Source: ../shared/reference/runpod-serverless-api.md. */
#ifndef PGMQD_RUNPOD_H
#define PGMQD_RUNPOD_H

#include "pgmq.h"

#include <stdbool.h>
#include <stddef.h>
#include <time.h>

#define RUNPOD_JOB_ID_MAX 128 /* §1: opaque; ≥ 128 bytes is safe */
#define RUNPOD_STATUS_MAX 32

/* Optional members beside "input" (runpod-serverless-api.md §3, §3.1):
 * "webhook" when webhook is non-empty, "policy" with executionTimeout / ttl
 * (ms) when non-zero and lowPriority when true. Off by default. */
struct runpod_extras {
	const char *webhook;
	long long execution_timeout_ms;
	long long ttl_ms;
	bool low_priority;
	bool dispatch_id; /* input.dispatch_id first (runpod.dispatch_id_in_input) */
};

/* Builds the /run body of DESIGN.md's contract:
 *   {"input":{"queue":Q,"vt_seconds":VT,"jobs":[{"msg_id":…,"read_ct":…,
 *    "enqueued_at":…,"document_id":…|null,"message":…}]}}
 * msg_id, read_ct, enqueued_at, document_id and message are embedded as the
 * exact text PostgreSQL returned (bigints stay exact). extras may be NULL.
 * Returns a malloc'd
 * NUL-terminated string (caller frees) and its length in *len, or NULL when
 * out of memory. */
char *runpod_run_body(const char *queue, int vt_seconds, const struct runpod_extras *extras,
		      const struct pgmq_message *msgs, int n, size_t *len);

/* The /run body around its jobs, printed once per configuration by cJSON
 * (queue escaping, extras) and split where the jobs go: head ends with
 * "jobs":[ and tail starts with ]. Owned; free with runpod_envelope_free(). */
struct runpod_envelope {
	char *text;
	size_t head_len;       /* bytes before the jobs */
	size_t len;            /* whole text with no jobs */
	size_t dispatch_id_at; /* offset of input.dispatch_id's value, 0 = none */
};

/* input.dispatch_id as the envelope holds it until a body gets its own:
 * as long as a dispatch id, so that sizes are exact before it is known. */
#define RUNPOD_DISPATCH_ID_PLACEHOLDER "00000000-0000-0000-0000-000000000000"

/* Writes dispatch_id (36 characters) over the placeholder of a body made
 * by runpod_envelope_body(); nothing when the envelope has none. */
void runpod_envelope_set_dispatch_id(const struct runpod_envelope *e, char *body,
				     const char *dispatch_id);

/* Builds the envelope; returns 0 or -1 when out of memory. */
int runpod_envelope_init(struct runpod_envelope *e, const char *queue, int vt_seconds,
			 const struct runpod_extras *extras);
void runpod_envelope_free(struct runpod_envelope *e);

/* The body for msgs[0..n) in one allocation: envelope head, each job's
 * fields copied verbatim from PostgreSQL's text, envelope tail. Same bytes
 * as runpod_run_body(). Returns NULL when out of memory. */
char *runpod_envelope_body(const struct runpod_envelope *e, const struct pgmq_message *msgs, int n,
			   size_t *len);

/* Exact byte counts of runpod_run_body()'s output, so that a batch can be
 * split under a size cap before anything is built: the body of jobs
 * msgs[0..n) is runpod_envelope_bytes() + the sum of runpod_job_bytes() +
 * (n - 1) separating commas. Returns 0 from runpod_envelope_bytes() when out
 * of memory. */
size_t runpod_envelope_bytes(const char *queue, int vt_seconds, const struct runpod_extras *extras);
size_t runpod_job_bytes(const struct pgmq_message *m);

/* Splits msgs[0..n) (each fitting alone: envelope + job bytes <= limit)
 * into runs of consecutive messages whose /run body stays within limit
 * bytes. Writes the end index (exclusive) of each run to ends (room for n)
 * and returns the number of runs. Pure. */
int runpod_pack(const struct pgmq_message *msgs, int n, size_t envelope, size_t limit, int *ends);

/* Parses a Retry-After header value (RFC 9110 §10.2.3): delta-seconds
 * ("120") or an HTTP-date ("Wed, 21 Oct 2026 07:28:00 GMT", also the
 * obsolete RFC 850 and asctime forms, parsed by libcurl's curl_getdate,
 * which also takes other zones than GMT and ignores unknown trailing
 * words). now is the current wall-clock time.
 * On success stores the delay in ms (0 for a date in the past) and returns
 * 0; returns -1 for anything else (the caller falls back to its own
 * backoff). Pure. */
int runpod_parse_retry_after(const char *value, time_t now, long long *delay_ms);

/* "Authorization: Bearer <api_key>", malloc'd (the caller frees), so the
 * header fits whatever length the key has. NULL when out of memory. */
char *runpod_auth_header(const char *api_key);

/* "{base_url}/{endpoint_id}/{op}" into buf; returns 0 or -1 if too long. */
int runpod_url(const char *base_url, const char *endpoint_id, const char *op, char *buf,
	       size_t len);

/* The parts of a /run reply the dispatcher uses (§2.1: {"id","status"}). */
struct runpod_run_reply {
	char id[RUNPOD_JOB_ID_MAX + 1];
	char status[RUNPOD_STATUS_MAX + 1];
	char why[80]; /* when parsing failed: "id: control character", ... */
};

/* Parses a /run reply body (not NUL-terminated; len bytes). Unknown members
 * are ignored. Returns 0, or -1 when the body is not a JSON object with a
 * non-empty string "id" of at most RUNPOD_JOB_ID_MAX bytes, with why set.
 * Strings are judged on their raw bytes (jsonscan.h): valid UTF-8, valid
 * escapes, no control character, within the limit. A missing or odd
 * "status" leaves status "". Pure. */
int runpod_parse_run_reply(const char *body, size_t len, struct runpod_run_reply *out);

enum runpod_outcome {
	RUNPOD_ACCEPTED, /* a job exists: the worker owns the messages */
	RUNPOD_REJECTED, /* no job was created: release the messages */
	RUNPOD_UNKNOWN,  /* a job may exist: keep the messages' vt */
};

/* What happened to one /run request, as seen by the HTTP layer. */
struct runpod_attempt {
	long http_status;     /* 0 when no response arrived */
	bool transport_error; /* curl reported an error */
	bool connected;       /* a connection to the server was established */
	bool request_sent;    /* any request bytes were written (CURLINFO_REQUEST_SIZE > 0) */
	bool reply_parsed;    /* runpod_parse_run_reply() succeeded */
};

/* Classifies an attempt (DESIGN.md "Delivery semantics", §6.1):
 * 2xx with a job id → accepted; 2xx without one, 504, or a transport error
 * after request bytes went out → unknown; anything else → rejected. */
enum runpod_outcome runpod_classify(const struct runpod_attempt *a);

/* True for replies that mean the key or endpoint is wrong (401, 403, 404):
 * retrying will not help until the configuration changes. */
bool runpod_is_config_error(long http_status);

const char *runpod_outcome_name(enum runpod_outcome o);

/* ---- /status (the tracker) ---- */

#define RUNPOD_ERROR_MAX 256 /* bytes of a job's error text kept for the log */

/* The parts of a job object (§4) the tracker uses. */
struct runpod_status_reply {
	char id[RUNPOD_JOB_ID_MAX + 1]; /* "" when absent */
	char status[RUNPOD_STATUS_MAX + 1];
	long long delay_ms;               /* delayTime, -1 when absent or not a number >= 0 */
	long long execution_ms;           /* executionTime, likewise */
	char error[RUNPOD_ERROR_MAX + 1]; /* "" when absent; cut at a UTF-8 boundary */
	bool error_truncated;
};

/* Parses a /status reply body (len bytes, not NUL-terminated). "status"
 * must be a non-empty string of printable bytes; a longer one than
 * RUNPOD_STATUS_MAX is cut (it is then unknown, i.e. non-terminal). An
 * "error" that is not a string (a handler's object) is kept as compact JSON
 * text; an unusable error string (control characters other than \n \r \t)
 * is replaced by a note saying why. An unusable "id" is left "". Strings
 * are judged on their raw bytes (jsonscan.h). Unknown members are ignored.
 * Returns 0, or -1 when the body is not a JSON object with such a status. Pure. */
int runpod_parse_status_reply(const char *body, size_t len, struct runpod_status_reply *out);

/* True for COMPLETED, FAILED, CANCELLED and TIMED_OUT (§5); every other
 * string, RUNNING and unknown ones included, is non-terminal. */
bool runpod_status_is_terminal(const char *status);

/* "{base_url}/{endpoint_id}/status/{job_id}" into buf, the job id
 * percent-encoded outside RFC 3986's unreserved characters by
 * curl_easy_escape() (ids are opaque). Returns 0, or -1 if it does not fit
 * or out of memory. */
int runpod_status_url(const char *base_url, const char *endpoint_id, const char *job_id, char *buf,
		      size_t len);

/* ---- /health (the tracker) ---- */

enum runpod_health_job {
	RUNPOD_HJ_COMPLETED,
	RUNPOD_HJ_FAILED,
	RUNPOD_HJ_IN_PROGRESS,
	RUNPOD_HJ_IN_QUEUE,
	RUNPOD_HJ_RETRIED,
	RUNPOD_HJ_N
};
enum runpod_health_worker {
	RUNPOD_HW_IDLE,
	RUNPOD_HW_INITIALIZING,
	RUNPOD_HW_READY,
	RUNPOD_HW_RUNNING,
	RUNPOD_HW_THROTTLED,
	RUNPOD_HW_UNHEALTHY,
	RUNPOD_HW_N
};

/* The counters of a GET /v2/{endpoint_id}/health reply
 * (runpod-serverless-api.md §7): jobs {completed, failed, inProgress,
 * inQueue, retried}, workers {idle, initializing, ready, running,
 * throttled, unhealthy}. */
struct runpod_health {
	long long jobs[RUNPOD_HJ_N];
	long long workers[RUNPOD_HW_N];
};

/* Parses a /health reply body (len bytes, not NUL-terminated) leniently, as
 * §7 advises: a missing counter, or one that is not a number >= 0, is 0;
 * unknown keys are ignored ("unhealthy" is read by third-party clients,
 * not documented). Returns 0, or -1 when the body is not a JSON object
 * with a "jobs" or a "workers" object (out is then all zero). Pure. */
int runpod_parse_health_reply(const char *body, size_t len, struct runpod_health *out);

#endif
