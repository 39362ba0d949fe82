/* log_sink — where finished log lines go: stderr, never blocking the loop.
 *
 * Owns the output side described in log.h: direct blocking writes until
 * log_attach_loop(), then non-blocking writes (a new open file description
 * of a pipe or terminal, send(MSG_DONTWAIT) on journald's socket) with a
 * bounded 64 KiB buffer drained by an EV_WRITE watcher, the drop counter
 * and the drain at detach. log_attach_loop(), log_detach_loop() and
 * log_lines_dropped() (declared in log.h) live here.
 * Knows nothing of levels, formats, escaping or secrets: it takes bytes
 * that log.c has already formatted and redacted. */
#ifndef PGMQD_LOG_SINK_H
#define PGMQD_LOG_SINK_H

#include <stddef.h>

/* One finished line (newline included): written at once when nothing
 * waits, else queued behind what waits; dropped and counted when the
 * buffer is full. Does not keep p. */
void log_sink_write(const char *p, size_t n);

/* Provided by log.c: writes the "log_lines_dropped" warning for n lines
 * dropped while stderr was not read (through log_sink_write again). */
void log_note_dropped(unsigned long long n);

#endif
