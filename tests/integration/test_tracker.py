"""The tracker (issue 6): the real binary follows accepted jobs through the
emulator's /status, keeps long jobs' messages invisible with set_vt
heartbeats, releases the messages of failed jobs early, and stays bounded.

Job lifecycles come from the emulator's job_plan; every wait is on a
condition with a deadline."""

import json
import re
import signal
import time
import urllib.request

import pytest

import conftest
from daemon import Daemon, Fault, assert_no_sanitizer_report, base_env, logfmt
from pgcluster import wait_until

# 300 ms between /status requests per job, failed jobs' messages back after 1 s. Reads stay
# at the 200 ms poll even where NOTIFY would let idle polls back off: released messages and
# expired vts never notify.
TRACKER = dict(PGMQD_TRACKER_ENABLED="on", PGMQD_TRACKER_INTERVAL_MS=300,
               PGMQD_TRACKER_RETRY_DELAY_S=1, PGMQD_QUEUE_IDLE_POLL_MAX_MS=200)


def jobs(n):
    return [{"document_id": f"doc-{i}", "lang": "de"} for i in range(n)]


def accepted(emu):
    return [r for r in emu.requests("run") if r.accepted]


def status_requests(emu, job_id=None):
    return emu.requests(f"status/{job_id}" if job_id else "status")


def events(d, name):
    """Every line of one event, parsed."""
    return [logfmt(line) for line in d.lines if re.search(rf"\bevent={name}( |$)", line)]


def wait_event(d, name, count=1, timeout_s=10.0, **fields):
    """Waits for `count` lines of an event whose fields equal `fields`; returns them parsed."""
    rx = rf"\bevent={name}( |$)"
    rx += "".join(rf"(?=.*\b{k}={re.escape(str(v))}( |$))" for k, v in fields.items())
    return [logfmt(m.string) for m in d.wait_log(rx, count=count, timeout_s=timeout_s)]


def read_ct(db, msg_id):
    rows = db.sql("SELECT read_ct FROM pgmq.q_jobs WHERE msg_id = %s", (msg_id,))
    return rows[0][0] if rows else None


def vt_left_s(db, msg_id):
    return db.sql("SELECT extract(epoch FROM vt - clock_timestamp())::float FROM pgmq.q_jobs "
                  "WHERE msg_id = %s", (msg_id,))[0][0]


def ids_of(field):
    return [int(i) for i in field.split(",")] if field else []


