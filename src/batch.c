/* batch — see include/batch.h. */
#include "batch.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define IDS_PER_LINE 100

enum row_fate batch_row_fate(const struct pgmq_message *m, size_t envelope_bytes, size_t limit,
			     int max_read_ct)
{
	if (m->invalid)
		return m->id_ok ? ROW_INVALID : ROW_INVALID_LOST;
	if (max_read_ct > 0 && atol(m->read_ct) > max_read_ct)
		return ROW_MAX_READ_CT;
	if (envelope_bytes + runpod_job_bytes(m) > limit)
		return ROW_TOO_LARGE;
	return ROW_SEND;
}

enum reject_action batch_reject_action(long http_status, int n)
{
	if (http_status != 413)
		return REJECT_RELEASE;
	return n > 1 ? REJECT_SPLIT : REJECT_TOO_LARGE;
}

void read_result_unref(struct read_result *rr)
{
	if (rr && --rr->refs == 0) {
		pgmq_batch_free(&rr->rows);
		free(rr);
	}
}

struct batch *batch_new(struct dispatcher *d, struct read_result *rr,
			const struct pgmq_message *msgs, int n, const char *dispatch_id)
{
	struct batch *b = n > 0 ? calloc(1, sizeof(*b)) : NULL;

	if (b == NULL)
		return NULL;
	b->msgs = malloc((size_t)n * sizeof(*b->msgs));
	b->ids = malloc((size_t)n * sizeof(*b->ids));
	if (b->msgs == NULL || b->ids == NULL) {
		free(b->msgs);
		free(b->ids);
		free(b);
		return NULL;
	}
	b->d = d;
	b->rr = rr;
	rr->refs++;
	b->n = n;
	b->started = b->read_at = ev_now(d->loop);
	snprintf(b->dispatch_id, sizeof(b->dispatch_id), "%s", dispatch_id ? dispatch_id : "");
	for (int i = 0; i < n; i++) {
		b->msgs[i] = msgs[i];
		b->ids[i] = msgs[i].msg_id_num;
	}
	return b;
}

void batch_log_ids(enum log_level level, const char *event, const struct dispatcher *d,
		   const long long *ids, int n, const char *why)
{
	for (int i = 0; i < n; i += IDS_PER_LINE) {
		struct log_line *l = log_begin_route(d->cfg->route_name, level, event);

		log_str(l, "queue", d->cfg->queue_name);
		log_str(l, "outcome", why);
		log_int_list(l, "msg_ids", ids + i,
			     (size_t)(n - i < IDS_PER_LINE ? n - i : IDS_PER_LINE));
		log_end(l);
	}
}

/* The ledger's name for each fate. */
static const char *const fate_states[] = {
	[BATCH_ACCEPTED] = "accepted", [BATCH_UNKNOWN] = "unknown",
	[BATCH_RELEASED] = "released", [BATCH_RELEASE_FAILED] = "release_failed",
	[BATCH_ARCHIVED] = "archived", [BATCH_ARCHIVE_FAILED] = "archive_failed",
	[BATCH_UNSENT] = "unsent",     [BATCH_DROPPED] = "dropped",
	[BATCH_SPLIT] = "split",
};

void batch_end(struct batch *b, enum batch_fate fate, const char *why)
{
	const char *error = b->error;
	size_t error_len = b->error_len;

	if (error == NULL && why && fate != BATCH_ACCEPTED) {
		error = why;
		error_len = strlen(why);
	}
	/* An accepted job stays leased to this replica while a tracker follows it.
	 * An archive recorded with its statement is in the ledger already. */
	if (!b->recorded)
		ledger_note(b->d->ledger, b->dispatch_id, fate_states[fate], b->http_status,
			    b->job_id, error, error_len,
			    fate == BATCH_ACCEPTED && b->d->tracker != NULL);
	switch (fate) {
	case BATCH_UNKNOWN:
		batch_log_ids(LOG_WARN, "outcome_unknown_ids", b->d, b->ids, b->n, why);
		break;
	case BATCH_RELEASE_FAILED:
		batch_log_ids(LOG_ERROR, "release_failed_ids", b->d, b->ids, b->n, why);
		break;
	case BATCH_ARCHIVE_FAILED:
		batch_log_ids(LOG_ERROR, "archive_failed_ids", b->d, b->ids, b->n, why);
		break;
	case BATCH_UNSENT:
		batch_log_ids(LOG_WARN, "unsent_ids", b->d, b->ids, b->n, why);
		break;
	case BATCH_ACCEPTED:
	case BATCH_RELEASED:
	case BATCH_ARCHIVED:
	case BATCH_DROPPED:
	case BATCH_SPLIT:
		break;
	}
	read_result_unref(b->rr);
	free(b->msgs);
	free(b->ids);
	free(b);
}

