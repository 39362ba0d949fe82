/* Unit tests for sdnotify: a fake $NOTIFY_SOCKET (a path socket and an
 * abstract "@name" socket) receives the exact datagrams; the watchdog pings
 * at half of $WATCHDOG_USEC from an ev loop. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <errno.h>
#include <ev.h>
#include <inttypes.h>
#include <poll.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "sdnotify.h"

enum kind { PATH_SOCKET, ABSTRACT_SOCKET };

struct receiver {
	int fd;
	char dir[64]; /* temp dir of a path socket, "" otherwise */
	char path[108];
};

/* Binds a SOCK_DGRAM receiver and points $NOTIFY_SOCKET at it. */
static void receiver_open(struct receiver *r, enum kind kind)
{
	static int serial;
	struct sockaddr_un sa;
	socklen_t len;
	char env[sizeof(sa.sun_path) + 1];

	memset(r, 0, sizeof(*r));
	memset(&sa, 0, sizeof(sa));
	sa.sun_family = AF_UNIX;
	r->fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	assert_true(r->fd >= 0);
	if (kind == PATH_SOCKET) {
		snprintf(r->dir, sizeof(r->dir), "/tmp/pgmqd-sdnotify-XXXXXX");
		assert_non_null(mkdtemp(r->dir));
		snprintf(r->path, sizeof(r->path), "%s/notify", r->dir);
		memcpy(sa.sun_path, r->path, strlen(r->path));
		len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + strlen(r->path) + 1);
		snprintf(env, sizeof(env), "%s", r->path);
	} else {
		/* Abstract: a leading NUL, and the length counts only the name. */
		snprintf(r->path, sizeof(r->path), "pgmqd-test-%d-%d", (int)getpid(), serial++);
		memcpy(sa.sun_path + 1, r->path, strlen(r->path));
		len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + strlen(r->path));
		snprintf(env, sizeof(env), "@%s", r->path);
	}
	assert_int_equal(bind(r->fd, (struct sockaddr *)&sa, len), 0);
	assert_int_equal(setenv("NOTIFY_SOCKET", env, 1), 0);
}

static void receiver_close(struct receiver *r)
{
	close(r->fd);
	if (r->dir[0]) {
		unlink(r->path);
		rmdir(r->dir);
	}
	unsetenv("NOTIFY_SOCKET");
}

/* Waits up to timeout_ms for one datagram; returns its length, or -1. */
static ssize_t receive(struct receiver *r, char *buf, size_t len, int timeout_ms)
{
	struct pollfd pfd = { .fd = r->fd, .events = POLLIN };
	ssize_t n;

	if (poll(&pfd, 1, timeout_ms) != 1)
		return -1;
	n = recv(r->fd, buf, len - 1, 0);
	if (n >= 0)
		buf[n] = '\0';
	return n;
}

static void expect(struct receiver *r, const char *want)
{
	char buf[2048];

	assert_true(receive(r, buf, sizeof(buf), 2000) >= 0);
	assert_string_equal(buf, want);
}

static uint64_t monotonic_usec(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static void no_socket_is_a_noop(void **state)
{
	struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);

	unsetenv("NOTIFY_SOCKET");
	unsetenv("WATCHDOG_USEC");
	unsetenv("WATCHDOG_PID");
	assert_int_equal(sdnotify_ready(), 0);
	assert_int_equal(sdnotify_status("x %d", 1), 0);
	assert_int_equal(sdnotify_stopping(), 0);
	assert_int_equal(sdnotify_reloading(), 0);
	assert_int_equal(sdnotify_watchdog_start(loop), 0);
	/* A watchdog period without a socket to ping is no watchdog either. */
	setenv("WATCHDOG_USEC", "400000", 1);
	assert_int_equal(sdnotify_watchdog_start(loop), 0);
	unsetenv("WATCHDOG_USEC");
	sdnotify_watchdog_stop(loop);
	assert_int_equal(ev_run(loop, EVRUN_NOWAIT), 0); /* nothing left active */
	ev_loop_destroy(loop);
}

static void lifecycle_messages(enum kind kind)
{
	struct receiver r;
	char buf[2048];
	char *end;
	uint64_t before, after, usec;

	receiver_open(&r, kind);
	assert_true(sdnotify_ready() > 0);
	expect(&r, "READY=1");

	assert_true(sdnotify_status("dispatching, %d in flight", 2) > 0);
	expect(&r, "STATUS=dispatching, 2 in flight");
	assert_true(sdnotify_status("circuit open: %s", "401 from\nRunPod\r") > 0);
	expect(&r, "STATUS=circuit open: 401 from RunPod "); /* one line, no injected keys */

	before = monotonic_usec();
	assert_true(sdnotify_reloading() > 0);
	after = monotonic_usec();
	assert_true(receive(&r, buf, sizeof(buf), 2000) >= 0);
	assert_true(strncmp(buf, "RELOADING=1\nMONOTONIC_USEC=", 27) == 0);
	errno = 0;
	usec = strtoull(buf + 27, &end, 10);
	assert_int_equal(errno, 0);
	assert_true(end != buf + 27 && *end == '\0'); /* one datagram, two lines, nothing else */
	assert_true(usec >= before && usec <= after);
	assert_true(sdnotify_ready() > 0);
	expect(&r, "READY=1");

	assert_true(sdnotify_stopping() > 0);
	expect(&r, "STOPPING=1");
	assert_int_equal(receive(&r, buf, sizeof(buf), 0), -1); /* nothing extra */
	receiver_close(&r);
}

static void messages_on_path_socket(void **state)
{
	lifecycle_messages(PATH_SOCKET);
}

static void messages_on_abstract_socket(void **state)
{
	lifecycle_messages(ABSTRACT_SOCKET);
}

