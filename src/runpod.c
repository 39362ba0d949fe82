/* runpod — see include/runpod.h. */
#include "runpod.h"

#include "jsonscan.h"

#include <cjson/cJSON.h>
#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <string.h>

/* Adds "webhook" and "policy" beside "input" when configured. */
static bool add_extras(cJSON *root, const struct runpod_extras *x)
{
	cJSON *policy;

	if (x == NULL)
		return true;
	if (x->webhook && x->webhook[0] &&
	    cJSON_AddStringToObject(root, "webhook", x->webhook) == NULL)
		return false;
	if (x->execution_timeout_ms == 0 && x->ttl_ms == 0 && !x->low_priority)
		return true;
	policy = cJSON_AddObjectToObject(root, "policy");
	if (policy == NULL)
		return false;
	if (x->execution_timeout_ms &&
	    cJSON_AddNumberToObject(policy, "executionTimeout", (double)x->execution_timeout_ms) ==
		    NULL)
		return false;
	if (x->ttl_ms && cJSON_AddNumberToObject(policy, "ttl", (double)x->ttl_ms) == NULL)
		return false;
	if (x->low_priority && cJSON_AddTrueToObject(policy, "lowPriority") == NULL)
		return false;
	return true;
}

/* The envelope with an empty jobs array, printed by cJSON. */
static char *print_envelope(const char *queue, int vt_seconds, const struct runpod_extras *extras)
{
	cJSON *root = cJSON_CreateObject();
	cJSON *input;
	char *out = NULL;

	if (root == NULL)
		return NULL;
	input = cJSON_AddObjectToObject(root, "input");
	if (input != NULL && extras && extras->dispatch_id &&
	    cJSON_AddStringToObject(input, "dispatch_id", RUNPOD_DISPATCH_ID_PLACEHOLDER) == NULL)
		input = NULL;
	if (input != NULL && cJSON_AddStringToObject(input, "queue", queue) != NULL &&
	    cJSON_AddNumberToObject(input, "vt_seconds", vt_seconds) != NULL &&
	    cJSON_AddArrayToObject(input, "jobs") != NULL && add_extras(root, extras))
		out = cJSON_PrintUnformatted(root);
	cJSON_Delete(root);
	return out;
}

int runpod_envelope_init(struct runpod_envelope *e, const char *queue, int vt_seconds,
			 const struct runpod_extras *extras)
{
	/* "jobs" is the last member of input; an escaped queue name cannot
	 * hold this (its quotes are all preceded by a backslash). */
	static const char marker[] = ",\"jobs\":[]";
	char *at;

	memset(e, 0, sizeof(*e));
	e->text = print_envelope(queue, vt_seconds, extras);
	if (e->text == NULL)
		return -1;
	at = strstr(e->text, marker);
	if (at == NULL) {
		runpod_envelope_free(e);
		return -1;
	}
	e->head_len = (size_t)(at - e->text) + sizeof(marker) - 2; /* up to and with "[" */
	e->len = strlen(e->text);
	if (extras && extras->dispatch_id) {
		/* The first member of input, so before any user-supplied text. */
		at = strstr(e->text, "\"dispatch_id\":\"" RUNPOD_DISPATCH_ID_PLACEHOLDER "\"");
		if (at == NULL || (size_t)(at - e->text) > e->head_len) {
			runpod_envelope_free(e);
			return -1;
		}
		e->dispatch_id_at = (size_t)(at - e->text) + sizeof("\"dispatch_id\":\"") - 1;
	}
	return 0;
}

void runpod_envelope_set_dispatch_id(const struct runpod_envelope *e, char *body,
				     const char *dispatch_id)
{
	if (e->dispatch_id_at && strlen(dispatch_id) == sizeof(RUNPOD_DISPATCH_ID_PLACEHOLDER) - 1)
		memcpy(body + e->dispatch_id_at, dispatch_id,
		       sizeof(RUNPOD_DISPATCH_ID_PLACEHOLDER) - 1);
}

void runpod_envelope_free(struct runpod_envelope *e)
{
	free(e->text);
	memset(e, 0, sizeof(*e));
}

static char *put(char *p, const char *s, size_t n)
{
	memcpy(p, s, n);
	return p + n;
}

#define PUT_LIT(p, lit) put((p), (lit), sizeof(lit) - 1)

