"""The test-only PGMQ schema (tests/fixtures/pgmq*.sql) behaves like pgmq 1.5.x.

The dispatcher's integration tests trust this fixture to stand in for the real extension, so
every behaviour the daemon relies on (reference: /work/shared/reference/pgmq-api.md §1-§5, §7a)
is pinned here against a real PostgreSQL 15. Target layout: 1.5 (6-column message_record);
the add-ons for the 1.10 layout and the 1.12 read overload are covered at the end, followed by
a few checks of the PgCluster helper itself.

Run:  /usr/bin/python3 -m pytest tests/integration/test_fixture.py
"""

import contextlib
import datetime
import itertools
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
import uuid

import psycopg2
import psycopg2.errors
import pytest

from pgcluster import PgCluster, wait_until

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES_DIR = os.path.join(os.path.dirname(HERE), "fixtures")
DEMO_JOBS_SQL = os.path.join(FIXTURES_DIR, "demo_jobs.sql")
ADDON_FILES = {
    "1.10": os.path.join(FIXTURES_DIR, "pgmq-1.10-layout.sql"),
    "1.12": os.path.join(FIXTURES_DIR, "pgmq-1.12-read-overload.sql"),
}

TIMEOUT = 10  # seconds; generous deadline for anything that waits on a condition

RECORD_1_5 = [
    ("msg_id", "bigint"),
    ("read_ct", "integer"),
    ("enqueued_at", "timestamp with time zone"),
    ("vt", "timestamp with time zone"),
    ("message", "jsonb"),
    ("headers", "jsonb"),
]
RECORD_1_10 = RECORD_1_5[:3] + [("last_read_at", "timestamp with time zone")] + RECORD_1_5[3:]

INVALID_NAME_MESSAGE = "queue name contains invalid characters: $, ;, --, or \\'"
TOO_LONG_MESSAGE = "queue name is too long, maximum length is 47 characters"


# ----------------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def db(make_pgmq_db):
    """A database with the base fixture (1.5 layout) shared by the tests of this module;
    every test works on its own queue."""
    return make_pgmq_db(prefix="fixture", fixture=True)


@pytest.fixture
def connect(pg_cluster):
    """Factory for autocommit connections that are closed after the test."""
    conns = []

    def make(dbname):
        conn = pg_cluster.connect(dbname)
        conns.append(conn)
        return conn

    yield make
    for conn in conns:
        conn.close()


@pytest.fixture
def conn(connect, db):
    return connect(db)


_queue_numbers = itertools.count(1)


@pytest.fixture
def queue(conn):
    """A fresh lower-case queue in the module database."""
    name = f"tq_{next(_queue_numbers)}"
    run(conn, "SELECT pgmq.create(%s)", (name,))
    return name


def run(conn, query, params=None):
    """Execute and return all rows ([] for statements without a result)."""
    with conn.cursor() as cur:
        cur.execute(query, params)
        return cur.fetchall() if cur.description is not None else []


def one(conn, query, params=None):
    rows = run(conn, query, params)
    assert len(rows) == 1, rows
    return rows[0]


def sqlstate_of(conn, query, params=None):
    """Run a statement that must fail; return (SQLSTATE, primary message)."""
    with pytest.raises(psycopg2.Error) as excinfo:
        run(conn, query, params)
    if not conn.autocommit:
        conn.rollback()
    return excinfo.value.pgcode, excinfo.value.diag.message_primary


def send(conn, queue, message=None, delay=None):
    message = json.dumps(message if message is not None else {"n": 1})
    if delay is None:
        return one(conn, "SELECT * FROM pgmq.send(%s, %s::jsonb)", (queue, message))[0]
    return one(conn, "SELECT * FROM pgmq.send(%s, %s::jsonb, %s::integer)",
               (queue, message, delay))[0]


def read(conn, queue, vt=30, qty=10):
    """pgmq.read as the daemon calls it (cast parameters, named columns), sorted by msg_id
    because the order of an UPDATE ... RETURNING set is not guaranteed."""
    rows = run(conn, "SELECT msg_id, read_ct, enqueued_at, vt, message, headers "
                     "FROM pgmq.read(%s::text, %s::integer, %s::integer)", (queue, vt, qty))
    return sorted(rows)


def clock(conn):
    return one(conn, "SELECT clock_timestamp()")[0]


def table_rows(conn, queue):
    return run(conn, f'SELECT msg_id, read_ct, vt FROM pgmq."q_{queue}" ORDER BY msg_id')


def columns(conn, relation):
    """[(name, type, not null, identity, default)] of a table or composite type, in order."""
    return run(conn, """
        SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, a.attidentity,
               pg_get_expr(d.adbin, d.adrelid)
          FROM pg_attribute a
          LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped
         ORDER BY a.attnum""", (relation,))


def record_layout(conn):
    return [(name, typ) for name, typ, *_ in columns(conn, "pgmq.message_record")]


# -------------------------------------------------------------------------- schema and names

def test_meta_table_exact(conn):
    assert columns(conn, "pgmq.meta") == [
        ("queue_name", "character varying", True, "", None),
        ("is_partitioned", "boolean", True, "", None),
        ("is_unlogged", "boolean", True, "", None),
        ("created_at", "timestamp with time zone", True, "", "now()"),
    ]
    assert one(conn, """SELECT contype, pg_get_constraintdef(oid) FROM pg_constraint
                         WHERE conrelid = 'pgmq.meta'::regclass
                           AND conname = 'meta_queue_name_key'""") == ("u", "UNIQUE (queue_name)")


def test_composite_types(conn):
    assert record_layout(conn) == RECORD_1_5
    assert [c[:2] for c in columns(conn, "pgmq.queue_record")] == [
        ("queue_name", "character varying"),
        ("is_partitioned", "boolean"),
        ("is_unlogged", "boolean"),
        ("created_at", "timestamp with time zone"),
    ]
    assert [c[:2] for c in columns(conn, "pgmq.metrics_result")] == [
        ("queue_name", "text"),
        ("queue_length", "bigint"),
        ("newest_msg_age_sec", "integer"),
        ("oldest_msg_age_sec", "integer"),
        ("total_messages", "bigint"),
        ("scrape_time", "timestamp with time zone"),
        ("queue_visible_length", "bigint"),
    ]


