"""Delivery under failure (issue 3): every rule of DESIGN.md's delivery
semantics against the real PostgreSQL and the RunPod emulator."""

import json
import os
import signal
import threading
import time

import pytest

from pgcluster import wait_until

from daemon import (API_KEY, ENDPOINT_ID, QUEUE, Daemon, QueueDb, Fault, base_env, http_date,
                    logfmt)

FAST_BACKOFF = dict(PGMQD_RUNPOD_BACKOFF_BASE_MS=200, PGMQD_RUNPOD_BACKOFF_MAX_MS=400,
                    PGMQD_QUEUE_POLL_INTERVAL_MS=50)


def jobs(n, size=0):
    return [{"document_id": f"doc-{i}", "pad": "x" * size} for i in range(n)]


def accepted(emu):
    return [r for r in emu.requests("run") if r.accepted]


def accepted_ids(emu):
    return [j["msg_id"] for r in accepted(emu) for j in json.loads(r.body)["input"]["jobs"]]


def invisible_for_long(db, ids, at_least_s=600):
    rows = db.sql("SELECT msg_id FROM pgmq.q_jobs WHERE vt > clock_timestamp() + %s * interval '1 s'",
                  (at_least_s,))
    return set(ids) <= {r[0] for r in rows}


# ------------------------------------------------------------------ rejected before acceptance

# 413 is not here: the same body would be refused again, so it is split (test below).
@pytest.mark.parametrize("status", [400, 429, 500, 502, 503])
def test_rejected_batch_is_released_and_sent_again(queue_db, emulator, start_daemon, status):
    ids = queue_db.send_many(jobs(3))
    emulator.add_fault(Fault.status(status, body={"error": f"emulated {status}"}))
    d = start_daemon("-v", **FAST_BACKOFF)
    line = d.wait_log(rf"event=batch_rejected .*http_status={status}\b")[0].string
    assert logfmt(line)["outcome"] == "rejected"
    assert f"emulated {status}" in logfmt(line)["body"]
    # Released after a short backoff, not after vt_seconds: it comes back at once.
    emulator.wait_for(lambda: len(accepted(emulator)) == 1, timeout_s=10)
    again = json.loads(accepted(emulator)[0].body)["input"]["jobs"]
    assert [j["msg_id"] for j in again] == ids
    assert all(j["read_ct"] == 2 for j in again)
    assert d.stop() == 0


def test_connection_refused_does_not_burn_read_ct(queue_db, start_daemon):
    ids = queue_db.send_many(jobs(2))
    # Port 9 on loopback: nothing listens there, connect() is refused.
    d = start_daemon("-v", PGMQD_RUNPOD_BASE_URL="http://127.0.0.1:9/v2", **FAST_BACKOFF)
    d.wait_log(r"event=batch_rejected .*http_status=0 .*request_sent=no", count=3)
    rejections = d.count_log(r"event=batch_rejected")
    assert d.stop() == 0
    read_ct = queue_db.sql("SELECT max(read_ct) FROM pgmq.q_jobs")[0][0]
    # One read per rejection (the pause blocks every poll in between), not one per 50 ms poll.
    assert rejections <= read_ct <= rejections + 1
    assert not invisible_for_long(queue_db, ids, 60)


@pytest.mark.parametrize("header,expect_ms", [
    ("2", (2000, 2000)),
    (None, (250, 400)),          # missing: our own backoff (base 200, cap 400, floor 250)
    ("soon", (250, 400)),        # invalid: our own backoff
    ("999", (2500, 2500)),       # capped by retry_after_max_ms
    ("DATE+3", (1000, 3000)),    # HTTP-date form
])
def test_429_honours_retry_after(queue_db, emulator, start_daemon, header, expect_ms):
    queue_db.send_many(jobs(1))
    headers = {}
    if header == "DATE+3":
        headers["Retry-After"] = http_date(3)
    elif header is not None:
        headers["Retry-After"] = header
    emulator.add_fault(Fault.status(429, headers=headers))
    d = start_daemon("-v", PGMQD_RUNPOD_RETRY_AFTER_MAX_MS=2500, **FAST_BACKOFF)
    fields = logfmt(d.wait_log(r"event=batch_rejected .*http_status=429")[0].string)
    low, high = expect_ms
    assert low <= int(fields["released_for_ms"]) <= high, fields
    emulator.wait_for(lambda: len(accepted(emulator)) == 1, timeout_s=10)
    assert d.stop() == 0


# ------------------------------------------------------------------ outcome unknown

