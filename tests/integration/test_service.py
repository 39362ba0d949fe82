"""Running it where users run it (issue 4): systemd notify protocol, the
admin endpoint (/metrics, /healthz, /readyz), CLI modes, secrets at -vv, log
formats and make install."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request

import pytest

from daemon import (API_KEY, BINARY, REPO_ROOT, Daemon, Fault, base_env, logfmt, run_once)
from pgcluster import PgCluster, wait_until


def admin_url(d, path):
    port = logfmt(d.wait_log(r"event=started ")[0].string)["admin_port"]
    return f"http://127.0.0.1:{port}{path}"


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers.get("Content-Type"), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read().decode()


def parse_prometheus(text):
    """{(name, frozenset(labels)): value} from the text format."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$', line)
        assert m, f"bad exposition line: {line!r}"
        labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(3) or ""))
        out[(m.group(1), labels)] = float(m.group(4))
    return out


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ------------------------------------------------------------------ sd_notify

class NotifySocket:
    """A fake systemd NOTIFY_SOCKET collecting datagrams."""

    def __init__(self, abstract):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"pgmqd-test-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.dir = tempfile.mkdtemp()
            self.address = os.path.join(self.dir, "notify")
            self.sock.bind(self.address)
        self.messages = []          # (monotonic time, text)
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            with self.cond:
                self.messages.append((time.monotonic(), data.decode()))
                self.cond.notify_all()

    def wait(self, pred, timeout=10, what="datagram"):
        deadline = time.monotonic() + timeout
        with self.cond:
            while not pred(self.messages):
                left = deadline - time.monotonic()
                assert left > 0, f"timed out waiting for {what}; got {self.messages}"
                self.cond.wait(left)

    def count(self, text):
        return sum(1 for _, m in self.messages if text in m.split("\n"))

    def close(self):
        self.sock.close()


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_protocol(queue_db, emulator, tmp_path, abstract):
    ns = NotifySocket(abstract)
    conf = tmp_path / "d.conf"
    conf.write_text("[queue]\nname = jobs\n")
    env = base_env(queue_db, emulator, NOTIFY_SOCKET=ns.address, WATCHDOG_USEC=400000,
                   PGMQD_QUEUE_NAME=None)
    d = Daemon(env, args=["-v", "-c", str(conf)]).start()
    try:
        ns.wait(lambda m: any("READY=1" in t for _, t in m), what="READY=1")
        ns.wait(lambda m: any(t.startswith("STATUS=") for _, t in m), what="STATUS=")
        ns.wait(lambda m: sum(1 for _, t in m if t == "WATCHDOG=1") >= 4, what="4 WATCHDOG=1")
        dogs = [at for at, t in ns.messages if t == "WATCHDOG=1"]
        gaps = [b - a for a, b in zip(dogs[1:], dogs[2:])]
        # Every half of WatchdogSec (0.4 s): about 0.2 s apart.
        assert all(0.1 < g < 0.35 for g in gaps), gaps
        ready_before = ns.count("READY=1")
        d.signal(signal.SIGHUP)
        ns.wait(lambda m: any("RELOADING=1" in t for _, t in m), what="RELOADING=1")
        reloading = next(t for _, t in ns.messages if "RELOADING=1" in t)
        usec = int(re.search(r"MONOTONIC_USEC=(\d+)", reloading).group(1))
        assert abs(usec / 1e6 - time.clock_gettime(time.CLOCK_MONOTONIC)) < 10
        ns.wait(lambda m: ns.count("READY=1") > ready_before, what="READY=1 after reload")
        # A failed reload still ends with READY=1 (the old configuration runs on).
        conf.write_text("[queue]\nname = jobs\nbatch_size = 0\n")
        ready_before = ns.count("READY=1")
        d.signal(signal.SIGHUP)
        d.wait_log(r"event=reload_failed")
        ns.wait(lambda m: ns.count("READY=1") > ready_before, what="READY=1 after failed reload")
        d.signal(signal.SIGTERM)
        assert d.wait_exit() == 0
        ns.wait(lambda m: any("STOPPING=1" in t for _, t in m), what="STOPPING=1")
    finally:
        d.stop()
        ns.close()


