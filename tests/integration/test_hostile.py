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