/* A set_vt or archive statement failed (also while shutting down): one
 * line with the error; batch_end then names every msg id. */
static void log_statement_failed(const struct dispatcher *d, const char *event,
				 const struct pg_error *err)
{
	struct log_line *l = log_begin_route(d->cfg->route_name, LOG_ERROR, event);

	log_str(l, "queue", d->cfg->queue_name);
	log_str(l, "sqlstate", err->sqlstate);
	log_str(l, "error", err->message);
	log_end(l);
}

static void on_released(void *arg, long count, const struct pg_error *err)
{
	struct batch *b = arg;
	struct dispatcher *d = b->d;

	d->db_pending--;
	if (err) {
		log_statement_failed(d, "release_failed", err);
		batch_end(b, BATCH_RELEASE_FAILED, "visible again after vt_seconds");
	} else {
		if (!d->finished) {
			struct log_line *l = log_begin_route(d->cfg->route_name, LOG_DEBUG,
							     "released");
			log_str(l, "queue", d->cfg->queue_name);
			log_int(l, "messages", count);
			log_end(l);
			d->stats.messages_released += (unsigned long long)count;
			metrics_add_messages_released((unsigned)count);
			metrics_route_add(d->mroute, MR_MESSAGES_RELEASED, (unsigned)count);
		}
		batch_end(b, BATCH_RELEASED, NULL);
	}
	dispatcher_maybe_finish(d);
}

void batch_release(struct batch *b, int delay_s)
{
	struct dispatcher *d = b->d;

	if (pgmq_set_vt(d->pg, d->cfg->queue_name, b->ids, b->n, delay_s, on_released, b) != 0) {
		log_msg_route(d->cfg->route_name, LOG_ERROR, "release_failed",
			      "cannot queue set_vt");
		batch_end(b, BATCH_RELEASE_FAILED, "visible again after vt_seconds");
		return;
	}
	d->db_pending++;
}

static void on_archived(void *arg, long count, const struct pg_error *err)
{
	struct batch *b = arg;
	struct dispatcher *d = b->d;

	d->db_pending--;
	if (err || count <= 0)
		b->recorded = false; /* rolled back, or nothing to record: noted */
	if (err) {
		log_statement_failed(d, "archive_failed", err);
		batch_end(b, BATCH_ARCHIVE_FAILED, "visible again after vt_seconds, archived then");
	} else {
		if (!d->finished) {
			d->stats.messages_archived += (unsigned long long)count;
			metrics_add_messages_archived(b->archive_reason, (unsigned)count);
			metrics_route_add(d->mroute, MR_MESSAGES_ARCHIVED, (unsigned)count);
		}
		batch_end(b, BATCH_ARCHIVED, NULL);
	}
	dispatcher_maybe_finish(d);
}

void batch_archive(struct dispatcher *d, struct read_result *rr, const struct pgmq_message *msgs,
		   int n, enum metrics_archive_reason reason, const char *dispatch_id)
{
	struct batch *b;

	if (n == 0)
		return;
	b = batch_new(d, rr, msgs, n, dispatch_id);
	if (b)
		b->archive_reason = reason;
	if (b == NULL ||
	    batch_archive_ids(d, b->dispatch_id, b->ids, n, b->http_status, b->error, b->error_len,
			      reason == METRICS_ARCHIVE_TOO_LARGE ? "too_large" : "max_read_ct",
			      on_archived, b, &b->recorded) != 0) {
		log_msg_route(d->cfg->route_name, LOG_ERROR, "archive_failed",
			      "cannot queue pgmq.archive for %d message%s; "
			      "they come back after vt_seconds",
			      n, n == 1 ? "" : "s");
		if (b)
			batch_end(b, BATCH_DROPPED, NULL);
		return;
	}
	d->db_pending++;
}

int batch_pack(const struct pgmq_message *msgs, int n, size_t envelope, size_t limit, int max_jobs,
	       int *ends)
{
	int runs = 0;

	if (max_jobs < 1)
		max_jobs = 1;
	for (int start = 0; start < n; start += max_jobs) {
		int len = n - start < max_jobs ? n - start : max_jobs;
		int k = runpod_pack(msgs + start, len, envelope, limit, ends + runs);
		for (int i = 0; i < k; i++)
			ends[runs + i] += start;
		runs += k;
	}
	return runs;
}

