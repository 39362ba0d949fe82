/* ledger — see include/ledger.h. */
#include "ledger_int.h"
#include "log.h"
#include "ledger_sql.h"
#include "migrate.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static struct stmt *stmt_new(struct ledger *l, enum stmt_kind kind)
{
	struct stmt *s = calloc(1, sizeof(*s));

	if (s == NULL)
		return NULL;
	s->l = l;
	s->kind = kind;
	s->next = l->stmts;
	if (l->stmts)
		l->stmts->prev = s;
	l->stmts = s;
	l->in_flight++;
	return s;
}

struct ledger *ledger_stmt_done(struct stmt *s)
{
	struct ledger *l = s->l;

	if (l) {
		if (s->prev)
			s->prev->next = s->next;
		else
			l->stmts = s->next;
		if (s->next)
			s->next->prev = s->prev;
		l->in_flight--;
	}
	free(s);
	return l;
}

int ledger_query(struct ledger *l, enum stmt_kind kind, const char *sql, int nparams,
		 const char *const *params, pg_result_fn fn, struct stmt **out)
{
	struct stmt *s = stmt_new(l, kind);

	if (s == NULL)
		return -1;
	if (pg_query(l->pg, sql, nparams, params, fn, s) != 0) {
		ledger_stmt_done(s);
		return -1;
	}
	if (out)
		*out = s;
	return 0;
}

void ledger_log_error(const char *event, const struct pg_error *err)
{
	struct log_line *l = log_begin(LOG_ERROR, event);

	log_str(l, "sqlstate", err->sqlstate);
	log_str(l, "error", err->message);
	log_end(l);
}

/* ---- migration ---- */

static void on_migrated(void *arg, PGresult *res, const struct pg_error *err)
{
	struct ledger *l = ledger_stmt_done(arg);
	char line[1024];

	if (res)
		PQclear(res);
	if (l == NULL)
		return;
	l->migrating = false;
	if (err && err->connection_lost) {
		if (l->hooks.settled)
			l->hooks.settled(l->hooks.arg);
		return; /* again after the reconnect */
	}
	if (err && strcmp(err->sqlstate, "42501") == 0) {
		/* A role that may not create the schema: today's behaviour,
		 * loudly, rather than a daemon that no longer starts after an
		 * upgrade. Tried again after each reconnect. */
		if (!l->degraded) {
			struct log_line *ll = log_begin_route(l->cfg->route_name, LOG_ERROR,
							      "ledger_unavailable");
			migrate_explain(l->cfg->ledger_schema, err->sqlstate, err->message, line,
					sizeof(line));
			log_str(ll, "schema", l->cfg->ledger_schema);
			log_str(ll, "error", line);
			log_str(ll, "outcome",
				"dispatching without the ledger until it is migrated");
			log_end(ll);
		}
		l->degraded = true;
		if (l->hooks.ready)
			l->hooks.ready(l->hooks.arg);
		return;
	}
	if (err) {
		struct log_line *ll = log_begin_route(l->cfg->route_name, LOG_ERROR,
						      "ledger_unusable");
		migrate_explain(l->cfg->ledger_schema, err->sqlstate, err->message, line,
				sizeof(line));
		log_str(ll, "schema", l->cfg->ledger_schema);
		log_str(ll, "sqlstate", err->sqlstate);
		log_str(ll, "error", line);
		log_end(ll);
		if (l->hooks.fatal)
			l->hooks.fatal(l->hooks.arg);
		return;
	}
	l->ready = true;
	l->degraded = false;
	{
		struct log_line *ll = log_begin_route(l->cfg->route_name, LOG_INFO, "ledger_ready");
		log_str(ll, "schema", l->cfg->ledger_schema);
		log_int(ll, "version", MIGRATE_VERSION);
		log_str(ll, "owner", l->owner);
		log_end(ll);
	}
	ledger_schedule_tick(l, 0.0); /* recovery first */
	if (l->hooks.ready)
		l->hooks.ready(l->hooks.arg);
}

void ledger_connected(struct ledger *l)
{
	char *sql;

	if (l == NULL || l->stopped)
		return;
	if (l->ready) {
		ledger_schedule_tick(l, 0.0);
		return;
	}
	if (l->migrating)
		return;
	sql = migrate_sql(l->cfg->ledger_schema, MIGRATE_VERSION);
	if (sql == NULL || ledger_query(l, S_MIGRATE, sql, 0, NULL, on_migrated, NULL) != 0) {
		log_msg_route(l->cfg->route_name, LOG_ERROR, "ledger_unusable",
			      "cannot queue the ledger migration");
		free(sql);
		if (l->hooks.fatal)
			l->hooks.fatal(l->hooks.arg);
		return;
	}
	free(sql);
	l->migrating = true;
}

/* ---- the read ---- */

