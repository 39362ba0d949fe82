/* commands — the command line's one-shot modes: what answers once and
 * exits instead of running the daemon. `ctl ...` (the running daemon's
 * runtime control, ctl.h), the ledger commands `migrate`, `status`, `jobs`
 * and `redrive` (ledger_cli.h), -t/--check-config, -T/--dump-config,
 * --health-check and --dry-run.
 *
 * Owns picking the command out of the arguments left after the options
 * and running it on a loaded configuration. Knows nothing of the daemon's
 * loop, signals or routes (main.c), nor of what each command does (its
 * own module). */
#ifndef PGMQD_COMMANDS_H
#define PGMQD_COMMANDS_H

#include "config.h"

#include <stdbool.h>

/* What the command line asked for besides the daemon. argv points into
 * main's argv (not copied). */
struct command {
	bool ctl;           /* `ctl ARGS...`: argc/argv are the ARGS */
	const char *ledger; /* a ledger command's name: argv[0] is it */
	int argc;
	char **argv;
	bool check, dump;  /* -t, -T (both: dump, then nothing else) */
	bool health_check; /* --health-check */
	bool dry_run;      /* --dry-run */
	const char *path;  /* the configuration file named (for -t's line) */
};

/* Fills the command words of c from argv[first..argc) (the options' flags
 * are set by the caller). Returns 0, or -1 after printing one line naming
 * an unexpected argument to stderr (the caller prints the usage and exits
 * with EX_USAGE). */
int command_pick(struct command *c, int argc, char **argv, int first);

/* True when c asks for a one-shot mode (the configuration is still
 * loaded first: every mode uses it). */
bool command_is_oneshot(const struct command *c);

/* Runs the one-shot mode of c on cfg (owned by the caller) and returns its
 * exit code: ctl_run's, 0 after -t/-T, ledger_cli_main's, 0 or 1 for
 * --health-check, 0 or EX_UNAVAILABLE for --dry-run; EX_SOFTWARE when
 * libcurl cannot start for ctl. Call only when command_is_oneshot(c). */
int command_run(const struct command *c, const struct config *cfg);

#endif
