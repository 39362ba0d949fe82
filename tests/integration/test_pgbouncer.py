"""A real pooler (issue 11 item 6): Debian's PgBouncer in pool_mode = transaction in front of the
test database, as Supabase's port 6543 behaves. Dispatch works through it; LISTEN through it is
unusable and must be reported so (issue 10 defect 1); a direct listen_conninfo restores
wake-ups; a PgBouncer restart mid-run loses no message and duplicates none.
"""

import collections
import json
import signal

import pytest

import conftest
from daemon import Daemon, assert_no_sanitizer_report, base_env
from pgbouncer import PgBouncer
from pgcluster import wait_until

SLOW_POLL = dict(PGMQD_QUEUE_POLL_INTERVAL_MS=60000)   # polling alone would take a minute


def accepted_ids(emu):
    return [j["msg_id"] for r in emu.requests("run") if r.accepted
            for j in json.loads(r.body)["input"]["jobs"]]


@pytest.fixture
def bouncer(pg_cluster):
    with PgBouncer(pg_cluster, pool_mode="transaction") as b:
        yield b


def transactions_through(bouncer, dbname):
    rows = [r for r in bouncer.show("STATS") if r["database"] == dbname]
    return int(rows[0]["total_xact_count"]) if rows else 0


def test_dispatch_through_pgbouncer_transaction_mode(queue_db, emulator, start_daemon, bouncer):
    assert bouncer.show("CONFIG") and any(
        r["key"] == "pool_mode" and r["value"] == "transaction" for r in bouncer.show("CONFIG"))
    ids = queue_db.send_many([{"document_id": f"b{i}"} for i in range(25)])
    d = start_daemon("-v", PGMQD_DATABASE_CONNINFO=bouncer.conninfo_for(queue_db.dbname))
    emulator.wait_for(lambda: sorted(accepted_ids(emulator)) == ids, timeout_s=20)
    # Accepted messages stay invisible (the worker owns them), each read once.
    rows = queue_db.rows()
    assert sorted(rows) == ids and all(r["invisible"] and r["read_ct"] == 1 for r in rows.values())
    # The reads, set_vt and archives really went through the pooler.
    assert transactions_through(bouncer, queue_db.dbname) >= 6
    assert d.stop() == 0


def test_listen_through_transaction_pooler_is_reported_unusable_and_the_daemon_polls(
        queue_db, emulator, start_daemon, bouncer):
    conftest.enable_insert_notify(queue_db.cluster, queue_db.dbname, queue_db.queue)
    d = start_daemon("-v", PGMQD_DATABASE_CONNINFO=bouncer.conninfo_for(queue_db.dbname),
                     PGMQD_QUEUE_POLL_INTERVAL_MS=300, PGMQD_QUEUE_IDLE_POLL_MAX_MS=60000)
    verdict = d.wait_log(r"event=notify_(ready|unavailable)", timeout_s=20)[0].group(0)
    assert verdict == "event=notify_unavailable", d.output[-3000:]
    # Polling at poll_interval_ms, no idle back-off: an insert goes out within a few polls.
    ids = queue_db.send_many([{"x": 1}])
    emulator.wait_for(lambda: accepted_ids(emulator) == ids, timeout_s=10)
    more = queue_db.send_many([{"x": 2}])
    emulator.wait_for(lambda: accepted_ids(emulator) == ids + more, timeout_s=10)
    assert d.count_log(r"event=notify_unavailable") == 1
    assert d.count_log(r"event=notify_ready") == 0
    assert d.count_log(r"poll_period_ms=[1-9]\d{3,}") == 0
    assert d.stop() == 0


