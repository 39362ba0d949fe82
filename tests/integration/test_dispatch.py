"""End-to-end dispatch: PGMQ → daemon → RunPod emulator (issue 2's acceptance)."""

import json
import os
import signal
import tempfile

import pytest

from daemon import (API_KEY, ENDPOINT_ID, QUEUE, Daemon, assert_jobs_match_rows, base_env,
                    logfmt, run_once)

TRANSCRIPTION_JOB = {
    "document_id": None, "media_url": None, "media_type": "video", "language": "en",
    "model": "large-v3", "diarize": True,
}


def transcription_jobs(n, start=1):
    jobs = []
    for i in range(start, start + n):
        job = dict(TRANSCRIPTION_JOB)
        job["document_id"] = f"00000000-0000-4000-8000-{i:012d}"
        job["media_url"] = f"https://media.example.com/uploads/{i}/talk.mp4"
        jobs.append(job)
    return jobs


def accepted_runs(emu):
    return [r for r in emu.requests("run") if r.accepted]


def test_25_messages_make_three_posts_in_msg_id_order(queue_db, emulator, start_daemon):
    ids = queue_db.send_many(transcription_jobs(25))
    d = start_daemon("-v")
    emulator.wait_for(lambda: len(accepted_runs(emulator)) >= 3, timeout_s=15)
    # Prove there is no fourth POST: wait for an empty read after the third.
    d.wait_log(r"event=queue_empty")
    runs = sorted(accepted_runs(emulator), key=lambda r: json.loads(r.body)["input"]["jobs"][0]["msg_id"])
    assert len(emulator.requests("run")) == 3
    rows = queue_db.rows()
    sizes, seen = [], []
    for rec in runs:
        assert rec.header("Authorization") == f"Bearer {API_KEY}"
        assert rec.header("Content-Type") == "application/json"
        assert rec.method == "POST" and rec.path == f"/v2/{ENDPOINT_ID}/run"
        jobs = assert_jobs_match_rows(rec.body, rows)
        msg_ids = [j["msg_id"] for j in jobs]
        assert msg_ids == sorted(msg_ids)
        sizes.append(len(jobs))
        seen += msg_ids
        assert all(j["read_ct"] == 1 for j in jobs)
    assert sizes == [10, 10, 5]
    assert seen == ids
    # One log line per batch, carrying the emulator's job id and status.
    for rec in runs:
        line = d.wait_log(rf"event=batch_accepted .*runpod_job_id={rec.job_id}\b")[0].string
        fields = logfmt(line)
        jobs = json.loads(rec.body)["input"]["jobs"]
        assert fields["queue"] == QUEUE
        assert fields["status"] == "IN_QUEUE"
        assert fields["jobs"] == str(len(jobs))
        assert fields["first_msg_id"] == str(jobs[0]["msg_id"])
        assert fields["last_msg_id"] == str(jobs[-1]["msg_id"])
        assert fields["http_status"] == "200"
        assert int(fields["duration_ms"]) >= 0
        assert fields["level"] == "info" and fields["time"].endswith("Z")
    # Accepted messages stay invisible: the worker owns them now.
    assert all(row["invisible"] for row in rows.values())
    assert d.stop() == 0


EXOTIC = [
    '{"title": "Ünïcödé façade — 日本語のタイトル 😀🎬", "document_id": "doc-ü"}',
    '"just a JSON string with \\"quotes\\" and \\\\ and \\u0001"',
    "42",
    "-0.000000000000000000001234567890123456789",
    "123456789012345678901234567890",
    '[1, "two", {"three": [null, true, false]}]',
    "null",
    '{"document_id": 12345678901234567890, "nested": {"a": {"b": {"c": [[[[1]]]]}}}}',
    '{"document_id": null}',
    '{}',
]


