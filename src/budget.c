/* budget — see include/budget.h. */
#include "budget.h"
#include "ledger.h"
#include "log.h"
#include "metrics.h"
#include "migrate.h"

#include <math.h>
#include <stdio.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

static const char *const kind_names[BUDGET_NKINDS] = { "run", "status" };

/* One statement outstanding; the budget may be freed before it answers. */
struct req {
	struct budget *b;
	double sent_at; /* ev_time() when sent: the grant's validity runs from here */
};

/* Fallback sends in owed newer than since. */
static int owed_count(const struct ratelimit *o, double since)
{
	int n = 0;

	for (int i = 0; i < o->count; i++)
		if (o->sent_at[(o->head + i) % o->cap] > since)
			n++;
	return n;
}

/* Forgets the fallback sends up to `until` (reported by a statement sent
 * then); keeps later ones for the next. */
static void owed_drop(struct ratelimit *o, double until)
{
	double *kept;
	int keep = 0;

	if (o->count == 0)
		return;
	kept = malloc((size_t)o->cap * sizeof(*kept));
	if (kept == NULL)
		return; /* reported twice: counted longer, never less */
	for (int i = 0; i < o->count; i++) {
		double t = o->sent_at[(o->head + i) % o->cap];
		if (t > until)
			kept[keep++] = t;
	}
	memcpy(o->sent_at, kept, (size_t)keep * sizeof(*kept));
	free(kept);
	o->head = 0;
	o->count = keep;
}

struct budget {
	struct ev_loop *loop;
	struct pg *pg;
	enum budget_kind kind;
	char owner[LEDGER_ID_LEN + 1];
	char schema[64];
	char endpoint_id[128];
	char route[CONFIG_ROUTE_NAME_MAX + 1]; /* names the route on every line */
	int cap;
	double window_s, validity_s;
	int grant_max, expected_replicas;
	void (*ready)(void *arg);
	void *arg;

	struct budget_grant grant;
	struct req *req;       /* the statement outstanding, or NULL */
	ev_timer retry;        /* a denied grant's retry, or the next attempt after a failure */
	ev_timer stmt_timeout; /* a grant that does not come: fall back meanwhile */
	bool missing_logged;
	struct budget_share share; /* the local share: fallback, quiet span, transition */
	/* Sends made in fallback (not in the database): reported with the next
	 * statement, which counts them as a grant of this replica. */
	struct ratelimit owed;
	bool migrated;
};

/* ---- pure arithmetic ---- */

double budget_count_s(double window_s, double margin_s, double validity_s)
{
	return window_s + margin_s + validity_s;
}

int budget_want(int waiting, int grant_max)
{
	if (grant_max < 1)
		grant_max = 1;
	if (waiting < 1)
		waiting = 1;
	return waiting < grant_max ? waiting : grant_max;
}

int budget_grant_size(int free_slots, int want, int grant_max, int active)
{
	int n, share;

	if (free_slots < 1 || want < 1)
		return 0;
	if (active < 1)
		active = 1;
	share = (free_slots + active - 1) / active;
	n = want;
	if (grant_max < n)
		n = grant_max;
	if (free_slots < n)
		n = free_slots;
	if (share < n)
		n = share;
	return n < 1 ? 0 : n;
}

bool budget_grant_take(struct budget_grant *g, double now, long long *unused)
{
	if (g->slots > 0 && now >= g->expires_at) {
		*unused += g->slots;
		g->slots = 0;
	}
	if (g->slots <= 0)
		return false;
	g->slots--;
	return true;
}

int budget_fallback_cap(int cap, int expected_replicas)
{
	int n;

	if (expected_replicas <= 0)
		return 0;
	n = cap / expected_replicas;
	return n < 1 ? 1 : n;
}

int budget_share_init(struct budget_share *s, int cap, double count_s, double now)
{
	memset(s, 0, sizeof(*s));
	s->cap = cap;
	s->last_ok_at = now; /* a replica starting without a grant waits one span too */
	return ratelimit_init(&s->rl, cap > 0 ? cap : 1, count_s);
}

bool budget_share_allows(const struct budget_share *s, double now, double *wait_s)
{
	/* Every grant made before the database stopped answering has left
	 * the counted span (the others' grants were not bound by the share). */
	double quiet_until = s->last_ok_at + s->rl.window_s;

	if (!s->fallback || s->cap <= 0) {
		*wait_s = BUDGET_RETRY_S;
		return false;
	}
	if (now < quiet_until) {
		*wait_s = quiet_until - now;
		return false;
	}
	return ratelimit_slot(&s->rl, now, wait_s);
}

bool budget_share_granted_allows(const struct budget_share *s, double now, double *wait_s)
{
	return now >= s->transition_until || ratelimit_slot(&s->rl, now, wait_s);
}

