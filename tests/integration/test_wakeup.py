"""Fast and cheap (issue 5): NOTIFY wake-up, debounce, fallback to polling when
notifications are dropped, re-LISTEN and catch-up after a restart, idle
back-off, drain up to max_in_flight and the /run rate cap."""

import json
import re
import socket
import struct
import threading
import time

import pytest

import conftest
from daemon import Daemon, QueueDb, base_env, logfmt
from pgcluster import wait_until

SLOW_POLL = dict(PGMQD_QUEUE_POLL_INTERVAL_MS=60000)   # polling alone would take a minute


def accepted_ids(emu):
    return [j["msg_id"] for r in emu.requests("run") if r.accepted
            for j in json.loads(r.body)["input"]["jobs"]]


def enable_notify(db, throttle_ms=0):
    """The insert trigger of the PGMQ in use (the real 1.5.1 has none: the documented one)."""
    return conftest.enable_insert_notify(db.cluster, db.dbname, db.queue, throttle_ms)


@pytest.mark.parametrize("trigger", ["pgmq", "docs"])
def test_notify_wakes_the_daemon(pg_cluster, make_pgmq_db, emulator, start_daemon, trigger):
    # pgmq >= 1.7's own trigger exists only in the look-alike; the documented one anywhere.
    db = QueueDb(pg_cluster, make_pgmq_db(prefix="wake", fixture=trigger == "pgmq"))
    if trigger == "pgmq":
        db.sql("SELECT pgmq.enable_notify_insert(%s, 0)", (db.queue,))
    else:                                        # the trigger docs/operations.md gives for < 1.7
        pg_cluster.load_sql(conftest.NOTIFY_TRIGGER_PRE_1_7_SQL, db.dbname)
        db.sql("CREATE TRIGGER pgmqd_notify_insert AFTER INSERT ON pgmq.q_jobs "
               "FOR EACH STATEMENT EXECUTE FUNCTION public.pgmqd_notify_insert()")
    queue_db = db
    d = start_daemon("-v", db=db, **SLOW_POLL)
    d.wait_log(r"event=notify_ready .*channel=pgmq.q_jobs.INSERT")
    d.wait_log(r"event=queue_empty")          # the catch-up read at connect
    assert d.count_log(r"event=notify_no_trigger") == 0
    ids = queue_db.send_many([{"document_id": "now"}])
    emulator.wait_for(lambda: accepted_ids(emulator) == ids, timeout_s=10)
    assert d.count_log(r"event=queue_empty") == 1   # no poll in between: the NOTIFY did it
    assert d.stop() == 0
    db.close()


def test_debounce_turns_a_burst_into_few_reads(queue_db, emulator, start_daemon):
    enable_notify(queue_db)
    d = start_daemon("-v", PGMQD_QUEUE_NOTIFY_DEBOUNCE_MS=300, PGMQD_QUEUE_BATCH_SIZE=100,
                     **SLOW_POLL)
    d.wait_log(r"event=notify_ready")
    ids = queue_db.send_many([{"i": i} for i in range(30)])   # 30 transactions, 30 NOTIFYs
    emulator.wait_for(lambda: sorted(accepted_ids(emulator)) == ids, timeout_s=10)
    reads = d.count_log(r"event=batch_read")
    assert reads <= 3, reads
    assert d.stop() == 0


