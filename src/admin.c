/* admin — see include/admin.h. */
#include "admin.h"
#include "listenaddr.h"
#include "log.h"

#include <arpa/inet.h>
#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define TEXT_TYPE "text/plain; charset=utf-8"
#define METRICS_TYPE "text/plain; version=0.0.4; charset=utf-8"
#define LISTEN_BACKLOG 64
#define CONNECTION_LIMIT 64u     /* scrapers and probes only */
#define CONNECTION_TIMEOUT_S 10u /* idle keep-alive connections are closed */
#define WHY_MAX 256
#define HEALTH_DEFAULT_TIMEOUT_MS 5000

struct admin {
	struct ev_loop *loop;
	struct MHD_Daemon *mhd;
	struct admin_hooks hooks;
	int port;
	ev_io io;           /* MHD's epoll fd */
	ev_prepare prepare; /* re-arms timer from MHD_get_timeout() */
	ev_timer timer;
	char mhd_error[256]; /* last message from MHD's error log */
	char token[256];     /* "" = none */
	bool loopback;       /* the listener is on a loopback address */
};

static void set_err(char *err, size_t errlen, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;

	if (err == NULL || errlen == 0)
		return;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}

/* Resolves an admin.listen value (syntax: include/listenaddr.h) into a
 * socket address. Returns 0, or -1 with a reason in err. */
static int parse_listen(const char *addr, struct sockaddr_storage *ss, socklen_t *sslen, char *err,
			size_t errlen)
{
	char host[LISTENADDR_HOST_MAX + 1], port[8];
	const char *why;
	int p = 0, rc;
	struct addrinfo hints, *res = NULL;

	if (addr == NULL || *addr == '\0') {
		set_err(err, errlen, "empty listen address");
		return -1;
	}
	if ((why = listenaddr_split(addr, host, sizeof(host), &p)) != NULL) {
		set_err(err, errlen, "bad listen address \"%s\": %s", addr, why);
		return -1;
	}
	snprintf(port, sizeof(port), "%d", p);
	memset(&hints, 0, sizeof(hints));
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_flags = AI_NUMERICSERV;
	rc = getaddrinfo(host, port, &hints, &res);
	if (rc != 0 || res == NULL) {
		set_err(err, errlen, "bad listen address \"%s\": %s", addr,
			rc == EAI_SYSTEM ? strerror(errno) : gai_strerror(rc));
		if (res)
			freeaddrinfo(res);
		return -1;
	}
	memcpy(ss, res->ai_addr, res->ai_addrlen);
	*sslen = res->ai_addrlen;
	freeaddrinfo(res);
	return 0;
}

/* MHD_OPTION_EXTERNAL_LOGGER: keeps the last message (for admin_start's
 * err) and logs it. MHD's messages end in "\n". */
static void on_mhd_log(void *cls, const char *fmt, va_list ap)
{
	struct admin *a = cls;
	size_t n;

	vsnprintf(a->mhd_error, sizeof(a->mhd_error), fmt, ap);
	n = strlen(a->mhd_error);
	while (n > 0 && (a->mhd_error[n - 1] == '\n' || a->mhd_error[n - 1] == '\r'))
		a->mhd_error[--n] = '\0';
	log_msg(LOG_WARN, "admin_http_error", "%s", a->mhd_error);
}

/* Queues one response. body is copied unless must_free, in which case MHD
 * (or this function, on failure) frees it. */
static enum MHD_Result reply(struct MHD_Connection *conn, unsigned status, const char *type,
			     char *body, size_t len, bool must_free)
{
	struct MHD_Response *r;
	enum MHD_Result ok;

	r = MHD_create_response_from_buffer(len, body,
					    must_free ? MHD_RESPMEM_MUST_FREE
						      : MHD_RESPMEM_MUST_COPY);
	if (r == NULL) {
		if (must_free)
			free(body);
		return MHD_NO;
	}
	if (MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type) != MHD_YES ||
	    MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store") != MHD_YES ||
	    (status == MHD_HTTP_METHOD_NOT_ALLOWED &&
	     MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, "GET, HEAD") != MHD_YES)) {
		MHD_destroy_response(r);
		return MHD_NO;
	}
	ok = MHD_queue_response(conn, status, r);
	MHD_destroy_response(r);
	return ok;
}

