/* listenaddr — the syntax of admin.listen, in one place: "host:port" or
 * "[v6addr]:port", port 0..65535. Config validates with it, admin binds
 * with it, main reads its port. Pure: knows nothing of sockets, name
 * resolution (admin does that) or the "off" value (config's). */
#ifndef PGMQD_LISTENADDR_H
#define PGMQD_LISTENADDR_H

#include <stddef.h>

/* Longest host part accepted, in bytes. */
#define LISTENADDR_HOST_MAX 255

/* Splits v into host (brackets of a v6 address removed, NUL-terminated;
 * host_cap >= LISTENADDR_HOST_MAX + 1) and *port. Returns NULL, or the
 * problem as one phrase (e.g. "port must be 0..65535"); host and *port are
 * then unspecified. Does not resolve the host. */
const char *listenaddr_split(const char *v, char *host, size_t host_cap, int *port);

#endif