# ------------------------------------------------------------------ admin endpoint

def test_metrics_match_what_the_emulator_saw(queue_db, emulator, start_daemon):
    queue_db.send_many([{"document_id": f"d{i}"} for i in range(25)])
    emulator.add_fault(Fault.status(500))
    d = start_daemon("-v", PGMQD_ADMIN_METRICS_INTERVAL_MS=200, PGMQD_RUNPOD_BACKOFF_BASE_MS=100,
                     PGMQD_RUNPOD_BACKOFF_MAX_MS=200)
    emulator.wait_for(lambda: sum(len(json.loads(r.body)["input"]["jobs"])
                                  for r in emulator.requests("run") if r.accepted) == 25,
                      timeout_s=15)
    url = admin_url(d, "/metrics")

    def scrape():
        status, ctype, body = get(url)
        assert status == 200 and ctype == "text/plain; version=0.0.4; charset=utf-8"
        return parse_prometheus(body)

    # The queue gauges come from pgmq.metrics on a timer: wait for one refresh.
    wait_until(lambda: scrape().get(("pgmqd_queue_length", frozenset())) == 25, timeout=10,
               what="queue length 25")
    m = scrape()
    runs = emulator.requests("run")
    accepted = [r for r in runs if r.accepted]
    sent_jobs = sum(len(json.loads(r.body)["input"]["jobs"]) for r in runs)
    assert m[("pgmqd_messages_dispatched_total", frozenset())] == 25
    assert m[("pgmqd_messages_read_total", frozenset())] == sent_jobs
    assert m[("pgmqd_runpod_requests_total", frozenset({("outcome", "accepted"), ("code", "200")}))] \
        == len(accepted)
    assert m[("pgmqd_runpod_requests_total", frozenset({("outcome", "rejected"), ("code", "500")}))] == 1
    assert m[("pgmqd_runpod_request_duration_seconds_count", frozenset())] == len(runs)
    assert m[("pgmqd_messages_released_total", frozenset())] == len(json.loads(runs[0].body)["input"]["jobs"])
    assert m[("pgmqd_in_flight_requests", frozenset())] == 0
    assert m[("pgmqd_circuit_open", frozenset())] == 0
    assert d.stop() == 0


def test_healthz_and_readyz(queue_db, emulator, start_daemon):
    d = start_daemon("-v")
    d.wait_log(r"event=db_connected")
    assert get(admin_url(d, "/healthz"))[0] == 200
    wait_until(lambda: get(admin_url(d, "/readyz"))[0] == 200, timeout=10, what="ready")
    assert d.stop() == 0

    # Database down: alive, not ready.
    down = start_daemon("-v", PGMQD_DATABASE_CONNINFO=f"host=127.0.0.1 port={free_port()} dbname=x")
    assert get(admin_url(down, "/healthz"))[0] == 200
    status, _, body = get(admin_url(down, "/readyz"))
    assert status == 503 and "database disconnected" in body
    assert down.stop() == 0

    # Circuit open: alive, not ready.
    queue_db.send_many([{"x": 1}])
    bad = start_daemon("-v", RUNPOD_API_KEY="rp_wrong_key_42")
    bad.wait_log(r"event=circuit_open")
    status, _, body = get(admin_url(bad, "/readyz"))
    assert status == 503 and "circuit open" in body
    assert get(admin_url(bad, "/healthz"))[0] == 200
    assert bad.stop() == 0


def test_readyz_is_503_while_draining(queue_db, emulator, start_daemon):
    queue_db.send_many([{"x": 1}])
    emulator.hold_runs()
    d = start_daemon("-v")
    try:
        emulator.wait_for(lambda: emulator.in_flight_run == 1, timeout_s=10)
        url = admin_url(d, "/readyz")
        d.signal(signal.SIGTERM)
        d.wait_log(r"event=stopping")
        status, _, body = get(url)
        assert status == 503 and "draining" in body
    finally:
        emulator.release_runs()
    assert d.wait_exit() == 0


