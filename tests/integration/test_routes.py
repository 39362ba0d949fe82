"""Several routes in one daemon (issue 13): [route.NAME] sections, each a queue → endpoint pair
with its own settings; a fault on one endpoint opens only that route's circuit; runtime control
(pause, resume, drain) over HTTP and the `ctl` CLI, kept across a reload and a restart; routes
added and removed by a reload.

Every wait is on a condition with a deadline."""

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from test_service import NotifySocket  # noqa: E402
from daemon import (API_KEY, BINARY, Daemon, Fault, QueueDb, RunPodEmulator,
                    assert_no_sanitizer_report, logfmt)

EP_A, EP_B, EP_C = "ep-route-a", "ep-route-b", "ep-route-c"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def metrics(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def http(port, path, method="GET", token=None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 data=b"" if method == "POST" else None)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture
def two_queues(pg_cluster, make_pgmq_db):
    dbname = make_pgmq_db(prefix="routes")
    a = QueueDb(pg_cluster, dbname, queue="jobs_a")
    b = QueueDb(pg_cluster, dbname, queue="jobs_b")
    c = QueueDb(pg_cluster, dbname, queue="jobs_c")
    try:
        yield a, b, c
    finally:
        for q in (a, b, c):
            q.close()


@pytest.fixture
def emus():
    started = []
    for ep in (EP_A, EP_B, EP_C):
        e = RunPodEmulator(endpoint_id=ep, api_key=API_KEY, in_queue_s=0.2, run_s=0.2)
        e.start()
        started.append(e)
    try:
        yield started
    finally:
        for e in started:
            e.stop()


def write_config(path, db, emus, port, routes=("a", "b"), extra=None):
    base = {"a": (emus[0], "jobs_a", EP_A), "b": (emus[1], "jobs_b", EP_B),
            "c": (emus[2], "jobs_c", EP_C)}
    lines = [
        "[database]", f"conninfo = {db.conninfo}",
        "[queue]", "poll_interval_ms = 100", "batch_size = 10",
        "[runpod]", f"api_key = {API_KEY}", "probe_interval_ms = 60000",
        "[admin]", f"listen = 127.0.0.1:{port}", "metrics_interval_ms = 200",
    ]
    for name in routes:
        emu, queue, ep = base[name]
        lines += [f"[route.{name}]", f"queue = {queue}", f"endpoint_id = {ep}",
                  f"base_url = {emu.base_url}"]
        lines += (extra or {}).get(name, [])
    path.write_text("\n".join(lines) + "\n")


def start(cfg_path, *args, **env):
    d = Daemon({"PATH": "/usr/bin:/bin", **env}, args=("-v", "-c", str(cfg_path), *args))
    return d.start()


def ctl(cfg_path, *args):
    p = subprocess.run([BINARY, "-c", str(cfg_path), "ctl", *args], capture_output=True,
                       text=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
    return p.returncode, p.stdout, p.stderr


def stop(d):
    if d.proc.poll() is None:
        d.stop()
    assert_no_sanitizer_report(d.output)


ROUTE_SETTINGS = {
    "a": ["batch_size = 3", "vt_seconds = 600", "policy_low_priority = on"],
    "b": ["batch_size = 5", "vt_seconds = 900", "webhook = https://hooks.example.com/b",
          "read_function = pgmq.read"],
}


def test_two_routes_each_message_reaches_its_own_endpoint(two_queues, emus, tmp_path):
    qa, qb, _ = two_queues
    port = free_port()
    cfg = tmp_path / "two.conf"
    write_config(cfg, qa, emus, port, extra=ROUTE_SETTINGS)
    ids_a = set(qa.send_many([{"n": i, "for": "a"} for i in range(7)]))
    ids_b = set(qb.send_many([{"n": i, "for": "b"} for i in range(11)]))
    d = start(cfg)
    try:
        def jobs(emu):
            return [j for body in emu.run_bodies() for j in body["input"]["jobs"]]
        wait_until(lambda: len(jobs(emus[0])) == 7 and len(jobs(emus[1])) == 11, what="both drained")
        for body in emus[0].run_bodies():
            assert body["input"]["queue"] == "jobs_a" and body["input"]["vt_seconds"] == 600
            assert len(body["input"]["jobs"]) <= 3
            assert body["policy"] == {"lowPriority": True}
            assert "webhook" not in body
        for body in emus[1].run_bodies():
            assert body["input"]["queue"] == "jobs_b" and body["input"]["vt_seconds"] == 900
            assert len(body["input"]["jobs"]) <= 5
            assert body["webhook"] == "https://hooks.example.com/b"
            assert "policy" not in body
        assert {j["msg_id"] for j in jobs(emus[0])} == ids_a
        assert {j["msg_id"] for j in jobs(emus[1])} == ids_b
        assert all(r.endpoint_id == EP_A for r in emus[0].requests("run"))
        assert all(r.endpoint_id == EP_B for r in emus[1].requests("run"))
        assert not emus[2].requests("run")
        m = metrics(port)
        assert m['pgmqd_route_messages_dispatched_total{route="a"}'] == 7
        assert m['pgmqd_route_messages_dispatched_total{route="b"}'] == 11
        assert m["pgmqd_messages_dispatched_total"] == 18
        # Every batch line names its route, and the route's queue.
        acc = [logfmt(l) for l in d.lines if "event=batch_accepted" in l]
        assert {(x["route"], x["queue"]) for x in acc} == {("a", "jobs_a"), ("b", "jobs_b")}
        rc, out, err = ctl(cfg, "routes")
        assert rc == 0, err
        assert re.search(r"^a\s+jobs_a\s+running\s+yes", out, re.M), out
        assert re.search(r"^b\s+jobs_b\s+running\s+yes", out, re.M), out
    finally:
        stop(d)


@pytest.mark.parametrize("fault", ["401", "5xx"])
def test_fault_on_one_endpoint_touches_only_its_route(two_queues, emus, tmp_path, fault):
    qa, qb, _ = two_queues
    port = free_port()
    cfg = tmp_path / "fault.conf"
    write_config(cfg, qa, emus, port, extra={"b": ["backoff_base_ms = 50", "backoff_max_ms = 200"]})
    if fault == "401":
        emus[1].add_random_fault(Fault.status(401), 1.0)
    else:
        emus[1].add_random_fault(Fault.status(503), 1.0)
    d = start(cfg)
    try:
        qb.send_many([{"b": i} for i in range(4)])
        if fault == "401":
            d.wait_log(r"event=circuit_open .*route=b|route=b .*event=circuit_open|"
                       r"event=circuit_open route=b", timeout_s=20)
            wait_until(lambda: metrics(port).get('pgmqd_route_circuit_open{route="b"}') == 1,
                       what="b's circuit open")
            status, why = http(port, "/readyz")
            assert status == 503 and why.startswith("route b: circuit open"), why
        else:
            wait_until(lambda: len(emus[1].requests("run")) >= 5, what="a 5xx storm on b")
        # Route a is untouched: its messages go through while b fails.
        ids_a = set(qa.send_many([{"a": i} for i in range(6)]))
        wait_until(lambda: {j["msg_id"] for body in emus[0].run_bodies()
                            for j in body["input"]["jobs"]} == ids_a, what="a delivered")
        m = metrics(port)
        assert m['pgmqd_route_circuit_open{route="a"}'] == 0
        assert m['pgmqd_route_messages_dispatched_total{route="a"}'] == 6
        assert m['pgmqd_route_messages_dispatched_total{route="b"}'] == 0
        assert m['pgmqd_route_requests_rejected_total{route="a"}'] == 0
        assert m['pgmqd_route_requests_rejected_total{route="b"}'] >= 1
        for line in d.lines:
            if "event=circuit_open" in line or "event=batch_rejected" in line:
                assert logfmt(line)["route"] == "b", line
    finally:
        stop(d)


def test_pause_resume_drain_over_http_and_cli_across_reload_and_restart(two_queues, emus,
                                                                         tmp_path):
    qa, qb, _ = two_queues
    port = free_port()
    cfg = tmp_path / "ctl.conf"
    write_config(cfg, qa, emus, port)
    ns = NotifySocket(abstract=True)
    d = start(cfg, NOTIFY_SOCKET=ns.address)
    try:
        d.wait_log(r"event=route_started.*route=b|route=b.*event=route_started")
        rc, out, err = ctl(cfg, "pause", "a")
        assert rc == 0, err
        wait_until(lambda: metrics(port).get('pgmqd_route_state{route="a",state="paused"}') == 1,
                   what="a paused in /metrics")
        ns.wait(lambda ms: any("STATUS=route a: paused" in m for _, m in ms), what="STATUS paused")
        rc, out, err = ctl(cfg, "pause", "nosuch")
        assert rc != 0 and "no such route" in err
        ids_a = set(qa.send_many([{"a": i} for i in range(3)]))
        qb.send_many([{"b": 1}])
        # b keeps reading (and delivers) while a, on the same loop and poll period, reads nothing.
        wait_until(lambda: emus[1].run_bodies(), what="b delivered")
        n = d.count_log(r"route=b.*event=queue_empty|event=queue_empty.*route=b")
        d.wait_log(r"event=queue_empty.*route=b|route=b.*event=queue_empty", count=n + 10)
        assert not emus[0].requests("run")
        # Restart: the pause is kept in the database.
        stop(d)
        d = start(cfg)
        d.wait_log(r"event=route_control_restored")
        n = d.count_log(r"route=b.*event=queue_empty|event=queue_empty.*route=b")
        d.wait_log(r"event=queue_empty.*route=b|route=b.*event=queue_empty", count=n + 10)
        assert not emus[0].requests("run")
        rc, out, err = ctl(cfg, "routes")
        assert re.search(r"^a\s+jobs_a\s+paused", out, re.M), out
        assert "paused" in json.loads(http(port, "/routes")[1])[0]["state"]
        # Reload: still paused.
        d.signal(signal.SIGHUP)
        d.wait_log(r"event=reloaded")
        n = d.count_log(r"route=b.*event=queue_empty|event=queue_empty.*route=b")
        d.wait_log(r"event=queue_empty.*route=b|route=b.*event=queue_empty", count=n + 10)
        assert not emus[0].requests("run")
        # Resume over HTTP: a's messages go out.
        status, body = http(port, "/routes/a/resume", method="POST")
        assert status == 200, body
        try:
            wait_until(lambda: {j["msg_id"] for b in emus[0].run_bodies()
                                for j in b["input"]["jobs"]} == ids_a, what="a delivered after resume")
        except AssertionError:
            print("\n".join(l for l in d.lines if "queue_empty" not in l and "admin_request" not in l))
            raise
        # Drain b: reads until the queue is empty, then none.
        qb.send_many([{"b": i} for i in range(4)])
        rc, out, err = ctl(cfg, "drain", "b")
        assert rc == 0, err
        wait_until(lambda: metrics(port).get('pgmqd_route_state{route="b",state="drained"}') == 1,
                   what="b drained")
        assert sum(len(x["input"]["jobs"]) for x in emus[1].run_bodies()) == 5
        qb.send_many([{"b": "late"}])
        n = d.count_log(r"route=a.*event=queue_empty|event=queue_empty.*route=a")
        d.wait_log(r"event=queue_empty.*route=a|route=a.*event=queue_empty", count=n + 10)
        assert sum(len(x["input"]["jobs"]) for x in emus[1].run_bodies()) == 5
    finally:
        stop(d)
        ns.close()


def test_a_pause_before_the_database_is_reached_is_kept(two_queues, emus, tmp_path):
    """A pause asked for before the route's first connection (the admin endpoint is up at
    once) is stored once the ledger's migration has made its table, not sent ahead of it
    into a database without one, and so outlasts a restart."""
    qa, _, _ = two_queues
    port = free_port()
    cfg = tmp_path / "early.conf"
    write_config(cfg, qa, emus, port)
    good = cfg.read_text()
    cfg.write_text(good.replace(f"conninfo = {qa.conninfo}",
                                f"conninfo = host=127.0.0.1 port={free_port()} dbname=x"))
    d = start(cfg)
    try:
        d.wait_log(r"event=started")      # the admin endpoint is up; the database is not
        rc, _, err = ctl(cfg, "pause", "a")
        assert rc == 0, err
        cfg.write_text(good)             # the database comes within reach
        d.signal(signal.SIGHUP)
        d.wait_log(r"event=route_control .*route=a|route=a.*event=route_control\b")
        wait_until(lambda: qa.sql("SELECT count(*) FROM pg_tables WHERE tablename = "
                                  "'route_control'")[0][0] == 1, what="the migration")
        wait_until(lambda: qa.sql("SELECT state FROM pgmq_dispatcher.route_control "
                                  "WHERE route = 'a'") == [("paused",)], what="the pause stored")
        assert "control_not_stored" not in d.output
        stop(d)
        d = start(cfg)
        d.wait_log(r"event=route_control_restored .*route=a|route=a.*event=route_control_restored")
        assert "paused" in json.loads(http(port, "/routes")[1])[0]["state"]
    finally:
        stop(d)


def test_control_needs_token_off_loopback(two_queues, emus, tmp_path):
    qa, _, _ = two_queues
    port = free_port()
    cfg = tmp_path / "tok.conf"
    write_config(cfg, qa, emus, port)
    text = cfg.read_text().replace(f"listen = 127.0.0.1:{port}",
                                   f"listen = 127.0.0.1:{port}\ntoken = s3cr3t-token")
    cfg.write_text(text)
    d = start(cfg)
    try:
        d.wait_log(r"event=route_started")
        assert http(port, "/routes/a/pause", method="POST")[0] == 401
        assert http(port, "/routes/a/pause", method="POST", token="wrong")[0] == 401
        assert http(port, "/routes/a/pause", method="POST", token="s3cr3t-token")[0] == 200
        rc, out, err = ctl(cfg, "routes")  # the CLI sends the token from the same config
        assert rc == 0 and re.search(r"^a\s+jobs_a\s+paused", out, re.M), (out, err)
        assert "s3cr3t-token" not in d.output
    finally:
        stop(d)


def test_reload_adds_and_removes_routes_leaving_others_in_flight(two_queues, emus, tmp_path):
    qa, qb, qc = two_queues
    port = free_port()
    cfg = tmp_path / "reload.conf"
    write_config(cfg, qa, emus, port)
    d = start(cfg)
    try:
        d.wait_log(r"event=route_started.*route=b|route=b.*event=route_started")
        emus[0].hold_runs()
        emus[1].hold_runs()
        ids_a = set(qa.send_many([{"a": i} for i in range(3)]))
        ids_b = set(qb.send_many([{"b": i} for i in range(2)]))
        wait_until(lambda: emus[0]._held_run >= 1 and emus[1]._held_run >= 1,
                   what="a and b in flight")
        # Remove b, add c, keep a (changing its batch_size).
        write_config(cfg, qa, emus, port, routes=("a", "c"), extra={"a": ["batch_size = 7"]})
        ids_c = set(qc.send_many([{"c": i} for i in range(4)]))
        d.signal(signal.SIGHUP)
        d.wait_log(r"event=reloaded")
        d.wait_log(r"event=route_added")
        wait_until(lambda: {j["msg_id"] for b in emus[2].run_bodies()
                            for j in b["input"]["jobs"]} == ids_c, what="c delivered")
        emus[0].release_runs()
        emus[1].release_runs()
        wait_until(lambda: {j["msg_id"] for b in emus[0].run_bodies()
                            for j in b["input"]["jobs"]} == ids_a, what="a's batch accepted")
        wait_until(lambda: {j["msg_id"] for b in emus[1].run_bodies()
                            for j in b["input"]["jobs"]} == ids_b, what="b's in-flight finished")
        d.wait_log(r"event=route_removed")
        # Nothing of a was released or lost by the reload.
        assert not [l for l in d.lines if "route=a" in l and ("event=released" in l or
                                                              "event=batch_outcome_unknown" in l)]
        # b no longer reads: a message sent now stays.
        qb.send_many([{"b": "after"}])
        n = d.count_log(r"route=a.*event=queue_empty|event=queue_empty.*route=a")
        d.wait_log(r"event=queue_empty.*route=a|route=a.*event=queue_empty", count=n + 10)
        assert sum(len(x["input"]["jobs"]) for x in emus[1].run_bodies()) == 2
        rc, out, err = ctl(cfg, "routes")
        assert re.search(r"^c\s+jobs_c", out, re.M) and not re.search(r"^b\s", out, re.M), out
    finally:
        emus[0].release_runs()
        emus[1].release_runs()
        stop(d)


def test_fuller_reads_claim_the_free_slots_in_one_read(queue_db, emulator, start_daemon):
    """queue.read_batches: one pgmq.read claims batch_size x the free in-flight slots, sent as
    bodies of at most batch_size; never more than the rate cap lets out within a second."""
    ids = queue_db.send_many([{"i": i} for i in range(100)])
    emulator.hold_runs()
    d = start_daemon("-v", PGMQD_QUEUE_MAX_IN_FLIGHT=4, PGMQD_QUEUE_READ_BATCHES=8)
    try:
        emulator.wait_for(lambda: emulator.in_flight_run == 4, timeout_s=10)
        # 4 free slots x batch_size 10, in one statement: four batches of one read of 40.
        lines = [logfmt(m.string) for m in d.wait_log(r"event=batch_read .*", count=4)]
        assert [(x["jobs"], x["read_jobs"]) for x in lines] == [("10", "40")] * 4, lines
        assert d.count_log(r"event=batch_read") == 4
    finally:
        emulator.release_runs()
    emulator.wait_for(lambda: sorted(j["msg_id"] for b in emulator.run_bodies()
                                     for j in b["input"]["jobs"]) == ids, timeout_s=20)
    assert max(len(b["input"]["jobs"]) for b in emulator.run_bodies()) == 10
    assert emulator.max_concurrent_run == 4
    d.stop()


def test_fuller_reads_stay_within_the_rate_budget(queue_db, emulator, start_daemon):
    queue_db.send_many([{"i": i} for i in range(100)])
    d = start_daemon("-v", PGMQD_QUEUE_MAX_IN_FLIGHT=8, PGMQD_QUEUE_READ_BATCHES=8,
                     PGMQD_RUNPOD_MAX_REQUESTS_PER_10S=2)
    try:
        d.wait_log(r"event=rate_limited", timeout_s=15)
        first = logfmt(d.wait_log(r"event=batch_read .*")[0].string)
        # 2 /run per 10 s: the first read claims what 2 requests carry, not 8 bodies' worth.
        assert first.get("read_jobs") == "20", first
    finally:
        d.stop()


def _pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100.0 * (len(xs) - 1))))]