int ledger_read(struct ledger *l, const char (*ids)[LEDGER_ID_LEN + 1], int nids, int part_rows,
		int vt_seconds, int qty, pgmq_read_fn fn, void *arg)
{
	char sql[2048], vt[16], n[16], lease[16], per[16];
	char *arr = malloc((size_t)nids * (LEDGER_ID_LEN + 1) + 3);
	const char *params[8] = { l->cfg->queue_name,  vt,       n,     arr,
				  l->cfg->endpoint_id, l->owner, lease, per };
	size_t u = 1;
	int rc;

	if (arr == NULL || nids < 1 || part_rows < 1 ||
	    ledger_read_sql(l->cfg->ledger_schema, l->cfg->read_function, sql, sizeof(sql)) != 0) {
		free(arr);
		return -1;
	}
	arr[0] = '{';
	for (int i = 0; i < nids; i++) {
		if (i > 0)
			arr[u++] = ',';
		memcpy(arr + u, ids[i], LEDGER_ID_LEN);
		u += LEDGER_ID_LEN;
	}
	memcpy(arr + u, "}", 2);
	snprintf(vt, sizeof(vt), "%d", vt_seconds);
	snprintf(n, sizeof(n), "%d", qty);
	snprintf(lease, sizeof(lease), "%d", l->cfg->ledger_lease_s);
	snprintf(per, sizeof(per), "%d", part_rows);
	rc = pgmq_read_query(l->pg, sql, 8, params, fn, arg);
	free(arr);
	return rc;
}

/* ---- notes ---- */

static void flush(struct ledger *l, bool force);

static void on_notes(void *arg, PGresult *res, const struct pg_error *err)
{
	struct stmt *s = arg;
	int n = s->n;
	struct ledger *l = ledger_stmt_done(s);

	if (res)
		PQclear(res);
	if (l == NULL)
		return;
	l->flushing--;
	if (err) {
		struct log_line *ll = log_begin_route(l->cfg->route_name, LOG_ERROR,
						      "ledger_write_failed");
		log_int(ll, "transitions", n);
		log_str(ll, "sqlstate", err->sqlstate);
		log_str(ll, "error", err->message);
		log_str(ll, "outcome", "those rows keep their previous state");
		log_end(ll);
	}
	/* Notes taken meanwhile go now, unless their delay still runs. */
	if (!ev_is_active(&l->flush_timer))
		flush(l, false);
	if (!ledger_busy(l) && l->hooks.settled)
		l->hooks.settled(l->hooks.arg);
}

/* Writes every waiting note in one statement (when none is running, or
 * at once when forced: statements run in order on the one connection). */
static void flush(struct ledger *l, bool force)
{
	enum { A_ID, A_STATE, A_HTTP, A_JOB, A_ERR, A_AT, A_HELD, NA };
	char *a[NA] = { 0 };
	size_t cap[NA] = { 0 }, used[NA] = { 0 };
	const char *params[NA];
	struct stmt *s = NULL;
	char sql[2048];
	int n = l->nnotes, rc = 0;

	if ((l->flushing > 0 && !force) || n == 0 || !l->ready)
		return;
	ev_timer_stop(l->loop, &l->flush_timer);
	for (int k = 0; k < NA && rc == 0; k++) {
		cap[k] = (size_t)n * (k == A_ERR   ? 2 * LEDGER_ERROR_BYTES + 8
				      : k == A_JOB ? 2 * LEDGER_JOB_MAX + 8
						   : 48) +
			 4;
		if ((a[k] = malloc(cap[k])) == NULL)
			rc = -1;
		else
			memcpy(a[k], "{", 2);
		used[k] = 1;
	}
	for (int i = 0; i < n && rc == 0; i++) {
		const struct note *o = &l->notes[i];
		char num[32];

		rc |= ledger_array_elem(a[A_ID], cap[A_ID], &used[A_ID], o->id, LEDGER_ID_LEN);
		rc |= ledger_array_elem(a[A_STATE], cap[A_STATE], &used[A_STATE], o->state, 32);
		snprintf(num, sizeof(num), "%ld", o->http);
		rc |= ledger_array_elem(a[A_HTTP], cap[A_HTTP], &used[A_HTTP], o->http ? num : NULL,
					16);
		rc |= ledger_array_elem(a[A_JOB], cap[A_JOB], &used[A_JOB],
					o->job[0] ? o->job : NULL, LEDGER_JOB_MAX);
		rc |= ledger_array_elem(a[A_ERR], cap[A_ERR], &used[A_ERR], o->err, o->err_len);
		snprintf(num, sizeof(num), "%.6f", o->at);
		rc |= ledger_array_elem(a[A_AT], cap[A_AT], &used[A_AT], num, sizeof(num));
		rc |= ledger_array_elem(a[A_HELD], cap[A_HELD], &used[A_HELD], o->held ? "t" : "f",
					1);
	}
	for (int k = 0; k < NA && rc == 0; k++) {
		if (used[k] + 2 > cap[k]) {
			rc = -1;
			break;
		}
		a[k][used[k]++] = '}';
		a[k][used[k]] = '\0';
		params[k] = a[k];
	}
	snprintf(sql, sizeof(sql), LEDGER_NOTES_SQL, l->cfg->ledger_schema);
	if (rc == 0)
		rc = ledger_query(l, S_NOTES, sql, NA, params, on_notes, &s);
	if (rc != 0) {
		struct log_line *ll = log_begin_route(l->cfg->route_name, LOG_ERROR,
						      "ledger_write_failed");
		log_int(ll, "transitions", n);
		log_str(ll, "error", "cannot queue the statement");
		log_str(ll, "first_dispatch_id", l->notes[0].id);
		log_end(ll);
	} else {
		s->n = n;
		l->flushing++;
	}
	for (int i = 0; i < n; i++)
		free(l->notes[i].err);
	l->nnotes = 0;
	for (int k = 0; k < NA; k++)
		free(a[k]);
}

