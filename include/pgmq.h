/* pgmq — the PGMQ SQL the dispatcher needs, on top of pg.
 *
 * Reads name their columns and cast every parameter
 * ($1::text, $2::integer, $3::integer): pgmq 1.10 inserted last_read_at
 * before vt and 1.12 made untyped read($1,$2,$3) ambiguous
 * (../shared/reference/pgmq-api.md §0, §5). Messages are kept as the text
 * PostgreSQL returns, so numbers, key order and unicode survive byte for
 * byte. Knows nothing of HTTP. */
#ifndef PGMQD_PGMQ_H
#define PGMQD_PGMQ_H

#include "pg.h"

#include <stdbool.h>
#include <stddef.h>

/* One message of a read. Every pointer points into the batch's PGresult. */
struct pgmq_message {
	const char *msg_id;      /* bigint as exact decimal text */
	long long msg_id_num;    /* the same, parsed (for ordering and logs) */
	const char *read_ct;     /* integer as decimal text */
	const char *enqueued_at; /* to_json(enqueued_at): a JSON string literal, quotes included */
	const char *message;     /* jsonb as PostgreSQL's JSON text; "null" for SQL NULL */
	size_t message_len;
	const char *document_id; /* JSON text of message->'document_id', or NULL */
	const char *invalid;     /* NULL, or why this row cannot be sent (a wrapper
				     returned a NULL or malformed field) */
	bool id_ok;              /* msg_id_num is valid (the row can be released) */
};

/* The rows of one read, ordered by msg_id. Owns the PGresult. */
struct pgmq_batch {
	PGresult *res;
	int n;
	struct pgmq_message *msgs;
};

/* The columns a read selects from the read function's rows. */
#define PGMQ_READ_COLUMNS                                                 \
	"msg_id, read_ct, to_json(enqueued_at) AS enqueued_at, message, " \
	"message->'document_id' AS document_id"

/* Builds the read statement for a validated function name (see config's
 * read_function) into buf. Returns 0, or -1 if it does not fit. */
int pgmq_read_sql(const char *read_function, char *buf, size_t len);

/* Turns a read result into a batch, taking ownership of res (freed on
 * error too). Columns are looked up by name. A row with a NULL or
 * malformed field stays in the batch with `invalid` set (and id_ok telling
 * whether its msg_id is usable), so that the caller can release or at
 * least name it: the read has already hidden it. Returns -1 with a
 * one-line reason in err only when there is no msg_id column at all. */
int pgmq_batch_from_result(PGresult *res, struct pgmq_batch *out, char *err, size_t errlen);

/* Frees the batch's rows and its PGresult. NULL-safe. */
void pgmq_batch_free(struct pgmq_batch *b);

/* Read completion: on success *batch is filled (n may be 0) and owned by the
 * callee; on failure err is set (see pg.h) and batch is NULL. */
typedef void (*pgmq_read_fn)(void *arg, struct pgmq_batch *batch, const struct pg_error *err);

/* Reads up to qty messages, invisible for vt_seconds, with read_function
 * (pgmq.read or a wrapper with parameters queue_name, vt, qty). Returns 0 or
 * -1 when the query could not be queued (fn is then not called). */
int pgmq_read(struct pg *pg, const char *read_function, const char *queue, int vt_seconds, int qty,
	      pgmq_read_fn fn, void *arg) __attribute__((warn_unused_result));

/* Runs a read statement of the caller's (selecting PGMQ_READ_COLUMNS,
 * e.g. wrapped in a CTE that records it); rows reach fn as pgmq_read's.
 * Returns 0 or -1 when the query could not be queued. */
int pgmq_read_query(struct pg *pg, const char *sql, int nparams, const char *const *params,
		    pgmq_read_fn fn, void *arg) __attribute__((warn_unused_result));

/* Sets the vt of the given messages to now + delay_s in one statement
 * (pgmq.set_vt per id, which exists since pgmq 1.2; the array form needs
 * 1.8). fn gets the number of messages updated (absent ids are skipped), or
 * -1 and err. Returns 0 or -1 when the query could not be queued. */
typedef void (*pgmq_count_fn)(void *arg, long count, const struct pg_error *err);
int pgmq_set_vt(struct pg *pg, const char *queue, const long long *msg_ids, int n, int delay_s,
		pgmq_count_fn fn, void *arg) __attribute__((warn_unused_result));

