/* dispatcher_int — the dispatcher's state, shared by the files it is split
 * into: dispatcher.c (pipeline, drain, lifecycle), reload.c (the
 * all-or-nothing reload), batch.c (batch lifecycle and its one teardown),
 * post.c (/run: rate cap, outcomes), circuit.c (breaker, /health
 * probes, the max_queued_jobs pause), wakeup.c (NOTIFY and idle polls),
 * overflow.c (rows at the read_ct limit), dryrun.c. Private: nothing outside those files includes it (unit tests
 * aside). Owns no code; knows no wire formats. */
#ifndef PGMQD_DISPATCHER_INT_H
#define PGMQD_DISPATCHER_INT_H

#include "budget.h"
#include "dispatcher.h"
#include "endpoint.h"
#include "ledger.h"
#include "metrics.h"
#include "pgmq.h"
#include "ratelimit.h"
#include "runpod.h"
#include "tracker.h"

#include <ev.h>
#include <stdbool.h>

/* queue.read_batches' maximum: the /run bodies, and ledger rows, one read
 * may make. */
#define READ_MAX_BODIES 200

/* Why reads are paused. */
enum pause_reason { PAUSE_NONE, PAUSE_DB, PAUSE_RUNPOD };

/* LISTEN state of the connection that listens. */
enum notify_state {
	NOTIFY_OFF,     /* not listening (off, or connection down) */
	NOTIFY_TESTING, /* LISTEN sent, waiting for the self-test NOTIFY from another session */
	NOTIFY_OK,      /* notifications arrive: idle polls may back off */
	NOTIFY_BROKEN,  /* they do not (transaction pooler): poll only */
};

/* NOTIFY wake-up and idle back-off (wakeup.c). */
struct wakeup {
	struct pg *listen_pg; /* separate LISTEN connection, or NULL */
	char table[80];       /* q_<lower(queue)>: the queue table in schema pgmq */
	char channel[96];     /* pgmq.q_<lower(queue)>.INSERT (pgmq 1.7 - 1.13.0) */
	char channel2[96];    /* pgmq.q_<queue as created>.INSERT (1.13.1), if different */
	bool has_trigger;     /* the queue table has an enabled trigger on INSERT */
	bool no_trigger_logged;
	bool missing_logged; /* the queue table does not exist (logged once) */
	bool trigger_check_pending;
	double trigger_checked_at; /* ev_now of the last trigger check */
	char selftest[64];         /* payload of this round's self-test notification */
	unsigned selftest_seq;
	struct notify_sender *sender; /* the other session sending it, or NULL */
	enum notify_state notify_state;
	bool notify_broken_logged;
	double idle_poll_ms; /* current poll period (backs off while idle) */
};

/* Derived from one configuration snapshot; built whole before it is used
 * (dispatcher_reload), so a failure leaves the old one in effect. */
struct dispatcher_conf {
	const struct config *cfg;
	char run_url[2048];
	char health_url[2048];
	char *auth_header;               /* "Authorization: Bearer <key>", malloc'd */
	struct runpod_envelope envelope; /* the /run body around its jobs */
};

struct dispatcher {
	struct ev_loop *loop;
	const struct config *cfg; /* == conf.cfg */
	struct dispatcher_conf conf;
	struct pg *pg;
	struct pg_pool *pool; /* the routes' shared connections, or NULL */
	struct http *http;
	bool http_shared;        /* the routes' one multi handle: not ours to free */
	struct tracker *tracker; /* NULL unless [tracker] enabled */
	struct ledger *ledger;   /* NULL unless ledger.enabled */
	/* Dispatch ids of the read outstanding, one per body it may make. */
	char read_ids[READ_MAX_BODIES][LEDGER_ID_LEN + 1];
	int nread_ids; /* 0: the read is not recorded */
	int read_qty;  /* what it asked for */
	bool backlog;  /* the last read came back full: more waits */
	bool fatal;    /* the ledger cannot be used: stop, exit nonzero */
	bool once;
	dispatcher_done_fn done;
	void *done_arg;

