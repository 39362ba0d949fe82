/* ctl — see include/ctl.h. */
#include "ctl.h"
#include "admin.h"
#include "log.h"

#include <cjson/cJSON.h>
#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sysexits.h>

#define CTL_REPLY_MAX (1024 * 1024)

struct reply {
	char *p;
	size_t len;
	bool too_long;
};

static size_t on_body(char *ptr, size_t size, size_t nmemb, void *arg)
{
	struct reply *r = arg;
	size_t n = size * nmemb;
	char *p;

	if (r->len + n > CTL_REPLY_MAX) {
		r->too_long = true;
		return 0;
	}
	p = realloc(r->p, r->len + n + 1);
	if (p == NULL)
		return 0;
	memcpy(p + r->len, ptr, n);
	r->len += n;
	p[r->len] = '\0';
	r->p = p;
	return n;
}

/* One request to the admin endpoint. Returns the HTTP status (0: none)
 * and the body in *out (malloc'd, may be NULL). */
static long request(const struct config *cfg, const char *path, bool post, char **out, char *err,
		    size_t errlen)
{
	char url[400], auth[300], cerr[CURL_ERROR_SIZE] = "";
	struct curl_slist *hdrs = NULL;
	struct reply r = { 0 };
	long status = 0;
	CURL *h;
	CURLcode rc;

	*out = NULL;
	if (admin_local_url(cfg->admin_listen, path, url, sizeof(url)) != 0) {
		snprintf(err, errlen, "admin.listen '%s' is not a usable address",
			 cfg->admin_listen);
		return 0;
	}
	if ((h = curl_easy_init()) == NULL) {
		snprintf(err, errlen, "curl_easy_init failed");
		return 0;
	}
	if (cfg->admin_token[0]) {
		snprintf(auth, sizeof(auth), "Authorization: Bearer %s", cfg->admin_token);
		hdrs = curl_slist_append(NULL, auth);
	}
	curl_easy_setopt(h, CURLOPT_URL, url);
	curl_easy_setopt(h, CURLOPT_PROXY, "");
	curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, 5000L);
	curl_easy_setopt(h, CURLOPT_ERRORBUFFER, cerr);
	curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
	curl_easy_setopt(h, CURLOPT_WRITEDATA, &r);
	if (hdrs)
		curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdrs);
	if (post) {
		curl_easy_setopt(h, CURLOPT_POST, 1L);
		curl_easy_setopt(h, CURLOPT_POSTFIELDS, "");
	}
	rc = curl_easy_perform(h);
	if (rc == CURLE_OK)
		curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
	else
		snprintf(err, errlen, "%s: %s", url, cerr[0] ? cerr : curl_easy_strerror(rc));
	curl_slist_free_all(hdrs);
	curl_easy_cleanup(h);
	*out = r.p;
	return status;
}

static void print_routes(const char *json)
{
	cJSON *arr = cJSON_Parse(json), *o;

	if (!cJSON_IsArray(arr)) {
		fputs(json, stdout);
		cJSON_Delete(arr);
		return;
	}
	printf("%-20s %-24s %-10s %-6s %9s %12s  %s\n", "ROUTE", "QUEUE", "STATE", "READY",
	       "IN_FLIGHT", "QUEUE_LENGTH", "REASON");
	cJSON_ArrayForEach(o, arr)
	{
		const char *name = cJSON_GetStringValue(cJSON_GetObjectItem(o, "name"));
		const char *queue = cJSON_GetStringValue(cJSON_GetObjectItem(o, "queue"));
		const char *state = cJSON_GetStringValue(cJSON_GetObjectItem(o, "state"));
		const char *reason = cJSON_GetStringValue(cJSON_GetObjectItem(o, "reason"));
		printf("%-20s %-24s %-10s %-6s %9.0f %12.0f  %s\n", name ? name : "?",
		       queue ? queue : "?", state ? state : "?",
		       cJSON_IsTrue(cJSON_GetObjectItem(o, "ready")) ? "yes" : "no",
		       cJSON_GetNumberValue(cJSON_GetObjectItem(o, "in_flight")),
		       cJSON_GetNumberValue(cJSON_GetObjectItem(o, "queue_length")),
		       reason ? reason : "");
	}
	cJSON_Delete(arr);
}

static void ctl_usage(FILE *fp)
{
	fprintf(fp, "Usage: pgmq-dispatcher [-c FILE] ctl routes\n"
		    "       pgmq-dispatcher [-c FILE] ctl pause|resume|drain ROUTE\n");
}

int ctl_run(const struct config *cfg, int argc, char *const *argv)
{
	char path[160], err[1024] = "", *body = NULL;
	bool routes = argc == 1 && strcmp(argv[0], "routes") == 0;
	long status;

	if (!routes &&
	    !(argc == 2 && (strcmp(argv[0], "pause") == 0 || strcmp(argv[0], "resume") == 0 ||
			    strcmp(argv[0], "drain") == 0))) {
		ctl_usage(stderr);
		return EX_USAGE;
	}
	if (strcmp(cfg->admin_listen, "off") == 0) {
		fprintf(stderr,
			"pgmq-dispatcher ctl: admin.listen is off: no endpoint to talk to\n");
		return EX_CONFIG;
	}
	if (routes) {
		snprintf(path, sizeof(path), "/routes");
	} else {
		char *esc = curl_easy_escape(NULL, argv[1], 0);
		if (esc == NULL)
			return EX_OSERR;
		snprintf(path, sizeof(path), "/routes/%s/%s", esc, argv[0]);
		curl_free(esc);
	}
	status = request(cfg, path, !routes, &body, err, sizeof(err));
	if (status == 0) {
		fprintf(stderr, "pgmq-dispatcher ctl: %s\n", err);
		free(body);
		return EX_UNAVAILABLE;
	}
	if (status != 200) {
		fprintf(stderr, "pgmq-dispatcher ctl: HTTP %ld: %s", status, body ? body : "\n");
		free(body);
		return status == 404 ? EX_DATAERR : EX_NOPERM;
	}
	if (routes)
		print_routes(body ? body : "[]");
	else
		fputs(body ? body : "\n", stdout);
	free(body);
	return 0;
}