def test_queue_tables_exact(conn):
    run(conn, "SELECT pgmq.create('Shape_Q')")
    tstz = "timestamp with time zone"
    assert columns(conn, "pgmq.q_shape_q") == [
        ("msg_id", "bigint", True, "a", None),          # GENERATED ALWAYS AS IDENTITY
        ("read_ct", "integer", True, "", "0"),
        ("enqueued_at", tstz, True, "", "now()"),
        ("vt", tstz, True, "", None),
        ("message", "jsonb", False, "", None),
        ("headers", "jsonb", False, "", None),
    ]
    assert columns(conn, "pgmq.a_shape_q") == [
        ("msg_id", "bigint", True, "", None),           # copied, no identity
        ("read_ct", "integer", True, "", "0"),
        ("enqueued_at", tstz, True, "", "now()"),
        ("archived_at", tstz, True, "", "now()"),
        ("vt", tstz, True, "", None),
        ("message", "jsonb", False, "", None),
        ("headers", "jsonb", False, "", None),
    ]
    indexes = dict(run(conn, """SELECT indexname, indexdef FROM pg_indexes
                                 WHERE schemaname = 'pgmq'
                                   AND tablename IN ('q_shape_q', 'a_shape_q')"""))
    assert set(indexes) == {"q_shape_q_pkey", "q_shape_q_vt_idx", "a_shape_q_pkey",
                            "archived_at_idx_Shape_Q"}  # queue name as given, not lowered
    assert "(vt)" in indexes["q_shape_q_vt_idx"]
    assert "(archived_at)" in indexes["archived_at_idx_Shape_Q"]
    assert one(conn, "SELECT pg_get_serial_sequence('pgmq.q_shape_q', 'msg_id')") == (
        "pgmq.q_shape_q_msg_id_seq",)
    # meta keeps the spelling; table names and lookups are lower-case.
    assert one(conn, "SELECT queue_name FROM pgmq.meta WHERE queue_name ILIKE 'shape_q'") == (
        "Shape_Q",)
    assert one(conn, "SELECT pgmq.format_table_name('Shape_Q', 'q')") == ("q_shape_q",)
    send(conn, "SHAPE_Q")
    assert len(read(conn, "shape_q")) == 1


def test_api_signatures(conn):
    rows = run(conn, """
        SELECT p.proname, pg_get_function_identity_arguments(p.oid), pg_get_function_result(p.oid)
          FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = 'pgmq' AND left(p.proname, 9) <> '_fixture_'""")
    api = set(rows)
    record = "SETOF pgmq.message_record"
    sends = {r[1] for r in rows if r[0] == "send"}
    assert sends == {
        "queue_name text, msg jsonb",
        "queue_name text, msg jsonb, headers jsonb",
        "queue_name text, msg jsonb, delay integer",
        "queue_name text, msg jsonb, delay timestamp with time zone",
        "queue_name text, msg jsonb, headers jsonb, delay integer",
        "queue_name text, msg jsonb, headers jsonb, delay timestamp with time zone",
    }
    batches = {r[1] for r in rows if r[0] == "send_batch"}
    assert batches == {
        "queue_name text, msgs jsonb[]",
        "queue_name text, msgs jsonb[], headers jsonb[]",
        "queue_name text, msgs jsonb[], delay integer",
        "queue_name text, msgs jsonb[], delay timestamp with time zone",
        "queue_name text, msgs jsonb[], headers jsonb[], delay integer",
        "queue_name text, msgs jsonb[], headers jsonb[], delay timestamp with time zone",
    }
    assert {r[2] for r in rows if r[0] in ("send", "send_batch")} == {"SETOF bigint"}
    # Exactly one read in the base fixture: untyped reads are not ambiguous before 1.12.
    assert [r[1:] for r in rows if r[0] == "read"] == [
        ("queue_name text, vt integer, qty integer, conditional jsonb", record)]
    expected = {
        ("read_with_poll", "queue_name text, vt integer, qty integer, max_poll_seconds integer, "
                           "poll_interval_ms integer, conditional jsonb", record),
        ("pop", "queue_name text", record),
        ("set_vt", "queue_name text, msg_id bigint, vt integer", record),
        ("delete", "queue_name text, msg_id bigint", "boolean"),
        ("delete", "queue_name text, msg_ids bigint[]", "SETOF bigint"),
        ("archive", "queue_name text, msg_id bigint", "boolean"),
        ("archive", "queue_name text, msg_ids bigint[]", "SETOF bigint"),
        ("create", "queue_name text", "void"),
        ("create_non_partitioned", "queue_name text", "void"),
        ("create_unlogged", "queue_name text", "void"),
        ("drop_queue", "queue_name text", "boolean"),
        ("purge_queue", "queue_name text", "bigint"),
        ("metrics", "queue_name text", "pgmq.metrics_result"),
        ("metrics_all", "", "SETOF pgmq.metrics_result"),
        ("list_queues", "", "SETOF pgmq.queue_record"),
        ("format_table_name", "queue_name text, prefix text", "text"),
        ("validate_queue_name", "queue_name text", "void"),
        ("enable_notify_insert", "queue_name text, throttle_interval_ms integer", "void"),
        ("disable_notify_insert", "queue_name text", "void"),
        ("notify_queue_listeners", "", "trigger"),
    }
    assert expected <= api, expected - api
    defaults = dict(run(conn, """
        SELECT p.proname, pg_get_function_arguments(p.oid) FROM pg_proc p
         WHERE p.pronamespace = 'pgmq'::regnamespace
           AND p.proname IN ('read', 'read_with_poll', 'enable_notify_insert')"""))
    assert defaults["read"].endswith("conditional jsonb DEFAULT '{}'::jsonb")
    assert ("max_poll_seconds integer DEFAULT 5, poll_interval_ms integer DEFAULT 100, "
            "conditional jsonb DEFAULT '{}'::jsonb") in defaults["read_with_poll"]
    assert defaults["enable_notify_insert"].endswith("throttle_interval_ms integer DEFAULT 250")


@pytest.mark.parametrize("bad", ["bad$name", "bad;name", "bad--name", "bad'name"])
def test_invalid_characters_rejected(conn, bad):
    assert sqlstate_of(conn, "SELECT pgmq.create(%s)", (bad,)) == ("P0001", INVALID_NAME_MESSAGE)
    # Every entry point checks, not only create.
    assert sqlstate_of(conn, "SELECT * FROM pgmq.read(%s, 30, 1)", (bad,))[0] == "P0001"
    assert sqlstate_of(conn, "SELECT * FROM pgmq.send(%s, '{}'::jsonb)", (bad,))[0] == "P0001"
    assert one(conn, "SELECT count(*) FROM pgmq.meta WHERE queue_name = %s", (bad,)) == (0,)