/* Moves messages to the archive table with pgmq.archive (per id, one
 * statement). Same conventions as pgmq_set_vt(). */
int pgmq_archive(struct pg *pg, const char *queue, const long long *msg_ids, int n,
		 pgmq_count_fn fn, void *arg) __attribute__((warn_unused_result));

/* Runs a statement of the caller's whose one row, one column is a count
 * (e.g. pgmq.archive wrapped in a CTE that records it); fn as for
 * pgmq_set_vt(). Returns 0 or -1 when the query could not be queued. */
int pgmq_count_query(struct pg *pg, const char *sql, int nparams, const char *const *params,
		     pgmq_count_fn fn, void *arg) __attribute__((warn_unused_result));

/* "{1,2,3}", the text form of a bigint[] parameter, malloc'd; NULL when
 * out of memory. Pure. */
char *pgmq_id_array(const long long *ids, int n);

/* Queue length and age of the oldest message from pgmq.metrics (pgmq-api.md
 * §2.3; the age is NULL for an empty queue, reported as 0). fn gets
 * length and oldest_age_s, or err. Returns 0 or -1 when not queued. */
typedef void (*pgmq_metrics_fn)(void *arg, long long length, double oldest_age_s,
				const struct pg_error *err);
int pgmq_metrics(struct pg *pg, const char *queue, pgmq_metrics_fn fn, void *arg)
	__attribute__((warn_unused_result));

/* The queue's table in schema pgmq, q_ + lower(queue) (pgmq-api.md §3.4),
 * unquoted, into buf. Returns 0, or -1 when it does not fit. Pure. */
int pgmq_table_name(const char *queue, char *buf, size_t len);

/* Writes s as an SQL string literal ('...', quotes doubled) into buf, for
 * the statements the logs suggest (pgmq.create, pgmq.archive). Returns 0,
 * or -1 when it does not fit in len bytes (buf is then ""). Pure. */
int pgmq_quote_literal(const char *s, char *buf, size_t len);

/* Writes "SELECT pgmq.create('<queue>');" into buf: the way out that a
 * missing queue's log lines give. Returns 0, or -1 when cut. Pure. */
int pgmq_create_call(const char *queue, char *buf, size_t len);

/* Blocking, read-only look at the next qty visible messages of a queue
 * (for --dry-run): selects from pgmq.q_<lower(queue)> without locking or
 * changing anything; read_ct is shown as the read would make it (+1).
 * Returns a result for pgmq_batch_from_result(), or NULL with a one-line
 * reason in err. */
PGresult *pgmq_peek(PGconn *conn, const char *queue, int qty, char *err, size_t errlen);

/* Like pgmq_set_vt(), but fn gets the msg ids that were actually updated
 * (a message the worker already deleted or archived gives no row), in no
 * particular order; ids is valid during the call only. On failure ids is
 * NULL, n is 0 and err is set. One statement, pgmq.set_vt per id (pgmq >=
 * 1.2). Returns 0 or -1 when the query could not be queued (fn is then not
 * called). */
typedef void (*pgmq_ids_fn)(void *arg, const long long *ids, int n, const struct pg_error *err);
int pgmq_set_vt_ids(struct pg *pg, const char *queue, const long long *msg_ids, int n, int delay_s,
		    pgmq_ids_fn fn, void *arg) __attribute__((warn_unused_result));

/* read_ct is an integer (int4) column: pgmq.read fails with SQLSTATE 22003
 * (numeric_value_out_of_range) once a row it picks is at this value. */
#define PGMQ_READ_CT_MAX 2147483647
#define PGMQ_SQLSTATE_OUT_OF_RANGE "22003"

/* The msg ids (at most limit, highest read_ct first) of the rows of queue
 * whose read_ct is within margin of PGMQ_READ_CT_MAX: the rows that make a
 * read fail with 22003. Selects from pgmq.q_<lower(queue)>, locks nothing.
 * fn as for pgmq_set_vt_ids(). Returns 0, or -1 when not queued. */
int pgmq_find_read_ct_overflow(struct pg *pg, const char *queue, int margin, int limit,
			       pgmq_ids_fn fn, void *arg) __attribute__((warn_unused_result));

#endif
