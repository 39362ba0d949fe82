/* Unit tests for admin: the listener runs in a libev loop on a second
 * thread; this thread makes requests over plain sockets and checks status,
 * headers and bodies, then the blocking health-check client. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <dirent.h>
#include <ev.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "admin.h"
#include "listenaddr.h"
#include "log.h"
#include "metrics.h"

#define CONTENT_TYPE_METRICS "text/plain; version=0.0.4; charset=utf-8"

/* What the hooks answer; written here, read on the loop thread. */
static atomic_bool ready_flag;
static atomic_bool metrics_fail;
static atomic_int metrics_calls;

static bool hook_ready(void *arg, char *why, size_t whylen)
{
	(void)arg;
	if (atomic_load(&ready_flag))
		return true;
	snprintf(why, whylen, "database not connected\nsecond line dropped");
	return false;
}

static char *hook_metrics(void *arg, size_t *len)
{
	(void)arg;
	atomic_fetch_add(&metrics_calls, 1);
	if (atomic_load(&metrics_fail))
		return NULL;
	return metrics_render(len);
}

struct server {
	struct ev_loop *loop;
	struct admin *admin;
	ev_async stop;
	pthread_t thread;
	int port;
};

static void on_stop(struct ev_loop *loop, ev_async *w, int revents)
{
	(void)w;
	(void)revents;
	ev_break(loop, EVBREAK_ALL);
}

static void *loop_thread(void *arg)
{
	struct server *s = arg;

	ev_run(s->loop, 0);
	return NULL;
}

static void server_start(struct server *s, const char *listen_addr, const struct admin_hooks *hooks)
{
	char err[256];

	memset(s, 0, sizeof(*s));
	s->loop = ev_loop_new(EVFLAG_AUTO);
	assert_non_null(s->loop);
	s->admin = admin_start(s->loop, listen_addr, hooks, err, sizeof(err));
	if (s->admin == NULL)
		fail_msg("admin_start(%s): %s", listen_addr, err);
	s->port = admin_port(s->admin);
	assert_true(s->port > 0);
	ev_async_init(&s->stop, on_stop);
	ev_async_start(s->loop, &s->stop);
	assert_int_equal(pthread_create(&s->thread, NULL, loop_thread, s), 0);
}

static void server_stop(struct server *s)
{
	ev_async_send(s->loop, &s->stop);
	assert_int_equal(pthread_join(s->thread, NULL), 0);
	/* The loop no longer runs: admin_stop is on "the loop's thread". */
	admin_stop(s->admin);
	ev_async_stop(s->loop, &s->stop);
	assert_int_equal(ev_run(s->loop, EVRUN_NOWAIT), 0); /* no watcher left behind */
	ev_loop_destroy(s->loop);
}

static int open_fds(void)
{
	DIR *d = opendir("/proc/self/fd");
	int n = 0;

	assert_non_null(d);
	while (readdir(d))
		n++;
	closedir(d);
	return n;
}

/* ---- a tiny client ---- */

struct reply {
	int status;
	char content_type[128];
	char allow[64];
	char body[65536];
	size_t body_len;
};

static int connect_to(int family, int port)
{
	struct sockaddr_storage ss;
	socklen_t len;
	struct timeval tv = { .tv_sec = 5 };
	int fd;

	memset(&ss, 0, sizeof(ss));
	if (family == AF_INET6) {
		struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&ss;
		in6->sin6_family = AF_INET6;
		in6->sin6_addr = in6addr_loopback;
		in6->sin6_port = htons((uint16_t)port);
		len = sizeof(*in6);
	} else {
		struct sockaddr_in *in = (struct sockaddr_in *)&ss;
		in->sin_family = AF_INET;
		in->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		in->sin_port = htons((uint16_t)port);
		len = sizeof(*in);
	}
	fd = socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
	assert_true(fd >= 0);
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	assert_int_equal(connect(fd, (struct sockaddr *)&ss, len), 0);
	return fd;
}

static void header_value(const char *head, const char *name, char *out, size_t outlen)
{
	size_t n = strlen(name);

	out[0] = '\0';
	for (const char *p = strstr(head, "\r\n"); p; p = strstr(p + 2, "\r\n")) {
		const char *line = p + 2;
		if (strncasecmp(line, name, n) == 0 && line[n] == ':') {
			const char *v = line + n + 1, *e = strstr(v, "\r\n");
			while (*v == ' ')
				v++;
			snprintf(out, outlen, "%.*s", (int)(e - v), v);
			return;
		}
	}
}

