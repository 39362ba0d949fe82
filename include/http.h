/* http — libcurl's multi interface driven by the libev loop.
 *
 * Glue as in curl's docs/examples/evhiperfifo.c, with its sub-second timer
 * slip fixed: CURLMOPT_SOCKETFUNCTION keeps one ev_io per socket,
 * CURLMOPT_TIMERFUNCTION one ev_timer (-1 stops it, 0 fires on the next
 * loop turn). Completions are drained after every curl_multi_socket_action()
 * and handed to their owner there, never from inside a curl callback.
 * Knows nothing of RunPod or SQL. */
#ifndef PGMQD_HTTP_H
#define PGMQD_HTTP_H

#include <curl/curl.h>
#include <ev.h>
#include <stdbool.h>
#include <stddef.h>

#define HTTP_MAX_RESPONSE_BYTES (64 * 1024) /* kept of a reply body; the rest is discarded */

struct http;
struct http_request;

/* The outcome of one request. Pointers are valid during the callback only. */
struct http_response {
	long status;         /* HTTP status, 0 when no response arrived */
	CURLcode code;       /* CURLE_OK or the transport error */
	const char *error;   /* curl's error text, "" when none */
	bool connected;      /* a connection was established or reused */
	bool request_sent;   /* request bytes were written (CURLINFO_REQUEST_SIZE) */
	bool aborted;        /* cancelled by http_cancel_all() */
	bool resend_refused; /* curl wanted to re-send the body (a reused
				   connection died); refused, so the request ends
				   here with its outcome unknown */
	const char *body;    /* reply body, not NUL-terminated */
	size_t body_len;
	bool body_truncated;     /* longer than HTTP_MAX_RESPONSE_BYTES */
	const char *retry_after; /* Retry-After header value, or NULL */
	long total_ms, connect_ms, first_byte_ms;
};

typedef void (*http_done_fn)(void *arg, const struct http_response *r);

struct http_request_opts {
	const char *method; /* "GET" or "POST" */
	const char *url;
	const char *const *headers; /* NULL-terminated "Name: value" lines, copied */
	char *body;                 /* POST body, ownership passes to http (freed after) */
	size_t body_len;
	long connect_timeout_ms;
	long timeout_ms;     /* whole transfer */
	const char *ca_file; /* PEM CA bundle (CURLOPT_CAINFO); NULL or "" = system store */
	const void *owner;   /* who may cancel it (http_cancel_owner); NULL = none */
};

/* Creates the multi handle and its watchers. Call curl_global_init() once
 * before. Returns NULL on failure (logged). */
struct http *http_new(struct ev_loop *loop);

/* Starts a request; fn runs exactly once, later, from the loop. The body is
 * freed by http even on failure. Returns 0, or -1 when the request could not
 * be started (logged; fn is not called). */
int http_start(struct http *h, const struct http_request_opts *o, http_done_fn fn, void *arg)
	__attribute__((warn_unused_result));

/* Aborts every running request; each callback runs once with aborted set. */
void http_cancel_all(struct http *h);

/* Aborts the running requests started with o->owner == owner (several
 * users share one multi handle); each callback runs once with aborted set. */
void http_cancel_owner(struct http *h, const void *owner);

/* Frees everything; running requests are dropped without callbacks. NULL-safe. */
void http_free(struct http *h);

#endif