static enum MHD_Result reply_text(struct MHD_Connection *conn, unsigned status, const char *text)
{
	return reply(conn, status, TEXT_TYPE, (char *)text, strlen(text), false);
}

static enum MHD_Result serve_readyz(struct admin *a, struct MHD_Connection *conn)
{
	char why[WHY_MAX], body[WHY_MAX + 1];

	if (a->hooks.ready == NULL)
		return reply_text(conn, MHD_HTTP_OK, "ok\n");
	why[0] = '\0';
	if (a->hooks.ready(a->hooks.arg, why, sizeof(why)))
		return reply_text(conn, MHD_HTTP_OK, "ok\n");
	why[sizeof(why) - 1] = '\0';
	why[strcspn(why, "\r\n")] = '\0'; /* one line */
	snprintf(body, sizeof(body), "%s\n", why[0] ? why : "not ready");
	return reply_text(conn, MHD_HTTP_SERVICE_UNAVAILABLE, body);
}

static enum MHD_Result serve_metrics(struct admin *a, struct MHD_Connection *conn)
{
	size_t len = 0;
	char *body;

	if (a->hooks.metrics == NULL)
		return reply_text(conn, MHD_HTTP_NOT_FOUND, "not found\n");
	body = a->hooks.metrics(a->hooks.arg, &len);
	if (body == NULL)
		return reply_text(conn, MHD_HTTP_INTERNAL_SERVER_ERROR, "metrics unavailable\n");
	return reply(conn, MHD_HTTP_OK, METRICS_TYPE, body, len, true);
}

/* Constant-time comparison of the Authorization header with the token. */
static bool authorized(const struct admin *a, struct MHD_Connection *conn)
{
	const char *h = MHD_lookup_connection_value(conn, MHD_HEADER_KIND,
						    MHD_HTTP_HEADER_AUTHORIZATION);
	size_t n = strlen(a->token), hn;
	unsigned diff = 0;

	if (h == NULL || strncmp(h, "Bearer ", 7) != 0)
		return false;
	h += 7;
	hn = strlen(h);
	for (size_t i = 0; i < n; i++)
		diff |= (unsigned char)a->token[i] ^ (unsigned char)(i < hn ? h[i] : 0);
	return diff == 0 && hn == n;
}

/* /routes and /routes/NAME/ACTION. */
static enum MHD_Result serve_routes(struct admin *a, struct MHD_Connection *conn, const char *url,
				    bool post)
{
	char route[64], action[16], body[160];
	const char *rest = url + strlen("/routes");
	const char *slash;
	int rc;

	if (a->hooks.routes == NULL || a->hooks.control == NULL)
		return reply_text(conn, MHD_HTTP_NOT_FOUND, "not found\n");
	if (a->token[0] == '\0' && !a->loopback)
		return reply_text(conn, MHD_HTTP_FORBIDDEN,
				  "runtime control needs admin.token when "
				  "admin.listen is not a loopback address\n");
	if (a->token[0] && !authorized(a, conn))
		return reply_text(conn, MHD_HTTP_UNAUTHORIZED, "bearer token required\n");
	if (*rest == '\0' || strcmp(rest, "/") == 0) {
		char *json;
		if (post)
			return reply_text(conn, MHD_HTTP_METHOD_NOT_ALLOWED,
					  "method not allowed\n");
		if ((json = a->hooks.routes(a->hooks.arg)) == NULL)
			return reply_text(conn, MHD_HTTP_INTERNAL_SERVER_ERROR,
					  "routes unavailable\n");
		return reply(conn, MHD_HTTP_OK, "application/json", json, strlen(json), true);
	}
	slash = strchr(rest + 1, '/');
	if (!post || slash == NULL || (size_t)(slash - rest - 1) >= sizeof(route) ||
	    strlen(slash + 1) >= sizeof(action))
		return reply_text(conn, post ? MHD_HTTP_NOT_FOUND : MHD_HTTP_METHOD_NOT_ALLOWED,
				  post ? "not found\n" : "method not allowed\n");
	snprintf(route, sizeof(route), "%.*s", (int)(slash - rest - 1), rest + 1);
	snprintf(action, sizeof(action), "%s", slash + 1);
	rc = a->hooks.control(a->hooks.arg, route, action);
	if (rc == -1)
		return reply_text(conn, MHD_HTTP_NOT_FOUND, "no such route\n");
	if (rc != 0)
		return reply_text(conn, MHD_HTTP_NOT_FOUND,
				  "no such action (pause, resume, drain)\n");
	snprintf(body, sizeof(body), "%s %s\n", route, action);
	return reply_text(conn, MHD_HTTP_OK, body);
}

