/* sdnotify — systemd service notifications (sd_notify(3)) and watchdog pings.
 *
 * Thin layer over libsystemd's sd_notify()/sd_notifyf(): one datagram per
 * call to the AF_UNIX socket named by $NOTIFY_SOCKET, a filesystem path
 * ("/run/...") or a Linux abstract name ("@name"); libsystemd handles both.
 * Without $NOTIFY_SOCKET every function is a no-op that returns 0, so the
 * daemon behaves the same in Docker, in a terminal and under systemd.
 *
 * Lifecycle the caller is expected to follow (operations.md §1.1–§1.3):
 * start the signal watchers, then sdnotify_ready(); on SIGHUP
 * sdnotify_reloading() … sdnotify_ready(); on SIGTERM sdnotify_stopping().
 *
 * Return values of the notify functions: > 0 the datagram was sent, 0 no
 * $NOTIFY_SOCKET, < 0 a negative errno. A failure is logged once (warn) and
 * again only after a send succeeded in between, so a broken socket does
 * not flood the log; callers may ignore the result.
 *
 * Single-threaded: the watchdog timer is module state, driven by the
 * caller's loop. The environment is never unset. */
#ifndef PGMQD_SDNOTIFY_H
#define PGMQD_SDNOTIFY_H

#include <ev.h>

/* READY=1: start-up (or a reload) is complete. */
int sdnotify_ready(void);

/* STATUS=<text>: one line shown by `systemctl status`. The text is
 * formatted with vsnprintf, cut at 1023 bytes, and any CR/LF in it is
 * replaced by a space (a newline would start another KEY=VALUE line). */
int sdnotify_status(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* STOPPING=1: shutdown has begun. */
int sdnotify_stopping(void);

/* RELOADING=1 and MONOTONIC_USEC=<CLOCK_MONOTONIC in µs> in one datagram,
 * as Type=notify-reload (systemd ≥ 253) requires; systemd 252 ignores the
 * unknown key. Must be followed by sdnotify_ready() when the reload ends,
 * whether it succeeded or not. */
int sdnotify_reloading(void);

/* Starts the watchdog (a running timer is stopped first, and the
 * environment is read again, so it may be called on reload): when
 * sd_watchdog_enabled() reports a period — $WATCHDOG_USEC set and
 * $WATCHDOG_PID unset or equal to getpid() — sends WATCHDOG=1 at once and
 * then from an ev_timer in `loop` every half period (floating seconds), so
 * a loop that stops turning stops pinging. The timer keeps the loop alive
 * until sdnotify_watchdog_stop().
 * Returns 1 when pinging, 0 when the watchdog is not enabled (or there is
 * no $NOTIFY_SOCKET), -1 when
 * $WATCHDOG_USEC is invalid (logged). */
int sdnotify_watchdog_start(struct ev_loop *loop);

/* Stops the watchdog timer (on the loop it was started on; `loop` is
 * accepted for symmetry); a no-op when it is not running. */
void sdnotify_watchdog_stop(struct ev_loop *loop);

#endif
