/* config_check — judges one configuration value; pure except check_ca_file.
 *
 * Owns the rules a value must meet: libpq conninfo, pgmq queue name, SQL
 * function name, endpoint id, API key, URLs (http:// only to loopback),
 * listen address, CA file; strict integers, the example file's placeholders
 * and the edit distance behind "did you mean". Each check returns NULL or a
 * short problem that never quotes the value (secrets stay unprinted).
 * Knows nothing of keys, sources or struct config. */
#ifndef PGMQD_CONFIG_CHECK_H
#define PGMQD_CONFIG_CHECK_H

#include <stdbool.h>

const char *check_conninfo(const char *v);
const char *check_queue_name(const char *v);
const char *check_function(const char *v);
/* A plain lower-case SQL identifier (ledger.schema): put into SQL unquoted. */
const char *check_schema(const char *v);
const char *check_endpoint_id(const char *v);
const char *check_api_key(const char *v);
const char *check_base_url(const char *v);
const char *check_listen(const char *v);
const char *check_webhook(const char *v);
/* Touches the file system: stat(2) and fopen(3) of the path. */
/* admin.token: printable ASCII without spaces, at most 255 bytes. */
const char *check_token(const char *v);
const char *check_ca_file(const char *v);

/* True when the authority of an http:// URL names the loopback interface. */
bool url_host_is_loopback(const char *v);

/* Strict decimal integer: optional '-', digits, nothing else. */
bool config_parse_int(const char *s, long *out);

/* True for the example file's stand-ins ("your-...", "<...>", "changeme"). */
bool config_is_placeholder(const char *v);

/* Case-insensitive edit distance of two strings, 99 when either is longer
 * than 64 bytes. */
/* True when v holds an example's unfilled part ("<password>", "your-ref")
 * somewhere inside it, as in a pasted DATABASE_URL. */
bool config_has_placeholder_part(const char *v);

int config_distance(const char *a, const char *b);

#endif