static void log_request(const char *method, const char *url)
{
	struct log_line *l = log_begin(LOG_DEBUG, "admin_request");

	log_str(l, "method", method);
	log_str(l, "path", url);
	log_end(l);
}

/* MHD_AccessHandlerCallback. GET/HEAD are answered on the second call,
 * once the request is complete: answering on the first call makes MHD
 * close the connection, which would defeat keep-alive for scrapers. Any
 * other method is answered at once: its body is never wanted, and MHD then
 * discards it and closes. */
static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
				  const char *method, const char *version, const char *upload_data,
				  size_t *upload_data_size, void **req_cls)
{
	static int seen; /* *req_cls marker: headers were seen */
	struct admin *a = cls;
	bool get_or_head = strcmp(method, MHD_HTTP_METHOD_GET) == 0 ||
			   strcmp(method, MHD_HTTP_METHOD_HEAD) == 0;
	bool control_post = strcmp(method, MHD_HTTP_METHOD_POST) == 0 &&
			    strncmp(url, "/routes/", 8) == 0;

	(void)version;
	(void)upload_data;
	if (get_or_head && *req_cls == NULL) {
		*req_cls = &seen;
		return MHD_YES;
	}
	if (control_post && *req_cls == NULL) {
		*req_cls = &seen;
		return MHD_YES;
	}
	if ((get_or_head || control_post) && *upload_data_size != 0) {
		*upload_data_size = 0; /* a GET or control body is ignored */
		return MHD_YES;
	}
	log_request(method, url);
	if (control_post)
		return serve_routes(a, conn, url, true);
	if (!get_or_head)
		return reply_text(conn, MHD_HTTP_METHOD_NOT_ALLOWED, "method not allowed\n");
	if (strcmp(url, "/healthz") == 0)
		return reply_text(conn, MHD_HTTP_OK, "ok\n");
	if (strcmp(url, "/readyz") == 0)
		return serve_readyz(a, conn);
	if (strcmp(url, "/metrics") == 0)
		return serve_metrics(a, conn);
	if (strcmp(url, "/routes") == 0 || strncmp(url, "/routes/", 8) == 0)
		return serve_routes(a, conn, url, false);
	return reply_text(conn, MHD_HTTP_NOT_FOUND, "not found\n");
}

static void on_io(struct ev_loop *loop, ev_io *w, int revents)
{
	struct admin *a = w->data;

	(void)loop;
	(void)revents;
	MHD_run(a->mhd);
}

static void on_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct admin *a = w->data;

	(void)loop;
	(void)revents;
	MHD_run(a->mhd);
}

/* Before the loop blocks: MHD_run() must happen within MHD_get_timeout()
 * even without socket activity (connection timeouts, buffered data). */
static void on_prepare(struct ev_loop *loop, ev_prepare *w, int revents)
{
	struct admin *a = w->data;
	MHD_UNSIGNED_LONG_LONG ms = 0;

	(void)revents;
	ev_timer_stop(loop, &a->timer);
	if (MHD_get_timeout(a->mhd, &ms) == MHD_YES) {
		ev_timer_set(&a->timer, (double)ms / 1000.0, 0.0);
		ev_timer_start(loop, &a->timer);
	}
}

/* True when fd is still the socket with inode ino (MHD may or may not close
 * a listen socket it was given when it fails to start). */
static bool still_ours(int fd, ino_t ino)
{
	struct stat st;

	return fstat(fd, &st) == 0 && S_ISSOCK(st.st_mode) && st.st_ino == ino;
}

