/* config — see include/config.h: merges the sources (config_source.c) in
 * precedence order, then types, range-checks and validates every key of the
 * table (config_keys.c) with the checks of config_check.c into a snapshot. */
#include "config.h"
#include "config_check.h"
#include "config_keys.h"
#include "config_source.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* Shows a value in an error, or hides it for secrets. */
static const char *shown(const struct key *k, const char *v)
{
	return (k->flags & F_SECRET) ? "(hidden)" : v;
}

static const char *const bool_true[] = { "on", "true", "yes", "1", NULL };
static const char *const bool_false[] = { "off", "false", "no", "0", NULL };

static void apply(struct raw *r, struct config *cfg)
{
	char label[96];

	for (size_t i = 0; i < NKEYS; i++) {
		const struct key *k = &config_keys[i];
		const char *v = r->value[i];
		char *field = (char *)cfg + k->off;

		config_key_label(k, label, sizeof(label));
		cfg->source[i] = r->source[i];
		if (r->failed[i])
			continue;
		if (v == NULL) {
			if (k->def == NULL) {
				char name[128], cred[160] = "", nofile[320] = "";
				config_env_name(k, name, sizeof(name));
				if (k->credential)
					snprintf(cred, sizeof(cred),
						 ", or as the systemd credential %s "
						 "(LoadCredential=)",
						 k->credential);
				if (r->file_missing)
					snprintf(nofile, sizeof(nofile),
						 "; the configuration file %s "
						 "does not exist",
						 r->path);
				config_fail(r, label, "default",
					    "is required (set it in the file or as %s%s%s%s)%s",
					    name, k->compat_env[0] ? " or " : "",
					    k->compat_env[0] ? k->compat_env[0] : "", cred, nofile);
				continue;
			}
			v = k->def;
		}
		switch (k->type) {
		case K_INT: {
			long n;
			if (!config_parse_int(v, &n)) {
				config_fail(r, label, r->where[i], "not an integer: '%s'",
					    shown(k, v));
				break;
			}
			if ((k->flags & F_ZERO_OFF) && n == 0) {
				*(int *)(void *)field = 0;
				break;
			}
			if (n < k->min || n > k->max) {
				if (k->flags & F_ZERO_OFF) {
					config_fail(r, label, r->where[i],
						    "must be 0 (off) or between %ld and %ld, "
						    "got %ld",
						    k->min, k->max, n);
					break;
				}
				config_fail(r, label, r->where[i],
					    "must be between %ld and %ld, got %ld", k->min, k->max,
					    n);
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
				config_fail(r, label, r->where[i],
					    "must be on or off (true/false, yes/no, 1/0), "
					    "got '%s'",
					    v);
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
					strncat(list, c ? ", " : "",
						sizeof(list) - strlen(list) - 1);
					strncat(list, k->choices[c],
						sizeof(list) - strlen(list) - 1);
				}
				config_fail(r, label, r->where[i], "must be one of %s, got '%s'",
					    list, v);
				break;
			}
			*(int *)(void *)field = found;
			break;
		}
		case K_STR: {
			const char *problem = k->check ? k->check(v) : NULL;
			char *copy;
			/* Before the key's own check, whose complaint would miss the point. */
			if (r->source[i] != SRC_DEFAULT && config_is_placeholder(v))
				problem = "is the example's placeholder, not a real value";
			if (problem) {
				if (k->flags & F_SECRET)
					config_fail(r, label, r->where[i], "%s", problem);
				else
					config_fail(r, label, r->where[i], "%s: '%s'", problem, v);
				break;
			}
			copy = strdup(v);
			if (copy == NULL) {
				config_fail(r, label, r->where[i], "out of memory");
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
		config_load_file(&r, in->path, in->path_explicit);
	config_load_credentials(&r, in->envp);
	config_load_env(&r, in->envp);
	config_load_cli(&r, in->cli_overrides);
	apply(&r, out);
	out->file_read = in->path != NULL && !r.file_missing;
	for (size_t i = 0; i < NKEYS; i++)
		free(r.value[i]);
	errors = r.errors;
	if (errors)
		config_free(out);
	return errors;
}
