/* log_sink — see include/log_sink.h. */
#include "log.h"
#include "log_sink.h"

#include <errno.h>
#include <ev.h>
#include <fcntl.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* Bytes of finished lines waiting for a stalled stderr (issue 10, defect 7).
 * While a loop is attached, a write never blocks: what the reader does not
 * take waits here, and a line that does not fit is dropped and counted. */
#define PENDING_MAX (64 * 1024)

static struct {
	struct ev_loop *loop;          /* NULL: direct, blocking writes (startup, -t, exit) */
	ev_io watcher;                 /* EV_WRITE while bytes wait */
	int fd;                        /* a non-blocking description of stderr, or stderr */
	bool own_fd;                   /* fd was opened here (closed on detach) */
	bool sock;                     /* stderr is a socket (journald): send(MSG_DONTWAIT) */
	size_t head, len;              /* waiting bytes: pending[head .. head + len) */
	unsigned long long unreported; /* dropped since the last "log_lines_dropped" */
	char pending[PENDING_MAX];
} out = { .fd = STDERR_FILENO };

static _Atomic unsigned long long dropped_total; /* read by the /metrics thread */

static ssize_t write_some(const char *p, size_t n)
{
	if (out.sock)
		return send(out.fd, p, n, MSG_DONTWAIT | MSG_NOSIGNAL);
	return write(out.fd, p, n);
}

static void write_blocking(const char *p, size_t n)
{
	while (n > 0) {
		ssize_t w = write(STDERR_FILENO, p, n);

		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return;
		p += w;
		n -= (size_t)w;
	}
}

static size_t count_lines(const char *p, size_t n)
{
	size_t k = 0;

	for (size_t i = 0; i < n; i++)
		k += p[i] == '\n';
	return k;
}

static void drop(unsigned long long lines)
{
	out.unreported += lines;
	atomic_fetch_add_explicit(&dropped_total, lines, memory_order_relaxed);
}

/* Writes waiting bytes until the reader stops taking them. Once all are
 * out, says how many lines were dropped meanwhile. */
static void flush_pending(void)
{
	while (out.len > 0) {
		ssize_t w = write_some(out.pending + out.head, out.len);

		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return;
		if (w <= 0) { /* the reader is gone (EPIPE) or stderr is broken */
			drop(count_lines(out.pending + out.head, out.len));
			out.len = 0;
			break;
		}
		out.head += (size_t)w;
		out.len -= (size_t)w;
	}
	out.head = 0;
	if (out.unreported > 0) {
		unsigned long long n = out.unreported;

		out.unreported = 0;
		log_note_dropped(n);
	}
}

static void watch(bool on)
{
	if (out.loop == NULL || on == ev_is_active(&out.watcher))
		return;
	/* The watcher never keeps the loop alive on its own. */
	if (on) {
		ev_io_start(out.loop, &out.watcher);
		ev_unref(out.loop);
	} else {
		ev_ref(out.loop);
		ev_io_stop(out.loop, &out.watcher);
	}
}

static void on_writable(struct ev_loop *loop, ev_io *w, int revents)
{
	(void)loop;
	(void)w;
	(void)revents;
	flush_pending();
	watch(out.len > 0);
}

/* One finished line: written at once when nothing waits, else queued
 * behind what waits; dropped and counted when the queue is full. */
void log_sink_write(const char *p, size_t n)
{
	if (out.loop == NULL) {
		write_blocking(p, n);
		return;
	}
	if (out.len > 0)
		flush_pending();
	if (out.len == 0) {
		ssize_t w = write_some(p, n);

		if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
			drop(1);
			return;
		}
		if (w > 0) {
			p += w;
			n -= (size_t)w;
		}
		if (n == 0)
			return;
	}
	if (out.head > 0) {
		memmove(out.pending, out.pending + out.head, out.len);
		out.head = 0;
	}
	/* The rest of a line already begun always fits: the queue was empty. */
	if (n > sizeof(out.pending) - out.len) {
		drop(1);
		return;
	}
	memcpy(out.pending + out.len, p, n);
	out.len += n;
	watch(true);
}

int log_attach_loop(struct ev_loop *loop)
{
	struct stat st;
	int fd = -1;

	if (out.loop != NULL || fstat(STDERR_FILENO, &st) != 0)
		return -1;
	out.sock = S_ISSOCK(st.st_mode);
	if (S_ISFIFO(st.st_mode) || S_ISCHR(st.st_mode)) {
		/* A new open file description of the same pipe or terminal:
		 * O_NONBLOCK on it leaves the one shared with our parent alone. */
		fd = open("/proc/self/fd/2", O_WRONLY | O_NONBLOCK | O_CLOEXEC);
		if (fd < 0)
			return -1;
	}
	out.fd = fd >= 0 ? fd : STDERR_FILENO;
	out.own_fd = fd >= 0;
	out.head = out.len = 0;
	out.loop = loop;
	ev_io_init(&out.watcher, on_writable, out.fd, EV_WRITE);
	return 0;
}

void log_detach_loop(int timeout_ms)
{
	struct timespec start, now;

	if (out.loop == NULL)
		return;
	watch(false);
	clock_gettime(CLOCK_MONOTONIC, &start);
	for (;;) {
		struct pollfd pfd = { .fd = out.fd, .events = POLLOUT };
		long left;

		flush_pending();
		if (out.len == 0)
			break;
		clock_gettime(CLOCK_MONOTONIC, &now);
		left = timeout_ms - ((now.tv_sec - start.tv_sec) * 1000L +
				     (now.tv_nsec - start.tv_nsec) / 1000000L);
		if (left <= 0 || (poll(&pfd, 1, (int)left) < 0 && errno != EINTR)) {
			drop(count_lines(out.pending + out.head, out.len));
			out.len = 0;
			break;
		}
	}
	if (out.own_fd)
		close(out.fd);
	out.fd = STDERR_FILENO;
	out.own_fd = out.sock = false;
	out.loop = NULL;
}

unsigned long long log_lines_dropped(void)
{
	return atomic_load_explicit(&dropped_total, memory_order_relaxed);
}