@pytest.mark.parametrize("fault", [
    Fault.delay(3.0),                      # total timeout after the request was written
    Fault.reset(),                         # reset mid-response
    Fault.status(504),
    Fault.malformed("not_json"),
    Fault.malformed("no_id"),
], ids=["timeout", "reset", "504", "not_json", "no_id"])
def test_unknown_outcome_keeps_vt(queue_db, emulator, start_daemon, fault):
    ids = queue_db.send_many(jobs(3))
    emulator.add_fault(fault)
    d = start_daemon("-v", PGMQD_RUNPOD_REQUEST_TIMEOUT_MS=1000, **FAST_BACKOFF)
    d.wait_log(r"event=batch_outcome_unknown .*outcome=unknown")
    listed = logfmt(d.wait_log(r"event=outcome_unknown_ids")[0].string)["msg_ids"]
    assert [int(i) for i in listed.split(",")] == ids
    # Never sent again while their vt runs: more polls pass without a POST.
    emulator.wait_for(lambda: len(emulator.requests("run")) == 1, timeout_s=10)
    d.wait_log(r"event=queue_empty", count=3)
    assert len(emulator.requests("run")) == 1
    assert invisible_for_long(queue_db, ids)
    assert queue_db.sql("SELECT max(read_ct) FROM pgmq.q_jobs")[0][0] == 1
    assert d.stop() == 0


# ------------------------------------------------------------------ circuit breaker

@pytest.mark.parametrize("status", [401, 403, 404])
def test_circuit_opens_and_a_probe_closes_it(queue_db, emulator, start_daemon, status):
    ids = queue_db.send_many(jobs(2))
    if status == 401:
        emulator.add_endpoint(ENDPOINT_ID, "some-other-key")
    elif status == 403:
        # /run and the first two probes are refused; the third probe passes.
        emulator.add_fault(Fault.status(403, body={"error": "forbidden"}),
                           Fault.status(403, route="health"), Fault.status(403, route="health"))
    env = dict(FAST_BACKOFF, PGMQD_RUNPOD_PROBE_INTERVAL_MS=300)
    if status == 404:
        env["RUNPOD_ENDPOINT_ID"] = "not-yet-there"
    d = start_daemon("-v", **env)
    d.wait_log(r"event=circuit_open .*http_status=%d" % status)
    # Probes go to /health while no reads happen.
    emulator.wait_for(lambda: len(emulator.requests("health")) >= 2, timeout_s=10)
    assert len(emulator.requests("run")) == 1
    assert queue_db.sql("SELECT max(read_ct) FROM pgmq.q_jobs")[0][0] == 1
    # Make the endpoint usable again; the next probe closes the circuit.
    if status == 401:
        emulator.add_endpoint(ENDPOINT_ID, API_KEY)
    elif status == 404:
        emulator.add_endpoint("not-yet-there", API_KEY)
    d.wait_log(r"event=circuit_closed", timeout_s=10)
    assert all(r.status != 200 for r in emulator.requests("health")[:2])
    emulator.wait_for(lambda: len(accepted(emulator)) == 1, timeout_s=10)
    assert [j["msg_id"] for j in json.loads(accepted(emulator)[0].body)["input"]["jobs"]] == ids
    assert d.count_log(r"event=circuit_open") == 1
    assert d.count_log(r"event=circuit_closed") == 1
    assert d.stop() == 0


def test_circuit_open_in_once_names_the_url_and_what_once_does(queue_db, emulator, start_daemon):
    ids = queue_db.send_many(jobs(2))
    d = start_daemon("--once", RUNPOD_ENDPOINT_ID="not-yet-there", **FAST_BACKOFF)
    assert d.wait_exit() != 0
    line = logfmt(d.wait_log(r"event=circuit_open .*http_status=404")[0].string)
    # The URL posted to (a 404 is mostly a wrong endpoint id or base_url); no key in it.
    assert line["url"] == emulator.url("run", endpoint_id="not-yet-there")
    assert "--once" in line["msg"] and "no reads until" not in line["msg"]
    assert API_KEY not in d.output
    assert [r[0] for r in queue_db.sql("SELECT msg_id FROM pgmq.q_jobs WHERE vt <= now() "
                                      "ORDER BY msg_id")] == ids


