/* batch — the life of a batch: the messages of one read on their way to
 * one fate (a /run request, a release, an archive). Owns the read's rows
 * (shared, reference-counted), the batch and its msg ids, and the one
 * teardown, batch_end, which logs the ids whose fate needs explaining and
 * frees. Also the pure decision of what becomes of each row of a read.
 * Knows nothing of HTTP, rate caps, the circuit or NOTIFY. */
#ifndef PGMQD_BATCH_H
#define PGMQD_BATCH_H

#include "dispatcher_int.h"
#include "log.h"

#define BATCH_MAX_PARTS 64 /* ledger rows one part of a read is split into; more stay in its row */

/* How a batch ended. */
enum batch_fate {
	BATCH_ACCEPTED,       /* a job owns the messages (logged by the poster) */
	BATCH_UNKNOWN,        /* a job may exist; messages keep their vt */
	BATCH_RELEASED,       /* set_vt done (logged with the count) */
	BATCH_RELEASE_FAILED, /* set_vt failed: visible again after vt */
	BATCH_ARCHIVED,       /* archived (each message logged when chosen) */
	BATCH_ARCHIVE_FAILED, /* archive failed: visible again after vt */
	BATCH_UNSENT,         /* never sent (exit): visible again after vt */
	BATCH_DROPPED,        /* out of memory or being freed: visible after vt */
	BATCH_SPLIT,          /* handed on whole to two smaller batches or an archive */
};

/* What a /run rejection means for the batch that got it. */
enum reject_action {
	REJECT_RELEASE,   /* may pass later (429, 5xx, 400 ...): released after the pause */
	REJECT_SPLIT,     /* this body will never pass (413): send the two halves */
	REJECT_TOO_LARGE, /* one message whose body still gets 413: archived */
};

/* The action for a batch of n messages rejected with http_status. Only a
 * 413 is taken as final for the same body: it depends on the body alone.
 * A 400 may be our envelope or configuration (webhook, policy), which
 * every message would share, so it is released with the growing pause and
 * left to max_read_ct rather than archiving good messages. Pure. */
enum reject_action batch_reject_action(long http_status, int n);

/* What becomes of one row of a read. */
enum row_fate {
	ROW_SEND,         /* goes out in a /run request */
	ROW_TOO_LARGE,    /* cannot fit a request on its own: archived */
	ROW_MAX_READ_CT,  /* read more than max_read_ct times: archived */
	ROW_INVALID,      /* malformed row with a usable msg_id: released after a pause */
	ROW_INVALID_LOST, /* malformed row, no msg_id: visible again after vt */
};

/* The fate of row m given the /run envelope size, max_body_bytes and
 * max_read_ct (0 = no limit). Pure. */
enum row_fate batch_row_fate(const struct pgmq_message *m, size_t envelope_bytes, size_t limit,
			     int max_read_ct);

/* A batch of n messages (copied) from rr, which it references, recorded
 * under the ledger row dispatch_id (NULL or "": none); NULL when out of
 * memory. */
struct batch *batch_new(struct dispatcher *d, struct read_result *rr,
			const struct pgmq_message *msgs, int n, const char *dispatch_id);

/* Releases every row of rr at once (a read that came back while stopping
 * or paused): one set_vt per part, each recorded under its ledger row. */
void batch_release_read(struct dispatcher *d, struct read_result *rr);

void read_result_unref(struct read_result *rr);

/* The one teardown of a batch: logs its ids where fate asks for it (why
 * says what becomes of them) and frees it. */
void batch_end(struct batch *b, enum batch_fate fate, const char *why);

/* Makes the batch's messages visible again after delay_s (one set_vt);
 * the batch ends when the statement does. */
void batch_release(struct batch *b, int delay_s);

/* Hands b on to two batches of its halves, each queued behind the rate
 * cap (the lower msg ids first); b ends as BATCH_SPLIT. If memory runs
 * out, b is released instead. */
void batch_split(struct batch *b);

/* Archives the one message of b, which RunPod refused with 413 on its own
 * (logged with msg_id and body_bytes); b ends as BATCH_SPLIT. */
void batch_archive_too_large(struct batch *b, size_t body_bytes);

/* Logs the one message_archived line of m: reason (max_read_ct,
 * too_large), body_bytes when bytes > 0 (with max_body_bytes unless a
 * problem is given), the problem when not NULL. */
void batch_log_archived(const struct dispatcher *d, const struct pgmq_message *m,
			const char *reason, size_t bytes, const char *problem);

/* Archives n messages from rr that must never be dispatched; their
 * ledger row is dispatch_id ("" for the read's). */
void batch_archive(struct dispatcher *d, struct read_result *rr, const struct pgmq_message *msgs,
		   int n, enum metrics_archive_reason reason, const char *dispatch_id);

/* pgmq.archive of ids[0..n): with its ledger record in the same statement
 * while the ledger records (ledger_archive: under dispatch_id's row, or a
 * new row when it is ""; *recorded set), else plain pgmq_archive. reason
 * as in message_archived. Returns 0, or -1 when not queued. */
int batch_archive_ids(struct dispatcher *d, const char *dispatch_id, const long long *ids, int n,
		      long http_status, const char *error, size_t error_len, const char *reason,
		      pgmq_count_fn fn, void *arg, bool *recorded);

/* Logs msg ids in lines of 100 under event, so that no id is cut. */
void batch_log_ids(enum log_level level, const char *event, const struct dispatcher *d,
		   const long long *ids, int n, const char *why);

/* Splits msgs[0..n) into /run bodies of at most max_jobs messages, each
 * body within limit bytes (runpod_pack per max_jobs chunk); ends as
 * runpod_pack. Returns the number of bodies. Pure. */
int batch_pack(const struct pgmq_message *msgs, int n, size_t envelope, size_t limit, int max_jobs,
	       int *ends);

/* How long a drain read waits for more free slots (batch_read_waits) at
 * most before it takes what is free: long enough for a fast endpoint's
 * answers to free half the slots, short beside a RunPod round trip. */
#define BATCH_READ_GATHER_S 0.005

/* The /run bodies one read may claim for: read_batches, bounded by the
 * free in-flight slots and the /run requests the rate cap allows within
 * the next second; at least one. Pure. */
int batch_read_bodies(int read_batches, int free_slots, int rate_next_s);

/* How many messages one read may claim: batch_size x batch_read_bodies,
 * at most 1000 (queue.batch_size's maximum) unless batch_size is larger.
 * Pure. */
int batch_read_qty(int batch_size, int read_batches, int free_slots, int rate_next_s);

/* Whether a read should wait for more free slots before it goes: only
 * with a backlog (the last read came back full) while requests are in
 * flight, while fewer bodies than half the in-flight ceiling (or
 * read_batches, if fewer) could go now, and only when free_slots, not
 * rate_next_s (the rate budget or fleet grant of the next second), is what
 * holds the read short: slots come back within a few ms as answers
 * arrive, the rate budget does not. Without the wait, each answer freeing
 * one slot would start a read of one batch, and a backlog would be read
 * batch by batch. Pure. */
bool batch_read_waits(bool backlog, int in_flight, int max_in_flight, int read_batches,
		      int free_slots, int rate_next_s);

#endif