	/* Every timer, so that one loop stops them all (dispatcher.c). */
	ev_timer poll;        /* periodic trigger */
	ev_timer pause;       /* reads paused until it fires (backoff) */
	ev_timer probe;       /* next /health probe while the circuit is open */
	ev_timer deadline;    /* shutdown deadline */
	ev_timer stats_timer; /* queue metrics refresh and STATUS counts */
	ev_timer debounce;    /* a burst of NOTIFYs becomes one read */
	ev_timer wake_timer;  /* a read when released messages come back */
	ev_timer selftest_timer;
	ev_timer rate_timer; /* a rate slot frees */
	ev_timer gather;     /* a drain read waits this long for more free slots */

	void (*state_hook)(void *arg);
	void *state_arg;
	bool connected_once;
	bool metrics_pending;   /* a pgmq.metrics query is outstanding */
	long long queue_length; /* from the last pgmq.metrics, -1 unknown */
	enum pause_reason pause_reason;
	bool reading;
	bool read_wanted;  /* a drain read waits for an in-flight slot */
	bool gather_over;  /* the wait for more free slots is over: read what is free */
	bool queue_capped; /* reads pause: tracker.max_queued_jobs jobs wait IN_QUEUE */
	bool again;        /* a trigger arrived during a read */
	bool stopping;
	bool finished;
	bool read_done; /* a read came back (what --once waits for) */
	bool circuit_open;
	bool deadline_passed; /* shutdown: stop waiting for the database */
	bool probing;         /* a /health request is in flight */
	int probe_failures;
	ev_tstamp circuit_opened_at;   /* ev_now when the circuit opened */
	ev_tstamp circuit_reminded_at; /* last circuit_still_open line (or the opening) */
	int in_flight;                 /* /run requests outstanding (waiting ones included) */
	int db_pending;                /* set_vt / archive statements outstanding */
	int failures;                  /* consecutive failures behind the current pause */
	enum dispatcher_result once_result;

	struct dispatcher_stats stats;
	struct wakeup w;

	/* Runtime control (control.c) and the route's metrics slot. */
	int mroute;
	enum metrics_route_state ctl;
	bool ctl_loaded; /* the persisted state was looked up: reads may start */
	bool ctl_loading;
	/* A command came before the lookup: stored (and kept over what
	 * the lookup finds) once the lookup, after the migration, is done. */
	bool ctl_store_pending;
	bool drain_stale_read; /* the read out at a drain command may predate new rows */

	/* /run rate cap (post.c) */
	struct endpoint *ep; /* shared with other routes (endpoint.c), or NULL */
	bool ep_wanted;      /* a read waits for the endpoint's ceiling or priority */
	struct ratelimit rl;
	struct budget *budget; /* the fleet's share of it, NULL unless fleet.enabled */
	struct batch *waiting, *waiting_tail; /* read, waiting for a rate slot */
	int nwaiting;
};

/* The rows of one read, shared by the batches it was split into. */
struct read_result {
	struct pgmq_batch rows;
	int refs;
	int part_rows; /* rows per ledger row (batch_size when read) */
	int nids;      /* 0 when not recorded */
	/* The ledger rows the read made: rows [k * part_rows, ...) under the
	 * k-th (ledger_read). */
	char dispatch_ids[READ_MAX_BODIES][LEDGER_ID_LEN + 1];
};

/* Messages on their way to one outcome: a /run request, a release or an
 * archive. msgs point into rr's PGresult. */
struct batch {
	struct dispatcher *d;
	struct batch *next; /* in the rate-cap waiting list */
	enum metrics_archive_reason archive_reason;
	struct read_result *rr;
	struct pgmq_message *msgs;
	long long *ids;
	int n;
	size_t body_bytes; /* of the last /run body sent for it */
	ev_tstamp started;
	ev_tstamp read_at;                   /* when the read returned: the vt runs from here */
	char dispatch_id[LEDGER_ID_LEN + 1]; /* its ledger row, "" when off */
	/* What batch_end records in the ledger with the fate. */
	long http_status;
	const char *job_id;
	const char *error;
	size_t error_len;
	bool recorded; /* its archive statement writes its ledger state too */
};