void budget_share_answered(struct budget_share *s, double now)
{
	if (s->fallback && s->cap > 0)
		/* Others may still be in fallback, at their local share: keep
		 * to ours as well until every fallback send is reported. */
		s->transition_until = now + s->rl.window_s;
	s->last_ok_at = now;
}

/* ---- the statement ---- */

static double count_s_of(const struct budget *b)
{
	return budget_count_s(b->window_s, RATE_MARGIN_S, b->validity_s);
}

static const char TAKE_SQL[] = "SELECT slots, retry_s, active FROM %s.budget_take"
			       "($1, $2, $3::uuid, $4::integer, $5::double precision, "
			       "$6::integer, $7::integer, $8::integer)";

static void set_fallback(struct budget *b, bool on, const char *why)
{
	if (b->share.fallback == on)
		return;
	b->share.fallback = on;
	metrics_set_fleet_fallback((int)b->kind, on);
	if (on) {
		struct log_line *l = log_begin_route(b->route, LOG_WARN, "fleet_budget_fallback");
		log_str(l, "kind", kind_names[b->kind]);
		log_str(l, "endpoint_id", b->endpoint_id);
		log_str(l, "error", why);
		log_int(l, "local_cap", b->share.cap);
		log_str(l, "outcome",
			b->share.cap > 0 ? "sending at the local share of the cap"
					 : "sending nothing until a grant comes");
		log_end(l);
	} else {
		struct log_line *l = log_begin_route(b->route, LOG_INFO, "fleet_budget_restored");
		log_str(l, "kind", kind_names[b->kind]);
		log_str(l, "endpoint_id", b->endpoint_id);
		log_end(l);
	}
}

static void arm(struct budget *b, ev_timer *t, double after_s)
{
	ev_timer_stop(b->loop, t);
	ev_timer_set(t, after_s, 0.0);
	ev_timer_start(b->loop, t);
}

/* Never calls ready(): budget_take calls this, inside its caller's loop. */
static void failed(struct budget *b, const char *why)
{
	set_fallback(b, true, why);
	arm(b, &b->retry, BUDGET_RETRY_S);
}

static void on_taken(void *arg, PGresult *res, const struct pg_error *err)
{
	struct req *r = arg;
	struct budget *b = r->b;
	double retry_s, sent_at = r->sent_at;
	int slots;

	free(r);
	if (b == NULL) {
		if (res)
			PQclear(res);
		return;
	}
	b->req = NULL;
	ev_timer_stop(b->loop, &b->stmt_timeout);
	if (err) {
		/* 42883/42P01: not migrated (ledger.enabled off and a role that
		 * may not create it): named once. */
		if (!b->missing_logged &&
		    (strcmp(err->sqlstate, "42883") == 0 || strcmp(err->sqlstate, "42P01") == 0)) {
			struct log_line *l = log_begin_route(b->route, LOG_ERROR,
							     "fleet_budget_unavailable");
			log_str(l, "schema", b->schema);
			log_str(l, "error", err->message);
			log_str(l, "hint", "run `pgmq-dispatcher migrate` as a role that may");
			log_end(l);
			b->missing_logged = true;
		}
		failed(b, err->message);
		if (b->ready)
			b->ready(b->arg); /* the local share may let some go */
		return;
	}
	if (PQntuples(res) != 1 || PQnfields(res) != 3) {
		PQclear(res);
		failed(b, "budget_take returned no row");
		if (b->ready)
			b->ready(b->arg);
		return;
	}
	slots = atoi(PQgetvalue(res, 0, 0));
	retry_s = atof(PQgetvalue(res, 0, 1));
	PQclear(res);
	budget_share_answered(&b->share, ev_time());
	set_fallback(b, false, NULL);
	owed_drop(&b->owed, sent_at); /* the database counts them now */
	metrics_inc_fleet_grant((int)b->kind, slots);
	if (slots > 0) {
		/* Validity from the moment the statement left: before the
		 * database's clock_timestamp(), so never later than its count. */
		b->grant.slots = slots;
		b->grant.expires_at = sent_at + b->validity_s;
	} else {
		double cs = budget_count_s(b->window_s, RATE_MARGIN_S, b->validity_s);
		if (!(retry_s >= BUDGET_MIN_WAIT_S))
			retry_s = BUDGET_MIN_WAIT_S;
		if (retry_s > cs)
			retry_s = cs;
		arm(b, &b->retry, retry_s);
		return;
	}
	if (b->ready)
		b->ready(b->arg);
}

