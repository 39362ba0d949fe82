/* metrics_int — what metrics.c and metrics_route.c share: the counter
 * type, the growing text buffer of a scrape and the family header. Private
 * to metrics.c, metrics_route.c and metrics_fleet.c. */
#ifndef PGMQD_METRICS_INT_H
#define PGMQD_METRICS_INT_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define PREFIX "pgmqd_"

typedef atomic_uint_least64_t counter_t;

/* The text of one scrape; failed once an allocation failed. */
struct buf {
	char *p;
	size_t len, cap;
	bool failed;
};

void metrics_add_counter(counter_t *c, uint64_t n);
uint64_t metrics_get_counter(counter_t *c);
/* Appends printf output, growing the buffer. */
void bprintf(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* One line per label value: name{label="values[i]"} c[i]. */
void metrics_labelled(struct buf *b, const char *name, const char *label, const char *const *values,
		      counter_t *c, size_t n);
/* # HELP and # TYPE lines of a family. */
void metrics_family(struct buf *b, const char *name, const char *type, const char *help);

/* metrics_route.c: the sums of the routes' gauges (the circuit: open when
 * any is); false when no route is registered. */
bool metrics_route_gauges(long *in_flight, int *circuit_open, long long *queue_length);
/* The pgmqd_route_* families. */
void metrics_render_routes(struct buf *b);
/* metrics_fleet.c: the pgmqd_fleet_* families. */
void metrics_render_fleet(struct buf *b);

#endif