def test_name_length_limit_is_47(conn):
    ok, too_long = "n" * 47, "n" * 48
    run(conn, "SELECT pgmq.create(%s)", (ok,))
    assert one(conn, "SELECT to_regclass(%s) IS NOT NULL", (f"pgmq.q_{ok}",)) == (True,)
    assert sqlstate_of(conn, "SELECT pgmq.create(%s)", (too_long,)) == ("P0001", TOO_LONG_MESSAGE)
    assert sqlstate_of(conn, "SELECT pgmq.create_unlogged(%s)", (too_long,))[0] == "P0001"
    assert one(conn, "SELECT count(*) FROM pgmq.meta WHERE queue_name = %s", (too_long,)) == (0,)


@pytest.mark.parametrize("odd", ["with-hyphen", "with space", 'dq"uote', "select"])
def test_names_are_quoted_identifiers(conn, odd):
    # These would break (or be reinterpreted) if a table name were pasted into SQL unquoted.
    run(conn, "SELECT pgmq.create(%s)", (odd,))
    assert one(conn, """SELECT count(*) FROM pg_class
                         WHERE relnamespace = 'pgmq'::regnamespace AND relname IN (%s, %s)""",
               (f"q_{odd}", f"a_{odd}")) == (2,)
    msg_id = send(conn, odd, {"odd": odd})
    assert [(r[0], r[4]) for r in read(conn, odd)] == [(msg_id, {"odd": odd})]
    assert one(conn, "SELECT pgmq.archive(%s, %s::bigint)", (odd, msg_id)) == (True,)
    assert one(conn, "SELECT pgmq.drop_queue(%s)", (odd,)) == (True,)


def test_create_is_idempotent_and_unlogged(conn):
    for _ in range(2):
        run(conn, "SELECT pgmq.create('idem_q')")
        run(conn, "SELECT pgmq.create_non_partitioned('idem_q')")
        run(conn, "SELECT pgmq.create_unlogged('unlogged_q')")
    rows = run(conn, """SELECT queue_name, is_partitioned, is_unlogged FROM pgmq.meta
                         WHERE queue_name IN ('idem_q', 'unlogged_q') ORDER BY 1""")
    assert rows == [("idem_q", False, False), ("unlogged_q", False, True)]
    persistence = dict(run(conn, """SELECT relname, relpersistence FROM pg_class
                                     WHERE relname IN ('q_idem_q', 'a_idem_q',
                                                       'q_unlogged_q', 'a_unlogged_q')"""))
    assert persistence == {"q_idem_q": "p", "a_idem_q": "p", "q_unlogged_q": "u", "a_unlogged_q": "p"}
    send(conn, "unlogged_q")
    assert len(read(conn, "unlogged_q")) == 1


def test_drop_queue(conn):
    conn.notices.clear()
    assert one(conn, "SELECT pgmq.drop_queue('never_created')") == (False,)
    assert any("pgmq queue `never_created` does not exist" in n for n in conn.notices), conn.notices
    run(conn, "SELECT pgmq.create('to_drop')")
    run(conn, "SELECT pgmq.enable_notify_insert('to_drop', 0)")
    assert one(conn, "SELECT pgmq.drop_queue('to_drop')") == (True,)
    assert one(conn, "SELECT to_regclass('pgmq.q_to_drop'), to_regclass('pgmq.a_to_drop')") == (
        None, None)
    assert one(conn, """SELECT (SELECT count(*) FROM pgmq.meta WHERE queue_name = 'to_drop'),
                               (SELECT count(*) FROM pgmq.notify_insert_throttle
                                 WHERE queue_name = 'to_drop')""") == (0, 0)
    assert one(conn, "SELECT pgmq.drop_queue('to_drop')") == (False,)


# ------------------------------------------------------------------------------ send and read

def test_send_read_basic(conn, queue):
    before = clock(conn)
    msg_id = send(conn, queue, {"document_id": "d-1", "ü": "ö"})
    start = clock(conn)
    rows = read(conn, queue, vt=30, qty=5)
    end = clock(conn)
    assert len(rows) == 1
    got_id, read_ct, enqueued_at, vt, message, headers = rows[0]
    assert got_id == msg_id and read_ct == 1
    assert message == {"document_id": "d-1", "ü": "ö"} and headers is None
    assert before <= enqueued_at <= start
    # new vt = clock_timestamp() + 30 s at the moment of the read
    assert start + datetime.timedelta(seconds=30) <= vt <= end + datetime.timedelta(seconds=30)
    # Invisible until vt: a second read gets nothing and changes nothing.
    assert read(conn, queue) == []
    assert table_rows(conn, queue) == [(msg_id, 1, vt)]


def test_enqueued_at_is_transaction_time_and_vt_clock_time(conn, queue):
    run(conn, "BEGIN")
    txn_now = one(conn, "SELECT now()")[0]
    first = send(conn, queue)
    second = send(conn, queue)
    run(conn, "COMMIT")
    rows = run(conn, f'SELECT msg_id, enqueued_at, vt FROM pgmq."q_{queue}" ORDER BY msg_id')
    assert [r[0] for r in rows] == [first, second] and second > first
    assert rows[0][1] == rows[1][1] == txn_now        # column default now()
    assert txn_now < rows[0][2] <= rows[1][2]          # vt from clock_timestamp()


def test_visibility_uses_clock_time(conn, queue):
    # read compares vt with clock_timestamp(): a message sent earlier in the same transaction
    # (vt = clock time of the send, later than now()) is already visible.
    run(conn, "BEGIN")
    msg_id = send(conn, queue)
    rows = read(conn, queue)
    run(conn, "COMMIT")
    assert [r[0] for r in rows] == [msg_id]


