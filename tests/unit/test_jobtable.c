/* Unit tests for the tracker's job table: the map by id, the insertion
 * order, the bound, and both heaps checked against a brute-force minimum
 * over random schedule/unschedule/remove sequences. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jobtable.h"

#define N 1000

struct rec {
	struct jt_node node;
	char id[16];
	bool in_table;
	bool in_heap[JT_NHEAPS];
};

static struct rec recs[N];

static void setup_recs(void)
{
	memset(recs, 0, sizeof(recs));
	for (int i = 0; i < N; i++) {
		snprintf(recs[i].id, sizeof(recs[i].id), "job-%d", i);
		recs[i].node.id = recs[i].id;
	}
}

static void map_and_order(void **state)
{
	struct jobtable t;

	(void)state;
	setup_recs();
	assert_int_equal(jobtable_init(&t, N), 0);
	assert_null(jobtable_oldest(&t));
	assert_null(jobtable_find(&t, "job-0"));
	/* Past the first 64 buckets: the map grows and still finds each. */
	for (int i = 0; i < N; i++)
		assert_int_equal(jobtable_insert(&t, &recs[i].node), 0);
	assert_int_equal(jobtable_count(&t), N);
	assert_true(jobtable_full(&t));
	for (int i = 0; i < N; i++)
		assert_ptr_equal(jobtable_find(&t, recs[i].id), &recs[i].node);
	assert_null(jobtable_find(&t, "job-1000"));
	assert_ptr_equal(jobtable_oldest(&t), &recs[0].node);
	/* Removing from the middle and the front keeps the order. */
	jobtable_remove(&t, &recs[5].node);
	jobtable_remove(&t, &recs[0].node);
	assert_null(jobtable_find(&t, "job-5"));
	assert_ptr_equal(jobtable_oldest(&t), &recs[1].node);
	jobtable_remove(&t, &recs[1].node);
	assert_ptr_equal(jobtable_oldest(&t), &recs[2].node);
	assert_int_equal(jobtable_count(&t), N - 3);
	for (int k = 2; k < N; k++) {
		struct jt_node *o = jobtable_oldest(&t);
		if (k == 5)
			continue;
		assert_ptr_equal(o, &recs[k].node);
		jobtable_remove(&t, o);
	}
	assert_int_equal(jobtable_count(&t), 0);
	assert_null(jobtable_oldest(&t));
	jobtable_free(&t);
}

static void bound_and_duplicates(void **state)
{
	struct jobtable t;
	struct rec dup;

	(void)state;
	setup_recs();
	assert_int_equal(jobtable_init(&t, 3), 0);
	for (int i = 0; i < 3; i++)
		assert_int_equal(jobtable_insert(&t, &recs[i].node), 0);
	assert_true(jobtable_full(&t));
	/* Full: refused, table unchanged. */
	assert_int_equal(jobtable_insert(&t, &recs[3].node), -1);
	assert_null(jobtable_find(&t, recs[3].id));
	assert_int_equal(jobtable_count(&t), 3);
	/* A lower limit keeps what is in; a higher one admits more. */
	jobtable_set_limit(&t, 2);
	assert_int_equal(jobtable_count(&t), 3);
	assert_true(jobtable_full(&t));
	jobtable_set_limit(&t, 5);
	assert_false(jobtable_full(&t));
	/* The same id twice: refused. */
	memset(&dup, 0, sizeof(dup));
	snprintf(dup.id, sizeof(dup.id), "job-1");
	dup.node.id = dup.id;
	assert_int_equal(jobtable_insert(&t, &dup.node), -1);
	assert_ptr_equal(jobtable_find(&t, "job-1"), &recs[1].node);
	assert_int_equal(jobtable_insert(&t, &recs[3].node), 0);
	assert_int_equal(jobtable_count(&t), 4);
	jobtable_free(&t);
}

/* The node with the smallest key in heap h, by brute force. */
static struct jt_node *brute_first(enum jt_heap h)
{
	struct jt_node *best = NULL;

	for (int i = 0; i < N; i++)
		if (recs[i].in_table && recs[i].in_heap[h] &&
		    (best == NULL || recs[i].node.key[h] < best->key[h]))
			best = &recs[i].node;
	return best;
}

static void heaps_match_brute_force(void **state)
{
	struct jobtable t;

	(void)state;
	setup_recs();
	srandom(12345);
	assert_int_equal(jobtable_init(&t, N), 0);
	for (int step = 0; step < 20000; step++) {
		struct rec *r = &recs[random() % N];
		enum jt_heap h = (enum jt_heap)(random() % JT_NHEAPS);
		int op = (int)(random() % 10);

		if (!r->in_table) {
			assert_int_equal(jobtable_insert(&t, &r->node), 0);
			r->in_table = true;
		} else if (op < 6) {
			/* distinct keys, so the minimum is unique */
			double at = (double)(random() % 1000000) + (double)(r - recs) / N;
			jobtable_schedule(&t, h, &r->node, at);
			r->in_heap[h] = true;
		} else if (op < 9) {
			jobtable_unschedule(&t, h, &r->node);
			r->in_heap[h] = false;
		} else {
			jobtable_remove(&t, &r->node);
			r->in_table = false;
			for (int k = 0; k < JT_NHEAPS; k++)
				r->in_heap[k] = false;
		}
		for (int k = 0; k < JT_NHEAPS; k++)
			assert_ptr_equal(jobtable_first(&t, (enum jt_heap)k),
					 brute_first((enum jt_heap)k));
	}
	/* Draining a heap yields its keys in order. */
	{
		double last = -1.0;
		struct jt_node *n;
		while ((n = jobtable_first(&t, JT_POLL)) != NULL) {
			assert_true(n->key[JT_POLL] >= last);
			last = n->key[JT_POLL];
			jobtable_unschedule(&t, JT_POLL, n);
		}
	}
	jobtable_free(&t);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(map_and_order),
		cmocka_unit_test(bound_and_duplicates),
		cmocka_unit_test(heaps_match_brute_force),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
