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

		config_raw_label(r, i, label, sizeof(label));
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

/* Copies every key of src into dst (strings duplicated). 0 or -1. */
static int copy_keys(struct config *dst, const struct config *src)
{
	memcpy(dst->source, src->source, sizeof(dst->source));
	for (size_t i = 0; i < NKEYS; i++) {
		const char *f = (const char *)src + config_keys[i].off;
		char *t = (char *)dst + config_keys[i].off;
		if (config_keys[i].type != K_STR) {
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
		config_fail(r, "route", "file", "out of memory");
		return;
	}
	for (int n = 0; n < r->nroutes; n++) {
		struct raw *rr = malloc(sizeof(*rr));
		if (rr == NULL) {
			config_fail(r, "route", "file", "out of memory");
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
			rr->source[i] = r->rkv[k].source;
			rr->failed[i] = false;
			rr->from_route[i] = true;
			snprintf(rr->where[i], sizeof(rr->where[i]), "%s", r->rkv[k].where);
		}
		apply(rr, &routes[n]);
		r->errors = rr->errors;
		free(rr);
		snprintf(routes[n].route_name, sizeof(routes[n].route_name), "%s",
			 r->route_names[n]);
		routes[n].nroutes = 1;
		for (int m = 0; m < n; m++) {
			if (routes[m].queue_name && routes[n].queue_name &&
			    strcmp(routes[m].queue_name, routes[n].queue_name) == 0) {
				char label[96];
				snprintf(label, sizeof(label), "route.%s.queue",
					 routes[n].route_name);
				config_fail(r, label, "file",
					    "queue '%s' is already read by route %s",
					    routes[n].queue_name, routes[m].route_name);
			}
		}
	}
	out->routes = routes;
	out->nroutes = r->nroutes;
	if (r->errors == 0 && copy_keys(out, &routes[0]) != 0)
		config_fail(r, "route", "file", "out of memory");
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
		config_load_file(&r, in->path, in->path_explicit);
	config_load_credentials(&r, in->envp);
	config_load_env(&r, in->envp);
	config_load_cli(&r, in->cli_overrides);
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