def test_priority_keeps_live_latency_while_backfill_drains_behind_it(pg_cluster, make_pgmq_db,
                                                                     tmp_path):
    """Two routes on one endpoint share its /run cap (one ring, zero 429s from an emulator that
    enforces the same cap); the live route (priority 0) keeps its latency while the backfill
    route (priority 10, policy.lowPriority) drains 10,000 messages behind it."""
    dbname = make_pgmq_db(prefix="prio")
    live = QueueDb(pg_cluster, dbname, queue="live")
    back = QueueDb(pg_cluster, dbname, queue="backfill")
    cap = 300  # /run per 10 s, for the endpoint: ~17 s for the backfill's 500 requests
    emu = RunPodEmulator(endpoint_id="ep-shared", api_key=API_KEY, in_queue_s=0.2, run_s=0.2,
                         rate_cap=cap, rate_window_s=10.0)
    emu.start()
    port = free_port()
    cfg = tmp_path / "prio.conf"
    cfg.write_text("\n".join([
        "[database]", f"conninfo = {live.conninfo}",
        "[queue]", "poll_interval_ms = 50",
        "[runpod]", f"api_key = {API_KEY}", f"base_url = {emu.base_url}",
        "endpoint_id = ep-shared", f"max_requests_per_10s = {cap}",
        "[admin]", f"listen = 127.0.0.1:{port}",
        "[route.live]", "queue = live", "priority = 0", "batch_size = 1", "max_in_flight = 2",
        "[route.backfill]", "queue = backfill", "priority = 10", "batch_size = 20",
        "max_in_flight = 16", "policy_low_priority = on",
    ]) + "\n")
    d = start(cfg)
    sent_at = {}

    def trickle(n, gap_s):
        for i in range(n):
            t = time.monotonic()
            sent_at[live.send(json.dumps({"live": i}))] = t
            time.sleep(gap_s)

    def latencies(ids):
        got = {}
        for r in emu.requests("run"):
            if isinstance(r.json, dict) and r.json["input"]["queue"] == "live":
                for j in r.json["input"]["jobs"]:
                    got[j["msg_id"]] = r.received_at - sent_at[j["msg_id"]]
        return [got[i] * 1000.0 for i in ids if i in got]

    try:
        d.wait_log(r"event=route_started.*route=backfill|route=backfill.*event=route_started")
        trickle(20, 0.1)
        base_ids = list(sent_at)
        wait_until(lambda: len(latencies(base_ids)) == 20, what="baseline delivered")
        base = latencies(base_ids)
        back.sql("SELECT pgmq.send_batch('backfill', ARRAY(SELECT jsonb_build_object('b', g) "
                 "FROM generate_series(1, 10000) g))")
        wait_until(lambda: len(emu.requests("run")) > 20 + 20, what="backfill under way")
        trickle(50, 0.2)
        busy_ids = [i for i in sent_at if i not in base_ids]

        def backfill_jobs():
            return sum(len(r.json["input"]["jobs"]) for r in emu.requests("run")
                       if isinstance(r.json, dict) and r.status == 200
                       and r.json["input"]["queue"] == "backfill")
        wait_until(lambda: len(latencies(busy_ids)) == 50, what="live delivered", timeout=60)
        # The backfill was still draining when the last live message got through.
        assert backfill_jobs() < 10000, "live messages waited for the backfill to finish"
        wait_until(lambda: backfill_jobs() == 10000, what="backfill drained", timeout=120)
        busy = latencies(busy_ids)
        runs = emu.requests("run")
        print(f"live latency alone: p50 {_pct(base, 50):.0f} ms, p99 {_pct(base, 99):.0f} ms; "
              f"while 10,000 drain behind it: p50 {_pct(busy, 50):.0f} ms, "
              f"p99 {_pct(busy, 99):.0f} ms; /run requests {len(runs)}, "
              f"429s {sum(1 for r in runs if r.status == 429)}")
        assert not [r for r in runs if r.status == 429], "the shared cap was exceeded"
        assert _pct(busy, 50) <= _pct(base, 50) + 150, (base, busy)
        assert _pct(busy, 99) <= max(600.0, 2 * _pct(base, 99)), (base, busy)
        for r in runs:
            q = r.json["input"]["queue"]
            assert (r.json.get("policy") == {"lowPriority": True}) == (q == "backfill")
    finally:
        stop(d)
        emu.stop()
        live.close()
        back.close()


