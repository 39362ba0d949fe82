/* Unit tests for the fleet budget's pure arithmetic (include/budget.h):
 * the grant size, what a replica asks for, a grant's validity, the
 * fallback share and its two timing rules (wait one counted span, keep to
 * the share for one more after), and a simulation of replicas taking grants from a model
 * of budget_take and spending them late, checked against a sliding window
 * at the server the way RunPod and the emulator count. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "budget.h"
#include "ratelimit.h"

static void grant_size(void **state)
{
	(void)state;
	/* free, want, grant_max, active → slots */
	assert_int_equal(budget_grant_size(100, 5, 20, 1), 5);   /* what it asks for */
	assert_int_equal(budget_grant_size(100, 50, 20, 1), 20); /* at most grant_max */
	assert_int_equal(budget_grant_size(3, 50, 20, 1), 3);    /* at most what is free */
	assert_int_equal(budget_grant_size(3, 50, 20, 2), 2);    /* its share, rounded up */
	assert_int_equal(budget_grant_size(10, 50, 20, 3), 4);
	assert_int_equal(budget_grant_size(1, 50, 20, 8), 1); /* at least 1 while any is free */
	assert_int_equal(budget_grant_size(0, 5, 20, 1), 0);
	assert_int_equal(budget_grant_size(-4, 5, 20, 1), 0); /* over the cap (cap lowered) */
	assert_int_equal(budget_grant_size(10, 0, 20, 1), 0);
	assert_int_equal(budget_grant_size(10, 5, 20, 0), 5); /* active counts the caller */
}

static void want_and_count(void **state)
{
	(void)state;
	assert_int_equal(budget_want(3, 20), 3);
	assert_int_equal(budget_want(0, 20), 1);
	assert_int_equal(budget_want(300, 20), 20);
	assert_int_equal(budget_want(5, 0), 1);
	assert_true(fabs(budget_count_s(10.0, 0.05, 0.25) - 10.3) < 1e-9);
}

static void grant_validity(void **state)
{
	struct budget_grant g = { .slots = 2, .expires_at = 5.0 };
	long long unused = 0;

	(void)state;
	assert_true(budget_grant_take(&g, 4.0, &unused));
	assert_int_equal(g.slots, 1);
	assert_false(budget_grant_take(&g, 5.0, &unused)); /* expired: dropped */
	assert_int_equal(g.slots, 0);
	assert_int_equal(unused, 1);
	assert_false(budget_grant_take(&g, 4.0, &unused)); /* empty */
	assert_int_equal(unused, 1);
}

static void fallback_share(void **state)
{
	(void)state;
	assert_int_equal(budget_fallback_cap(1000, 0), 0); /* send nothing */
	assert_int_equal(budget_fallback_cap(1000, 3), 333);
	assert_int_equal(budget_fallback_cap(2, 3), 1);
	assert_int_equal(budget_fallback_cap(1000, 1), 1000);
}

/* ---- the local share's decisions ---- */

#define SPAN_S 10.3 /* budget_count_s(10, 0.05, 0.25) */
#define EPS_S 1e-6

/* Fallback waits until the grants made before the database stopped
 * answering have left the counted span, whatever this replica sent: its
 * own ring may be empty while the others' grants still count. */
static void fallback_waits_one_span_after_the_last_answer(void **state)
{
	struct budget_share s;
	double wait_s = 0;

	(void)state;
	assert_int_equal(budget_share_init(&s, 3, SPAN_S, 100.0), 0);
	assert_false(budget_share_allows(&s, 100.5, &wait_s)); /* not in fallback */
	s.fallback = true;
	/* Started at 100 without a grant: one span from the start. */
	assert_false(budget_share_allows(&s, 101.0, &wait_s));
	assert_true(fabs(wait_s - 9.3) < 1e-9);
	assert_false(budget_share_allows(&s, 100.0 + SPAN_S - 0.001, &wait_s));
	assert_true(wait_s > 0 && wait_s <= 0.001 + EPS_S);
	assert_true(budget_share_allows(&s, 100.0 + SPAN_S + EPS_S, &wait_s));

	/* A statement answered at 105 (a grant), the database gone at 106:
	 * one span from 105, not from 100 or 106. */
	budget_share_answered(&s, 105.0);
	assert_true(s.fallback); /* the caller leaves it */
	s.fallback = true;
	assert_false(budget_share_allows(&s, 106.0, &wait_s));
	assert_true(fabs(wait_s - 9.3) < 1e-9);
	assert_false(budget_share_allows(&s, 105.0 + SPAN_S - 0.001, &wait_s));
	assert_true(budget_share_allows(&s, 105.0 + SPAN_S + EPS_S, &wait_s));

	/* Then at most cap per span: the ring holds the sends. */
	for (int i = 0; i < 3; i++)
		ratelimit_record(&s.rl, 116.0 + i * 0.1);
	assert_false(budget_share_allows(&s, 116.5, &wait_s));
	assert_true(fabs(wait_s - (116.0 + SPAN_S - 116.5)) < 1e-9);
	assert_true(budget_share_allows(&s, 116.0 + SPAN_S + EPS_S, &wait_s));
	ratelimit_free(&s.rl);
}

