"""Fuller reads (issue 13): one read claims batch_size x the free in-flight slots
(queue.read_batches), its ledger rows, one per /run body, are made by the read statement
itself, and a body of such a read that RunPod refuses comes back to the queue, never lost.

Every wait is on a condition with a deadline."""

import json

from daemon import Fault, logfmt
from ledger_helpers import SCHEMA, accepted_runs, states_of
from pgcluster import wait_until


def rows(db, where="true"):
    """(dispatch_id, state, msg_ids, history) in msg_id order: the bodies of one read."""
    return db.sql(f"SELECT dispatch_id::text, state, msg_ids, history FROM {SCHEMA}.dispatch "
                  f"WHERE {where} ORDER BY msg_ids[1]")


def test_a_fuller_read_makes_one_row_per_body_in_its_statement(queue_db, emulator,
                                                                start_daemon):
    """max_in_flight 4, read_batches 8: one read of 35 (4 free slots x batch_size 10), four rows
    made with the read (10, 10, 10, 5 msg ids in msg_id order), no row re-cut after it, each
    body sent under its row's id."""
    ids = queue_db.send_many([{"i": i} for i in range(35)])
    emulator.hold_runs()
    d = start_daemon("-v", PGMQD_QUEUE_MAX_IN_FLIGHT="4", PGMQD_QUEUE_READ_BATCHES="8")
    try:
        emulator.wait_for(lambda: emulator.in_flight_run == 4, timeout_s=15)
        # One line per batch, each naming the read of 35 it came in.
        lines = [logfmt(m.string) for m in d.wait_log(r"event=batch_read .*", count=4)]
        assert [(x["jobs"], x["read_jobs"]) for x in lines] == [("10", "35")] * 3 + [("5", "35")]
        assert d.count_log(r"event=batch_read") == 4
        got = rows(queue_db)
        assert [r[2] for r in got] == [ids[0:10], ids[10:20], ids[20:30], ids[30:35]], got
        assert all(r[1] == "sending" and states_of(r[3]) == ["sending"] for r in got), got
    finally:
        emulator.release_runs()
    wait_until(lambda: len(rows(queue_db, "state = 'accepted'")) == 4, 15,
               what="four accepted rows")
    by_key = {r.headers["Idempotency-Key"]: r for r in accepted_runs(emulator)}
    for r in rows(queue_db):
        assert states_of(r[3]) == ["sending", "accepted"], r   # never split after the read
        body = json.loads(by_key[r[0]].body)
        assert [j["msg_id"] for j in body["input"]["jobs"]] == r[2]
    d.stop()


def test_a_refused_body_of_a_fuller_read_comes_back(queue_db, emulator, start_daemon):
    """The first /run of a read of 40 gets a 500: its ten messages are released (recorded
    under that body's row) and dispatched again; the other bodies of the read are accepted
    as they were; no message is lost or sent twice in an accepted body."""
    ids = queue_db.send_many([{"i": i} for i in range(40)])
    emulator.add_fault(Fault.status(500, body={"error": "boom"}))
    d = start_daemon("-v", PGMQD_QUEUE_MAX_IN_FLIGHT="4", PGMQD_QUEUE_READ_BATCHES="8")
    assert logfmt(d.wait_log(r"event=batch_read .*")[0].string)["read_jobs"] == "40"
    emulator.wait_for(lambda: sorted(j["msg_id"] for b in emulator.run_bodies()
                                     for j in b["input"]["jobs"]) == ids, timeout_s=30)
    refused = rows(queue_db, "state = 'released'")
    assert len(refused) == 1 and len(refused[0][2]) == 10, refused
    assert states_of(refused[0][3])[:2] == ["sending", "rejected"], refused
    wait_until(lambda: not rows(queue_db, "state IN ('sending', 'unknown')"), 10,
               what="no row left sending")
    accepted = rows(queue_db, "state = 'accepted'")
    assert sorted(i for r in accepted for i in r[2]) == ids
    assert max(len(b["input"]["jobs"]) for b in emulator.run_bodies()) == 10
    d.stop()