def test_send_overloads(conn, queue):
    headers = json.dumps({"x-trace": "abc"})
    with_headers = one(conn, "SELECT * FROM pgmq.send(%s, '{\"h\":1}'::jsonb, %s::jsonb)",
                       (queue, headers))[0]
    delayed = send(conn, queue, {"d": 1}, delay=3600)
    past = one(conn, "SELECT * FROM pgmq.send(%s, '{\"p\":1}'::jsonb, now() - interval '1 hour')",
               (queue,))[0]
    future = one(conn, "SELECT * FROM pgmq.send(%s, '{\"f\":1}'::jsonb, %s::jsonb, "
                       "now() + interval '1 hour')", (queue, headers))[0]
    both_int = one(conn, "SELECT * FROM pgmq.send(%s, '{\"b\":1}'::jsonb, %s::jsonb, 0)",
                   (queue, headers))[0]
    visible = {r[0]: r[5] for r in read(conn, queue)}
    assert visible == {with_headers: {"x-trace": "abc"}, past: None, both_int: {"x-trace": "abc"}}
    assert delayed not in visible and future not in visible
    # The 1.5 overload family makes an untyped 3-argument send ambiguous (upstream #364).
    code, message = sqlstate_of(conn, "PREPARE untyped_send AS SELECT * FROM pgmq.send($1, $2, $3)")
    assert code == "42725" and "is not unique" in message


def test_send_batch(conn, queue):
    msgs = [json.dumps({"i": i}) for i in range(5)]
    ids = [r[0] for r in run(conn, "SELECT * FROM pgmq.send_batch(%s, %s::jsonb[])", (queue, msgs))]
    assert len(ids) == 5 and ids == sorted(ids)
    stored = run(conn, f'SELECT msg_id, message FROM pgmq."q_{queue}" ORDER BY msg_id')
    assert stored == [(ids[i], {"i": i}) for i in range(5)]    # one id per element, in order
    # Pre-1.11: a shorter headers array is padded with NULL, an empty batch returns nothing.
    hdr_ids = [r[0] for r in run(
        conn, "SELECT * FROM pgmq.send_batch(%s, %s::jsonb[], %s::jsonb[])",
        (queue, msgs[:3], [json.dumps({"h": 0})]))]
    hdrs = run(conn, f'SELECT headers FROM pgmq."q_{queue}" WHERE msg_id = ANY(%s) ORDER BY msg_id',
               (hdr_ids,))
    assert hdrs == [({"h": 0},), (None,), (None,)]
    assert run(conn, "SELECT * FROM pgmq.send_batch(%s, ARRAY[]::jsonb[])", (queue,)) == []
    delayed = run(conn, "SELECT * FROM pgmq.send_batch(%s, %s::jsonb[], 3600)", (queue, msgs[:2]))
    assert len(delayed) == 2
    assert {r[0] for r in read(conn, queue, qty=100)} == set(ids) | set(hdr_ids)


def test_read_oldest_first(conn, queue):
    ids = [send(conn, queue, {"i": i}) for i in range(5)]
    assert [r[0] for r in read(conn, queue, qty=2)] == ids[:2]
    assert [r[0] for r in read(conn, queue, qty=10)] == ids[2:]


def test_qty_edge_cases(conn, queue):
    ids = [send(conn, queue) for _ in range(3)]
    assert read(conn, queue, qty=0) == []
    assert [r[1] for r in table_rows(conn, queue)] == [0, 0, 0]     # nothing touched
    assert sqlstate_of(conn, "SELECT * FROM pgmq.read(%s::text, 30, -1)", (queue,)) == (
        "2201W", "LIMIT must not be negative")
    assert [r[0] for r in read(conn, queue, qty=None)] == ids       # NULL = no limit


def test_vt_zero_negative_and_null(conn, queue):
    msg_id = send(conn, queue)
    assert [r[:2] for r in read(conn, queue, vt=0)] == [(msg_id, 1)]
    rows = read(conn, queue, vt=-10)                                # re-readable at once
    assert [r[:2] for r in rows] == [(msg_id, 2)]
    assert rows[0][3] < clock(conn)
    assert sqlstate_of(conn, "SELECT * FROM pgmq.read(%s::text, NULL::integer, 1)",
                       (queue,))[0] == "23502"


def test_conditional_read(conn, queue):
    a = send(conn, queue, {"kind": "a"})
    b = send(conn, queue, {"kind": "b", "extra": 1})
    scalar = one(conn, "SELECT * FROM pgmq.send(%s, '\"just a string\"'::jsonb)", (queue,))[0]
    rows = run(conn, "SELECT msg_id FROM pgmq.read(%s, 30, 10, '{\"kind\": \"b\"}')", (queue,))
    assert rows == [(b,)]
    # '{}' means "no condition", so non-object messages are read too.
    assert [r[0] for r in read(conn, queue)] == [a, scalar]


def test_missing_queue_is_42p01(conn):
    statements = [
        "SELECT * FROM pgmq.read('no_such_queue', 30, 1)",
        "SELECT * FROM pgmq.read_with_poll('no_such_queue', 30, 1, 0, 10)",
        "SELECT * FROM pgmq.send('no_such_queue', '{}'::jsonb)",
        "SELECT * FROM pgmq.send_batch('no_such_queue', ARRAY['{}'::jsonb])",
        "SELECT pgmq.delete('no_such_queue', 1::bigint)",
        "SELECT * FROM pgmq.delete('no_such_queue', ARRAY[1::bigint])",
        "SELECT pgmq.archive('no_such_queue', 1::bigint)",
        "SELECT * FROM pgmq.archive('no_such_queue', ARRAY[1::bigint])",
        "SELECT * FROM pgmq.set_vt('no_such_queue', 1, 10)",
        "SELECT * FROM pgmq.pop('no_such_queue')",
        "SELECT * FROM pgmq.metrics('no_such_queue')",
        "SELECT pgmq.purge_queue('no_such_queue')",
        "SELECT * FROM public.pgmq_read('no_such_queue', 30, 1)",
    ]
    for statement in statements:
        assert sqlstate_of(conn, statement) == (
            "42P01", 'relation "pgmq.q_no_such_queue" does not exist'), statement
    assert sqlstate_of(conn, "SELECT * FROM pgmq.read(NULL, 30, 1)")[0] == "22004"


# ---------------------------------------------------------------------------- concurrency

def test_skip_locked_no_duplicate_delivery(connect, db, queue):
    holder, other = connect(db), connect(db)
    # A lock wait instead of SKIP LOCKED would hang the other reader; fail fast instead.
    run(other, "SET statement_timeout = '5s'")
    ids = [send(other, queue) for _ in range(3)]
    run(holder, "BEGIN")
    held = read(holder, queue, qty=1)
    assert [r[0] for r in held] == ids[:1]
    # While the first transaction is open its row is locked and skipped, not waited for.
    assert [r[0] for r in read(other, queue, qty=10)] == ids[1:]
    run(holder, "COMMIT")
    # Committed: the row now has a future vt, so nobody gets it again.
    assert read(other, queue, qty=10) == []
    assert [r[1] for r in table_rows(other, queue)] == [1, 1, 1]