def test_circuit_still_open_is_reminded_at_the_default_level(queue_db, emulator, start_daemon):
    queue_db.send_many(jobs(1))
    emulator.add_endpoint(ENDPOINT_ID, "some-other-key")
    d = start_daemon("--log-format", "logfmt", PGMQD_RUNPOD_PROBE_INTERVAL_MS=500, **FAST_BACKOFF)
    d.wait_log(r"event=circuit_open .*http_status=401")
    # At most once a minute: the first reminder about 60 s after the opening.
    line = logfmt(d.wait_log(r"level=warn event=circuit_still_open", timeout_s=100)[0].string)
    assert 60 <= int(line["open_s"]) < 90
    assert int(line["probes"]) >= 10 and int(line["last_http_status"]) == 401
    assert len(emulator.requests("health")) >= int(line["probes"])
    assert d.count_log(r"event=circuit_still_open") == 1
    assert API_KEY not in d.output
    assert d.stop() == 0


def test_reload_closes_the_circuit(queue_db, emulator, tmp_path):
    conf = tmp_path / "d.conf"
    key_file = tmp_path / "key"
    key_file.write_text("rp_wrong_key_0000\n")
    conf.write_text("[queue]\nname = jobs\npoll_interval_ms = 50\n"
                    "[runpod]\nprobe_interval_ms = 3600000\nbackoff_base_ms = 600000\n")
    env = base_env(queue_db, emulator, RUNPOD_API_KEY=None, RUNPOD_API_KEY_FILE=str(key_file),
                   PGMQD_QUEUE_POLL_INTERVAL_MS=None, PGMQD_QUEUE_NAME=None)
    queue_db.send_many(jobs(1))
    d = Daemon(env, args=["-v", "-c", str(conf)]).start()
    try:
        d.wait_log(r"event=circuit_open .*http_status=401")
        key_file.write_text(API_KEY + "\n")
        d.signal(signal.SIGHUP)
        d.wait_log(r"event=reloaded")
        d.wait_log(r"event=circuit_closed")
        emulator.wait_for(lambda: len(accepted(emulator)) == 1, timeout_s=10)
        assert API_KEY not in d.output and "rp_wrong_key_0000" not in d.output
    finally:
        assert d.stop() == 0


# ------------------------------------------------------------------ PostgreSQL failures

def test_postgres_restart_and_terminated_backend(pg_cluster, queue_db, emulator, start_daemon):
    d = start_daemon("-v", PGMQD_QUEUE_POLL_INTERVAL_MS=100)
    d.wait_log(r"event=queue_empty")
    pg_cluster.restart(mode="fast")
    queue_db.conn = pg_cluster.connect(queue_db.dbname)
    d.wait_log(r"event=db_connection_lost", timeout_s=15)
    d.wait_log(r"event=db_connected", count=2, timeout_s=30)
    ids = queue_db.send_many(jobs(2))
    emulator.wait_for(lambda: accepted_ids(emulator) == ids, timeout_s=15)
    assert d.count_log(r"event=db_connection_lost") == 1     # logged once per outage

    killed = queue_db.sql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                          "WHERE application_name = 'pgmq-dispatcher' AND datname = %s",
                          (queue_db.dbname,))
    assert killed[0][0] == 1
    d.wait_log(r"event=db_connection_lost", count=2, timeout_s=15)
    more = queue_db.send_many(jobs(2))
    emulator.wait_for(lambda: accepted_ids(emulator) == ids + more, timeout_s=15)
    assert d.proc.poll() is None
    assert d.stop() == 0


@pytest.mark.parametrize("case,sqlstate", [
    ("missing_queue", "42P01"),
    ("missing_function", "42883"),
    ("permission", "42501"),
])
def test_sql_errors_are_logged_and_retried(pg_cluster, queue_db, emulator, case, sqlstate):
    env = dict(FAST_BACKOFF)
    conninfo = queue_db.conninfo
    if case == "missing_queue":
        env["PGMQD_QUEUE_NAME"] = "later"
    elif case == "missing_function":
        env["PGMQD_QUEUE_READ_FUNCTION"] = "public.not_there"
    else:
        queue_db.sql("DROP ROLE IF EXISTS nobody_reader")
        queue_db.sql("CREATE ROLE nobody_reader LOGIN")
        conninfo = pg_cluster.conninfo_for(queue_db.dbname, user="nobody_reader")
    d = Daemon(base_env(queue_db, emulator, PGMQD_DATABASE_CONNINFO=conninfo, **env),
               args=["-v"]).start()
    try:
        first = d.wait_log(rf"event=read_failed .*sqlstate={sqlstate}", count=3, timeout_s=15)
        fields = logfmt(first[0].string)
        assert fields["error"] and int(fields["retry_in_ms"]) >= 250
        # At most one line per backoff step: failed reads equal logged lines, far fewer than polls.
        assert d.proc.poll() is None
        # Repair it; dispatch resumes by itself.
        if case == "missing_queue":
            queue_db.sql("SELECT pgmq.create('later')")
            queue_db.sql("SELECT pgmq.send('later', '{\"x\": 1}'::jsonb)")
        elif case == "missing_function":
            queue_db.sql("CREATE FUNCTION public.not_there(queue_name text, vt integer, qty integer) "
                         "RETURNS SETOF pgmq.message_record LANGUAGE sql AS "
                         "$$ SELECT * FROM pgmq.read(queue_name, vt, qty) $$")
            queue_db.send_many(jobs(1))
        else:
            queue_db.sql("GRANT USAGE ON SCHEMA pgmq TO nobody_reader")
            queue_db.sql("GRANT ALL ON ALL TABLES IN SCHEMA pgmq TO nobody_reader")
            queue_db.send_many(jobs(1))
        emulator.wait_for(lambda: len(accepted(emulator)) == 1, timeout_s=15)
    finally:
        assert d.stop() == 0
        if case == "permission":
            queue_db.sql("REVOKE ALL ON ALL TABLES IN SCHEMA pgmq FROM nobody_reader")
            queue_db.sql("REVOKE USAGE ON SCHEMA pgmq FROM nobody_reader")
            queue_db.sql("DROP ROLE nobody_reader")


