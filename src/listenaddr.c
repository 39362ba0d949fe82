/* listenaddr — see include/listenaddr.h. */
#include "listenaddr.h"

#include <string.h>

const char *listenaddr_split(const char *v, char *host, size_t host_cap, int *port)
{
	const char *h, *colon;
	size_t hostlen;
	long p = 0;

	if (v == NULL || *v == '\0')
		return "empty listen address";
	for (const unsigned char *c = (const unsigned char *)v; *c; c++)
		if (*c <= ' ' || *c == 0x7f)
			return "contains whitespace or a control character";
	if (v[0] == '[') {
		colon = strchr(v, ']');
		if (colon == NULL || colon[1] != ':')
			return "expected [addr]:port";
		h = v + 1;
		hostlen = (size_t)(colon - h);
		colon++;
	} else {
		colon = strrchr(v, ':');
		if (colon == NULL || strchr(v, ':') != colon)
			return "expected host:port or [v6addr]:port";
		h = v;
		hostlen = (size_t)(colon - h);
	}
	if (hostlen == 0 || hostlen > LISTENADDR_HOST_MAX || hostlen >= host_cap)
		return "missing or overlong host";
	if (colon[1] == '\0')
		return "port must be 0..65535";
	for (const char *d = colon + 1; *d; d++) {
		if (*d < '0' || *d > '9' || (p = p * 10 + (*d - '0')) > 65535)
			return "port must be 0..65535";
	}
	memcpy(host, h, hostlen);
	host[hostlen] = '\0';
	*port = (int)p;
	return NULL;
}