static void fallback_with_no_share_sends_nothing(void **state)
{
	struct budget_share s;
	double wait_s = 0;

	(void)state;
	assert_int_equal(budget_share_init(&s, 0, SPAN_S, 0.0), 0);
	s.fallback = true;
	assert_false(budget_share_allows(&s, 1000.0, &wait_s));
	assert_true(wait_s > 0);
	ratelimit_free(&s.rl);
}

/* Leaving a fallback: for one span after the first answer a granted slot
 * goes only when the share allows it too (other replicas may still be
 * sending at their share, not yet reported); after that span, or when no
 * fallback preceded the answer, a grant is enough. */
static void leaving_a_fallback_keeps_to_the_share_for_one_span(void **state)
{
	struct budget_share s;
	double wait_s = 0;

	(void)state;
	assert_int_equal(budget_share_init(&s, 3, SPAN_S, 0.0), 0);
	/* No fallback yet: a full ring does not hold a granted slot back. */
	for (int i = 0; i < 3; i++)
		ratelimit_record(&s.rl, 1.0 + i * 0.1);
	budget_share_answered(&s, 2.0);
	assert_true(budget_share_granted_allows(&s, 2.0, &wait_s));

	/* In fallback from 20: its share spent at 40..40.2, answered at 41. */
	s.fallback = true;
	for (int i = 0; i < 3; i++)
		ratelimit_record(&s.rl, 40.0 + i * 0.1);
	budget_share_answered(&s, 41.0);
	s.fallback = false;
	assert_false(budget_share_granted_allows(&s, 41.0, &wait_s));
	assert_true(fabs(wait_s - (40.0 + SPAN_S - 41.0)) < 1e-9);
	/* A slot of the share frees at 40 + span: one granted send goes. */
	assert_true(budget_share_granted_allows(&s, 40.0 + SPAN_S + EPS_S, &wait_s));
	ratelimit_record(&s.rl, 40.0 + SPAN_S + EPS_S);
	assert_false(budget_share_granted_allows(&s, 40.0 + SPAN_S + 0.05, &wait_s));
	/* One span after the answer the grant alone decides. */
	assert_true(budget_share_granted_allows(&s, 41.0 + SPAN_S + EPS_S, &wait_s));

	/* An answer with no fallback before it starts no transition. */
	budget_share_answered(&s, 60.0);
	for (int i = 0; i < 3; i++)
		ratelimit_record(&s.rl, 60.0 + i * 0.1);
	assert_true(budget_share_granted_allows(&s, 60.5, &wait_s));
	ratelimit_free(&s.rl);
}

/* ---- the simulation ---- */

#define REPLICAS 5
#define CAP 50
#define WINDOW_S 2.0
#define MARGIN_S 0.05
#define VALIDITY_S 0.3
#define STEP_S 0.001
#define MAX_EVENTS 200000

struct db_grant {
	double at;
	int slots, owner;
};

static double lcg_next(unsigned *seed)
{
	*seed = *seed * 1103515245u + 12345u;
	return (double)((*seed >> 8) & 0xffff) / 65536.0;
}

