"""valgrind memcheck on an integration run of 1,000 messages (make valgrind).

The daemon runs under memcheck against the real PostgreSQL and the RunPod
emulator, dispatches 1,000 messages (with some rejected batches on the way),
and is stopped with SIGTERM. Any memcheck error or any definite or indirect
leak makes valgrind exit 99."""

import json
import re
import shutil
import signal

import pytest

from daemon import Daemon, Fault, base_env

pytestmark = pytest.mark.valgrind

VALGRIND = ["valgrind", "--tool=memcheck", "--leak-check=full", "--show-leak-kinds=definite,indirect",
            "--errors-for-leak-kinds=definite,indirect", "--error-exitcode=99",
            "--track-fds=no", "--num-callers=30"]


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_valgrind_1000_messages(queue_db, emulator):
    ids = queue_db.send_many([{"document_id": f"d{i}", "n": i} for i in range(1000)])
    emulator.add_fault(Fault.status(500), Fault.status(429, headers={"Retry-After": "1"}),
                       Fault.malformed("not_json"))
    env = base_env(queue_db, emulator, PGMQD_QUEUE_POLL_INTERVAL_MS=100,
                   PGMQD_RUNPOD_BACKOFF_BASE_MS=50, PGMQD_RUNPOD_BACKOFF_MAX_MS=200,
                   PGMQD_QUEUE_VT_SECONDS=5)
    d = Daemon(env, args=["-v"])
    d.binary, d.args = VALGRIND[0], VALGRIND[1:] + [d.binary, "-v"]
    d.start()
    try:
        def delivered():
            return {j["msg_id"] for r in emulator.requests("run") if r.accepted
                    for j in json.loads(r.body)["input"]["jobs"]}
        emulator.wait_for(lambda: delivered() >= set(ids), timeout_s=180, what="1000 delivered")
    finally:
        rc = d.stop(timeout_s=60)
    summary = [l for l in d.lines if re.search(r"ERROR SUMMARY|definitely lost|indirectly lost", l)]
    print("\n" + "\n".join(summary))
    assert rc == 0, "\n".join(d.lines[-60:])
    assert any("ERROR SUMMARY: 0 errors" in l for l in summary), summary


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_valgrind_fleet_budget(queue_db, emulator):
    """The fleet budget (issue 13) under memcheck: grants for /run and /status, a fallback while
    budget_take is missing (sends reported afterwards), and its return."""
    ids = queue_db.send_many([{"n": i} for i in range(300)])
    emulator.rate_cap, emulator.rate_window_s = 100, 2.0
    env = base_env(queue_db, emulator, PGMQD_QUEUE_POLL_INTERVAL_MS=100,
                   PGMQD_FLEET_ENABLED="on", PGMQD_FLEET_EXPECTED_REPLICAS=1,
                   PGMQD_FLEET_VALIDITY_MS=500, PGMQD_RUNPOD_RATE_WINDOW_MS=2000,
                   PGMQD_RUNPOD_MAX_REQUESTS_PER_10S=100, PGMQD_QUEUE_BATCH_SIZE=1,
                   PGMQD_TRACKER_ENABLED="on", PGMQD_TRACKER_INTERVAL_MS=200)
    d = Daemon(env, args=["-v"])
    d.binary, d.args = VALGRIND[0], VALGRIND[1:] + [d.binary, "-v"]
    d.start()
    sig = ("pgmq_dispatcher.budget_take{}(text, text, uuid, integer, double precision, integer, "
           "integer, integer)")
    try:
        def delivered():
            return {j["msg_id"] for r in emulator.requests("run") if r.accepted
                    for j in json.loads(r.body)["input"]["jobs"]}
        emulator.wait_for(lambda: len(delivered()) >= 50, timeout_s=120, what="50 delivered")
        queue_db.sql(f"ALTER FUNCTION {sig.format('')} RENAME TO budget_take_away")
        d.wait_log(r"event=fleet_budget_fallback", timeout_s=30)
        queue_db.sql(f"ALTER FUNCTION {sig.format('_away')} RENAME TO budget_take")
        d.wait_log(r"event=fleet_budget_restored", timeout_s=30)
        emulator.wait_for(lambda: delivered() >= set(ids), timeout_s=180, what="300 delivered")
    finally:
        rc = d.stop(timeout_s=60)
    summary = [l for l in d.lines if re.search(r"ERROR SUMMARY|definitely lost|indirectly lost", l)]
    print("\n" + "\n".join(summary))
    assert rc == 0, "\n".join(d.lines[-60:])
    assert any("ERROR SUMMARY: 0 errors" in l for l in summary), summary
    assert sum(1 for r in emulator.requests("run") if r.status == 429) == 0


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_valgrind_routes_sharing_a_connection(pg_cluster, make_pgmq_db, tmp_path):
    """Three routes on one shared connection (issue 13) under memcheck: the connection killed
    under them, then a reload that removes a route and moves the others to a new conninfo."""
    from daemon import QueueDb, RunPodEmulator, API_KEY
    from test_routes import free_port
    dbname = make_pgmq_db(prefix="vgroutes")
    queues = [QueueDb(pg_cluster, dbname, queue=f"jobs_{n}") for n in "abc"]
    emu = RunPodEmulator(endpoint_id="ep-vg", api_key=API_KEY)
    emu.start()
    cfg = tmp_path / "routes.conf"
    port = free_port()

    def write(conninfo, names):
        lines = ["[database]", f"conninfo = {conninfo}", "[queue]", "poll_interval_ms = 100",
                 "[runpod]", f"api_key = {API_KEY}", f"base_url = {emu.base_url}",
                 "endpoint_id = ep-vg", "[admin]", f"listen = 127.0.0.1:{port}"]
        for n in names:
            lines += [f"[route.{n}]", f"queue = jobs_{n}"]
        cfg.write_text("\n".join(lines) + "\n")

    def delivered():
        return {(json.loads(r.body)["input"]["queue"], j["msg_id"]) for r in emu.requests("run")
                if r.accepted for j in json.loads(r.body)["input"]["jobs"]}

    write(queues[0].conninfo, "abc")
    d = Daemon({"PATH": "/usr/bin:/bin"}, args=["-v", "-c", str(cfg)])
    d.binary, d.args = VALGRIND[0], VALGRIND[1:] + [d.binary, "-v", "-c", str(cfg)]
    d.start()
    try:
        want = {(q.queue, i) for q in queues for i in q.send_many([{"n": k} for k in range(20)])}
        emu.wait_for(lambda: delivered() >= want, timeout_s=120, what="60 delivered")
        queues[0].sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                      "AND application_name = 'pgmq-dispatcher'", (dbname,))
        d.wait_log(r"event=db_connected", count=2, timeout_s=60)
        write(f"{queues[0].conninfo} application_name=pgmqd_vg", "ab")
        d.signal(signal.SIGHUP)
        d.wait_log(r"event=route_removed", timeout_s=60)
        want |= {(q.queue, i) for q in queues[:2] for i in q.send_many([{"m": k} for k in range(20)])}
        emu.wait_for(lambda: delivered() >= want, timeout_s=120, what="40 more delivered")
    finally:
        rc = d.stop(timeout_s=60)
        emu.stop()
        for q in queues:
            q.close()
    summary = [l for l in d.lines if re.search(r"ERROR SUMMARY|definitely lost|indirectly lost", l)]
    print("\n" + "\n".join(summary))
    assert rc == 0, "\n".join(d.lines[-60:])
    assert any("ERROR SUMMARY: 0 errors" in l for l in summary), summary
