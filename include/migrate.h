/* migrate — the ledger's schema and its versioned, idempotent migrations.
 *
 * One DO block brings the schema (ledger.schema, default pgmq_dispatcher)
 * from whatever version it is at up to the version this build knows,
 * under a transaction-level advisory lock so that replicas starting at
 * once migrate one after the other. It is one statement, so it runs as
 * well through the daemon's asynchronous connection (at start, when the
 * role may) as from `pgmq-dispatcher migrate` (blocking, for locked-down
 * roles). A schema newer than this build fails with SQLSTATE PD001 naming
 * both versions. Knows nothing of the loop, reads or RunPod. */
#ifndef PGMQD_MIGRATE_H
#define PGMQD_MIGRATE_H

#include "config.h"

#include <libpq-fe.h>

#define MIGRATE_VERSION 4              /* the schema version this build knows */
#define MIGRATE_SQLSTATE_NEWER "PD001" /* the schema is newer than MIGRATE_VERSION */

/* The migration statement for schema (a validated identifier) up to
 * target (1..MIGRATE_VERSION), malloc'd; NULL when out of memory. */
char *migrate_sql(const char *schema, int target);

/* The schema's version through a blocking connection: 0 when there is
 * no ledger schema yet, -1 on error (one line in err). */
int migrate_current(PGconn *conn, const char *schema, char *err, size_t errlen);

/* One line for a failed migration: what went wrong and what to do (a role
 * without CREATE is pointed at `pgmq-dispatcher migrate`). Pure. */
void migrate_explain(const char *schema, const char *sqlstate, const char *message, char *buf,
		     size_t len);

/* `pgmq-dispatcher migrate [--target-version N]`: applies the migrations
 * with a blocking connection and prints the version before and after.
 * Returns the process exit code (0 also when already up to date). */
int migrate_main(const struct config *cfg, int argc, char **argv);

#endif
