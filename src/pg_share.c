/* pg_share — handles on a connection, and the pool that lets several
 * handles (routes) share one; see include/pg.h. The connection itself,
 * its states and its FIFO are pg.c's. */
#include "pg.h"
#include "log.h"
#include "pg_int.h"

#include <stdlib.h>
#include <string.h>

static void on_soon(struct ev_loop *loop, ev_timer *w, int revents);

static void attach(struct pg_conn *c, struct pg *h)
{
	struct pg **pp = &c->handles;

	while (*pp)
		pp = &(*pp)->next;
	*pp = h;
	h->next = NULL;
	h->c = c;
	c->nhandles++;
}

static void detach(struct pg *h)
{
	struct pg_conn *c = h->c;

	for (struct pg **pp = &c->handles; *pp; pp = &(*pp)->next)
		if (*pp == h) {
			*pp = h->next;
			c->nhandles--;
			break;
		}
	h->next = NULL;
	h->c = NULL;
}

static bool attached(const struct pg_conn *c, const struct pg *h)
{
	for (const struct pg *x = c->handles; x; x = x->next)
		if (x == h)
			return true;
	return false;
}

static struct pg *handle_new(const struct pg_callbacks *cb)
{
	struct pg *h = calloc(1, sizeof(*h));

	if (h == NULL)
		return NULL;
	if (cb)
		h->cb = *cb;
	ev_timer_init(&h->soon, on_soon, 0.0, 0.0);
	h->soon.data = h;
	return h;
}

struct pg *pg_new(struct ev_loop *loop, const char *conninfo, int connect_timeout_ms,
		  const struct pg_callbacks *cb)
{
	struct pg *h = handle_new(cb);
	struct pg_conn *c = h ? pg_conn_new(loop, conninfo, connect_timeout_ms) : NULL;

	if (c == NULL) {
		free(h);
		return NULL;
	}
	attach(c, h);
	return h;
}

struct pg_pool *pg_pool_new(struct ev_loop *loop)
{
	struct pg_pool *pool = calloc(1, sizeof(*pool));

	if (pool)
		pool->loop = loop;
	return pool;
}

static struct pg_conn *pool_find(struct pg_pool *pool, const char *conninfo, int connect_timeout_ms)
{
	for (struct pg_conn *c = pool->conns; c; c = c->pool_next)
		if (!c->dead && c->connect_timeout_ms == connect_timeout_ms &&
		    c->nhandles < PG_MAX_HANDLES && strcmp(c->conninfo, conninfo) == 0)
			return c;
	return NULL;
}

static struct pg_conn *pool_get(struct pg_pool *pool, const char *conninfo, int connect_timeout_ms)
{
	struct pg_conn *c = pool_find(pool, conninfo ? conninfo : "", connect_timeout_ms);

	if (c)
		return c;
	if ((c = pg_conn_new(pool->loop, conninfo, connect_timeout_ms)) == NULL)
		return NULL;
	c->pool = pool;
	c->pool_next = pool->conns;
	pool->conns = c;
	return c;
}

static void pool_forget(struct pg_conn *c)
{
	if (c->pool == NULL)
		return;
	for (struct pg_conn **pp = &c->pool->conns; *pp; pp = &(*pp)->pool_next)
		if (*pp == c) {
			*pp = c->pool_next;
			break;
		}
	c->pool = NULL;
}

struct pg *pg_new_pooled(struct ev_loop *loop, struct pg_pool *pool, const char *conninfo,
			 int connect_timeout_ms, const struct pg_callbacks *cb)
{
	struct pg *h;
	struct pg_conn *c;

	if (pool == NULL)
		return pg_new(loop, conninfo, connect_timeout_ms, cb);
	if ((h = handle_new(cb)) == NULL)
		return NULL;
	if ((c = pool_get(pool, conninfo, connect_timeout_ms)) == NULL) {
		free(h);
		return NULL;
	}
	attach(c, h);
	return h;
}

void pg_pool_free(struct pg_pool *pool)
{
	if (pool == NULL)
		return;
	/* Every handle is gone, so every connection is (dead ones unlink
	 * themselves); a leftover is a caller's bug, but not a leak. */
	while (pool->conns) {
		struct pg_conn *c = pool->conns;
		pool->conns = c->pool_next;
		c->pool = NULL;
		c->dead = true;
		if (c->busy == 0)
			pg_conn_destroy(c);
	}
	free(pool);
}

