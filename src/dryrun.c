/* dryrun — --dry-run: one blocking look at the next batch (pgmq_peek, no
 * lock, no change) and the /run bodies a read would send now. Shares the
 * split (runpod_pack) with the pipeline; knows nothing of the event loop. */
#include "dispatcher_int.h"
#include "log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int dispatcher_dry_run(const struct config *cfg, FILE *out)
{
	const char *kw[] = { "fallback_application_name", "dbname", NULL };
	const char *val[] = { "pgmq-dispatcher --dry-run", cfg->conninfo, NULL };
	struct runpod_extras extras = dispatcher_extras_of(cfg);
	size_t envelope = runpod_envelope_bytes(cfg->queue_name, cfg->vt_seconds, &extras);
	PGconn *conn;
	PGresult *res;
	struct pgmq_batch rows;
	char err[512];
	int *ends, runs;

	if (cfg->conninfo[0] == '\0')
		kw[1] = NULL;
	conn = PQconnectdbParams(kw, val, 1);
	if (PQstatus(conn) != CONNECTION_OK) {
		log_msg(LOG_ERROR, "dry_run_failed", "%.*s",
			(int)strcspn(PQerrorMessage(conn), "\n"), PQerrorMessage(conn));
		PQfinish(conn);
		return -1;
	}
	res = pgmq_peek(conn, cfg->queue_name, cfg->batch_size, err, sizeof(err));
	PQfinish(conn);
	if (res == NULL || pgmq_batch_from_result(res, &rows, err, sizeof(err)) != 0) {
		log_msg(LOG_ERROR, "dry_run_failed", "%s", err);
		return -1;
	}
	ends = malloc(((size_t)rows.n + 1) * sizeof(*ends));
	if (ends == NULL) {
		pgmq_batch_free(&rows);
		return -1;
	}
	runs = runpod_pack(rows.msgs, rows.n, envelope, (size_t)cfg->max_body_bytes, ends);
	for (int r = 0, start = 0; r < runs; start = ends[r++]) {
		char *body = runpod_run_body(cfg->queue_name, cfg->vt_seconds, &extras,
					     rows.msgs + start, ends[r] - start, NULL);
		if (body)
			fprintf(out, "%s\n", body);
		free(body);
	}
	log_msg(LOG_INFO, "dry_run",
		"%d visible message%s would go out in %d /run request%s; "
		"nothing was changed",
		rows.n, rows.n == 1 ? "" : "s", runs, runs == 1 ? "" : "s");
	free(ends);
	pgmq_batch_free(&rows);
	return 0;
}