char *runpod_envelope_body(const struct runpod_envelope *e, const struct pgmq_message *msgs, int n,
			   size_t *len)
{
	size_t total = e->len;
	char *body, *p;

	for (int i = 0; i < n; i++)
		total += runpod_job_bytes(&msgs[i]) + (i ? 1 : 0);
	body = malloc(total + 1);
	if (body == NULL)
		return NULL;
	p = put(body, e->text, e->head_len);
	for (int i = 0; i < n; i++) {
		const struct pgmq_message *m = &msgs[i];

		if (i)
			*p++ = ',';
		p = PUT_LIT(p, "{\"msg_id\":");
		p = put(p, m->msg_id, strlen(m->msg_id));
		p = PUT_LIT(p, ",\"read_ct\":");
		p = put(p, m->read_ct, strlen(m->read_ct));
		p = PUT_LIT(p, ",\"enqueued_at\":");
		p = put(p, m->enqueued_at, strlen(m->enqueued_at));
		p = PUT_LIT(p, ",\"document_id\":");
		p = m->document_id ? put(p, m->document_id, strlen(m->document_id))
				   : PUT_LIT(p, "null");
		p = PUT_LIT(p, ",\"message\":");
		p = put(p, m->message, m->message_len);
		*p++ = '}';
	}
	p = put(p, e->text + e->head_len, e->len - e->head_len);
	*p = '\0';
	if (len)
		*len = (size_t)(p - body);
	return body;
}

char *runpod_run_body(const char *queue, int vt_seconds, const struct runpod_extras *extras,
		      const struct pgmq_message *msgs, int n, size_t *len)
{
	struct runpod_envelope e;
	char *body;

	if (runpod_envelope_init(&e, queue, vt_seconds, extras) != 0)
		return NULL;
	body = runpod_envelope_body(&e, msgs, n, len);
	runpod_envelope_free(&e);
	return body;
}

/* Literal parts of one job object, in the order runpod_run_body() adds them. */
static const char JOB_SHAPE[] =
	"{\"msg_id\":,\"read_ct\":,\"enqueued_at\":,\"document_id\":,\"message\":}";

size_t runpod_job_bytes(const struct pgmq_message *m)
{
	return sizeof(JOB_SHAPE) - 1 + strlen(m->msg_id) + strlen(m->read_ct) +
	       strlen(m->enqueued_at) + (m->document_id ? strlen(m->document_id) : 4) +
	       m->message_len;
}

size_t runpod_envelope_bytes(const char *queue, int vt_seconds, const struct runpod_extras *extras)
{
	char *empty = print_envelope(queue, vt_seconds, extras);
	size_t n = empty ? strlen(empty) : 0;

	free(empty);
	return n;
}

int runpod_pack(const struct pgmq_message *msgs, int n, size_t envelope, size_t limit, int *ends)
{
	size_t size = envelope;
	int runs = 0, start = 0;

	for (int i = 0; i < n; i++) {
		size_t job = runpod_job_bytes(&msgs[i]) + (i > start ? 1 : 0);

		if (i > start && size + job > limit) {
			ends[runs++] = i;
			start = i;
			size = envelope + runpod_job_bytes(&msgs[i]);
		} else {
			size += job;
		}
	}
	if (n > start)
		ends[runs++] = n;
	return runs;
}

int runpod_parse_retry_after(const char *value, time_t now, long long *delay_ms)
{
	const char *p = value;
	time_t when;

	if (value == NULL || *value == '\0')
		return -1;
	if (isdigit((unsigned char)*p)) {
		long long secs = 0;
		for (; isdigit((unsigned char)*p); p++) {
			if (secs > LLONG_MAX / 10000)
				return -1; /* absurd: let the caller's cap decide via fallback */
			secs = secs * 10 + (*p - '0');
		}
		if (*p != '\0')
			return -1;
		*delay_ms = secs * 1000;
		return 0;
	}
	/* HTTP-date in any of its three forms: libcurl's parser. */
	when = curl_getdate(value, NULL);
	if (when == -1)
		return -1;
	*delay_ms = when > now ? (long long)(when - now) * 1000 : 0;
	return 0;
}

char *runpod_auth_header(const char *api_key)
{
	static const char prefix[] = "Authorization: Bearer ";
	size_t n = strlen(api_key);
	char *h = malloc(sizeof(prefix) + n);

	if (h == NULL)
		return NULL;
	memcpy(h, prefix, sizeof(prefix) - 1);
	memcpy(h + sizeof(prefix) - 1, api_key, n + 1);
	return h;
}

int runpod_url(const char *base_url, const char *endpoint_id, const char *op, char *buf, size_t len)
{
	int n = snprintf(buf, len, "%s/%s/%s", base_url, endpoint_id, op);

	return n < 0 || (size_t)n >= len ? -1 : 0;
}

