/* ledger — the durable dispatch ledger: one row per dispatch in
 * <ledger.schema>.dispatch, written in the same statement as the read
 * that claims its messages, then one state per transition (sending,
 * accepted, rejected, unknown, the job's statuses, lost, released,
 * archived, ...) with its time.
 *
 * Owns the SQL of the ledger on the shared pg connection: the migration
 * at start (migrate.h), the read wrapped in a CTE that inserts the row,
 * the split of one read into several rows when it becomes several /run
 * bodies or is partly archived, the batched state updates (one statement
 * for all transitions noted while the previous one ran), and a periodic
 * tick: renew this replica's leases, turn rows left `sending` by a dead
 * replica into `unknown` (logged with their msg ids), claim accepted jobs
 * whose lease expired (FOR UPDATE SKIP LOCKED) for the tracker, prune
 * finished rows older than retention_days in small batches.
 *
 * Knows nothing of HTTP, RunPod's formats or the tracker's logic: claimed
 * jobs go to a hook. */
#ifndef PGMQD_LEDGER_H
#define PGMQD_LEDGER_H

#include "config.h"
#include "pg.h"
#include "pgmq.h"

#include <ev.h>
#include <stdbool.h>
#include <stddef.h>

#define LEDGER_ID_LEN 36       /* a UUID as text */
#define LEDGER_MAX_NOTES 1024  /* transitions waiting for their statement */
#define LEDGER_ERROR_BYTES 256 /* error excerpt kept per row */
#define LEDGER_STATE_MAX 32    /* bytes of a state (RunPod's status strings included) */
#define LEDGER_JOB_MAX 128     /* bytes of a RunPod job id */
#define LEDGER_CLAIM_BATCH 100 /* jobs claimed per tick */
#define LEDGER_PRUNE_BATCH 500 /* rows pruned per tick */
/* A transition waits at most this long (seconds) for others to share its
 * statement: one statement per tick of this length instead of one per
 * dispatch, which is most of the ledger's cost (each is parsed and planned). */
#define LEDGER_FLUSH_DELAY_S 0.02
#define LEDGER_FLUSH_AT 64 /* ...or until this many wait */

struct ledger;

struct ledger_hooks {
	void (*ready)(void *arg);   /* the schema is up to date: reads may start */
	void (*fatal)(void *arg);   /* the schema cannot be used (logged): stop */
	void (*settled)(void *arg); /* a write finished: ledger_busy may have changed */
	/* An accepted job whose lease this replica took: follow it. vt_left_s
	 * is what the ledger last knew of its vt (may be <= 0); age_s how long
	 * ago /run accepted it (its row's `accepted`, else its read). */
	void (*claimed)(void *arg, const char *dispatch_id, const char *job_id,
			const long long *ids, int n, double vt_left_s, double age_s);
	void *arg;
};

/* A new ledger on pg (owned by the caller, outliving the ledger). cfg
 * must outlive it or the next ledger_reload. NULL when out of memory. */
struct ledger *ledger_new(struct ev_loop *loop, const struct config *cfg, struct pg *pg,
			  const struct ledger_hooks *hooks);

/* After every (re)connect: migrates once, then starts the tick. */
void ledger_connected(struct ledger *l);

/* True once reads may start: the schema is up to date, or the role may
 * not migrate it (logged once: reads then go on without the ledger, as
 * with ledger.enabled = off, and the migration is tried again after each
 * reconnect). NULL-safe (true). */
bool ledger_ready(const struct ledger *l);

/* True when reads are recorded (the schema is up to date). */
bool ledger_recording(const struct ledger *l);

/* True while a statement of the ledger is outstanding or notes wait. */
bool ledger_busy(const struct ledger *l);

/* Rows left `sending` by dead replicas turned `unknown` since start. */
unsigned long long ledger_recovered_unknown(const struct ledger *l);

/* A random (version 4) UUID as text into out[LEDGER_ID_LEN + 1]. */
void ledger_new_id(char *out);

/* The read statement: read_function's rows (columns as pgmq_read, in
 * msg_id order) and, in the same statement, one `sending` row per part of
 * part_rows of them (the read's /run bodies), the k-th under the k-th
 * dispatch id. Pure. */
int ledger_read_sql(const char *schema, const char *read_function, char *buf, size_t len);

/* Queues the read of up to qty messages for vt_seconds with its ledger
 * rows: rows [k * part_rows, (k + 1) * part_rows) of the result under
 * ids[k]; nids must be at least ceil(qty / part_rows). ids are copied.
 * Returns 0 or -1 (fn is then not called). */
int ledger_read(struct ledger *l, const char (*ids)[LEDGER_ID_LEN + 1], int nids, int part_rows,
		int vt_seconds, int qty, pgmq_read_fn fn, void *arg)
	__attribute__((warn_unused_result));

/* One part of a read that becomes several rows. */
struct ledger_part {
	const char *dispatch_id; /* the read's id for the first part */
	const char *state;       /* "sending", "archiving", "releasing" */
};

/* Re-cuts the read's row read_id into nparts rows: msg ids[i] belongs to
 * part part_of[i] (0-based; -1: not in any). Queued before the parts'
 * transitions, so it commits first. Failure is logged. */
void ledger_split(struct ledger *l, const char *read_id, const struct ledger_part *parts,
		  int nparts, const long long *ids, const int *part_of, int n);

/* pgmq.archive of msg ids[0..n) and, in the same statement, its record: dispatch_id's row ends `archived` (its noted
 * transitions are written first), or a new row holds them when
 * dispatch_id is NULL or "" or has no row. http_status 0 and error NULL
 * when unknown; reason (e.g. "max_read_ct") joins the row's history. fn
 * gets the count archived as from pgmq_archive(). Only while
 * ledger_recording(). Returns 0, or -1 when not queued (fn is then not
 * called). */
int ledger_archive(struct ledger *l, const char *dispatch_id, const long long *ids, int n,
		   long http_status, const char *error, size_t error_len, const char *reason,
		   pgmq_count_fn fn, void *arg) __attribute__((warn_unused_result));

/* Notes a transition of dispatch_id to state at the time now (epoch
 * seconds). http_status 0, job_id and error NULL when unknown; error is
 * cut to LEDGER_ERROR_BYTES. held: the row stays leased by its replica
 * (a job being followed). Written with the next batched statement, at
 * most LEDGER_FLUSH_DELAY_S later (at once after ledger_stop). */
void ledger_note(struct ledger *l, const char *dispatch_id, const char *state, long http_status,
		 const char *job_id, const char *error, size_t error_len, bool held);

/* Shutdown: no more ticks; notes already taken are still written (now). */
void ledger_stop(struct ledger *l);
void ledger_reload(struct ledger *l, const struct config *cfg);
/* Frees; callbacks of statements in flight stay safe. NULL-safe. */
void ledger_free(struct ledger *l);

/* ---- pure helpers (unit-tested) ---- */

/* Appends s as one element of a PostgreSQL array literal ("…" with " and
 * \ escaped; NULL as NULL; bytes outside printable ASCII as '?') to buf
 * at *used, at most max bytes of s. Returns 0 or -1 when it does not fit. */
int ledger_array_elem(char *buf, size_t cap, size_t *used, const char *s, size_t max);

#endif
