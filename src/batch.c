/* batch — see include/batch.h. */
#include "batch.h"

#include <stdio.h>
#include <stdlib.h>

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
			const struct pgmq_message *msgs, int n)
{
	struct batch *b = calloc(1, sizeof(*b));

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

void batch_end(struct batch *b, enum batch_fate fate, const char *why)
{
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
		   int n, enum metrics_archive_reason reason)
{
	struct batch *b;

	if (n == 0)
		return;
	b = batch_new(d, rr, msgs, n);
	if (b)
		b->archive_reason = reason;
	if (b == NULL || pgmq_archive(d->pg, d->cfg->queue_name, b->ids, n, on_archived, b) != 0) {
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

int batch_read_qty(int batch_size, int read_batches, int free_slots, int rate_next_s)
{
	int bodies = read_batches;
	long qty;

	if (free_slots < bodies)
		bodies = free_slots;
	if (rate_next_s < bodies)
		bodies = rate_next_s;
	if (bodies < 1)
		bodies = 1;
	qty = (long)batch_size * bodies;
	return qty > 1000 ? (batch_size > 1000 ? batch_size : 1000) : (int)qty;
}

void batch_split(struct batch *b)
{
	struct dispatcher *d = b->d;
	int half = b->n / 2;
	struct batch *lo = batch_new(d, b->rr, b->msgs, half);
	struct batch *hi = batch_new(d, b->rr, b->msgs + half, b->n - half);
	struct log_line *l;

	if (lo == NULL || hi == NULL) {
		if (lo)
			batch_end(lo, BATCH_SPLIT, NULL);
		if (hi)
			batch_end(hi, BATCH_SPLIT, NULL);
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
	batch_archive(d, b->rr, b->msgs, 1, METRICS_ARCHIVE_TOO_LARGE);
	batch_end(b, BATCH_SPLIT, NULL);
}