/* Tells a handle that joined a ready connection, from the loop. */
static void on_soon(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct pg *h = w->data;
	struct pg_conn *c = h->c;

	(void)loop;
	(void)revents;
	if (c == NULL || c->state != PG_READY || h->up)
		return;
	pg_conn_hold(c);
	h->up = true;
	if (h->cb.connected)
		h->cb.connected(h->cb.arg);
	pg_conn_kick(c);
	pg_conn_release(c);
}

void pg_start(struct pg *h)
{
	struct pg_conn *c = h->c;

	if (c->state == PG_READY) {
		if (!h->up && !ev_is_active(&h->soon))
			ev_timer_start(c->loop, &h->soon);
		return;
	}
	pg_conn_start(c);
}

bool pg_ready(const struct pg *h)
{
	return h->c->state == PG_READY && h->up;
}

bool pg_primary(const struct pg *h)
{
	return h->c->handles == h;
}

int pg_shared_count(const struct pg *h)
{
	return h->c->nhandles;
}

/* Snapshot of the handles, so that a callback detaching one (or a handle
 * joining) does not disturb the walk. PG_MAX_HANDLES bounds both. */
static int snapshot(struct pg_conn *c, struct pg **hs)
{
	int n = 0;

	for (struct pg *h = c->handles; h && n < PG_MAX_HANDLES; h = h->next)
		hs[n++] = h;
	return n;
}

void pg_share_connected(struct pg_conn *c)
{
	struct pg *hs[PG_MAX_HANDLES];
	int n = snapshot(c, hs);

	pg_conn_hold(c);
	for (int i = 0; i < n && c->state == PG_READY; i++) {
		if (!attached(c, hs[i]))
			continue;
		ev_timer_stop(c->loop, &hs[i]->soon);
		hs[i]->up = true;
		if (hs[i]->cb.connected)
			hs[i]->cb.connected(hs[i]->cb.arg);
	}
	pg_conn_release(c);
}

void pg_share_lost(struct pg_conn *c, bool was_ready)
{
	struct pg *hs[PG_MAX_HANDLES];
	int n = snapshot(c, hs);

	pg_conn_hold(c);
	for (int i = 0; i < n; i++) {
		struct pg *h = hs[i];
		bool told = h->up;

		if (!attached(c, h))
			continue;
		h->up = false;
		ev_timer_stop(c->loop, &h->soon);
		/* A handle that joined and was never told of the connection
		 * hears of a failed attempt rather than of a loss. */
		if (was_ready && told && h->cb.disconnected)
			h->cb.disconnected(h->cb.arg);
		else if ((!was_ready || !told) && h->cb.connect_failed)
			h->cb.connect_failed(h->cb.arg);
	}
	pg_conn_release(c);
}

void pg_share_notify(struct pg_conn *c, const char *channel, const char *payload)
{
	struct pg *hs[PG_MAX_HANDLES];
	int n = snapshot(c, hs);

	for (int i = 0; i < n; i++)
		if (attached(c, hs[i]) && hs[i]->up && hs[i]->cb.notify)
			hs[i]->cb.notify(hs[i]->cb.arg, channel, payload);
}

int pg_query(struct pg *h, const char *sql, int nparams, const char *const *params, pg_result_fn fn,
	     void *arg)
{
	struct pg_conn *c = h->c;
	struct pg_query *q;

	if (h->nqueued >= PG_MAX_QUEUED)
		return -1;
	q = calloc(1, sizeof(*q));
	if (q == NULL)
		return -1;
	q->sql = strdup(sql);
	q->params = nparams ? calloc((size_t)nparams, sizeof(char *)) : NULL;
	if (q->sql == NULL || (nparams && q->params == NULL)) {
		pg_query_free(q);
		return -1;
	}
	for (int i = 0; i < nparams; i++) {
		q->params[i] = params[i] ? strdup(params[i]) : NULL;
		q->nparams = i + 1;
		if (params[i] && q->params[i] == NULL) {
			pg_query_free(q);
			return -1;
		}
	}
	q->nparams = nparams;
	q->fn = fn;
	q->arg = arg;
	q->owner = h;
	pg_conn_append(c, q);
	pg_conn_kick(c);
	return 0;
}

