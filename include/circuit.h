/* circuit — the circuit breaker's decisions. While RunPod refuses the key
 * or the endpoint (401/403/404 on /run) the circuit is open: no reads, and
 * a /health probe on a backed-off timer until one succeeds or the
 * configuration is reloaded. The state machine is pure here; the acting
 * (timers, logs, the probe request) is in circuit.c. circuit.c also holds
 * the other RunPod-side stop of reads, tracker.max_queued_jobs (jobs that
 * never start). Knows nothing of batches, reads or NOTIFY. */
#ifndef PGMQD_CIRCUIT_H
#define PGMQD_CIRCUIT_H

#include <stdbool.h>

enum circuit_event {
	CIRCUIT_RUN_REPLY,   /* a /run request ended with http_status */
	CIRCUIT_PROBE_REPLY, /* a /health probe ended with http_status (0: transport error) */
	CIRCUIT_RELOAD,      /* the configuration was reloaded */
};

enum circuit_action {
	CIRCUIT_NONE,        /* nothing changes */
	CIRCUIT_OPEN,        /* open: stop reads, start probing */
	CIRCUIT_CLOSE,       /* close: reads resume */
	CIRCUIT_PROBE_LATER, /* still open: next probe after a backoff */
	CIRCUIT_PROBE_NOW,   /* still open: probe at once, backoff reset */
};

/* What to do on event with the circuit open or closed. Pure. */
enum circuit_action circuit_next(bool open, enum circuit_event ev, long http_status);

#endif