def test_rollback_redelivers(connect, db, queue):
    holder, other = connect(db), connect(db)
    run(other, "SET statement_timeout = '5s'")
    msg_id = send(other, queue)
    run(holder, "BEGIN")
    assert [r[:2] for r in read(holder, queue, vt=300)] == [(msg_id, 1)]
    assert read(other, queue) == []                 # locked by the open transaction
    run(holder, "ROLLBACK")
    # vt and read_ct reverted: visible at once and read for the "first" time again.
    assert [r[:2] for r in read(other, queue)] == [(msg_id, 1)]


# --------------------------------------------------------------------------- read_with_poll

def test_read_with_poll_times_out_empty(conn, queue):
    started = time.monotonic()
    rows = run(conn, "SELECT * FROM pgmq.read_with_poll(%s, 30, 1, 1, 50)", (queue,))
    elapsed = time.monotonic() - started
    assert rows == []
    assert 0.95 <= elapsed < 5, elapsed


def test_read_with_poll_returns_early_and_sleeps_fractionally(connect, db, queue):
    poller, producer = connect(db), connect(db)
    poller_pid = one(poller, "SELECT pg_backend_pid()")[0]
    result = {}

    def poll():
        try:
            result["rows"] = run(poller, "SELECT msg_id, read_ct FROM pgmq.read_with_poll(%s, 30, 5)",
                                 (queue,))   # defaults: 5 s max, 100 ms interval
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            result["error"] = exc
        result["done"] = time.monotonic()

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        # A PgSleep wait proves the 100 ms interval became a real sleep: with integer division
        # it would be pg_sleep(0), which never waits (the CPU-burning bug, upstream #342).
        wait_until(lambda: one(producer, "SELECT wait_event FROM pg_stat_activity WHERE pid = %s",
                               (poller_pid,))[0] == "PgSleep",
                   TIMEOUT, what="the poller to sleep between passes")
        sent_at = time.monotonic()
        msg_id = send(producer, queue)
        thread.join(TIMEOUT)
        assert not thread.is_alive()
    finally:
        if thread.is_alive():
            run(producer, "SELECT pg_cancel_backend(%s)", (poller_pid,))
            thread.join(TIMEOUT)
    assert "error" not in result, result
    assert result["rows"] == [(msg_id, 1)]
    # Returned on the next pass (~100 ms), long before max_poll_seconds (5 s) ran out.
    assert result["done"] - sent_at < 2.5


# --------------------------------------------------------------------- pop, set_vt, ack

def test_pop(conn, queue):
    first, second = send(conn, queue, {"i": 1}), send(conn, queue, {"i": 2})
    hidden = send(conn, queue, {"i": 3}, delay=3600)
    popped = run(conn, "SELECT msg_id, read_ct, message FROM pgmq.pop(%s)", (queue,))
    assert popped == [(first, 0, {"i": 1})]          # read_ct untouched, oldest first
    assert [r[0] for r in table_rows(conn, queue)] == [second, hidden]   # deleted
    assert [r[0] for r in run(conn, "SELECT msg_id FROM pgmq.pop(%s)", (queue,))] == [second]
    assert run(conn, "SELECT * FROM pgmq.pop(%s)", (queue,)) == []     # hidden is not visible


def test_set_vt(conn, queue):
    msg_id = send(conn, queue)
    assert len(read(conn, queue, vt=300)) == 1
    run(conn, "BEGIN")
    txn_now = one(conn, "SELECT now()")[0]
    rows = run(conn, "SELECT msg_id, read_ct, vt, message FROM pgmq.set_vt(%s, %s, 0)",
               (queue, msg_id))
    run(conn, "COMMIT")
    assert [r[:2] for r in rows] == [(msg_id, 1)] and rows[0][3] == {"n": 1}
    # clock_timestamp(), not now(): inside a transaction the new vt is after its start.
    assert rows[0][2] > txn_now
    assert [r[:2] for r in read(conn, queue, vt=300)] == [(msg_id, 2)]     # released
    start = clock(conn)
    vt = one(conn, "SELECT vt FROM pgmq.set_vt(%s, %s, 120)", (queue, msg_id))[0]
    assert start + datetime.timedelta(seconds=120) <= vt <= clock(conn) + datetime.timedelta(seconds=120)
    assert run(conn, "SELECT * FROM pgmq.set_vt(%s, 999999, 10)", (queue,)) == []


def test_delete_forms(conn, queue):
    ids = [send(conn, queue) for _ in range(4)]
    assert one(conn, "SELECT pgmq.delete(%s, %s::bigint)", (queue, ids[0])) == (True,)
    assert one(conn, "SELECT pgmq.delete(%s, %s::bigint)", (queue, ids[0])) == (False,)
    removed = run(conn, "SELECT * FROM pgmq.delete(%s, %s::bigint[])",
                  (queue, [ids[1], ids[2], 987654]))
    assert sorted(r[0] for r in removed) == ids[1:3]       # absent ids silently skipped
    assert [r[0] for r in table_rows(conn, queue)] == ids[3:]


def test_archive_copies_every_column(conn, queue):
    msg_id = one(conn, "SELECT * FROM pgmq.send(%s, %s::jsonb, %s::jsonb)",
                 (queue, json.dumps({"doc": "x"}), json.dumps({"h": 1})))[0]
    read(conn, queue, vt=60)
    before = one(conn, f'SELECT msg_id, read_ct, enqueued_at, vt, message, headers '
                       f'FROM pgmq."q_{queue}" WHERE msg_id = %s', (msg_id,))
    run(conn, "BEGIN")
    txn_now = one(conn, "SELECT now()")[0]
    assert one(conn, "SELECT pgmq.archive(%s, %s::bigint)", (queue, msg_id)) == (True,)
    run(conn, "COMMIT")
    after = one(conn, f'SELECT msg_id, read_ct, enqueued_at, vt, message, headers, archived_at '
                      f'FROM pgmq."a_{queue}"')
    assert after[:6] == before and before[1] == 1 and before[5] == {"h": 1}
    assert after[6] == txn_now                                   # archived_at default now()
    assert table_rows(conn, queue) == []
    assert one(conn, "SELECT pgmq.archive(%s, %s::bigint)", (queue, msg_id)) == (False,)
    ids = [send(conn, queue) for _ in range(2)]
    moved = run(conn, "SELECT * FROM pgmq.archive(%s, %s::bigint[])", (queue, ids + [555555]))
    assert sorted(r[0] for r in moved) == ids
    assert one(conn, f'SELECT count(*) FROM pgmq."a_{queue}"') == (3,)