def test_exact_values_arrive_byte_exact(queue_db, emulator, start_daemon):
    queue_db.sql("SELECT setval('pgmq.q_jobs_msg_id_seq', 9007199254740992)")
    ids = queue_db.send_many(EXOTIC)
    assert ids[0] == 9007199254740993
    rows = queue_db.rows()  # before dispatch read_ct is 0; compare after
    d = start_daemon("-v")
    emulator.wait_for(lambda: sum(len(json.loads(r.body)["input"]["jobs"])
                                  for r in accepted_runs(emulator)) == len(EXOTIC), timeout_s=15)
    rows = queue_db.rows()
    raw = b"".join(r.body for r in accepted_runs(emulator))
    assert b'"msg_id":9007199254740993,' in raw
    jobs = []
    for rec in accepted_runs(emulator):
        jobs += assert_jobs_match_rows(rec.body, rows)
    by_id = {j["msg_id"]: j for j in jobs}
    # document_id: from the object, or null when the message is not an object.
    assert by_id[ids[0]]["document_id"] == "doc-ü"
    for i in range(1, 7):
        assert by_id[ids[i]]["document_id"] is None
    assert by_id[ids[7]]["document_id"] == 12345678901234567890
    assert by_id[ids[9]]["document_id"] is None
    # A null message is JSON null, not the string "null".
    assert by_id[ids[6]]["message"] is None
    d.stop()


@pytest.mark.parametrize("addons,read_function", [
    ((), "public.pgmq_read"),
    (("1.12",), "pgmq.read"),          # untyped read($1,$2,$3) is ambiguous here
    (("1.10",), "pgmq.read"),          # last_read_at inserted before vt
    (("1.10", "1.12"), "public.pgmq_read"),
])
def test_read_function_and_pgmq_versions(pg_cluster, make_pgmq_db, emulator, addons, read_function):
    from daemon import QueueDb
    db = QueueDb(pg_cluster, make_pgmq_db(addons=addons, prefix="ver"))
    try:
        ids = db.send_many(transcription_jobs(3))
        d = Daemon(base_env(db, emulator, PGMQD_QUEUE_READ_FUNCTION=read_function), args=["-v"]).start()
        try:
            emulator.wait_for(lambda: len(accepted_runs(emulator)) == 1, timeout_s=15)
            rec = accepted_runs(emulator)[0]
            jobs = assert_jobs_match_rows(rec.body, db.rows())
            assert [j["msg_id"] for j in jobs] == ids
        finally:
            assert d.stop() == 0
    finally:
        db.close()


def test_empty_queue_sends_nothing(queue_db, emulator, start_daemon):
    d = start_daemon("-v", PGMQD_QUEUE_POLL_INTERVAL_MS=100)
    d.wait_log(r"event=queue_empty", count=3)
    assert emulator.requests("run") == []
    assert d.stop() == 0


def test_wrong_api_key_is_logged_without_the_key(queue_db, emulator, start_daemon):
    wrong = "rp_WRONGKEY_5up3r53cr3t_value"
    queue_db.send_many(transcription_jobs(2))
    d = start_daemon("-vv", RUNPOD_API_KEY=wrong)
    line = d.wait_log(r"event=batch_rejected .*http_status=401")[0].string
    fields = logfmt(line)
    assert fields["outcome"] == "rejected"
    assert "nauthorized" in fields["body"]          # excerpt of the emulator's error body
    assert d.proc.poll() is None                     # keeps running
    # It retries after a backoff rather than giving up (the key may be fixed).
    emulator.wait_for(lambda: len(emulator.requests("run")) >= 1, timeout_s=5)
    assert all(r.status == 401 for r in emulator.requests("run"))
    assert d.stop() == 0
    assert wrong not in d.output
    # The rejected batch was released: visible again well before vt_seconds.
    rows = queue_db.rows()
    vts = queue_db.sql("SELECT max(vt) - now() < interval '120 seconds' FROM pgmq.q_jobs")
    assert vts[0][0] is True
    assert all(r["read_ct"] >= 1 for r in rows.values())


BAD_CONFIGS = [
    ({"PGMQD_QUEUE_VT_SECONDS": "0"}, "queue.vt_seconds"),
    ({"PGMQD_QUEUE_BATCH_SIZE": "0"}, "queue.batch_size"),
    ({"PGMQD_QUEUE_BATCH_SIZE": "abc"}, "queue.batch_size"),
    ({"PGMQD_QUEUE_BATCHSIZE": "10"}, "PGMQD_QUEUE_BATCHSIZE"),
    ({"RUNPOD_ENDPOINT_ID": None}, "runpod.endpoint_id"),
    ({"PGMQD_RUNPOD_BASE_URL": "ftp://x"}, "runpod.base_url"),
]


@pytest.mark.parametrize("overrides,key", BAD_CONFIGS)
def test_bad_config_exits_78_with_one_line(queue_db, overrides, key):
    rc, lines = run_once(base_env(queue_db, None, **overrides), "--once")
    assert rc == 78
    assert len(lines) == 1, lines
    fields = logfmt(lines[0])
    assert fields["event"] == "config_invalid" and fields["key"] == key
    assert fields["problem"]


