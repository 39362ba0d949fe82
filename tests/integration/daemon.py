"""Helpers and pytest fixtures to run the pgmq-dispatcher binary against a real
PostgreSQL (pgcluster.py) and the RunPod emulator (tests/emulator/).

Every wait is on a condition with a deadline; nothing sleeps and hopes.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from decimal import Decimal

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO_ROOT, "tests", "emulator"))

from runpod_emulator import Fault, RunPodEmulator, http_date  # noqa: E402,F401

BINARY = os.environ.get("DISPATCHER_BIN", os.path.join(REPO_ROOT, "build", "pgmq-dispatcher"))
ENDPOINT_ID = "ep-test-1"
API_KEY = "rp_TESTKEY_c0ffee_7a1b2c3d4e5f"
QUEUE = "jobs"


class Daemon:
    """One pgmq-dispatcher process with its stdout/stderr collected line by line."""

    def __init__(self, env, args=(), binary=BINARY):
        self.env = env
        self.args = list(args)
        self.binary = binary
        self.proc = None
        self._lines = []
        self._cond = threading.Condition()
        self._readers = []

    def start(self):
        self.proc = subprocess.Popen([self.binary, *self.args], env=self.env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        for stream in (self.proc.stdout, self.proc.stderr):
            t = threading.Thread(target=self._read, args=(stream,), daemon=True)
            t.start()
            self._readers.append(t)
        return self

    def _read(self, stream):
        for raw in iter(stream.readline, b""):
            with self._cond:
                self._lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def lines(self):
        with self._cond:
            return list(self._lines)

    @property
    def output(self):
        return "\n".join(self.lines)

    def wait_log(self, pattern, timeout_s=10.0, count=1):
        """Waits until `count` lines match the regex; returns the matches."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                found = [m for m in (rx.search(line) for line in self._lines) if m]
                if len(found) >= count:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._alive_readers()):
                    raise AssertionError(
                        f"wanted {count} line(s) matching {pattern!r}, saw {len(found)}; "
                        f"exit={self.proc.poll()}\n" + "\n".join(self._lines[-40:]))
                self._cond.wait(min(remaining, 0.1))

    def _alive_readers(self):
        return any(t.is_alive() for t in self._readers)

    def count_log(self, pattern):
        rx = re.compile(pattern)
        return sum(1 for line in self.lines if rx.search(line))

    def signal(self, sig):
        self.proc.send_signal(sig)

    def wait_exit(self, timeout_s=15.0):
        rc = self.proc.wait(timeout=timeout_s)
        for t in self._readers:
            t.join(timeout=5)
        return rc

    def stop(self, timeout_s=15.0):
        """SIGTERM and wait; SIGKILL if it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.wait_exit(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def logfmt(line):
    """Parses one logfmt line into a dict (values unescaped)."""
    out = {}
    for m in re.finditer(r'(\w+)=("((?:[^"\\]|\\.)*)"|\S*)', line):
        key, raw, quoted = m.group(1), m.group(2), m.group(3)
        out[key] = json.loads('"' + quoted + '"') if raw.startswith('"') else raw
    return out


class QueueDb:
    """A fresh database with the PGMQ fixture and one queue."""

    def __init__(self, cluster, dbname, queue=QUEUE):
        self.cluster = cluster
        self.dbname = dbname
        self.queue = queue
        self.conn = cluster.connect(dbname)
        self.sql("SELECT pgmq.create(%s)", (queue,))

    @property
    def conninfo(self):
        return self.cluster.conninfo_for(self.dbname)

    def sql(self, query, params=None):
        with self.conn.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall() if cur.description else None

    def send(self, message_json_text):
        """Enqueues a message given as JSON text; returns its msg_id."""
        return self.sql("SELECT * FROM pgmq.send(%s, %s::jsonb)", (self.queue, message_json_text))[0][0]

    def send_many(self, messages):
        return [self.send(m if isinstance(m, str) else json.dumps(m)) for m in messages]

    def rows(self):
        """{msg_id: row} with the values exactly as the daemon reads them."""
        table = f"pgmq.q_{self.queue}"
        rows = self.sql(
            f"SELECT msg_id, read_ct, to_json(enqueued_at)::text, message::text, "
            f"(message->'document_id')::text, vt > clock_timestamp() FROM {table}")
        return {r[0]: dict(msg_id=r[0], read_ct=r[1], enqueued_at=r[2], message=r[3],
                           document_id=r[4], invisible=r[5]) for r in rows}

    def close(self):
        self.conn.close()


def parse_exact(raw):
    """JSON with exact numbers: ints stay ints, decimals become Decimal."""
    return json.loads(raw, parse_float=Decimal)


def assert_jobs_match_rows(raw_body, rows, queue=QUEUE, vt_seconds=1800):
    """Every job of a raw /run body equals its database row: as JSON with exact
    numbers, and the message byte for byte as PostgreSQL printed it."""
    body = parse_exact(raw_body)
    assert set(body) == {"input"}
    inp = body["input"]
    assert inp["queue"] == queue
    assert inp["vt_seconds"] == vt_seconds
    for job in inp["jobs"]:
        assert set(job) == {"msg_id", "read_ct", "enqueued_at", "document_id", "message"}, job
        row = rows[job["msg_id"]]
        assert job["read_ct"] == row["read_ct"]
        assert job["enqueued_at"] == json.loads(row["enqueued_at"])
        assert job["message"] == parse_exact(row["message"])
        want_doc = None if row["document_id"] is None else parse_exact(row["document_id"])
        assert job["document_id"] == want_doc
        assert b'"message":' + row["message"].encode() in raw_body
    return inp["jobs"]


# ----------------------------------------------------------------------------------------------
# Fixtures (imported into conftest.py)
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def emulator():
    emu = RunPodEmulator(endpoint_id=ENDPOINT_ID, api_key=API_KEY, in_queue_s=0.2, run_s=0.2)
    emu.start()
    try:
        yield emu
    finally:
        emu.stop()


@pytest.fixture
def queue_db(pg_cluster, make_pgmq_db):
    db = QueueDb(pg_cluster, make_pgmq_db(prefix="disp"))
    try:
        yield db
    finally:
        db.close()


def base_env(db, emu, **overrides):
    """Environment-only configuration, as a container would get it."""
    env = {
        "PATH": "/usr/bin:/bin",
        "PGMQD_DATABASE_CONNINFO": db.conninfo,
        "PGMQD_QUEUE_NAME": db.queue,
        "PGMQD_QUEUE_POLL_INTERVAL_MS": "200",
        "PGMQD_RUNPOD_BASE_URL": emu.base_url if emu else "http://127.0.0.1:9/v2",
        "RUNPOD_ENDPOINT_ID": ENDPOINT_ID,
        "RUNPOD_API_KEY": API_KEY,
        # Port 0: every daemon of a test run gets a free port (see admin_port()).
        "PGMQD_ADMIN_LISTEN": "127.0.0.1:0",
    }
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    return env


@pytest.fixture
def start_daemon(queue_db, emulator):
    """Factory: start_daemon(*args, **env_overrides) → a running Daemon.
    Every daemon is stopped at teardown, whatever the test did."""
    started = []

    def start(*args, db=None, emu=None, **env):
        d = Daemon(base_env(db or queue_db, emu or emulator, **env), args=args or ("-v",))
        started.append(d.start())
        return d

    yield start
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
    for d in started:
        assert_no_sanitizer_report(d.output)


SANITIZER_MARKS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:")


def assert_no_sanitizer_report(output):
    """Fails on any AddressSanitizer / LeakSanitizer / UBSan report (make SANITIZE=1)."""
    for mark in SANITIZER_MARKS:
        assert mark not in output, output[-4000:]


def run_once(env, *args, timeout_s=30.0):
    """Runs the binary to completion; returns (exit code, output lines)."""
    d = Daemon(env, args=args).start()
    rc = d.wait_exit(timeout_s)
    assert_no_sanitizer_report(d.output)
    return rc, d.lines
