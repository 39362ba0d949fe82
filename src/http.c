/* http — see include/http.h. */
#include "http.h"
#include "log.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

struct http {
	struct ev_loop *loop;
	CURLM *multi;
	ev_timer timer;
	int in_flight;
	struct http_request *requests; /* doubly linked, for cancel/free */
};

struct http_request {
	struct http *h;
	CURL *easy;
	struct curl_slist *headers;
	char *body;
	size_t body_len;
	size_t body_pos;     /* bytes curl has read from the body */
	bool resend_refused; /* curl wanted to send the body again */
	http_done_fn fn;
	void *arg;
	const void *owner;
	char *reply;
	size_t reply_len, reply_cap;
	bool reply_truncated;
	char retry_after[64];
	bool have_retry_after;
	char error[CURL_ERROR_SIZE];
	struct http_request *prev, *next;
};

struct http_socket {
	struct http *h;
	ev_io io;
};

static void check_multi_info(struct http *h);

/* Checked curl calls that name the option that failed. */
#define SETOPT(easy, opt, val)                                                                    \
	do {                                                                                      \
		CURLcode rc_ = curl_easy_setopt((easy), (opt), (val));                            \
		if (rc_ != CURLE_OK) {                                                            \
			log_msg(LOG_ERROR, "http_setup_failed", "curl_easy_setopt(%s): %s", #opt, \
				curl_easy_strerror(rc_));                                         \
			goto fail;                                                                \
		}                                                                                 \
	} while (0)

static void on_socket_event(struct ev_loop *loop, ev_io *w, int revents)
{
	struct http_socket *s = w->data;
	struct http *h = s->h;
	int action = (revents & EV_READ ? CURL_CSELECT_IN : 0) |
		     (revents & EV_WRITE ? CURL_CSELECT_OUT : 0);
	int running;

	(void)loop;
	curl_multi_socket_action(h->multi, w->fd, action, &running);
	check_multi_info(h);
}

static void on_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct http *h = w->data;
	int running;

	(void)loop;
	(void)revents;
	curl_multi_socket_action(h->multi, CURL_SOCKET_TIMEOUT, 0, &running);
	check_multi_info(h);
}

/* CURLMOPT_TIMERFUNCTION: only (re)arms our timer; never calls curl. */
static int timer_cb(CURLM *multi, long timeout_ms, void *userp)
{
	struct http *h = userp;

	(void)multi;
	ev_timer_stop(h->loop, &h->timer);
	if (timeout_ms >= 0) {
		/* Floating seconds: integer division would fire early. */
		ev_timer_set(&h->timer, (double)timeout_ms / 1000.0, 0.0);
		ev_timer_start(h->loop, &h->timer);
	}
	return 0;
}

/* CURLMOPT_SOCKETFUNCTION: one ev_io per socket, attached with
 * curl_multi_assign and freed on CURL_POLL_REMOVE. */
static int socket_cb(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp)
{
	struct http *h = userp;
	struct http_socket *s = socketp;

	(void)easy;
	if (what == CURL_POLL_REMOVE) {
		if (s) {
			ev_io_stop(h->loop, &s->io);
			curl_multi_assign(h->multi, fd, NULL);
			free(s);
		}
		return 0;
	}
	if (s == NULL) {
		s = calloc(1, sizeof(*s));
		if (s == NULL)
			return -1;
		s->h = h;
		s->io.data = s;
		curl_multi_assign(h->multi, fd, s);
	} else {
		ev_io_stop(h->loop, &s->io);
	}
	ev_io_init(&s->io, on_socket_event, fd,
		   (what & CURL_POLL_IN ? EV_READ : 0) | (what & CURL_POLL_OUT ? EV_WRITE : 0));
	ev_io_start(h->loop, &s->io);
	return 0;
}

struct http *http_new(struct ev_loop *loop)
{
	struct http *h = calloc(1, sizeof(*h));