/* The model of budget_take: prune, count, grant. Returns the slots. */
static int model_take(struct db_grant *g, int *n, double now, double count_s, int owner, int want)
{
	int used = 0, others = 0, keep = 0, slots;
	bool seen[REPLICAS] = { false };

	for (int i = 0; i < *n; i++)
		if (g[i].at > now - count_s)
			g[keep++] = g[i];
	*n = keep;
	for (int i = 0; i < *n; i++) {
		used += g[i].slots;
		if (g[i].owner != owner && !seen[g[i].owner]) {
			seen[g[i].owner] = true;
			others++;
		}
	}
	slots = budget_grant_size(CAP - used, want, 20, others + 1);
	if (slots > 0)
		g[(*n)++] = (struct db_grant){ .at = now, .slots = slots, .owner = owner };
	return slots;
}

/* Replicas ask whenever they hold nothing, receive the grant after a
 * database round trip, spend each slot at a random moment up to the end of
 * its validity, and the server receives it up to MARGIN_S later. Returns
 * the most requests the server saw in any window of WINDOW_S; *sent the
 * total. */
static int simulate(double count_s, unsigned seed, int *sent)
{
	static struct db_grant g[4 * CAP];
	static double arrivals[MAX_EVENTS];
	struct budget_grant held[REPLICAS] = { { 0 } };
	double ask_at[REPLICAS];
	int ng = 0, na = 0, best = 0, j = 0;

	for (int r = 0; r < REPLICAS; r++)
		ask_at[r] = lcg_next(&seed) * 0.01;
	for (double now = 0; now < 20.0 && na < MAX_EVENTS - CAP; now += STEP_S) {
		for (int r = 0; r < REPLICAS; r++) {
			long long unused = 0;

			/* Spend with probability: late sends are the point. */
			while (held[r].slots > 0 && lcg_next(&seed) < 0.3 &&
			       budget_grant_take(&held[r], now, &unused))
				arrivals[na++] = now + lcg_next(&seed) * MARGIN_S;
			if (held[r].slots == 0 || now >= held[r].expires_at) {
				held[r].slots = 0;
				if (now >= ask_at[r]) {
					/* Sent at now; granted at the database a
					 * little later; validity from now. */
					double granted = now + lcg_next(&seed) * 0.002;
					int s = model_take(g, &ng, granted, count_s, r, 20);
					held[r] = (struct budget_grant){ s, now + VALIDITY_S };
					ask_at[r] = now + (s ? 0.003 : 0.01);
				}
			}
		}
	}
	/* arrivals are nearly sorted; sort them. */
	for (int i = 1; i < na; i++)
		for (int k = i; k > 0 && arrivals[k - 1] > arrivals[k]; k--) {
			double t = arrivals[k];
			arrivals[k] = arrivals[k - 1];
			arrivals[k - 1] = t;
		}
	for (int i = 0; i < na; i++) {
		while (arrivals[j] <= arrivals[i] - WINDOW_S)
			j++;
		if (i - j + 1 > best)
			best = i - j + 1;
	}
	*sent = na;
	return best;
}

static void fleet_never_exceeds_the_window(void **state)
{
	double count_s = budget_count_s(WINDOW_S, MARGIN_S, VALIDITY_S);

	(void)state;
	for (unsigned seed = 1; seed <= 5; seed++) {
		int sent, most = simulate(count_s, seed, &sent);

		assert_true(most <= CAP);
		/* and the fleet is not starved: over 20 s at most 20 / count_s
		 * spans, each up to CAP; at least half of that is sent. */
		assert_true(sent >= (int)(20.0 / count_s * CAP * 0.5));
	}
}

/* What breaks without the validity in the count: a window over the cap. */
static void counting_the_window_alone_is_not_enough(void **state)
{
	bool over = false;

	(void)state;
	for (unsigned seed = 1; seed <= 5 && !over; seed++) {
		int sent;
		over = simulate(WINDOW_S, seed, &sent) > CAP;
	}
	assert_true(over);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(grant_size),
		cmocka_unit_test(want_and_count),
		cmocka_unit_test(grant_validity),
		cmocka_unit_test(fallback_share),
		cmocka_unit_test(fallback_waits_one_span_after_the_last_answer),
		cmocka_unit_test(fallback_with_no_share_sends_nothing),
		cmocka_unit_test(leaving_a_fallback_keeps_to_the_share_for_one_span),
		cmocka_unit_test(fleet_never_exceeds_the_window),
		cmocka_unit_test(counting_the_window_alone_is_not_enough),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
