/* jsonscan — see include/jsonscan.h. */
#include "jsonscan.h"

#include <string.h>

#define MAX_DEPTH 64

struct scan {
	const unsigned char *p, *end;
	const char *why;
};

/* Where one decoded string goes; NULL sink: validate only. */
struct sink {
	struct jsonscan_member *m;
	size_t len;
	bool full;
};

static int fail(struct scan *s, const char *why)
{
	if (s->why == NULL)
		s->why = why;
	return -1;
}

static void skip_ws(struct scan *s)
{
	while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r'))
		s->p++;
}

/* One code point of raw UTF-8 (RFC 3629 §4: no overlong forms, no
 * surrogates, nothing above U+10FFFF); -1 when malformed. */
static long utf8_next(struct scan *s)
{
	unsigned char c = *s->p;
	int n;
	long cp, min;

	if (c < 0x80) {
		s->p++;
		return c;
	}
	if (c >= 0xC2 && c <= 0xDF) {
		n = 1, cp = c & 0x1F, min = 0x80;
	} else if (c >= 0xE0 && c <= 0xEF) {
		n = 2, cp = c & 0x0F, min = 0x800;
	} else if (c >= 0xF0 && c <= 0xF4) {
		n = 3, cp = c & 0x07, min = 0x10000;
	} else {
		return -1;
	}
	if (s->end - s->p <= n)
		return -1;
	for (int i = 1; i <= n; i++) {
		if ((s->p[i] & 0xC0) != 0x80)
			return -1;
		cp = (cp << 6) | (s->p[i] & 0x3F);
	}
	if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
		return -1;
	s->p += n + 1;
	return cp;
}

static long hex4(struct scan *s)
{
	long v = 0;

	if (s->end - s->p < 4)
		return -1;
	for (int i = 0; i < 4; i++) {
		unsigned char c = s->p[i];
		int d = c >= '0' && c <= '9'   ? c - '0'
			: c >= 'a' && c <= 'f' ? c - 'a' + 10
			: c >= 'A' && c <= 'F' ? c - 'A' + 10
					       : -1;
		if (d < 0)
			return -1;
		v = v * 16 + d;
	}
	s->p += 4;
	return v;
}

/* After a backslash: the code point an escape stands for, or -1. */
static long escape(struct scan *s)
{
	long hi, lo;

	if (s->p >= s->end)
		return -1;
	switch (*s->p++) {
	case '"':
		return '"';
	case '\\':
		return '\\';
	case '/':
		return '/';
	case 'b':
		return '\b';
	case 'f':
		return '\f';
	case 'n':
		return '\n';
	case 'r':
		return '\r';
	case 't':
		return '\t';
	case 'u':
		break;
	default:
		return -1;
	}
	hi = hex4(s);
	if (hi < 0 || (hi >= 0xDC00 && hi <= 0xDFFF))
		return -1;
	if (hi < 0xD800 || hi > 0xDBFF)
		return hi;
	if (s->end - s->p < 2 || s->p[0] != '\\' || s->p[1] != 'u')
		return -1;
	s->p += 2;
	lo = hex4(s);
	if (lo < 0xDC00 || lo > 0xDFFF)
		return -1;
	return 0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00);
}

static bool is_control(long cp, bool allow_layout)
{
	if (allow_layout && (cp == '\n' || cp == '\r' || cp == '\t'))
		return false;
	return cp < 0x20 || (cp >= 0x7F && cp <= 0x9F);
}

static void put(struct sink *k, long cp)
{
	struct jsonscan_member *m = k->m;
	unsigned char u[4];
	size_t n;

	if (is_control(cp, m->allow_layout) && m->why == NULL)
		m->why = "control character";
	if (k->full)
		return;
	if (cp < 0x80) {
		u[0] = (unsigned char)cp, n = 1;
	} else if (cp < 0x800) {
		u[0] = (unsigned char)(0xC0 | cp >> 6), n = 2;
	} else if (cp < 0x10000) {
		u[0] = (unsigned char)(0xE0 | cp >> 12), n = 3;
	} else {
		u[0] = (unsigned char)(0xF0 | cp >> 18), n = 4;
	}
	for (size_t i = 1; i < n; i++)
		u[i] = (unsigned char)(0x80 | ((cp >> (6 * (n - 1 - i))) & 0x3F));
	if (k->len + n > m->cap - 1) {
		k->full = true;
		m->cut = true;
		if (!m->cut_ok && m->why == NULL)
			m->why = "longer than its limit";
		return;
	}
	memcpy(m->buf + k->len, u, n);
	k->len += n;
}

/* A string token at s->p (its opening quote), decoded into k when given. */
static int string_token(struct scan *s, struct sink *k)
{
	if (s->p >= s->end || *s->p != '"')
		return fail(s, "expected a string");
	s->p++;
	for (;;) {
		long cp;

		if (s->p >= s->end)
			return fail(s, "unterminated string");
		if (*s->p == '"') {
			s->p++;
			break;
		}
		if (*s->p < 0x20)
			return fail(s, "raw control byte in a string");
		if (*s->p == '\\') {
			s->p++;
			cp = escape(s);
			if (cp < 0)
				return fail(s, "invalid escape in a string");
		} else {
			cp = utf8_next(s);
			if (cp < 0)
				return fail(s, "invalid UTF-8 in a string");
		}
		if (k)
			put(k, cp);
	}
	if (k)
		k->m->buf[k->len] = '\0';
	return 0;
}