/* Parses one complete response in raw (connection closed after it). */
static void parse_reply(const char *raw, size_t rawlen, struct reply *r)
{
	const char *split = strstr(raw, "\r\n\r\n");
	char head[4096];

	memset(r, 0, sizeof(*r));
	assert_non_null(split);
	assert_true((size_t)(split - raw) + 2 < sizeof(head));
	memcpy(head, raw, (size_t)(split - raw) + 2);
	head[split - raw + 2] = '\0';
	assert_int_equal(sscanf(head, "HTTP/1.%*d %d", &r->status), 1);
	header_value(head, "Content-Type", r->content_type, sizeof(r->content_type));
	header_value(head, "Allow", r->allow, sizeof(r->allow));
	r->body_len = rawlen - (size_t)(split + 4 - raw);
	assert_true(r->body_len < sizeof(r->body));
	memcpy(r->body, split + 4, r->body_len);
	r->body[r->body_len] = '\0';
}

/* Sends raw bytes, reads to EOF, parses. */
static void roundtrip(int family, int port, const char *request, struct reply *r)
{
	static char raw[70000];
	size_t got = 0;
	ssize_t n;
	int fd = connect_to(family, port);

	assert_int_equal(send(fd, request, strlen(request), MSG_NOSIGNAL),
			 (ssize_t)strlen(request));
	while ((n = recv(fd, raw + got, sizeof(raw) - 1 - got, 0)) > 0)
		got += (size_t)n;
	assert_true(n == 0); /* EOF, not a timeout */
	close(fd);
	raw[got] = '\0';
	parse_reply(raw, got, r);
}

static void get(int port, const char *method, const char *path, struct reply *r)
{
	char request[256];

	snprintf(request, sizeof(request), "%s %s HTTP/1.0\r\n\r\n", method, path);
	roundtrip(AF_INET, port, request, r);
}

/* ---- tests ---- */

static const struct admin_hooks hooks = { .ready = hook_ready, .metrics = hook_metrics };

static void endpoints(void **state)
{
	static struct reply r;
	struct server s;
	static const struct {
		const char *method, *path;
		int status;
		const char *body; /* NULL: not checked */
	} cases[] = {
		{ "GET", "/healthz", 200, "ok\n" },
		{ "GET", "/healthz?verbose", 200, "ok\n" },
		{ "HEAD", "/healthz", 200, "" },
		{ "GET", "/readyz", 200, "ok\n" },
		{ "GET", "/", 404, "not found\n" },
		{ "GET", "/healthz/", 404, "not found\n" },
		{ "GET", "/nope", 404, "not found\n" },
		{ "DELETE", "/healthz", 405, "method not allowed\n" },
		{ "PUT", "/metrics", 405, "method not allowed\n" },
		{ "OPTIONS", "/readyz", 405, "method not allowed\n" },
	};

	atomic_store(&ready_flag, true);
	server_start(&s, "127.0.0.1:0", &hooks);
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		get(s.port, cases[i].method, cases[i].path, &r);
		if (r.status != cases[i].status)
			fail_msg("%s %s: status %d, want %d", cases[i].method, cases[i].path,
				 r.status, cases[i].status);
		assert_string_equal(r.body, cases[i].body);
		assert_string_equal(r.content_type, "text/plain; charset=utf-8");
		if (r.status == 405)
			assert_string_equal(r.allow, "GET, HEAD");
	}
	/* A POST with a body is refused without reading it. */
	roundtrip(AF_INET, s.port,
		  "POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n"
		  "\r\nhello",
		  &r);
	assert_int_equal(r.status, 405);
	assert_string_equal(r.allow, "GET, HEAD");
	/* A GET with a body is answered; the body is ignored. */
	roundtrip(AF_INET, s.port,
		  "GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n"
		  "\r\nhello",
		  &r);
	assert_int_equal(r.status, 200);
	assert_string_equal(r.body, "ok\n");
	server_stop(&s);
}

static void readiness(void **state)
{
	static struct reply r;
	struct server s;

	atomic_store(&ready_flag, true);
	server_start(&s, "127.0.0.1:0", &hooks);
	get(s.port, "GET", "/readyz", &r);
	assert_int_equal(r.status, 200);
	assert_string_equal(r.body, "ok\n");

	atomic_store(&ready_flag, false);
	get(s.port, "GET", "/readyz", &r);
	assert_int_equal(r.status, 503);
	assert_string_equal(r.body, "database not connected\n"); /* one line */
	/* Liveness does not follow readiness. */
	get(s.port, "GET", "/healthz", &r);
	assert_int_equal(r.status, 200);

	atomic_store(&ready_flag, true);
	get(s.port, "GET", "/readyz", &r);
	assert_int_equal(r.status, 200);
	server_stop(&s);
}

