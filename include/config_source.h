/* config_source — reads raw (text) values from each source into one merge.
 *
 * Owns the INI file (through inih, with line numbers and long-line
 * detection), the environment (PGMQD_*, compatibility names, *_FILE
 * twins), systemd credentials ($CREDENTIALS_DIRECTORY) and command-line
 * overrides, plus the error reporting every config module shares. A later
 * source overwrites an earlier one; the caller calls them lowest first.
 * Knows nothing of types, ranges or value checks (config.c applies those). */
#ifndef PGMQD_CONFIG_SOURCE_H
#define PGMQD_CONFIG_SOURCE_H

#include "config.h"

#include <stdbool.h>
#include <stddef.h>

/* A raw (text) value per key while the sources are merged. */
struct raw {
	char *value[CONFIG_MAX_KEYS];
	char where[CONFIG_MAX_KEYS][160]; /* "file PATH:LINE", "env NAME", … */
	unsigned char source[CONFIG_MAX_KEYS];
	bool failed[CONFIG_MAX_KEYS]; /* a source of this key was bad: reported already */
	int errors;
	config_error_fn on_error;
	void *arg;
	const char *path;
	bool file_missing; /* the default file does not exist */
	/* [route.NAME] sections: their values, applied per route on top. */
	char route_names[CONFIG_MAX_ROUTES][CONFIG_ROUTE_NAME_MAX + 1];
	int nroutes;
	struct route_kv *rkv; /* MAX_ROUTE_KV entries, allocated at the first */
	int nrkv;
	const char *route;                /* while applying a route: its name */
	bool from_route[CONFIG_MAX_KEYS]; /* while applying a route: the value is the route's */
};

/* One key = value of a [route.NAME] section. */
struct route_kv {
	int route, key;
	unsigned char source; /* SRC_FILE or SRC_ENV */
	char *value;
	char where[160];
};
#define MAX_ROUTE_KV (CONFIG_MAX_ROUTES * 48)

/* The label of key i in an error: route.NAME.key when a route set it. */
void config_raw_label(const struct raw *r, size_t i, char *buf, size_t len);

/* Counts one error and passes "key, where, problem" to r->on_error. */
void config_fail(struct raw *r, const char *key, const char *where, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));

/* Sets key i's raw value (copied) and where it came from. */
void config_set_raw(struct raw *r, size_t i, const char *value, enum config_source src,
		    const char *where);

/* The INI file at path; a missing file is an error only when explicit_path. */
void config_load_file(struct raw *r, const char *path, bool explicit_path);
/* Files under $CREDENTIALS_DIRECTORY named by the table (systemd LoadCredential=). */
void config_load_credentials(struct raw *r, char *const *envp);
/* PGMQD_<SECTION>_<KEY>, compatibility names and *_FILE twins; unknown PGMQD_* fail. */
void config_load_env(struct raw *r, char *const *envp);
/* "section.key=value" strings, NULL-terminated (may be NULL). */
void config_load_cli(struct raw *r, const char *const *cli);

#endif
