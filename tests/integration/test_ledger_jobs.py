"""The ledger's jobs (issue 12): lost and failed jobs come back after tracker.retry_delay_s and
the ledger records it; /dispatches on the admin endpoint serves what `status --json` and
`jobs --json` print; a message archived by the poison guard is seen there and redriven.

Every wait is on a condition with a deadline."""

import json
import re
import shutil
import threading
import time
import urllib.error
import urllib.request

import pytest

from daemon import Daemon, base_env, run_once
from ledger_helpers import SCHEMA, accepted_runs, admin_url, rows, states_of
from pgcluster import wait_until
from test_valgrind import VALGRIND

RETRY_DELAY_S = 3
# A long vt (the default 1800 s): a message that comes back early was released, not expired.
TRACKER = dict(PGMQD_LEDGER_ENABLED="on", PGMQD_TRACKER_ENABLED="on",
               PGMQD_TRACKER_INTERVAL_MS=200, PGMQD_TRACKER_RETRY_DELAY_S=RETRY_DELAY_S,
               PGMQD_QUEUE_IDLE_POLL_MAX_MS=200)


def get(d, path):
    """(status, content type, body text) of GET path on the daemon's admin listener."""
    try:
        with urllib.request.urlopen(admin_url(d, path), timeout=15) as r:
            return r.status, r.headers.get("Content-Type"), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read().decode()


# ---- lost and failed jobs ----

def back_after(emu, db, ids, t0):
    """Waits for the second /run carrying ids; returns the seconds since t0."""
    emu.wait_for(lambda: len(accepted_runs(emu)) >= 2, timeout_s=RETRY_DELAY_S + 20)
    again = time.monotonic() - t0
    assert sorted(j["msg_id"] for j in accepted_runs(emu)[1].json["input"]["jobs"]) == ids
    return again


@pytest.mark.parametrize("case", ["FAILED", "CANCELLED", "TIMED_OUT", "lost"])
def test_failed_cancelled_timed_out_or_lost_job_comes_back_after_retry_delay(
        queue_db, emulator, start_daemon, case):
    # The first job waits in the queue long enough for the test to act; later ones finish.
    plans = {"FAILED": {"in_queue_s": 0.3, "run_s": 0.3, "final_status": "FAILED"},
             "TIMED_OUT": {"in_queue_s": 0.3, "run_s": 0.3, "final_status": "TIMED_OUT"},
             "CANCELLED": {"in_queue_s": 600, "run_s": 1},
             "lost": {"in_queue_s": 600, "run_s": 1}}
    first = {"done": False}

    def plan(job_input):
        if first["done"]:
            return {"in_queue_s": 600, "run_s": 1}   # the second job stays queued
        first["done"] = True
        return plans[case]

    emulator.job_plan = plan
    ids = queue_db.send_many([{"n": 1}, {"n": 2}])
    d = start_daemon("-v", **TRACKER)
    d.wait_log(r"event=ledger_ready")
    wait_until(lambda: rows(queue_db) and rows(queue_db)[0][2], 15, what="an accepted job")
    job_id = rows(queue_db)[0][2]
    if case == "CANCELLED":
        req = urllib.request.Request(emulator.url("cancel", job_id), method="POST", data=b"",
                                     headers={"Authorization": f"Bearer {emulator.api_key}"})
        urllib.request.urlopen(req, timeout=5).read()
    elif case == "lost":
        assert emulator.forget(job_id)
    # The terminal status (or the 404) is seen, then the release is recorded.
    final = "lost" if case == "lost" else case
    d.wait_log(r"event=early_release .*runpod_job_id=" + re.escape(job_id), timeout_s=15)
    t0 = time.monotonic()
    wait_until(lambda: rows(queue_db)[0][1] == "released", 10, what="released")
    first_row = rows(queue_db)[0]
    assert first_row[2] == job_id and sorted(first_row[3]) == ids
    seen = states_of(first_row[6])
    assert seen[-2:] == [final, "released"], seen
    assert seen[:2] == ["sending", "accepted"], seen
    if case == "lost":
        assert "404" in first_row[7]
    # Invisible until the retry delay is over, then read again (read_ct 2) and sent again.
    vt = queue_db.sql("SELECT max(extract(epoch FROM vt - clock_timestamp()))::float "
                      "FROM pgmq.q_jobs")[0][0]
    assert 0 < vt <= RETRY_DELAY_S + 0.5, vt
    again = back_after(emulator, queue_db, ids, t0)
    assert again >= vt - 0.5 and again < RETRY_DELAY_S + 5, (again, vt)
    assert queue_db.sql("SELECT array_agg(read_ct) FROM pgmq.q_jobs")[0][0] == [2, 2]
    wait_until(lambda: len(rows(queue_db)) == 2 and rows(queue_db)[1][1] == "accepted", 10,
               what="the second dispatch accepted")
    # No lease is left behind by the ended job.
    assert queue_db.sql(f"SELECT count(*) FROM {SCHEMA}.lease WHERE dispatch_id = %s::uuid",
                        (first_row[0],))[0][0] == 0
    d.stop()