int batch_read_bodies(int read_batches, int free_slots, int rate_next_s)
{
	int bodies = read_batches;

	if (free_slots < bodies)
		bodies = free_slots;
	if (rate_next_s < bodies)
		bodies = rate_next_s;
	return bodies < 1 ? 1 : bodies;
}

int batch_read_qty(int batch_size, int read_batches, int free_slots, int rate_next_s)
{
	long qty = (long)batch_size * batch_read_bodies(read_batches, free_slots, rate_next_s);

	return qty > 1000 ? (batch_size > 1000 ? batch_size : 1000) : (int)qty;
}

bool batch_read_waits(bool backlog, int in_flight, int max_in_flight, int read_batches,
		      int free_slots, int rate_next_s)
{
	int want = max_in_flight / 2;

	if (want > read_batches)
		want = read_batches;
	if (rate_next_s < free_slots)
		return false; /* the rate budget binds: waiting gains nothing */
	return backlog && in_flight > 0 &&
	       batch_read_bodies(read_batches, free_slots, rate_next_s) < want;
}

int batch_archive_ids(struct dispatcher *d, const char *dispatch_id, const long long *ids, int n,
		      long http_status, const char *error, size_t error_len, const char *reason,
		      pgmq_count_fn fn, void *arg, bool *recorded)
{
	*recorded = false;
	if (!ledger_recording(d->ledger))
		return pgmq_archive(d->pg, d->cfg->queue_name, ids, n, fn, arg);
	if (ledger_archive(d->ledger, dispatch_id, ids, n, http_status, error, error_len, reason,
			   fn, arg) != 0)
		return -1;
	*recorded = true;
	return 0;
}

/* The groups a part of a read becomes, in the order their batches are
 * made: one per /run body, then too large, poison, invalid. The first
 * takes the part's ledger row; the others get rows of their own (one split
 * statement). */
struct parts {
	int n;
	char ids[BATCH_MAX_PARTS][LEDGER_ID_LEN + 1];
	struct ledger_part p[BATCH_MAX_PARTS];
};

static int part_add(struct parts *ps, const char *read_id, const char *state)
{
	int k = ps->n;

	if (k == BATCH_MAX_PARTS || read_id[0] == '\0') /* not recorded */
		return -1;
	if (k == 0)
		snprintf(ps->ids[0], sizeof(ps->ids[0]), "%s", read_id);
	else
		ledger_new_id(ps->ids[k]);
	ps->p[k].dispatch_id = ps->ids[k];
	ps->p[k].state = state;
	ps->n++;
	return k;
}

/* Marks rows ix[0..n) as part of a new group; the group's dispatch id. */
static const char *group(struct parts *ps, const char *read_id, const char *state, int *part_of,
			 const int *ix, int n)
{
	int k;

	if (n == 0)
		return read_id;
	k = part_add(ps, read_id, state);
	if (k < 0)
		return read_id; /* more parts than BATCH_MAX_PARTS: kept in the part's row */
	for (int i = 0; i < n; i++)
		part_of[ix[i]] = k;
	return ps->ids[k];
}

/* Splits rows[0..nrows) of a read, recorded under the ledger row read_id
 * ("" when not), into /run requests no larger than max_body_bytes (in
 * msg_id order) and archives the messages that must never be dispatched:
 * read more than max_read_ct times, or too large to fit a request on
 * their own. */
