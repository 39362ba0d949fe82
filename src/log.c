/* log — see include/log.h: levels, the line builder (logfmt or JSON,
 * escaping, cuts) and secret redaction. Pure formatting into a static
 * buffer; the finished line goes to log_sink.c, which owns stderr. */
#include "log.h"
#include "log_sink.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define LINE_MAX_BYTES 8192
#define MAX_SECRETS 16

#define VALUE_MAX_BYTES 2048
/* Room kept free for the ",\"truncated\":true}" tail and the newline. */
#define TAIL_RESERVE 24

struct log_line {
	char buf[LINE_MAX_BYTES];
	size_t len;
	size_t field_start; /* where the field being written began */
	bool truncated;
};

static enum log_level threshold = LOG_INFO;
static enum log_format format = LOG_FORMAT_LOGFMT;
static bool journald;
static struct log_line line;
static char *secrets[MAX_SECRETS];

static const char *const level_names[] = { "error", "warn", "info", "debug", "trace" };
/* sd-daemon.h: SD_ERR 3, SD_WARNING 4, SD_INFO 6, SD_DEBUG 7. */
static const int level_prio[] = { 3, 4, 6, 7, 7 };

static bool stderr_is_journal(void)
{
	const char *js = getenv("JOURNAL_STREAM");
	unsigned long long dev, ino;
	struct stat st;

	if (js == NULL || sscanf(js, "%llu:%llu", &dev, &ino) != 2)
		return false;
	if (fstat(STDERR_FILENO, &st) != 0)
		return false;
	return (unsigned long long)st.st_dev == dev && (unsigned long long)st.st_ino == ino;
}

void log_setup(enum log_level level, enum log_format fmt)
{
	threshold = level;
	format = fmt;
	journald = stderr_is_journal();
}

bool log_enabled(enum log_level level)
{
	return level <= threshold;
}

int log_level_parse(const char *name)
{
	for (int i = 0; i <= LOG_TRACE; i++)
		if (strcmp(name, level_names[i]) == 0)
			return i;
	return -1;
}

int log_secret_add(const char *secret)
{
	if (secret == NULL || strlen(secret) < 4)
		return 0;
	for (int i = 0; i < MAX_SECRETS; i++) {
		if (secrets[i] != NULL && strcmp(secrets[i], secret) == 0)
			return 0;
		if (secrets[i] == NULL) {
			secrets[i] = strdup(secret);
			return secrets[i] ? 0 : -1;
		}
	}
	return -1;
}

void log_secret_clear(void)
{
	for (int i = 0; i < MAX_SECRETS; i++) {
		free(secrets[i]);
		secrets[i] = NULL;
	}
}

static void put(struct log_line *l, const char *s, size_t n)
{
	if (l->truncated)
		return;
	if (n > sizeof(l->buf) - TAIL_RESERVE - l->len) {
		/* Drop the whole field rather than emit half of it. */
		l->len = l->field_start;
		l->truncated = true;
		return;
	}
	memcpy(l->buf + l->len, s, n);
	l->len += n;
}

static void putc_(struct log_line *l, char c)
{
	put(l, &c, 1);
}

/* Length of a registered secret starting at s (total bytes avail), or 0. */
static size_t secret_at(const char *s, size_t avail)
{
	for (int k = 0; k < MAX_SECRETS && secrets[k] != NULL; k++) {
		size_t n = strlen(secrets[k]);
		if (n <= avail && s[0] == secrets[k][0] && memcmp(s, secrets[k], n) == 0)
			return n;
	}
	return 0;
}

/* Length of a valid UTF-8 sequence at s (1-4), or 0 when invalid. */
static size_t utf8_len(const unsigned char *s, size_t avail)
{
	size_t n = s[0] >= 0xF0 ? 4 : s[0] >= 0xE0 ? 3 : s[0] >= 0xC2 ? 2 : 0;

	if (s[0] > 0xF4 || n == 0 || n > avail)
		return 0;
	for (size_t i = 1; i < n; i++)
		if ((s[i] & 0xC0) != 0x80)
			return 0;
	if ((s[0] == 0xE0 && s[1] < 0xA0) || (s[0] == 0xF0 && s[1] < 0x90) ||
	    (s[0] == 0xF4 && s[1] > 0x8F) || (s[0] == 0xED && s[1] > 0x9F))
		return 0; /* overlong, beyond U+10FFFF, or a surrogate */
	return n;
}

