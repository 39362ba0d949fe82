/* log — levelled, structured log lines on stderr (logfmt or JSON).
 *
 * One line per event: time (UTC, ms), level, event, then key/value fields.
 * When stderr is connected to journald ($JOURNAL_STREAM matches fstat(2) of
 * stderr, per systemd.exec(5)), lines start with a <N> priority prefix and
 * carry no timestamp of their own (journald stamps them).
 *
 * Secrets registered with log_secret_add() are replaced by "***" in every
 * line before it is written, as a last line of defence; callers still never
 * pass secrets on purpose.
 *
 * Until log_attach_loop(), lines are written at once with blocking writes
 * (startup, -t, -T). Once a loop is attached the loop never blocks on a log
 * write: a line the reader does not take at once waits in a bounded buffer
 * (64 KiB) and leaves when stderr is writable again; a line that does not
 * fit is dropped and counted (log_lines_dropped(), /metrics), and one
 * "log_lines_dropped" line says how many once writing resumes.
 *
 * Single-threaded: the line under construction lives in a static buffer.
 * No function here changes errno. */
#ifndef PGMQD_LOG_H
#define PGMQD_LOG_H

#include <stdbool.h>
#include <stdio.h>
#include <stddef.h>

enum log_level { LOG_ERROR = 0, LOG_WARN, LOG_INFO, LOG_DEBUG, LOG_TRACE };
enum log_format { LOG_FORMAT_LOGFMT = 0, LOG_FORMAT_JSON };

/* Sets the threshold and format; detects journald on stderr. */
void log_setup(enum log_level level, enum log_format fmt);

/* True when lines of this level are written. */
bool log_enabled(enum log_level level);

/* Parses "error", "warn", "info", "debug", "trace"; returns -1 if unknown. */
int log_level_parse(const char *name);

/* Registers a secret to be masked in every later line. The string is
 * copied; secrets shorter than 4 bytes are ignored (they would mask noise).
 * At most 16 secrets (MAX_SECRETS in log.c); returns -1 when full. */
int log_secret_add(const char *secret);

/* Forgets every registered secret (used on reload, before re-adding). */
void log_secret_clear(void);

/* Structured line builder. log_begin() returns NULL when the level is
 * disabled; every other function accepts NULL and then does nothing, so
 * disabled debug lines cost one comparison. Values are escaped; a line is
 * capped at 8 KiB and values past that are cut with "…". */
struct log_line;
struct log_line *log_begin(enum log_level level, const char *event);
void log_str(struct log_line *l, const char *key, const char *value);
void log_strn(struct log_line *l, const char *key, const char *value, size_t len);
/* Like log_strn(), cut after max bytes of value (all len bytes are still
 * searched for secrets, so one straddling the cut is masked whole). */
void log_excerpt(struct log_line *l, const char *key, const char *value, size_t len, size_t max);
void log_int(struct log_line *l, const char *key, long long value);
/* An integer kept as text (a bigint msg_id or read_ct as PostgreSQL printed
 * it): a JSON number in JSON, exact past 2^53; text that is not an integer
 * is logged as a string, like log_str(). */
void log_num(struct log_line *l, const char *key, const char *digits);
/* A list of integers: "1,2,3" in logfmt, [1,2,3] in JSON. */
void log_int_list(struct log_line *l, const char *key, const long long *values, size_t n);
void log_end(struct log_line *l);

struct ev_loop;

/* From now on, never block on stderr (see above). For a pipe or terminal
 * the writes go to a new non-blocking open file description of it
 * (/proc/self/fd/2), so the flags of the one shared with the parent stay as
 * they were; a socket (journald) gets send(MSG_DONTWAIT); a regular file is
 * written as before. Returns 0, or -1 (lines stay direct and blocking). */
int log_attach_loop(struct ev_loop *loop);

/* Writes what still waits, for at most timeout_ms (what is left then is
 * dropped and counted), stops the watcher and returns to direct writes.
 * Call before the loop is destroyed. */
void log_detach_loop(int timeout_ms);

/* Lines dropped since start because stderr was not being read. Safe to
 * call from any thread. */
unsigned long long log_lines_dropped(void);

/* One-shot line with a free-text msg field. */
void log_msg(enum log_level level, const char *event, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/* A line of one route: log_begin() with route=NAME first. */
static inline struct log_line *log_begin_route(const char *route, enum log_level level,
					       const char *event)
{
	struct log_line *l = log_begin(level, event);

	log_str(l, "route", route);
	return l;
}

/* log_msg() for a line of one route. */
#define log_msg_route(route, level, event, ...)                          \
	do {                                                             \
		if (log_enabled(level)) {                                \
			char msg_[2048];                                 \
			struct log_line *l_;                             \
			snprintf(msg_, sizeof(msg_), __VA_ARGS__);       \
			l_ = log_begin_route((route), (level), (event)); \
			log_str(l_, "msg", msg_);                        \
			log_end(l_);                                     \
		}                                                        \
	} while (0)

#endif