# ---- GET /dispatches ----

def cli_json(env, *args):
    rc, out = run_once(env, *args, "--json")
    assert rc == 0, out
    return json.loads("\n".join(out))


def test_dispatches_serves_status_and_jobs_as_json(queue_db, emulator, start_daemon):
    ids = queue_db.send_many([{"n": i} for i in range(5)])
    env = base_env(queue_db, emulator, PGMQD_LEDGER_ENABLED="on")
    d = start_daemon(PGMQD_LEDGER_ENABLED="on", PGMQD_QUEUE_BATCH_SIZE="2")
    d.wait_log(r"event=ledger_ready")
    wait_until(lambda: len(rows(queue_db, "state = 'accepted'")) == 3, 15, what="3 accepted")
    # msg_id repeated and comma-separated: the same rows as `status --json`.
    code, ctype, body = get(d, f"/dispatches?msg_id={ids[0]},{ids[3]}&msg_id={ids[4]}")
    assert code == 200 and ctype == "application/json", body
    got = json.loads(body)
    assert got == cli_json(env, "status", str(ids[0]), str(ids[3]), str(ids[4]))
    assert [r["msg_id"] for r in got] == [ids[0], ids[3], ids[4]]
    assert all(r["state"] == "accepted" and r["now_in"] == "queue" for r in got)
    assert {r["job_id"] for r in got} <= {j["id"] for j in emulator.jobs()}
    # The jobs listing, filtered and bounded, as `jobs --json`.
    code, ctype, body = get(d, "/dispatches?state=accepted&since=10m&limit=2")
    assert code == 200, body
    got = json.loads(body)
    assert got == cli_json(env, "jobs", "--state", "accepted", "--since", "10m", "--limit", "2")
    assert len(got) == 2 and all(r["state"] == "accepted" for r in got)
    code, _, body = get(d, "/dispatches")
    assert code == 200 and len(json.loads(body)) == 3
    head = urllib.request.Request(admin_url(d, "/dispatches?limit=1"), method="HEAD")
    with urllib.request.urlopen(head, timeout=15) as r:
        assert r.status == 200 and r.headers.get("Content-Type") == "application/json"
        assert r.read() == b""
    code, _, body = get(d, "/dispatches?state=FAILED")
    assert code == 200 and json.loads(body) == []
    since = queue_db.sql("SELECT to_char(now() - interval '1 hour', 'YYYY-MM-DD HH24:MI:SSOF')")[0][0]
    code, _, body = get(d, "/dispatches?since=" + urllib.request.quote(since))
    assert code == 200 and len(json.loads(body)) == 3, body
    # Bad parameters: 400, one line naming the parameter.
    for query, name in [("msg_id=abc", "msg_id"), ("msg_id=", "msg_id"), ("msg_id=1,,2", "msg_id"),
                        ("msg_id=0", "msg_id"), ("limit=0", "limit"), ("limit=1001", "limit"),
                        ("limit=x", "limit"), ("state=a%3Bb", "state"), ("since=yesterdayish", "since"),
                        ("colour=red", "colour"), (f"msg_id={ids[0]}&state=accepted", "msg_id"),
                        ("state=accepted&state=FAILED", "state"),
                        ("msg_id=" + ",".join(str(i) for i in range(1, 102)), "msg_id")]:
        code, ctype, body = get(d, "/dispatches?" + query)
        assert code == 400, (query, code, body)
        assert body.endswith("\n") and body.count("\n") == 1, (query, body)
        assert body.startswith(name + ":") or f"'{name}'" in body, (query, body)
    # The largest limit is served.
    code, _, body = get(d, "/dispatches?limit=1000")
    assert code == 200 and len(json.loads(body)) == 3
    d.stop()