def test_admin_off_and_connection_reuse(queue_db, emulator, start_daemon):
    queue_db.send_many([{"i": i} for i in range(30)])
    d = start_daemon("-v", PGMQD_ADMIN_LISTEN="off", PGMQD_QUEUE_MAX_IN_FLIGHT=1)
    emulator.wait_for(lambda: sum(1 for r in emulator.requests("run") if r.accepted) == 3,
                      timeout_s=10)
    assert "admin_port" not in logfmt(d.wait_log(r"event=started ")[0].string)
    # Keep-alive: one connection carries every request (one at a time here).
    assert len({r.client_address for r in emulator.requests("run")}) == 1
    assert d.stop() == 0


def test_health_check_cli(queue_db, emulator, start_daemon):
    port = free_port()
    env = base_env(queue_db, emulator, PGMQD_ADMIN_LISTEN=f"127.0.0.1:{port}")
    d = start_daemon("-v", PGMQD_ADMIN_LISTEN=f"127.0.0.1:{port}")
    d.wait_log(r"event=started")
    rc, _ = run_once(env, "--health-check")
    assert rc == 0
    assert d.stop() == 0
    rc, lines = run_once(env, "--health-check")
    assert rc == 1


# ------------------------------------------------------------------ CLI modes

def test_check_config_touches_no_network(queue_db):
    env = base_env(queue_db, None, PGMQD_DATABASE_CONNINFO=f"host=127.0.0.1 port={free_port()}",
                   PGMQD_RUNPOD_BASE_URL="http://127.0.0.1:9/v2")
    rc, lines = run_once(env, "-t")
    # One line naming what was used (issue 10): no file here, keys from the environment.
    assert rc == 0 and len(lines) == 1, lines
    assert lines[0].startswith("pgmq-dispatcher: configuration valid: no file (")
    assert "; environment: 7 keys; default: " in lines[0]
    rc, lines = run_once(dict(env, PGMQD_QUEUE_VT_SECONDS="0"), "--check-config")
    assert rc == 78 and len(lines) == 1


def test_dump_config_shows_sources_and_masks_secrets(queue_db, tmp_path):
    conf = tmp_path / "d.conf"
    conf.write_text("[queue]\nbatch_size = 7\n")
    env = base_env(queue_db, None, PGMQD_DATABASE_CONNINFO="postgresql://app:Sup3rS3cret@db.example:6543/postgres")
    rc, lines = run_once(env, "-c", str(conf), "-T", "-v")
    assert rc == 0
    text = "\n".join(lines)
    assert "Sup3rS3cret" not in text and API_KEY not in text
    rows = {l.split()[0]: l for l in lines if "=" in l}
    assert rows["queue.batch_size"].rstrip().endswith("# file")
    assert re.search(r"= 7\s", rows["queue.batch_size"])
    assert rows["queue.name"].rstrip().endswith("# environment")
    assert rows["queue.vt_seconds"].rstrip().endswith("# default")
    assert "***" in rows["runpod.api_key"] and "password=***" in rows["database.conninfo"]
    assert rows["log.level"].rstrip().endswith("# command line")


def test_dry_run_changes_nothing(queue_db, emulator):
    ids = queue_db.send_many([{"document_id": f"d{i}"} for i in range(12)])
    before = queue_db.sql("SELECT msg_id, read_ct, vt FROM pgmq.q_jobs ORDER BY msg_id")
    d = Daemon(base_env(queue_db, emulator), args=["--dry-run"]).start()
    assert d.wait_exit() == 0
    bodies = [json.loads(l) for l in d.lines if l.startswith("{")]
    assert [j["msg_id"] for b in bodies for j in b["input"]["jobs"]] == ids[:10]
    assert all(j["read_ct"] == 1 for b in bodies for j in b["input"]["jobs"])
    assert queue_db.sql("SELECT msg_id, read_ct, vt FROM pgmq.q_jobs ORDER BY msg_id") == before
    assert emulator.requests() == []
    assert any("10 visible messages would go out in 1 /run request;" in l for l in d.lines), d.lines