static void metrics_endpoint(void **state)
{
	static struct reply r;
	struct server s;
	char *direct;

	metrics_init();
	metrics_add_messages_read(42);
	metrics_observe_request_seconds(0.5);
	atomic_store(&metrics_fail, false);
	server_start(&s, "127.0.0.1:0", &hooks);

	get(s.port, "GET", "/metrics", &r);
	assert_int_equal(r.status, 200);
	assert_string_equal(r.content_type, CONTENT_TYPE_METRICS);
	direct = metrics_render(NULL);
	assert_non_null(direct);
	assert_string_equal(r.body, direct); /* nothing changed in between */
	free(direct);
	assert_non_null(strstr(r.body, "# TYPE pgmqd_messages_read_total counter\n"));
	assert_non_null(strstr(r.body, "\npgmqd_messages_read_total 42\n"));
	assert_non_null(strstr(r.body, "\npgmqd_runpod_request_duration_seconds_count 1\n"));

	get(s.port, "HEAD", "/metrics", &r);
	assert_int_equal(r.status, 200);
	assert_string_equal(r.content_type, CONTENT_TYPE_METRICS);
	assert_int_equal(r.body_len, 0);

	atomic_store(&metrics_fail, true);
	get(s.port, "GET", "/metrics", &r);
	assert_int_equal(r.status, 500);
	atomic_store(&metrics_fail, false);
	server_stop(&s);
}

static void without_hooks(void **state)
{
	static struct reply r;
	struct server s;

	server_start(&s, "127.0.0.1:0", NULL);
	get(s.port, "GET", "/readyz", &r);
	assert_int_equal(r.status, 200);
	get(s.port, "GET", "/metrics", &r);
	assert_int_equal(r.status, 404);
	server_stop(&s);
}

/* Two requests on one HTTP/1.1 connection, then stop with a client still
 * connected: nothing leaks (valgrind, fd count). */
static void keep_alive_and_stop_with_open_connection(void **state)
{
	static char raw[8192];
	struct server s;
	int fds_before = open_fds(), fd, idle;
	size_t got = 0;
	ssize_t n;
	static const char two[] = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
				  "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

	atomic_store(&ready_flag, true);
	server_start(&s, "127.0.0.1:0", &hooks);
	fd = connect_to(AF_INET, s.port);
	assert_int_equal(send(fd, two, strlen(two), MSG_NOSIGNAL), (ssize_t)strlen(two));
	while ((n = recv(fd, raw + got, sizeof(raw) - 1 - got, 0)) > 0)
		got += (size_t)n;
	assert_int_equal(n, 0);
	raw[got] = '\0';
	close(fd);
	const char *second = strstr(raw + 1, "HTTP/1.1 ");
	assert_true(strncmp(raw, "HTTP/1.1 200", 12) == 0);
	assert_non_null(second);
	assert_true(strncmp(second, "HTTP/1.1 200", 12) == 0);

	idle = connect_to(AF_INET, s.port); /* accepted, never sends */
	server_stop(&s);
	/* The server closed its side: the idle client sees EOF. */
	assert_int_equal(recv(idle, raw, sizeof(raw), 0), 0);
	close(idle);
	assert_int_equal(open_fds(), fds_before);
}

static void ipv6_loopback(void **state)
{
	static struct reply r;
	struct server s;
	struct admin *a;
	struct ev_loop *loop;
	char err[256], addr[64];
	int probe = socket(AF_INET6, SOCK_STREAM, 0);
	struct sockaddr_in6 in6 = { .sin6_family = AF_INET6, .sin6_addr = IN6ADDR_LOOPBACK_INIT };

	if (probe < 0 || bind(probe, (struct sockaddr *)&in6, sizeof(in6)) != 0) {
		if (probe >= 0)
			close(probe);
		skip(); /* no IPv6 loopback on this machine */
	}
	close(probe);
	loop = ev_loop_new(EVFLAG_AUTO);
	a = admin_start(loop, "[::1]:0", &hooks, err, sizeof(err));
	assert_non_null(a);
	admin_stop(a);
	ev_loop_destroy(loop);

	server_start(&s, "[::1]:0", &hooks);
	roundtrip(AF_INET6, s.port, "GET /healthz HTTP/1.0\r\n\r\n", &r);
	assert_int_equal(r.status, 200);
	snprintf(addr, sizeof(addr), "[::1]:%d", s.port);
	assert_int_equal(admin_health_check(addr, 2000), 0);
	snprintf(addr, sizeof(addr), "[::]:%d", s.port); /* wildcard → probed on ::1 */
	assert_int_equal(admin_health_check(addr, 2000), 0);
	server_stop(&s);
}

