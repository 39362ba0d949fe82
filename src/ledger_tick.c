/* ledger_tick — the ledger's periodic tick: renew this replica's leases,
 * turn rows dead replicas left unfinished into `unknown`, name COMPLETED
 * jobs whose messages are still queued, prune old rows, and claim the
 * accepted jobs of replicas whose lease ran out (FOR UPDATE SKIP LOCKED)
 * for the tracker hook. See include/ledger.h; the SQL is in ledger_sql.c.
 * Knows nothing of reads, HTTP or the tracker's logic. */
#include "ledger_int.h"
#include "ledger_sql.h"
#include "log.h"
#include "metrics.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* What on_tick and on_claim do first: the ledger that sent the statement
 * (NULL when it was freed meanwhile: res is cleared), its in-progress flag
 * for `kind` (S_TICK or S_CLAIM) lowered, and an error logged as
 * failed_event. Returns the ledger when res holds rows to read, else NULL. */
static struct ledger *periodic_done(void *arg, PGresult *res, const struct pg_error *err,
				    enum stmt_kind kind, const char *failed_event)
{
	struct ledger *l = ledger_stmt_done(arg);

	if (l == NULL) {
		if (res)
			PQclear(res);
		return NULL;
	}
	if (kind == S_TICK)
		l->ticking = false;
	else
		l->claiming = false;
	if (err) {
		ledger_log_error(failed_event, err);
		return NULL;
	}
	return l;
}

static void on_tick(void *arg, PGresult *res, const struct pg_error *err)
{
	struct ledger *l = periodic_done(arg, res, err, S_TICK, "ledger_tick_failed");
	int rows;

	if (l == NULL)
		return;
	rows = PQntuples(res);
	for (int i = 0; i < rows; i++) {
		const char *kind = PQgetvalue(res, i, 0);
		struct log_line *ll;

		if (strcmp(kind, "pruned") == 0) {
			long pruned = strtol(PQgetvalue(res, i, 2), NULL, 10);
			if (pruned > 0) {
				ll = log_begin_route(l->cfg->route_name, LOG_DEBUG,
						     "ledger_pruned");
				log_int(ll, "rows", pruned);
				log_int(ll, "retention_days", l->cfg->ledger_retention_days);
				log_end(ll);
			}
		} else if (strcmp(kind, "unknown") == 0) {
			l->recovered++;
			metrics_inc_ledger_recovered_unknown();
			ll = log_begin_route(l->cfg->route_name, LOG_WARN,
					     "ledger_recovered_unknown");
			log_str(ll, "dispatch_id", PQgetvalue(res, i, 1));
			log_str(ll, "msg_ids", PQgetvalue(res, i, 2));
			log_str(ll, "outcome",
				"unknown: the replica that read them died before it "
				"recorded the outcome; they come back after their vt");
			log_end(ll);
		} else {
			metrics_inc_ledger_completed_undeleted();
			ll = log_begin_route(l->cfg->route_name, LOG_WARN,
					     "job_completed_messages_left");
			log_str(ll, "dispatch_id", PQgetvalue(res, i, 1));
			log_str(ll, "job_id", PQgetvalue(res, i, 3));
			log_str(ll, "msg_ids", PQgetvalue(res, i, 2));
			log_int(ll, "grace_s", l->cfg->ledger_completed_grace_s);
			log_str(ll, "msg",
				"the job COMPLETED but the worker did not delete or archive "
				"these messages: they come back after their vt");
			log_end(ll);
		}
	}
	PQclear(res);
}

static void on_claim(void *arg, PGresult *res, const struct pg_error *err)
{
	struct ledger *l = periodic_done(arg, res, err, S_CLAIM, "ledger_claim_failed");
	int rows;

	if (l == NULL)
		return;
	rows = PQntuples(res);
	for (int i = 0; i < rows; i++) {
		long long *ids = NULL;
		int n = ledger_parse_ids(PQgetvalue(res, i, 2), &ids);
		struct log_line *ll = log_begin_route(l->cfg->route_name, LOG_INFO, "job_claimed");

		metrics_inc_ledger_jobs_claimed();

		log_str(ll, "dispatch_id", PQgetvalue(res, i, 0));
		log_str(ll, "job_id", PQgetvalue(res, i, 1));
		log_str(ll, "msg_ids", PQgetvalue(res, i, 2));
		log_str(ll, "msg", "its replica's lease expired: this one follows the job now");
		log_end(ll);
		if (n > 0 && l->hooks.claimed && !l->stopped)
			l->hooks.claimed(l->hooks.arg, PQgetvalue(res, i, 0), PQgetvalue(res, i, 1),
					 ids, n, strtod(PQgetvalue(res, i, 3), NULL),
					 strtod(PQgetvalue(res, i, 4), NULL));
		free(ids);
	}
	PQclear(res);
}

static void on_tick_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct ledger *l = w->data;
	char sql[4096], lease[16], days[16], grace[16], table[80], qtable[96];
	const char *params[5] = { l->owner, lease, l->cfg->queue_name, days, grace };

	(void)loop;
	(void)revents;
	if (l->stopped || !l->ready || !pg_ready(l->pg))
		return;
	snprintf(lease, sizeof(lease), "%d", l->cfg->ledger_lease_s);
	snprintf(days, sizeof(days), "%d", l->cfg->ledger_retention_days);
	snprintf(grace, sizeof(grace), "%d", l->cfg->ledger_completed_grace_s);
	if (pgmq_table_name(l->cfg->queue_name, table, sizeof(table)) != 0)
		return;
	snprintf(qtable, sizeof(qtable), "pgmq.\"%s\"", table);
	if (!l->ticking) {
		snprintf(sql, sizeof(sql), LEDGER_TICK_SQL, l->cfg->ledger_schema, qtable);
		if (ledger_query(l, S_TICK, sql, 5, params, on_tick, NULL) == 0)
			l->ticking = true;
	}
	if (!l->claiming && l->cfg->tracker_enabled && l->hooks.claimed) {
		params[3] = l->cfg->endpoint_id;
		snprintf(sql, sizeof(sql), LEDGER_CLAIM_SQL, l->cfg->ledger_schema);
		if (ledger_query(l, S_CLAIM, sql, 4, params, on_claim, NULL) == 0)
			l->claiming = true;
	}
}

void ledger_schedule_tick(struct ledger *l, double after_s)
{
	double period = l->cfg->ledger_lease_s / 3.0;

	ev_timer_stop(l->loop, &l->tick);
	if (after_s <= 0.0) {
		/* Now: its statements go ahead of the first read on the connection. */
		on_tick_timer(l->loop, &l->tick, 0);
		after_s = period;
	}
	ev_timer_set(&l->tick, after_s, period);
	ev_timer_start(l->loop, &l->tick);
}

void ledger_tick_init(struct ledger *l)
{
	ev_init(&l->tick, on_tick_timer);
	l->tick.data = l;
}