/* "id: control character" and the like into why (bounded). */
static void say_why(char *why, size_t cap, const char *field, const struct jsonscan_member *m)
{
	const char *problem = m->state == JSONSCAN_ABSENT       ? "missing"
			      : m->state == JSONSCAN_NOT_STRING ? "not a string"
			      : m->why                          ? m->why
								: "empty";
	snprintf(why, cap, "%s: %s", field, problem);
}

int runpod_parse_run_reply(const char *body, size_t len, struct runpod_run_reply *out)
{
	cJSON *root;
	const char *bad = NULL;
	struct jsonscan_member m[2];
	int rc = -1;

	memset(out, 0, sizeof(*out));
	m[0] = (struct jsonscan_member){ .key = "id", .buf = out->id, .cap = sizeof(out->id) };
	m[1] = (struct jsonscan_member){ .key = "status",
					 .buf = out->status,
					 .cap = sizeof(out->status) };
	if (body == NULL) {
		snprintf(out->why, sizeof(out->why), "no body");
		return -1;
	}
	/* cJSON judges the structure; jsonscan re-reads the strings from the
	 * raw bytes, as cJSON decodes "\u0000" and bad \u escapes leniently. */
	root = cJSON_ParseWithLength(body, len);
	if (jsonscan_members(body, len, m, 2, &bad) != 0) {
		snprintf(out->why, sizeof(out->why), "%s", bad ? bad : "not a JSON object");
	} else if (!cJSON_IsObject(root)) {
		snprintf(out->why, sizeof(out->why), "not valid JSON");
	} else if (m[0].state != JSONSCAN_OK || out->id[0] == '\0') {
		say_why(out->why, sizeof(out->why), "id", &m[0]);
	} else {
		rc = 0;
	}
	if (rc != 0)
		out->id[0] = '\0';
	if (rc != 0 || m[1].state != JSONSCAN_OK)
		out->status[0] = '\0';
	cJSON_Delete(root);
	return rc;
}

bool runpod_is_config_error(long http_status)
{
	return http_status == 401 || http_status == 403 || http_status == 404;
}

enum runpod_outcome runpod_classify(const struct runpod_attempt *a)
{
	if (a->http_status == 0) {
		/* No reply. Nothing written means nothing to create a job from;
		 * otherwise the server may have acted on it. */
		if (!a->connected || !a->request_sent)
			return RUNPOD_REJECTED;
		return RUNPOD_UNKNOWN;
	}
	if (a->http_status >= 200 && a->http_status < 300) {
		if (a->transport_error || !a->reply_parsed)
			return RUNPOD_UNKNOWN;
		return RUNPOD_ACCEPTED;
	}
	/* A gateway timeout says nothing about the job behind it. */
	if (a->http_status == 504)
		return RUNPOD_UNKNOWN;
	return RUNPOD_REJECTED;
}

const char *runpod_outcome_name(enum runpod_outcome o)
{
	switch (o) {
	case RUNPOD_ACCEPTED:
		return "accepted";
	case RUNPOD_REJECTED:
		return "rejected";
	case RUNPOD_UNKNOWN:
		return "unknown";
	}
	return "?";
}

/* ---- /status (the tracker) ---- */

/* Longest prefix of s[0..len) that fits in cap - 1 bytes without cutting a
 * UTF-8 sequence. */
static size_t utf8_prefix(const char *s, size_t len, size_t cap)
{
	size_t n = len;

	if (n < cap)
		return n;
	n = cap - 1;
	/* Step back over continuation bytes to the start of the cut sequence. */
	while (n > 0 && ((unsigned char)s[n] & 0xC0) == 0x80)
		n--;
	return n;
}

static long long millis(const cJSON *item)
{
	double v;

	if (!cJSON_IsNumber(item))
		return -1;
	v = item->valuedouble;
	if (!(v >= 0) || v > 9e15) /* NaN, negative, or beyond exact doubles */
		return -1;
	return (long long)(v + 0.5);
}