	if (h == NULL)
		return NULL;
	h->loop = loop;
	h->multi = curl_multi_init();
	if (h->multi == NULL) {
		free(h);
		log_msg(LOG_ERROR, "http_setup_failed", "curl_multi_init failed");
		return NULL;
	}
	ev_init(&h->timer, on_timer);
	h->timer.data = h;
	curl_multi_setopt(h->multi, CURLMOPT_SOCKETFUNCTION, socket_cb);
	curl_multi_setopt(h->multi, CURLMOPT_SOCKETDATA, h);
	curl_multi_setopt(h->multi, CURLMOPT_TIMERFUNCTION, timer_cb);
	curl_multi_setopt(h->multi, CURLMOPT_TIMERDATA, h);
	curl_multi_setopt(h->multi, CURLMOPT_PIPELINING, CURLPIPE_MULTIPLEX);
	return h;
}

static size_t write_cb(char *data, size_t size, size_t nmemb, void *userp)
{
	struct http_request *r = userp;
	size_t n = size * nmemb;
	size_t take = n;

	if (r->reply_len + take > HTTP_MAX_RESPONSE_BYTES) {
		take = HTTP_MAX_RESPONSE_BYTES - r->reply_len;
		r->reply_truncated = true;
	}
	if (take > 0) {
		if (r->reply_len + take > r->reply_cap) {
			size_t cap = r->reply_cap ? r->reply_cap : 1024;
			char *p;
			while (cap < r->reply_len + take)
				cap *= 2;
			p = realloc(r->reply, cap);
			if (p == NULL)
				return 0; /* curl fails the transfer: CURLE_WRITE_ERROR */
			r->reply = p;
			r->reply_cap = cap;
		}
		memcpy(r->reply + r->reply_len, data, take);
		r->reply_len += take;
	}
	return n; /* the rest is read and dropped */
}

static size_t header_cb(char *data, size_t size, size_t nmemb, void *userp)
{
	struct http_request *r = userp;
	size_t n = size * nmemb;

	/* A new status line starts a new header block (after 1xx). */
	if (n >= 5 && strncmp(data, "HTTP/", 5) == 0)
		r->have_retry_after = false;
	if (n > 12 && strncasecmp(data, "Retry-After:", 12) == 0) {
		size_t start = 12, end = n;
		while (start < end && (data[start] == ' ' || data[start] == '\t'))
			start++;
		while (end > start &&
		       (data[end - 1] == '\r' || data[end - 1] == '\n' || data[end - 1] == ' '))
			end--;
		if (end - start < sizeof(r->retry_after)) {
			memcpy(r->retry_after, data + start, end - start);
			r->retry_after[end - start] = '\0';
			r->have_retry_after = true;
		}
	}
	return n;
}

/* The POST body goes through a read callback so that a rewind can be
 * refused: libcurl silently re-sends a request whose reused connection
 * died before any reply ("Connection died, retrying a fresh connect"), and
 * a /run that may have created a job must not be sent twice. */
static size_t read_cb(char *buf, size_t size, size_t nitems, void *userp)
{
	struct http_request *r = userp;
	size_t n = size * nitems;

	if (n > r->body_len - r->body_pos)
		n = r->body_len - r->body_pos;
	memcpy(buf, r->body + r->body_pos, n);
	r->body_pos += n;
	return n;
}

static int seek_cb(void *userp, curl_off_t offset, int origin)
{
	struct http_request *r = userp;

	if (origin == SEEK_SET && offset == 0 && r->body_pos == 0)
		return CURL_SEEKFUNC_OK;
	r->resend_refused = true;
	return CURL_SEEKFUNC_CANTSEEK; /* → CURLE_SEND_FAIL_REWIND: outcome unknown */
}

static void link_request(struct http *h, struct http_request *r)
{
	r->next = h->requests;
	if (h->requests)
		h->requests->prev = r;
	h->requests = r;
}

static void unlink_request(struct http *h, struct http_request *r)
{
	if (r->prev)
		r->prev->next = r->next;
	else
		h->requests = r->next;
	if (r->next)
		r->next->prev = r->prev;
}