static void send_failure_is_reported(void **state)
{
	struct receiver r;

	/* A socket name nobody listens on any more. */
	receiver_open(&r, ABSTRACT_SOCKET);
	close(r.fd);
	assert_true(sdnotify_ready() < 0);
	assert_true(sdnotify_stopping() < 0);
	unsetenv("NOTIFY_SOCKET");
}

/* ---- watchdog ---- */

#define WATCHDOG_USEC 400000 /* pings every 0.2 s */
#define PINGS 3              /* one at start, then one per half period */

struct wd_test {
	struct receiver r;
	ev_io io;
	ev_timer guard;
	double at[PINGS];
	int pings;
	bool other;
};

static void on_datagram(struct ev_loop *loop, ev_io *w, int revents)
{
	struct wd_test *t = w->data;
	char buf[256];

	(void)revents;
	if (receive(&t->r, buf, sizeof(buf), 0) < 0)
		return;
	if (strcmp(buf, "WATCHDOG=1") != 0) {
		t->other = true;
		return;
	}
	ev_now_update(loop);
	t->at[t->pings++] = ev_now(loop);
	if (t->pings == PINGS)
		ev_break(loop, EVBREAK_ALL);
}

static void on_guard(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)w;
	(void)revents;
	ev_break(loop, EVBREAK_ALL);
}

static void watchdog_pings_at_half_period(enum kind kind)
{
	struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
	struct wd_test t;
	char pid[32], buf[256];

	memset(&t, 0, sizeof(t));
	receiver_open(&t.r, kind);
	snprintf(pid, sizeof(pid), "%d", (int)getpid());
	setenv("WATCHDOG_USEC", "400000", 1);
	setenv("WATCHDOG_PID", pid, 1);

	ev_io_init(&t.io, on_datagram, t.r.fd, EV_READ);
	t.io.data = &t;
	ev_io_start(loop, &t.io);
	ev_timer_init(&t.guard, on_guard, 10.0, 0.0); /* a wedged test ends, and fails */
	ev_timer_start(loop, &t.guard);

	assert_int_equal(sdnotify_watchdog_start(loop), 1);
	ev_run(loop, 0);
	sdnotify_watchdog_stop(loop);
	ev_io_stop(loop, &t.io);
	ev_timer_stop(loop, &t.guard);

	assert_int_equal(t.pings, PINGS);
	assert_false(t.other);
	for (int i = 1; i < PINGS; i++) {
		double gap = t.at[i] - t.at[i - 1];
		/* Nominal 0.2 s; generous bounds, this is not a benchmark. */
		if (gap < 0.1 || gap > 1.0)
			fail_msg("ping %d came %.3f s after the previous one", i, gap);
	}
	/* Stopped: no further ping within more than a period. */
	assert_int_equal(receive(&t.r, buf, sizeof(buf), WATCHDOG_USEC / 1000 + 100), -1);

	unsetenv("WATCHDOG_USEC");
	unsetenv("WATCHDOG_PID");
	receiver_close(&t.r);
	ev_loop_destroy(loop);
}

static void watchdog_on_path_socket(void **state)
{
	watchdog_pings_at_half_period(PATH_SOCKET);
}

static void watchdog_on_abstract_socket(void **state)
{
	watchdog_pings_at_half_period(ABSTRACT_SOCKET);
}

static void watchdog_disabled(void **state)
{
	static const struct {
		const char *usec, *pid; /* NULL: unset; "self": getpid() */
		int want;
	} cases[] = {
		{ NULL, NULL, 0 },    /* no WatchdogSec= */
		{ "400000", "1", 0 }, /* meant for another process */
		{ "400000", "self", 1 },
		{ "400000", NULL, 1 }, /* WATCHDOG_PID is optional */
		{ "not-a-number", "self", -1 },
		{ "0", "self", -1 },
	};
	struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
	struct receiver r;
	char self[32], buf[256];

	snprintf(self, sizeof(self), "%d", (int)getpid());
	receiver_open(&r, ABSTRACT_SOCKET);
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		const char *pid = cases[i].pid && strcmp(cases[i].pid, "self") == 0 ? self
										    : cases[i].pid;
		int rc;

		if (cases[i].usec)
			setenv("WATCHDOG_USEC", cases[i].usec, 1);
		else
			unsetenv("WATCHDOG_USEC");
		if (pid)
			setenv("WATCHDOG_PID", pid, 1);
		else
			unsetenv("WATCHDOG_PID");
		rc = sdnotify_watchdog_start(loop);
		if (rc != cases[i].want)
			fail_msg("case %zu: got %d, want %d", i, rc, cases[i].want);
		if (rc == 1) {
			/* The immediate ping. */
			assert_true(receive(&r, buf, sizeof(buf), 2000) >= 0);
			assert_string_equal(buf, "WATCHDOG=1");
		}
		sdnotify_watchdog_stop(loop);
		/* No watcher left behind in the loop. */
		assert_int_equal(ev_run(loop, EVRUN_NOWAIT), 0);
	}
	unsetenv("WATCHDOG_USEC");
	unsetenv("WATCHDOG_PID");
	receiver_close(&r);
	ev_loop_destroy(loop);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(no_socket_is_a_noop),
		cmocka_unit_test(messages_on_path_socket),
		cmocka_unit_test(messages_on_abstract_socket),
		cmocka_unit_test(send_failure_is_reported),
		cmocka_unit_test(watchdog_on_path_socket),
		cmocka_unit_test(watchdog_on_abstract_socket),
		cmocka_unit_test(watchdog_disabled),
	};

	log_setup(LOG_ERROR, LOG_FORMAT_LOGFMT); /* keep warn lines out of the test output */
	return cmocka_run_group_tests(tests, NULL, NULL);
}