struct admin *admin_start(struct ev_loop *loop, const char *listen_addr,
			  const struct admin_hooks *hooks, char *err, size_t errlen)
{
	struct sockaddr_storage ss;
	socklen_t sslen = 0;
	struct admin *a;
	const union MHD_DaemonInfo *info;
	struct stat st;
	int fd, one = 1;

	set_err(err, errlen, "%s", "");
	if (parse_listen(listen_addr, &ss, &sslen, err, errlen) != 0)
		return NULL;
	a = calloc(1, sizeof(*a));
	if (a == NULL) {
		set_err(err, errlen, "out of memory");
		return NULL;
	}
	a->loop = loop;
	if (hooks) {
		a->hooks = *hooks;
		if (hooks->token && strlen(hooks->token) >= sizeof(a->token)) {
			set_err(err, errlen, "admin.token is longer than %zu bytes",
				sizeof(a->token) - 1);
			free(a);
			return NULL;
		}
		snprintf(a->token, sizeof(a->token), "%s", hooks->token ? hooks->token : "");
		a->hooks.token = NULL;
	}

	/* Our own listening socket, so a bind failure has a precise reason. */
	fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		set_err(err, errlen, "socket for %s: %s", listen_addr, strerror(errno));
		free(a);
		return NULL;
	}
	if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0 ||
	    bind(fd, (struct sockaddr *)&ss, sslen) != 0) {
		set_err(err, errlen, "bind %s: %s", listen_addr, strerror(errno));
		goto fail_fd;
	}
	if (listen(fd, LISTEN_BACKLOG) != 0) {
		set_err(err, errlen, "listen %s: %s", listen_addr, strerror(errno));
		goto fail_fd;
	}
	sslen = sizeof(ss);
	if (getsockname(fd, (struct sockaddr *)&ss, &sslen) != 0 || fstat(fd, &st) != 0) {
		set_err(err, errlen, "getsockname %s: %s", listen_addr, strerror(errno));
		goto fail_fd;
	}
	a->port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
						 : ((struct sockaddr_in *)&ss)->sin_port);
	a->loopback = ss.ss_family == AF_INET6
			      ? IN6_IS_ADDR_LOOPBACK(&((struct sockaddr_in6 *)&ss)->sin6_addr)
			      : (ntohl(((struct sockaddr_in *)&ss)->sin_addr.s_addr) >> 24) == 127;

	a->mhd = MHD_start_daemon(MHD_USE_EPOLL | MHD_USE_ERROR_LOG, 0, NULL, NULL, on_request, a,
				  MHD_OPTION_EXTERNAL_LOGGER, on_mhd_log, a,
				  MHD_OPTION_LISTEN_SOCKET, fd, MHD_OPTION_CONNECTION_LIMIT,
				  CONNECTION_LIMIT, MHD_OPTION_CONNECTION_TIMEOUT,
				  CONNECTION_TIMEOUT_S, MHD_OPTION_END);
	if (a->mhd == NULL) {
		set_err(err, errlen, "libmicrohttpd on %s: %s", listen_addr,
			a->mhd_error[0] ? a->mhd_error : "MHD_start_daemon failed");
		if (still_ours(fd, st.st_ino))
			close(fd);
		free(a);
		return NULL;
	}
	info = MHD_get_daemon_info(a->mhd, MHD_DAEMON_INFO_EPOLL_FD);
	if (info == NULL || info->epoll_fd < 0) {
		set_err(err, errlen, "libmicrohttpd on %s: no epoll fd", listen_addr);
		admin_stop(a);
		return NULL;
	}
	ev_io_init(&a->io, on_io, info->epoll_fd, EV_READ);
	a->io.data = a;
	ev_prepare_init(&a->prepare, on_prepare);
	a->prepare.data = a;
	ev_init(&a->timer, on_timer);
	a->timer.data = a;
	ev_io_start(loop, &a->io);
	ev_prepare_start(loop, &a->prepare);
	return a;

fail_fd:
	close(fd);
	free(a);
	return NULL;
}

int admin_port(const struct admin *a)
{
	return a ? a->port : -1;
}

void admin_stop(struct admin *a)
{
	MHD_socket lfd;

	if (a == NULL)
		return;
	ev_io_stop(a->loop, &a->io);
	ev_prepare_stop(a->loop, &a->prepare);
	ev_timer_stop(a->loop, &a->timer);
	if (a->mhd) {
		/* Quiescing hands the listening socket back to us to close. */
		lfd = MHD_quiesce_daemon(a->mhd);
		MHD_stop_daemon(a->mhd);
		if (lfd != MHD_INVALID_SOCKET)
			close(lfd);
	}
	free(a);
}

