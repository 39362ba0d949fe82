"""valgrind memcheck on an integration run of 1,000 messages (make valgrind).

The daemon runs under memcheck against the real PostgreSQL and the RunPod
emulator, dispatches 1,000 messages (with some rejected batches on the way),
and is stopped with SIGTERM. Any memcheck error or any definite or indirect
leak makes valgrind exit 99."""

import json
import re
import shutil

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
