/* overflow — the rows whose read_ct reached the int4 limit (2^31-1), which
 * make every pgmq.read fail with SQLSTATE 22003: finds them after such a
 * failed read, names them and the way out in one log line, and archives
 * them when the poison guard (max_read_ct) is on (recorded in the ledger
 * with the archive: batch_archive_ids). Knows nothing of HTTP or NOTIFY. */
#include "batch.h"
#include "dispatcher_int.h"
#include "log.h"

#include <stdio.h>

#define OVERFLOW_IDS_MAX 100
#define OVERFLOW_ERROR "read_ct at the integer limit 2147483647: every pgmq.read failed on it"

static void on_overflow_archived(void *arg, long count, const struct pg_error *err)
{
	struct dispatcher *d = arg;
	struct log_line *l;

	d->db_pending--;
	if (err) {
		l = log_begin_route(d->cfg->route_name, LOG_ERROR,
				    "read_ct_overflow_archive_failed");
		log_str(l, "queue", d->cfg->queue_name);
		log_str(l, "sqlstate", err->sqlstate);
		log_str(l, "error", err->message);
		log_end(l);
	} else if (!d->finished) {
		l = log_begin_route(d->cfg->route_name, LOG_WARN, "read_ct_overflow_archived");
		log_str(l, "queue", d->cfg->queue_name);
		log_int(l, "messages", count);
		log_str(l, "reason", "max_read_ct");
		log_end(l);
		d->stats.messages_archived += (unsigned long long)count;
		metrics_add_messages_archived(METRICS_ARCHIVE_MAX_READ_CT, (unsigned)count);
	}
	dispatcher_maybe_finish(d);
}

/* The rows that broke the read (22003): named, with the way out; archived
 * when the poison guard is on (such a row is far past any max_read_ct and
 * can never be read again by anyone). */
static void on_overflow_found(void *arg, const long long *ids, int n, const struct pg_error *err)
{
	struct dispatcher *d = arg;
	char fix[256], quoted[160];
	struct log_line *l;

	d->db_pending--;
	if (d->finished) {
		dispatcher_maybe_finish(d);
		return;
	}
	if (err || n == 0) {
		l = log_begin_route(d->cfg->route_name, LOG_ERROR, "read_ct_overflow");
		log_str(l, "queue", d->cfg->queue_name);
		log_str(l, "problem", err ? err->message : "no row found near read_ct 2147483647");
		log_end(l);
		dispatcher_maybe_finish(d);
		return;
	}
	pgmq_quote_literal(d->cfg->queue_name, quoted, sizeof(quoted));
	snprintf(fix, sizeof(fix), "SELECT pgmq.archive(%s, %lld)%s", quoted, ids[0],
		 n > 1 ? " for each msg_id" : "");
	l = log_begin_route(d->cfg->route_name, LOG_ERROR, "read_ct_overflow");
	log_str(l, "queue", d->cfg->queue_name);
	log_str(l, "problem",
		"read_ct of these rows is at the integer limit 2147483647: "
		"every pgmq.read fails with SQLSTATE 22003");
	log_int_list(l, "msg_ids", ids, (size_t)n);
	if (d->cfg->max_read_ct > 0) {
		log_str(l, "outcome", "archiving them: read more than max_read_ct times");
	} else {
		log_str(l, "outcome", "reads stay blocked until they are archived or deleted");
		log_str(l, "fix", fix);
	}
	log_end(l);
	if (d->cfg->max_read_ct > 0) {
		bool recorded;
		/* With the ledger on, one new row records them `archived`: no
		 * dispatch ever held them (every read failed on them). */
		if (batch_archive_ids(d, "", ids, n, 0, OVERFLOW_ERROR, sizeof(OVERFLOW_ERROR) - 1,
				      "max_read_ct", on_overflow_archived, d, &recorded) == 0)
			d->db_pending++;
		else
			log_msg_route(d->cfg->route_name, LOG_ERROR,
				      "read_ct_overflow_archive_failed",
				      "cannot queue pgmq.archive");
	}
	dispatcher_maybe_finish(d);
}

void overflow_find(struct dispatcher *d)
{
	if (pgmq_find_read_ct_overflow(d->pg, d->cfg->queue_name, d->cfg->batch_size,
				       OVERFLOW_IDS_MAX, on_overflow_found, d) == 0)
		d->db_pending++;
}
