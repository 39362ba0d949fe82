"""Jobs stuck IN_QUEUE (issue 10, defect 8): RunPod workers that crash in a loop look like
a long queue. The emulator's crash loop (set_unhealthy_workers) holds every queued job
IN_QUEUE and reports unhealthy workers in /health. The tracker exports RunPod's counts and
the age of the oldest waiting job, warns once, stops heartbeating a job after
max_heartbeat_s, and max_queued_jobs pauses reads. Every wait is on a condition with a
deadline."""

import json
import time

import pytest

from daemon import Daemon, assert_no_sanitizer_report, base_env
from pgcluster import wait_until
from test_service import NotifySocket
from test_tracker import TRACKER, accepted, events, ids_of, jobs, metrics, read_ct, wait_event


def health_requests(emu):
    return emu.requests("health")


def test_unhealthy_workers_are_visible_and_warned_once(queue_db, emulator, start_daemon):
    emulator.job_plan = lambda job_input: {"in_queue_s": 0.3, "run_s": 0.3}
    emulator.set_unhealthy_workers(2)
    queue_db.send_many(jobs(2))
    d = start_daemon("-v", PGMQD_QUEUE_BATCH_SIZE=1, **TRACKER)
    wait_event(d, "batch_accepted", count=2)
    warned = wait_event(d, "runpod_workers_unhealthy")[0]
    # The first poll may come after the first job only, and RunPod's count and ours are
    # taken at different moments: the /health request may leave before the second /run
    # reaches RunPod, or its answer come back before we handled the second /run's reply.
    assert warned["unhealthy"] == "2" and warned["jobs_in_queue"] in ("1", "2")
    assert warned["runpod_in_queue"] in ("1", "2")

    # /health is polled once per interval while jobs are tracked; the warning is not repeated.
    polls = len(health_requests(emulator))
    emulator.wait_for(lambda: len(health_requests(emulator)) >= polls + 5, timeout_s=10)
    assert len(events(d, "runpod_workers_unhealthy")) == 1
    m = metrics(d)
    assert m['pgmqd_runpod_health_workers{state="unhealthy"}'] == 2
    assert m['pgmqd_runpod_health_jobs{state="in_queue"}'] == 2
    assert m["pgmqd_runpod_health_timestamp_seconds"] > time.time() - 60
    age = m["pgmqd_tracker_oldest_in_queue_seconds"]
    assert age > 0.5
    wait_until(lambda: metrics(d)["pgmqd_tracker_oldest_in_queue_seconds"] >= age + 1.0,
               timeout=10, what="the oldest IN_QUEUE age to grow")

    # Healed: one recovery line, the jobs run, the age drops to 0.
    emulator.set_unhealthy_workers(0)
    wait_event(d, "runpod_workers_recovered")
    wait_event(d, "job_status", count=2, new="COMPLETED", timeout_s=15)
    assert metrics(d)["pgmqd_tracker_oldest_in_queue_seconds"] == 0
    assert metrics(d)['pgmqd_runpod_health_workers{state="unhealthy"}'] == 0

    # No job tracked: no more /health.
    polls = len(health_requests(emulator))
    d.wait_log(r"event=queue_empty", count=d.count_log(r"event=queue_empty") + 6)
    assert len(health_requests(emulator)) <= polls + 1  # one may have been in flight

    # Broken again while a job waits: warned again, once.
    emulator.set_unhealthy_workers(1)
    queue_db.send_many(jobs(1))
    again = wait_event(d, "runpod_workers_unhealthy", count=2)[1]
    assert again["unhealthy"] == "1" and again["jobs_in_queue"] == "1"
    assert len(events(d, "runpod_workers_recovered")) == 1
    assert d.stop() == 0


def test_health_polls_share_the_status_budget(queue_db, emulator, start_daemon):
    """3 jobs due every 100 ms, but 30 requests per 10 s in all (a sliding window), /status
    and /health together; polls leave /health its tenth (3 per window), so a backlog of
    polls, which takes every slot the window frees, does not starve it."""
    emulator.job_plan = lambda job_input: {"in_queue_s": 60, "run_s": 1}
    queue_db.send_many(jobs(3))
    d = start_daemon("-v", PGMQD_QUEUE_BATCH_SIZE=1, PGMQD_TRACKER_ENABLED="on",
                     PGMQD_TRACKER_INTERVAL_MS=100, PGMQD_TRACKER_MAX_STATUS_PER_10S=30)
    wait_event(d, "batch_accepted", count=3)
    emulator.wait_for(lambda: len(health_requests(emulator)) >= 3, timeout_s=20)
    reqs = emulator.requests("status") + health_requests(emulator)
    times = sorted(r.received_at for r in reqs)
    for i in range(len(times)):
        j = i
        while j + 1 < len(times) and times[j + 1] - times[i] < 10.0 - 0.05:
            j += 1
        assert j - i + 1 <= 30, (i, j, times)
    # /status still gets the larger share.
    assert len(emulator.requests("status")) >= 4 * len(health_requests(emulator))
    assert d.stop() == 0