/* A port that nothing listens on (bound, then released). */
static int free_port(void)
{
	struct sockaddr_in in = { .sin_family = AF_INET,
				  .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t len = sizeof(in);
	int fd = socket(AF_INET, SOCK_STREAM, 0);

	assert_true(fd >= 0);
	assert_int_equal(bind(fd, (struct sockaddr *)&in, sizeof(in)), 0);
	assert_int_equal(getsockname(fd, (struct sockaddr *)&in, &len), 0);
	close(fd);
	return ntohs(in.sin_port);
}

static void health_check(void **state)
{
	struct server s;
	char addr[64];

	server_start(&s, "127.0.0.1:0", &hooks);
	snprintf(addr, sizeof(addr), "127.0.0.1:%d", s.port);
	assert_int_equal(admin_health_check(addr, 2000), 0);
	snprintf(addr, sizeof(addr), "0.0.0.0:%d", s.port); /* wildcard → probed on 127.0.0.1 */
	assert_int_equal(admin_health_check(addr, 2000), 0);
	snprintf(addr, sizeof(addr), "localhost:%d", s.port);
	/* localhost may resolve to ::1 first, where nothing listens; either
	 * answer is fine, it must not crash or hang. */
	(void)admin_health_check(addr, 2000);
	/* Not ready is still alive. */
	atomic_store(&ready_flag, false);
	snprintf(addr, sizeof(addr), "127.0.0.1:%d", s.port);
	assert_int_equal(admin_health_check(addr, 2000), 0);
	atomic_store(&ready_flag, true);
	server_stop(&s);

	snprintf(addr, sizeof(addr), "127.0.0.1:%d", free_port());
	assert_int_equal(admin_health_check(addr, 2000), 1);
	assert_int_equal(admin_health_check("bogus", 2000), 1);
	assert_int_equal(admin_health_check(NULL, 2000), 1);
}

/* A server that accepts and never answers: the probe gives up in time. */
static void health_check_times_out(void **state)
{
	struct sockaddr_in in = { .sin_family = AF_INET,
				  .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t len = sizeof(in);
	struct timespec t0, t1;
	char addr[64];
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	double took;

	assert_int_equal(bind(fd, (struct sockaddr *)&in, sizeof(in)), 0);
	assert_int_equal(listen(fd, 4), 0); /* the kernel completes the handshake */
	assert_int_equal(getsockname(fd, (struct sockaddr *)&in, &len), 0);
	snprintf(addr, sizeof(addr), "127.0.0.1:%d", ntohs(in.sin_port));
	clock_gettime(CLOCK_MONOTONIC, &t0);
	assert_int_equal(admin_health_check(addr, 300), 1);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	took = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
	assert_true(took >= 0.25 && took < 3.0);
	close(fd);
}

static void bad_addresses(void **state)
{
	static const struct {
		const char *addr, *reason; /* a substring of err */
	} cases[] = {
		{ "", "empty listen address" },
		{ "127.0.0.1", "expected host:port" },
		{ "9187", "expected host:port" },
		{ ":9187", "missing or overlong host" },
		{ "127.0.0.1:", "port must be 0..65535" },
		{ "127.0.0.1:99999", "port must be 0..65535" },
		{ "127.0.0.1:-1", "port must be 0..65535" },
		{ "127.0.0.1:80x", "port must be 0..65535" },
		{ "::1:9187", "expected host:port or [v6addr]:port" },
		{ "[::1:9187", "expected [addr]:port" },
		{ "[::1]9187", "expected [addr]:port" },
		{ "[]:9187", "missing or overlong host" },
		{ "[zz::1]:9187", "bad listen address" },
	};
	struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
	char err[256];

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct admin *a = admin_start(loop, cases[i].addr, &hooks, err, sizeof(err));
		if (a != NULL)
			fail_msg("\"%s\" was accepted", cases[i].addr);
		if (strstr(err, cases[i].reason) == NULL)
			fail_msg("\"%s\": err \"%s\" lacks \"%s\"", cases[i].addr, err,
				 cases[i].reason);
		assert_null(strchr(err, '\n'));
	}
	assert_null(admin_start(loop, NULL, &hooks, NULL, 0)); /* err is optional */
	assert_int_equal(ev_run(loop, EVRUN_NOWAIT), 0);
	ev_loop_destroy(loop);
	admin_stop(NULL);
	assert_int_equal(admin_port(NULL), -1);
}

/* The one parser of admin.listen (include/listenaddr.h), used by config's
 * check, admin_start and main's --health-check hint. */
static void listen_split(void **state)
{
	static const struct {
		const char *v, *host;
		int port;
		const char *why; /* NULL: accepted; else a substring of the problem */
	} cases[] = {
		{ "127.0.0.1:9187", "127.0.0.1", 9187, NULL },
		{ "localhost:0", "localhost", 0, NULL },
		{ "[::1]:65535", "::1", 65535, NULL },
		{ "0.0.0.0:00080", "0.0.0.0", 80, NULL },
		{ "", NULL, 0, "empty" },
		{ "127.0.0.1", NULL, 0, "expected host:port" },
		{ "::1:9187", NULL, 0, "expected host:port or [v6addr]:port" },
		{ "[::1]9187", NULL, 0, "expected [addr]:port" },
		{ "[::1", NULL, 0, "expected [addr]:port" },
		{ ":9187", NULL, 0, "missing or overlong host" },
		{ "[]:9187", NULL, 0, "missing or overlong host" },
		{ "127.0.0.1:", NULL, 0, "port must be 0..65535" },
		{ "127.0.0.1:65536", NULL, 0, "port must be 0..65535" },
		{ "127.0.0.1:99999999999999999999", NULL, 0, "port must be 0..65535" },
		{ "127.0.0.1:-1", NULL, 0, "port must be 0..65535" },
		{ "127.0.0.1:+1", NULL, 0, "port must be 0..65535" },
		{ "127.0.0.1:80x", NULL, 0, "port must be 0..65535" },
		{ "127.0.0.1: 80", NULL, 0, "whitespace or a control character" },
		{ "127.0.0.1:80\n", NULL, 0, "whitespace or a control character" },
	};
	char host[LISTENADDR_HOST_MAX + 1], longer[LISTENADDR_HOST_MAX + 8];
	int port;

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		const char *why = listenaddr_split(cases[i].v, host, sizeof(host), &port);

		if (cases[i].why == NULL) {
			if (why != NULL)
				fail_msg("\"%s\": %s", cases[i].v, why);
			assert_string_equal(host, cases[i].host);
			assert_int_equal(port, cases[i].port);
		} else if (why == NULL || strstr(why, cases[i].why) == NULL) {
			fail_msg("\"%s\": \"%s\" lacks \"%s\"", cases[i].v,
				 why ? why : "(accepted)", cases[i].why);
		}
	}
	/* The host's length limit, exactly. */
	memset(longer, 'a', LISTENADDR_HOST_MAX);
	strcpy(longer + LISTENADDR_HOST_MAX, ":1");
	assert_null(listenaddr_split(longer, host, sizeof(host), &port));
	memset(longer, 'a', LISTENADDR_HOST_MAX + 1);
	strcpy(longer + LISTENADDR_HOST_MAX + 1, ":1");
	assert_non_null(listenaddr_split(longer, host, sizeof(host), &port));
	assert_non_null(listenaddr_split(NULL, host, sizeof(host), &port));
}