/* Escapes the first n bytes of a value (total bytes in s: avail) for
 * logfmt or JSON. Secrets are replaced by *** here, before escaping, so
 * that an escaped quote or backslash cannot hide one from the match, and a
 * secret that straddles the cut at n is still masked whole. Control bytes
 * become \n, \t or \u00XX; invalid UTF-8 (bytes from the network) becomes
 * \ufffd, so every line is valid UTF-8 and JSON. */
static void put_escaped_cut(struct log_line *l, const char *s, size_t n, size_t avail)
{
	static const char hex[] = "0123456789abcdef";

	for (size_t i = 0; i < n && !l->truncated; i++) {
		unsigned char c = (unsigned char)s[i];
		size_t skip;

		if (secrets[0] != NULL && (skip = secret_at(s + i, avail - i)) > 0) {
			put(l, "***", 3);
			i += skip - 1;
			continue;
		}
		if (c >= 0x80) {
			size_t u = utf8_len((const unsigned char *)s + i, n - i);
			if (u == 0) {
				put(l, "\\ufffd", 6);
			} else {
				put(l, s + i, u);
				i += u - 1;
			}
			continue;
		}

		if (c == '"' || c == '\\') {
			char e[2] = { '\\', (char)c };
			put(l, e, 2);
		} else if (c == '\n') {
			put(l, "\\n", 2);
		} else if (c == '\t') {
			put(l, "\\t", 2);
		} else if (c < 0x20 || c == 0x7f) {
			char e[6] = { '\\', 'u', '0', '0', hex[c >> 4], hex[c & 15] };
			put(l, e, 6);
		} else {
			putc_(l, (char)c);
		}
	}
}

static void put_escaped(struct log_line *l, const char *s, size_t n)
{
	put_escaped_cut(l, s, n, n);
}

static bool logfmt_needs_quotes(const char *s, size_t n)
{
	if (n == 0)
		return true;
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];
		if (c <= ' ' || c == '=' || c == '"' || c == '\\' || c >= 0x7f)
			return true;
	}
	return false;
}

static void put_key(struct log_line *l, const char *key)
{
	l->field_start = l->len;
	if (format == LOG_FORMAT_JSON) {
		put(l, ",\"", 2);
		put(l, key, strlen(key));
		put(l, "\":", 2);
	} else {
		putc_(l, ' ');
		put(l, key, strlen(key));
		putc_(l, '=');
	}
}

static struct log_line *start_line(struct log_line *l, enum log_level level, const char *event);

struct log_line *log_begin(enum log_level level, const char *event)
{
	if (!log_enabled(level))
		return NULL;
	return start_line(&line, level, event);
}

static struct log_line *start_line(struct log_line *l, enum log_level level, const char *event)
{
	char ts[64];
	struct timespec now;
	struct tm tm;

	l->len = 0;
	l->field_start = 0;
	l->truncated = false;
	clock_gettime(CLOCK_REALTIME, &now);
	gmtime_r(&now.tv_sec, &tm);
	snprintf(ts, sizeof(ts), "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ", tm.tm_year + 1900,
		 tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
		 now.tv_nsec / 1000000);

	if (journald) {
		char prio[4] = { '<', (char)('0' + level_prio[level]), '>', 0 };
		put(l, prio, 3);
	}
	if (format == LOG_FORMAT_JSON) {
		putc_(l, '{');
		if (!journald) {
			put(l, "\"time\":\"", 8);
			put(l, ts, strlen(ts));
			put(l, "\",", 2);
		}
		put(l, "\"level\":\"", 9);
		put(l, level_names[level], strlen(level_names[level]));
		put(l, "\",\"event\":\"", 11);
		put_escaped(l, event, strlen(event));
		putc_(l, '"');
	} else {
		if (!journald) {
			put(l, "time=", 5);
			put(l, ts, strlen(ts));
			putc_(l, ' ');
		}
		put(l, "level=", 6);
		put(l, level_names[level], strlen(level_names[level]));
		put(l, " event=", 7);
		put(l, event, strlen(event));
	}
	return l;
}

void log_strn(struct log_line *l, const char *key, const char *value, size_t n)
{
	log_excerpt(l, key, value, n, VALUE_MAX_BYTES);
}

