/* budget — one rate cap shared by every replica of the daemon (issue 13,
 * "one budget for the fleet"): the replicas take their /run (or /status)
 * slots from PostgreSQL in small grants instead of each keeping the whole
 * cap alone.
 *
 * A grant is one statement, `SELECT * FROM <schema>.budget_take(...)`
 * (migration 4 in migrate.c), on the daemon's own non-blocking connection:
 * it locks the endpoint's budget row, prunes grants that left the counted
 * span, and grants up to `want` slots if the grants of the last
 * count_s = window + margin + validity seconds leave room under the cap.
 * One autocommit statement holds no session state, so it works through a
 * transaction pooler (PgBouncer pool_mode = transaction) as well as
 * directly.
 *
 * Why count_s and not the window: RunPod counts a sliding window at
 * receipt. A grant made at database time g (clock_timestamp(), never a
 * replica's clock) may be spent until g + validity; its requests then fall
 * in windows ending up to g + validity + margin + window. Counting each
 * grant for that long keeps every window of the fleet under the cap. The
 * replica measures validity from the moment it sent the statement (before
 * g), on its own monotonic clock, and drops what is left after it.
 *
 * When no grant can be had (database down, schema missing, statement
 * failed) the budget sends nothing when fleet.expected_replicas is 0;
 * otherwise, one counted span after the last answer, cap / expected_replicas
 * on a local sliding window that also holds the granted sends. It asks the
 * database again every BUDGET_RETRY_S, reports the sends made without a
 * grant with the first statement that is answered, and keeps to the local
 * share for one more span after that.
 *
 * Owns its grant, its fallback limiter and its one outstanding statement.
 * Knows nothing of batches, HTTP or RunPod's formats: the caller asks for
 * slots and is called back when some may be free. */
#ifndef PGMQD_BUDGET_H
#define PGMQD_BUDGET_H

#include "config.h"
#include "pg.h"
#include "ratelimit.h"

#include <ev.h>
#include <stdbool.h>

#define BUDGET_RETRY_S 1.0        /* next database attempt after a failure */
#define BUDGET_MIN_WAIT_S 0.005   /* floor of a denied grant's retry */
#define BUDGET_STMT_TIMEOUT_S 2.0 /* a grant not answered by then: fall back */

enum budget_kind { BUDGET_RUN = 0, BUDGET_STATUS, BUDGET_NKINDS };

/* What this replica holds: slots left, usable until expires_at (seconds on
 * the caller's monotonic clock). */
struct budget_grant {
	int slots;
	double expires_at;
};

/* Seconds the database counts a grant against the cap: the window, the
 * send-to-receipt margin, and the validity. Pure. */
double budget_count_s(double window_s, double margin_s, double validity_s);

/* Slots to ask for: what waits now, at most grant_max (>= 1). Pure. */
int budget_want(int waiting, int grant_max);

/* The database's arithmetic (migration 4, budget_take), also here so that
 * it is unit tested: of `free_slots` left under the cap in the counted
 * span, a replica asking for want (capped at grant_max) gets at most its
 * share among `active` replicas holding grants (itself included), rounded
 * up, and at least 1 when anything is free. Pure. */
int budget_grant_size(int free_slots, int want, int grant_max, int active);

/* Takes one slot of g at now: false when it is empty or expired (an
 * expired grant is emptied, its leftover added to *unused). Pure apart
 * from g and unused. */
bool budget_grant_take(struct budget_grant *g, double now, long long *unused);

/* The fallback cap: cap / expected_replicas rounded down, at least 1;
 * 0 when expected_replicas is 0 (send nothing). Pure. */
int budget_fallback_cap(int cap, int expected_replicas);

/* The local share (fallback) of one budget: what a replica may send when
 * no grant can be had, and what a grant's slot must also pass just after
 * a fallback. rl's window is the counted span (budget_count_s) and holds
 * every send of this replica, granted or not. Times in seconds on the
 * caller's clock. */
struct budget_share {
	bool fallback;           /* no grant can be had: the share decides */
	int cap;                 /* budget_fallback_cap(); 0: nothing without a grant */
	double last_ok_at;       /* the last answered statement (or the start) */
	double transition_until; /* after a fallback: granted slots pass the share too */
	struct ratelimit rl;
};

/* An empty share of cap over count_s, not in fallback, its last answer at
 * now: a replica starting without a grant waits one span as well. Returns
 * 0, or -1 when out of memory (s->rl empty and safe to free). */
int budget_share_init(struct budget_share *s, int cap, double count_s, double now);

/* In fallback, may a request go at now without a grant? Only once every
 * grant made before the database stopped answering has left the counted
 * span (last_ok_at + count_s: the other replicas' grants were not bound by
 * the share), then at most cap per span. Otherwise false and *wait_s is how
 * long until it might. False when not in fallback or cap is 0. Pure. */
bool budget_share_allows(const struct budget_share *s, double now, double *wait_s);

/* Leaving a fallback: may a granted slot go at now? Until transition_until
 * only when the share allows it too (other replicas may still send at
 * their share, unreported); *wait_s as above. Pure. */
bool budget_share_granted_allows(const struct budget_share *s, double now, double *wait_s);

/* A statement was answered at now: its time is last_ok_at, and when s was
 * in fallback with a share, granted slots keep to the share for one more
 * counted span. Does not leave the fallback itself (the caller does, and
 * logs it). */
void budget_share_answered(struct budget_share *s, double now);

struct budget;

/* A budget for kind on pg (owned by the caller and outliving the budget),
 * with cap and window from cfg (max_requests_per_10s or
 * tracker.max_status_per_10s, runpod.rate_window_ms) and the [fleet] keys;
 * values are copied. ready(arg) runs when slots may be free again (a grant
 * came, a retry is due). NULL when out of memory. */
struct budget *budget_new(struct ev_loop *loop, struct pg *pg, const struct config *cfg,
			  enum budget_kind kind, void (*ready)(void *arg), void *arg);

/* Takes a slot at now (ev_time()): true when the request may go. Otherwise
 * asks the database for a grant of budget_want(waiting, grant_max) (one
 * statement at a time) and returns false; ready() follows. NULL-safe
 * (true: the fleet budget is off). */
bool budget_take(struct budget *b, double now, int waiting);

/* Asks the database for a grant (unless a statement is outstanding or a
 * retry is due later) without taking a slot: for a caller that schedules
 * its own sends and found budget_has_slot false. NULL-safe. */
void budget_ask(struct budget *b, double now, int waiting);

/* True when a slot could be taken at now without a round trip. NULL-safe
 * (true). */
bool budget_has_slot(const struct budget *b, double now);

/* How many slots could be taken at now without a round trip: what the
 * current grant has left (1 when only the local share allows a send, 0
 * when nothing does). For reads that claim several bodies at once, so that
 * none claims rows the fleet will not let out. NULL-safe (INT_MAX). */
int budget_slots_now(const struct budget *b, double now);

/* Takes the new cap, endpoint and [fleet] values of a reloaded cfg.
 * NULL-safe. */
void budget_reload(struct budget *b, const struct config *cfg);

/* Migrates the schema once after the first connect (when the ledger is
 * off: it migrates otherwise). NULL-safe. */
void budget_connected(struct budget *b, bool migrate);

/* This replica's owner id in the grants table (a UUID). */
const char *budget_owner(const struct budget *b);

/* Stops timers, abandons an outstanding statement (its callback finds the
 * budget gone) and frees. NULL-safe. */
void budget_free(struct budget *b);

#endif