static void ask(struct budget *b, int waiting)
{
	char sql[sizeof(TAKE_SQL) + 64], cap[16], count[32], want[16], max[16], spent[16];
	const char *params[8] = {
		b->endpoint_id, kind_names[b->kind], b->owner, cap, count, want, max, spent
	};
	double count_s = budget_count_s(b->window_s, RATE_MARGIN_S, b->validity_s);
	struct req *r;

	if (b->req || ev_is_active(&b->retry))
		return;
	if (!pg_ready(b->pg)) {
		failed(b, "database disconnected");
		return;
	}
	snprintf(sql, sizeof(sql), TAKE_SQL, b->schema);
	snprintf(cap, sizeof(cap), "%d", b->cap);
	snprintf(count, sizeof(count), "%.6f", count_s);
	snprintf(want, sizeof(want), "%d", budget_want(waiting, b->grant_max));
	snprintf(max, sizeof(max), "%d", b->grant_max);
	r = calloc(1, sizeof(*r));
	if (r == NULL) {
		failed(b, "out of memory");
		return;
	}
	r->b = b;
	r->sent_at = ev_time();
	snprintf(spent, sizeof(spent), "%d", owed_count(&b->owed, r->sent_at - count_s));
	if (pg_query(b->pg, sql, 8, params, on_taken, r) != 0) {
		free(r);
		failed(b, "the database queue is full");
		return;
	}
	b->req = r;
	arm(b, &b->stmt_timeout, BUDGET_STMT_TIMEOUT_S);
}

static void on_retry(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct budget *b = w->data;

	(void)loop;
	(void)revents;
	if (b->ready)
		b->ready(b->arg); /* it calls budget_take, which asks again */
}

static void on_stmt_timeout(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct budget *b = w->data;

	(void)loop;
	(void)revents;
	/* The statement stays queued (its answer is still used); meanwhile
	 * the local share, so that a slow database does not stop sending. */
	set_fallback(b, true, "no grant within 2 s");
	if (b->ready)
		b->ready(b->arg);
}

/* ---- the API ---- */

bool budget_has_slot(const struct budget *b, double now)
{
	double wait_s;

	if (b == NULL)
		return true;
	if (b->grant.slots > 0 && now < b->grant.expires_at)
		return budget_share_granted_allows(&b->share, now, &wait_s);
	return budget_share_allows(&b->share, now, &wait_s);
}

int budget_slots_now(const struct budget *b, double now)
{
	if (b == NULL)
		return INT_MAX;
	if (!budget_has_slot(b, now))
		return 0;
	return b->grant.slots > 0 && now < b->grant.expires_at ? b->grant.slots : 1;
}

/* The retry timer at most wait_s away: it brings the caller back. */
static void wake_within(struct budget *b, double wait_s)
{
	if (!ev_is_active(&b->retry) || ev_timer_remaining(b->loop, &b->retry) > wait_s)
		arm(b, &b->retry, wait_s);
}

void budget_ask(struct budget *b, double now, int waiting)
{
	double wait_s;

	if (b == NULL)
		return;
	if (b->grant.slots > 0 && now < b->grant.expires_at) {
		if (!budget_share_granted_allows(&b->share, now, &wait_s))
			wake_within(b, wait_s);
		return;
	}
	ask(b, waiting);
	/* The next local slot (and the database asked again then). */
	if (b->share.fallback && b->share.cap > 0 && !budget_share_allows(&b->share, now, &wait_s))
		wake_within(b, wait_s);
}

bool budget_take(struct budget *b, double now, int waiting)
{
	long long unused = 0;
	double wait_s;
	bool ok;

	if (b == NULL)
		return true;
	if (b->grant.slots > 0 && now < b->grant.expires_at &&
	    !budget_share_granted_allows(&b->share, now, &wait_s)) {
		wake_within(b, wait_s);
		return false;
	}
	ok = budget_grant_take(&b->grant, now, &unused);
	if (unused > 0)
		metrics_add_fleet_unused((int)b->kind, (unsigned long long)unused);
	if (ok) {
		/* Also in the fallback's window: a fallback starting now
		 * counts what this replica has just sent. */
		ratelimit_record(&b->share.rl, now);
		return true;
	}
	ask(b, waiting);
	if (budget_share_allows(&b->share, now, &wait_s)) {
		ratelimit_record(&b->share.rl, now);
		ratelimit_record(&b->owed, now);
		return true;
	}
	budget_ask(b, now, waiting);
	return false;
}

static void take_values(struct budget *b, const struct config *cfg)
{
	b->cap = b->kind == BUDGET_RUN ? cfg->max_requests_per_10s
				       : cfg->tracker_max_status_per_10s;
	b->window_s = cfg->rate_window_ms / 1000.0;
	b->validity_s = cfg->fleet_validity_ms / 1000.0;
	b->grant_max = cfg->fleet_grant_max;
	b->expected_replicas = cfg->fleet_expected_replicas;
	snprintf(b->endpoint_id, sizeof(b->endpoint_id), "%s", cfg->endpoint_id);
	snprintf(b->route, sizeof(b->route), "%s", cfg->route_name);
}