def test_large_read_is_consumed_whole(queue_db, emulator, start_daemon):
    big = [{"document_id": f"d{i}", "blob": chr(0x41 + i % 26) * (50 * 1024)} for i in range(100)]
    ids = queue_db.send_many(big)
    d = start_daemon("-v", PGMQD_QUEUE_BATCH_SIZE=100)
    emulator.wait_for(lambda: len(accepted(emulator)) == 1, timeout_s=20)
    rec = accepted(emulator)[0]
    assert len(rec.body) > 100 * 50 * 1024
    body = json.loads(rec.body)["input"]["jobs"]
    assert [j["msg_id"] for j in body] == ids
    assert all(j["message"]["blob"] == big[i]["blob"] for i, j in enumerate(body))
    assert d.stop() == 0


# ------------------------------------------------------------------ messages and payloads

def test_any_jsonb_value(queue_db, emulator, start_daemon):
    deep = "1"
    for _ in range(200):
        deep = '{"a": [' + deep + ']}'
    values = [
        '"' + "é" * (512 * 1024) + '"',                          # 1 MB of UTF-8 text
        deep,
        '"\\ud83d\\ude00 \\/ \\b\\f\\n\\r\\t \\" \\\\ \\u001f"',  # escapes that look odd
        '{"": "", "document_id": ["a", 1]}',
        "true", "false", "0", "1e309" if False else "1e308",
    ]
    ids = queue_db.send_many(values)
    d = start_daemon("-v")
    emulator.wait_for(lambda: sorted(accepted_ids(emulator)) == ids, timeout_s=15)
    rows = queue_db.rows()
    raw = b"".join(r.body for r in accepted(emulator))
    for i in ids:
        assert b'"message":' + rows[i]["message"].encode() in raw
    assert d.stop() == 0


def test_batches_are_split_under_max_body_bytes_and_oversize_archived(queue_db, emulator,
                                                                       start_daemon):
    msgs = jobs(10, size=300)
    msgs.insert(4, {"document_id": "huge", "pad": "y" * 5000})
    ids = queue_db.send_many(msgs)
    huge = ids[4]
    d = start_daemon("-v", PGMQD_RUNPOD_MAX_BODY_BYTES=2000, PGMQD_QUEUE_BATCH_SIZE=20)
    fields = logfmt(d.wait_log(r"event=message_archived .*reason=too_large")[0].string)
    assert fields["msg_id"] == str(huge) and int(fields["body_bytes"]) > 2000
    assert fields["level"] == "error"
    emulator.wait_for(lambda: len(accepted_ids(emulator)) == 10, timeout_s=10)
    assert all(len(r.body) <= 2000 for r in emulator.requests("run"))
    assert len(emulator.requests("run")) >= 3
    got = accepted_ids(emulator)
    assert sorted(got) == [i for i in ids if i != huge] and len(set(got)) == len(got)  # once each
    for r in accepted(emulator):                                         # msg_id order inside
        inside = [j["msg_id"] for j in json.loads(r.body)["input"]["jobs"]]
        assert inside == sorted(inside)
    wait_until(lambda: queue_db.sql("SELECT msg_id FROM pgmq.a_jobs"), timeout=10, what="archive")
    assert queue_db.sql("SELECT msg_id FROM pgmq.a_jobs") == [(huge,)]
    assert not queue_db.sql("SELECT 1 FROM pgmq.q_jobs WHERE msg_id = %s", (huge,))
    assert d.stop() == 0


