/* admin — see include/admin.h. */
#include "admin.h"
#include "admin_int.h"
#include "listenaddr.h"
#include "log.h"

#include <arpa/inet.h>
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

struct admin {
	struct ev_loop *loop;
	struct MHD_Daemon *mhd;
	struct admin_hooks hooks;
	int port;
	ev_io io;           /* MHD's epoll fd */
	ev_prepare prepare; /* re-arms timer from MHD_get_timeout() */
	ev_timer timer;
	char mhd_error[256];      /* last message from MHD's error log */
	struct admin_call *calls; /* suspended, waiting for admin_answer */
	char token[256];          /* "" = none */
	bool loopback;            /* the listener is on a loopback address */
};

struct admin_call {
	struct admin *a; /* NULL once detached: admin stopped or the client left */
	struct MHD_Connection *conn;
	struct admin_call *prev, *next;
	bool in_hook, answered;
	unsigned status;
	const char *type;
	char *body;
	size_t len;
};

static int seen; /* *req_cls marker: headers were seen */

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

int admin_parse_listen(const char *addr, struct sockaddr_storage *ss, socklen_t *sslen, char *err,
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

static void unlink_call(struct admin_call *c)
{
	if (c->a == NULL)
		return;
	if (c->prev)
		c->prev->next = c->next;
	else
		c->a->calls = c->next;
	if (c->next)
		c->next->prev = c->prev;
	c->prev = c->next = NULL;
	c->a = NULL;
	c->conn = NULL;
}

/* Detaches c from its admin; frees it when its answer came already. */
static void drop_call(struct admin_call *c)
{
	unlink_call(c);
	if (c->answered) {
		free(c->body);
		free(c);
	}
}

/* Queues c's answer on conn and frees c. */
static enum MHD_Result send_call(struct admin_call *c, struct MHD_Connection *conn)
{
	enum MHD_Result ok;

	if (c->body == NULL)
		ok = reply_text(conn, MHD_HTTP_INTERNAL_SERVER_ERROR, "no answer\n");
	else
		ok = reply(conn, c->status, c->type, c->body, c->len, true);
	free(c);
	return ok;
}

void admin_answer(struct admin_call *c, unsigned status, const char *type, char *body, size_t len)
{
	if (c->a == NULL && !c->in_hook) { /* detached: nobody to answer */
		free(body);
		free(c);
		return;
	}
	c->answered = true;
	c->status = status;
	c->type = type;
	c->body = body;
	c->len = len;
	/* Within the hook, serve_dispatches sends it; else MHD calls on_request
	 * again for the resumed connection, from the MHD_run here (this runs
	 * on the loop, outside MHD's callbacks). */
	if (!c->in_hook) {
		struct MHD_Daemon *mhd = c->a->mhd;
		MHD_resume_connection(c->conn);
		MHD_run(mhd);
	}
}

struct args {
	const char *keys[ADMIN_MAX_ARGS], *vals[ADMIN_MAX_ARGS];
	int n;
	bool too_many;
};

static enum MHD_Result on_arg(void *cls, enum MHD_ValueKind kind, const char *key,
			      const char *value)
{
	struct args *g = cls;

	(void)kind;
	if (g->n == ADMIN_MAX_ARGS) {
		g->too_many = true;
		return MHD_NO;
	}
	g->keys[g->n] = key;
	g->vals[g->n++] = value;
	return MHD_YES;
}

static enum MHD_Result serve_dispatches(struct admin *a, struct MHD_Connection *conn,
					void **req_cls)
{
	struct args g = { .n = 0 };
	struct admin_call *c;

	if (a->hooks.dispatches == NULL)
		return reply_text(conn, MHD_HTTP_NOT_FOUND, "not found\n");
	MHD_get_connection_values(conn, MHD_GET_ARGUMENT_KIND, on_arg, &g);
	if (g.too_many) {
		char line[96];
		snprintf(line, sizeof(line), "more than %d query parameters\n", ADMIN_MAX_ARGS);
		return reply_text(conn, MHD_HTTP_BAD_REQUEST, line);
	}
	if ((c = calloc(1, sizeof(*c))) == NULL)
		return reply_text(conn, MHD_HTTP_SERVICE_UNAVAILABLE, "out of memory\n");
	c->conn = conn;
	c->in_hook = true;
	a->hooks.dispatches(a->hooks.arg, c, g.keys, g.vals, g.n);
	c->in_hook = false;
	if (c->answered)
		return send_call(c, conn);
	c->a = a;
	c->next = a->calls;
	if (a->calls)
		a->calls->prev = c;
	a->calls = c;
	*req_cls = c;
	MHD_suspend_connection(conn);
	return MHD_YES;
}

/* MHD_OPTION_NOTIFY_COMPLETED: a connection that ends with its call still
 * waiting (admin_stop) detaches it; admin_answer frees it later. */
static void on_completed(void *cls, struct MHD_Connection *conn, void **req_cls,
			 enum MHD_RequestTerminationCode toe)
{
	(void)cls;
	(void)conn;
	(void)toe;
	if (*req_cls != NULL && *req_cls != &seen)
		drop_call(*req_cls);
	*req_cls = NULL;
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
	if (*req_cls != NULL && *req_cls != &seen) { /* a call resumed */
		struct admin_call *c = *req_cls;
		*req_cls = &seen;
		if (c->answered) {
			unlink_call(c);
			return send_call(c, conn);
		}
		unlink_call(c); /* resumed by admin_stop: admin_answer frees it */
		return reply_text(conn, MHD_HTTP_SERVICE_UNAVAILABLE, "shutting down\n");
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
	if (strcmp(url, "/dispatches") == 0)
		return serve_dispatches(a, conn, req_cls);
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
	if (admin_parse_listen(listen_addr, &ss, &sslen, err, errlen) != 0)
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

	a->mhd = MHD_start_daemon(MHD_USE_EPOLL | MHD_USE_ERROR_LOG | MHD_ALLOW_SUSPEND_RESUME, 0,
				  NULL, NULL, on_request, a, MHD_OPTION_EXTERNAL_LOGGER, on_mhd_log,
				  a, MHD_OPTION_NOTIFY_COMPLETED, on_completed, NULL,
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
	/* MHD closes only connections that are not suspended. */
	for (struct admin_call *c = a->calls; c; c = c->next)
		MHD_resume_connection(c->conn);
	if (a->mhd) {
		/* Quiescing hands the listening socket back to us to close. */
		lfd = MHD_quiesce_daemon(a->mhd);
		MHD_stop_daemon(a->mhd);
		if (lfd != MHD_INVALID_SOCKET)
			close(lfd);
	}
	/* Not closed by MHD after all: detach anyway. */
	for (struct admin_call *c = a->calls, *next; c; c = next) {
		next = c->next;
		drop_call(c);
	}
	free(a);
}
