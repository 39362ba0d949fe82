/* config_source — see include/config_source.h. */
#include "config_source.h"
#include "config_keys.h"

#include <ctype.h>
#include <errno.h>
#include <ini.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Where the list of keys is, for an unknown key with no near match. */
#define KEY_LIST_HINT "; the keys are listed by pgmq-dispatcher -T and in man 8 pgmq-dispatcher"

void config_fail(struct raw *r, const char *key, const char *where, const char *fmt, ...)
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

void config_set_raw(struct raw *r, size_t i, const char *value, enum config_source src,
		    const char *where)
{
	free(r->value[i]);
	r->value[i] = strdup(value);
	if (r->value[i] == NULL) {
		config_fail(r, config_keys[i].name, where, "out of memory");
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
	int lineno;    /* line most recently read */
	int long_line; /* first line longer than inih takes, or 0 */
	bool seen[CONFIG_MAX_KEYS];
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

void config_raw_label(const struct raw *r, size_t i, char *buf, size_t len)
{
	if (r->route && r->from_route[i])
		snprintf(buf, len, "route.%s.%s", r->route, config_keys[i].name);
	else
		config_key_label(&config_keys[i], buf, len);
}

/* The key a [route.NAME] section may set: "queue" (queue.name), a key of
 * [queue], [runpod] or [tracker] by its bare name, or section.key. */
static int find_route_key(const char *name)
{
	static const char *const sections[] = { "queue", "runpod", "tracker" };
	const char *dot = strchr(name, '.');

	if (strcmp(name, "queue") == 0)
		return config_find_key("queue", "name");
	if (dot) {
		char section[32];
		snprintf(section, sizeof(section), "%.*s", (int)(dot - name), name);
		for (size_t s = 0; s < 3; s++)
			if (strcmp(section, sections[s]) == 0)
				return config_find_key(section, dot + 1);
		return -1;
	}
	for (size_t s = 0; s < 3; s++) {
		int i = config_find_key(sections[s], name);
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
		if (!(islower((unsigned char)*n) || isdigit((unsigned char)*n) || *n == '_' ||
		      *n == '-'))
			return false;
	return true;
}

/* Stores key ki of route (created at its first key). From the file a key
 * may come once; the environment outranks the file, as for common keys. */
static void route_put(struct raw *r, const char *route, const char *label, int ki,
		      const char *value, const char *where, unsigned char source)
{
	int ri = -1;
	char *copy;

	if (!route_name_ok(route)) {
		config_fail(r, label, where, "route name must be 1-%d of a-z, 0-9, _ and -",
			    CONFIG_ROUTE_NAME_MAX);
		return;
	}
	for (int n = 0; n < r->nroutes; n++)
		if (strcmp(r->route_names[n], route) == 0)
			ri = n;
	if (ri < 0) {
		if (r->nroutes == CONFIG_MAX_ROUTES) {
			config_fail(r, label, where, "more than %d routes", CONFIG_MAX_ROUTES);
			return;
		}
		ri = r->nroutes++;
		snprintf(r->route_names[ri], sizeof(r->route_names[ri]), "%s", route);
	}
	if ((copy = strdup(value)) == NULL) {
		config_fail(r, label, where, "out of memory");
		return;
	}
	unquote(copy);
	for (int n = 0; n < r->nrkv; n++)
		if (r->rkv[n].route == ri && r->rkv[n].key == ki) {
			if (source == SRC_FILE && r->rkv[n].source == SRC_FILE) {
				config_fail(r, label, where, "set twice in the file");
				free(copy);
				return;
			}
			free(r->rkv[n].value);
			r->rkv[n].value = copy;
			r->rkv[n].source = source;
			snprintf(r->rkv[n].where, sizeof(r->rkv[n].where), "%s", where);
			return;
		}
	if (r->rkv == NULL && (r->rkv = calloc(MAX_ROUTE_KV, sizeof(*r->rkv))) == NULL) {
		config_fail(r, label, where, "out of memory");
		free(copy);
		return;
	}
	if (r->nrkv == MAX_ROUTE_KV) {
		config_fail(r, label, where, "too many route keys");
		free(copy);
		return;
	}
	r->rkv[r->nrkv].value = copy;
	r->rkv[r->nrkv].route = ri;
	r->rkv[r->nrkv].key = ki;
	r->rkv[r->nrkv].source = source;
	snprintf(r->rkv[r->nrkv].where, sizeof(r->rkv[r->nrkv].where), "%s", where);
	r->nrkv++;
}

static void on_route_value(struct raw *r, const char *route, const char *name, const char *value,
			   const char *where)
{
	char label[160];
	int ki = find_route_key(name);

	snprintf(label, sizeof(label), "route.%s.%s", route, name);
	if (ki < 0) {
		config_fail(r, label, where,
			    "unknown key (a route sets queue and the keys of [queue], "
			    "[runpod] and [tracker])");
		return;
	}
	route_put(r, route, label, ki, value, where, SRC_FILE);
}

static char *config_read_secret_file(const char *path, char *err, size_t errlen);

#define ROUTE_ENV "PGMQD_ROUTE_"
#define ROUTE_ENV_FORM                                                                        \
	"a route's variable is PGMQD_ROUTE_<NAME>__<SECTION>_<KEY> (route name in capitals, " \
	"two underscores, then the key's PGMQD_ name without PGMQD_), e.g. "                  \
	"PGMQD_ROUTE_ASR__QUEUE_BATCH_SIZE"

/* PGMQD_ROUTE_<NAME>__<SECTION>_<KEY>[_FILE]=value: key SECTION.KEY of
 * [route.name] (name in lower case; a route whose name has a '-' cannot be
 * named here). <SECTION>_<KEY> is the key's own PGMQD_ name, of a key a
 * route may set; QUEUE_NAME is the route's queue. */
static void on_route_env(struct raw *r, const char *var, size_t var_len, const char *value)
{
	char name[192], route[CONFIG_ROUTE_NAME_MAX + 2], where[200], label[160], env[128];
	const char *sep;
	size_t rlen;
	int ki = -1;
	bool file = false;

	snprintf(name, sizeof(name), "%.*s", (int)var_len, var);
	snprintf(where, sizeof(where), "env %s", name);
	sep = strstr(name + strlen(ROUTE_ENV), "__");
	rlen = sep ? (size_t)(sep - (name + strlen(ROUTE_ENV))) : 0;
	if (sep == NULL || rlen == 0 || rlen > CONFIG_ROUTE_NAME_MAX || sep[2] == '\0') {
		config_fail(r, name, "environment", ROUTE_ENV_FORM);
		return;
	}
	for (size_t i = 0; i < rlen; i++)
		route[i] = (char)tolower((unsigned char)name[strlen(ROUTE_ENV) + i]);
	route[rlen] = '\0';
	for (size_t i = 0; i < NKEYS && ki < 0; i++) {
		size_t n;
		config_env_name(&config_keys[i], env, sizeof(env));
		n = strlen(env + 6);
		if (strcmp(sep + 2, env + 6) == 0) {
			ki = (int)i;
		} else if ((config_keys[i].flags & F_FILE) && strncmp(sep + 2, env + 6, n) == 0 &&
			   strcmp(sep + 2 + n, "_FILE") == 0) {
			ki = (int)i;
			file = true;
		}
	}
	snprintf(label, sizeof(label), "route.%s.%s", route, sep + 2);
	if (ki < 0 || (strcmp(config_keys[ki].section, "queue") != 0 &&
		       strcmp(config_keys[ki].section, "runpod") != 0 &&
		       strcmp(config_keys[ki].section, "tracker") != 0)) {
		config_fail(r, name, "environment",
			    "unknown key %s for a route: it sets QUEUE_NAME and the keys of "
			    "[queue], [runpod] and [tracker] by their PGMQD_ names",
			    sep + 2);
		return;
	}
	snprintf(label, sizeof(label), "route.%s.%s", route,
		 ki == config_find_key("queue", "name") ? "queue" : config_keys[ki].name);
	if (file) {
		char err[256];
		char *s = config_read_secret_file(value, err, sizeof(err));
		if (s == NULL) {
			config_fail(r, label, where, "%s", err);
			return;
		}
		route_put(r, route, label, ki, s, where, SRC_ENV);
		free(s);
		return;
	}
	route_put(r, route, label, ki, value, where, SRC_ENV);
}

static int on_ini_value(void *user, const char *section, const char *name, const char *value)
{
	struct file_ctx *fc = user;
	struct raw *r = fc->r;
	int lineno = fc->lineno;
	char where[160], label[96];
	int i = config_find_key(section, name);

	snprintf(where, sizeof(where), "file %s:%d", r->path, lineno);
	if (strncmp(section, "route.", 6) == 0) {
		on_route_value(r, section + 6, name, value, where);
		return 1;
	}
	snprintf(label, sizeof(label), "%s.%s", section, name);
	if (i < 0) {
		char near[128];
		if (config_nearest_key(label, false, near, sizeof(near)))
			config_fail(r, label, where, "unknown key; did you mean %s?", near);
		else
			config_fail(r, label, where, "unknown key" KEY_LIST_HINT);
		return 1;
	}
	if (fc->seen[i]) {
		config_fail(r, label, where, "set twice in the file");
		return 1;
	}
	fc->seen[i] = true;
	if (value[0] == '"' && (strlen(value) < 2 || value[strlen(value) - 1] != '"')) {
		/* inih ends a value at " ;" even inside quotes. */
		config_fail(r, label, where,
			    "unterminated double quote (a ' ;' inside a value starts a "
			    "comment; set such values through the environment)");
		r->failed[i] = true;
		return 1;
	}
	config_set_raw(r, (size_t)i, value, SRC_FILE, where);
	if (r->value[i])
		unquote(r->value[i]);
	return 1;
}

void config_load_file(struct raw *r, const char *path, bool explicit_path)
{
	struct file_ctx fc = { .r = r };
	FILE *fp = fopen(path, "r");
	int rc;
	char where[160];

	r->path = path;
	if (fp == NULL) {
		if (explicit_path || errno != ENOENT)
			config_fail(r, "config", path, "cannot open the configuration file: %s",
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
		config_fail(r, "config", path, "cannot read the configuration file: %s",
			    strerror(e));
		return;
	}
	fclose(fp);
	if (fc.long_line) {
		snprintf(where, sizeof(where), "file %s:%d", path, fc.long_line);
		config_fail(r, "config", where,
			    "line of 199 bytes or more; set long values "
			    "(conninfo, api_key) through the environment or a *_FILE instead");
	}
	/* inih returns the first bad line; our handler never fails, so a
	 * positive result is a syntax error. */
	if (rc > 0) {
		snprintf(where, sizeof(where), "file %s:%d", path, rc);
		config_fail(r, "config", where, "syntax error (expected [section] or key = value)");
	}
}

static const char *config_env_get(char *const *envp, const char *name)
{
	size_t n = strlen(name);

	for (char *const *e = envp; e && *e; e++)
		if (strncmp(*e, name, n) == 0 && (*e)[n] == '=')
			return *e + n + 1;
	return NULL;
}

/* Reads a secret file; trailing newlines are dropped. */
static char *config_read_secret_file(const char *path, char *err, size_t errlen)
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

/* Takes the value from NAME or NAME_FILE; both set is an error. Returns true
 * when this name supplied the key (or failed trying). */
static bool try_env(struct raw *r, size_t i, char *const *envp, const char *name)
{
	const struct key *k = &config_keys[i];
	char fname[128], where[160], label[96], err[256];
	const char *v = config_env_get(envp, name);
	const char *fv = NULL;

	config_key_label(k, label, sizeof(label));
	if (k->flags & F_FILE) {
		snprintf(fname, sizeof(fname), "%s_FILE", name);
		fv = config_env_get(envp, fname);
	}
	if (v != NULL && fv != NULL) {
		snprintf(where, sizeof(where), "env %s", name);
		config_fail(r, label, where, "both %s and %s are set; set only one", name, fname);
		r->failed[i] = true;
		return true;
	}
	if (v != NULL) {
		snprintf(where, sizeof(where), "env %s", name);
		config_set_raw(r, i, v, SRC_ENV, where);
		return true;
	}
	if (fv != NULL) {
		char *s = config_read_secret_file(fv, err, sizeof(err));
		snprintf(where, sizeof(where), "env %s", fname);
		if (s == NULL) {
			config_fail(r, label, where, "%s", err);
			r->failed[i] = true;
			return true;
		}
		config_set_raw(r, i, s, SRC_ENV, where);
		free(s);
		return true;
	}
	return false;
}

void config_load_env(struct raw *r, char *const *envp)
{
	char name[128], label[96];

	for (size_t i = 0; i < NKEYS; i++) {
		config_env_name(&config_keys[i], name, sizeof(name));
		if (try_env(r, i, envp, name))
			continue;
		for (int c = 0; c < 3 && config_keys[i].compat_env[c]; c++)
			if (try_env(r, i, envp, config_keys[i].compat_env[c]))
				break;
	}
	/* An unknown PGMQD_ variable is most likely a typo: refuse it. */
	for (char *const *e = envp; e && *e; e++) {
		const char *eq = strchr(*e, '=');
		bool known = false;

		if (strncmp(*e, "PGMQD_", 6) != 0 || eq == NULL)
			continue;
		if (strncmp(*e, ROUTE_ENV, strlen(ROUTE_ENV)) == 0) {
			on_route_env(r, *e, (size_t)(eq - *e), eq + 1);
			continue;
		}
		for (size_t i = 0; i < NKEYS && !known; i++) {
			size_t n;
			config_env_name(&config_keys[i], name, sizeof(name));
			n = strlen(name);
			if ((size_t)(eq - *e) == n && strncmp(*e, name, n) == 0)
				known = true;
			else if ((config_keys[i].flags & F_FILE) && (size_t)(eq - *e) == n + 5 &&
				 strncmp(*e, name, n) == 0 && strncmp(*e + n, "_FILE", 5) == 0)
				known = true;
		}
		if (!known) {
			char near[128];
			snprintf(label, sizeof(label), "%.*s", (int)(eq - *e), *e);
			if (config_nearest_key(label, true, near, sizeof(near)))
				config_fail(r, label, "environment",
					    "unknown environment variable; did you mean %s?", near);
			else
				config_fail(r, label, "environment",
					    "unknown environment variable" KEY_LIST_HINT);
		}
	}
}

void config_load_credentials(struct raw *r, char *const *envp)
{
	const char *dir = config_env_get(envp, "CREDENTIALS_DIRECTORY");
	char path[4096], where[160], label[96], err[256];

	if (dir == NULL)
		return;
	for (size_t i = 0; i < NKEYS; i++) {
		char *s;

		/* The environment outranks credentials; the file ranks below. */
		if (config_keys[i].credential == NULL || r->source[i] > SRC_CREDENTIAL)
			continue;
		snprintf(path, sizeof(path), "%s/%s", dir, config_keys[i].credential);
		if (access(path, F_OK) != 0)
			continue;
		config_key_label(&config_keys[i], label, sizeof(label));
		snprintf(where, sizeof(where), "credential %s", config_keys[i].credential);
		s = config_read_secret_file(path, err, sizeof(err));
		if (s == NULL) {
			config_fail(r, label, where, "%s", err);
			r->failed[i] = true;
			continue;
		}
		config_set_raw(r, i, s, SRC_CREDENTIAL, where);
		free(s);
	}
}

void config_load_cli(struct raw *r, const char *const *cli)
{
	for (; cli && *cli; cli++) {
		const char *eq = strchr(*cli, '=');
		const char *dot = strchr(*cli, '.');
		char section[64], name[64];
		int i;

		if (eq == NULL || dot == NULL || dot > eq ||
		    (size_t)(dot - *cli) >= sizeof(section) ||
		    (size_t)(eq - dot - 1) >= sizeof(name)) {
			config_fail(r, *cli, "command line", "expected section.key=value");
			continue;
		}
		snprintf(section, sizeof(section), "%.*s", (int)(dot - *cli), *cli);
		snprintf(name, sizeof(name), "%.*s", (int)(eq - dot - 1), dot + 1);
		i = config_find_key(section, name);
		if (i < 0) {
			char label[130], near[128];
			snprintf(label, sizeof(label), "%s.%s", section, name);
			if (config_nearest_key(label, false, near, sizeof(near)))
				config_fail(r, *cli, "command line",
					    "unknown key; did you mean %s?", near);
			else
				config_fail(r, *cli, "command line", "unknown key" KEY_LIST_HINT);
			continue;
		}
		config_set_raw(r, (size_t)i, eq + 1, SRC_CLI, "command line");
	}
}