static void free_request(struct http_request *r)
{
	if (r->easy)
		curl_easy_cleanup(r->easy);
	curl_slist_free_all(r->headers);
	free(r->body);
	free(r->reply);
	free(r);
}

int http_start(struct http *h, const struct http_request_opts *o, http_done_fn fn, void *arg)
{
	struct http_request *r = calloc(1, sizeof(*r));
	CURLMcode mrc;

	if (r == NULL) {
		free(o->body);
		return -1;
	}
	r->h = h;
	r->body = o->body;
	r->fn = fn;
	r->arg = arg;
	r->owner = o->owner;
	r->easy = curl_easy_init();
	if (r->easy == NULL)
		goto fail;
	for (const char *const *hd = o->headers; hd && *hd; hd++) {
		struct curl_slist *l = curl_slist_append(r->headers, *hd);
		if (l == NULL)
			goto fail;
		r->headers = l;
	}
	/* No "Expect: 100-continue" round trip for large bodies. */
	if (strcmp(o->method, "POST") == 0) {
		struct curl_slist *l = curl_slist_append(r->headers, "Expect:");
		if (l == NULL)
			goto fail;
		r->headers = l;
	}
	SETOPT(r->easy, CURLOPT_URL, o->url);
	SETOPT(r->easy, CURLOPT_PROTOCOLS_STR, "http,https");
	SETOPT(r->easy, CURLOPT_PRIVATE, r);
	SETOPT(r->easy, CURLOPT_ERRORBUFFER, r->error);
	SETOPT(r->easy, CURLOPT_NOSIGNAL, 1L);
	SETOPT(r->easy, CURLOPT_HTTPHEADER, r->headers);
	SETOPT(r->easy, CURLOPT_USERAGENT, "pgmq-dispatcher/" PGMQD_VERSION);
	SETOPT(r->easy, CURLOPT_CONNECTTIMEOUT_MS, o->connect_timeout_ms);
	SETOPT(r->easy, CURLOPT_TIMEOUT_MS, o->timeout_ms);
	SETOPT(r->easy, CURLOPT_TCP_KEEPALIVE, 1L);
	if (o->ca_file && *o->ca_file)
		SETOPT(r->easy, CURLOPT_CAINFO, o->ca_file);
	/* Over TLS, ALPN tells at the handshake whether HTTP/2 can multiplex
	 * further requests on one connection: worth waiting for. Over plain
	 * HTTP/1.1 waiting would serialise requests behind a slow one. */
	if (strncmp(o->url, "https://", 8) == 0)
		SETOPT(r->easy, CURLOPT_PIPEWAIT, 1L);
	SETOPT(r->easy, CURLOPT_WRITEFUNCTION, write_cb);
	SETOPT(r->easy, CURLOPT_WRITEDATA, r);
	SETOPT(r->easy, CURLOPT_HEADERFUNCTION, header_cb);
	SETOPT(r->easy, CURLOPT_HEADERDATA, r);
	if (strcmp(o->method, "POST") == 0) {
		r->body_len = r->body ? o->body_len : 0;
		SETOPT(r->easy, CURLOPT_POST, 1L);
		SETOPT(r->easy, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)r->body_len);
		SETOPT(r->easy, CURLOPT_READFUNCTION, read_cb);
		SETOPT(r->easy, CURLOPT_READDATA, r);
		SETOPT(r->easy, CURLOPT_SEEKFUNCTION, seek_cb);
		SETOPT(r->easy, CURLOPT_SEEKDATA, r);
	} else {
		SETOPT(r->easy, CURLOPT_HTTPGET, 1L);
	}
	mrc = curl_multi_add_handle(h->multi, r->easy);
	if (mrc != CURLM_OK) {
		log_msg(LOG_ERROR, "http_setup_failed", "curl_multi_add_handle: %s",
			curl_multi_strerror(mrc));
		goto fail;
	}
	link_request(h, r);
	h->in_flight++;
	return 0;
