/* ctl — `pgmq-dispatcher ctl ...`: the command-line client of the running
 * daemon's runtime control (pause, resume, drain, routes).
 *
 * Talks to the admin endpoint named by admin.listen (a wildcard host is
 * reached on loopback) with a blocking libcurl easy request, sending
 * admin.token as a bearer token when one is set. Knows nothing of the
 * dispatcher: the daemon answers. */
#ifndef PGMQD_CTL_H
#define PGMQD_CTL_H

#include "config.h"

/* Runs one ctl command: argv[0] is "routes", or "pause", "resume" or
 * "drain" followed by a route name. Prints the answer to stdout and
 * problems to stderr. Returns 0, EX_USAGE, EX_CONFIG, EX_UNAVAILABLE (no
 * answer), EX_DATAERR (no such route) or EX_NOPERM (refused). */
int ctl_run(const struct config *cfg, int argc, char *const *argv);

#endif
