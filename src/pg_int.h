/* pg_int.h — what pg.c (one libpq connection) and pg_share.c (the handles
 * that share it, and the pool) both see. Not for other modules. */
#ifndef PGMQD_PG_INT_H
#define PGMQD_PG_INT_H

#include "pg.h"

enum pg_state { PG_IDLE, PG_WAITING, PG_CONNECTING, PG_READY };

struct pg_query {
	char *sql;
	int nparams;
	char **params;
	pg_result_fn fn;
	void *arg;
	struct pg *owner; /* NULL once orphaned: its handle is gone, the result is dropped */
	struct pg_query *next;
};

/* One libpq connection, used by one or more handles. */
struct pg_conn {
	struct ev_loop *loop;
	char *conninfo;
	int connect_timeout_ms;
	struct pg_pool *pool; /* NULL: private to its one handle */
	struct pg_conn *pool_next;
	struct pg *handles; /* attached handles, oldest first */
	int nhandles;
	int busy;        /* inside one of its own callbacks: freed when that returns */
	bool dead;       /* no handle left: free once not busy */
	struct pg *gone; /* handles freed while busy: freed when it is not */

	PGconn *conn;
	enum pg_state state;
	int attempt;            /* failed connects since the last success */
	bool loss_logged;       /* the outage has had its first warning */
	char warned_error[512]; /* error text of the last warning of this outage */
	ev_tstamp warned_at;    /* when that warning was written */
	bool sent;              /* head query was sent */
	bool reconnect_wanted;  /* conninfo changed: reconnect when idle */
	PGresult *result;       /* first result of the running query */

	struct pg_query *head, *tail;
	int nqueued;

	ev_io io;
	ev_timer timer;     /* reconnect backoff or connect deadline */
	ev_timer send_soon; /* sends outside the caller's stack */
};

/* One user's view of a connection: its callbacks and its queries. */
struct pg {
	struct pg_conn *c;
	struct pg_callbacks cb;
	struct pg *next; /* next handle on c */
	int nqueued;     /* its queries waiting or running, on any connection */
	bool up;         /* has had connected() since the connection last went down */
	bool gone;       /* pg_free'd while its connection was busy */
	char *move_to;   /* conninfo to move to once its running query is done */
	ev_timer soon;   /* connected() for a handle that joins a ready connection */
};

struct pg_pool {
	struct ev_loop *loop;
	struct pg_conn *conns;
};

/* pg.c: the connection. */
struct pg_conn *pg_conn_new(struct ev_loop *loop, const char *conninfo, int connect_timeout_ms);
void pg_conn_start(struct pg_conn *pg);
void pg_conn_kick(struct pg_conn *pg); /* sends the next query from the loop */
int pg_conn_set_conninfo(struct pg_conn *pg, const char *conninfo);
void pg_conn_close(struct pg_conn *pg);   /* PQfinish now, no callbacks */
void pg_conn_destroy(struct pg_conn *pg); /* closes; frees what is left (orphans only) */
void pg_conn_hold(struct pg_conn *pg);    /* around its callbacks: see busy */
void pg_conn_release(struct pg_conn *pg); /* frees it when dead and not busy */
void pg_share_bury(struct pg_conn *pg);   /* frees the handles gone while busy */
struct pg_query *pg_conn_unlink(struct pg_conn *pg, struct pg_query *q);
void pg_conn_append(struct pg_conn *pg, struct pg_query *q); /* at the tail, counted */
void pg_query_free(struct pg_query *q);

/* pg_share.c: what the connection tells its handles. Each runs the
 * callbacks of every handle attached when it starts that is still attached
 * when its turn comes. */
void pg_share_connected(struct pg_conn *c);
void pg_share_lost(struct pg_conn *c, bool was_ready);
void pg_share_notify(struct pg_conn *c, const char *channel, const char *payload);
/* After the running query of h finished: a move that waited for it. */
void pg_share_query_done(struct pg *h);

#endif