def metrics(d):
    port = logfmt(d.wait_log(r"event=started ")[0].string)["admin_port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            out[series] = float(value)
    return out


# ------------------------------------------------------------------ heartbeat

def test_long_job_is_never_read_twice(queue_db, emulator, start_daemon):
    """vt 6 s, the job queued 4 s then running 20 s: heartbeats keep the message
    invisible the whole time; the worker's delete ends them."""
    emulator.job_plan = lambda job_input: {"in_queue_s": 4, "run_s": 20}
    [msg] = queue_db.send_many(jobs(1))
    d = start_daemon("-v", PGMQD_QUEUE_VT_SECONDS=6, **TRACKER)
    job_id = wait_event(d, "batch_accepted")[0]["runpod_job_id"]

    def read_once():
        assert len(emulator.requests("run")) == 1
        assert read_ct(queue_db, msg) == 1
        assert d.count_log(r"event=batch_read ") == 1

    wait_event(d, "job_status", runpod_job_id=job_id, old="IN_QUEUE", new="IN_PROGRESS")
    # A heartbeat whenever less than a third (2 s) of the 6 s vt is left: at about 4, 8,
    # 12 and 16 s. Between them the dispatcher reads every 200 ms, so a message that became
    # visible even briefly would be read a second time.
    for k in range(1, 5):
        beat = wait_event(d, "heartbeat", count=k, runpod_job_id=job_id, timeout_s=10)[-1]
        assert ids_of(beat["msg_ids"]) == [msg]
        assert beat["vt_seconds"] == "6"
        assert 3.0 < vt_left_s(queue_db, msg) <= 6.0
        read_once()
    assert not events(d, "job_failed") and not events(d, "job_expired")

    # The worker is done with the message and deletes it while the job still runs: the
    # next set_vt finds no row, which ends the heartbeat quietly.
    queue_db.sql("SELECT pgmq.delete(%s, %s::bigint)", (queue_db.queue, msg))
    beats = len(events(d, "heartbeat"))
    wait_event(d, "heartbeat_ended", runpod_job_id=job_id, timeout_s=10)
    done = wait_event(d, "job_status", runpod_job_id=job_id, old="IN_PROGRESS", new="COMPLETED",
                      timeout_s=20)[0]
    assert len(events(d, "heartbeat")) == beats
    assert int(done["delay_ms"]) >= 3900 and int(done["execution_ms"]) >= 19900
    assert ids_of(done["msg_ids"]) == [msg]
    # COMPLETED ends tracking: no more /status for it.
    polls = len(status_requests(emulator, job_id))
    d.wait_log(r"event=queue_empty", count=d.count_log(r"event=queue_empty") + 5)
    assert len(status_requests(emulator, job_id)) == polls
    assert len(emulator.requests("run")) == 1
    # Each transition was logged once.
    assert [(e["old"], e["new"]) for e in events(d, "job_status")] == [
        ("IN_QUEUE", "IN_PROGRESS"), ("IN_PROGRESS", "COMPLETED")]
    m = metrics(d)
    assert m['pgmqd_tracker_terminal_total{status="COMPLETED"}'] == 1
    assert m["pgmqd_tracker_heartbeats_total"] == beats
    assert sum(v for k, v in m.items() if k.startswith("pgmqd_tracked_jobs{")) == 0
    assert d.stop() == 0


def test_vt_counts_from_the_read_when_a_batch_waits_for_a_rate_slot(queue_db, emulator,
                                                                     start_daemon):
    """/run capped at 2 per 10 s: a batch read 7 s after the first POST waits 3 s for its
    slot. Its vt (6 s) has run since the read, so its first heartbeat is due 4 s after the
    read, only 1 s after the POST."""
    emulator.job_plan = lambda job_input: {"in_queue_s": 60, "run_s": 1}
    d = start_daemon("-v", PGMQD_QUEUE_BATCH_SIZE=1, PGMQD_QUEUE_VT_SECONDS=6,
                     PGMQD_RUNPOD_MAX_REQUESTS_PER_10S=2, **TRACKER)
    queue_db.send_many(jobs(1))
    wait_event(d, "batch_accepted")
    first_post = emulator.requests("run")[0].received_at
    # The scenario is about time itself: wait until 7 s after the first POST.
    wait_until(lambda: time.monotonic() >= first_post + 7.0, timeout=10, what="7 s to pass")
    b, c = queue_db.send_many(jobs(2))
    read_at = time.monotonic()
    lines = wait_event(d, "batch_accepted", count=3, timeout_s=15)
    assert [int(x["first_msg_id"]) for x in lines[1:]] == [b, c]
    posts = emulator.requests("run")
    assert posts[2].received_at >= first_post + 9.9          # held for the rate slot
    c_job = lines[2]["runpod_job_id"]
    beat = wait_event(d, "heartbeat", runpod_job_id=c_job, timeout_s=10)[0]
    assert ids_of(beat["msg_ids"]) == [c]
    assert time.monotonic() < read_at + 6.0                  # before its vt ran out
    wait_event(d, "heartbeat", count=2, runpod_job_id=c_job, timeout_s=10)
    assert read_ct(queue_db, c) == 1 and len(emulator.requests("run")) == 3
    assert d.stop() == 0


# ------------------------------------------------------------------ early release

@pytest.mark.parametrize("final", ["FAILED", "CANCELLED", "TIMED_OUT"])
def test_failed_job_releases_its_messages_early(queue_db, emulator, start_daemon, final):
    error = "Traceback (most recent call last): " + "e" * 1000
    run_s = 0.3

    def plan(job_input):
        if job_input["jobs"][0]["read_ct"] == 1:
            return {"in_queue_s": 0.2, "run_s": run_s, "final_status": final,
                    "error": error if final != "CANCELLED" else None}
        return {"in_queue_s": 60, "run_s": 1}  # the second time it waits for a GPU

    emulator.job_plan = plan
    ids = queue_db.send_many(jobs(2))
    # vt 600 s: without the early release the messages would not come back in this test.
    d = start_daemon("-v", PGMQD_QUEUE_VT_SECONDS=600, **TRACKER)
    job_id = wait_event(d, "batch_accepted")[0]["runpod_job_id"]
    first_run = emulator.requests("run")[0]

    failed = wait_event(d, "job_failed", runpod_job_id=job_id, status=final)[0]
    assert ids_of(failed["msg_ids"]) == ids
    assert failed["retry_delay_s"] == "1"
    if final == "CANCELLED":
        assert "error" not in failed
    else:
        assert failed["error"].startswith("Traceback (most recent call last): eee")
        assert len(failed["error"].encode()) == 256      # bounded
        assert failed["error_truncated"] == "yes"
    release = wait_event(d, "early_release", runpod_job_id=job_id)[0]
    assert sorted(ids_of(release["msg_ids"])) == ids and release["messages"] == "2"

    # Visible again after retry_delay_s and dispatched again, read_ct 2.
    emulator.wait_for(lambda: len(accepted(emulator)) == 2, timeout_s=10)
    second = accepted(emulator)[1]
    again = json.loads(second.body)["input"]["jobs"]
    assert [j["msg_id"] for j in again] == ids
    assert all(j["read_ct"] == 2 for j in again)
    # The job ended at about first_run + 0.5 s; the tracker sees it within one interval
    # (0.33 s), the messages are back 1 s later, and the next read (200 ms) takes them.
    ended = first_run.responded_at + 0.2 + run_s
    assert 0.9 <= second.received_at - ended <= 1.0 + 0.33 + 0.2 + 2.0
    assert [(e["old"], e["new"]) for e in events(d, "job_status")
            if e["runpod_job_id"] == job_id] == [("IN_QUEUE", "IN_PROGRESS"), ("IN_PROGRESS", final)]
    # Tracking of the first job ended; the second one is tracked now.
    second_id = second.job_id
    polls = len(status_requests(emulator, job_id))
    emulator.wait_for(lambda: len(status_requests(emulator, second_id)) >= 3, timeout_s=10)
    assert len(status_requests(emulator, job_id)) == polls
    m = metrics(d)
    assert m[f'pgmqd_tracker_terminal_total{{status="{final}"}}'] == 1
    assert m["pgmqd_tracker_early_releases_total"] == 1
    assert m['pgmqd_tracked_jobs{status="IN_QUEUE"}'] == 1
    assert d.stop() == 0


def test_failed_job_whose_messages_are_gone_releases_nothing(queue_db, emulator, start_daemon):
    """The worker archived the messages before the job failed: set_vt finds none."""
    emulator.job_plan = lambda job_input: {"in_queue_s": 0.2, "run_s": 1.5,
                                           "final_status": "FAILED", "error": "boom"}
    ids = queue_db.send_many(jobs(2))
    d = start_daemon("-v", PGMQD_QUEUE_VT_SECONDS=600, **TRACKER)
    job_id = wait_event(d, "batch_accepted")[0]["runpod_job_id"]
    queue_db.sql("SELECT pgmq.archive(%s, %s::bigint[])", (queue_db.queue, ids))
    failed = wait_event(d, "job_failed", runpod_job_id=job_id, error="boom")[0]
    assert ids_of(failed["msg_ids"]) == ids
    release = wait_event(d, "early_release", runpod_job_id=job_id)[0]
    assert release["messages"] == "0" and release["msg_ids"] == ""
    assert metrics(d)["pgmqd_tracker_early_releases_total"] == 0
    assert len(emulator.requests("run")) == 1
    assert d.stop() == 0


# ------------------------------------------------------------------ 404, unknown status

def test_expired_job_ends_tracking_and_is_released(queue_db, emulator, start_daemon):
    """A 404 before any terminal status: nobody works on the messages any more, so they come
    back after retry_delay_s (one set_vt for the job), as after FAILED (issue 12)."""
    emulator.job_plan = lambda job_input: {"in_queue_s": 60, "run_s": 1}
    ids = queue_db.send_many(jobs(2))
    emulator.add_fault(Fault.status(404, body={"error": "job not found"}, route="status"))
    d = start_daemon("-v", **TRACKER)
    job_id = wait_event(d, "batch_accepted")[0]["runpod_job_id"]
    expired = wait_event(d, "job_expired", runpod_job_id=job_id)[0]
    assert ids_of(expired["msg_ids"]) == ids
    assert expired["status"] == "IN_QUEUE" and expired["retry_delay_s"] == "1"
    release = wait_event(d, "early_release", runpod_job_id=job_id)[0]
    assert ids_of(release["msg_ids"]) == ids
    assert len(status_requests(emulator, job_id)) == 1
    # Read again once the retry delay is over: a second /run carries them.
    emulator.wait_for(lambda: len(accepted(emulator)) == 2, timeout_s=10)
    assert sorted(j["msg_id"] for j in accepted(emulator)[1].json["input"]["jobs"]) == ids
    assert all(read_ct(queue_db, i) == 2 for i in ids)
    m = metrics(d)
    assert m['pgmqd_tracker_terminal_total{status="EXPIRED"}'] == 1
    assert m["pgmqd_tracker_early_releases_total"] == 1
    assert d.stop() == 0


@pytest.mark.parametrize("status", ["RUNNING", "WARMING_UP_2027"])
def test_unknown_status_is_not_terminal(queue_db, emulator, start_daemon, status):
    # After 0.4 s the emulator reports `status` for good (not terminal to the emulator either).
    emulator.job_plan = lambda job_input: {"in_queue_s": 0.1, "run_s": 0.3, "final_status": status}
    [msg] = queue_db.send_many(jobs(1))
    d = start_daemon("-v", PGMQD_QUEUE_VT_SECONDS=3, **TRACKER)
    job_id = wait_event(d, "batch_accepted")[0]["runpod_job_id"]
    wait_event(d, "job_status", runpod_job_id=job_id, new=status)
    polls = len(status_requests(emulator, job_id))
    # Still polled, and still heartbeating (vt 3 s: one every ~2 s).
    emulator.wait_for(lambda: len(status_requests(emulator, job_id)) >= polls + 3, timeout_s=10)
    wait_event(d, "heartbeat", count=2, runpod_job_id=job_id, timeout_s=10)
    assert read_ct(queue_db, msg) == 1 and len(emulator.requests("run")) == 1
    assert len([e for e in events(d, "job_status") if e["new"] == status]) == 1  # logged once
    assert not events(d, "job_failed") and not events(d, "job_expired")
    slot = "RUNNING" if status == "RUNNING" else "OTHER"
    assert metrics(d)[f'pgmqd_tracked_jobs{{status="{slot}"}}'] == 1
    assert d.stop() == 0


# ------------------------------------------------------------------ off, bounded

def test_tracker_off_makes_no_status_request(queue_db, emulator, start_daemon):
    emulator.job_plan = lambda job_input: {"in_queue_s": 0.1, "run_s": 0.2}
    queue_db.send_many(jobs(3))
    # Off by default; the other tracker keys alone change nothing.
    d = start_daemon("-v", PGMQD_QUEUE_BATCH_SIZE=1, PGMQD_TRACKER_INTERVAL_MS=100,
                     PGMQD_QUEUE_IDLE_POLL_MAX_MS=200)
    emulator.wait_for(lambda: len(accepted(emulator)) == 3, timeout_s=10)
    job_ids = [r.job_id for r in accepted(emulator)]
    emulator.wait_for(lambda: all(emulator.job(j)["status"] == "COMPLETED" for j in job_ids),
                      timeout_s=10)
    d.wait_log(r"event=queue_empty", count=d.count_log(r"event=queue_empty") + 5)
    assert status_requests(emulator) == []
    assert not events(d, "tracker_started") and not events(d, "job_status")
    assert metrics(d)["pgmqd_tracker_heartbeats_total"] == 0
    assert d.stop() == 0


def test_max_tracked_jobs_bounds_memory(queue_db, emulator, start_daemon):
    emulator.job_plan = lambda job_input: {"in_queue_s": 60, "run_s": 1}
    ids = queue_db.send_many(jobs(5))
    d = start_daemon("-v", PGMQD_QUEUE_BATCH_SIZE=1, PGMQD_TRACKER_MAX_TRACKED_JOBS=3, **TRACKER)
    accepted_lines = wait_event(d, "batch_accepted", count=5)
    job_ids = [a["runpod_job_id"] for a in accepted_lines]
    evicted = wait_event(d, "tracker_evicted", count=2)
    # The oldest two, in order, with their messages named.
    assert [e["runpod_job_id"] for e in evicted] == job_ids[:2]
    assert [ids_of(e["msg_ids"]) for e in evicted] == [[int(a["first_msg_id"])]
                                                       for a in accepted_lines[:2]]
    assert all(e["max_tracked_jobs"] == "3" for e in evicted)
    assert sorted(int(a["first_msg_id"]) for a in accepted_lines) == ids

    def polls():
        return {j: len(status_requests(emulator, j)) for j in job_ids}

    # The three newest are polled on; the two evicted are not (a request already in flight
    # at eviction may still land, so compare two later snapshots).
    start = polls()
    emulator.wait_for(lambda: all(polls()[j] >= start[j] + 2 for j in job_ids[2:]), timeout_s=10)
    mid = polls()
    emulator.wait_for(lambda: all(polls()[j] >= mid[j] + 2 for j in job_ids[2:]), timeout_s=10)
    assert [polls()[j] for j in job_ids[:2]] == [mid[j] for j in job_ids[:2]]
    m = metrics(d)
    assert m["pgmqd_tracker_evicted_total"] == 2
    assert m['pgmqd_tracked_jobs{status="IN_QUEUE"}'] == 3
    assert sum(v for k, v in m.items() if k.startswith("pgmqd_tracked_jobs{")) == 3
    assert d.stop() == 0


# ------------------------------------------------------------------ limits, shutdown, reload

def test_status_rate_and_concurrency_limits(queue_db, emulator, start_daemon):
    """12 jobs due every 100 ms (about 100 /status per second unchecked), but at most 2 in
    flight and 20 in any 10 s window (the sliding-window limiter /run uses too)."""
    emulator.job_plan = lambda job_input: {"in_queue_s": 60, "run_s": 1}
    emulator.status_delay_s = 0.2
    queue_db.send_many(jobs(12))
    d = start_daemon("-v", PGMQD_QUEUE_BATCH_SIZE=1, PGMQD_TRACKER_ENABLED="on",
                     PGMQD_TRACKER_INTERVAL_MS=100, PGMQD_TRACKER_MAX_CONCURRENT=2,
                     PGMQD_TRACKER_MAX_STATUS_PER_10S=20)
    wait_event(d, "batch_accepted", count=12)
    # Past the first window, so that the cap binds once and then lets requests go again.
    emulator.wait_for(lambda: len(status_requests(emulator)) >= 24, timeout_s=40)
    reqs = sorted(status_requests(emulator), key=lambda r: r.received_at)
    times = [r.received_at for r in reqs]
    # At most 20 in any 10 s window (0.5 s of slack for send-to-receive jitter).
    for i in range(len(times)):
        in_window = [t for t in times[i:] if t < times[i] + 9.5]
        assert len(in_window) <= 20, (i, times)
    # The 21st waits for the first to leave the window.
    assert times[20] - times[0] >= 9.5, times
    # At most 2 in flight: sweep over request start/end.
    edges = sorted([(r.received_at, 1) for r in reqs] + [(r.responded_at, -1) for r in reqs],
                   key=lambda e: (e[0], e[1]))
    level = peak = 0
    for _, step in edges:
        level += step
        peak = max(peak, level)
    assert peak <= 2
    # Every job gets its turn: the earliest due goes first, nobody starves.
    assert len({r.path.rsplit("/", 1)[1] for r in reqs}) == 12
    assert d.stop() == 0


def test_shutdown_with_status_requests_in_flight(queue_db, emulator, start_daemon):
    emulator.job_plan = lambda job_input: {"in_queue_s": 60, "run_s": 1}
    emulator.status_delay_s = 3.0
    queue_db.send_many(jobs(3))
    d = start_daemon("-vv", PGMQD_QUEUE_BATCH_SIZE=1, PGMQD_DAEMON_SHUTDOWN_TIMEOUT_MS=500,
                     **TRACKER)
    wait_event(d, "batch_accepted", count=3)
    d.wait_log(r"event=http_request method=GET url=\S*/status/", count=3)
    started = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - started < 3.0    # did not wait for the slow /status answers
    assert d.count_log(r"event=http_request method=GET url=\S*/status/") == 3
    # The messages keep their vt: nothing was released at stop.
    assert queue_db.sql("SELECT count(*) FROM pgmq.q_jobs WHERE vt > clock_timestamp() "
                        "+ interval '1700 s'")[0][0] == 3


def test_reload_turns_the_tracker_on_and_off(queue_db, emulator, tmp_path):
    emulator.job_plan = lambda job_input: {"in_queue_s": 60, "run_s": 1}
    conf = tmp_path / "d.conf"
    conf.write_text("[tracker]\nenabled = off\ninterval_ms = 200\n")
    env = base_env(queue_db, emulator, PGMQD_QUEUE_IDLE_POLL_MAX_MS=200)
    d = Daemon(env, args=["-v", "-c", str(conf)]).start()
    try:
        queue_db.send_many(jobs(1))
        wait_event(d, "batch_accepted")  # the daemon has the reply, not just the emulator
        conf.write_text("[tracker]\nenabled = on\ninterval_ms = 200\n")
        d.signal(signal.SIGHUP)
        d.wait_log(r"event=reloaded")
        wait_event(d, "tracker_started")
        queue_db.send_many(jobs(1))
        wait_event(d, "batch_accepted", count=2)
        first, second = [r.job_id for r in accepted(emulator)]
        emulator.wait_for(lambda: len(status_requests(emulator, second)) >= 2, timeout_s=10)
        assert status_requests(emulator, first) == []   # accepted before: not followed

        conf.write_text("[tracker]\nenabled = off\ninterval_ms = 200\n")
        d.signal(signal.SIGHUP)
        assert wait_event(d, "tracker_disabled")[0]["jobs"] == "1"
        polls = len(status_requests(emulator))
        d.wait_log(r"event=queue_empty", count=d.count_log(r"event=queue_empty") + 6)
        assert len(status_requests(emulator)) <= polls + 1  # at most one was in flight
    finally:
        assert d.stop() == 0
        assert_no_sanitizer_report(d.output)


def test_early_release_wakes_a_read_whatever_the_idle_poll_period(queue_db, emulator, start_daemon):
    """Released messages never NOTIFY: the tracker asks for a read when they come back,
    even while idle polls have backed off far beyond retry_delay_s."""
    conftest.enable_insert_notify(queue_db.cluster, queue_db.dbname, queue_db.queue)
    emulator.job_plan = lambda job_input: (
        {"in_queue_s": 4.0, "run_s": 0.2, "final_status": "FAILED", "error": "boom"}
        if job_input["jobs"][0]["read_ct"] == 1 else None)
    ids = queue_db.send_many(jobs(1))
    d = start_daemon("-v", PGMQD_TRACKER_ENABLED="on", PGMQD_TRACKER_INTERVAL_MS=300,
                     PGMQD_TRACKER_RETRY_DELAY_S=1, PGMQD_QUEUE_POLL_INTERVAL_MS=1000,
                     PGMQD_QUEUE_IDLE_POLL_MAX_MS=60000, PGMQD_QUEUE_VT_SECONDS=600)
    d.wait_log(r"poll_period_ms=4000\b", timeout_s=20)          # idle polls backed off
    wait_event(d, "early_release", timeout_s=20)
    d.wait_log(r"event=wake_read", timeout_s=5)
    emulator.wait_for(lambda: len(accepted(emulator)) == 2, timeout_s=10)
    again = json.loads(accepted(emulator)[1].body)["input"]["jobs"]
    assert [j["msg_id"] for j in again] == ids and again[0]["read_ct"] == 2
    assert d.stop() == 0


def test_tracker_lines_in_json_keep_ids_as_numbers(queue_db, emulator, start_daemon):
    """One name per thing (runpod_job_id, as in batch_accepted) and msg_ids as a JSON array
    of numbers, not a string."""
    emulator.job_plan = lambda job_input: {"in_queue_s": 0.2, "run_s": 0.5}
    ids = queue_db.send_many(jobs(2))
    d = start_daemon("-v", PGMQD_LOG_FORMAT="json", **TRACKER)
    d.wait_log(r'"event":"job_status".*"new":"COMPLETED"')
    lines = [json.loads(line) for line in d.lines if line.startswith("{")]
    accepted_line = next(e for e in lines if e["event"] == "batch_accepted")
    status = [e for e in lines if e["event"] == "job_status"]
    assert {e["runpod_job_id"] for e in status} == {accepted_line["runpod_job_id"]}
    assert all(e["msg_ids"] == ids for e in status)
    assert not any("job_id" in e for e in lines)
    assert d.stop() == 0