void log_excerpt(struct log_line *l, const char *key, const char *value, size_t n, size_t max)
{
	size_t avail = n;

	if (l == NULL)
		return;
	put_key(l, key);
	if (value == NULL) {
		put(l, format == LOG_FORMAT_JSON ? "null" : "\"\"",
		    format == LOG_FORMAT_JSON ? 4 : 2);
		return;
	}
	bool cut = n > max;

	if (max > VALUE_MAX_BYTES)
		max = VALUE_MAX_BYTES;
	cut = n > max;
	if (cut) {
		n = max;
		/* Do not split a UTF-8 sequence: back up to a lead byte. */
		while (n > 0 && ((unsigned char)value[n] & 0xC0) == 0x80)
			n--;
	}
	if (format == LOG_FORMAT_JSON || cut || logfmt_needs_quotes(value, n)) {
		putc_(l, '"');
		put_escaped_cut(l, value, n, avail);
		if (cut)
			put(l, "\xe2\x80\xa6", 3);
		putc_(l, '"');
	} else {
		put_escaped_cut(l, value, n, avail);
	}
}

void log_str(struct log_line *l, const char *key, const char *value)
{
	log_strn(l, key, value, value ? strlen(value) : 0);
}

void log_int(struct log_line *l, const char *key, long long value)
{
	char num[24];
	int n;

	if (l == NULL)
		return;
	n = snprintf(num, sizeof(num), "%lld", value);
	put_key(l, key);
	put(l, num, (size_t)n);
}

void log_num(struct log_line *l, const char *key, const char *digits)
{
	size_t n, i = 0;

	if (l == NULL)
		return;
	n = digits ? strlen(digits) : 0;
	if (n > 0 && digits[0] == '-')
		i = 1;
	if (n == i || n > 40)
		goto text;
	for (; i < n; i++)
		if (digits[i] < '0' || digits[i] > '9')
			goto text;
	put_key(l, key); /* an integer as PostgreSQL printed it: exact, even past 2^53 */
	put(l, digits, n);
	return;
text:
	log_str(l, key, digits);
}

void log_int_list(struct log_line *l, const char *key, const long long *values, size_t n)
{
	char num[24];

	if (l == NULL)
		return;
	put_key(l, key);
	if (format == LOG_FORMAT_JSON)
		putc_(l, '[');
	else if (n == 0)
		put(l, "\"\"", 2);
	for (size_t i = 0; i < n; i++) {
		int k = snprintf(num, sizeof(num), "%s%lld", i ? "," : "", values[i]);
		put(l, num, (size_t)k);
	}
	if (format == LOG_FORMAT_JSON)
		putc_(l, ']');
}

/* Replaces every registered secret in the line by "***". */
static void redact(struct log_line *l)
{
	for (int i = 0; i < MAX_SECRETS && secrets[i] != NULL; i++) {
		size_t slen = strlen(secrets[i]);
		char *p = l->buf;

		l->buf[l->len] = '\0';
		while ((p = memmem(p, l->len - (size_t)(p - l->buf), secrets[i], slen)) != NULL) {
			/* in place, inside the line: NOLINTNEXTLINE(bugprone-not-null-terminated-result) */
			memcpy(p, "***", 3);
			memmove(p + 3, p + slen, l->len - (size_t)(p - l->buf) - slen + 1);
			l->len -= slen - 3;
			p += 3;
		}
	}
}

void log_end(struct log_line *l)
{
	int saved = errno;

	if (l == NULL)
		return;
	redact(l);
	/* put() always leaves TAIL_RESERVE bytes for this tail. */
	if (l->truncated) {
		const char *t = format == LOG_FORMAT_JSON ? ",\"truncated\":true"
							  : " truncated=true";
		memcpy(l->buf + l->len, t, strlen(t));
		l->len += strlen(t);
	}
	if (format == LOG_FORMAT_JSON)
		l->buf[l->len++] = '}';
	l->buf[l->len++] = '\n';
	log_sink_write(l->buf, l->len);
	errno = saved;
}

/* Called by the sink once stderr takes lines again: says how many were
 * dropped meanwhile, at warn, whatever the threshold. */
void log_note_dropped(unsigned long long n)
{
	static struct log_line note;

	start_line(&note, LOG_WARN, "log_lines_dropped");
	log_int(&note, "lines", (long long)n);
	log_str(&note, "msg",
		n == 1 ? "stderr was not read: 1 log line was dropped"
		       : "stderr was not read: log lines were dropped");
	log_end(&note);
}

void log_msg(enum log_level level, const char *event, const char *fmt, ...)
{
	struct log_line *l;
	char msg[2048];
	va_list ap;
	int saved = errno;

	if (!log_enabled(level))
		return;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	l = log_begin(level, event);
	log_str(l, "msg", msg);
	log_end(l);
	errno = saved;
}
