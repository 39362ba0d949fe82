/* jobtable — the bounded index behind the tracker: a hash map by job id, a
 * list in insertion order (oldest first, for eviction) and three binary
 * min-heaps keyed by a time in seconds (JT_POLL: the next /status,
 * JT_DB: the next database action, JT_QUEUED: when a job still IN_QUEUE
 * was accepted, so the oldest waiting job is the first). O(1) find,
 * O(log n) schedule/remove.
 *
 * Owns the map's buckets, the heaps' arrays and the links inside each
 * struct jt_node. The nodes themselves are the caller's: it embeds one in
 * each record, allocates and frees the record, and removes it from the
 * table first.
 * Bounded: at most `limit` nodes; jobtable_insert() refuses past it (the
 * caller evicts the oldest first). Room in every heap is reserved on
 * insert, so scheduling never allocates and never fails.
 * Knows nothing of RunPod, HTTP, PostgreSQL, the event loop, logging,
 * metrics or what a job carries. Pure: no I/O. */
#ifndef PGMQD_JOBTABLE_H
#define PGMQD_JOBTABLE_H

#include <stdbool.h>
#include <stddef.h>

enum jt_heap { JT_POLL, JT_DB, JT_QUEUED, JT_NHEAPS };

/* Embedded in the caller's record. The caller sets id (NUL-terminated,
 * valid and unchanged while the node is in a table); the rest is the
 * table's. */
struct jt_node {
	const char *id;
	double key[JT_NHEAPS];         /* heap keys, seconds */
	int idx[JT_NHEAPS];            /* heap positions, -1 when not in that heap */
	struct jt_node *hnext;         /* hash chain */
	struct jt_node *older, *newer; /* insertion order */
};

struct jt_heap_array {
	struct jt_node **v;
	int n, cap;
};

struct jobtable {
	struct jt_node **buckets;
	size_t nbuckets; /* a power of two */
	struct jt_node *oldest, *newest;
	int count, limit;
	struct jt_heap_array heaps[JT_NHEAPS];
};

/* Sets up an empty table holding at most limit nodes. Returns 0, or -1
 * when out of memory (nothing to free then). */
int jobtable_init(struct jobtable *t, int limit);

/* Frees the table's own memory; nodes still inside are left alone (remove
 * or free them first). NULL-safe. */
void jobtable_free(struct jobtable *t);

/* A new bound for later inserts; nodes already in stay (the caller evicts
 * while jobtable_count() > limit). */
void jobtable_set_limit(struct jobtable *t, int limit);

int jobtable_count(const struct jobtable *t);

/* True when jobtable_insert() would refuse for want of room. */
bool jobtable_full(const struct jobtable *t);

/* The node with this id, or NULL. */
struct jt_node *jobtable_find(const struct jobtable *t, const char *id);

/* The node inserted longest ago, or NULL when empty. */
struct jt_node *jobtable_oldest(const struct jobtable *t);

/* Adds n (in no heap yet) as the newest. Returns 0, or -1 when the table
 * is full, the id is there already, or out of memory; the table is then
 * unchanged. */
int jobtable_insert(struct jobtable *t, struct jt_node *n);

/* Takes n out of the map, the order list and every heap. */
void jobtable_remove(struct jobtable *t, struct jt_node *n);

/* Puts n in heap h with key at (seconds), moving it when it is in already. */
void jobtable_schedule(struct jobtable *t, enum jt_heap h, struct jt_node *n, double at);

/* Takes n out of heap h; nothing when it is not in. */
void jobtable_unschedule(struct jobtable *t, enum jt_heap h, struct jt_node *n);

/* The node of heap h with the smallest key, or NULL when h is empty. */
struct jt_node *jobtable_first(const struct jobtable *t, enum jt_heap h);

#endif
