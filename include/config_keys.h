/* config_keys — the key table, internal to the config modules.
 *
 * Owns the description of every configuration key (section, name, type,
 * offset in struct config, default, range, flags: secret, *_FILE twin,
 * conninfo masking, restart-only) and the name helpers that read it
 * (section.key labels, PGMQD_ environment names, nearest-key suggestions).
 * Knows nothing of where values come from (config_source.c) or of how a
 * value is judged (config_check.c). One row per key in config_keys.c. */
#ifndef PGMQD_CONFIG_KEYS_H
#define PGMQD_CONFIG_KEYS_H

#include "config.h"

#include <stdbool.h>
#include <stddef.h>

enum ktype { K_STR, K_INT, K_ENUM, K_BOOL };

#define F_SECRET 1u    /* never printed */
#define F_FILE 2u      /* X_FILE environment twin and credential file allowed */
#define F_CONNINFO 4u  /* dumped through PQconninfoParse masking */
#define F_STATIC 8u    /* cannot change on reload (SIGHUP); needs a restart */
#define F_ZERO_OFF 16u /* K_INT: 0 means "off / not sent", else min..max */

struct key {
	const char *section, *name;
	enum ktype type;
	size_t off;
	const char *def; /* NULL: required */
	long min, max;   /* K_INT range */
	unsigned flags;
	const char *compat_env[3];               /* other environment names, lower precedence */
	const char *credential;                  /* file name under $CREDENTIALS_DIRECTORY */
	const char *const *choices;              /* K_ENUM */
	const char *(*check)(const char *value); /* K_STR: NULL or the problem */
};

#define OFF(f) offsetof(struct config, f)

/* The table, in the order of struct config's source[] indexes. */
extern const struct key config_keys[];
extern const size_t config_nkeys;
#define NKEYS config_nkeys

/* "section.name" of k into buf. */
void config_key_label(const struct key *k, char *buf, size_t len);

/* Index of section.name in the table, or -1. */
int config_find_key(const char *section, const char *name);

/* PGMQD_<SECTION>_<NAME> of k, upper-cased, into buf. */
void config_env_name(const struct key *k, char *buf, size_t len);

/* The known name nearest to an unknown one ("section.key", or an
 * environment variable when env) written to buf and returned, or NULL
 * when none is close (at most 3 edits and a third of the name). */
const char *config_nearest_key(const char *unknown, bool env, char *buf, size_t len);

#endif