static int value(struct scan *s, int depth);

/* An object or array after its opening bracket. */
/* Recursion bounded by MAX_DEPTH (checked in value()). NOLINTNEXTLINE(misc-no-recursion) */
static int container(struct scan *s, int depth, unsigned char close, bool keys)
{
	skip_ws(s);
	if (s->p < s->end && *s->p == close) {
		s->p++;
		return 0;
	}
	for (;;) {
		skip_ws(s);
		if (keys) {
			if (string_token(s, NULL) != 0)
				return -1;
			skip_ws(s);
			if (s->p >= s->end || *s->p++ != ':')
				return fail(s, "expected ':'");
		}
		if (value(s, depth + 1) != 0)
			return -1;
		skip_ws(s);
		if (s->p < s->end && *s->p == ',') {
			s->p++;
			continue;
		}
		if (s->p < s->end && *s->p == close) {
			s->p++;
			return 0;
		}
		return fail(s, "expected ',' or a closing bracket");
	}
}

/* Recursion bounded by MAX_DEPTH. NOLINTNEXTLINE(misc-no-recursion) */
static int value(struct scan *s, int depth)
{
	const unsigned char *start;

	if (depth > MAX_DEPTH)
		return fail(s, "nested too deeply");
	skip_ws(s);
	if (s->p >= s->end)
		return fail(s, "expected a value");
	if (*s->p == '"')
		return string_token(s, NULL);
	if (*s->p == '{' || *s->p == '[') {
		unsigned char open = *s->p++;
		return container(s, depth, open == '{' ? '}' : ']', open == '{');
	}
	/* Numbers and literals: their syntax is cJSON's business. */
	start = s->p;
	while (s->p < s->end &&
	       (strchr("+-.eE", *s->p) || (*s->p >= '0' && *s->p <= '9') ||
		(*s->p >= 'a' && *s->p <= 'z')) &&
	       *s->p != '\0')
		s->p++;
	return s->p > start ? 0 : fail(s, "expected a value");
}

static struct jsonscan_member *wanted(struct jsonscan_member *members, size_t n, const char *key)
{
	for (size_t i = 0; i < n; i++)
		if (strcmp(members[i].key, key) == 0)
			return &members[i];
	return NULL;
}

int jsonscan_members(const char *body, size_t len, struct jsonscan_member *members, size_t n,
		     const char **why)
{
	struct scan s = { (const unsigned char *)body, NULL, NULL };
	bool seen[16] = { false };
	int rc = -1;

	for (size_t i = 0; i < n; i++) {
		members[i].state = JSONSCAN_ABSENT;
		members[i].cut = false;
		members[i].why = NULL;
		members[i].buf[0] = '\0';
	}
	if (body == NULL || n > sizeof(seen) / sizeof(seen[0])) {
		fail(&s, "no body");
		goto out;
	}
	s.end = s.p + len;
	skip_ws(&s);
	if (s.p >= s.end || *s.p++ != '{') {
		fail(&s, "not a JSON object");
		goto out;
	}
	skip_ws(&s);
	if (s.p < s.end && *s.p == '}') {
		s.p++;
	} else {
		for (;;) {
			char keybuf[64];
			struct jsonscan_member key = { .key = "",
						       .buf = keybuf,
						       .cap = sizeof(keybuf),
						       .cut_ok = true,
						       .allow_layout = true };
			struct sink kk = { &key, 0, false };
			struct jsonscan_member *m;

			skip_ws(&s);
			if (string_token(&s, &kk) != 0)
				goto out;
			skip_ws(&s);
			if (s.p >= s.end || *s.p++ != ':') {
				fail(&s, "expected ':'");
				goto out;
			}
			skip_ws(&s);
			m = key.cut || memchr(keybuf, '\0', kk.len) ? NULL
								    : wanted(members, n, keybuf);
			if (m != NULL && seen[m - members]) {
				m->state = JSONSCAN_INVALID;
				m->why = "appears twice";
				m->buf[0] = '\0';
				m = NULL;
			} else if (m != NULL) {
				seen[m - members] = true;
			}
			if (m != NULL && s.p < s.end && *s.p == '"') {
				struct sink k = { m, 0, false };

				if (string_token(&s, &k) != 0)
					goto out;
				m->state = m->why ? JSONSCAN_INVALID : JSONSCAN_OK;
				if (m->why)
					m->buf[0] = '\0';
			} else {
				if (m != NULL)
					m->state = JSONSCAN_NOT_STRING;
				if (value(&s, 1) != 0)
					goto out;
			}
			skip_ws(&s);
			if (s.p < s.end && *s.p == ',') {
				s.p++;
				continue;
			}
			if (s.p < s.end && *s.p == '}') {
				s.p++;
				break;
			}
			fail(&s, "expected ',' or '}'");
			goto out;
		}
	}
	skip_ws(&s);
	if (s.p != s.end) {
		fail(&s, "bytes after the object");
		goto out;
	}
	rc = 0;
out:
	if (rc != 0) {
		for (size_t i = 0; i < n; i++) {
			members[i].state = JSONSCAN_ABSENT;
			members[i].buf[0] = '\0';
		}
		if (why)
			*why = s.why;
	}
	return rc;
}
