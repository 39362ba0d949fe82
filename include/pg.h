/* pg — asynchronous libpq connections driven by libev, shareable.
 *
 * A struct pg is a handle: one user's callbacks and queries on a
 * connection. pg_new gives a connection of its own; pg_new_pooled attaches
 * to the pool's connection for the same conninfo, so that routes share one
 * (pg_share.c). Each query runs in its turn on the connection, whoever
 * queued it; connection events reach every handle on it.
 *
 * Connects with PQconnectStartParams/PQconnectPoll (the socket may change
 * while connecting, so the watcher follows PQsocket after every poll), runs
 * queries one at a time from a bounded FIFO with PQsendQueryParams (unnamed
 * statements only, so transaction-mode poolers work), and reads results
 * with PQconsumeInput/PQisBusy/PQgetResult from an ev_io. Nothing blocks.
 *
 * A lost connection is logged once and repaired with capped exponential
 * backoff and full jitter (backoff.h). Knows nothing of PGMQ or RunPod. */
#ifndef PGMQD_PG_H
#define PGMQD_PG_H

#include <ev.h>
#include <libpq-fe.h>
#include <stdbool.h>
#include <stddef.h>

#define PG_MAX_QUEUED 64  /* queries waiting or running, per handle */
#define PG_MAX_HANDLES 64 /* handles on one connection; a pool opens another past it */

struct pg;

/* Why a query produced no result. */
struct pg_error {
	const char *sqlstate; /* five characters, or "" when none */
	const char *message;  /* one line, no trailing newline */
	bool sent;            /* the server may have executed it (fate unknown
				   when the connection died afterwards) */
	bool connection_lost;
};

/* Exactly one call per accepted query. On success res is a
 * PGRES_TUPLES_OK / PGRES_COMMAND_OK result that the callee owns and must
 * PQclear(); err is NULL. On failure res is NULL and err describes it (valid
 * only during the call). */
typedef void (*pg_result_fn)(void *arg, PGresult *res, const struct pg_error *err);

struct pg_callbacks {
	void (*connected)(void *arg);      /* after every (re)connect */
	void (*disconnected)(void *arg);   /* once per loss */
	void (*connect_failed)(void *arg); /* after every failed attempt */
	/* A NOTIFY arrived (LISTEN is the caller's query). Strings valid during
	 * the call only. Must not free the connection. */
	void (*notify)(void *arg, const char *channel, const char *payload);
	void *arg;
};

/* Creates the connection object; conninfo ("" for libpq defaults) is
 * copied. connect_timeout_ms bounds each attempt. Call pg_start() to
 * begin. Returns NULL when out of memory. */
struct pg *pg_new(struct ev_loop *loop, const char *conninfo, int connect_timeout_ms,
		  const struct pg_callbacks *cb);

/* Connections shared by conninfo: the routes' pool. Free it after the
 * last handle taken from it. NULL when out of memory; pg_pool_free is
 * NULL-safe. */
struct pg_pool;
struct pg_pool *pg_pool_new(struct ev_loop *loop);
void pg_pool_free(struct pg_pool *pool);

/* Like pg_new, but the handle shares the pool's connection for the same
 * conninfo and connect_timeout_ms (opening it when there is none). pool
 * NULL: a connection of its own. Returns NULL when out of memory. */
struct pg *pg_new_pooled(struct ev_loop *loop, struct pg_pool *pool, const char *conninfo,
			 int connect_timeout_ms, const struct pg_callbacks *cb);

/* Starts connecting (no-op if already connecting or connected). A handle
 * that joins a connection already up hears connected() from the loop. */
void pg_start(struct pg *h);

/* True when connected, this handle told so, and able to run queries now. */
bool pg_ready(const struct pg *h);

/* True for the first handle on its connection: the one that counts
 * per-connection events (reconnects) for all. */
bool pg_primary(const struct pg *h);

/* How many handles use this handle's connection (itself included). */
int pg_shared_count(const struct pg *h);

/* Queues a query. sql and params are copied. Queries wait while the
 * connection is down and run after it comes back. Returns 0, or -1 when the
 * FIFO is full (PG_MAX_QUEUED) or memory ran out; then fn is not called. */
int pg_query(struct pg *h, const char *sql, int nparams, const char *const *params, pg_result_fn fn,
	     void *arg) __attribute__((warn_unused_result));

/* Switches to another conninfo (copied): reconnects once the running query,
 * if any, has finished; queued queries run on the new connection. A handle
 * on a connection others share moves to the pool's connection for the new
 * conninfo instead (the others stay). Returns 0 or -1 when out of memory
 * (the old conninfo stays). */
int pg_set_conninfo(struct pg *h, const char *conninfo);

/* Fails the handle's pending queries with connection_lost (their callbacks
 * run inside this call; a running one's answer is dropped when it comes),
 * closes the connection when no other handle uses it and frees the
 * handle. NULL-safe. Safe inside a callback of this connection. */
void pg_free(struct pg *h);

/* Quotes an SQL identifier ("…", inner quotes doubled) into buf, for
 * LISTEN channels such as pgmq.q_jobs.INSERT that contain dots and capitals
 * (pgmq-api.md §5). Returns 0, or -1 when it does not fit. Pure. */
int pg_quote_ident(const char *name, char *buf, size_t len);

/* Seconds between repeated warnings while the database stays unreachable. */
#define PG_OUTAGE_WARN_EVERY_S 60.0

/* Whether a failed connect is logged at warn: the first of an outage
 * (first), an error text that differs from the last one warned about, or
 * PG_OUTAGE_WARN_EVERY_S since that warning; otherwise debug. Pure. */
bool pg_warn_due(bool first, const char *last_error, const char *error, double since_warn_s);

#endif
