/* jobtable — see include/jobtable.h. */
#include "jobtable.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define FIRST_BUCKETS 64
#define FIRST_HEAP_CAP 64

/* ---- heaps ---- */

static void hset(struct jt_heap_array *a, enum jt_heap h, int i, struct jt_node *n)
{
	a->v[i] = n;
	n->idx[h] = i;
}

static void sift_up(struct jt_heap_array *a, enum jt_heap h, int i)
{
	struct jt_node *n = a->v[i];

	while (i > 0) {
		int parent = (i - 1) / 2;
		if (a->v[parent]->key[h] <= n->key[h])
			break;
		hset(a, h, i, a->v[parent]);
		i = parent;
	}
	hset(a, h, i, n);
}

static void sift_down(struct jt_heap_array *a, enum jt_heap h, int i)
{
	struct jt_node *n = a->v[i];

	for (;;) {
		int c = 2 * i + 1;
		if (c >= a->n)
			break;
		if (c + 1 < a->n && a->v[c + 1]->key[h] < a->v[c]->key[h])
			c++;
		if (n->key[h] <= a->v[c]->key[h])
			break;
		hset(a, h, i, a->v[c]);
		i = c;
	}
	hset(a, h, i, n);
}

/* Room for n entries, so that pushes never fail later. */
static int heap_reserve(struct jt_heap_array *a, int n)
{
	struct jt_node **v;
	int cap = a->cap ? a->cap : FIRST_HEAP_CAP;

	if (n <= a->cap)
		return 0;
	while (cap < n)
		cap *= 2;
	v = realloc(a->v, (size_t)cap * sizeof(struct jt_node *));
	if (v == NULL)
		return -1;
	a->v = v;
	a->cap = cap;
	return 0;
}

void jobtable_unschedule(struct jobtable *t, enum jt_heap h, struct jt_node *n)
{
	struct jt_heap_array *a = &t->heaps[h];
	int i = n->idx[h];
	struct jt_node *last;

	if (i < 0)
		return;
	n->idx[h] = -1;
	a->n--;
	if (i == a->n)
		return;
	last = a->v[a->n];
	hset(a, h, i, last);
	sift_up(a, h, i);
	if (last->idx[h] == i)
		sift_down(a, h, i);
}

void jobtable_schedule(struct jobtable *t, enum jt_heap h, struct jt_node *n, double at)
{
	struct jt_heap_array *a = &t->heaps[h];

	jobtable_unschedule(t, h, n);
	n->key[h] = at;
	/* insert reserved room for every node in the table */
	a->n++;
	hset(a, h, a->n - 1, n);
	sift_up(a, h, a->n - 1);
}

struct jt_node *jobtable_first(const struct jobtable *t, enum jt_heap h)
{
	return t->heaps[h].n > 0 ? t->heaps[h].v[0] : NULL;
}

/* ---- the map and the order list ---- */

static uint64_t hash(const char *s)
{
	uint64_t h = 1469598103934665603ULL; /* FNV-1a */

	for (; *s; s++)
		h = (h ^ (unsigned char)*s) * 1099511628211ULL;
	return h;
}

/* Doubles the buckets when the map is full; keeps the old ones when out of
 * memory (chains just get longer). */
static void map_grow(struct jobtable *t)
{
	size_t nb = t->nbuckets * 2;
	struct jt_node **b;

	if ((size_t)t->count < t->nbuckets || (b = calloc(nb, sizeof(struct jt_node *))) == NULL)
		return;
	for (size_t i = 0; i < t->nbuckets; i++) {
		struct jt_node *n = t->buckets[i], *next;
		for (; n; n = next) {
			size_t k = hash(n->id) & (nb - 1);
			next = n->hnext;
			n->hnext = b[k];
			b[k] = n;
		}
	}
	free(t->buckets);
	t->buckets = b;
	t->nbuckets = nb;
}

int jobtable_init(struct jobtable *t, int limit)
{
	memset(t, 0, sizeof(*t));
	t->buckets = calloc(FIRST_BUCKETS, sizeof(struct jt_node *));
	if (t->buckets == NULL)
		return -1;
	t->nbuckets = FIRST_BUCKETS;
	t->limit = limit;
	return 0;
}

void jobtable_free(struct jobtable *t)
{
	if (t == NULL)
		return;
	for (int h = 0; h < JT_NHEAPS; h++)
		free(t->heaps[h].v);
	free(t->buckets);
	memset(t, 0, sizeof(*t));
}

void jobtable_set_limit(struct jobtable *t, int limit)
{
	t->limit = limit;
}

int jobtable_count(const struct jobtable *t)
{
	return t->count;
}

bool jobtable_full(const struct jobtable *t)
{
	return t->count >= t->limit;
}

struct jt_node *jobtable_find(const struct jobtable *t, const char *id)
{
	struct jt_node *n = t->buckets[hash(id) & (t->nbuckets - 1)];

	while (n && strcmp(n->id, id) != 0)
		n = n->hnext;
	return n;
}

struct jt_node *jobtable_oldest(const struct jobtable *t)
{
	return t->oldest;
}

int jobtable_insert(struct jobtable *t, struct jt_node *n)
{
	size_t k;

	if (jobtable_full(t) || jobtable_find(t, n->id) != NULL)
		return -1;
	for (int h = 0; h < JT_NHEAPS; h++)
		if (heap_reserve(&t->heaps[h], t->count + 1) != 0)
			return -1;
	for (int h = 0; h < JT_NHEAPS; h++) {
		n->idx[h] = -1;
		n->key[h] = 0.0;
	}
	k = hash(n->id) & (t->nbuckets - 1);
	n->hnext = t->buckets[k];
	t->buckets[k] = n;
	n->newer = NULL;
	n->older = t->newest;
	if (t->newest)
		t->newest->newer = n;
	else
		t->oldest = n;
	t->newest = n;
	t->count++;
	map_grow(t);
	return 0;
}

void jobtable_remove(struct jobtable *t, struct jt_node *n)
{
	struct jt_node **p = &t->buckets[hash(n->id) & (t->nbuckets - 1)];

	while (*p && *p != n)
		p = &(*p)->hnext;
	if (*p == NULL)
		return; /* not in this table */
	*p = n->hnext;
	n->hnext = NULL;
	for (int h = 0; h < JT_NHEAPS; h++)
		jobtable_unschedule(t, h, n);
	if (n->older)
		n->older->newer = n->newer;
	else
		t->oldest = n->newer;
	if (n->newer)
		n->newer->older = n->older;
	else
		t->newest = n->older;
	n->older = n->newer = NULL;
	t->count--;
}
