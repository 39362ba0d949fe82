/* main — command line, exit codes, wiring and signals.
 *
 * Exit codes (sysexits.h): 0 success; 64 EX_USAGE bad flags; 78 EX_CONFIG
 * invalid configuration; 70 EX_SOFTWARE setup failure; 71 EX_OSERR loop or
 * signal setup failed. With --once (a drop-in for a cron tick): 0 a batch
 * was accepted or the queue was empty (one line says which), 69 EX_UNAVAILABLE the database failed or RunPod rejected the batch
 * (its messages were released), 75 EX_TEMPFAIL the outcome is unknown (the
 * messages keep their vt). */
#ifndef PGMQD_MAIN_H
#define PGMQD_MAIN_H

#define EXIT_ONCE_EMPTY 0

#endif
