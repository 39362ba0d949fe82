/* config_check — see include/config_check.h. */
#include "config_check.h"
#include "listenaddr.h"

#include <ctype.h>
#include <errno.h>
#include <libpq-fe.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

/* Edit distance (Levenshtein) of two short strings, capped at 99. */
int config_distance(const char *a, const char *b)
{
	size_t la = strlen(a), lb = strlen(b);
	int row[65];

	if (la > 64 || lb > 64)
		return 99;
	for (size_t j = 0; j <= lb; j++)
		row[j] = (int)j;
	for (size_t i = 1; i <= la; i++) {
		int diag = row[0];
		row[0] = (int)i;
		for (size_t j = 1; j <= lb; j++) {
			int up = row[j], best = diag + (tolower((unsigned char)a[i - 1]) !=
							tolower((unsigned char)b[j - 1]));
			if (up + 1 < best)
				best = up + 1;
			if (row[j - 1] + 1 < best)
				best = row[j - 1] + 1;
			diag = up;
			row[j] = best;
		}
	}
	return row[lb];
}

/* True for the example file's stand-ins ("your-endpoint-id", "<key>",
 * "changeme"): a value that was never filled in. */
bool config_is_placeholder(const char *v)
{
	size_t n = strlen(v);

	return strncasecmp(v, "your-", 5) == 0 || strncasecmp(v, "your_", 5) == 0 ||
	       (n >= 2 && v[0] == '<' && v[n - 1] == '>') || strcasecmp(v, "changeme") == 0 ||
	       strcasecmp(v, "change-me") == 0 || strcasecmp(v, "todo") == 0;
}

/* True when a longer value (a conninfo) holds an unfilled part of an
 * example: "<...>" or a word starting "your-"/"your_". */
bool config_has_placeholder_part(const char *v)
{
	for (const char *lt = strchr(v, '<'); lt; lt = strchr(lt + 1, '<')) {
		const char *q = lt + 1;
		while (isalnum((unsigned char)*q) || *q == '-' || *q == '_' || *q == ' ')
			q++;
		if (*q == '>' && q > lt + 1)
			return true;
	}
	for (const char *p = v; *p; p++)
		if ((p == v || !isalnum((unsigned char)p[-1])) &&
		    (strncasecmp(p, "your-", 5) == 0 || strncasecmp(p, "your_", 5) == 0))
			return true;
	return false;
}

/* Strict decimal integer: optional '-', digits, nothing else. */
bool config_parse_int(const char *s, long *out)
{
	char *end;
	long v;

	if (*s == '\0' || isspace((unsigned char)*s) || *s == '+')
		return false;
	errno = 0;
	v = strtol(s, &end, 10);
	if (errno != 0 || *end != '\0')
		return false;
	*out = v;
	return true;
}

static bool has_control(const char *v)
{
	for (; *v; v++)
		if ((unsigned char)*v < 0x20 || *v == 0x7f)
			return true;
	return false;
}

const char *check_conninfo(const char *v)
{
	char *err = NULL;
	PQconninfoOption *opts;

	if (*v == '\0')
		return NULL; /* libpq defaults and PG* variables */
	if (config_has_placeholder_part(v))
		return "is the example's placeholder: a part like <password>, <ref>, <region> or "
		       "your-... was not filled in";
	const char *problem = NULL;

	opts = PQconninfoParse(v, &err);
	if (opts == NULL) {
		/* libpq's message may quote parts of the string, password
		 * included, so it is not passed on. */
		PQfreemem(err);
		return "not a valid libpq connection string or postgresql:// URI";
	}
	/* postgresql://u:p@ss@host splits at the first '@': the rest of the
	 * password would become the host and be printed as such. */
	for (PQconninfoOption *o = opts; o->keyword; o++)
		if (strcmp(o->keyword, "host") == 0 && o->val && strchr(o->val, '@'))
			problem =
				"has an '@' in the host part: percent-encode '@' in the password as %40";
	PQconninfoFree(opts);
	return problem;
}

/* pgmq-api.md §3.4: names of at most 47 characters, no $ ; -- ' (P0001). */
const char *check_queue_name(const char *v)
{
	if (*v == '\0')
		return "must not be empty";
	if (strlen(v) > 47)
		return "longer than 47 characters (pgmq's limit)";
	if (strpbrk(v, "$;'") != NULL || strstr(v, "--") != NULL)
		return "contains a character pgmq rejects ($, ;, -- or ')";
	if (has_control(v))
		return "contains a control character";
	return NULL;
}

static bool ident_char(char c, bool first)
{
	return (c >= 'a' && c <= 'z') || c == '_' || (!first && c >= '0' && c <= '9');
}

/* The read function is pasted into SQL, so it must be a plain lower-case
 * identifier, optionally schema-qualified: pgmq.read, public.pgmq_read. */
const char *check_schema(const char *v)
{
	if (*v == '\0' || strlen(v) > 63 || !(islower((unsigned char)*v) || *v == '_'))
		return "must be a schema name: a-z or _ first, then a-z, 0-9 or _, at most 63";
	for (const char *p = v; *p; p++)
		if (!(islower((unsigned char)*p) || isdigit((unsigned char)*p) || *p == '_'))
			return "must be a schema name: a-z or _ first, then a-z, 0-9 or _, at most 63";
	return NULL;
}

