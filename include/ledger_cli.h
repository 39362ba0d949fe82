/* ledger_cli — the commands that read and act on the ledger with one
 * blocking connection, outside the loop: `migrate` (migrate.c),
 * `status MSG_ID…` (every dispatch of those messages and where each
 * message is now), `jobs [--state S] [--since T]` (dispatches, newest
 * first), `redrive` (archived messages back into the queue, one
 * transaction each, recorded in the ledger). Output is an aligned table
 * with relative times, or JSON with --json. Knows nothing of the loop,
 * HTTP or RunPod. */
#ifndef PGMQD_LEDGER_CLI_H
#define PGMQD_LEDGER_CLI_H

#include "config.h"

#include <stdbool.h>

/* True when name is one of the commands above. */
bool ledger_cli_known(const char *name);

/* Runs command with its arguments (argv[0] is the command's name).
 * Returns the process exit code; errors are one line on stderr. */
int ledger_cli_main(const struct config *cfg, const char *command, int argc, char **argv);

/* "90s", "15m", "2h", "3d" → seconds; -1 when s is not such a span. Pure. */
long ledger_cli_span_s(const char *s);

/* now - then as "12s", "5m", "3h", "2d" (at most 16 bytes). Pure. */
void ledger_cli_ago(double seconds, char *buf, size_t len);

#endif