def test_413_splits_the_batch_and_archives_a_message_too_large_alone(queue_db, emulator,
                                                                     start_daemon):
    """Our max_body_bytes is above what the server takes: a 413 must not loop (release, read
    again, same body) but split down to bodies that pass; one message refused alone is
    archived with its msg id and size. No pause: reads go on."""
    msgs = jobs(8, size=300)
    msgs.insert(3, {"document_id": "huge", "pad": "y" * 3000})
    ids = queue_db.send_many(msgs)
    huge = ids[3]
    emulator.max_body_bytes = 1500
    d = start_daemon("-v", PGMQD_RUNPOD_MAX_BODY_BYTES=100000, PGMQD_QUEUE_BATCH_SIZE=20,
                     **FAST_BACKOFF)
    fields = logfmt(d.wait_log(r"event=message_archived .*reason=too_large", timeout_s=20)[0].string)
    assert fields["msg_id"] == str(huge) and int(fields["body_bytes"]) > 3000, fields
    emulator.wait_for(lambda: len(accepted_ids(emulator)) == 8, timeout_s=20)
    got = accepted_ids(emulator)
    assert sorted(got) == [i for i in ids if i != huge] and len(set(got)) == len(got)
    assert d.count_log(r"event=batch_split") >= 1
    wait_until(lambda: queue_db.sql("SELECT msg_id FROM pgmq.a_jobs"), timeout=10, what="archive")
    assert queue_db.sql("SELECT msg_id FROM pgmq.a_jobs") == [(huge,)]
    # Never released and read again: every message was read exactly once.
    assert queue_db.sql("SELECT max(read_ct) FROM pgmq.q_jobs")[0][0] == 1
    # A split is not a pause for everyone: no rejection released anything.
    assert d.count_log(r"released_for_ms=") == 0
    assert d.stop() == 0


def test_poison_guard_archives_over_read_messages(queue_db, emulator, start_daemon):
    ids = queue_db.send_many(jobs(3))
    queue_db.sql("UPDATE pgmq.q_jobs SET read_ct = 5 WHERE msg_id = %s", (ids[1],))
    d = start_daemon("-v", PGMQD_QUEUE_MAX_READ_CT=5)
    fields = logfmt(d.wait_log(r"event=message_archived .*reason=max_read_ct")[0].string)
    assert fields["msg_id"] == str(ids[1]) and fields["read_ct"] == "6"
    emulator.wait_for(lambda: len(accepted_ids(emulator)) == 2, timeout_s=10)
    assert accepted_ids(emulator) == [ids[0], ids[2]]
    wait_until(lambda: queue_db.sql("SELECT msg_id FROM pgmq.a_jobs"), timeout=10, what="archive")
    assert queue_db.sql("SELECT msg_id FROM pgmq.a_jobs") == [(ids[1],)]
    assert d.stop() == 0


def test_read_ct_at_int4_max_names_the_row_and_the_way_out(queue_db, emulator, start_daemon):
    """pgmq.read fails with 22003 for every read once a row's read_ct is 2^31-1: the log names
    the row and the statement that unblocks the queue."""
    ids = queue_db.send_many(jobs(3))
    queue_db.sql("UPDATE pgmq.q_jobs SET read_ct = 2147483647 WHERE msg_id = %s", (ids[1],))
    d = start_daemon("-v", **FAST_BACKOFF)
    d.wait_log(r"event=read_failed .*sqlstate=22003")
    fields = logfmt(d.wait_log(r"event=read_ct_overflow ")[0].string)
    assert fields["msg_ids"] == str(ids[1]), fields
    assert fields["fix"] == f"SELECT pgmq.archive('{QUEUE}', {ids[1]})", fields
    assert fields["level"] == "error"
    assert d.stop() == 0


def test_poison_guard_archives_a_row_at_int4_max(queue_db, emulator, start_daemon):
    ids = queue_db.send_many(jobs(3))
    queue_db.sql("UPDATE pgmq.q_jobs SET read_ct = 2147483647 WHERE msg_id = %s", (ids[1],))
    d = start_daemon("-v", PGMQD_QUEUE_MAX_READ_CT=5, **FAST_BACKOFF)
    fields = logfmt(d.wait_log(r"event=read_ct_overflow ")[0].string)
    assert fields["msg_ids"] == str(ids[1]) and "archiving" in fields["outcome"], fields
    d.wait_log(r"event=read_ct_overflow_archived .*messages=1")
    emulator.wait_for(lambda: sorted(accepted_ids(emulator)) == [ids[0], ids[2]], timeout_s=15)
    assert queue_db.sql("SELECT msg_id FROM pgmq.a_jobs") == [(ids[1],)]
    assert d.stop() == 0


