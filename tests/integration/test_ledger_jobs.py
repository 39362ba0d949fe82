"""The ledger's jobs (issue 12): lost and failed jobs come back after tracker.retry_delay_s and
the ledger records it; /dispatches on the admin endpoint serves what `status --json` and
`jobs --json` print; a message archived by the poison guard is seen there and redriven.

Every wait is on a condition with a deadline."""

import json
import re
import time
import urllib.error
import urllib.request

import pytest

from daemon import base_env, run_once
from pgcluster import wait_until

SCHEMA = "pgmq_dispatcher"
RETRY_DELAY_S = 3
# A long vt (the default 1800 s): a message that comes back early was released, not expired.
TRACKER = dict(PGMQD_LEDGER_ENABLED="on", PGMQD_TRACKER_ENABLED="on",
               PGMQD_TRACKER_INTERVAL_MS=200, PGMQD_TRACKER_RETRY_DELAY_S=RETRY_DELAY_S,
               PGMQD_QUEUE_IDLE_POLL_MAX_MS=200)


def rows(db, where="true"):
    return db.sql(f"SELECT dispatch_id::text, state, job_id, msg_ids, history, error "
                  f"FROM {SCHEMA}.dispatch WHERE {where} ORDER BY read_at, dispatch_id")


def states_of(history):
    return [h["state"] for h in history]


def accepted_runs(emu):
    return [r for r in emu.requests("run") if r.accepted]


def admin_url(d, path):
    port = int(re.search(r"admin_port=(\d+)", d.output).group(1))
    return f"http://127.0.0.1:{port}{path}"


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
    seen = states_of(first_row[4])
    assert seen[-2:] == [final, "released"], seen
    assert seen[:2] == ["sending", "accepted"], seen
    if case == "lost":
        assert "404" in first_row[5]
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
