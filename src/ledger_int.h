/* ledger_int.h — the ledger's state shared by ledger.c (migration, read,
 * notes, split, life) and ledger_tick.c (leases, recovery, retention,
 * claims). Private to those two files. */
#ifndef PGMQD_LEDGER_INT_H
#define PGMQD_LEDGER_INT_H

#include "ledger.h"

struct note {
	char id[LEDGER_ID_LEN + 1];
	char state[LEDGER_STATE_MAX + 1];
	long http;
	char job[LEDGER_JOB_MAX + 1];
	char *err; /* malloc'd excerpt or NULL */
	size_t err_len;
	double at;
	bool held;
};

enum stmt_kind { S_MIGRATE, S_NOTES, S_SPLIT, S_TICK, S_CLAIM };

/* One statement in flight; outlives the ledger if need be. */
struct stmt {
	struct ledger *l; /* NULL once the ledger is freed */
	struct stmt *prev, *next;
	enum stmt_kind kind;
	int n; /* notes written */
};

struct ledger {
	struct ev_loop *loop;
	const struct config *cfg;
	struct pg *pg;
	struct ledger_hooks hooks;
	char owner[LEDGER_ID_LEN + 1];
	bool ready, migrating, stopped, ticking, claiming;
	int flushing;  /* notes statements in flight (in order on the one connection) */
	bool degraded; /* the role may not migrate: reads go on without the ledger */
	ev_timer tick;
	ev_timer flush_timer; /* LEDGER_FLUSH_DELAY_S after the first waiting note */
	struct note notes[LEDGER_MAX_NOTES];
	int nnotes;
	struct stmt *stmts;
	int in_flight;
	unsigned long long recovered;
};

/* Queues sql on the ledger's connection as a statement of kind; fn gets
 * the stmt as its arg (out: it too, may be NULL). Returns 0 or -1. */
int ledger_query(struct ledger *l, enum stmt_kind kind, const char *sql, int nparams,
		 const char *const *params, pg_result_fn fn, struct stmt **out);
/* Unlinks s and frees it; returns its ledger (NULL when the ledger is gone). */
struct ledger *ledger_stmt_done(struct stmt *s);
/* One error line: event, sqlstate, error. */
void ledger_log_error(const char *event, const struct pg_error *err);

/* ledger_tick.c: sets up the tick timer (once, in ledger_new). */
void ledger_tick_init(struct ledger *l);
/* (Re)starts the tick after after_s, then every lease_s / 3; after_s 0:
 * the tick's statements are queued at once (ahead of a read queued next). */
void ledger_schedule_tick(struct ledger *l, double after_s);

#endif
