"""Smoke test of the benchmark harness (tests/bench/bench.py, issue 5) with BENCH_QUICK=1.

Checks that the harness runs, writes a results table with every scenario row holding numbers,
and stops every process it started, also when interrupted. It does not compare the figures with
the performance targets: quick sizes say nothing about them.
"""

import os
import re
import signal
import subprocess
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
BENCH = os.path.join(REPO_ROOT, "tests", "bench", "bench.py")
BINARY = os.environ.get("DISPATCHER_BIN", os.path.join(REPO_ROOT, "build", "pgmq-dispatcher"))

ROWS = ("1a", "1b", "2a", "2b", "2c", "3", "4a", "4b", "4c", "4d", "5")
NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def bench_env():
    env = dict(os.environ, BENCH_QUICK="1", DISPATCHER_BIN=BINARY)
    env.pop("BENCH_OUTPUT", None)
    return env


def leftovers(log_text):
    """Processes of the harness run whose log is log_text that are still alive, recognised by
    what the harness reported: its work directory (nginx's prefix, the daemons' logs), the
    port of its PostgreSQL (daemons' conninfo, pgbench) and the cluster's data directory.
    Other processes on the machine (another test run, say) are not looked at."""
    workdir = re.search(r"workdir (\S+),", log_text)
    port = re.search(r"PostgreSQL on port (\d+)", log_text)
    datadir = re.search(r"data (\S+)", log_text)
    marks = []
    if workdir:
        marks.append(workdir.group(1).encode())
    if port:
        marks.append(f"port={port.group(1)} ".encode())   # daemons' conninfo (environment)
        marks.append(f"-p {port.group(1)} ".encode())     # pgbench, postgres
    if datadir:
        marks.append(datadir.group(1).encode())
    left = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ") + b" "
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().replace(b"\0", b" ") + b" "
        except OSError:
            continue
        if any(mark in cmdline or mark in environ for mark in marks):
            left.append((int(pid), cmdline.decode("utf-8", "replace")))
    if datadir:
        # Backends do not show the data directory: a postmaster.pid means the server runs.
        pidfile = os.path.join(datadir.group(1), "postmaster.pid")
        if os.path.exists(pidfile):
            left.append((None, pidfile))
    return left


def table_rows(text):
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0] in ROWS:
            rows[cells[0]] = cells
    return rows


def test_quick_bench_writes_every_row_with_numbers(tmp_path):
    out = tmp_path / "performance.md"
    result = subprocess.run(["/usr/bin/python3", BENCH, "--output", str(out)], env=bench_env(),
                            stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    text = out.read_text(encoding="utf-8")
    assert result.stdout.strip() == text.strip()  # the table is printed as written
    for heading in ("| date |", "| machine |", "| kernel |", "| PostgreSQL |", "| libcurl |",
                    "| libev |", "## Results", "Targets met:"):
        assert heading in text, heading
    rows = table_rows(text)
    assert sorted(rows) == sorted(ROWS), rows.keys()
    for rid, (_, scenario, measured, reference, ratio, target, met) in rows.items():
        assert NUMBER.search(measured), (rid, measured)
        assert NUMBER.search(reference), (rid, reference)
        assert met in ("yes", "**no**", "—"), (rid, met)
        for cell in (measured, reference):
            assert "nan" not in cell.lower() and "error" not in cell.lower(), (rid, cell)
    # Ratios are numbers wherever the reference is not zero (idle CPU may round to 0.00 s).
    for rid in ("1a", "1b", "2a", "2b", "2c", "3", "4d", "5"):
        assert NUMBER.search(rows[rid][4]), (rid, rows[rid][4])
    assert leftovers(result.stderr) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_bench_stops_everything(tmp_path, sig):
    out = tmp_path / "performance.md"
    log_path = tmp_path / "bench.log"
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(["/usr/bin/python3", BENCH, "--output", str(out)],
                                env=bench_env(), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=log)
        try:
            # Interrupt in the middle of the latency scenario: PostgreSQL, nginx, a daemon and
            # the emulator are all running then.
            deadline = time.monotonic() + 120
            while "2. latency" not in log_path.read_text(encoding="utf-8"):
                assert proc.poll() is None, log_path.read_text(encoding="utf-8")
                assert time.monotonic() < deadline, "the harness never reached scenario 2"
                time.sleep(0.05)
            time.sleep(1.0)
            proc.send_signal(sig)
            rc = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    log_text = log_path.read_text(encoding="utf-8")
    assert rc != 0, log_text
    assert "stopped every process it started" in log_text, log_text
    assert not out.exists()  # nothing is written from a partial run
    assert leftovers(log_text) == [], log_text