def test_removed_route_releases_what_it_read_but_never_sent(two_queues, emus, tmp_path):
    """A route removed by a reload lets its in-flight request finish and hands the messages
    it read but had not sent (waiting behind its rate cap) back to its queue at once."""
    qa, qb, _ = two_queues
    port = free_port()
    cfg = tmp_path / "release.conf"
    write_config(cfg, qa, emus, port,
                 extra={"b": ["batch_size = 1", "max_requests_per_10s = 1", "vt_seconds = 600"]})
    d = start(cfg)
    try:
        d.wait_log(r"event=route_started.*route=b|route=b.*event=route_started")
        emus[1].hold_runs()
        ids = qb.send_many([{"b": i} for i in range(3)])
        wait_until(lambda: emus[1]._held_run >= 1, what="b's first request in flight")
        d.wait_log(r"event=rate_limited route=b waiting=2")
        write_config(cfg, qa, emus, port, routes=("a",))
        d.signal(signal.SIGHUP)
        d.wait_log(r"event=route_removing")
        # The two waiting ones are visible again at once, not after vt_seconds (600).
        wait_until(lambda: sum(1 for i in ids[1:] if not qb.rows()[i]["invisible"]) == 2,
                   what="waiting messages released")
        assert qb.rows()[ids[0]]["invisible"]  # in flight: kept until its outcome
        emus[1].release_runs()
        d.wait_log(r"event=route_removed")
        assert [j["msg_id"] for b in emus[1].run_bodies() for j in b["input"]["jobs"]] == ids[:1]
        m = metrics(port)
        assert m['pgmqd_route_messages_released_total{route="b"}'] == 2
    finally:
        emus[1].release_runs()
        stop(d)