static void dispatch_part(struct dispatcher *d, struct read_result *rr,
			  const struct pgmq_message *rows, int nrows, const char *read_id)
{
	size_t sz = (size_t)nrows;
	struct pgmq_message *keep = malloc(sz * sizeof(*keep)), *drop = malloc(sz * sizeof(*drop));
	struct pgmq_message *poison = malloc(sz * sizeof(*poison)),
			    *bad = malloc(sz * sizeof(*bad));
	/* Zeroed: the analyzer cannot see that runpod_pack makes no run of no rows. */
	int *ix = calloc(4 * sz, sizeof(*ix)), *part_of = malloc(sz * sizeof(*part_of));
	long long *row_ids = malloc(sz * sizeof(*row_ids));
	size_t limit = (size_t)d->cfg->max_body_bytes, envelope = d->conf.envelope.len;
	int *ends = malloc(sz * sizeof(*ends));
	int nkeep = 0, ndrop = 0, npoison = 0, nbad = 0, runs;
	struct parts *ps = calloc(1, sizeof(*ps));
	const char *drop_id, *poison_id, *bad_id;

	if (!keep || !drop || !poison || !bad || !ends || !ix || !part_of || !row_ids || !ps) {
		log_msg_route(d->cfg->route_name, LOG_ERROR, "out_of_memory",
			      "dropping a read of %d; visible again after vt", nrows);
		goto out;
	}
	/* ix: keep, drop, poison, bad row indexes, one quarter each. */
	for (int i = 0; i < nrows; i++) {
		const struct pgmq_message *m = &rows[i];
		struct log_line *l;

		part_of[i] = -1;
		row_ids[i] = m->msg_id_num;
		switch (batch_row_fate(m, envelope, limit, d->cfg->max_read_ct)) {
		case ROW_INVALID:
		case ROW_INVALID_LOST:
			/* The read hid it; bring it back (after a pause: the read
			 * function is broken and would hide it again). */
			l = log_begin_route(d->cfg->route_name, LOG_ERROR, "row_invalid");
			log_str(l, "queue", d->cfg->queue_name);
			log_num(l, "msg_id", m->msg_id);
			log_str(l, "problem", m->invalid);
			log_str(l, "outcome",
				m->id_ok ? "released"
					 : "cannot release: visible again after vt_seconds");
			log_end(l);
			if (m->id_ok) {
				ix[3 * sz + (size_t)nbad] = i;
				bad[nbad++] = *m;
			}
			break;
		case ROW_MAX_READ_CT:
			batch_log_archived(d, m, "max_read_ct", 0, NULL);
			ix[2 * sz + (size_t)npoison] = i;
			poison[npoison++] = *m;
			break;
		case ROW_TOO_LARGE:
			batch_log_archived(d, m, "too_large", envelope + runpod_job_bytes(m), NULL);
			ix[sz + (size_t)ndrop] = i;
			drop[ndrop++] = *m;
			break;
		case ROW_SEND:
			ix[nkeep] = i;
			keep[nkeep++] = *m;
			break;
		}
	}
	runs = batch_pack(keep, nkeep, envelope, limit, d->cfg->batch_size, ends);
	for (int r = 0, start = 0; r < runs; start = ends[r++])
		group(ps, read_id, "sending", part_of, ix + start, ends[r] - start);
	drop_id = group(ps, read_id, "archiving", part_of, ix + sz, ndrop);
	poison_id = group(ps, read_id, "archiving", part_of, ix + 2 * sz, npoison);
	bad_id = group(ps, read_id, "releasing", part_of, ix + 3 * sz, nbad);
	if (read_id[0] && ps->n > 1)
		ledger_split(d->ledger, read_id, ps->p, ps->n, row_ids, part_of, nrows);
	if (nbad > 0) {
		struct batch *b = batch_new(d, rr, bad, nbad, bad_id);
		double ms = dispatcher_back_off(d, PAUSE_DB, -1);
		if (b)
			batch_release(b, (int)ceil(ms / 1000.0));
	}
	batch_archive(d, rr, drop, ndrop, METRICS_ARCHIVE_TOO_LARGE, drop_id);
	batch_archive(d, rr, poison, npoison, METRICS_ARCHIVE_MAX_READ_CT, poison_id);
	for (int r = 0, start = 0; r < runs; start = ends[r++]) {
		struct batch *b = batch_new(d, rr, keep + start, ends[r] - start,
					    r < ps->n ? ps->ids[r] : read_id);
		if (b) {
			post_batch(d, b);
		} else {
			log_msg_route(d->cfg->route_name, LOG_ERROR, "out_of_memory",
				      "dropping %d message%s; visible again after vt",
				      ends[r] - start, ends[r] - start == 1 ? "" : "s");
		}
	}
out:
	free(keep);
	free(drop);
	free(poison);
	free(bad);
	free(ends);
	free(ix);
	free(part_of);
	free(row_ids);
	free(ps);
}

/* The k-th part of rr: its first row, its length and its ledger row. */
static int part_of_read(const struct read_result *rr, int k, int *start, const char **id)
{
	int per = rr->part_rows > 0 ? rr->part_rows : rr->rows.n;
	int len;

	*start = k * per;
	len = rr->rows.n - *start < per ? rr->rows.n - *start : per;
	*id = k < rr->nids ? rr->dispatch_ids[k] : "";
	return len;
}

void batch_dispatch_rows(struct dispatcher *d, struct read_result *rr)
{
	int start, len;
	const char *id;

	for (int k = 0; (len = part_of_read(rr, k, &start, &id)) > 0; k++)
		dispatch_part(d, rr, rr->rows.msgs + start, len, id);
}

