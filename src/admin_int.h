/* admin_int.h — what admin.c (the listener) and admin_probe.c (the
 * blocking /healthz probe) share. Private to those two files. */
#ifndef PGMQD_ADMIN_INT_H
#define PGMQD_ADMIN_INT_H

#include <stddef.h>
#include <sys/socket.h>

/* Resolves an admin.listen value (syntax: include/listenaddr.h) into a
 * socket address. Returns 0, or -1 with a reason in err. */
int admin_parse_listen(const char *addr, struct sockaddr_storage *ss, socklen_t *sslen, char *err,
		       size_t errlen);

#endif