class DropNotifyProxy(threading.Thread):
    """A TCP proxy that forwards the PostgreSQL protocol but drops every
    NotificationResponse ('A') the server sends, as a transaction pooler
    effectively does for LISTEN. Needs sslmode=disable (no SSLRequest)."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.upstream = port
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.dropped = 0

    def run(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self._pipe, args=(client, server), daemon=True).start()
            threading.Thread(target=self._filter, args=(server, client), daemon=True).start()

    @staticmethod
    def _pipe(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            dst.close()

    def _filter(self, src, dst):
        buf = b""
        try:
            while data := src.recv(65536):
                buf += data
                out = b""
                while len(buf) >= 5:
                    length = struct.unpack("!I", buf[1:5])[0]
                    if len(buf) < 1 + length:
                        break
                    msg, buf = buf[:1 + length], buf[1 + length:]
                    if msg[:1] == b"A":
                        self.dropped += 1
                    else:
                        out += msg
                if out:
                    dst.sendall(out)
        except OSError:
            pass
        finally:
            dst.close()


def test_falls_back_to_polling_when_notifications_are_dropped(pg_cluster, queue_db, emulator,
                                                               start_daemon):
    enable_notify(queue_db)
    proxy = DropNotifyProxy(pg_cluster.port)
    proxy.start()
    conninfo = f"host=127.0.0.1 port={proxy.port} dbname={queue_db.dbname} user=postgres sslmode=disable"
    d = start_daemon("-v", PGMQD_DATABASE_CONNINFO=conninfo, PGMQD_QUEUE_POLL_INTERVAL_MS=300,
                     PGMQD_QUEUE_IDLE_POLL_MAX_MS=60000)
    line = d.wait_log(r"event=notify_unavailable")[0].string
    assert "polling" in logfmt(line)["msg"]
    assert proxy.dropped >= 1
    # Polling goes on at poll_interval_ms (no idle back-off without working NOTIFY).
    ids = queue_db.send_many([{"x": 1}])
    emulator.wait_for(lambda: accepted_ids(emulator) == ids, timeout_s=10)
    assert d.count_log(r"event=notify_unavailable") == 1
    assert d.count_log(r"poll_period_ms=[1-9]\d{3,}") == 0
    assert d.stop() == 0


def test_separate_listen_connection(pg_cluster, queue_db, emulator, start_daemon):
    enable_notify(queue_db)
    proxy = DropNotifyProxy(pg_cluster.port)
    proxy.start()
    pooled = f"host=127.0.0.1 port={proxy.port} dbname={queue_db.dbname} user=postgres sslmode=disable"
    d = start_daemon("-v", PGMQD_DATABASE_CONNINFO=pooled,
                     PGMQD_DATABASE_LISTEN_CONNINFO=queue_db.conninfo, **SLOW_POLL)
    d.wait_log(r"event=notify_ready")
    d.wait_log(r"event=queue_empty")
    ids = queue_db.send_many([{"x": 2}])
    emulator.wait_for(lambda: accepted_ids(emulator) == ids, timeout_s=10)
    assert d.count_log(r"event=notify_unavailable") == 0
    assert d.stop() == 0


def test_relisten_and_catch_up_after_restart(pg_cluster, queue_db, emulator, start_daemon):
    # No insert trigger: only a read can find this message, so the read that
    # follows the reconnect is what dispatches it.
    d = start_daemon("-v", **SLOW_POLL)
    d.wait_log(r"event=notify_ready")
    d.wait_log(r"event=queue_empty")
    ids = queue_db.send_many([{"x": 3}])
    pg_cluster.restart(mode="fast")
    queue_db.conn = pg_cluster.connect(queue_db.dbname)
    d.wait_log(r"event=notify_ready", count=2, timeout_s=30)    # LISTEN again
    emulator.wait_for(lambda: accepted_ids(emulator) == ids, timeout_s=15)
    # And NOTIFY works on the new connection.
    enable_notify(queue_db)
    more = queue_db.send_many([{"x": 4}])
    emulator.wait_for(lambda: accepted_ids(emulator) == ids + more, timeout_s=10)
    assert d.stop() == 0


def test_idle_polls_back_off_and_reset(queue_db, emulator, start_daemon):
    enable_notify(queue_db)
    d = start_daemon("-v", PGMQD_QUEUE_POLL_INTERVAL_MS=100, PGMQD_QUEUE_IDLE_POLL_MAX_MS=800)
    d.wait_log(r"event=notify_ready")
    d.wait_log(r"poll_period_ms=800\b")          # 100 → 200 → 400 → 800, then stays
    # Two more empty reads at the cap: the first one would log 1600 were the
    # cap ignored, and the second comes after that line would have been.
    empty = d.count_log(r"event=queue_empty")
    d.wait_log(r"event=queue_empty", count=empty + 2, timeout_s=30)
    periods = [int(m.group(1)) for m in
               (re.search(r"poll_period_ms=(\d+)", line) for line in d.lines) if m]
    assert max(periods) == 800, periods
    queue_db.send_many([{"x": 5}])               # a NOTIFY resets the period
    d.wait_log(r"poll_period_ms=100\b")
    emulator.wait_for(lambda: len(accepted_ids(emulator)) == 1, timeout_s=10)
    d.wait_log(r"poll_period_ms=800\b", count=2)
    assert d.stop() == 0


def test_drain_stops_at_max_in_flight(queue_db, emulator, start_daemon):
    ids = queue_db.send_many([{"i": i} for i in range(100)])
    emulator.hold_runs()
    d = start_daemon("-v", PGMQD_QUEUE_MAX_IN_FLIGHT=4)
    try:
        emulator.wait_for(lambda: emulator.in_flight_run == 4, timeout_s=10)
        # Held at 4: the daemon waits for a slot instead of reading more.
        d.wait_log(r"event=batch_read", count=4)
        assert d.count_log(r"event=batch_read") == 4
    finally:
        emulator.release_runs()
    emulator.wait_for(lambda: sorted(accepted_ids(emulator)) == ids, timeout_s=20)
    assert emulator.max_concurrent_run == 4
    assert d.stop() == 0


def test_rate_cap_per_10s_window(queue_db, emulator, start_daemon):
    ids = queue_db.send_many([{"i": i} for i in range(5)])
    d = start_daemon("-v", PGMQD_QUEUE_BATCH_SIZE=1, PGMQD_RUNPOD_MAX_REQUESTS_PER_10S=3)
    emulator.wait_for(lambda: sorted(accepted_ids(emulator)) == ids, timeout_s=25)
    times = sorted(r.received_at for r in emulator.requests("run"))
    for t in times:
        assert sum(1 for u in times if t <= u < t + 10.0) <= 3, times
    assert d.count_log(r"event=rate_limited") >= 1
    assert emulator.requests("run") and all(r.status == 200 for r in emulator.requests("run"))
    assert d.stop() == 0


def test_no_insert_trigger_means_no_idle_back_off(queue_db, emulator, start_daemon):
    d = start_daemon("-v", PGMQD_QUEUE_POLL_INTERVAL_MS=100, PGMQD_QUEUE_IDLE_POLL_MAX_MS=800)
    d.wait_log(r"event=notify_ready")
    d.wait_log(r"event=notify_no_trigger")
    d.wait_log(r"event=queue_empty", count=6)
    assert d.count_log(r"poll_period_ms=200\b") == 0     # stays at poll_interval_ms
    assert d.count_log(r"event=notify_no_trigger") == 1
    assert d.stop() == 0


def test_an_update_only_trigger_is_no_insert_trigger(queue_db, emulator, start_daemon):
    # Issue 10 defect 2: only a trigger that fires on INSERT notifies of inserts.
    queue_db.sql("CREATE FUNCTION public.pgmqd_on_update() RETURNS trigger LANGUAGE plpgsql "
                 "AS $$BEGIN RETURN NULL; END$$")
    queue_db.sql("CREATE TRIGGER on_update AFTER UPDATE ON pgmq.q_jobs "
                 "FOR EACH STATEMENT EXECUTE FUNCTION public.pgmqd_on_update()")
    d = start_daemon("-v", PGMQD_QUEUE_POLL_INTERVAL_MS=100, PGMQD_QUEUE_IDLE_POLL_MAX_MS=800)
    d.wait_log(r"event=notify_ready")
    d.wait_log(r"event=notify_no_trigger")
    d.wait_log(r"event=queue_empty", count=6)
    assert d.count_log(r"poll_period_ms=200\b") == 0     # no back-off: nothing will notify
    assert d.stop() == 0


def test_a_trigger_created_or_dropped_while_running_is_noticed(queue_db, emulator, start_daemon):
    d = start_daemon("-v", PGMQD_QUEUE_POLL_INTERVAL_MS=100, PGMQD_QUEUE_IDLE_POLL_MAX_MS=800)
    d.wait_log(r"event=notify_ready")
    d.wait_log(r"event=notify_no_trigger")
    enable_notify(queue_db)                   # created while running: idle polls back off
    d.wait_log(r"event=notify_trigger_found", timeout_s=30)
    d.wait_log(r"poll_period_ms=800\b", timeout_s=10)
    triggers = [r[0] for r in queue_db.sql(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = 'pgmq.q_jobs'::regclass AND NOT tgisinternal")]
    for name in triggers:                     # dropped while running: back to poll_interval_ms
        queue_db.sql(f'DROP TRIGGER "{name}" ON pgmq.q_jobs')
    d.wait_log(r"event=notify_no_trigger", count=2, timeout_s=10)
    d.wait_log(r"poll_period_ms=100\b", timeout_s=10)
    ids = queue_db.send_many([{"x": 5}])
    emulator.wait_for(lambda: accepted_ids(emulator) == ids, timeout_s=5)
    assert d.stop() == 0


def test_a_missing_queue_says_so_with_the_create_call(queue_db, emulator, start_daemon):
    d = start_daemon("-v", PGMQD_QUEUE_NAME="no_such_queue")
    line = d.wait_log(r"event=queue_missing")[0].string
    assert logfmt(line)["fix"] == "SELECT pgmq.create('no_such_queue');", line
    assert logfmt(line)["level"] == "warn"
    d.wait_log(r"event=notify_ready")
    assert d.count_log(r"event=notify_no_trigger") == 0
    assert d.stop() == 0


def test_the_self_test_session_is_named_for_what_it_is(pg_cluster, queue_db, emulator, tmp_path):
    """The NOTIFY self-test's one-off session is `pgmq-dispatcher self-test` in
    pg_stat_activity and the server log even when database.conninfo names the daemon's own
    sessions (application_name), as docs/operations.md says: an operator, or a check of the
    daemon's sessions by name, does not take it for one of them."""
    admin = pg_cluster.connect()
    with admin.cursor() as cur:
        cur.execute("ALTER SYSTEM SET log_connections = on")
        cur.execute("SELECT pg_reload_conf()")
    try:
        conf = tmp_path / "d.conf"
        conf.write_text(f"[database]\nconninfo = {queue_db.conninfo} application_name=mine\n")
        d = Daemon(base_env(queue_db, emulator, PGMQD_DATABASE_CONNINFO=None),
                   args=["-vv", "-c", str(conf)]).start()
        d.wait_log(r"event=notify_ready")
        names = re.findall(rf"connection authorized: .*database={re.escape(queue_db.dbname)} "
                           r"application_name=(.*)$", pg_cluster.read_log(), re.M)
        assert "pgmq-dispatcher self-test" in names, names
        assert "mine" in names, names
        assert d.stop() == 0
    finally:
        with admin.cursor() as cur:
            cur.execute("ALTER SYSTEM RESET log_connections")
            cur.execute("SELECT pg_reload_conf()")
        admin.close()