static void bind_failure(void **state)
{
	struct sockaddr_in in = { .sin_family = AF_INET,
				  .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t len = sizeof(in);
	struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
	char addr[64], err[256];
	int fds_before = open_fds();
	int fd = socket(AF_INET, SOCK_STREAM, 0);

	assert_int_equal(bind(fd, (struct sockaddr *)&in, sizeof(in)), 0);
	assert_int_equal(listen(fd, 4), 0);
	assert_int_equal(getsockname(fd, (struct sockaddr *)&in, &len), 0);
	snprintf(addr, sizeof(addr), "127.0.0.1:%d", ntohs(in.sin_port));
	assert_null(admin_start(loop, addr, &hooks, err, sizeof(err)));
	assert_non_null(strstr(err, "bind "));
	assert_non_null(strstr(err, addr));
	assert_non_null(strstr(err, "Address already in use"));
	close(fd);
	assert_int_equal(open_fds(), fds_before); /* the failed attempt closed its socket */
	ev_loop_destroy(loop);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(endpoints),
		cmocka_unit_test(readiness),
		cmocka_unit_test(metrics_endpoint),
		cmocka_unit_test(without_hooks),
		cmocka_unit_test(keep_alive_and_stop_with_open_connection),
		cmocka_unit_test(ipv6_loopback),
		cmocka_unit_test(health_check),
		cmocka_unit_test(health_check_times_out),
		cmocka_unit_test(bad_addresses),
		cmocka_unit_test(listen_split),
		cmocka_unit_test(bind_failure),
	};

	log_setup(LOG_ERROR, LOG_FORMAT_LOGFMT); /* keep expected warn lines out of the output */
	return cmocka_run_group_tests(tests, NULL, NULL);
}