# ------------------------------------------------------------------ signals and lifecycle

def test_sigterm_lets_in_flight_finish(queue_db, emulator, start_daemon):
    ids = queue_db.send_many(jobs(2))
    emulator.hold_runs()
    d = start_daemon("-v")
    emulator.wait_for(lambda: emulator.in_flight_run == 1, timeout_s=10)
    d.signal(signal.SIGTERM)
    d.wait_log(r"event=stopping .*in_flight=1")
    emulator.release_runs()
    assert d.wait_exit() == 0
    assert accepted_ids(emulator) == ids
    assert d.count_log(r"event=batch_accepted") == 1


def test_sigterm_deadline_aborts_as_unknown(queue_db, emulator, start_daemon):
    ids = queue_db.send_many(jobs(2))
    emulator.hold_runs()
    d = start_daemon("-v", PGMQD_DAEMON_SHUTDOWN_TIMEOUT_MS=300)
    try:
        emulator.wait_for(lambda: emulator.in_flight_run == 1, timeout_s=10)
        d.signal(signal.SIGINT)
        assert d.wait_exit() == 0
    finally:
        emulator.release_runs()
    d.wait_log(r"event=shutdown_deadline .*in_flight=1")
    d.wait_log(r"event=batch_outcome_unknown")
    listed = logfmt(d.wait_log(r"event=outcome_unknown_ids")[0].string)["msg_ids"]
    assert [int(i) for i in listed.split(",")] == ids
    assert invisible_for_long(queue_db, ids)


def test_second_signal_exits_at_once(queue_db, emulator, start_daemon):
    queue_db.send_many(jobs(1))
    emulator.hold_runs()
    d = start_daemon("-v", PGMQD_DAEMON_SHUTDOWN_TIMEOUT_MS=60000)
    try:
        emulator.wait_for(lambda: emulator.in_flight_run == 1, timeout_s=10)
        d.signal(signal.SIGTERM)
        d.wait_log(r"event=stopping")
        d.signal(signal.SIGTERM)
        assert d.wait_exit(timeout_s=5) == 1
        d.wait_log(r"event=exit_now")
        d.wait_log(r"event=outcome_unknown_ids")   # the dropped request is accounted for
    finally:
        emulator.release_runs()


def test_messages_read_while_stopping_are_released(queue_db, emulator):
    queue_db.sql("CREATE FUNCTION public.slow_read(queue_name text, vt integer, qty integer) "
                 "RETURNS SETOF pgmq.message_record LANGUAGE plpgsql AS $$ BEGIN "
                 "PERFORM pg_sleep(1.5); RETURN QUERY SELECT * FROM pgmq.read(queue_name, vt, qty); END $$")
    ids = queue_db.send_many(jobs(2))
    d = Daemon(base_env(queue_db, emulator, PGMQD_QUEUE_READ_FUNCTION="public.slow_read"),
               args=["-v"]).start()
    wait_until(lambda: queue_db.sql(
        "SELECT 1 FROM pg_stat_activity WHERE query LIKE '%%slow_read%%' "
        "AND application_name = 'pgmq-dispatcher' AND state = 'active'"), timeout=10,
        what="the slow read to run")
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    assert emulator.requests("run") == []
    rows = queue_db.rows()
    assert [rows[i]["read_ct"] for i in ids] == [1, 1]
    assert not any(rows[i]["invisible"] for i in ids)       # set_vt(…, 0): visible now


def test_connection_lost_during_a_read_is_logged_as_fate_unknown(queue_db, emulator):
    queue_db.sql("CREATE FUNCTION public.slow_read(queue_name text, vt integer, qty integer) "
                 "RETURNS SETOF pgmq.message_record LANGUAGE plpgsql AS $$ BEGIN "
                 "PERFORM pg_sleep(30); RETURN QUERY SELECT * FROM pgmq.read(queue_name, vt, qty); END $$")
    d = Daemon(base_env(queue_db, emulator, PGMQD_QUEUE_READ_FUNCTION="public.slow_read"),
               args=["-v"]).start()
    try:
        wait_until(lambda: queue_db.sql(
            "SELECT 1 FROM pg_stat_activity WHERE query LIKE '%%slow_read%%' "
            "AND application_name = 'pgmq-dispatcher' AND state = 'active'"), timeout=10,
            what="the slow read to run")
        queue_db.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE application_name = 'pgmq-dispatcher' AND datname = %s", (queue_db.dbname,))
        fields = logfmt(d.wait_log(r"event=read_fate_unknown")[0].string)
        assert "after vt_seconds" in fields["outcome"]
        d.wait_log(r"event=db_connected", count=2, timeout_s=15)   # and it reconnects
    finally:
        assert d.stop() == 0