/* The result of a query whose handle is gone. */
static void orphan_result(void *arg, PGresult *res, const struct pg_error *err)
{
	(void)arg;
	(void)err;
	if (res)
		PQclear(res);
}

/* Fails h's queries on c: unsent ones leave the FIFO; the running one
 * stays until the server answers (other handles' queries wait behind it)
 * and its answer is dropped. Callbacks run inside; one that queues more on
 * h sees that failed too. */
static void fail_queries(struct pg_conn *c, struct pg *h, const char *why)
{
	for (;;) {
		struct pg_query *q = c->head;
		bool running;

		while (q && q->owner != h)
			q = q->next;
		if (q == NULL)
			return;
		running = q == c->head && c->sent;
		struct pg_error err = { "", why, running, true };
		if (running) {
			pg_result_fn fn = q->fn;
			void *arg = q->arg;
			q->owner = NULL;
			q->fn = orphan_result;
			q->arg = NULL;
			h->nqueued--;
			fn(arg, NULL, &err);
		} else {
			pg_conn_unlink(c, q);
			q->fn(q->arg, NULL, &err);
			pg_query_free(q);
		}
	}
}

void pg_free(struct pg *h)
{
	struct pg_conn *c;

	if (h == NULL)
		return;
	c = h->c;
	ev_timer_stop(c->loop, &h->soon);
	free(h->move_to);
	h->move_to = NULL;
	pg_conn_hold(c);
	if (c->nhandles == 1)
		/* The last user: close first, so that nothing more is sent. */
		pg_conn_close(c);
	fail_queries(c, h, "shutting down");
	detach(h);
	if (c->nhandles == 0) {
		pool_forget(c);
		c->dead = true;
	}
	/* Inside one of c's callbacks, c's code may still look at h. */
	h->gone = true;
	h->next = c->gone;
	c->gone = h;
	pg_conn_release(c);
}

void pg_share_bury(struct pg_conn *pg)
{
	while (pg->gone) {
		struct pg *h = pg->gone;
		pg->gone = h->next;
		free(h);
	}
}

/* Moves h with its unsent queries to the pool's connection for conninfo:
 * a handle that leaves a connection others still use. h hears of a loss
 * now and of the new connection when it is (or already is) ready. */
static int move(struct pg *h, const char *conninfo)
{
	struct pg_conn *from = h->c, *to;
	struct pg_query *q, *next;

	to = pool_get(from->pool, conninfo, from->connect_timeout_ms);
	if (to == NULL)
		return -1;
	pg_conn_hold(from);
	for (q = from->head; q; q = next) {
		next = q->next;
		if (q->owner != h || (q == from->head && from->sent))
			continue;
		pg_conn_append(to, pg_conn_unlink(from, q));
	}
	detach(h);
	attach(to, h);
	if (from->nhandles == 0) {
		pool_forget(from);
		from->dead = true;
	}
	pg_conn_release(from);
	log_msg(LOG_INFO, "db_reconnecting", "conninfo changed: moving to another connection");
	if (h->up) {
		h->up = false;
		if (h->cb.disconnected)
			h->cb.disconnected(h->cb.arg);
	}
	pg_start(h);
	pg_conn_kick(to);
	return 0;
}

int pg_set_conninfo(struct pg *h, const char *conninfo)
{
	struct pg_conn *c = h->c;
	char *copy;

	if (conninfo == NULL)
		conninfo = "";
	free(h->move_to);
	h->move_to = NULL;
	if (strcmp(c->conninfo, conninfo) == 0)
		return 0;
	/* Alone, and no connection to join: this one follows (pg.c). */
	if (c->pool == NULL ||
	    (c->nhandles == 1 && pool_find(c->pool, conninfo, c->connect_timeout_ms) == NULL))
		return pg_conn_set_conninfo(c, conninfo);
	if (c->head && c->sent && c->head->owner == h) {
		/* Like a connection of its own: move once the running query
		 * is done. */
		if ((copy = strdup(conninfo)) == NULL)
			return -1;
		h->move_to = copy;
		return 0;
	}
	return move(h, conninfo);
}

void pg_share_query_done(struct pg *h)
{
	char *to;

	if (h == NULL || h->gone || h->move_to == NULL)
		return;
	to = h->move_to;
	h->move_to = NULL;
	if (move(h, to) != 0)
		log_msg(LOG_ERROR, "out_of_memory", "cannot move to the new conninfo");
	free(to);
}