void batch_release_read(struct dispatcher *d, struct read_result *rr)
{
	int start, len;
	const char *id;

	for (int k = 0; (len = part_of_read(rr, k, &start, &id)) > 0; k++) {
		struct batch *b = batch_new(d, rr, rr->rows.msgs + start, len, id);
		if (b)
			batch_release(b, 0);
	}
}

/* The ledger's side of a 413 split: b's row keeps its msg ids and ends
 * `split` (with the 413, in batch_end); each half gets a row of its own,
 * inserted `sending` in one statement queued before any of their
 * transitions. Returns 0, or -1 when out of memory. */
static int split_rows(struct batch *b, struct batch *lo, struct batch *hi)
{
	struct ledger_part p[3];
	int *part_of;

	lo->dispatch_id[0] = hi->dispatch_id[0] = '\0';
	if (b->dispatch_id[0] == '\0') /* not recorded */
		return 0;
	part_of = malloc((size_t)b->n * sizeof(*part_of));
	if (part_of == NULL)
		return -1;
	ledger_new_id(lo->dispatch_id);
	ledger_new_id(hi->dispatch_id);
	p[0] = (struct ledger_part){ b->dispatch_id, "split" }; /* no msg ids: unchanged */
	p[1] = (struct ledger_part){ lo->dispatch_id, "sending" };
	p[2] = (struct ledger_part){ hi->dispatch_id, "sending" };
	for (int i = 0; i < b->n; i++)
		part_of[i] = i < lo->n ? 1 : 2;
	ledger_split(b->d->ledger, b->dispatch_id, p, 3, b->ids, part_of, b->n);
	free(part_of);
	return 0;
}

void batch_split(struct batch *b)
{
	struct dispatcher *d = b->d;
	int half = b->n / 2;
	struct batch *lo = batch_new(d, b->rr, b->msgs, half, NULL);
	struct batch *hi = batch_new(d, b->rr, b->msgs + half, b->n - half, NULL);
	struct log_line *l;

	if (lo == NULL || hi == NULL || split_rows(b, lo, hi) != 0) {
		/* Nothing of these halves is in the ledger. */
		if (lo) {
			lo->dispatch_id[0] = '\0';
			batch_end(lo, BATCH_SPLIT, NULL);
		}
		if (hi) {
			hi->dispatch_id[0] = '\0';
			batch_end(hi, BATCH_SPLIT, NULL);
		}
		log_msg_route(d->cfg->route_name, LOG_ERROR, "out_of_memory",
			      "cannot split a batch of %d; releasing it", b->n);
		batch_release(b, 0);
		return;
	}
	l = log_begin_route(d->cfg->route_name, LOG_WARN, "batch_split");
	log_str(l, "queue", d->cfg->queue_name);
	log_int(l, "jobs", b->n);
	log_int(l, "first_msg_id", b->ids[0]);
	log_int(l, "last_msg_id", b->ids[b->n - 1]);
	log_str(l, "outcome", "413: sending the two halves");
	log_end(l);
	lo->read_at = hi->read_at = b->read_at;
	batch_end(b, BATCH_SPLIT, NULL);
	post_batch(d, lo);
	post_batch(d, hi);
}

void batch_log_archived(const struct dispatcher *d, const struct pgmq_message *m,
			const char *reason, size_t bytes, const char *problem)
{
	struct log_line *l = log_begin_route(d->cfg->route_name, LOG_ERROR, "message_archived");

	log_str(l, "queue", d->cfg->queue_name);
	log_num(l, "msg_id", m->msg_id);
	log_str(l, "reason", reason);
	log_num(l, "read_ct", m->read_ct);
	if (bytes) {
		log_int(l, "body_bytes", (long long)bytes);
		if (problem == NULL)
			log_int(l, "max_body_bytes", d->cfg->max_body_bytes);
	} else {
		log_int(l, "max_read_ct", d->cfg->max_read_ct);
	}
	if (problem)
		log_str(l, "problem", problem);
	log_end(l);
}

void batch_archive_too_large(struct batch *b, size_t body_bytes)
{
	struct dispatcher *d = b->d;

	batch_log_archived(d, &b->msgs[0], "too_large", body_bytes,
			   "RunPod answered 413 to this message on its own");
	/* The row goes on as the archive's: archiving (with the 413, leased
	 * until the archive is done), then archived. */
	ledger_note(d->ledger, b->dispatch_id, "archiving", b->http_status, NULL, b->error,
		    b->error_len, true);
	batch_archive(d, b->rr, b->msgs, 1, METRICS_ARCHIVE_TOO_LARGE, b->dispatch_id);
	b->dispatch_id[0] = '\0';
	batch_end(b, BATCH_SPLIT, NULL);
}
