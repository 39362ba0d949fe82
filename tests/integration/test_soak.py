"""Soak (issue 3): 20,000 messages through a faulty RunPod, two PostgreSQL
restarts and one SIGKILL of the daemon. Run with `make soak` (CI does).

A stand-in worker deletes the messages of every accepted job, as the real
RunPod worker does, so that an accepted message does not come back when its
(short) vt runs out. At the end every msg_id was accepted at least once,
the duplicates are bounded by what the daemon logged as outcome unknown
plus what was in flight at the kill, and the queue is empty.
"""

import collections
import json
import os
import re
import threading
import time

import psycopg2
import pytest

from daemon import Daemon, Fault, QueueDb, base_env

pytestmark = pytest.mark.soak

N = int(os.environ.get("SOAK_MESSAGES", "20000"))
BATCH = 10
MAX_IN_FLIGHT = 8


class Worker(threading.Thread):
    """Deletes the msg_ids of accepted /run requests, like the RunPod worker."""

    def __init__(self, emulator, dsn):
        super().__init__(daemon=True)
        self.emulator, self.dsn = emulator, dsn
        self.done = set()  # seq of records handled (they complete out of order)
        self.stop = threading.Event()
        self.deleted = 0

    def run(self):
        conn = None
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = psycopg2.connect(self.dsn)
                    conn.autocommit = True
                recs = [r for r in self.emulator.requests("run") if r.seq not in self.done]
                ids = [j["msg_id"] for r in recs if r.accepted
                       for j in json.loads(r.body)["input"]["jobs"]]
                if ids:
                    with conn.cursor() as cur:
                        cur.execute("SELECT count(*) FROM pgmq.delete('jobs', %s::bigint[])", (ids,))
                        self.deleted += cur.fetchone()[0]
                self.done.update(r.seq for r in recs)
            except psycopg2.Error:
                conn = None  # PostgreSQL is restarting: try again
            self.stop.wait(0.05)


def test_soak(pg_cluster, make_pgmq_db, emulator):
    started = time.monotonic()
    db = QueueDb(pg_cluster, make_pgmq_db(prefix="soak"))
    db.sql("SELECT count(*) FROM pgmq.send_batch('jobs', ARRAY(SELECT jsonb_build_object("
           "'document_id', 'doc-' || g, 'media_url', 'https://media.example.com/' || g || '.mp4') "
           "FROM generate_series(1, %s) g))", (N,))
    ids = [r[0] for r in db.sql("SELECT msg_id FROM pgmq.q_jobs ORDER BY msg_id")]
    assert len(ids) == N
    emulator.seed = 7
    emulator.add_random_fault(Fault.status(500), 0.10)
    emulator.add_random_fault(Fault.delay(2.0), 0.02)        # > request_timeout_ms: timeouts
    emulator.add_random_fault(Fault.reset(), 0.01)
    env = base_env(db, emulator, PGMQD_QUEUE_VT_SECONDS=20, PGMQD_QUEUE_POLL_INTERVAL_MS=100,
                   PGMQD_QUEUE_BATCH_SIZE=BATCH, PGMQD_QUEUE_MAX_IN_FLIGHT=MAX_IN_FLIGHT,
                   PGMQD_RUNPOD_REQUEST_TIMEOUT_MS=1000, PGMQD_RUNPOD_BACKOFF_BASE_MS=50,
                   PGMQD_RUNPOD_BACKOFF_MAX_MS=500)
    worker = Worker(emulator, pg_cluster.conninfo_for(db.dbname))
    worker.start()
    daemons = [Daemon(env, args=[]).start()]

    def accepted_ids():
        return [j["msg_id"] for r in emulator.requests("run") if r.accepted
                for j in json.loads(r.body)["input"]["jobs"]]

    def reach(fraction):
        emulator.wait_for(lambda: len(set(accepted_ids())) >= fraction * N, timeout_s=240,
                          what=f"{fraction:.0%} accepted")

    try:
        reach(0.25)
        pg_cluster.restart(mode="fast")
        db.conn = pg_cluster.connect(db.dbname)
        reach(0.50)
        in_flight_at_kill = emulator.in_flight_run
        daemons[0].proc.kill()
        daemons[0].wait_exit()
        daemons.append(Daemon(env, args=[]).start())
        reach(0.75)
        pg_cluster.restart(mode="fast")
        db.conn = pg_cluster.connect(db.dbname)
        reach(1.0)
        emulator.wait_for(lambda: db.sql("SELECT count(*) FROM pgmq.q_jobs")[0][0] == 0,
                          timeout_s=120, what="the worker to delete every message")
    finally:
        worker.stop.set()
        worker.join(timeout=10)
        assert daemons[-1].stop() == 0

    got = accepted_ids()
    counts = collections.Counter(got)
    duplicates = sum(c - 1 for c in counts.values())
    unknown = set()
    for d in daemons:
        for line in d.lines:
            m = re.search(r"event=outcome_unknown_ids .*msg_ids=(\S+)", line)
            if m:
                unknown.update(int(i) for i in m.group(1).strip('"').split(","))
    runs = emulator.requests("run")
    by_status = collections.Counter(r.status for r in runs)
    elapsed = time.monotonic() - started
    print(f"\nsoak: {N} messages in {elapsed:.1f} s; /run requests {len(runs)}, by status "
          f"{dict(sorted(by_status.items(), key=lambda kv: str(kv[0])))}; accepted ids {len(got)} "
          f"(distinct {len(counts)}); duplicates {duplicates}; logged outcome unknown "
          f"{len(unknown)} ids; in flight at the kill {in_flight_at_kill} requests; "
          f"rejected {sum(d.count_log('event=batch_rejected') for d in daemons)}; "
          f"db reconnects {sum(d.count_log('event=db_connected') for d in daemons) - len(daemons)}; "
          f"deleted by the worker {worker.deleted}")
    assert set(counts) == set(ids)                                      # nothing lost
    assert duplicates <= len(unknown) + in_flight_at_kill * BATCH + MAX_IN_FLIGHT * BATCH
    assert db.sql("SELECT count(*) FROM pgmq.q_jobs")[0][0] == 0          # nothing left invisible
    db.close()
