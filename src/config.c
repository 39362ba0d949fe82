/* config — see include/config.h. */
#include "config.h"
#include "log.h"

#include <ctype.h>
#include <errno.h>
#include <ini.h>
#include <libpq-fe.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

enum ktype { K_STR, K_INT, K_ENUM, K_BOOL };

#define F_SECRET   1u /* never printed */
#define F_FILE     2u /* X_FILE environment twin and credential file allowed */
#define F_CONNINFO 4u /* dumped through PQconninfoParse masking */
#define F_STATIC   8u /* cannot change on reload (SIGHUP); needs a restart */
#define F_ZERO_OFF 16u /* K_INT: 0 means "off / not sent", else min..max */

struct key {
	const char *section, *name;
	enum ktype type;
	size_t off;
	const char *def;                 /* NULL: required */
	long min, max;                   /* K_INT range */
	unsigned flags;
	const char *compat_env[3];       /* other environment names, lower precedence */
	const char *credential;          /* file name under $CREDENTIALS_DIRECTORY */
	const char *const *choices;      /* K_ENUM */
	const char *(*check)(const char *value); /* K_STR: NULL or the problem */
};

static const char *const level_choices[] = { "error", "warn", "info", "debug", "trace", NULL };
static const char *const format_choices[] = { "logfmt", "json", NULL };

static const char *check_conninfo(const char *v);
static const char *check_queue_name(const char *v);
static const char *check_function(const char *v);
static const char *check_endpoint_id(const char *v);
static const char *check_api_key(const char *v);
static const char *check_base_url(const char *v);
static const char *check_listen(const char *v);
static const char *check_webhook(const char *v);
static const char *check_ca_file(const char *v);
static const char *check_token(const char *v);
static bool route_section(const char *section);

#define OFF(f) offsetof(struct config, f)