def test_sighup_reload(queue_db, emulator, tmp_path):
    conf = tmp_path / "d.conf"
    conf.write_text("[queue]\nname = jobs\nbatch_size = 2\npoll_interval_ms = 100\n")
    env = base_env(queue_db, emulator, PGMQD_QUEUE_NAME=None, PGMQD_QUEUE_POLL_INTERVAL_MS=None)
    d = Daemon(env, args=["-v", "-c", str(conf)]).start()
    try:
        d.wait_log(r"event=queue_empty")
        conf.write_text("[queue]\nname = jobs\nbatch_size = zero\n")          # invalid
        d.signal(signal.SIGHUP)
        d.wait_log(r"event=reload_failed")
        conf.write_text("[queue]\nname = other\nbatch_size = 3\npoll_interval_ms = 100\n")
        d.signal(signal.SIGHUP)
        d.wait_log(r"event=reloaded")
        assert logfmt(d.wait_log(r"event=reload_key_ignored")[0].string)["key"] == "queue.name"
        # A read sent before the reload still asks for batch_size 2: wait until one
        # sent after it has come back empty before inserting. One transaction, so
        # that no 100 ms poll can fall between the inserts.
        at = next(i for i, line in enumerate(d.lines) if "event=reloaded" in line)
        wait_until(lambda: any("event=queue_empty" in line for line in d.lines[at + 1:]), 10,
                   what="an empty read after the reload")
        ids = [r[0] for r in queue_db.sql("SELECT * FROM pgmq.send_batch(%s, %s::jsonb[])",
                                          (queue_db.queue, [json.dumps(j) for j in jobs(3)]))]
        emulator.wait_for(lambda: len(accepted_ids(emulator)) == 3, timeout_s=10)
        assert [len(json.loads(r.body)["input"]["jobs"]) for r in accepted(emulator)] == [3]
        assert accepted_ids(emulator) == ids
    finally:
        assert d.stop() == 0


def test_frequent_sighup_keeps_the_poll_cadence(queue_db, emulator, start_daemon):
    # Issue 10 defect 5: a reload restarted the poll timer, so SIGHUP every 0.5 s with a 1 s poll
    # stopped reads entirely. NOTIFY off: the poll timer is the only way to find messages.
    d = start_daemon("-v", PGMQD_QUEUE_POLL_INTERVAL_MS=1000, PGMQD_QUEUE_NOTIFY="off")
    d.wait_log(r"event=queue_empty")
    stop = threading.Event()

    def hup():
        while not stop.wait(0.5):
            d.signal(signal.SIGHUP)

    t = threading.Thread(target=hup, daemon=True)
    t.start()
    try:
        d.wait_log(r"event=reloaded", count=3)
        sent = []
        for _ in range(3):                       # each found by a poll within ~1 s
            ids = queue_db.send_many(jobs(1))
            sent += ids
            emulator.wait_for(lambda: accepted_ids(emulator) == sent, timeout_s=4)
        before = d.count_log(r"event=(queue_empty|batch_read)")
        wait_until(lambda: d.count_log(r"event=(queue_empty|batch_read)") >= before + 3, 6,
                   what="three polls in about three seconds of SIGHUPs")
        assert d.count_log(r"event=reloaded") >= 6
    finally:
        stop.set()
        t.join()
    assert d.stop() == 0


def test_sighup_with_new_conninfo_reconnects(pg_cluster, queue_db, emulator, tmp_path):
    conf = tmp_path / "d.conf"
    conf.write_text("[database]\nconninfo = %s application_name=first\n" % queue_db.conninfo)
    env = base_env(queue_db, emulator, PGMQD_DATABASE_CONNINFO=None)
    d = Daemon(env, args=["-v", "-c", str(conf)]).start()
    try:
        d.wait_log(r"event=queue_empty")
        conf.write_text("[database]\nconninfo = %s application_name=second\n" % queue_db.conninfo)
        d.signal(signal.SIGHUP)
        d.wait_log(r"event=db_reconnecting")
        d.wait_log(r"event=db_connected", count=2)
        names = queue_db.sql("SELECT application_name FROM pg_stat_activity WHERE datname = %s "
                             "AND application_name IN ('first', 'second')", (queue_db.dbname,))
        assert names == [("second",)]
    finally:
        assert d.stop() == 0


