/* ledger_sql — the ledger's SQL text (printf formats taking the schema,
 * the read's also the read function) and the pure helpers around it: a
 * dispatch id, array literals for parameters, array text back to ids.
 * Knows nothing of the loop or the connection; ledger.c runs the SQL. */
#ifndef PGMQD_LEDGER_SQL_H
#define PGMQD_LEDGER_SQL_H

#include <stddef.h>

/* The read and its `sending` row in one statement (read function, schema). */
extern const char LEDGER_READ_SQL[];
/* Every noted transition in one statement (schema). */
extern const char LEDGER_NOTES_SQL[];
/* One read's row re-cut into parts (schema ×3). */
extern const char LEDGER_SPLIT_SQL[];
/* pgmq.archive with its record (schema, queue table). */
extern const char LEDGER_ARCHIVE_SQL[];
/* Renew leases, recover rows of dead replicas, prune (schema ×4). */
extern const char LEDGER_TICK_SQL[];
/* Take expired leases of accepted jobs (schema ×2). */
extern const char LEDGER_CLAIM_SQL[];

/* "{1,2,3}" (PostgreSQL's bigint[] text) → *out, malloc'd; returns the
 * count, -1 when out of memory. Pure. */
int ledger_parse_ids(const char *s, long long **out);

#endif