def test_purge_queue(conn, queue):
    ids = [send(conn, queue) for _ in range(4)]
    assert one(conn, "SELECT pgmq.purge_queue(%s)", (queue,)) == (4,)
    assert table_rows(conn, queue) == []
    assert send(conn, queue) == ids[-1] + 1                # the sequence is not reset


def test_metrics_and_lists(conn, queue):
    fields = ("queue_name, queue_length, newest_msg_age_sec, oldest_msg_age_sec, "
              "total_messages, queue_visible_length")
    assert one(conn, f"SELECT {fields} FROM pgmq.metrics(%s)", (queue,)) == (
        queue, 0, None, None, 0, 0)
    for _ in range(3):
        send(conn, queue)
    read(conn, queue, vt=300, qty=1)
    name, length, newest, oldest, total, visible = one(
        conn, f"SELECT {fields} FROM pgmq.metrics(%s)", (queue,))
    assert (name, length, total, visible) == (queue, 3, 3, 2)
    assert 0 <= newest <= oldest < 60
    # The spelling passed in is echoed back.
    assert one(conn, "SELECT queue_name FROM pgmq.metrics(%s)", (queue.upper(),)) == (queue.upper(),)
    assert (queue, 3) in run(conn, "SELECT queue_name, queue_length FROM pgmq.metrics_all()")
    listed = {r[0]: r[1:3] for r in run(conn, "SELECT * FROM pgmq.list_queues()")}
    assert listed[queue] == (False, False)
    with conn.cursor() as cur:
        cur.execute("SELECT * FROM pgmq.list_queues()")
        assert [d.name for d in cur.description] == [
            "queue_name", "is_partitioned", "is_unlogged", "created_at"]


# ----------------------------------------------------------------------------- notifications

def channel_of(queue):
    return f"pgmq.q_{queue}.INSERT"


def listen(conn, channel):
    run(conn, 'LISTEN "{}"'.format(channel.replace('"', '""')))


_sentinels = itertools.count(1)


def notifications_until_sentinel(listener, producer):
    """All notifications the listener receives before a sentinel NOTIFY sent afterwards.

    PostgreSQL delivers notifications of different transactions in commit order, so once the
    sentinel (committed last) has arrived, nothing committed earlier can still be on its way:
    "no notification" can be asserted without sleeping.
    """
    sentinel = f"sentinel_{next(_sentinels)}"
    listen(listener, sentinel)
    run(producer, "SELECT pg_notify(%s, 'done')", (sentinel,))
    received = []
    deadline = time.monotonic() + TIMEOUT
    while True:
        listener.poll()
        while listener.notifies:
            note = listener.notifies.pop(0)
            if note.channel == sentinel:
                run(listener, 'UNLISTEN "{}"'.format(sentinel))
                return received
            received.append(note)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("sentinel notification not received")
        select.select([listener], [], [], remaining)


def test_enable_notify_insert_trigger_and_table(conn, queue):
    run(conn, "SELECT pgmq.enable_notify_insert(%s)", (queue,))
    assert one(conn, "SELECT throttle_interval_ms, last_notified_at = to_timestamp(0) "
                     "FROM pgmq.notify_insert_throttle WHERE queue_name = %s", (queue,)) == (250, True)
    trig = one(conn, """SELECT tgname, tgconstraint <> 0, tgdeferrable, tginitdeferred,
                               tgfoid::regproc::text, tgtype & 1, tgtype & 2, tgtype & 4
                          FROM pg_trigger WHERE tgrelid = %s::regclass""", (f"pgmq.q_{queue}",))
    # constraint trigger, DEFERRABLE (initially immediate), FOR EACH ROW, AFTER, INSERT
    assert trig == ("trigger_notify_queue_insert_listeners", True, True, False,
                    "pgmq.notify_queue_listeners", 1, 0, 4)
    assert one(conn, "SELECT relpersistence FROM pg_class "
                     "WHERE oid = 'pgmq.notify_insert_throttle'::regclass") == ("u",)
    assert [c[:3] for c in columns(conn, "pgmq.notify_insert_throttle")] == [
        ("queue_name", "character varying", False),
        ("throttle_interval_ms", "integer", True),
        ("last_notified_at", "timestamp with time zone", True),
    ]
    assert one(conn, """SELECT confrelid::regclass::text, confdeltype FROM pg_constraint
                         WHERE conrelid = 'pgmq.notify_insert_throttle'::regclass
                           AND contype = 'f'""") == ("pgmq.meta", "c")
    # Re-enabling replaces trigger and settings rather than failing or duplicating.
    run(conn, "SELECT pgmq.enable_notify_insert(%s, 0)", (queue,))
    assert one(conn, "SELECT count(*) FROM pg_trigger WHERE tgrelid = %s::regclass",
               (f"pgmq.q_{queue}",)) == (1,)
    assert one(conn, "SELECT throttle_interval_ms FROM pgmq.notify_insert_throttle "
                     "WHERE queue_name = %s", (queue,)) == (0,)
    assert sqlstate_of(conn, "SELECT pgmq.enable_notify_insert(%s, -1)", (queue,))[0] == "P0001"
    assert sqlstate_of(conn, "SELECT pgmq.enable_notify_insert('no_such_queue')")[0] == "P0001"


def test_notify_on_insert(connect, db, queue):
    listener, producer = connect(db), connect(db)
    run(producer, "SELECT pgmq.enable_notify_insert(%s, 0)", (queue,))
    # The channel contains dots and upper case: unquoted it is a syntax error.
    assert sqlstate_of(listener, f"LISTEN pgmq.q_{queue}.INSERT")[0] == "42601"
    listen(listener, channel_of(queue))
    for _ in range(3):                       # three transactions, throttle 0: three notifications
        send(producer, queue)
    notes = notifications_until_sentinel(listener, producer)
    assert [(n.channel, n.payload) for n in notes] == [(channel_of(queue), "")] * 3
    assert {n.pid for n in notes} == {one(producer, "SELECT pg_backend_pid()")[0]}
    # Several inserts in one transaction fold into one notification (same channel + payload).
    run(producer, "SELECT * FROM pgmq.send_batch(%s, ARRAY['{}'::jsonb, '{}', '{}'])", (queue,))
    assert len(notifications_until_sentinel(listener, producer)) == 1
    # Nothing for a rolled-back send.
    run(producer, "BEGIN")
    send(producer, queue)
    run(producer, "ROLLBACK")
    assert notifications_until_sentinel(listener, producer) == []