def test_dispatches_never_blocks_the_loop_and_times_out(queue_db, emulator, start_daemon, pg_cluster):
    """A query that cannot finish (the table locked by another session) leaves /healthz and
    /metrics answering at once, and /dispatches is answered 503 after its timeout."""
    queue_db.send_many([{"n": 1}])
    d = start_daemon(PGMQD_LEDGER_ENABLED="on")
    d.wait_log(r"event=ledger_ready")
    wait_until(lambda: rows(queue_db, "state = 'accepted'"), 15, what="accepted")
    locker = pg_cluster.connect(queue_db.dbname, autocommit=False)
    try:
        with locker.cursor() as cur:
            cur.execute(f"LOCK TABLE {SCHEMA}.dispatch IN ACCESS EXCLUSIVE MODE")
            result = {}
            worker = threading.Thread(target=lambda: result.update(r=get(d, "/dispatches")))
            t0 = time.monotonic()
            worker.start()
            wait_until(lambda: queue_db.sql(
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = %s::regclass",
                (f"{SCHEMA}.dispatch",))[0][0] >= 1, 10, what="the /dispatches query waiting")
            for _ in range(5):
                t1 = time.monotonic()
                assert get(d, "/healthz")[0] == 200 and get(d, "/metrics")[0] == 200
                assert time.monotonic() - t1 < 2.0
            assert worker.is_alive()
            worker.join(timeout=30)
            code, _, body = result["r"]
            assert code == 503 and "within 10 s" in body, body
            assert 9 < time.monotonic() - t0 < 20
        locker.rollback()
    finally:
        locker.close()
    # Once the lock is gone the same connection answers again.
    code, _, body = get(d, "/dispatches")
    assert code == 200 and len(json.loads(body)) == 1, body
    d.stop()


def test_dispatches_with_the_ledger_off_is_404(queue_db, emulator, start_daemon):
    d = start_daemon(PGMQD_LEDGER_ENABLED="off")
    d.wait_log(r"event=started")
    code, _, body = get(d, "/dispatches?msg_id=1")
    assert code == 404 and "ledger.enabled = off" in body, body
    d.stop()


def test_poison_archived_message_in_dispatches_then_redriven(queue_db, emulator, start_daemon):
    """Archived by the poison guard (queue.max_read_ct): /dispatches and status say so; after
    `redrive` it is dispatched again and /dispatches tells the whole story."""
    (mid,) = queue_db.send_many([{"poison": True}])
    queue_db.sql("SELECT * FROM pgmq.read('jobs', 0, 1)")     # read once already
    env = base_env(queue_db, emulator, PGMQD_QUEUE_MAX_READ_CT="1", PGMQD_LEDGER_ENABLED="on")
    d = start_daemon(PGMQD_QUEUE_MAX_READ_CT="1", PGMQD_LEDGER_ENABLED="on")
    d.wait_log(r"event=ledger_ready")
    wait_until(lambda: rows(queue_db) and rows(queue_db)[0][1] == "archived", 15, what="archived")
    code, _, body = get(d, f"/dispatches?msg_id={mid}")
    assert code == 200, body
    (row,) = json.loads(body)
    assert row["msg_id"] == mid and row["now_in"] == "archive" and row["state"] == "archived"
    assert row["read_ct"] == 2 and row["job_id"] is None
    assert json.loads(body) == cli_json(env, "status", str(mid))
    assert not accepted_runs(emulator)
    rc, out = run_once(env, "redrive", str(mid))
    assert rc == 0 and "1 message(s) redriven" in "\n".join(out), out
    # The running daemon reads it again (read_ct 0 → 1 passes the guard) and sends it.
    emulator.wait_for(lambda: len(accepted_runs(emulator)) == 1, timeout_s=15)
    assert [j["msg_id"] for j in accepted_runs(emulator)[0].json["input"]["jobs"]] == [mid]
    wait_until(lambda: [r[1] for r in rows(queue_db)] == ["archived", "redriven", "accepted"], 10,
               what="archived, redriven, accepted")
    code, _, body = get(d, f"/dispatches?msg_id={mid}")
    got = json.loads(body)
    assert [r["state"] for r in got] == ["archived", "redriven", "accepted"]
    assert got[-1]["job_id"] == emulator.jobs()[0]["id"] and got[-1]["now_in"] == "queue"
    code, _, body = get(d, "/dispatches?state=redriven")
    assert [r["first_msg_id"] for r in json.loads(body)] == [mid]
    d.stop()


