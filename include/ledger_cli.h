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

#endif
