"""A property over a whole run (issue 9): every time a message is read, that
read ends in exactly one fate — accepted, released (rejected), outcome
unknown, archived, or released at shutdown — and each fate is logged once.

The run mixes accepted requests with rejections (429, 500, 503), lost
replies (outcome unknown), messages too large for any request (archived) and
a stop while the 50 ms polls go on (a read the stop overtakes is released at
shutdown). Then, for every msg_id:

  read_ct (what PostgreSQL counted) ==
      /run requests that carried it + its message_archived lines
      + the reads released at shutdown that held it

and every /run request has exactly one batch_* line, every unknown request
names each of its ids once in outcome_unknown_ids."""

import json
import re

from daemon import Fault, logfmt
from pgcluster import wait_until


def run_ids(record):
    return [j["msg_id"] for j in json.loads(record.body)["input"]["jobs"]]


def test_every_read_ends_in_exactly_one_fate(queue_db, emulator, start_daemon):
    small = queue_db.send_many([{"document_id": f"d{i}", "n": i} for i in range(40)])
    large = queue_db.send_many([{"document_id": "big", "pad": "x" * 3000} for _ in range(3)])
    more = queue_db.send_many([{"document_id": f"e{i}", "n": i} for i in range(20)])
    everything = small + large + more
    emulator.add_fault(Fault.status(429, headers={"Retry-After": "0"}), Fault.status(500),
                       Fault.reset(), Fault.status(503), Fault.close(create_job=True))
    d = start_daemon("-v", PGMQD_QUEUE_BATCH_SIZE=6, PGMQD_RUNPOD_MAX_BODY_BYTES=2000,
                     PGMQD_RUNPOD_BACKOFF_BASE_MS=100, PGMQD_RUNPOD_BACKOFF_MAX_MS=200,
                     PGMQD_QUEUE_POLL_INTERVAL_MS=50, PGMQD_QUEUE_VT_SECONDS=600)

    def settled():
        reqs = emulator.requests("run")
        sent = {i for r in reqs for i in run_ids(r)}
        return len(emulator.pending_faults()) == 0 and set(small + more) <= sent

    wait_until(settled, 60, what="every message sent at least once, every fault used")
    assert d.stop() == 0

    lines = d.lines
    requests = [r for r in emulator.requests("run") if r.body]
    # One batch_* line per /run request, matching its first id, last id and size.
    outcomes = [logfmt(line) for line in lines
                if re.search(r"event=batch_(accepted|rejected|outcome_unknown)\b", line)]
    assert sorted((int(o["first_msg_id"]), int(o["last_msg_id"]), int(o["jobs"]))
                  for o in outcomes) == \
        sorted((run_ids(r)[0], run_ids(r)[-1], len(run_ids(r))) for r in requests)

    # Unknown outcomes name each id of the request once.
    unknown_ids = [int(i) for line in lines if "event=outcome_unknown_ids" in line
                   for i in logfmt(line)["msg_ids"].split(",")]
    unknown_jobs = sum(int(o["jobs"]) for o in outcomes if o["event"] == "batch_outcome_unknown")
    assert len(unknown_ids) == unknown_jobs >= 1
    assert len(set(unknown_ids)) == len(unknown_ids)

    archived = [int(logfmt(line)["msg_id"]) for line in lines if "event=message_archived" in line]
    assert sorted(archived) == sorted(large)          # each once

    # Released messages: every rejected job, plus what a read during the stop held.
    released = sum(int(logfmt(line)["messages"]) for line in lines if "event=released " in line
                   or line.rstrip().endswith("event=released"))
    rejected_jobs = sum(int(o["jobs"]) for o in outcomes if o["event"] == "batch_rejected")
    assert rejected_jobs >= 3
    at_shutdown = released - rejected_jobs
    assert at_shutdown >= 0

    read_ct = {r["msg_id"]: int(r["read_ct"]) for r in queue_db.rows().values()}
    read_ct.update({r[0]: r[1] for r in queue_db.sql(
        "SELECT msg_id, read_ct FROM pgmq.a_jobs")})
    carried = {i: 0 for i in everything}
    for r in requests:
        for i in run_ids(r):
            carried[i] += 1
    leftover = {}
    for i in everything:
        fates = carried[i] + archived.count(i)
        assert fates <= read_ct[i], (i, fates, read_ct[i])
        if fates < read_ct[i]:
            leftover[i] = read_ct[i] - fates
    # Reads not accounted for by a request or an archive are the ones released
    # at shutdown, each once.
    assert sum(leftover.values()) == at_shutdown, (leftover, at_shutdown)
