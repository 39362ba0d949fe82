/* Unit tests for the shared database connections (pg_share.c): handles
 * join the pool's connection for their conninfo, leave it on a new
 * conninfo with their unsent queries, and fail their own queries (only
 * theirs) when freed. No connection is ever started: nothing here touches
 * the network. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <string.h>

#include "pg.h"

struct seen {
	int failed;
	int lost;
	int sent;
};

static void on_result(void *arg, PGresult *res, const struct pg_error *err)
{
	struct seen *s = arg;

	assert_null(res);
	assert_non_null(err);
	s->failed++;
	s->lost += err->connection_lost;
	s->sent += err->sent;
}

static void same_conninfo_shares_one_connection(void **state)
{
	struct ev_loop *loop = ev_default_loop(0);
	struct pg_pool *pool = pg_pool_new(loop);
	struct pg *a = pg_new_pooled(loop, pool, "dbname=x", 5000, NULL);
	struct pg *b = pg_new_pooled(loop, pool, "dbname=x", 5000, NULL);
	struct pg *c = pg_new_pooled(loop, pool, "dbname=y", 5000, NULL);
	struct pg *own = pg_new(loop, "dbname=x", 5000, NULL);

	(void)state;
	assert_int_equal(pg_shared_count(a), 2);
	assert_int_equal(pg_shared_count(b), 2);
	assert_int_equal(pg_shared_count(c), 1);
	assert_int_equal(pg_shared_count(own), 1); /* pg_new: a connection of its own */
	assert_true(pg_primary(a));
	assert_false(pg_primary(b));
	pg_free(a);
	assert_int_equal(pg_shared_count(b), 1);
	assert_true(pg_primary(b)); /* it speaks for the connection now */
	pg_free(b);
	pg_free(c);
	pg_free(own);
	pg_pool_free(pool);
}

static void freeing_a_handle_fails_only_its_queries(void **state)
{
	struct ev_loop *loop = ev_default_loop(0);
	struct pg_pool *pool = pg_pool_new(loop);
	struct pg *a = pg_new_pooled(loop, pool, "dbname=x", 5000, NULL);
	struct pg *b = pg_new_pooled(loop, pool, "dbname=x", 5000, NULL);
	struct seen sa = { 0 }, sb = { 0 };

	(void)state;
	assert_int_equal(pg_query(a, "SELECT 1", 0, NULL, on_result, &sa), 0);
	assert_int_equal(pg_query(b, "SELECT 2", 0, NULL, on_result, &sb), 0);
	assert_int_equal(pg_query(a, "SELECT 3", 0, NULL, on_result, &sa), 0);
	pg_free(a);
	assert_int_equal(sa.failed, 2);
	assert_int_equal(sa.lost, 2);
	assert_int_equal(sa.sent, 0); /* never sent: nothing ran */
	assert_int_equal(sb.failed, 0);
	pg_free(b);
	assert_int_equal(sb.failed, 1);
	pg_pool_free(pool);
}

static void each_handle_has_its_own_queue_limit(void **state)
{
	struct ev_loop *loop = ev_default_loop(0);
	struct pg_pool *pool = pg_pool_new(loop);
	struct pg *a = pg_new_pooled(loop, pool, "", 5000, NULL);
	struct pg *b = pg_new_pooled(loop, pool, "", 5000, NULL);
	struct seen s = { 0 };

	(void)state;
	for (int i = 0; i < PG_MAX_QUEUED; i++)
		assert_int_equal(pg_query(a, "SELECT 1", 0, NULL, on_result, &s), 0);
	assert_int_equal(pg_query(a, "SELECT 1", 0, NULL, on_result, &s), -1);
	assert_int_equal(pg_query(b, "SELECT 1", 0, NULL, on_result, &s), 0);
	pg_free(a);
	pg_free(b);
	assert_int_equal(s.failed, PG_MAX_QUEUED + 1);
	pg_pool_free(pool);
}

static void a_new_conninfo_moves_the_handle_with_its_queries(void **state)
{
	struct ev_loop *loop = ev_default_loop(0);
	struct pg_pool *pool = pg_pool_new(loop);
	struct pg *a = pg_new_pooled(loop, pool, "dbname=x", 5000, NULL);
	struct pg *b = pg_new_pooled(loop, pool, "dbname=x", 5000, NULL);
	struct pg *c = pg_new_pooled(loop, pool, "dbname=z", 5000, NULL);
	struct seen sb = { 0 };

	(void)state;
	assert_int_equal(pg_query(b, "SELECT 1", 0, NULL, on_result, &sb), 0);
	/* Shared: b leaves, a stays. */
	assert_int_equal(pg_set_conninfo(b, "dbname=y"), 0);
	assert_int_equal(pg_shared_count(a), 1);
	assert_int_equal(pg_shared_count(b), 1);
	/* Back to x: it joins a again rather than opening a second. */
	assert_int_equal(pg_set_conninfo(b, "dbname=x"), 0);
	assert_int_equal(pg_shared_count(a), 2);
	/* Alone on z, to x: joins too (z's connection goes). */
	assert_int_equal(pg_set_conninfo(c, "dbname=x"), 0);
	assert_int_equal(pg_shared_count(a), 3);
	/* Alone, nowhere to join: its own connection follows. */
	pg_free(a);
	pg_free(c);
	assert_int_equal(pg_set_conninfo(b, "dbname=w"), 0);
	assert_int_equal(pg_shared_count(b), 1);
	assert_int_equal(sb.failed, 0); /* its query moved along, unharmed */
	pg_free(b);
	assert_int_equal(sb.failed, 1);
	pg_pool_free(pool);
}

static void a_full_connection_opens_another(void **state)
{
	struct ev_loop *loop = ev_default_loop(0);
	struct pg_pool *pool = pg_pool_new(loop);
	struct pg *hs[PG_MAX_HANDLES + 1];

	(void)state;
	for (int i = 0; i <= PG_MAX_HANDLES; i++)
		assert_non_null(hs[i] = pg_new_pooled(loop, pool, "dbname=x", 5000, NULL));
	assert_int_equal(pg_shared_count(hs[0]), PG_MAX_HANDLES);
	assert_int_equal(pg_shared_count(hs[PG_MAX_HANDLES]), 1);
	for (int i = 0; i <= PG_MAX_HANDLES; i++)
		pg_free(hs[i]);
	pg_pool_free(pool);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(same_conninfo_shares_one_connection),
		cmocka_unit_test(freeing_a_handle_fails_only_its_queries),
		cmocka_unit_test(each_handle_has_its_own_queue_limit),
		cmocka_unit_test(a_new_conninfo_moves_the_handle_with_its_queries),
		cmocka_unit_test(a_full_connection_opens_another),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
