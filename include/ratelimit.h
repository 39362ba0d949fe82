/* ratelimit — a sliding-window request limiter: at most `cap` requests in
 * any window of window_s seconds. Exact, unlike a token bucket, whose burst
 * would allow up to twice the cap in some window. Owns the ring of the last
 * `cap` send times. One for /run (dispatcher) and one for /status
 * (tracker). Knows nothing of libev, HTTP or RunPod: the caller
 * passes the clock and starts its own timer for the wait it is told. */
#ifndef PGMQD_RATELIMIT_H
#define PGMQD_RATELIMIT_H

#include <stdbool.h>

/* The window of the per_10s caps (/run and /status) and the margin added to
 * it for the gap between our send time and the server's receive time. */
#define RATE_WINDOW_S 10.0
#define RATE_MARGIN_S 0.05

struct ratelimit {
	double *sent_at; /* ring of send times, cap entries */
	int cap, head, count;
	double window_s; /* window length plus any safety margin */
};

/* A limiter of cap (>= 1) requests per window_s. Returns 0, or -1 when out
 * of memory (rl is then empty and safe to free). */
int ratelimit_init(struct ratelimit *rl, int cap, double window_s);

/* True when a request may go at `now` (seconds); otherwise false and
 * *wait_s is how long until a slot frees. Pure. */
bool ratelimit_slot(const struct ratelimit *rl, double now, double *wait_s);

/* How many requests may start between now and now + horizon_s: the free
 * slots plus those freeing within the horizon. Pure. */
int ratelimit_available(const struct ratelimit *rl, double now, double horizon_s);

/* Like ratelimit_slot, but a request may go only if `keep` slots of the
 * window stay free after it (slots held back for another kind of request
 * sharing the limiter: the tracker keeps /health's share from /status).
 * keep is clamped to [0, cap - 1]. Pure. */
bool ratelimit_slot_keep(const struct ratelimit *rl, double now, int keep, double *wait_s);

/* Records a request sent at now. */
void ratelimit_record(struct ratelimit *rl, double now);

/* Builds into out a limiter of new_cap holding rl's newest send times
 * (rl is unchanged), so that a reload can prepare it before committing.
 * Returns 0, or -1 when out of memory (out empty). */
int ratelimit_resized(const struct ratelimit *rl, int new_cap, struct ratelimit *out);

/* Frees the ring. NULL-safe; rl may be reused after ratelimit_init. */
void ratelimit_free(struct ratelimit *rl);

#endif