fail:
	free_request(r);
	return -1;
}

static long info_ms(CURL *easy, CURLINFO what)
{
	curl_off_t us = 0;

	curl_easy_getinfo(easy, what, &us);
	return (long)(us / 1000);
}

/* Hands one finished transfer to its owner and frees it. */
static void finish(struct http *h, struct http_request *r, CURLcode code, bool aborted)
{
	struct http_response resp;
	long request_size = 0;
	curl_off_t uploaded = 0;
	char *ip = NULL;

	memset(&resp, 0, sizeof(resp));
	curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &resp.status);
	curl_easy_getinfo(r->easy, CURLINFO_REQUEST_SIZE, &request_size);
	curl_easy_getinfo(r->easy, CURLINFO_SIZE_UPLOAD_T, &uploaded);
	curl_easy_getinfo(r->easy, CURLINFO_PRIMARY_IP, &ip);
	resp.code = code;
	resp.error = r->error[0] ? r->error : (code != CURLE_OK ? curl_easy_strerror(code) : "");
	resp.request_sent = request_size > 0 || uploaded > 0 || r->body_pos > 0 ||
			    r->resend_refused;
	resp.resend_refused = r->resend_refused;
	resp.connected = resp.request_sent ||
			 (ip != NULL && ip[0] != '\0' && code != CURLE_COULDNT_CONNECT);
	resp.aborted = aborted;
	resp.body = r->reply ? r->reply : "";
	resp.body_len = r->reply_len;
	resp.body_truncated = r->reply_truncated;
	resp.retry_after = r->have_retry_after ? r->retry_after : NULL;
	resp.total_ms = info_ms(r->easy, CURLINFO_TOTAL_TIME_T);
	resp.connect_ms = info_ms(r->easy, CURLINFO_CONNECT_TIME_T);
	resp.first_byte_ms = info_ms(r->easy, CURLINFO_STARTTRANSFER_TIME_T);

	curl_multi_remove_handle(h->multi, r->easy);
	unlink_request(h, r);
	h->in_flight--;
	r->fn(r->arg, &resp);
	free_request(r);
}

static void check_multi_info(struct http *h)
{
	CURLMsg *msg;
	int left;

	while ((msg = curl_multi_info_read(h->multi, &left)) != NULL) {
		struct http_request *r = NULL;

		if (msg->msg != CURLMSG_DONE)
			continue;
		curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&r);
		finish(h, r, msg->data.result, false);
	}
}

void http_cancel_all(struct http *h)
{
	while (h->requests)
		/* finish() unlinks the request before it frees it, and the head's
		 * prev is always NULL, so h->requests moves on; the analyzer assumes
		 * a head with a prev. Loops, as callbacks may cancel others.
		 * NOLINTNEXTLINE(clang-analyzer-unix.Malloc) */
		finish(h, h->requests, CURLE_ABORTED_BY_CALLBACK, true);
}

void http_cancel_owner(struct http *h, const void *owner)
{
	for (;;) {
		struct http_request *r = h->requests;
		/* finish() unlinks r before it frees it and callbacks may cancel
		 * others, so each walk starts again from the head; the analyzer
		 * assumes a head with a prev (as in http_cancel_all).
		 * NOLINTNEXTLINE(clang-analyzer-unix.Malloc) */
		while (r && r->owner != owner)
			r = r->next;
		if (r == NULL)
			return;
		finish(h, r, CURLE_ABORTED_BY_CALLBACK, true);
	}
}

void http_free(struct http *h)
{
	if (h == NULL)
		return;
	/* No callbacks run here, so the list is walked once, not unlinked. */
	for (struct http_request *r = h->requests, *next; r != NULL; r = next) {
		next = r->next;
		curl_multi_remove_handle(h->multi, r->easy);
		free_request(r);
	}
	h->requests = NULL;
	ev_timer_stop(h->loop, &h->timer);
	curl_multi_cleanup(h->multi);
	free(h);
}