/* dispatcher.c */

/* What the finish decision looks at. busy: a read, a request, a statement,
 * a probe or a metrics query is outstanding. */
struct finish_inputs {
	bool finished, once, read_done, stopping, deadline_passed, busy;
};

/* True when a --once cycle or a shutdown is over and done() must run. Pure. */
bool dispatcher_should_finish(const struct finish_inputs *f);
void dispatcher_kick(struct dispatcher *d);
/* Splits the rows of a read into /run requests, archives and releases
 * (batch.c). */
void batch_dispatch_rows(struct dispatcher *d, struct read_result *rr);
/* The read's callback (pgmq_read_fn); takes rows. Not static so that a
 * unit test can hand it a read. */
void dispatcher_on_read(void *arg, struct pgmq_batch *rows, const struct pg_error *err);
/* Finishes (stops every timer, calls done) when dispatcher_should_finish
 * says so; shutdown.c. */
void dispatcher_maybe_finish(struct dispatcher *d);

/* Stops every timer of d but keep (NULL: all); dispatcher.c. */
void dispatcher_stop_timers(struct dispatcher *d, const ev_timer *keep);

/* The shutdown deadline fired: aborts the requests still in flight and
 * stops waiting for the database; shutdown.c. */
void dispatcher_on_deadline(struct ev_loop *loop, ev_timer *w, int revents);
/* The tracker's observer: a job's state into the ledger. */
void dispatcher_tracker_state(void *arg, const char *dispatch_id, const char *state,
			      const char *error);
void dispatcher_state_changed(struct dispatcher *d);
double dispatcher_back_off(struct dispatcher *d, enum pause_reason why, double hint_ms);

/* control.c */

/* Aborts the requests of this dispatcher and its tracker (only theirs: the
 * multi handle may be shared); each ends as outcome unknown. */
void dispatcher_cancel_requests(struct dispatcher *d);

/* The next read state after cmd (pause, resume, drain, or CONTROL_EMPTY:
 * a read found the queue empty). Pure. */
enum metrics_route_state control_next(enum metrics_route_state cur, enum dispatcher_control cmd);
/* True when the route's state lets a read start. Pure. */
bool control_may_read(enum metrics_route_state s);
/* After every connect: looks the persisted state up once, then kicks. */
void control_load(struct dispatcher *d);
/* A read came back empty: a drain is over. */
void control_on_empty(struct dispatcher *d);

/* reload.c */

/* What a reload changes that needs more than a pointer swap. */
struct reload_diff {
	bool rate_cap;    /* max_requests_per_10s changed: a new ring */
	bool conninfo;    /* the connection follows the new conninfo */
	bool new_tracker; /* [tracker] turned on: a tracker to build */
	bool runpod;      /* key, endpoint, base URL or CA changed: probe an open circuit now */
};

/* The diff from old to cfg for a dispatcher that has a tracker or not,
 * runs --once or not, is stopping or not. Pure. */
struct reload_diff dispatcher_reload_diff(const struct config *old, const struct config *cfg,
					  bool have_tracker, bool once, bool stopping);

/* Builds out (URLs, auth header, envelope) from cfg; out is cleared
 * first and the caller's other state untouched. 0, or -1 (logged). */
int dispatcher_conf_build(struct dispatcher_conf *out, const struct config *cfg);
void dispatcher_conf_free(struct dispatcher_conf *c);

/* Gives a timer a new repeat period_s keeping its phase: the next fire
 * comes period_s after the last one (at once if that is past), not
 * period_s from now. An inactive timer only takes the new repeat. */
void dispatcher_timer_retime(struct ev_loop *loop, ev_timer *t, double period_s);

/* The /run extras (webhook, policy) of a snapshot; points into cfg. */
struct runpod_extras dispatcher_extras_of(const struct config *cfg);