def test_listen_conninfo_direct_restores_wakeups(queue_db, emulator, start_daemon, bouncer):
    conftest.enable_insert_notify(queue_db.cluster, queue_db.dbname, queue_db.queue)
    d = start_daemon("-v", PGMQD_DATABASE_CONNINFO=bouncer.conninfo_for(queue_db.dbname),
                     PGMQD_DATABASE_LISTEN_CONNINFO=queue_db.conninfo, **SLOW_POLL)
    d.wait_log(r"event=notify_ready")
    d.wait_log(r"event=queue_empty")          # the catch-up read at connect
    ids = queue_db.send_many([{"document_id": "wake"}])
    # Polling alone would take a minute (SLOW_POLL): accepted within 10 s is the NOTIFY's doing.
    emulator.wait_for(lambda: accepted_ids(emulator) == ids, timeout_s=10)
    # Each connection that comes up (main through the pooler, LISTEN direct) asks for a
    # catch-up read; the second may land before or after the insert (or merge with the
    # first), so at most two empty reads: never a poll's.
    assert d.count_log(r"event=queue_empty") <= 2
    assert d.count_log(r"event=notify_unavailable") == 0
    assert d.stop() == 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["safe", "immediate"])
def test_pgbouncer_restart_mid_run_loses_none_and_duplicates_none(queue_db, emulator,
                                                                   start_daemon, bouncer, sig):
    n = 300
    ids = queue_db.send_many([{"document_id": f"r{i}"} for i in range(n)])
    emulator.latency_s = 0.02                      # keep the run going while PgBouncer restarts
    # vt 10 s: a read whose reply the restart cut off comes back within the test; the "worker"
    # below deletes what RunPod accepted, as a real one does when done, long before that.
    d = start_daemon("-v", PGMQD_DATABASE_CONNINFO=bouncer.conninfo_for(queue_db.dbname),
                     PGMQD_QUEUE_BATCH_SIZE=5, PGMQD_QUEUE_MAX_IN_FLIGHT=2,
                     PGMQD_QUEUE_VT_SECONDS=10, PGMQD_QUEUE_POLL_INTERVAL_MS=200)

    def worker_done():
        sent = accepted_ids(emulator)
        if sent:
            queue_db.sql("SELECT pgmq.delete(%s, %s::bigint[])", (queue_db.queue, sent))
        left = queue_db.sql("SELECT count(*) FROM pgmq.q_jobs")[0][0]
        return left == 0 and set(sent) == set(ids)

    wait_until(lambda: worker_done() or len(accepted_ids(emulator)) >= 40, 20, interval=0.05,
               what="40 messages accepted")
    bouncer.restart(sig)
    restarted_at = len(accepted_ids(emulator))
    assert restarted_at < n, "the run ended before the restart: make it longer"
    d.wait_log(r"event=db_(connection_lost|connect_failed)", timeout_s=20)
    d.wait_log(r"event=db_connected", count=2, timeout_s=30)
    wait_until(worker_done, 60, interval=0.1, what="every message accepted and deleted")
    assert d.stop() == 0
    sent = accepted_ids(emulator)
    duplicates = [i for i, c in collections.Counter(sent).items() if c > 1]
    assert duplicates == [] and sorted(sent) == ids, duplicates
    print(f"\nPgBouncer {signal.Signals(sig).name} after {restarted_at} of {n} accepted; "
          f"read_fate_unknown {d.count_log('event=read_fate_unknown')}, "
          f"outcome unknown {d.count_log('event=batch_outcome_unknown')}")


def test_exit_with_the_database_gone_and_statements_queued(queue_db, emulator, pg_cluster):
    """The pooler goes away while releases (after 429s) wait for the database, then the daemon
    stops: pg_free fails the queued statements, and their callbacks must find neither the
    ledger nor the tracker freed before (a heap-use-after-free under make SANITIZE=1)."""
    queue_db.sql("SELECT count(*) FROM pgmq.send_batch('jobs', ARRAY(SELECT "
                 "jsonb_build_object('n', g) FROM generate_series(1, 3000) g))")
    emulator.rate_cap, emulator.rate_window_s = 50, 5.0
    with PgBouncer(pg_cluster, pool_mode="transaction") as b:
        d = Daemon(base_env(
            queue_db, emulator, PGMQD_DATABASE_CONNINFO=b.conninfo_for(queue_db.dbname),
            PGMQD_QUEUE_BATCH_SIZE=1, PGMQD_QUEUE_MAX_IN_FLIGHT=32), args=("-v",)).start()
        emulator.wait_for(lambda: sum(1 for r in emulator.requests("run") if r.status == 429)
                          >= 10, timeout_s=30)
    d.stop()
    assert "release_failed" in d.output  # statements were still queued at exit
    assert_no_sanitizer_report(d.output)
