/* backoff — how long to wait after failures: one capped exponential backoff
 * with full jitter for the database (reconnects, failed reads), /run pauses,
 * /health probes; the random source (also the tracker's ±10 % poll jitter);
 * and the Retry-After policy (which statuses honour it, the cap), for /run
 * and the tracker's /status. Owns no state and no timers: pure functions and one random source.
 * Knows nothing of libev, PostgreSQL or how a Retry-After is parsed. */
#ifndef PGMQD_BACKOFF_H
#define PGMQD_BACKOFF_H

/* Floor of a pause that follows a failure, in ms: a pause is a pause. */
#define BACKOFF_MIN_MS 250.0

/* Delay after `failures` consecutive failures (1-based; < 1 counts as 1):
 * min(cap_ms, base_ms * 2^(failures-1)) scaled by rnd in [0, 1) (full
 * jitter), never below min_ms. Pure. */
double backoff_ms(int failures, double base_ms, double cap_ms, double min_ms, double rnd);

/* A uniformly random value in [0, 1) from random(). */
double backoff_jitter(void);

/* The pause a reply asks for: for a 429 or 503 with a parsed Retry-After
 * (retry_after_ms >= 0), that delay capped at max_ms; -1 (use our own
 * backoff) for any other status, no or an unparsable header, or max_ms 0
 * (Retry-After ignored by configuration). Pure. */
double backoff_retry_after_ms(int http_status, long long retry_after_ms, long long max_ms);

#endif
