/* config_keys — see include/config_keys.h: the table, its names, and what
 * walks it once a snapshot exists (reload's restart-only keys, free, the
 * redacted dump and the one-line source summary). */
#include "config_keys.h"
#include "config_check.h"

#include <ctype.h>
#include <libpq-fe.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

static const char *const level_choices[] = { "error", "warn", "info", "debug", "trace", NULL };
static const char *const format_choices[] = { "logfmt", "json", NULL };

/* One row per key reads best as a table: */
/* clang-format off */
const struct key config_keys[] = {
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
	{ "queue", "read_batches", K_INT, OFF(read_batches), "200", 1, 200, 0, { 0 }, NULL, NULL, NULL },
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
	/* The window of max_requests_per_10s and tracker.max_status_per_10s:
	 * RunPod's is 10 s; another value only for tests or another API. */
	{ "runpod", "rate_window_ms", K_INT, OFF(rate_window_ms), "10000", 1000, 3600000, F_STATIC,
	  { 0 }, NULL, NULL, NULL },
	{ "runpod", "webhook", K_STR, OFF(webhook), "", 0, 0, 0, { 0 }, NULL, NULL, check_webhook },
	/* §3.1: executionTimeout 5 s - 7 days, ttl 10 s - 7 days, in ms. */
	{ "runpod", "policy_execution_timeout_ms", K_INT, OFF(policy_execution_timeout_ms), "0", 5000,
	  604800000, F_ZERO_OFF, { 0 }, NULL, NULL, NULL },
	{ "runpod", "policy_ttl_ms", K_INT, OFF(policy_ttl_ms), "0", 10000, 604800000, F_ZERO_OFF,
	  { 0 }, NULL, NULL, NULL },
	{ "runpod", "policy_low_priority", K_BOOL, OFF(policy_low_priority), "off", 0, 0, 0, { 0 },
	  NULL, NULL, NULL },
	/* Routes on one endpoint share its cap by strict priority (endpoint.c). */
	{ "runpod", "priority", K_INT, OFF(priority), "0", 0, 1000, 0, { 0 }, NULL, NULL, NULL },
	{ "runpod", "dispatch_id_in_input", K_BOOL, OFF(dispatch_id_in_input), "off", 0, 0, 0, { 0 },
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
	{ "tracker", "max_queued_jobs", K_INT, OFF(tracker_max_queued_jobs), "0", 1, 1000000,
	  F_ZERO_OFF, { 0 }, NULL, NULL, NULL },
	{ "tracker", "max_heartbeat_s", K_INT, OFF(tracker_max_heartbeat_s), "0", 1, 31536000,
	  F_ZERO_OFF, { 0 }, NULL, NULL, NULL },
	{ "ledger", "enabled", K_BOOL, OFF(ledger_enabled), "on", 0, 0, F_STATIC, { 0 }, NULL, NULL,
	  NULL },
	{ "ledger", "schema", K_STR, OFF(ledger_schema), "pgmq_dispatcher", 0, 0, F_STATIC, { 0 }, NULL,
	  NULL, check_schema },
	{ "ledger", "retention_days", K_INT, OFF(ledger_retention_days), "14", 1, 3650, 0, { 0 }, NULL,
	  NULL, NULL },
	{ "ledger", "completed_grace_s", K_INT, OFF(ledger_completed_grace_s), "60", 1, 86400, 0,
	  { 0 }, NULL, NULL, NULL },
	{ "ledger", "lease_s", K_INT, OFF(ledger_lease_s), "30", 2, 3600, F_STATIC, { 0 }, NULL, NULL,
	  NULL },
	{ "fleet", "enabled", K_BOOL, OFF(fleet_enabled), "off", 0, 0, F_STATIC, { 0 }, NULL, NULL,
	  NULL },
	{ "fleet", "grant_max", K_INT, OFF(fleet_grant_max), "20", 1, 10000, 0, { 0 }, NULL, NULL,
	  NULL },
	/* At most 1 s: a grant counts for window + validity, so validity
	 * costs the fleet validity / (window + validity) of the cap. */
	{ "fleet", "validity_ms", K_INT, OFF(fleet_validity_ms), "250", 10, 1000, 0, { 0 }, NULL, NULL,
	  NULL },
	{ "fleet", "expected_replicas", K_INT, OFF(fleet_expected_replicas), "0", 0, 1000, 0, { 0 },
	  NULL, NULL, NULL },
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

const size_t config_nkeys = sizeof(config_keys) / sizeof(config_keys[0]);
_Static_assert(sizeof(config_keys) / sizeof(config_keys[0]) <= CONFIG_MAX_KEYS,
	       "raise CONFIG_MAX_KEYS");

void config_key_label(const struct key *k, char *buf, size_t len)
{
	snprintf(buf, len, "%s.%s", k->section, k->name);
}

int config_find_key(const char *section, const char *name)
{
	for (size_t i = 0; i < NKEYS; i++)
		if (strcmp(config_keys[i].section, section) == 0 &&
		    strcmp(config_keys[i].name, name) == 0)
			return (int)i;
	return -1;
}

void config_env_name(const struct key *k, char *buf, size_t len)
{
	size_t j = 0;

	j += (size_t)snprintf(buf, len, "PGMQD_%s_%s", k->section, k->name);
	for (size_t i = 0; i < j && i < len; i++)
		buf[i] = (char)toupper((unsigned char)buf[i]);
}

/* The name part of a label: after "section." (file, command line) or after
 * "PGMQD_SECTION_" (environment; section names hold no '_'), without a unit
 * suffix, copied into out. */
static void name_stem(const char *label, bool env, char *out, size_t len)
{
	static const char *const units[] = { "_ms", "_s", "_seconds", "_bytes", "_10s", NULL };
	const char *p = label;
	size_t n;

	if (env) {
		if (strncasecmp(p, "PGMQD_", 6) == 0)
			p += 6;
		const char *u = strchr(p, '_');
		if (u)
			p = u + 1;
	} else {
		const char *dot = strchr(p, '.');
		if (dot)
			p = dot + 1;
	}
	snprintf(out, len, "%s", p);
	n = strlen(out);
	for (int i = 0; units[i]; i++) {
		size_t un = strlen(units[i]);
		if (n > un && strcasecmp(out + n - un, units[i]) == 0) {
			out[n - un] = '\0';
			break;
		}
	}
}

/* A typo, not another word: at most 3 edits and at most a third of the
 * shorter of the two names. */
static bool close_enough(int d, const char *a, const char *b)
{
	size_t la = strlen(a), lb = strlen(b);
	size_t shorter = la < lb ? la : lb;

	return d <= 3 && (size_t)d * 3 <= shorter;
}

/* The known name nearest to an unknown one ("section.key", or an
 * environment variable when env), or NULL when none is close. Compares the
 * whole label and, apart, the key's name without its section and unit
 * suffix ("pol_interval" → queue.poll_interval_ms). */
const char *config_nearest_key(const char *unknown, bool env, char *buf, size_t len)
{
	int best = 99;
	char name[128], stem_u[128], stem_k[128];

	name_stem(unknown, env, stem_u, sizeof(stem_u));
	for (size_t i = 0; i < NKEYS; i++) {
		int d, ds;
		if (env)
			config_env_name(&config_keys[i], name, sizeof(name));
		else
			snprintf(name, sizeof(name), "%s.%s", config_keys[i].section,
				 config_keys[i].name);
		d = config_distance(unknown, name);
		if (!close_enough(d, unknown, name))
			d = 99;
		name_stem(name, env, stem_k, sizeof(stem_k));
		ds = config_distance(stem_u, stem_k);
		if (close_enough(ds, stem_u, stem_k) && ds < d)
			d = ds;
		if (d < best) {
			best = d;
			snprintf(buf, len, "%s", name);
		}
	}
	return best < 99 ? buf : NULL;
}

static bool route_section(const char *section)
{
	return strcmp(section, "queue") == 0 || strcmp(section, "runpod") == 0 ||
	       strcmp(section, "tracker") == 0;
}

static void keep_static(const struct config *cur, struct config *next, bool route,
			void (*ignored)(void *arg, const char *key), void *arg)
{
	char label[96];

	for (size_t i = 0; i < NKEYS; i++) {
		const struct key *k = &config_keys[i];
		bool differs;

		if (!(k->flags & F_STATIC) || (route && route_section(k->section)))
			continue;
		config_key_label(k, label, sizeof(label));
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

/* The strings of one snapshot; its routes are not followed. */
static void free_strings(struct config *cfg)
{
	for (size_t i = 0; i < NKEYS; i++) {
		if (config_keys[i].type == K_STR) {
			char **p = (char **)(void *)((char *)cfg + config_keys[i].off);
			free(*p);
			*p = NULL;
		}
	}
}

void config_free(struct config *cfg)
{
	if (cfg == NULL)
		return;
	if (cfg->routes) {
		/* A route's snapshot has no routes of its own (config.h). */
		for (int n = 0; n < cfg->nroutes; n++)
			free_strings(&cfg->routes[n]);
		free(cfg->routes);
		cfg->routes = NULL;
	}
	free_strings(cfg);
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

/* route: NULL for the common keys, else the route whose keys to print. */
static void dump_keys(const struct config *cfg, FILE *fp, const char *route)
{
	char label[96], val[1024];

	for (size_t i = 0; i < NKEYS; i++) {
		const struct key *k = &config_keys[i];
		const char *field = (const char *)cfg + k->off;

		if (route && !route_section(k->section))
			continue;
		if (route)
			snprintf(label, sizeof(label), "route.%s.%s.%s", route, k->section,
				 k->name);
		else
			config_key_label(k, label, sizeof(label));
		switch (k->type) {
		case K_INT:
			snprintf(val, sizeof(val), "%d", *(const int *)(const void *)field);
			break;
		case K_ENUM:
			snprintf(val, sizeof(val), "%s",
				 k->choices[*(const int *)(const void *)field]);
			break;
		case K_BOOL:
			snprintf(val, sizeof(val), "%s",
				 *(const int *)(const void *)field ? "on" : "off");
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