def test_dry_run_summary_singular(queue_db, emulator):
    queue_db.send_many([{"document_id": "d1"}])
    d = Daemon(base_env(queue_db, emulator), args=["--dry-run"]).start()
    assert d.wait_exit() == 0
    assert any("1 visible message would go out in 1 /run request;" in l for l in d.lines), d.lines


# ------------------------------------------------------------------ secrets and logs

def test_no_secret_in_any_output_at_trace_level(emulator):
    password = "Pw-7a9c-d1st1nct1v3"
    key = "rp_DISTINCTIVE_key_5f1e2d3c4b"
    with PgCluster(auth="scram", superuser_password=password) as pg:
        from daemon import QueueDb
        import conftest
        pg.createdb("secret")
        conftest.load_pgmq(pg, "secret")
        db = QueueDb(pg, "secret")
        ids = db.send_many([{"document_id": "d1"}, {"document_id": "d2"}])
        emulator.add_endpoint("ep-test-1", key)
        env = base_env(db, emulator, RUNPOD_API_KEY=key,
                       PGMQD_DATABASE_CONNINFO=pg.conninfo_for("secret", password=password))
        d = Daemon(env, args=["-vv"]).start()
        emulator.wait_for(lambda: any(r.accepted for r in emulator.requests("run")), timeout_s=15)
        d.wait_log(r"event=batch_accepted")
        assert d.stop() == 0
        db.close()
    out = d.output
    assert d.count_log(r"event=sql ") >= 1 and d.count_log(r"event=http_request ") >= 1
    assert key not in out and password not in out
    assert "password=***" in out


def test_json_log_format(queue_db, emulator, start_daemon):
    ids = queue_db.send_many([{"x": 1}, {"x": 2}])
    queue_db.sql("UPDATE pgmq.q_jobs SET read_ct = 5 WHERE msg_id = %s", (ids[1],))
    d = start_daemon("--log-format", "json", "-v", PGMQD_QUEUE_MAX_READ_CT=5)
    d.wait_log(r'"event":"batch_accepted"')
    d.wait_log(r'"event":"message_archived"')
    assert d.stop() == 0
    objs = [json.loads(line) for line in d.lines]
    for obj in objs:
        assert obj["time"].endswith("Z") and obj["level"] and obj["event"]
    # Numbers as numbers: msg ids and read_ct are JSON integers, not strings.
    read = next(o for o in objs if o["event"] == "batch_read")
    assert read["first_msg_id"] == ids[0] and read["last_msg_id"] == ids[1], read
    archived = next(o for o in objs if o["event"] == "message_archived")
    assert archived["msg_id"] == ids[1] and archived["read_ct"] == 6, archived


def test_journald_priority_prefixes(queue_db, emulator):
    r, w = os.pipe()
    st = os.fstat(w)
    env = base_env(queue_db, emulator, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
    proc = subprocess.Popen([BINARY, "--once"], env=env, stdout=subprocess.DEVNULL, stderr=w)
    os.close(w)
    out = b""
    while chunk := os.read(r, 65536):
        out += chunk
    os.close(r)
    assert proc.wait(timeout=30) == 0         # empty queue: success, as for a cron tick
    lines = out.decode().splitlines()
    assert lines and all(re.match(r"^<[3467]>level=", l) for l in lines), lines
    assert not any("time=" in l for l in lines)


# ------------------------------------------------------------------ install

def test_make_install_destdir(tmp_path):
    dest = tmp_path / "stage"
    run = lambda: subprocess.run(["make", "-C", REPO_ROOT, "install", f"DESTDIR={dest}", "PREFIX=/usr"],
                                 capture_output=True, text=True)
    res = run()
    assert res.returncode == 0, res.stderr
    for rel in ["usr/bin/pgmq-dispatcher", "usr/share/man/man8/pgmq-dispatcher.8",
                "usr/lib/systemd/system/pgmq-dispatcher.service",
                "etc/pgmq-dispatcher/pgmq-dispatcher.conf"]:
        assert (dest / rel).is_file(), rel
    conf = dest / "etc/pgmq-dispatcher/pgmq-dispatcher.conf"
    conf.write_text("; edited by the admin\n")
    assert run().returncode == 0
    assert conf.read_text() == "; edited by the admin\n"     # never overwritten