void ledger_note(struct ledger *l, const char *dispatch_id, const char *state, long http_status,
		 const char *job_id, const char *error, size_t error_len, bool held)
{
	struct note *o;

	if (l == NULL || dispatch_id == NULL || dispatch_id[0] == '\0')
		return;
	if (l->nnotes == LEDGER_MAX_NOTES) {
		/* The statement in flight takes too long: queue another now. */
		flush(l, true);
	}
	o = &l->notes[l->nnotes++];
	memset(o, 0, sizeof(*o));
	snprintf(o->id, sizeof(o->id), "%s", dispatch_id);
	snprintf(o->state, sizeof(o->state), "%s", state);
	o->http = http_status;
	snprintf(o->job, sizeof(o->job), "%s", job_id ? job_id : "");
	if (error && error_len > 0) {
		o->err_len = error_len < LEDGER_ERROR_BYTES ? error_len : LEDGER_ERROR_BYTES;
		o->err = malloc(o->err_len + 1);
		if (o->err) {
			memcpy(o->err, error, o->err_len);
			o->err[o->err_len] = '\0';
			o->err_len = strlen(o->err); /* stop at a NUL */
		}
	}
	o->at = ev_time();
	o->held = held;
	if (l->stopped || l->nnotes >= LEDGER_FLUSH_AT)
		flush(l, false);
	else if (!ev_is_active(&l->flush_timer)) {
		ev_timer_set(&l->flush_timer, LEDGER_FLUSH_DELAY_S, 0.0);
		ev_timer_start(l->loop, &l->flush_timer);
	}
}

static void on_flush_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct ledger *l = w->data;

	(void)loop;
	(void)revents;
	flush(l, false);
	if (!ledger_busy(l) && l->hooks.settled)
		l->hooks.settled(l->hooks.arg);
}

/* ---- split ---- */

static void on_split(void *arg, PGresult *res, const struct pg_error *err)
{
	struct ledger *l = ledger_stmt_done(arg);

	if (res)
		PQclear(res);
	if (l && err)
		ledger_log_error("ledger_split_failed", err);
}

void ledger_split(struct ledger *l, const char *read_id, const struct ledger_part *parts,
		  int nparts, const long long *ids, const int *part_of, int n)
{
	size_t cap = (size_t)n * 24 + (size_t)nparts * 48 + 16;
	char *pid = malloc(cap), *pst = malloc(cap), *mid = malloc(cap), *mpt = malloc(cap);
	size_t u[4] = { 1, 1, 1, 1 };
	const char *params[5] = { read_id, pid, pst, mid, mpt };
	char sql[4096], num[24];
	int rc = pid && pst && mid && mpt ? 0 : -1;

	if (l == NULL) {
		rc = 0;
		goto out;
	}
	if (rc == 0) {
		memcpy(pid, "{", 2);
		memcpy(pst, "{", 2);
		memcpy(mid, "{", 2);
		memcpy(mpt, "{", 2);
	}
	for (int p = 0; p < nparts && rc == 0; p++) {
		rc |= ledger_array_elem(pid, cap, &u[0], parts[p].dispatch_id, LEDGER_ID_LEN);
		rc |= ledger_array_elem(pst, cap, &u[1], parts[p].state, 32);
	}
	for (int i = 0; i < n && rc == 0; i++) {
		if (part_of[i] < 0)
			continue;
		snprintf(num, sizeof(num), "%lld", ids[i]);
		rc |= ledger_array_elem(mid, cap, &u[2], num, sizeof(num));
		snprintf(num, sizeof(num), "%d", part_of[i] + 1);
		rc |= ledger_array_elem(mpt, cap, &u[3], num, sizeof(num));
	}
	if (rc == 0) {
		memcpy(pid + u[0], "}", 2);
		memcpy(pst + u[1], "}", 2);
		memcpy(mid + u[2], "}", 2);
		memcpy(mpt + u[3], "}", 2);
		snprintf(sql, sizeof(sql), LEDGER_SPLIT_SQL, l->cfg->ledger_schema);
		rc = ledger_query(l, S_SPLIT, sql, 5, params, on_split, NULL);
	}
out:
	if (rc != 0)
		log_msg_route(l->cfg->route_name, LOG_ERROR, "ledger_split_failed",
			      "cannot queue the split of dispatch %s into "
			      "%d parts; its row keeps every msg id",
			      read_id, nparts);
	free(pid);
	free(pst);
	free(mid);
	free(mpt);
}