def test_stop_while_a_dispatches_request_waits(queue_db, emulator, start_daemon, pg_cluster):
    """SIGTERM with a /dispatches request suspended: the client gets an answer or a closed
    connection, the daemon exits 0 (no crash, no sanitizer report at teardown)."""
    d = start_daemon(PGMQD_LEDGER_ENABLED="on")
    d.wait_log(r"event=ledger_ready")
    locker = pg_cluster.connect(queue_db.dbname, autocommit=False)
    try:
        with locker.cursor() as cur:
            # The archive: only the status query reads it, the daemon's connection does not.
            cur.execute("LOCK TABLE pgmq.a_jobs IN ACCESS EXCLUSIVE MODE")
            result = {}

            def ask():
                try:
                    result["r"] = get(d, "/dispatches?msg_id=1")
                except Exception as e:   # the connection closed at shutdown
                    result["r"] = e

            worker = threading.Thread(target=ask)
            worker.start()
            wait_until(lambda: queue_db.sql(
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = %s::regclass",
                ("pgmq.a_jobs",))[0][0] >= 1, 10, what="the /dispatches query waiting")
            assert d.stop() == 0
            worker.join(timeout=15)
            assert not worker.is_alive()
            # Answered 503 by the shutdown, or the connection closed under it.
            r = result["r"]
            assert isinstance(r, Exception) or (r[0] == 503 and r[2].endswith("\n")), r
            locker.rollback()
    finally:
        locker.close()


@pytest.mark.valgrind
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_dispatches_under_valgrind(queue_db, emulator, pg_cluster):
    """memcheck over /dispatches: answered, refused (400), and suspended at shutdown."""
    ids = queue_db.send_many([{"n": i} for i in range(3)])
    d = Daemon(base_env(queue_db, emulator, PGMQD_LEDGER_ENABLED="on"), args=["-v"])
    d.binary, d.args = VALGRIND[0], VALGRIND[1:] + [d.binary, "-v"]
    d.start()
    locker = pg_cluster.connect(queue_db.dbname, autocommit=False)
    try:
        d.wait_log(r"event=ledger_ready", timeout_s=60)
        wait_until(lambda: rows(queue_db, "state = 'accepted'"), 60, what="accepted")
        assert get(d, f"/dispatches?msg_id={ids[0]},{ids[2]}")[0] == 200
        assert get(d, "/dispatches?state=accepted&since=1h&limit=5")[0] == 200
        assert get(d, "/dispatches?limit=0")[0] == 400
        with locker.cursor() as cur:
            cur.execute("LOCK TABLE pgmq.a_jobs IN ACCESS EXCLUSIVE MODE")
            worker = threading.Thread(target=lambda: get_or_closed(d, f"/dispatches?msg_id={ids[1]}"))
            worker.start()
            wait_until(lambda: queue_db.sql(
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = %s::regclass",
                ("pgmq.a_jobs",))[0][0] >= 1, 30, what="the /dispatches query waiting")
            rc = d.stop(timeout_s=60)
            worker.join(timeout=30)
            locker.rollback()
    finally:
        locker.close()
        if d.proc.poll() is None:
            d.proc.kill()
    summary = [l for l in d.lines if re.search(r"ERROR SUMMARY|definitely lost|indirectly lost", l)]
    print("\n" + "\n".join(summary))
    assert rc == 0, "\n".join(d.lines[-60:])
    assert any("ERROR SUMMARY: 0 errors" in l for l in summary), summary


def get_or_closed(d, path):
    try:
        return get(d, path)
    except Exception as e:  # the connection closed at shutdown
        return e