/* ---- the blocking probe ---- */

static int health_fail(const char *addr, const char *what, const char *detail)
{
	log_msg(LOG_WARN, "health_check_failed", "%s: %s%s%s", addr, what, detail ? ": " : "",
		detail ? detail : "");
	return 1;
}

/* The reply body ("ok\n") is not needed: only the status counts. */
static size_t discard_body(char *ptr, size_t size, size_t nmemb, void *arg)
{
	(void)ptr;
	(void)arg;
	return size * nmemb;
}

/* "http://127.0.0.1:9187/healthz" or "http://[::1]:9187/healthz" for the
 * resolved address, a wildcard bind replaced by loopback. 0, or -1. */
static int local_url(struct sockaddr_storage *ss, const char *path, char *url, size_t len)
{
	char host[INET6_ADDRSTRLEN];
	int port, n;

	if (ss->ss_family == AF_INET) {
		struct sockaddr_in *in = (struct sockaddr_in *)ss;
		if (in->sin_addr.s_addr == htonl(INADDR_ANY))
			in->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		if (inet_ntop(AF_INET, &in->sin_addr, host, sizeof(host)) == NULL)
			return -1;
		port = ntohs(in->sin_port);
		n = snprintf(url, len, "http://%s:%d%s", host, port, path);
	} else if (ss->ss_family == AF_INET6) {
		struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;
		if (IN6_IS_ADDR_UNSPECIFIED(&in6->sin6_addr))
			in6->sin6_addr = in6addr_loopback;
		if (inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof(host)) == NULL)
			return -1;
		port = ntohs(in6->sin6_port);
		n = snprintf(url, len, "http://[%s]:%d%s", host, port, path);
	} else {
		return -1;
	}
	return n < 0 || (size_t)n >= len ? -1 : 0;
}

int admin_local_url(const char *listen_addr, const char *path, char *url, size_t len)
{
	struct sockaddr_storage ss;
	socklen_t sslen = 0;

	if (parse_listen(listen_addr, &ss, &sslen, NULL, 0) != 0)
		return -1;
	return local_url(&ss, path, url, len);
}

int admin_health_check(const char *listen_addr, int timeout_ms)
{
	struct sockaddr_storage ss;
	socklen_t sslen = 0;
	char err[256], url[128], cerr[CURL_ERROR_SIZE] = "";
	long status = 0;
	CURLcode rc;
	CURL *h;

	if (timeout_ms <= 0)
		timeout_ms = HEALTH_DEFAULT_TIMEOUT_MS;
	if (parse_listen(listen_addr, &ss, &sslen, err, sizeof(err)) != 0)
		return health_fail(listen_addr ? listen_addr : "", err, NULL);
	if (local_url(&ss, "/healthz", url, sizeof(url)) != 0)
		return health_fail(listen_addr, "cannot form the /healthz URL", NULL);
	h = curl_easy_init();
	if (h == NULL)
		return health_fail(listen_addr, "curl_easy_init failed", NULL);
	/* Only our own listener is asked: http only, never through a proxy
	 * (http_proxy in the environment must not send the probe elsewhere). */
	if (curl_easy_setopt(h, CURLOPT_URL, url) != CURLE_OK ||
	    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http") != CURLE_OK ||
	    curl_easy_setopt(h, CURLOPT_PROXY, "") != CURLE_OK ||
	    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L) != CURLE_OK ||
	    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, (long)timeout_ms) != CURLE_OK ||
	    curl_easy_setopt(h, CURLOPT_USERAGENT, "pgmq-dispatcher") != CURLE_OK ||
	    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, discard_body) != CURLE_OK ||
	    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, cerr) != CURLE_OK) {
		curl_easy_cleanup(h);
		return health_fail(listen_addr, "curl_easy_setopt failed", NULL);
	}
	rc = curl_easy_perform(h);
	if (rc == CURLE_OK)
		curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
	curl_easy_cleanup(h);
	if (rc != CURLE_OK)
		return health_fail(listen_addr, url, cerr[0] ? cerr : curl_easy_strerror(rc));
	if (status != 200) {
		char code[24];
		snprintf(code, sizeof(code), "%ld", status);
		return health_fail(listen_addr, "/healthz answered", code);
	}
	return 0;
}