/* ---- archive ---- */

int ledger_archive(struct ledger *l, const char *dispatch_id, const long long *ids, int n,
		   long http_status, const char *error, size_t error_len, const char *reason,
		   pgmq_count_fn fn, void *arg)
{
	char sql[4096], id[LEDGER_ID_LEN + 1], http[16], err[LEDGER_ERROR_BYTES + 1], table[80],
		qtable[96];
	const char *params[7] = {
		NULL, NULL, id, NULL, http_status ? http : NULL, error ? err : NULL, reason
	};
	char *arr;
	size_t k = 0;
	int rc;

	if (!ledger_recording(l) || pgmq_table_name(l->cfg->queue_name, table, sizeof(table)) != 0)
		return -1;
	snprintf(qtable, sizeof(qtable), "pgmq.\"%s\"", table);
	if (dispatch_id && dispatch_id[0])
		snprintf(id, sizeof(id), "%s", dispatch_id);
	else
		ledger_new_id(id);
	snprintf(http, sizeof(http), "%ld", http_status);
	for (; error && k < error_len && k < LEDGER_ERROR_BYTES && error[k]; k++) {
		unsigned char c = (unsigned char)error[k];
		err[k] = c >= 0x20 && c < 0x7f ? (char)c : '?';
	}
	err[k] = '\0';
	params[0] = l->cfg->queue_name;
	params[3] = l->cfg->endpoint_id;
	if (snprintf(sql, sizeof(sql), LEDGER_ARCHIVE_SQL, l->cfg->ledger_schema, qtable) >=
		    (int)sizeof(sql) ||
	    (arr = pgmq_id_array(ids, n)) == NULL)
		return -1;
	params[1] = arr;
	flush(l, true); /* the row's earlier transitions commit first */
	rc = pgmq_count_query(l->pg, sql, 7, params, fn, arg);
	free(arr);
	return rc;
}

/* ---- life ---- */

struct ledger *ledger_new(struct ev_loop *loop, const struct config *cfg, struct pg *pg,
			  const struct ledger_hooks *hooks)
{
	struct ledger *l = calloc(1, sizeof(*l));

	if (l == NULL)
		return NULL;
	l->loop = loop;
	l->cfg = cfg;
	l->pg = pg;
	if (hooks)
		l->hooks = *hooks;
	ledger_new_id(l->owner);
	ledger_tick_init(l);
	ev_init(&l->flush_timer, on_flush_timer);
	l->flush_timer.data = l;
	return l;
}

bool ledger_ready(const struct ledger *l)
{
	return l == NULL || l->ready || l->degraded;
}

bool ledger_recording(const struct ledger *l)
{
	return l && l->ready;
}

bool ledger_busy(const struct ledger *l)
{
	return l && (l->nnotes > 0 || l->flushing > 0 || l->migrating);
}

unsigned long long ledger_recovered_unknown(const struct ledger *l)
{
	return l ? l->recovered : 0;
}

void ledger_stop(struct ledger *l)
{
	if (l == NULL)
		return;
	l->stopped = true;
	ev_timer_stop(l->loop, &l->tick);
	flush(l, false); /* what waits for company goes now */
}

void ledger_reload(struct ledger *l, const struct config *cfg)
{
	if (l)
		l->cfg = cfg;
}

void ledger_free(struct ledger *l)
{
	if (l == NULL)
		return;
	ev_timer_stop(l->loop, &l->tick);
	ev_timer_stop(l->loop, &l->flush_timer);
	for (struct stmt *s = l->stmts; s; s = s->next)
		s->l = NULL;
	for (int i = 0; i < l->nnotes; i++)
		free(l->notes[i].err);
	if (l->nnotes > 0) {
		struct log_line *ll = log_begin_route(l->cfg->route_name, LOG_WARN,
						      "ledger_unwritten");
		log_int(ll, "transitions", l->nnotes);
		log_str(ll, "first_dispatch_id", l->notes[0].id);
		log_end(ll);
	}
	free(l);
}