const char *check_function(const char *v)
{
	bool first = true;
	int dots = 0;

	if (*v == '\0' || strlen(v) > 127)
		return "must be a function name such as pgmq.read";
	for (const char *p = v; *p; p++) {
		if (*p == '.') {
			if (first || ++dots > 1)
				return "must be [schema.]function in lower-case letters, digits and _";
			first = true;
			continue;
		}
		if (!ident_char(*p, first))
			return "must be [schema.]function in lower-case letters, digits and _";
		first = false;
	}
	if (first)
		return "must be [schema.]function in lower-case letters, digits and _";
	return NULL;
}

const char *check_endpoint_id(const char *v)
{
	if (*v == '\0')
		return "must not be empty (the RunPod endpoint id)";
	if (strlen(v) > 128)
		return "longer than 128 characters";
	for (const char *p = v; *p; p++)
		if (!isalnum((unsigned char)*p) && *p != '-' && *p != '_')
			return "may hold only letters, digits, - and _";
	return NULL;
}

const char *check_api_key(const char *v)
{
	if (*v == '\0')
		return "must not be empty";
	if (strlen(v) > 1024)
		return "longer than 1024 bytes";
	for (const char *p = v; *p; p++)
		if ((unsigned char)*p <= ' ' || (unsigned char)*p >= 0x7f)
			return "contains whitespace, a control or a non-ASCII byte";
	return NULL;
}

static const char *check_url(const char *v)
{
	size_t scheme = strncmp(v, "https://", 8) == 0 ? 8 : strncmp(v, "http://", 7) == 0 ? 7 : 0;

	if (scheme == 0)
		return "must start with https:// or http://";
	if (v[scheme] == '\0' || v[scheme] == '/')
		return "has no host";
	if (strlen(v) > 1024)
		return "longer than 1024 bytes";
	for (const char *p = v; *p; p++)
		if ((unsigned char)*p <= ' ' || (unsigned char)*p >= 0x7f)
			return "contains whitespace, a control or a non-ASCII byte";
	return NULL;
}

/* True when the authority of an http:// URL names the loopback interface:
 * localhost, 127.0.0.0/8 in dotted form or [::1], with an optional port. */
bool url_host_is_loopback(const char *v)
{
	const char *host = v + strlen("http://"), *end = host + strcspn(host, "/?#");
	const char *at = memchr(host, '@', (size_t)(end - host));
	size_t len;
	unsigned a, b, c, d;
	char tail;

	if (at)
		host = at + 1;
	if (*host == '[')
		return strncmp(host, "[::1]", 5) == 0 && (host + 5 == end || host[5] == ':');
	len = strcspn(host, ":/?#");
	if (len == 9 && strncasecmp(host, "localhost", 9) == 0)
		return true;
	if (len > 15)
		return false;
	char ip[16];
	memcpy(ip, host, len);
	ip[len] = '\0';
	return sscanf(ip, "%u.%u.%u.%u%c", &a, &b, &c, &d, &tail) == 4 && a == 127 && b < 256 &&
	       c < 256 && d < 256;
}

/* Plain http:// only to this machine: anything else would send the API key in clear. */
const char *check_base_url(const char *v)
{
	const char *problem = check_url(v);

	if (problem == NULL && strncmp(v, "http://", 7) == 0 && !url_host_is_loopback(v))
		return "http:// is allowed only to a loopback host (127.0.0.1, [::1], localhost); "
		       "use https://";
	return problem;
}

/* The webhook is called by RunPod, not by the daemon: either scheme, any host. */
const char *check_webhook(const char *v)
{
	return *v == '\0' ? NULL : check_url(v);
}

/* "" (the system store) or a readable regular file; its contents are libcurl's to judge. */
const char *check_token(const char *v)
{
	if (strlen(v) > 255)
		return "is longer than 255 bytes";
	for (; *v; v++)
		if ((unsigned char)*v <= ' ' || (unsigned char)*v >= 127)
			return "contains whitespace, a control or a non-ASCII character";
	return NULL;
}

const char *check_ca_file(const char *v)
{
	struct stat st;
	FILE *f;

	if (*v == '\0')
		return NULL;
	if (*v != '/')
		return "must be an absolute path";
	if (stat(v, &st) != 0)
		return errno == ENOENT ? "no such file" : "cannot be read";
	if (!S_ISREG(st.st_mode))
		return "is not a regular file";
	f = fopen(v, "r");
	if (f == NULL)
		return "cannot be opened for reading";
	fclose(f);
	return NULL;
}

/* "off", "host:port" or "[v6addr]:port" with a port of 0-65535. */
const char *check_listen(const char *v)
{
	char host[LISTENADDR_HOST_MAX + 1];
	int port;

	return strcmp(v, "off") == 0 ? NULL : listenaddr_split(v, host, sizeof(host), &port);
}