@pytest.mark.parametrize("text,key", [
    ("[queue]\nvt_seconds = 0\n", "queue.vt_seconds"),
    ("[queue]\nbatch_size = abc\n", "queue.batch_size"),
    ("[queue]\nunknown_key = 1\n", "queue.unknown_key"),
    ("[nosuch]\nname = 1\n", "nosuch.name"),
])
def test_bad_config_file_exits_78(queue_db, text, key, tmp_path):
    path = tmp_path / "bad.conf"
    path.write_text(text)
    rc, lines = run_once(base_env(queue_db, None), "-c", str(path), "--once")
    assert rc == 78
    assert len(lines) == 1, lines
    assert logfmt(lines[0])["key"] == key
    assert f"{path}:" in logfmt(lines[0])["source"]


def test_once_read_failed_announces_no_retry(queue_db, emulator):
    """A failed read in --once is the end of the run: no retry_in_ms for a retry that never
    comes. The read fails for real: a row at read_ct 2^31-1 makes pgmq.read raise 22003."""
    ids = queue_db.send_many(transcription_jobs(2))
    queue_db.sql("UPDATE pgmq.q_jobs SET read_ct = 2147483647 WHERE msg_id = %s", (ids[0],))
    rc, lines = run_once(base_env(queue_db, emulator), "--once")
    assert rc != 0, lines
    failed = [line for line in lines if "event=read_failed" in line]
    assert len(failed) == 1, lines
    assert "retry_in_ms" not in failed[0] and "no retry" in failed[0], failed
    # The follow-up still names the row before the run ends.
    assert any("event=read_ct_overflow " in line and f"msg_ids={ids[0]}" in line
               for line in lines), lines


def test_once_on_a_missing_queue_gives_the_create_call(queue_db, emulator):
    """--once reads before the wake-up probe names a missing queue: its read_failed line
    carries the pgmq.create call itself, and the exit status it announces is the real one."""
    env = base_env(queue_db, emulator)
    env["PGMQD_QUEUE_NAME"] = "no_such_queue"
    rc, lines = run_once(env, "--once")
    failed = [line for line in lines if "event=read_failed" in line]
    assert len(failed) == 1, lines
    assert logfmt(failed[0])["fix"] == "SELECT pgmq.create('no_such_queue');", failed
    assert f"exit status {rc}" in failed[0], (rc, failed)


def test_once_exit_codes(queue_db, emulator):
    env = base_env(queue_db, emulator)
    rc, lines = run_once(env, "--once")
    assert rc == 0, lines                                   # nothing to do is success (cron)
    assert any("event=once_queue_empty" in line for line in lines), lines
    assert emulator.requests("run") == []
    queue_db.send_many(transcription_jobs(12))
    rc, lines = run_once(env, "--once")
    assert rc == 0, lines                                   # dispatched one batch
    assert [len(json.loads(r.body)["input"]["jobs"]) for r in emulator.requests("run")] == [10]
    rc, lines = run_once(base_env(queue_db, emulator, RUNPOD_API_KEY="rp_wrong_key_123"), "--once")
    assert rc == 69, lines                                  # rejected: messages released
    assert emulator.requests("run")[-1].status == 401
    released = queue_db.sql("SELECT count(*) FROM pgmq.q_jobs WHERE read_ct = 1 AND vt < now() + interval '70 s'")
    assert released[0][0] == 2


def test_config_file_and_sigterm(queue_db, emulator, tmp_path):
    conf = tmp_path / "d.conf"
    conf.write_text(
        "; example\n[database]\nconninfo = %s\n[queue]\nname = %s\nbatch_size = 4\npoll_interval_ms = 100\n"
        "[runpod]\nendpoint_id = %s\nbase_url = %s\n" % (queue_db.conninfo, QUEUE, ENDPOINT_ID, emulator.base_url))
    env = {"PATH": "/usr/bin:/bin", "RUNPOD_API_KEY": API_KEY}
    queue_db.send_many(transcription_jobs(9))
    d = Daemon(env, args=["-c", str(conf)]).start()
    emulator.wait_for(lambda: len(accepted_runs(emulator)) == 3, timeout_s=15)
    assert sorted(len(json.loads(r.body)["input"]["jobs"]) for r in accepted_runs(emulator)) == [1, 4, 4]
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    assert d.count_log(r"event=stopping") == 1