def test_notify_throttle_suppresses(connect, db, queue):
    listener, producer = connect(db), connect(db)
    run(producer, "SELECT pgmq.enable_notify_insert(%s, 600000)", (queue,))
    listen(listener, channel_of(queue))
    for _ in range(3):
        send(producer, queue)
    # First insert notifies (enable resets the window), the rest fall inside it and are
    # dropped, not deferred.
    notes = notifications_until_sentinel(listener, producer)
    assert [n.channel for n in notes] == [channel_of(queue)]
    # Re-enabling resets last_notified_at: the next insert notifies again.
    run(producer, "SELECT pgmq.enable_notify_insert(%s, 600000)", (queue,))
    send(producer, queue)
    assert len(notifications_until_sentinel(listener, producer)) == 1


def test_disable_notify_insert(connect, db, queue):
    listener, producer = connect(db), connect(db)
    run(producer, "SELECT pgmq.enable_notify_insert(%s, 0)", (queue,))
    listen(listener, channel_of(queue))
    send(producer, queue)
    assert len(notifications_until_sentinel(listener, producer)) == 1
    run(producer, "SELECT pgmq.disable_notify_insert(%s)", (queue,))
    send(producer, queue)
    assert notifications_until_sentinel(listener, producer) == []
    assert one(producer, "SELECT count(*) FROM pg_trigger WHERE tgrelid = %s::regclass",
               (f"pgmq.q_{queue}",)) == (0,)
    assert one(producer, "SELECT count(*) FROM pgmq.notify_insert_throttle WHERE queue_name = %s",
               (queue,)) == (0,)


def test_mixed_case_queue_never_notifies(connect, db):
    # Faithful to pgmq 1.8.0-1.13.0: the trigger looks the throttle row up by the lower-cased
    # table name, finds no row for a queue created with upper case, and stays silent.
    listener, producer = connect(db), connect(db)
    run(producer, "SELECT pgmq.create('MixedNotify')")
    run(producer, "SELECT pgmq.enable_notify_insert('MixedNotify', 0)")
    listen(listener, channel_of("mixednotify"))
    send(producer, "MixedNotify")
    assert notifications_until_sentinel(listener, producer) == []
    assert one(producer, "SELECT count(*) FROM pgmq.q_mixednotify") == (1,)


# ------------------------------------------------------------------------ the seed's wrapper

def test_public_pgmq_read_wrapper(conn, queue):
    assert one(conn, """SELECT pg_get_function_identity_arguments(p.oid), pg_get_function_result(p.oid)
                          FROM pg_proc p WHERE p.oid = 'public.pgmq_read'::regproc""") == (
        "queue_name text, vt integer, qty integer", "SETOF pgmq.message_record")
    ids = [send(conn, queue, {"i": i}) for i in range(3)]
    # PostgREST (supabase.rpc) passes the JSON keys as named arguments.
    with conn.cursor() as cur:
        cur.execute("SELECT * FROM public.pgmq_read(queue_name => %s, vt => 30, qty => 2)", (queue,))
        rows = sorted(cur.fetchall())
        assert [d.name for d in cur.description] == [name for name, _ in RECORD_1_5]
    assert [(r[0], r[1]) for r in rows] == [(ids[0], 1), (ids[1], 1)]
    assert [r[0] for r in read(conn, queue)] == ids[2:]     # same visibility rules as pgmq.read


# ------------------------------------------------------------------------------ demo jobs

def test_demo_jobs(pg_cluster, make_pgmq_db, connect):
    dumps = []
    for _ in range(2):
        dbname = make_pgmq_db(prefix="demo", fixture=True)
        pg_cluster.load_sql(DEMO_JOBS_SQL, dbname)
        dumps.append(run(connect(dbname), "SELECT msg_id, message FROM pgmq.q_video_audio_transcription "
                                          "ORDER BY msg_id"))
    assert dumps[0] == dumps[1]                              # deterministic
    messages = [m for _, m in dumps[0]]
    assert 20 <= len(messages) <= 30
    keys = {"document_id", "media_url", "media_type", "language", "model", "diarize",
            "requested_by", "title"}
    extensions = {"mp4": "video", "mp3": "audio", "wav": "audio", "m4a": "audio"}
    for m in messages:
        assert set(m) == keys, m
        uuid.UUID(m["document_id"])
        uuid.UUID(m["requested_by"])
        match = re.fullmatch(r"https://media\.example\.com/\S+\.(mp4|mp3|wav|m4a)", m["media_url"])
        assert match and extensions[match.group(1)] == m["media_type"], m
        assert m["model"] == "large-v3" and isinstance(m["diarize"], bool)
        assert re.fullmatch(r"[a-z]{2}", m["language"])
    assert len({m["document_id"] for m in messages}) == len(messages)
    assert {m["media_type"] for m in messages} == {"video", "audio"}
    assert sum(not m["title"].isascii() for m in messages) >= 3


# ------------------------------------------------- add-ons: 1.12 overload and 1.10 layout

UNTYPED_READ = "PREPARE untyped_read AS SELECT * FROM pgmq.read($1, $2, $3)"
DAEMON_READ = ("PREPARE daemon_read AS SELECT msg_id, read_ct, to_json(enqueued_at), message, "
               "message->'document_id' FROM pgmq.read($1::text, $2::integer, $3::integer)")


def test_untyped_read_is_fine_without_overload(conn):
    run(conn, UNTYPED_READ)
    run(conn, "DEALLOCATE untyped_read")


def test_1_12_overload_makes_untyped_read_ambiguous(make_pgmq_db, connect):
    conn = connect(make_pgmq_db(addons=("1.12",), prefix="v112"))
    run(conn, "SELECT pgmq.create('jobs')")
    code, message = sqlstate_of(conn, UNTYPED_READ)
    assert (code, message) == ("42725", "function pgmq.read(unknown, unknown, unknown) is not unique")
    msg_id = send(conn, "jobs", {"document_id": "d"})
    run(conn, DAEMON_READ)
    assert run(conn, "EXECUTE daemon_read('jobs', 30, 5)")[0][0] == msg_id
    # The overload itself: vt is an absolute time taken as given.
    run(conn, "SELECT pgmq.set_vt('jobs', %s, 0)", (msg_id,))
    until = one(conn, "SELECT clock_timestamp() + interval '1 hour'")[0]
    rows = run(conn, "SELECT msg_id, read_ct, vt FROM pgmq.read('jobs', %s::timestamptz, 1)", (until,))
    assert rows == [(msg_id, 2, until)]
    # The wrapper's typed call is unaffected.
    run(conn, "SELECT pgmq.set_vt('jobs', %s, 0)", (msg_id,))
    assert [r[0] for r in run(conn, "SELECT * FROM public.pgmq_read('jobs', 30, 1)")] == [msg_id]