def test_reload_regroups_routes_sharing_an_endpoint(two_queues, emus, tmp_path):
    """Routes on one endpoint share its cap; a reload that adds a route on that endpoint,
    changes a priority and then removes a sharer regroups them without losing a message."""
    qa, qb, qc = two_queues
    port = free_port()
    cfg = tmp_path / "regroup.conf"

    def write(routes):
        lines = ["[database]", f"conninfo = {qa.conninfo}", "[queue]", "poll_interval_ms = 100",
                 "[runpod]", f"api_key = {API_KEY}", f"endpoint_id = {EP_A}",
                 f"base_url = {emus[0].base_url}", "[admin]", f"listen = 127.0.0.1:{port}"]
        for name, prio in routes:
            lines += [f"[route.{name}]", f"queue = jobs_{name}", f"priority = {prio}"]
        cfg.write_text("\n".join(lines) + "\n")

    def delivered():
        return {j["msg_id"] for b in emus[0].run_bodies() for j in b["input"]["jobs"]}

    write([("a", 0), ("b", 5)])
    d = start(cfg)
    try:
        d.wait_log(r"event=route_started.*route=b|route=b.*event=route_started")
        ids = set(qa.send_many([{"a": i} for i in range(5)]) +
                  qb.send_many([{"b": i} for i in range(5)]))
        wait_until(lambda: delivered() == ids, what="a and b on one endpoint")
        write([("a", 9), ("b", 0), ("c", 5)])  # c joins them, b takes the best priority
        d.signal(signal.SIGHUP)
        d.wait_log(r"event=route_added")
        write([("b", 0), ("c", 5)])  # a leaves
        d.signal(signal.SIGHUP)
        d.wait_log(r"event=route_removed")
        ids |= set(qb.send_many([{"b": "x"}]) + qc.send_many([{"c": i} for i in range(3)]))
        wait_until(lambda: delivered() == ids, what="b and c after regrouping")
    finally:
        stop(d)


