/* jsonscan — strict, bounded reading of the string members of a JSON
 * object from its raw bytes. It exists because cJSON decodes strings
 * leniently: Debian's cJSON 1.7.15 reads "job\uX000" as "job" and
 * "abc\u0000def" as "abc", so a value taken from cJSON cannot be trusted to
 * be the text the peer sent. cJSON still parses the structure; this module
 * only re-reads the strings. Pure: no allocation, no I/O.
 * Knows nothing of RunPod, the loop or the log.
 * Source: RFC 8259 §7 (strings), RFC 3629 §4 (UTF-8 syntax). */
#ifndef PGMQD_JSONSCAN_H
#define PGMQD_JSONSCAN_H

#include <stdbool.h>
#include <stddef.h>

enum jsonscan_state {
	JSONSCAN_ABSENT,     /* no such member at the top level */
	JSONSCAN_NOT_STRING, /* the member's value is not a string */
	JSONSCAN_OK,         /* decoded into buf */
	JSONSCAN_INVALID,    /* a string, but unusable; why says how */
};

/* One top-level member to read. The caller sets key, buf, cap (bytes of
 * buf with the NUL, >= 1), and the two flags; the scan sets the rest. */
struct jsonscan_member {
	const char *key;
	char *buf;
	size_t cap;
	bool cut_ok;       /* a longer value is cut at a UTF-8 boundary instead of INVALID */
	bool allow_layout; /* \n, \r and \t are allowed (a traceback), other controls are not */
	enum jsonscan_state state;
	bool cut;        /* the value was longer than cap - 1 bytes and was cut */
	const char *why; /* static text when INVALID: "invalid \\u escape", ... */
};

/* Reads body[0..len) as a JSON object and decodes the first occurrence of
 * each wanted top-level member whose value is a string. A decoded value is
 * INVALID when it holds a control character (U+0000–U+001F, U+007F–U+009F),
 * or is longer than cap - 1 bytes (unless cut_ok), or the key appears twice.
 * Every string token in the body (keys and nested values too) must be
 * well-formed: valid UTF-8, no raw control bytes, only the escapes of
 * RFC 8259 with four hex digits and paired surrogates.
 * Returns 0, or -1 with *why (static text) when the body is not such an
 * object. Nesting deeper than 64 levels is refused. */
int jsonscan_members(const char *body, size_t len, struct jsonscan_member *members, size_t n,
		     const char **why);

#endif