/* One row per key reads best as a table: */
/* clang-format off */
static const struct key keys[] = {
	{ "database", "conninfo", K_STR, OFF(conninfo), "", 0, 0, F_SECRET | F_FILE | F_CONNINFO,
	  { "DATABASE_URL" }, "database_conninfo", NULL, check_conninfo },
	{ "database", "listen_conninfo", K_STR, OFF(listen_conninfo), "", 0, 0,
	  F_SECRET | F_FILE | F_CONNINFO | F_STATIC, { 0 }, NULL, NULL, check_conninfo },
	{ "database", "connect_timeout_ms", K_INT, OFF(db_connect_timeout_ms), "10000", 100, 600000,
	  F_STATIC,
	  { 0 }, NULL, NULL, NULL },
	{ "queue", "name", K_STR, OFF(queue_name), NULL, 0, 0, F_STATIC, { 0 }, NULL, NULL,
	  check_queue_name },
	{ "queue", "vt_seconds", K_INT, OFF(vt_seconds), "1800", 1, 7 * 86400, 0, { 0 }, NULL, NULL, NULL },
	{ "queue", "batch_size", K_INT, OFF(batch_size), "10", 1, 1000, 0, { 0 }, NULL, NULL, NULL },
	{ "queue", "poll_interval_ms", K_INT, OFF(poll_interval_ms), "1000", 10, 3600000, 0, { 0 }, NULL,
	  NULL, NULL },
	{ "queue", "read_function", K_STR, OFF(read_function), "pgmq.read", 0, 0, 0, { 0 }, NULL, NULL,
	  check_function },
	{ "queue", "max_in_flight", K_INT, OFF(max_in_flight), "8", 1, 200, 0, { 0 }, NULL, NULL, NULL },
	{ "queue", "read_batches", K_INT, OFF(read_batches), "1", 1, 200, 0, { 0 }, NULL, NULL, NULL },
	{ "queue", "max_read_ct", K_INT, OFF(max_read_ct), "0", 0, 1000000, 0, { 0 }, NULL, NULL, NULL },
	{ "queue", "notify", K_BOOL, OFF(notify), "on", 0, 0, F_STATIC, { 0 }, NULL, NULL, NULL },
	{ "queue", "notify_debounce_ms", K_INT, OFF(notify_debounce_ms), "1", 0, 10000, 0, { 0 }, NULL,
	  NULL, NULL },
	{ "queue", "idle_poll_max_ms", K_INT, OFF(idle_poll_max_ms), "60000", 10, 3600000, 0, { 0 },
	  NULL, NULL, NULL },
	{ "runpod", "endpoint_id", K_STR, OFF(endpoint_id), NULL, 0, 0, 0, { "RUNPOD_ENDPOINT_ID" }, NULL,
	  NULL, check_endpoint_id },
	{ "runpod", "api_key", K_STR, OFF(api_key), NULL, 0, 0, F_SECRET | F_FILE, { "RUNPOD_API_KEY" },
	  "runpod_api_key", NULL, check_api_key },
	{ "runpod", "base_url", K_STR, OFF(base_url), "https://api.runpod.ai/v2", 0, 0, 0,
	  { "RUNPOD_ENDPOINT_BASE_URL" }, NULL, NULL, check_base_url },
	/* PEM bundle for private CAs and TLS-inspecting egress proxies; "" = the system store. */
	{ "runpod", "ca_file", K_STR, OFF(ca_file), "", 0, 0, 0, { 0 }, NULL, NULL, check_ca_file },
	{ "runpod", "connect_timeout_ms", K_INT, OFF(connect_timeout_ms), "10000", 100, 600000, 0, { 0 },
	  NULL, NULL, NULL },
	{ "runpod", "request_timeout_ms", K_INT, OFF(request_timeout_ms), "30000", 100, 3600000, 0,
	  { 0 }, NULL, NULL, NULL },
	/* RunPod's /run body limit is 10 MB (runpod-serverless-api.md §6.3). */
	{ "runpod", "max_body_bytes", K_INT, OFF(max_body_bytes), "10000000", 256, 10000000, 0, { 0 },
	  NULL, NULL, NULL },
	{ "runpod", "backoff_base_ms", K_INT, OFF(backoff_base_ms), "1000", 10, 600000, 0, { 0 }, NULL,
	  NULL, NULL },
	{ "runpod", "backoff_max_ms", K_INT, OFF(backoff_max_ms), "60000", 10, 3600000, 0, { 0 }, NULL,
	  NULL, NULL },
	{ "runpod", "retry_after_max_ms", K_INT, OFF(retry_after_max_ms), "300000", 0, 86400000, 0,
	  { 0 }, NULL, NULL, NULL },
	{ "runpod", "probe_interval_ms", K_INT, OFF(probe_interval_ms), "30000", 100, 3600000, 0,
	  { 0 }, NULL, NULL, NULL },
	/* runpod-serverless-api.md §2: /run allows 1000 requests per 10 s. */
	{ "runpod", "max_requests_per_10s", K_INT, OFF(max_requests_per_10s), "1000", 1, 1000000, 0,
	  { 0 }, NULL, NULL, NULL },
	{ "runpod", "webhook", K_STR, OFF(webhook), "", 0, 0, 0, { 0 }, NULL, NULL, check_webhook },
	/* §3.1: executionTimeout 5 s - 7 days, ttl 10 s - 7 days, in ms. */
	{ "runpod", "policy_execution_timeout_ms", K_INT, OFF(policy_execution_timeout_ms), "0", 5000,
	  604800000, F_ZERO_OFF, { 0 }, NULL, NULL, NULL },
	{ "runpod", "policy_ttl_ms", K_INT, OFF(policy_ttl_ms), "0", 10000, 604800000, F_ZERO_OFF,
	  { 0 }, NULL, NULL, NULL },
	{ "runpod", "policy_low_priority", K_BOOL, OFF(policy_low_priority), "off", 0, 0, 0, { 0 },
	  NULL, NULL, NULL },
	{ "log", "level", K_ENUM, OFF(log_level), "info", 0, 0, 0, { 0 }, NULL, level_choices, NULL },
	{ "log", "format", K_ENUM, OFF(log_format), "logfmt", 0, 0, 0, { 0 }, NULL, format_choices,
	  NULL },
	{ "tracker", "enabled", K_BOOL, OFF(tracker_enabled), "off", 0, 0, 0, { 0 }, NULL, NULL, NULL },
	{ "tracker", "interval_ms", K_INT, OFF(tracker_interval_ms), "10000", 100, 3600000, 0, { 0 },
	  NULL, NULL, NULL },
	{ "tracker", "max_tracked_jobs", K_INT, OFF(tracker_max_tracked_jobs), "10000", 1, 1000000, 0,
	  { 0 }, NULL, NULL, NULL },
	{ "tracker", "retry_delay_s", K_INT, OFF(tracker_retry_delay_s), "30", 0, 86400, 0, { 0 },
	  NULL, NULL, NULL },
	{ "tracker", "max_concurrent", K_INT, OFF(tracker_max_concurrent), "16", 1, 400, 0, { 0 },
	  NULL, NULL, NULL },
	/* §2: /status allows 2000 requests per 10 s. */
	{ "tracker", "max_status_per_10s", K_INT, OFF(tracker_max_status_per_10s), "2000", 1, 1000000,
	  0, { 0 }, NULL, NULL, NULL },
	{ "admin", "listen", K_STR, OFF(admin_listen), "127.0.0.1:9187", 0, 0, F_STATIC, { 0 }, NULL,
	  NULL, check_listen },
	/* Bearer token for the runtime control endpoints (/routes). */
	{ "admin", "token", K_STR, OFF(admin_token), "", 0, 0, F_SECRET | F_FILE | F_STATIC, { 0 },
	  "admin_token", NULL, check_token },
	{ "admin", "metrics_interval_ms", K_INT, OFF(metrics_interval_ms), "15000", 100, 3600000, 0,
	  { 0 }, NULL, NULL, NULL },
	{ "daemon", "shutdown_timeout_ms", K_INT, OFF(shutdown_timeout_ms), "8000", 0, 600000, 0, { 0 },
	  NULL, NULL, NULL },
};
/* clang-format on */

#define NKEYS (sizeof(keys) / sizeof(keys[0]))
_Static_assert(NKEYS <= CONFIG_MAX_KEYS, "raise CONFIG_MAX_KEYS");

/* A raw (text) value per key while the sources are merged. */
struct raw {
	char *value[NKEYS];
	char where[NKEYS][160];          /* "file PATH:LINE", "env NAME", … */
	unsigned char source[NKEYS];
	bool failed[NKEYS];              /* a source of this key was bad: reported already */
	int errors;
	config_error_fn on_error;
	void *arg;
	const char *path;
	bool file_missing;               /* the default file does not exist */
	/* [route.NAME] sections: their values, applied per route on top. */
	char route_names[CONFIG_MAX_ROUTES][CONFIG_ROUTE_NAME_MAX + 1];
	int nroutes;
	struct route_kv *rkv;            /* MAX_ROUTE_KV entries, allocated at the first */
	int nrkv;
	const char *route;               /* while applying a route: its name */
	bool from_route[NKEYS];          /* while applying a route: the value is the route's */
};

/* One key = value of a [route.NAME] section. */
struct route_kv {
	int route, key;
	char *value;
	char where[160];
};
#define MAX_ROUTE_KV (CONFIG_MAX_ROUTES * 48)