struct budget *budget_new(struct ev_loop *loop, struct pg *pg, const struct config *cfg,
			  enum budget_kind kind, void (*ready)(void *arg), void *arg)
{
	struct budget *b = calloc(1, sizeof(*b));
	int local_cap;

	if (b == NULL)
		return NULL;
	b->loop = loop;
	b->pg = pg;
	b->kind = kind;
	b->ready = ready;
	b->arg = arg;
	ledger_new_id(b->owner);
	snprintf(b->schema, sizeof(b->schema), "%s", cfg->ledger_schema);
	take_values(b, cfg);
	/* The local share's window is the counted span, not the window alone:
	 * validity_ms of slack for a send that reaches RunPod late (a loaded
	 * machine), as a grant has. owed: the fallback sends of one counted
	 * span, at most twice the local cap. */
	local_cap = budget_fallback_cap(b->cap, b->expected_replicas);
	if (budget_share_init(&b->share, local_cap, count_s_of(b), ev_time()) != 0 ||
	    ratelimit_init(&b->owed, local_cap > 0 ? 2 * local_cap : 1, 0.0) != 0) {
		ratelimit_free(&b->share.rl);
		free(b);
		return NULL;
	}
	ev_init(&b->retry, on_retry);
	b->retry.data = b;
	ev_init(&b->stmt_timeout, on_stmt_timeout);
	b->stmt_timeout.data = b;
	{
		struct log_line *l = log_begin_route(b->route, LOG_INFO, "fleet_budget");
		log_str(l, "kind", kind_names[kind]);
		log_str(l, "endpoint_id", b->endpoint_id);
		log_str(l, "owner", b->owner);
		log_int(l, "cap", b->cap);
		log_int(l, "window_ms", cfg->rate_window_ms);
		log_int(l, "validity_ms", cfg->fleet_validity_ms);
		log_int(l, "grant_max", b->grant_max);
		log_int(l, "fallback_cap", b->share.cap);
		log_end(l);
	}
	return b;
}

void budget_reload(struct budget *b, const struct config *cfg)
{
	struct ratelimit rl;
	int local_cap;

	if (b == NULL)
		return;
	take_values(b, cfg);
	local_cap = budget_fallback_cap(b->cap, b->expected_replicas);
	if (local_cap != b->share.cap &&
	    ratelimit_resized(&b->share.rl, local_cap > 0 ? local_cap : 1, &rl) == 0) {
		struct ratelimit owed;
		if (ratelimit_resized(&b->owed, local_cap > 0 ? 2 * local_cap : 1, &owed) != 0) {
			ratelimit_free(&rl);
			return; /* the old share stays */
		}
		ratelimit_free(&b->share.rl);
		ratelimit_free(&b->owed);
		b->share.rl = rl;
		b->owed = owed;
		b->share.cap = local_cap;
	}
	b->share.rl.window_s = count_s_of(b); /* validity_ms may have changed */
}

static void on_migrated(void *arg, PGresult *res, const struct pg_error *err)
{
	struct req *r = arg;

	if (res)
		PQclear(res);
	if (r->b && err && !err->connection_lost) {
		/* budget_take names the missing function when it is used. */
		struct log_line *l = log_begin_route(r->b->route, LOG_WARN, "fleet_migrate_failed");
		log_str(l, "sqlstate", err->sqlstate);
		log_str(l, "error", err->message);
		log_end(l);
	}
	if (r->b) {
		struct budget *b = r->b;
		b->req = NULL;
		if (err == NULL)
			b->migrated = true;
		if (b->ready)
			b->ready(b->arg); /* a grant waited for the migration */
	}
	free(r);
}

void budget_connected(struct budget *b, bool migrate)
{
	char *sql;
	struct req *r;

	if (b == NULL || !migrate || b->migrated || b->req)
		return;
	sql = migrate_sql(b->schema, MIGRATE_VERSION);
	r = calloc(1, sizeof(*r));
	if (sql == NULL || r == NULL || pg_query(b->pg, sql, 0, NULL, on_migrated, r) != 0) {
		free(r);
		free(sql);
		return;
	}
	free(sql);
	r->b = b;
	b->req = r;
}

const char *budget_owner(const struct budget *b)
{
	return b->owner;
}

void budget_free(struct budget *b)
{
	if (b == NULL)
		return;
	ev_timer_stop(b->loop, &b->retry);
	ev_timer_stop(b->loop, &b->stmt_timeout);
	if (b->req)
		b->req->b = NULL;
	ratelimit_free(&b->share.rl);
	ratelimit_free(&b->owed);
	free(b);
}
