/* ledger_view — what `pgmq-dispatcher status` / `jobs` (ledger_cli.c,
 * blocking, on the command line) and GET /dispatches (dispatches.c, on the
 * loop) share: the validation of their arguments, their SQL and the JSON
 * of their rows. Pure: no I/O, no connection; knows nothing of the loop,
 * HTTP or how the statement is run. */
#ifndef PGMQD_LEDGER_VIEW_H
#define PGMQD_LEDGER_VIEW_H

#include <cjson/cJSON.h>
#include <libpq-fe.h>
#include <stdbool.h>
#include <stddef.h>

#define LEDGER_VIEW_ID_BYTES 22      /* one msg id in the array literal, comma included */
#define LEDGER_VIEW_JOBS_DEFAULT 100 /* rows `jobs` lists without a limit */
#define LEDGER_VIEW_STATE_MAX 32     /* bytes of a state asked for */
#define LEDGER_VIEW_SQL_BYTES 4096   /* room for either statement */

/* Seconds (epoch) columns shown as relative times by the table output. */
extern const char *const LEDGER_VIEW_AGO_COLS[];

/* Builds the array literal "{1,2}" ($1 of the status statement) from the
 * texts[0..n) (each a decimal msg id >= 1), at most max of them, into buf.
 * Returns 0, or -1 with one line naming the bad text in why. */
int ledger_view_ids(const char *const *texts, int n, int max, char *buf, size_t len, char *why,
		    size_t whylen);

/* "90s", "15m", "2h", "3d" → seconds; -1 when s is not such a span. */
long ledger_view_span_s(const char *s);

/* now - then as "12s", "5m", "3h", "2d" (at most 16 bytes). */
void ledger_view_ago(double seconds, char *buf, size_t len);

/* A row limit: a decimal in 1..max, or -1. */
int ledger_view_limit(const char *s, int max);

/* Whether s may be a state: 1..LEDGER_VIEW_STATE_MAX letters, digits or '_'. */
bool ledger_view_state_ok(const char *s);

/* The `since` value: a span ("15m") fills span (an interval, $4) and
 * leaves *ts NULL; anything else is a timestamp for PostgreSQL ($3). */
void ledger_view_since(const char *since, char *span, size_t spanlen, const char **ts);

/* The queue's table and its archive's, quoted (pgmq."q_jobs",
 * pgmq."a_jobs"), into q and a (len bytes each). Returns 0 or -1. */
int ledger_view_tables(const char *queue, char *q, char *a, size_t len);

/* Every dispatch of the msg ids in $1 (bigint[] literal), at most $2 rows,
 * in the order asked, oldest first, with where each message is now
 * (queue, archive or gone) and its state history. brief: the columns of
 * the table output only. Returns 0, or -1 when the queue name or the
 * statement does not fit. */
int ledger_view_status_sql(const char *schema, const char *queue, bool brief, char *buf,
			   size_t len);

/* Dispatches of queue $1, newest first: state $2 (NULL: any), read at or
 * after timestamp $3 or within interval $4 (NULL: any), at most $5 rows.
 * Returns 0 or -1 when it does not fit. */
int ledger_view_jobs_sql(const char *schema, char *buf, size_t len);

/* The rows of res as a JSON array of objects, one member per column:
 * numbers and json/jsonb as such, int arrays as arrays, NULL as null, the
 * rest as strings. NULL when out of memory. The caller frees. */
cJSON *ledger_view_json(const PGresult *res);

#endif
