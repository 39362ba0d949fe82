/* tracker_int — what tracker.c and tracker_reply.c share and nothing else
 * sees: the tracker's state, its job records and request contexts, and the
 * steps both files take. Not a public interface; see include/tracker.h. */
#ifndef PGMQD_TRACKER_INT_H
#define PGMQD_TRACKER_INT_H

#include "tracker.h"
#include "http.h"
#include "jobtable.h"
#include "log.h"
#include "pg.h"
#include "ratelimit.h"
#include "runpod.h"

#define DUE_SLACK_S 0.001 /* a timer may fire a hair early; that counts as due */
#define DB_RETRY_S 1.0    /* retry of a statement that could not be queued or failed */
#define BODY_EXCERPT_BYTES 256
#define N_SLOTS 4 /* enum metrics_tracked_status */

enum jstate {
	J_LIVE,    /* polled; heartbeats while non-terminal */
	J_RELEASE, /* FAILED/CANCELLED/TIMED_OUT: waits for a database slot to release */
};

struct tjob {
	struct jt_node node; /* in the tracker's jobtable; node.id points at id */
	char id[RUNPOD_JOB_ID_MAX + 1];
	char dispatch_id[40];               /* the ledger's row, "" when none */
	char status[RUNPOD_STATUS_MAX + 1]; /* last seen; IN_QUEUE from the /run reply */
	long long *ids;                     /* the messages the job carries (for the log) */
	int n;
	long long *live; /* those still in the heartbeat (same allocation) */
	int n_live;
	enum jstate state;
	int slot;           /* metrics slot counted for it, -1 when none */
	int vt_len;         /* seconds of the vt last set (by the read or a heartbeat) */
	ev_tstamp vt_until; /* when that vt runs out: an estimate on the early side */
	ev_tstamp seen_at;  /* last time RunPod said the job is alive */
	bool polling;       /* a /status request is in flight */
	bool db_busy;       /* a heartbeat statement is in flight */
	bool hb_parked;     /* heartbeats paused: /status silent for too long */
	bool hb_ceiling;    /* heartbeats ended for good: max_heartbeat_s reached */
	ev_tstamp added_at; /* when /run accepted it (ev_now, Unix time) */
};

enum op_kind { OP_STATUS, OP_HEARTBEAT, OP_RELEASE, OP_HEALTH };

/* The context of one request or statement. It names its job by id, never
 * by pointer: the job may be evicted or finished before the answer comes. */
struct op {
	struct tracker *t; /* NULL once the tracker is freed */
	struct op *prev, *next;
	enum op_kind kind;
	char job_id[RUNPOD_JOB_ID_MAX + 1]; /* "" for OP_HEALTH */
	char dispatch_id[40];
	ev_tstamp sent_at;
	int delay_s;
	long long *ids; /* statements: the ids sent */
	int n;
};

struct tracker {
	struct ev_loop *loop;
	const struct config *cfg;
	struct http *http;
	struct pg *pg;
	ev_timer timer;
	bool enabled, stopped;
	char *auth_header;    /* "Authorization: Bearer <key>", from runpod_auth_header */
	struct jobtable jobs; /* JT_POLL: next /status; JT_DB: next heartbeat or release */
	int status_in_flight, db_in_flight;
	struct ratelimit status_rl; /* max_status_per_10s, sliding window */
	struct budget *budget;      /* the fleet's share of it, NULL unless fleet.enabled */
	ev_tstamp paused_until;     /* after a 429 */
	bool failing;               /* /status failing: warned once per streak */
	long by_slot[N_SLOTS];
	struct op *ops;
	void (*wake)(void *arg, double after_s); /* a read is due then */
	void *wake_arg;
	tracker_observer_fn observe; /* a job's dispatch changed state */
	void *observe_arg;

	/* GET /health (tracker_health.c), polled while jobs are tracked */
	char health_url[2048]; /* "" when it does not fit: no polls */
	bool health_polling;   /* a /health request is in flight */
	bool health_failing;   /* /health failing: warned once per streak */
	bool unhealthy_warned; /* runpod_workers_unhealthy said, not yet recovered */
	ev_tstamp health_due;  /* next /health poll */
};

/* Tells the observer (the ledger) that j's dispatch is now in state. */
void tracker_observe(const struct tracker *t, const struct tjob *j, const char *state,
		     const char *error);

/* The job named id, or NULL. */
struct tjob *tracker_job_find(const struct tracker *t, const char *id);
/* Takes j out of the table and the metrics, and frees it. */
void tracker_job_remove(struct tracker *t, struct tjob *j);
/* Counts j under a metrics slot (-1: none). */
void tracker_set_slot(struct tracker *t, struct tjob *j, int slot);
/* Adds msg_ids=... for ids[0..n) to l (NULL-safe), at most TRACKER_IDS_PER_LINE named. */
void tracker_log_ids(struct log_line *l, const long long *ids, int n);
/* Schedules the next /status of a live job one jittered interval after now. */
void tracker_poll_later(struct tracker *t, struct tjob *j, ev_tstamp now);
/* Schedules j's database action (heartbeat or release) at when. */
void tracker_db_at(struct tracker *t, struct tjob *j, ev_tstamp when);
/* Schedules j's next heartbeat when it is due one. */
void tracker_schedule_heartbeat(struct tracker *t, struct tjob *j);
/* A request or statement context for j (NULL for /health), linked into
 * t's list; NULL when out of memory. */
struct op *tracker_op_new(struct tracker *t, enum op_kind kind, const struct tjob *j);
/* Unlinks and frees a request or statement context. */
void tracker_op_free(struct op *op);
/* Re-arms the tracker's timer for its next due work. */
void tracker_arm(struct tracker *t);

/* The answers, in tracker_reply.c: http and pg callbacks with an op. */
void tracker_on_status(void *arg, const struct http_response *r);
void tracker_on_db(void *arg, const long long *ids, int n, const struct pg_error *err);
/* The /health answer, in tracker_health.c. */
void tracker_on_health(void *arg, const struct http_response *r);

/* /health, in tracker_health.c. */
/* When the next /health poll is due: INFINITY when none is wanted (no job
 * tracked, one in flight, or no URL). */
ev_tstamp tracker_health_at(const struct tracker *t);

/* Slots of the /status window that polls leave free for /health: its
 * share while /health is polled, 0 otherwise. */
int tracker_health_keep(const struct tracker *t);
/* Starts a /health request (the caller took a slot of the /status limiter). */
void tracker_health_start(struct tracker *t, ev_tstamp now);
/* The IN_QUEUE count went from before to its current value: the oldest
 * IN_QUEUE gauge follows, and a read is asked for when reads may have
 * paused at max_queued_jobs. */
void tracker_queued_changed(struct tracker *t, long before);

#endif