static void fail(struct raw *r, const char *key, const char *where, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));

static void fail(struct raw *r, const char *key, const char *where, const char *fmt, ...)
{
	char problem[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(problem, sizeof(problem), fmt, ap);
	va_end(ap);
	r->errors++;
	if (r->on_error)
		r->on_error(r->arg, key, where, problem);
}

static void key_label(const struct key *k, char *buf, size_t len)
{
	snprintf(buf, len, "%s.%s", k->section, k->name);
}

/* The label of key i in an error: route.NAME.key when a route set it. */
static void raw_label(const struct raw *r, size_t i, char *buf, size_t len)
{
	if (r->route && r->from_route[i])
		snprintf(buf, len, "route.%s.%s", r->route, keys[i].name);
	else
		key_label(&keys[i], buf, len);
}

/* Shows a value in an error, or hides it for secrets. */
static const char *shown(const struct key *k, const char *v)
{
	return (k->flags & F_SECRET) ? "(hidden)" : v;
}

static int find_key(const char *section, const char *name)
{
	for (size_t i = 0; i < NKEYS; i++)
		if (strcmp(keys[i].section, section) == 0 && strcmp(keys[i].name, name) == 0)
			return (int)i;
	return -1;
}

static void set_raw(struct raw *r, size_t i, const char *value, enum config_source src,
		    const char *where)
{
	free(r->value[i]);
	r->value[i] = strdup(value);
	if (r->value[i] == NULL) {
		fail(r, keys[i].name, where, "out of memory");
		return;
	}
	r->source[i] = (unsigned char)src;
	snprintf(r->where[i], sizeof(r->where[i]), "%s", where);
}

/* Strips one pair of surrounding double quotes: key = "value". */
static void unquote(char *v)
{
	size_t n = strlen(v);

	if (n >= 2 && v[0] == '"' && v[n - 1] == '"') {
		memmove(v, v + 1, n - 2);
		v[n - 2] = '\0';
	}
}

struct file_ctx {
	struct raw *r;
	FILE *fp;
	int lineno;             /* line most recently read */
	int long_line;          /* first line longer than inih takes, or 0 */
	bool seen[NKEYS];
};

/* fgets() for inih that counts lines (Debian's inih is built without
 * INI_HANDLER_LINENO) and notices lines longer than its 200-byte buffer,
 * which inih would otherwise split silently. */
static char *line_reader(char *str, int num, void *stream)
{
	struct file_ctx *fc = stream;
	char *s = fgets(str, num, fc->fp);
	size_t n;

	if (s == NULL)
		return NULL;
	n = strlen(s);
	if (n > 0 && s[n - 1] == '\n') {
		fc->lineno++;
	} else if (!feof(fc->fp)) {
		int c;
		fc->lineno++;
		if (fc->long_line == 0)
			fc->long_line = fc->lineno;
		/* Skip the rest of the line; it is reported as an error. */
		while ((c = fgetc(fc->fp)) != EOF && c != '\n')
			;
		str[0] = '\0';
	} else {
		fc->lineno++;
	}
	return s;
}

/* Edit distance (Levenshtein) of two short strings, capped at 99. */
static int distance(const char *a, const char *b)
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

static void env_name(const struct key *k, char *buf, size_t len);

/* The known name nearest to an unknown one ("section.key", or an
 * environment variable when env), or NULL when none is close. */
static const char *nearest_key(const char *unknown, bool env, char *buf, size_t len)
{
	int best = 99;
	char name[128];

	for (size_t i = 0; i < NKEYS; i++) {
		int d;
		if (env)
			env_name(&keys[i], name, sizeof(name));
		else
			snprintf(name, sizeof(name), "%s.%s", keys[i].section, keys[i].name);
		d = distance(unknown, name);
		if (d < best) {
			best = d;
			snprintf(buf, len, "%s", name);
		}
	}
	/* A typo, not another word: at most a third of the name differs. */
	return best <= 3 && (size_t)best * 3 <= strlen(unknown) ? buf : NULL;
}

/* True for the example file's stand-ins ("your-endpoint-id", "<key>",
 * "changeme"): a value that was never filled in. */
static bool is_placeholder(const char *v)
{
	size_t n = strlen(v);

	return strncasecmp(v, "your-", 5) == 0 || strncasecmp(v, "your_", 5) == 0 ||
	       (n >= 2 && v[0] == '<' && v[n - 1] == '>') || strcasecmp(v, "changeme") == 0 ||
	       strcasecmp(v, "change-me") == 0 || strcasecmp(v, "todo") == 0;
}

/* The key a [route.NAME] section may set: "queue" (queue.name), a key of
 * [queue], [runpod] or [tracker] by its bare name, or section.key. */
static int find_route_key(const char *name)
{
	static const char *const sections[] = { "queue", "runpod", "tracker" };
	const char *dot = strchr(name, '.');

	if (strcmp(name, "queue") == 0)
		return find_key("queue", "name");
	if (dot) {
		char section[32];
		snprintf(section, sizeof(section), "%.*s", (int)(dot - name), name);
		for (size_t s = 0; s < 3; s++)
			if (strcmp(section, sections[s]) == 0)
				return find_key(section, dot + 1);
		return -1;
	}
	for (size_t s = 0; s < 3; s++) {
		int i = find_key(sections[s], name);
		if (i >= 0)
			return i;
	}
	return -1;
}

static bool route_name_ok(const char *n)
{
	size_t len = strlen(n);

	if (len == 0 || len > CONFIG_ROUTE_NAME_MAX)
		return false;
	for (; *n; n++)
		if (!(islower((unsigned char)*n) || isdigit((unsigned char)*n) || *n == '_' || *n == '-'))
			return false;
	return true;
}

static void on_route_value(struct raw *r, const char *route, const char *name, const char *value,
			   const char *where)
{
	char label[160];
	int ri = -1, ki = find_route_key(name);

	snprintf(label, sizeof(label), "route.%s.%s", route, name);
	if (!route_name_ok(route)) {
		fail(r, label, where, "route name must be 1-%d of a-z, 0-9, _ and -",
		     CONFIG_ROUTE_NAME_MAX);
		return;
	}
	if (ki < 0) {
		fail(r, label, where, "unknown key (a route sets queue and the keys of [queue], "
		     "[runpod] and [tracker])");
		return;
	}
	for (int n = 0; n < r->nroutes; n++)
		if (strcmp(r->route_names[n], route) == 0)
			ri = n;
	if (ri < 0) {
		if (r->nroutes == CONFIG_MAX_ROUTES) {
			fail(r, label, where, "more than %d routes", CONFIG_MAX_ROUTES);
			return;
		}
		ri = r->nroutes++;
		snprintf(r->route_names[ri], sizeof(r->route_names[ri]), "%s", route);
	}
	for (int n = 0; n < r->nrkv; n++)
		if (r->rkv[n].route == ri && r->rkv[n].key == ki) {
			fail(r, label, where, "set twice in the file");
			return;
		}
	if (r->rkv == NULL && (r->rkv = calloc(MAX_ROUTE_KV, sizeof(*r->rkv))) == NULL) {
		fail(r, label, where, "out of memory");
		return;
	}
	if (r->nrkv == MAX_ROUTE_KV || (r->rkv[r->nrkv].value = strdup(value)) == NULL) {
		fail(r, label, where, "too many route keys or out of memory");
		return;
	}
	unquote(r->rkv[r->nrkv].value);
	r->rkv[r->nrkv].route = ri;
	r->rkv[r->nrkv].key = ki;
	snprintf(r->rkv[r->nrkv].where, sizeof(r->rkv[r->nrkv].where), "%s", where);
	r->nrkv++;
}

static int on_ini_value(void *user, const char *section, const char *name, const char *value)
{
	struct file_ctx *fc = user;
	struct raw *r = fc->r;
	int lineno = fc->lineno;
	char where[160], label[96];
	int i = find_key(section, name);

	snprintf(where, sizeof(where), "file %s:%d", r->path, lineno);
	if (strncmp(section, "route.", 6) == 0) {
		on_route_value(r, section + 6, name, value, where);
		return 1;
	}
	snprintf(label, sizeof(label), "%s.%s", section, name);
	if (i < 0) {
		char near[128];
		if (nearest_key(label, false, near, sizeof(near)))
			fail(r, label, where, "unknown key; did you mean %s?", near);
		else
			fail(r, label, where, "unknown key");
		return 1;
	}
	if (fc->seen[i]) {
		fail(r, label, where, "set twice in the file");
		return 1;
	}
	fc->seen[i] = true;
	if (value[0] == '"' && (strlen(value) < 2 || value[strlen(value) - 1] != '"')) {
		/* inih ends a value at " ;" even inside quotes. */
		fail(r, label, where, "unterminated double quote (a ' ;' inside a value starts a "
		     "comment; set such values through the environment)");
		r->failed[i] = true;
		return 1;
	}
	set_raw(r, (size_t)i, value, SRC_FILE, where);
	if (r->value[i])
		unquote(r->value[i]);
	return 1;
}

static void load_file(struct raw *r, const char *path, bool explicit_path)
{
	struct file_ctx fc = { .r = r };
	FILE *fp = fopen(path, "r");
	int rc;
	char where[160];

	r->path = path;
	if (fp == NULL) {
		if (explicit_path || errno != ENOENT)
			fail(r, "config", path, "cannot open the configuration file: %s",
			     strerror(errno));
		else
			r->file_missing = true;
		return;
	}
	fc.fp = fp;
	rc = ini_parse_stream(line_reader, &fc, on_ini_value, &fc);
	if (ferror(fp)) {
		int e = errno;
		fclose(fp);
		fail(r, "config", path, "cannot read the configuration file: %s", strerror(e));
		return;
	}
	fclose(fp);
	if (fc.long_line) {
		snprintf(where, sizeof(where), "file %s:%d", path, fc.long_line);
		fail(r, "config", where, "line of 199 bytes or more; set long values "
		     "(conninfo, api_key) through the environment or a *_FILE instead");
	}
	/* inih returns the first bad line; our handler never fails, so a
	 * positive result is a syntax error. */
	if (rc > 0) {
		snprintf(where, sizeof(where), "file %s:%d", path, rc);
		fail(r, "config", where, "syntax error (expected [section] or key = value)");
	}
}

static const char *env_get(char *const *envp, const char *name)
{
	size_t n = strlen(name);

	for (char *const *e = envp; e && *e; e++)
		if (strncmp(*e, name, n) == 0 && (*e)[n] == '=')
			return *e + n + 1;
	return NULL;
}

/* Reads a secret file; trailing newlines are dropped. */
static char *read_secret_file(const char *path, char *err, size_t errlen)
{
	FILE *fp = fopen(path, "r");
	char *buf;
	size_t n;

	if (fp == NULL) {
		snprintf(err, errlen, "cannot read %s: %s", path, strerror(errno));
		return NULL;
	}
	buf = malloc(65537);
	if (buf == NULL) {
		fclose(fp);
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	n = fread(buf, 1, 65536, fp);
	if (ferror(fp)) {
		snprintf(err, errlen, "cannot read %s: %s", path, strerror(errno));
		fclose(fp);
		free(buf);
		return NULL;
	}
	if (n == 65536 && fgetc(fp) != EOF) {
		fclose(fp);
		free(buf);
		snprintf(err, errlen, "%s is larger than 64 KiB", path);
		return NULL;
	}
	fclose(fp);
	if (memchr(buf, '\0', n) != NULL) {
		free(buf);
		snprintf(err, errlen, "%s contains a NUL byte", path);
		return NULL;
	}
	while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r'))
		n--;
	buf[n] = '\0';
	if (n == 0) {
		free(buf);
		snprintf(err, errlen, "%s is empty", path);
		return NULL;
	}
	return buf;
}

static void env_name(const struct key *k, char *buf, size_t len)
{
	size_t j = 0;

	j += (size_t)snprintf(buf, len, "PGMQD_%s_%s", k->section, k->name);
	for (size_t i = 0; i < j && i < len; i++)
		buf[i] = (char)toupper((unsigned char)buf[i]);
}

/* Takes the value from NAME or NAME_FILE; both set is an error. Returns true
 * when this name supplied the key (or failed trying). */
static bool try_env(struct raw *r, size_t i, char *const *envp, const char *name)
{
	const struct key *k = &keys[i];
	char fname[128], where[160], label[96], err[256];
	const char *v = env_get(envp, name);
	const char *fv = NULL;

	key_label(k, label, sizeof(label));
	if (k->flags & F_FILE) {
		snprintf(fname, sizeof(fname), "%s_FILE", name);
		fv = env_get(envp, fname);
	}
	if (v != NULL && fv != NULL) {
		snprintf(where, sizeof(where), "env %s", name);
		fail(r, label, where, "both %s and %s are set; set only one", name, fname);
		r->failed[i] = true;
		return true;
	}
	if (v != NULL) {
		snprintf(where, sizeof(where), "env %s", name);
		set_raw(r, i, v, SRC_ENV, where);
		return true;
	}
	if (fv != NULL) {
		char *s = read_secret_file(fv, err, sizeof(err));
		snprintf(where, sizeof(where), "env %s", fname);
		if (s == NULL) {
			fail(r, label, where, "%s", err);
			r->failed[i] = true;
			return true;
		}
		set_raw(r, i, s, SRC_ENV, where);
		free(s);
		return true;
	}
	return false;
}

static void load_env(struct raw *r, char *const *envp)
{
	char name[128], label[96];

	for (size_t i = 0; i < NKEYS; i++) {
		env_name(&keys[i], name, sizeof(name));
		if (try_env(r, i, envp, name))
			continue;
		for (int c = 0; c < 3 && keys[i].compat_env[c]; c++)
			if (try_env(r, i, envp, keys[i].compat_env[c]))
				break;
	}
	/* An unknown PGMQD_ variable is most likely a typo: refuse it. */
	for (char *const *e = envp; e && *e; e++) {
		const char *eq = strchr(*e, '=');
		bool known = false;

		if (strncmp(*e, "PGMQD_", 6) != 0 || eq == NULL)
			continue;
		for (size_t i = 0; i < NKEYS && !known; i++) {
			size_t n;
			env_name(&keys[i], name, sizeof(name));
			n = strlen(name);
			if ((size_t)(eq - *e) == n && strncmp(*e, name, n) == 0)
				known = true;
			else if ((keys[i].flags & F_FILE) && (size_t)(eq - *e) == n + 5 &&
				 strncmp(*e, name, n) == 0 && strncmp(*e + n, "_FILE", 5) == 0)
				known = true;
		}
		if (!known) {
			char near[128];
			snprintf(label, sizeof(label), "%.*s", (int)(eq - *e), *e);
			if (nearest_key(label, true, near, sizeof(near)))
				fail(r, label, "environment",
				     "unknown environment variable; did you mean %s?", near);
			else
				fail(r, label, "environment", "unknown environment variable");
		}
	}
}

static void load_credentials(struct raw *r, char *const *envp)
{
	const char *dir = env_get(envp, "CREDENTIALS_DIRECTORY");
	char path[4096], where[160], label[96], err[256];

	if (dir == NULL)
		return;
	for (size_t i = 0; i < NKEYS; i++) {
		char *s;

		/* The environment outranks credentials; the file ranks below. */
		if (keys[i].credential == NULL || r->source[i] > SRC_CREDENTIAL)
			continue;
		snprintf(path, sizeof(path), "%s/%s", dir, keys[i].credential);
		if (access(path, F_OK) != 0)
			continue;
		key_label(&keys[i], label, sizeof(label));
		snprintf(where, sizeof(where), "credential %s", keys[i].credential);
		s = read_secret_file(path, err, sizeof(err));
		if (s == NULL) {
			fail(r, label, where, "%s", err);
			r->failed[i] = true;
			continue;
		}
		set_raw(r, i, s, SRC_CREDENTIAL, where);
		free(s);
	}
}

static void load_cli(struct raw *r, const char *const *cli)
{
	for (; cli && *cli; cli++) {
		const char *eq = strchr(*cli, '=');
		const char *dot = strchr(*cli, '.');
		char section[64], name[64];
		int i;

		if (eq == NULL || dot == NULL || dot > eq || (size_t)(dot - *cli) >= sizeof(section) ||
		    (size_t)(eq - dot - 1) >= sizeof(name)) {
			fail(r, *cli, "command line", "expected section.key=value");
			continue;
		}
		snprintf(section, sizeof(section), "%.*s", (int)(dot - *cli), *cli);
		snprintf(name, sizeof(name), "%.*s", (int)(eq - dot - 1), dot + 1);
		i = find_key(section, name);
		if (i < 0) {
			char label[130], near[128];
			snprintf(label, sizeof(label), "%s.%s", section, name);
			if (nearest_key(label, false, near, sizeof(near)))
				fail(r, *cli, "command line", "unknown key; did you mean %s?", near);
			else
				fail(r, *cli, "command line", "unknown key");
			continue;
		}
		set_raw(r, (size_t)i, eq + 1, SRC_CLI, "command line");
	}
}

/* Strict decimal integer: optional '-', digits, nothing else. */
static bool parse_int(const char *s, long *out)
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

static const char *check_conninfo(const char *v)
{
	char *err = NULL;
	PQconninfoOption *opts;

	if (*v == '\0')
		return NULL; /* libpq defaults and PG* variables */
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
			problem = "has an '@' in the host part: percent-encode '@' in the password as %40";
	PQconninfoFree(opts);
	return problem;
}

/* pgmq-api.md §3.4: names of at most 47 characters, no $ ; -- ' (P0001). */
static const char *check_queue_name(const char *v)
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
static const char *check_function(const char *v)
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

static const char *check_endpoint_id(const char *v)
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

static const char *check_api_key(const char *v)
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
static bool url_host_is_loopback(const char *v)
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
static const char *check_base_url(const char *v)
{
	const char *problem = check_url(v);

	if (problem == NULL && strncmp(v, "http://", 7) == 0 && !url_host_is_loopback(v))
		return "http:// is allowed only to a loopback host (127.0.0.1, [::1], localhost); "
		       "use https://";
	return problem;
}

/* The webhook is called by RunPod, not by the daemon: either scheme, any host. */
static const char *check_webhook(const char *v)
{
	return *v == '\0' ? NULL : check_url(v);
}

/* "" (the system store) or a readable regular file; its contents are libcurl's to judge. */
static const char *check_token(const char *v)
{
	if (strlen(v) > 255)
		return "is longer than 255 bytes";
	for (; *v; v++)
		if ((unsigned char)*v <= ' ' || (unsigned char)*v >= 127)
			return "contains whitespace, a control or a non-ASCII character";
	return NULL;
}

static const char *check_ca_file(const char *v)
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

static const char *const bool_true[] = { "on", "true", "yes", "1", NULL };
static const char *const bool_false[] = { "off", "false", "no", "0", NULL };

/* "off", "host:port" or "[v6addr]:port" with a port of 0-65535. */
static const char *check_listen(const char *v)
{
	const char *colon;
	long port;
	char *end;

	if (strcmp(v, "off") == 0)
		return NULL;
	if (v[0] == '[') {
		const char *close = strchr(v, ']');
		if (close == NULL || close == v + 1 || close[1] != ':')
			return "must be host:port, [v6addr]:port or off";
		colon = close + 1;
	} else {
		colon = strrchr(v, ':');
		if (colon == NULL || colon == v || memchr(v, ':', (size_t)(colon - v)) != NULL)
			return "must be host:port, [v6addr]:port or off";
	}
	port = strtol(colon + 1, &end, 10);
	if (colon[1] == '\0' || *end != '\0' || port < 0 || port > 65535)
		return "has no valid port (0-65535)";
	if (has_control(v) || strchr(v, ' '))
		return "contains whitespace or a control character";
	return NULL;
}

static void apply(struct raw *r, struct config *cfg)
{
	char label[96];

	for (size_t i = 0; i < NKEYS; i++) {
		const struct key *k = &keys[i];
		const char *v = r->value[i];
		char *field = (char *)cfg + k->off;

		raw_label(r, i, label, sizeof(label));
		cfg->source[i] = r->source[i];
		if (r->failed[i])
			continue;
		if (v == NULL) {
			if (k->def == NULL) {
				char name[128], cred[160] = "", nofile[320] = "";
				env_name(k, name, sizeof(name));
				if (k->credential)
					snprintf(cred, sizeof(cred), ", or as the systemd credential %s "
						 "(LoadCredential=)", k->credential);
				if (r->file_missing)
					snprintf(nofile, sizeof(nofile), "; the configuration file %s "
						 "does not exist", r->path);
				fail(r, label, "default", "is required (set it in the file or as %s%s%s%s)%s",
				     name, k->compat_env[0] ? " or " : "",
				     k->compat_env[0] ? k->compat_env[0] : "", cred, nofile);
				continue;
			}
			v = k->def;
		}
		switch (k->type) {
		case K_INT: {
			long n;
			if (!parse_int(v, &n)) {
				fail(r, label, r->where[i], "not an integer: '%s'", shown(k, v));
				break;
			}
			if ((k->flags & F_ZERO_OFF) && n == 0) {
				*(int *)(void *)field = 0;
				break;
			}
			if (n < k->min || n > k->max) {
				if (k->flags & F_ZERO_OFF) {
					fail(r, label, r->where[i], "must be 0 (off) or between %ld and %ld, "
					     "got %ld", k->min, k->max, n);
					break;
				}
				fail(r, label, r->where[i], "must be between %ld and %ld, got %ld",
				     k->min, k->max, n);
				break;
			}
			*(int *)(void *)field = (int)n;
			break;
		}
		case K_BOOL: {
			int b = -1;
			for (int c = 0; bool_true[c]; c++)
				if (strcasecmp(v, bool_true[c]) == 0)
					b = 1;
			for (int c = 0; bool_false[c]; c++)
				if (strcasecmp(v, bool_false[c]) == 0)
					b = 0;
			if (b < 0) {
				fail(r, label, r->where[i], "must be on or off (true/false, yes/no, 1/0), "
				     "got '%s'", v);
				break;
			}
			*(int *)(void *)field = b;
			break;
		}
		case K_ENUM: {
			int found = -1;
			for (int c = 0; k->choices[c]; c++)
				if (strcmp(v, k->choices[c]) == 0)
					found = c;
			if (found < 0) {
				char list[128] = "";
				for (int c = 0; k->choices[c]; c++) {
					strncat(list, c ? ", " : "", sizeof(list) - strlen(list) - 1);
					strncat(list, k->choices[c], sizeof(list) - strlen(list) - 1);
				}
				fail(r, label, r->where[i], "must be one of %s, got '%s'", list, v);
				break;
			}
			*(int *)(void *)field = found;
			break;
		}
		case K_STR: {
			const char *problem = k->check ? k->check(v) : NULL;
			char *copy;
			/* Before the key's own check, whose complaint would miss the point. */
			if (r->source[i] != SRC_DEFAULT && is_placeholder(v))
				problem = "is the example's placeholder, not a real value";
			if (problem) {
				if (k->flags & F_SECRET)
					fail(r, label, r->where[i], "%s", problem);
				else
					fail(r, label, r->where[i], "%s: '%s'", problem, v);
				break;
			}
			copy = strdup(v);
			if (copy == NULL) {
				fail(r, label, r->where[i], "out of memory");
				break;
			}
			if (k->off == OFF(base_url)) {
				size_t n = strlen(copy);
				while (n > 8 && copy[n - 1] == '/')
					copy[--n] = '\0';
			}
			*(char **)(void *)field = copy;
			break;
		}
		}
	}
}

/* Copies every key of src into dst (strings duplicated). 0 or -1. */
static int copy_keys(struct config *dst, const struct config *src)
{
	memcpy(dst->source, src->source, sizeof(dst->source));
	for (size_t i = 0; i < NKEYS; i++) {
		const char *f = (const char *)src + keys[i].off;
		char *t = (char *)dst + keys[i].off;
		if (keys[i].type != K_STR) {
			*(int *)(void *)t = *(const int *)(const void *)f;
			continue;
		}
		if (*(char *const *)(const void *)f &&
		    (*(char **)(void *)t = strdup(*(char *const *)(const void *)f)) == NULL)
			return -1;
	}
	return 0;
}

/* One snapshot per [route.NAME]: the merged common values with the route's
 * own on top; the top level becomes a copy of the first route. */
static void load_routes(struct raw *r, struct config *out)
{
	struct config *routes = calloc((size_t)r->nroutes, sizeof(*routes));

	if (routes == NULL) {
		fail(r, "route", "file", "out of memory");
		return;
	}
	for (int n = 0; n < r->nroutes; n++) {
		struct raw *rr = malloc(sizeof(*rr));
		if (rr == NULL) {
			fail(r, "route", "file", "out of memory");
			break;
		}
		*rr = *r; /* shares the value strings; apply() only reads them */
		rr->route = r->route_names[n];
		memset(rr->from_route, 0, sizeof(rr->from_route));
		for (int k = 0; k < r->nrkv; k++) {
			size_t i = (size_t)r->rkv[k].key;
			if (r->rkv[k].route != n)
				continue;
			rr->value[i] = r->rkv[k].value;
			rr->source[i] = SRC_FILE;
			rr->failed[i] = false;
			rr->from_route[i] = true;
			snprintf(rr->where[i], sizeof(rr->where[i]), "%s", r->rkv[k].where);
		}
		apply(rr, &routes[n]);
		r->errors = rr->errors;
		free(rr);
		snprintf(routes[n].route_name, sizeof(routes[n].route_name), "%s", r->route_names[n]);
		routes[n].nroutes = 1;
		for (int m = 0; m < n; m++) {
			if (routes[m].queue_name && routes[n].queue_name &&
			    strcmp(routes[m].queue_name, routes[n].queue_name) == 0) {
				char label[96];
				snprintf(label, sizeof(label), "route.%s.queue", routes[n].route_name);
				fail(r, label, "file", "queue '%s' is already read by route %s",
				     routes[n].queue_name, routes[m].route_name);
			}
		}
	}
	out->routes = routes;
	out->nroutes = r->nroutes;
	if (r->errors == 0 && copy_keys(out, &routes[0]) != 0)
		fail(r, "route", "file", "out of memory");
	snprintf(out->route_name, sizeof(out->route_name), "%s", routes[0].route_name);
}

const struct config *config_route(const struct config *cfg, int i)
{
	return cfg->routes ? &cfg->routes[i] : cfg;
}

int config_load(const struct config_input *in, struct config *out, config_error_fn on_error,
		void *arg)
{
	struct raw r;
	int errors;

	memset(&r, 0, sizeof(r));
	memset(out, 0, sizeof(*out));
	r.on_error = on_error;
	r.arg = arg;
	if (in->path)
		load_file(&r, in->path, in->path_explicit);
	load_credentials(&r, in->envp);
	load_env(&r, in->envp);
	load_cli(&r, in->cli_overrides);
	if (r.nroutes == 0) {
		apply(&r, out);
		snprintf(out->route_name, sizeof(out->route_name), "default");
		out->nroutes = 1;
	} else {
		load_routes(&r, out);
	}
	out->file_read = in->path != NULL && !r.file_missing;
	for (size_t i = 0; i < NKEYS; i++)
		free(r.value[i]);
	for (int n = 0; n < r.nrkv; n++)
		free(r.rkv[n].value);
	free(r.rkv);
	errors = r.errors;
	if (errors)
		config_free(out);
	return errors;
}

static void keep_static(const struct config *cur, struct config *next, bool route,
			void (*ignored)(void *arg, const char *key), void *arg)
{
	char label[96];

	for (size_t i = 0; i < NKEYS; i++) {
		const struct key *k = &keys[i];
		bool differs;

		if (!(k->flags & F_STATIC) || (route && route_section(k->section)))
			continue;
		key_label(k, label, sizeof(label));
		if (k->type == K_STR) {
			char *const *c = (char *const *)(const void *)((const char *)cur + k->off);
			char **n = (char **)(void *)((char *)next + k->off);
			char *copy;
			differs = strcmp(*c, *n) != 0;
			if (differs && (copy = strdup(*c)) != NULL) {
				free(*n);
				*n = copy;
			}
		} else {
			/* K_INT, K_ENUM and K_BOOL are all stored as int. */
			const int *c = (const int *)(const void *)((const char *)cur + k->off);
			int *n = (int *)(void *)((char *)next + k->off);
			differs = *c != *n;
			*n = *c;
		}
		next->source[i] = cur->source[i];
		if (differs && ignored)
			ignored(arg, label);
	}
}

void config_keep_static(const struct config *cur, struct config *next,
			void (*ignored)(void *arg, const char *key), void *arg)
{
	keep_static(cur, next, false, ignored, arg);
}

void config_keep_static_common(const struct config *cur, struct config *next)
{
	keep_static(cur, next, true, NULL, NULL);
}

void config_free(struct config *cfg)
{
	if (cfg == NULL)
		return;
	if (cfg->routes) {
		for (int n = 0; n < cfg->nroutes; n++)
			config_free(&cfg->routes[n]);
		free(cfg->routes);
		cfg->routes = NULL;
	}
	for (size_t i = 0; i < NKEYS; i++) {
		if (keys[i].type == K_STR) {
			char **p = (char **)(void *)((char *)cfg + keys[i].off);
			free(*p);
			*p = NULL;
		}
	}
}

char *config_mask_conninfo(const char *conninfo, char *buf, size_t len)
{
	PQconninfoOption *opts;
	char *err = NULL;
	size_t used = 0;

	if (conninfo == NULL || *conninfo == '\0') {
		snprintf(buf, len, "%s", "");
		return buf;
	}
	opts = PQconninfoParse(conninfo, &err);
	if (opts == NULL) {
		PQfreemem(err);
		snprintf(buf, len, "(invalid)");
		return buf;
	}
	buf[0] = '\0';
	for (PQconninfoOption *o = opts; o->keyword; o++) {
		bool secret = o->dispchar && strchr(o->dispchar, '*');
		int n;
		if (o->val == NULL)
			continue;
		n = snprintf(buf + used, len - used, "%s%s=%s", used ? " " : "", o->keyword,
			     secret ? "***" : o->val);
		if (n < 0 || (size_t)n >= len - used)
			break;
		used += (size_t)n;
	}
	PQconninfoFree(opts);
	return buf;
}

static const char *const source_names[] = { "default", "file", "credential", "environment",
					     "command line" };

void config_describe(const struct config *cfg, const char *path, char *buf, size_t len)
{
	int count[SRC_CLI + 1] = { 0 };
	size_t used;

	for (size_t i = 0; i < NKEYS; i++)
		count[cfg->source[i] <= SRC_CLI ? cfg->source[i] : SRC_DEFAULT]++;
	if (cfg->file_read)
		used = (size_t)snprintf(buf, len, "file %s (%d key%s)", path, count[SRC_FILE],
					count[SRC_FILE] == 1 ? "" : "s");
	else
		used = (size_t)snprintf(buf, len, "no file (%s does not exist)", path);
	for (int s = SRC_CLI; s >= SRC_DEFAULT && used < len; s--) {
		if (count[s] == 0 || s == SRC_FILE)
			continue;
		used += (size_t)snprintf(buf + used, len - used, "; %s: %d key%s", source_names[s],
					 count[s], count[s] == 1 ? "" : "s");
	}
	if (cfg->routes && used < len)
		snprintf(buf + used, len - used, "; %d routes", cfg->nroutes);
}

static bool route_section(const char *section)
{
	return strcmp(section, "queue") == 0 || strcmp(section, "runpod") == 0 ||
	       strcmp(section, "tracker") == 0;
}

/* route: NULL for the common keys, else the route whose keys to print. */
static void dump_keys(const struct config *cfg, FILE *fp, const char *route)
{
	char label[96], val[1024];

	for (size_t i = 0; i < NKEYS; i++) {
		const struct key *k = &keys[i];
		const char *field = (const char *)cfg + k->off;

		if (route && !route_section(k->section))
			continue;
		if (route)
			snprintf(label, sizeof(label), "route.%s.%s.%s", route, k->section, k->name);
		else
			key_label(k, label, sizeof(label));
		switch (k->type) {
		case K_INT:
			snprintf(val, sizeof(val), "%d", *(const int *)(const void *)field);
			break;
		case K_ENUM:
			snprintf(val, sizeof(val), "%s", k->choices[*(const int *)(const void *)field]);
			break;
		case K_BOOL:
			snprintf(val, sizeof(val), "%s", *(const int *)(const void *)field ? "on" : "off");
			break;
		case K_STR: {
			const char *s = *(char *const *)(const void *)field;
			if (k->flags & F_CONNINFO)
				config_mask_conninfo(s, val, sizeof(val));
			else if (k->flags & F_SECRET)
				snprintf(val, sizeof(val), "***");
			else
				snprintf(val, sizeof(val), "%s", s ? s : "");
			break;
		}
		}
		fprintf(fp, "%-36s = %-40s # %s\n", label, val, source_names[cfg->source[i]]);
	}
}

void config_dump(const struct config *cfg, void *fp)
{
	dump_keys(cfg, fp, NULL);
	for (int n = 0; cfg->routes && n < cfg->nroutes; n++)
		dump_keys(&cfg->routes[n], fp, cfg->routes[n].route_name);
}