def test_pause_without_the_ledger_lasts_until_restart(two_queues, emus, tmp_path):
    """ledger.enabled = off: nowhere to keep the state, so a pause survives a reload (in
    memory) but not a restart, and no route_control table is made."""
    qa, _, _ = two_queues
    port = free_port()
    cfg = tmp_path / "noledger.conf"
    write_config(cfg, qa, emus, port)
    cfg.write_text(cfg.read_text() + "[ledger]\nenabled = off\n")
    d = start(cfg)
    try:
        d.wait_log(r"event=route_started.*route=a|route=a.*event=route_started")
        assert ctl(cfg, "pause", "a")[0] == 0
        d.wait_log(r"event=control_not_stored")
        d.signal(signal.SIGHUP)
        d.wait_log(r"event=reloaded")
        ids = set(qa.send_many([{"a": i} for i in range(2)]))
        n = d.count_log(r"route=b.*event=queue_empty|event=queue_empty.*route=b")
        d.wait_log(r"event=queue_empty.*route=b|route=b.*event=queue_empty", count=n + 10)
        assert not emus[0].requests("run")  # still paused after the reload
        stop(d)
        d = start(cfg)
        wait_until(lambda: {j["msg_id"] for b in emus[0].run_bodies()
                            for j in b["input"]["jobs"]} == ids, what="a reads after restart")
        assert qa.sql("SELECT to_regclass('pgmq_dispatcher.route_control')")[0][0] is None
    finally:
        stop(d)