int runpod_parse_status_reply(const char *body, size_t len, struct runpod_status_reply *out)
{
	cJSON *root, *error;
	struct jsonscan_member m[3];
	int rc = -1;

	/* out first, then the members that point into it (cppcheck reads an
	 * initializer naming out->x as a use of the caller's uninitialized out). */
	memset(out, 0, sizeof(*out));
	m[0] = (struct jsonscan_member){ .key = "status",
					 .buf = out->status,
					 .cap = sizeof(out->status),
					 .cut_ok = true };
	m[1] = (struct jsonscan_member){ .key = "id", .buf = out->id, .cap = sizeof(out->id) };
	m[2] = (struct jsonscan_member){ .key = "error",
					 .buf = out->error,
					 .cap = sizeof(out->error),
					 .cut_ok = true,
					 .allow_layout = true };
	out->delay_ms = out->execution_ms = -1;
	if (body == NULL)
		return -1;
	root = cJSON_ParseWithLength(body, len);
	if (!cJSON_IsObject(root) || jsonscan_members(body, len, m, 3, NULL) != 0 ||
	    m[0].state != JSONSCAN_OK || out->status[0] == '\0')
		goto out;
	if (m[1].state != JSONSCAN_OK)
		out->id[0] = '\0';
	out->delay_ms = millis(cJSON_GetObjectItemCaseSensitive(root, "delayTime"));
	out->execution_ms = millis(cJSON_GetObjectItemCaseSensitive(root, "executionTime"));
	error = cJSON_GetObjectItemCaseSensitive(root, "error");
	if (m[2].state == JSONSCAN_OK) {
		out->error_truncated = m[2].cut;
	} else if (m[2].state == JSONSCAN_INVALID) {
		snprintf(out->error, sizeof(out->error), "(error text not shown: %s)", m[2].why);
	} else if (error != NULL && !cJSON_IsNull(error)) {
		/* A handler's object: its compact JSON text, cut at a UTF-8 boundary. */
		char *printed = cJSON_PrintUnformatted(error);

		if (printed) {
			size_t n = strlen(printed),
			       keep = utf8_prefix(printed, n, sizeof(out->error));
			memcpy(out->error, printed, keep);
			out->error[keep] = '\0';
			out->error_truncated = keep < n;
		}
		free(printed);
	}
	rc = 0;
out:
	if (rc != 0)
		memset(out->status, 0, sizeof(out->status));
	cJSON_Delete(root);
	return rc;
}

bool runpod_status_is_terminal(const char *status)
{
	static const char *const terminal[] = { "COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT" };

	for (size_t i = 0; status && i < sizeof(terminal) / sizeof(terminal[0]); i++)
		if (strcmp(status, terminal[i]) == 0)
			return true;
	return false;
}

int runpod_status_url(const char *base_url, const char *endpoint_id, const char *job_id, char *buf,
		      size_t len)
{
	/* libcurl >= 7.82 accepts a NULL handle here. */
	char *id = curl_easy_escape(NULL, job_id, 0);
	int n;

	if (id == NULL)
		return -1;
	n = snprintf(buf, len, "%s/%s/status/%s", base_url, endpoint_id, id);
	curl_free(id);
	return n < 0 || (size_t)n >= len ? -1 : 0;
}

/* A /health counter: a whole number >= 0, else 0 (§7: parse leniently). */
static long long counter_of(const cJSON *obj, const char *key)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);

	if (!cJSON_IsNumber(v) || !(v->valuedouble >= 0) || v->valuedouble > 1e15)
		return 0;
	return (long long)v->valuedouble;
}

int runpod_parse_health_reply(const char *body, size_t len, struct runpod_health *out)
{
	static const char *const job_keys[RUNPOD_HJ_N] = { "completed", "failed", "inProgress",
							   "inQueue", "retried" };
	static const char *const worker_keys[RUNPOD_HW_N] = {
		"idle", "initializing", "ready", "running", "throttled", "unhealthy"
	};
	cJSON *root;
	const cJSON *jobs, *workers;
	int rc = -1;

	memset(out, 0, sizeof(*out));
	if (body == NULL)
		return -1;
	root = cJSON_ParseWithLength(body, len);
	jobs = cJSON_GetObjectItemCaseSensitive(root, "jobs");
	workers = cJSON_GetObjectItemCaseSensitive(root, "workers");
	if (cJSON_IsObject(root) && (cJSON_IsObject(jobs) || cJSON_IsObject(workers))) {
		for (int i = 0; i < RUNPOD_HJ_N; i++)
			out->jobs[i] = cJSON_IsObject(jobs) ? counter_of(jobs, job_keys[i]) : 0;
		for (int i = 0; i < RUNPOD_HW_N; i++)
			out->workers[i] = cJSON_IsObject(workers)
						  ? counter_of(workers, worker_keys[i])
						  : 0;
		rc = 0;
	}
	cJSON_Delete(root);
	return rc;
}