def test_sigkill_mid_dispatch_loses_nothing(queue_db, emulator):
    ids = queue_db.send_many(jobs(25))
    env = base_env(queue_db, emulator, PGMQD_QUEUE_VT_SECONDS=3, PGMQD_QUEUE_POLL_INTERVAL_MS=100)
    emulator.hold_runs()
    d = Daemon(env, args=["-v"]).start()
    emulator.wait_for(lambda: emulator.in_flight_run >= 1, timeout_s=10)
    d.proc.kill()
    d.wait_exit()
    emulator.release_runs()
    # Restart: what was accepted before the kill is done; everything else comes back after its vt.
    d2 = Daemon(env, args=["-v"]).start()
    try:
        emulator.wait_for(lambda: set(ids) <= set(accepted_ids(emulator)), timeout_s=30)
    finally:
        d2.stop()


# ------------------------------------------------------------------ replicas

def test_three_replicas_deliver_each_message_once(queue_db, emulator):
    ids = queue_db.send_many(jobs(3000))
    env = base_env(queue_db, emulator, PGMQD_QUEUE_POLL_INTERVAL_MS=50)
    replicas = [Daemon(env, args=[]).start() for _ in range(3)]
    try:
        emulator.wait_for(lambda: len(accepted_ids(emulator)) >= 3000, timeout_s=120)
    finally:
        for d in replicas:
            assert d.stop() == 0
    got = accepted_ids(emulator)
    assert sorted(got) == ids               # every msg_id exactly once
    per_replica = [d.count_log(r"event=batch_accepted") for d in replicas]
    assert sum(per_replica) == len(accepted(emulator))


def test_bad_rows_from_a_read_function_are_released_not_lost(queue_db, emulator):
    queue_db.sql("""CREATE FUNCTION public.bad_read(queue_name text, vt integer, qty integer)
        RETURNS TABLE(msg_id bigint, read_ct text, enqueued_at timestamptz, vt timestamptz, message jsonb)
        LANGUAGE sql AS $$ SELECT r.msg_id, CASE WHEN r.msg_id % 3 = 0 THEN 'x' ELSE r.read_ct::text END,
                              r.enqueued_at, r.vt, r.message FROM pgmq.read(queue_name, vt, qty) r $$""")
    ids = queue_db.send_many(jobs(6))
    bad = [i for i in ids if i % 3 == 0]
    d = Daemon(base_env(queue_db, emulator, PGMQD_QUEUE_READ_FUNCTION="public.bad_read",
                        **FAST_BACKOFF), args=["-v"]).start()
    try:
        emulator.wait_for(lambda: sorted(accepted_ids(emulator)) == [i for i in ids if i not in bad],
                          timeout_s=10)
        lines = d.wait_log(r"event=row_invalid", count=len(bad))
        assert {int(logfmt(m.string)["msg_id"]) for m in lines} == set(bad)
        assert all(logfmt(m.string)["outcome"] == "released" for m in lines)
        # Released with a short backoff, not hidden for vt_seconds.
        wait_until(lambda: not invisible_for_long(queue_db, bad, 60) and
                   all(r[0] < 1800 for r in queue_db.sql(
                       "SELECT extract(epoch FROM vt - clock_timestamp()) FROM pgmq.q_jobs "
                       "WHERE msg_id = ANY(%s)", (bad,))), timeout=10, what="bad rows released")
    finally:
        assert d.stop() == 0


def test_a_dead_reused_connection_is_not_silently_resent(queue_db, emulator, start_daemon):
    first = queue_db.send_many(jobs(1))
    d = start_daemon("-v", PGMQD_QUEUE_POLL_INTERVAL_MS=100, PGMQD_QUEUE_NOTIFY="off")
    emulator.wait_for(lambda: accepted_ids(emulator) == first, timeout_s=10)
    # The next request goes out on the kept-alive connection; the server
    # creates the job and closes without replying. libcurl would re-send it.
    emulator.add_fault(Fault.close(create_job=True))
    victim = queue_db.send_many(jobs(1))
    d.wait_log(r"event=batch_outcome_unknown .*resend=")
    listed = logfmt(d.wait_log(r"event=outcome_unknown_ids")[0].string)["msg_ids"]
    assert [int(i) for i in listed.split(",")] == victim
    d.wait_log(r"event=queue_empty", count=3)
    sent = [r for r in emulator.requests("run")
            if [j["msg_id"] for j in json.loads(r.body)["input"]["jobs"]] == victim]
    assert len(sent) == 1                          # one POST, so at most one RunPod job
    assert invisible_for_long(queue_db, victim)    # keeps its vt: the job may exist
    assert d.stop() == 0
