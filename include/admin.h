/* admin — the admin HTTP listener: /healthz, /readyz, /metrics,
 * /dispatches.
 *
 * libmicrohttpd in MHD_USE_EPOLL mode with no thread of its own: its epoll
 * fd is watched by an ev_io in the caller's libev loop, an ev_prepare
 * re-arms an ev_timer from MHD_get_timeout() before the loop blocks, and
 * MHD_run() runs from either watcher. Handlers therefore run on the loop,
 * between other callbacks, and must not block.
 *
 *   GET/HEAD /healthz  200 "ok": answered from the loop, so any answer proves
 *                      the loop turns (liveness; never depends on PG/RunPod)
 *   GET/HEAD /readyz   200 "ok", or 503 with the ready hook's reason
 *   GET/HEAD /metrics  200 with the metrics hook's body, Content-Type
 *                      "text/plain; version=0.0.4; charset=utf-8"
 *   GET  /routes       200 with the routes hook's JSON (runtime control)
 *   POST /routes/NAME/pause|resume|drain
 *                      200 with the route's new state, 404 for no such route
 *   GET/HEAD /dispatches  the dispatches hook's answer: the request is
 *                      suspended (MHD_suspend_connection) until the hook
 *                      calls admin_answer, so the loop never waits for it;
 *                      at most ADMIN_MAX_ARGS query arguments (400 beyond)
 *   other paths        404;  other methods 405 with "Allow: GET, HEAD"
 * /routes needs "Authorization: Bearer <token>" when a token is set, and is
 * refused (403) without one when the listener is not on loopback.
 * Query strings are ignored elsewhere. Bodies are text/plain and end in
 * "\n", except the hooks' JSON. Knows nothing of the dispatcher, the ledger
 * or the metrics module: they come in through hooks. */
#ifndef PGMQD_ADMIN_H
#define PGMQD_ADMIN_H

#include <ev.h>
#include <stdbool.h>
#include <stddef.h>

#define ADMIN_MAX_ARGS 128 /* query arguments handed to a hook */

struct admin;

/* One request waiting for its answer (see admin_answer). */
struct admin_call;

/* Callbacks, run on the loop. Either may be NULL. The struct is copied. */
struct admin_hooks {
	/* Readiness. Returns true when ready; otherwise writes a short one-line
	 * reason (NUL-terminated, at most whylen bytes) to why. NULL: always
	 * ready. */
	bool (*ready)(void *arg, char *why, size_t whylen);
	/* The /metrics body: a malloc'd buffer that admin frees, its length in
	 * *len; NULL when it cannot be built (answered 500). NULL hook: /metrics
	 * is 404. */
	char *(*metrics)(void *arg, size_t *len);
	/* GET /routes: a malloc'd JSON body that admin frees (NULL: 500). */
	char *(*routes)(void *arg);
	/* POST /routes/NAME/ACTION: 0 done, -1 no such route, -2 no such action. */
	int (*control)(void *arg, const char *route, const char *action);
	/* Bearer token for /routes; NULL or "" for none. Copied. */
	const char *token;
	/* GET /dispatches with its query arguments keys[i]=vals[i] (i < n, in
	 * order, repeated keys kept, vals[i] NULL for "?key"; valid during the
	 * call). Must call admin_answer(call, ...) exactly once, during the
	 * call or later from the loop. NULL hook: 404. */
	void (*dispatches)(void *arg, struct admin_call *call, const char *const *keys,
			   const char *const *vals, int n);
	void *arg;
};

/* Binds `listen_addr` — "host:port" or "[v6addr]:port", port 0..65535 (0
 * picks a free port, see admin_port()); host may be a name, the first
 * address getaddrinfo() returns is used — and starts serving on `loop`.
 * Returns NULL when the address is malformed or cannot be bound, with a
 * one-line reason (e.g. "bind 127.0.0.1:9187: Address already in use") in
 * err (errlen bytes, NUL-terminated, may be NULL). Not logged here. */
struct admin *admin_start(struct ev_loop *loop, const char *listen_addr,
			  const struct admin_hooks *hooks, char *err, size_t errlen)
	__attribute__((warn_unused_result));

/* Answers call: HTTP status, content type (a static string), a malloc'd
 * body of len bytes that admin takes (NULL: 500). Frees call. Safe after
 * admin_stop (the answer is then dropped). On the loop's thread. */
void admin_answer(struct admin_call *call, unsigned status, const char *type, char *body,
		  size_t len);

/* The TCP port actually bound (useful after port 0), or -1. */
int admin_port(const struct admin *a);

/* Stops accepting (MHD_quiesce_daemon), closes every connection
 * (MHD_stop_daemon; calls still waiting are detached: their later
 * admin_answer only frees), stops the watchers, closes the listening
 * socket and frees. Call on the loop's thread, never from inside a hook. NULL-safe. */
void admin_stop(struct admin *a);

/* Blocking liveness probe for `pgmq-dispatcher --health-check` (Docker
 * HEALTHCHECK; the slim image has no curl binary): a libcurl easy
 * "GET /healthz" to `listen_addr` (a wildcard host such as 0.0.0.0 or [::]
 * is probed on loopback; http only, no proxy), all within timeout_ms
 * (<= 0: 5000). Returns 0 when the status is 200, 1 otherwise (reason
 * logged at warn). For use outside the loop only. */
int admin_health_check(const char *listen_addr, int timeout_ms);

/* The http:// URL of path on the listener listen_addr names, a wildcard
 * host replaced by loopback (for clients on this host: --health-check and
 * `ctl`). Returns 0, or -1 when the address is malformed or url too short. */
int admin_local_url(const char *listen_addr, const char *path, char *url, size_t len);

#endif
