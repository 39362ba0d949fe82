/* dispatches — GET /dispatches on the admin endpoint: the ledger as JSON,
 * the same rows as `pgmq-dispatcher status --json` (?msg_id=1&msg_id=2 or
 * ?msg_id=1,2) and `jobs --json` (?state=S&since=15m|TIME&limit=N), SQL and
 * JSON from include/ledger_view.h.
 *
 * Runs its statements on a connection of its own (include/pg.h, driven by
 * the loop, opened at the first request and kept), never the dispatcher's:
 * pg runs one statement at a time from a bounded FIFO, so an operator's
 * query there would delay reads and heartbeats and could fill the FIFO
 * the reads need; here a slow query or a database outage only delays the
 * answer. At most DISPATCHES_MAX_PENDING requests at once (more: 503), each
 * answered within DISPATCHES_TIMEOUT_S (else 503), at most
 * DISPATCHES_MAX_ROWS rows and DISPATCHES_MAX_IDS msg ids.
 *
 * Answers: 200 application/json (an array of objects); 400 with one line
 * naming the bad parameter; 404 when ledger.enabled is off; 503 when the
 * database cannot answer or the schema is missing. Knows nothing of HTTP
 * servers: the answer goes to a callback. */
#ifndef PGMQD_DISPATCHES_H
#define PGMQD_DISPATCHES_H

#include "config.h"

#include <ev.h>
#include <stddef.h>

#define DISPATCHES_MAX_PENDING 8 /* requests being answered at once */
#define DISPATCHES_TIMEOUT_S 10.0
#define DISPATCHES_MAX_IDS 100   /* msg ids one request may ask about */
#define DISPATCHES_MAX_ROWS 1000 /* rows in one answer (the largest limit) */

struct dispatches;

/* The answer: HTTP status, content type (a static string) and a malloc'd
 * body of len bytes that the callee takes. */
typedef void (*dispatches_done_fn)(void *ctx, unsigned status, const char *type, char *body,
				   size_t len);

/* A server for the loop; no connection yet. NULL when out of memory. */
struct dispatches *dispatches_new(struct ev_loop *loop);

/* Answers one GET /dispatches whose query is keys[i]=vals[i] (i < n; vals
 * may be NULL), under the configuration cfg (valid during the call): done
 * is called exactly once, during this call or later from the loop. The
 * strings are only read during the call. */
void dispatches_serve(struct dispatches *ds, const struct config *cfg, const char *const *keys,
		      const char *const *vals, int n, dispatches_done_fn done, void *ctx);

/* Closes the connection; requests still waiting are answered 503 inside
 * this call. NULL-safe. */
void dispatches_free(struct dispatches *ds);

#endif