def test_heartbeat_ceiling_stops_extending_once(queue_db, emulator, start_daemon):
    """vt 3 s, ceiling 4 s: the job waits IN_QUEUE for good; after 4 s its message gets no
    more heartbeats, is visible again when its vt runs out and is sent again."""
    emulator.set_unhealthy_workers(1)
    [msg] = queue_db.send_many(jobs(1))
    d = start_daemon("-v", PGMQD_QUEUE_VT_SECONDS=3, PGMQD_TRACKER_MAX_HEARTBEAT_S=4,
                     **TRACKER)
    job_id = wait_event(d, "batch_accepted")[0]["runpod_job_id"]
    wait_event(d, "heartbeat", runpod_job_id=job_id, timeout_s=10)
    ceiling = wait_event(d, "heartbeat_ceiling", runpod_job_id=job_id, timeout_s=15)[0]
    assert ids_of(ceiling["msg_ids"]) == [msg]
    assert ceiling["max_heartbeat_s"] == "4" and int(ceiling["tracked_s"]) >= 4
    assert ceiling["status"] == "IN_QUEUE"
    beats = len(events(d, "heartbeat"))
    # The message comes back and is dispatched again: a second job.
    emulator.wait_for(lambda: len(accepted(emulator)) == 2, timeout_s=10)
    assert read_ct(queue_db, msg) == 2
    second = accepted(emulator)[1].job_id
    # The first job got no heartbeat after its ceiling, and one line said so.
    assert [e for e in events(d, "heartbeat")[beats:] if e["runpod_job_id"] == job_id] == []
    assert len([e for e in events(d, "heartbeat_ceiling") if e["runpod_job_id"] == job_id]) == 1
    assert second != job_id
    assert metrics(d)["pgmqd_tracker_heartbeat_ceilings_total"] >= 1
    assert d.stop() == 0


@pytest.mark.parametrize("read_batches", [1, 8])
def test_max_queued_jobs_pauses_reads_until_jobs_start(queue_db, emulator, read_batches):
    """Workers in a crash loop, 6 messages, one per /run, at most 2 jobs IN_QUEUE: two
    /run, then reads pause (logged once, /metrics, STATUS=) while the messages wait in
    the queue; healed, the jobs start and the rest go out. With fuller reads too: a read
    claims no more bodies than max_queued_jobs leaves room for."""
    emulator.job_plan = lambda job_input: {"in_queue_s": 0.2, "run_s": 0.2}
    emulator.set_unhealthy_workers(3)
    ids = queue_db.send_many(jobs(6))
    ns = NotifySocket(abstract=True)
    env = base_env(queue_db, emulator, NOTIFY_SOCKET=ns.address, PGMQD_QUEUE_BATCH_SIZE=1,
                   PGMQD_TRACKER_MAX_QUEUED_JOBS=2, PGMQD_QUEUE_READ_BATCHES=read_batches,
                   **TRACKER)
    d = Daemon(env, args=["-v"]).start()
    try:
        paused = wait_event(d, "reads_paused")[0]
        assert paused["max_queued_jobs"] == "2"
        assert int(paused["queued_jobs"]) + int(paused["in_flight"]) >= 2
        ns.wait(lambda ms: any("STATUS=reads paused at max_queued_jobs 2 (IN_QUEUE " in m
                              for _, m in ms),
                what="STATUS= naming the pause")
        # Many read opportunities pass (200 ms polls): still two jobs, four messages unread.
        reads = d.count_log(r"event=wake_read|event=queue_empty|event=batch_read ")
        time_limit = time.monotonic() + 3.0
        wait_until(lambda: time.monotonic() >= time_limit, timeout=10, what="3 s to pass")
        assert len(emulator.requests("run")) == 2
        read_jobs = sum(int(e["jobs"]) for e in events(d, "batch_read"))
        assert read_jobs == 2 and reads == d.count_log(
            r"event=wake_read|event=queue_empty|event=batch_read ")
        assert sorted(read_ct(queue_db, i) for i in ids) == [0, 0, 0, 0, 1, 1]
        assert len(events(d, "reads_paused")) == 1
        assert metrics(d)["pgmqd_tracker_queue_cap_reached"] == 1

        # Healed: jobs leave IN_QUEUE, reads resume, every message goes out once.
        emulator.set_unhealthy_workers(0)
        wait_event(d, "reads_resumed", timeout_s=15)
        emulator.wait_for(lambda: len(accepted(emulator)) == 6, timeout_s=20)
        sent = sorted(j["msg_id"] for r in accepted(emulator)
                      for j in json.loads(r.body)["input"]["jobs"])
        assert sent == ids
        wait_until(lambda: metrics(d)["pgmqd_tracker_queue_cap_reached"] == 0, timeout=10,
                   what="the cap gauge to drop")
    finally:
        assert d.stop() == 0
        ns.close()
        assert_no_sanitizer_report(d.output)
