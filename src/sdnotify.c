/* sdnotify — see include/sdnotify.h. */
#include "sdnotify.h"
#include "log.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <systemd/sd-daemon.h>
#include <time.h>

#define STATUS_MAX_BYTES 1024

static bool failing; /* the last send failed (already logged) */
static ev_timer watchdog;
static struct ev_loop *watchdog_loop; /* set while the timer runs */

/* Logs the first failure of a run of failures; returns rc unchanged. */
static int checked(int rc, const char *what)
{
	if (rc < 0) {
		if (!failing)
			log_msg(LOG_WARN, "sd_notify_failed", "%s: %s", what, strerror(-rc));
		failing = true;
	} else if (rc > 0) {
		failing = false;
	}
	return rc;
}

int sdnotify_ready(void)
{
	return checked(sd_notify(0, "READY=1"), "READY=1");
}

int sdnotify_stopping(void)
{
	return checked(sd_notify(0, "STOPPING=1"), "STOPPING=1");
}

int sdnotify_status(const char *fmt, ...)
{
	char text[STATUS_MAX_BYTES];
	va_list ap;

	if (getenv("NOTIFY_SOCKET") == NULL)
		return 0;
	va_start(ap, fmt);
	if (vsnprintf(text, sizeof(text), fmt, ap) < 0)
		text[0] = '\0';
	va_end(ap);
	for (char *p = text; *p; p++)
		if (*p == '\n' || *p == '\r')
			*p = ' ';
	return checked(sd_notifyf(0, "STATUS=%s", text), "STATUS");
}

int sdnotify_reloading(void)
{
	struct timespec ts;
	uint64_t usec;

	if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
		return checked(sd_notify(0, "RELOADING=1"), "RELOADING=1");
	usec = (uint64_t)ts.tv_sec * UINT64_C(1000000) + (uint64_t)ts.tv_nsec / 1000;
	return checked(sd_notifyf(0, "RELOADING=1\nMONOTONIC_USEC=%" PRIu64, usec), "RELOADING=1");
}

static void ping(void)
{
	checked(sd_notify(0, "WATCHDOG=1"), "WATCHDOG=1");
}

static void on_watchdog(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)loop;
	(void)w;
	(void)revents;
	ping();
}

int sdnotify_watchdog_start(struct ev_loop *loop)
{
	uint64_t usec = 0;
	int rc;

	sdnotify_watchdog_stop(loop);
	if (getenv("NOTIFY_SOCKET") == NULL)
		return 0; /* nobody to ping */
	rc = sd_watchdog_enabled(0, &usec);
	if (rc < 0) {
		log_msg(LOG_WARN, "watchdog_disabled", "invalid WATCHDOG_USEC/WATCHDOG_PID: %s",
			strerror(-rc));
		return -1;
	}
	if (rc == 0 || usec == 0)
		return 0;
	/* Half the period, in floating seconds (sd_watchdog_enabled(3)). */
	ev_timer_init(&watchdog, on_watchdog, (double)usec / 2e6, (double)usec / 2e6);
	ev_timer_start(loop, &watchdog);
	watchdog_loop = loop;
	ping();
	log_msg(LOG_INFO, "watchdog_enabled", "WATCHDOG=1 every %.3f s", (double)usec / 2e6);
	return 1;
}

void sdnotify_watchdog_stop(struct ev_loop *loop)
{
	(void)loop; /* the timer is stopped on the loop it was started on */
	if (watchdog_loop == NULL)
		return;
	ev_timer_stop(watchdog_loop, &watchdog);
	watchdog_loop = NULL;
}
