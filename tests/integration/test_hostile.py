"""What a hostile peer and an odd start found (issue 10, defects 3, 6, 7):
reply strings judged on their raw bytes, closed standard descriptors, and a
stderr nobody reads. Against the real PostgreSQL and the RunPod emulator."""

import json
import os
import re
import subprocess
import threading
import time
import urllib.request

import pytest

from pgcluster import wait_until

from daemon import BINARY, Fault, assert_no_sanitizer_report, base_env, logfmt

FAST = dict(PGMQD_RUNPOD_BACKOFF_BASE_MS=200, PGMQD_RUNPOD_BACKOFF_MAX_MS=400,
            PGMQD_QUEUE_POLL_INTERVAL_MS=50)


def jobs(n):
    return [{"document_id": f"doc-{i}"} for i in range(n)]


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$', line)
        if m and not line.startswith("#"):
            out[(m.group(1), frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(3) or "")))] = \
                float(m.group(4))
    return out


# ------------------------------------------------------------------ defect 3: reply strings

@pytest.mark.parametrize("variant", ["id_bad_escape", "id_nul_escape", "id_control",
                                     "id_bad_utf8", "id_too_long"])
def test_unusable_job_id_is_outcome_unknown(queue_db, emulator, start_daemon, variant):
    """A 2xx whose id a lenient parser would cut ("job\\uX000" -> "job") is
    not an accepted job: outcome unknown, vt kept, one bounded escaped line,
    counted; the cut id is never tracked."""
    ids = queue_db.send_many(jobs(3))
    emulator.add_fault(Fault.malformed(variant, create_job=True))
    d = start_daemon("-v", PGMQD_TRACKER_ENABLED="on", PGMQD_TRACKER_INTERVAL_MS=100, **FAST)
    line = d.wait_log(r"event=batch_outcome_unknown .*outcome=unknown")[0].string
    fields = logfmt(line)
    assert fields["http_status"] == "200"
    assert fields.get("reply_problem"), fields   # says why the 2xx was not used
    assert len(line) < 2000 and "\x1b" not in line and "\x00" not in line
    listed = logfmt(d.wait_log(r"event=outcome_unknown_ids")[0].string)["msg_ids"]
    assert [int(i) for i in listed.split(",")] == ids
    port = logfmt(d.wait_log(r"event=started ")[0].string)["admin_port"]
    key = ("pgmqd_runpod_requests_total", frozenset({("outcome", "unknown"), ("code", "200")}))
    wait_until(lambda: scrape(port).get(key) == 1, timeout=10, what="unknown counted")
    d.wait_log(r"event=queue_empty", count=3)
    assert d.count_log(r"event=batch_accepted") == 0
    assert emulator.requests("status") == []   # no cut-off id was tracked
    assert len(emulator.requests("run")) == 1
    rows = queue_db.sql("SELECT msg_id FROM pgmq.q_jobs WHERE vt > clock_timestamp() + interval '600 s'")
    assert set(ids) <= {r[0] for r in rows}
    assert d.stop() == 0


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accepted_jobs(emu):
    return sum(len(json.loads(r.body)["input"]["jobs"]) for r in emu.requests("run") if r.accepted)


# ------------------------------------------------------------------ defect 6: closed fds 0-2

def test_closed_standard_descriptors_get_dev_null(queue_db, emulator):
    """Started with fds 0-2 closed, the daemon puts /dev/null there before
    anything else takes those numbers (the epoll fd, curl's socketpair),
    and still dispatches."""
    env = base_env(queue_db, emulator, PGMQD_QUEUE_POLL_INTERVAL_MS=50)
    proc = subprocess.Popen(["/bin/sh", "-c", 'exec 0<&- 1>&- 2>&- "$0" -vv', BINARY], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        queue_db.send_many(jobs(5))
        emulator.wait_for(lambda: accepted_jobs(emulator) == 5, timeout_s=20)
        for fd in (0, 1, 2):
            assert os.readlink(f"/proc/{proc.pid}/fd/{fd}") == "/dev/null", fd
        proc.terminate()
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------ defect 7: stalled stderr

def test_stalled_stderr_never_blocks_the_loop(queue_db, emulator):
    """stderr is a pipe nobody reads: /healthz keeps answering, messages keep
    being dispatched, dropped lines are counted; once the pipe is read again
    one line says how many were dropped."""
    import fcntl
    import termios
    import array

    port = free_port()
    env = base_env(queue_db, emulator, PGMQD_QUEUE_POLL_INTERVAL_MS=20,
                   PGMQD_ADMIN_LISTEN=f"127.0.0.1:{port}")
    proc = subprocess.Popen([BINARY, "-vv"], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rfd = proc.stderr.fileno()
    fcntl.fcntl(rfd, 1031, 4096)  # F_SETPIPE_SZ: one page, so it fills quickly

    def pipe_bytes():
        buf = array.array("i", [0])
        fcntl.ioctl(rfd, termios.FIONREAD, buf)
        return buf[0]

    def healthz():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                return r.status
        except OSError:
            return None

    try:
        # Trace lines every 20 ms poll fill one page within a second or two.
        wait_until(lambda: pipe_bytes() >= 4096 - 256, timeout=20, what="stderr pipe full")
        wait_until(lambda: healthz() == 200, timeout=10, what="/healthz while stderr is full")
        queue_db.send_many(jobs(25))
        emulator.wait_for(lambda: accepted_jobs(emulator) == 25, timeout_s=20)
        for _ in range(5):
            assert healthz() == 200
        key = ("pgmqd_log_lines_dropped_total", frozenset())
        wait_until(lambda: scrape(port).get(key, 0) > 0, timeout=60, what="dropped lines counted")
        dropped = scrape(port)[key]
        # Read again: what waited comes out, then one line with the count.
        lines = []
        done = threading.Event()

        def reader():
            for raw in iter(proc.stderr.readline, b""):
                lines.append(raw.decode("utf-8", "replace"))
                if "event=log_lines_dropped" in lines[-1]:
                    done.set()
            done.set()

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        assert done.wait(20), "".join(lines[-20:])
        note = logfmt(next(line for line in lines if "event=log_lines_dropped" in line))
        assert 1 <= int(note["lines"]) and int(note["lines"]) >= dropped
        assert all(line.endswith("\n") and line.startswith("time=") for line in lines), lines[:5]
        proc.terminate()
        assert proc.wait(timeout=15) == 0
        t.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert_no_sanitizer_report("".join(lines))