/* post.c: queues a batch behind the rate cap (it counts as in flight). */
void post_batch(struct dispatcher *d, struct batch *b);
/* Messages the next read may claim (batch_read_qty with this route's
 * free slots and the /run rate budget of the next second; one batch for
 * --once). */
int post_read_qty(const struct dispatcher *d);
/* True when a drain read should wait for more free slots first
 * (batch_read_waits); starts the gather timer, whose end lets the read
 * take what is free then. */
bool post_read_waits(struct dispatcher *d);
void post_on_gather_timer(struct ev_loop *loop, ev_timer *w, int revents);
/* Hands batches that never went out back to the queue (shutdown). */
void post_release_waiting(struct dispatcher *d);
/* Drops batches that never went out, logging their ids (exit). */
void post_drop_waiting(struct dispatcher *d);
void post_on_rate_timer(struct ev_loop *loop, ev_timer *w, int revents);
/* The fleet budget's ready hook: slots may be free again. */
void post_on_budget(void *arg);
/* Sends waiting batches while the rate caps let them (the endpoint's when
 * the route shares one). */
void post_send_waiting(struct dispatcher *d);
/* Pops the first waiting batch and sends it now; false when it could not
 * start (released, nothing sent). The caller checked the caps. */
bool post_send_next(struct dispatcher *d);
/* True when this route's own cap lets its first waiting batch go now;
 * otherwise arms its rate timer for when it will. */
bool post_own_slot(struct dispatcher *d, double now);

/* endpoint.c: the budget shared with the other routes of the endpoint
 * (include/endpoint.h). d->ep is set. */
/* Sends the members' waiting batches in priority order while the shared
 * cap lets them. */
void endpoint_pump(struct endpoint *ep);
/* Whether d may start a read under the endpoint's in-flight ceiling and
 * the priority of the other routes' waiting reads. */
bool endpoint_may_read(const struct endpoint *ep, const struct dispatcher *d);
/* A slot came free (a request ended, a read came back): the routes whose
 * reads wait are kicked, lowest priority number first. */
void endpoint_slot_freed(struct endpoint *ep);
/* Free in-flight slots and /run sends available within horizon_s at the
 * endpoint. */
int endpoint_free_slots(const struct endpoint *ep);
int endpoint_rate_available(const struct endpoint *ep, double now, double horizon_s);

/* overflow.c: after a read failed with 22003, finds the rows at the
 * read_ct limit, logs them with the way out, archives them when
 * max_read_ct is on. Counts in db_pending while its statements run. */
void overflow_find(struct dispatcher *d);

/* circuit.c */
void circuit_open(struct dispatcher *d, long http_status);
void circuit_probe_now(struct dispatcher *d);
void circuit_reload(struct dispatcher *d);
void circuit_on_probe_timer(struct ev_loop *loop, ev_timer *w, int revents);
/* tracker.max_queued_jobs: true while reads pause because that many jobs
 * wait IN_QUEUE (in-flight /run counted); logs each change once, sets the
 * gauge and STATUS=. */
bool circuit_queue_capped(struct dispatcher *d);

/* wakeup.c */
int wakeup_init(struct dispatcher *d, const struct config *cfg);
void wakeup_start_listen(struct dispatcher *d, struct pg *pg);
void wakeup_listen_lost(struct dispatcher *d);
/* Frees the LISTEN connection and a self-test still being sent. */
void wakeup_free(struct dispatcher *d);
void wakeup_reset_idle(struct dispatcher *d);
/* After a reload: the poll period within the new bounds, phase kept. */
void wakeup_reload(struct dispatcher *d);
void wakeup_idle_read(struct dispatcher *d);
void wakeup_after(void *arg, double after_s);
void wakeup_on_notify(void *arg, const char *channel, const char *payload);
void wakeup_on_debounce(struct ev_loop *loop, ev_timer *w, int revents);
void wakeup_on_wake_timer(struct ev_loop *loop, ev_timer *w, int revents);
void wakeup_on_selftest_timeout(struct ev_loop *loop, ev_timer *w, int revents);

#endif