COMBINATIONS = [(), ("1.10",), ("1.12",), ("1.10", "1.12"), ("1.12", "1.10")]


@pytest.mark.parametrize("addons", COMBINATIONS, ids=lambda a: "base+" + "+".join(a) if a else "base")
def test_daemon_read_works_in_every_combination(pg_cluster, make_pgmq_db, connect, addons):
    dbname = make_pgmq_db(prefix="combo", fixture=True)
    conn = connect(dbname)
    # One queue created before the add-ons (an "upgraded" table), one after (a fresh install).
    run(conn, "SELECT pgmq.create('before')")
    send(conn, "before", {"document_id": "doc-before", "n": 1})
    for addon in addons:
        pg_cluster.load_sql(ADDON_FILES[addon], dbname)
    conn = connect(dbname)                  # a new session sees the new function definitions
    run(conn, "SELECT pgmq.create('after')")
    send(conn, "after", {"document_id": "doc-after", "n": 2})

    v110 = "1.10" in addons
    assert record_layout(conn) == (RECORD_1_10 if v110 else RECORD_1_5)

    run(conn, DAEMON_READ)
    for name in ("before", "after"):
        (msg_id, read_ct, enqueued_json, message, document_id), = run(
            conn, "EXECUTE daemon_read(%s, 30, 5)", (name,))
        assert (msg_id, read_ct, document_id) == (1, 1, f"doc-{name}")
        assert message["document_id"] == f"doc-{name}"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?\+00:00", enqueued_json)

    if "1.12" in addons:
        assert sqlstate_of(conn, UNTYPED_READ)[0] == "42725"
    else:
        run(conn, UNTYPED_READ)

    if v110:
        table_cols = {name: [c[0] for c in columns(conn, f"pgmq.q_{name}")]
                      for name in ("before", "after")}
        assert table_cols["after"][3] == "last_read_at"       # fresh 1.10 install: 4th
        assert table_cols["before"][-1] == "last_read_at"     # upgraded table: physically last
        for name in ("before", "after"):
            assert one(conn, f"SELECT last_read_at IS NOT NULL FROM pgmq.q_{name}") == (True,)
            assert one(conn, "SELECT pgmq.archive(%s, 1::bigint)", (name,)) == (True,)
            assert one(conn, f"SELECT read_ct, last_read_at IS NOT NULL FROM pgmq.a_{name}") == (1, True)
    # Every record-returning function still works and returns the installed layout.
    expected_names = [n for n, _ in (RECORD_1_10 if v110 else RECORD_1_5)]
    send(conn, "after", {"document_id": "x"})
    for query in ("SELECT * FROM pgmq.set_vt('after', 2, 0)",
                  "SELECT * FROM public.pgmq_read('after', 0, 1)",
                  "SELECT * FROM pgmq.read_with_poll('after', 0, 1, 1, 10)",
                  "SELECT * FROM pgmq.pop('after')"):
        with conn.cursor() as cur:
            cur.execute(query)
            assert [d.name for d in cur.description] == expected_names, query
            assert len(cur.fetchall()) == 1, query


# ------------------------------------------------------------------- the PgCluster helper

def test_conninfo_shape(pg_cluster):
    assert pg_cluster.conninfo == f"host=127.0.0.1 port={pg_cluster.port} user=postgres dbname=postgres"
    with contextlib.closing(psycopg2.connect(pg_cluster.dsn)) as conn:   # TCP, like the daemon
        assert (conn.info.host, conn.info.port) == ("127.0.0.1", pg_cluster.port)


def test_cluster_restart_scram_and_cleanup():
    secret = "s3cr3t with space'quote"
    with PgCluster(auth="scram") as pg:
        basedir, port = pg.basedir, pg.port
        pg.set_password("dispatcher", secret)
        good = pg.conninfo_for(user="dispatcher", password=secret)
        psycopg2.connect(good).close()
        with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
            psycopg2.connect(pg.conninfo_for(user="dispatcher", password="wrong")).close()
        with pytest.raises(psycopg2.OperationalError):
            psycopg2.connect(pg.conninfo_for(user="dispatcher")).close()   # no password at all
        with contextlib.closing(pg.connect()) as admin:
            stored = one(admin, "SELECT rolpassword FROM pg_authid WHERE rolname = 'dispatcher'")[0]
        assert stored.startswith("SCRAM-SHA-256$")

        pg.createdb("keep")
        with contextlib.closing(pg.connect("keep")) as conn:
            run(conn, "CREATE TABLE t AS SELECT 42 AS x")
        pg.restart()
        assert pg.port == port and pg.is_running
        with contextlib.closing(pg.connect("keep")) as conn:
            assert one(conn, "SELECT x FROM t") == (42,)          # data survived the restart
        psycopg2.connect(good).close()
        assert secret not in pg.read_log()
    assert not os.path.exists(basedir)


CRASHING_CALLER = """
import signal, sys
sys.path.insert(0, {here!r})
from pgcluster import PgCluster
pg = PgCluster().start()
print(pg.basedir, pg._postmaster_pid(), flush=True)
if sys.argv[1] == "raise":
    raise RuntimeError("caller crashed")
signal.pause()          # wait for SIGTERM
"""


@pytest.mark.parametrize("how", ["raise", "sigterm"])
def test_cluster_is_removed_when_caller_dies(how):
    proc = subprocess.Popen([sys.executable, "-c", CRASHING_CALLER.format(here=HERE), how],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        basedir, pid = proc.stdout.readline().split()
        pid = int(pid)
        assert os.path.isdir(basedir)
        if how == "sigterm":
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == (-signal.SIGTERM if how == "sigterm" else 1)

    def postmaster_gone():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_until(postmaster_gone, TIMEOUT, what="the postmaster to exit")
    assert not os.path.exists(basedir)
