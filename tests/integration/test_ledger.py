"""The dispatch ledger (issue 12): one row per dispatch written with the read, its
transitions, migrations, crash recovery, the lease that hands a job to another replica,
and the status / jobs / redrive commands.

Every wait is on a condition with a deadline."""

import json
import os
import re
import threading
import urllib.request

import pytest

from daemon import (API_KEY, ENDPOINT_ID, QUEUE, Daemon, Fault, RunPodEmulator, base_env,
                    logfmt, run_once)
from ledger_helpers import SCHEMA, accepted_runs, admin_url, rows, states_of
from pgcluster import wait_until

# The schema version this build knows (branches add migrations; the tests follow the header).
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "include",
                       "migrate.h"), encoding="utf-8") as _f:
    VERSION = int(re.search(r"#define MIGRATE_VERSION (\d+)", _f.read()).group(1))


def test_one_row_per_dispatch_written_with_the_read(queue_db, emulator, start_daemon):
    ids = queue_db.send_many([{"n": i} for i in range(12)])
    d = start_daemon(PGMQD_QUEUE_BATCH_SIZE="10")
    emulator.wait_for(lambda: len(accepted_runs(emulator)) == 2, timeout_s=15)
    wait_until(lambda: all(r[1] == "accepted" for r in rows(queue_db)) and len(rows(queue_db)) == 2,
               10, what="two accepted rows")
    got = rows(queue_db)
    assert sorted(i for r in got for i in r[3]) == ids
    assert all(ct == 1 for r in got for ct in r[4])
    jobs = {r[2] for r in got}
    assert jobs == {j["id"] for j in emulator.jobs()}
    keys = {r.headers.get("Idempotency-Key") for r in accepted_runs(emulator)}
    assert keys == {r[0] for r in got}            # the dispatch id went out as the key
    for r in got:
        assert states_of(r[6]) == ["sending", "accepted"]
        assert r[5] == 200
    # The default body is unchanged: no dispatch id in it.
    for body in emulator.run_bodies():
        assert "dispatch_id" not in body["input"]
    d.stop()


def test_dispatch_id_in_input_is_opt_in(queue_db, emulator, start_daemon):
    queue_db.send_many([{"n": 1}, {"n": 2}])
    start_daemon(PGMQD_RUNPOD_DISPATCH_ID_IN_INPUT="on")
    emulator.wait_for(lambda: len(accepted_runs(emulator)) == 1, timeout_s=15)
    body = emulator.run_bodies()[0]
    wait_until(lambda: rows(queue_db) and rows(queue_db)[0][1] == "accepted", 10)
    assert body["input"]["dispatch_id"] == rows(queue_db)[0][0]
    assert accepted_runs(emulator)[0].headers.get("Idempotency-Key") == rows(queue_db)[0][0]


def test_ledger_off_keeps_todays_behaviour(queue_db, emulator, start_daemon):
    queue_db.send_many([{"n": 1}])
    d = start_daemon(PGMQD_LEDGER_ENABLED="off")
    emulator.wait_for(lambda: len(accepted_runs(emulator)) == 1, timeout_s=15)
    assert queue_db.sql("SELECT to_regnamespace(%s)", (SCHEMA,))[0][0] is None
    assert "Idempotency-Key" not in accepted_runs(emulator)[0].headers
    d.stop()


def test_a_read_split_into_several_bodies_gets_one_row_each(queue_db, emulator, start_daemon):
    big = "x" * 300
    ids = queue_db.send_many([{"n": i, "pad": big} for i in range(6)])
    start_daemon(PGMQD_RUNPOD_MAX_BODY_BYTES="1000")
    emulator.wait_for(lambda: len(accepted_runs(emulator)) >= 3, timeout_s=15)
    runs = accepted_runs(emulator)
    wait_until(lambda: len(rows(queue_db, "state = 'accepted'")) == len(runs), 10,
               what="one accepted row per body")
    got = rows(queue_db)
    by_key = {r.headers["Idempotency-Key"]: r for r in runs}
    assert sorted(i for r in got for i in r[3]) == ids
    for r in got:
        body = json.loads(by_key[r[0]].body)
        assert [j["msg_id"] for j in body["input"]["jobs"]] == r[3]


def test_413_split_records_the_refused_body_and_each_half(queue_db, emulator, start_daemon):
    """RunPod refuses a body with 413: that dispatch ends `split` with the 413 and keeps its
    msg ids; each half is a dispatch of its own (its id in the header and, opt-in, the body);
    a message refused alone is archived under its own row."""
    msgs = [{"n": i, "pad": "x" * 300} for i in range(4)]
    msgs.insert(2, {"n": "huge", "pad": "y" * 3000})
    ids = queue_db.send_many(msgs)
    huge = ids[2]
    emulator.max_body_bytes = 1500
    d = start_daemon(PGMQD_RUNPOD_MAX_BODY_BYTES="100000", PGMQD_QUEUE_BATCH_SIZE="20",
                     PGMQD_RUNPOD_DISPATCH_ID_IN_INPUT="on")
    # 5 -> 413 -> [2 accepted] + [3 -> 413 -> [huge alone -> 413, archived] + [2 accepted]]
    emulator.wait_for(lambda: len(accepted_runs(emulator)) == 2, timeout_s=20)
    wait_until(lambda: len(rows(queue_db, "state = 'accepted'")) == 2
               and rows(queue_db, "state = 'archived'"), 15, what="accepted and archived rows")
    got = rows(queue_db)
    first = [r for r in got if sorted(r[3]) == ids]
    assert len(first) == 1, got                   # the read's row keeps every msg id
    assert first[0][1] == "split" and first[0][5] == 413, first
    assert states_of(first[0][6]) == ["sending", "split"]
    assert len(rows(queue_db, "state = 'split'")) == 2    # the body of three was refused too
    archived = rows(queue_db, "state = 'archived'")
    assert [r[3] for r in archived] == [[huge]] and archived[0][5] == 413, archived
    assert "archiving" in states_of(archived[0][6])
    accepted = rows(queue_db, "state = 'accepted'")
    assert sorted(i for r in accepted for i in r[3]) == [i for i in ids if i != huge]
    by_key = {r.headers["Idempotency-Key"]: r for r in accepted_runs(emulator)}
    for r in accepted:                            # each half went out under its own id
        body = json.loads(by_key[r[0]].body)
        assert body["input"]["dispatch_id"] == r[0]
        assert [j["msg_id"] for j in body["input"]["jobs"]] == r[3]
    assert not rows(queue_db, "state IN ('sending', 'unknown')")
    d.stop()


def test_poison_archive_status_and_redrive(queue_db, emulator, start_daemon):
    (mid,) = queue_db.send_many([{"poison": True}])
    queue_db.sql("SELECT * FROM pgmq.read('jobs', 0, 1)")     # read once already
    env = base_env(queue_db, emulator, PGMQD_QUEUE_MAX_READ_CT="1")
    d = start_daemon(PGMQD_QUEUE_MAX_READ_CT="1")
    wait_until(lambda: queue_db.sql("SELECT count(*) FROM pgmq.a_jobs")[0][0] == 1, 10)
    wait_until(lambda: rows(queue_db) and rows(queue_db)[0][1] == "archived", 10)
    d.stop()
    rc, out = run_once(env, "status", str(mid))
    assert rc == 0, out
    line = next(l for l in out if l.startswith(str(mid)))
    assert re.search(r"\barchive\b.*\barchived\b", line), out
    rc, out = run_once(env, "status", "--json", str(mid))
    got = json.loads("\n".join(out))
    assert got[0]["msg_id"] == mid and got[0]["now_in"] == "archive"
    assert got[0]["state"] == "archived" and got[0]["read_ct"] == 2
    rc, out = run_once(env, "redrive", "--dry-run", str(mid))
    assert rc == 0 and any(l.startswith(str(mid)) for l in out), out
    assert queue_db.sql("SELECT count(*) FROM pgmq.a_jobs")[0][0] == 1  # dry run moved nothing
    rc, out = run_once(env, "redrive", str(mid))
    assert rc == 0 and "1 message(s) redriven" in "\n".join(out), out
    assert queue_db.sql("SELECT read_ct FROM pgmq.q_jobs WHERE msg_id = %s", (mid,)) == [(0,)]
    # Dispatched again, and status tells the whole story.
    d2 = start_daemon(PGMQD_QUEUE_MAX_READ_CT="1")
    emulator.wait_for(lambda: len(accepted_runs(emulator)) == 1, timeout_s=15)
    wait_until(lambda: [r[1] for r in rows(queue_db)] == ["archived", "redriven", "accepted"], 10,
               what="archived, redriven, accepted")
    rc, out = run_once(env, "status", "--json", str(mid))
    assert [r["state"] for r in json.loads("\n".join(out))] == ["archived", "redriven", "accepted"]
    assert json.loads("\n".join(out))[-1]["job_id"] == emulator.jobs()[0]["id"]
    rc, out = run_once(env, "jobs", "--state", "accepted", "--since", "10m", "--json")
    assert rc == 0 and [r["job_id"] for r in json.loads("\n".join(out))] == [emulator.jobs()[0]["id"]]
    rc, out = run_once(env, "jobs")
    assert rc == 0 and out[0].split()[:3] == ["DISPATCH_ID", "READ", "STATE"], out
    d2.stop()


def test_every_archive_is_recorded_with_its_msg_ids(queue_db, emulator, start_daemon):
    """pgmq.archive and its ledger record are one statement: the poison guard's, the too-large
    one's, and the read_ct overflow's (whose messages no read ever returned: a row of its own),
    so `status` never shows a message that went to the archive without a record."""
    ids = queue_db.send_many([{"n": 0}, {"n": 1, "pad": "z" * 2000}, {"n": 2}, {"n": 3}])
    over, big, poison = ids[3], ids[1], ids[2]
    queue_db.sql("UPDATE pgmq.q_jobs SET read_ct = 2147483647 WHERE msg_id = %s", (over,))
    queue_db.sql("UPDATE pgmq.q_jobs SET read_ct = 7 WHERE msg_id = %s", (poison,))
    env = base_env(queue_db, emulator, PGMQD_QUEUE_MAX_READ_CT="5")
    d = start_daemon(PGMQD_QUEUE_MAX_READ_CT="5", PGMQD_RUNPOD_MAX_BODY_BYTES="1000",
                     PGMQD_QUEUE_POLL_INTERVAL_MS="200")
    d.wait_log(r"event=read_ct_overflow_archived .*messages=1", timeout_s=20)
    emulator.wait_for(lambda: len(accepted_runs(emulator)) == 1, timeout_s=15)
    wait_until(lambda: sorted(i for r in rows(queue_db, "state = 'archived'") for i in r[3])
               == sorted([over, big, poison]), 15, what="three archived msg ids")
    archived = {r[3][0]: r for r in rows(queue_db, "state = 'archived'")}
    reason = {m: r[6][-1].get("reason") for m, r in archived.items()}
    assert reason == {over: "max_read_ct", big: "too_large", poison: "max_read_ct"}, archived
    assert archived[over][4] == [2147483647]                    # read_ct as it was archived
    assert states_of(archived[over][6]) == ["archived"]          # no read ever returned it
    assert queue_db.sql("SELECT count(*) FROM pgmq.a_jobs")[0][0] == 3
    d.stop()
    for m in (over, big, poison):
        rc, out = run_once(env, "status", "--json", str(m))
        got = json.loads("\n".join(out))
        assert rc == 0 and got[-1]["state"] == "archived" and got[-1]["now_in"] == "archive", out


# ---- migrations ----

def schema_version(db):
    return db.sql(f"SELECT version FROM {SCHEMA}.schema_version")[0][0]


def test_migrate_fresh_then_up_to_date(queue_db, emulator):
    env = base_env(queue_db, emulator)
    rc, out = run_once(env, "migrate")
    assert rc == 0 and f"version {VERSION} (was 0)" in "\n".join(out), out
    rc, out = run_once(env, "migrate")
    assert rc == 0 and f"version {VERSION}, up to date" in "\n".join(out), out
    assert schema_version(queue_db) == VERSION


def test_previous_version_is_upgraded_at_start(queue_db, emulator, start_daemon):
    env = base_env(queue_db, emulator)
    rc, out = run_once(env, "migrate", "--target-version", "2")     # the previous version
    assert rc == 0 and schema_version(queue_db) == 2
    lease_cols = f"SELECT count(*) FROM information_schema.columns WHERE table_schema = " \
                 f"'{SCHEMA}' AND table_name = 'lease' AND column_name IN ('pid', 'since')"
    assert queue_db.sql(lease_cols)[0][0] == 0
    queue_db.send_many([{"n": 1}])
    d = start_daemon()
    d.wait_log(r"event=ledger_ready")
    emulator.wait_for(lambda: len(accepted_runs(emulator)) == 1, timeout_s=15)
    assert schema_version(queue_db) == VERSION
    assert queue_db.sql(lease_cols)[0][0] == 2
    wait_until(lambda: rows(queue_db) and rows(queue_db)[0][1] == "accepted", 10)


def test_newer_schema_is_refused_naming_both_versions(queue_db, emulator):
    env = base_env(queue_db, emulator)
    assert run_once(env, "migrate")[0] == 0
    queue_db.sql(f"UPDATE {SCHEMA}.schema_version SET version = 7")
    queue_db.send_many([{"n": 1}])
    d = Daemon(env, args=["-v"]).start()
    assert d.wait_exit(20) == 78
    line = next(l for l in d.lines if "ledger_unusable" in l)
    assert "version 7" in line and f"version {VERSION}" in line, line
    assert emulator.requests("run") == []
    rc, out = run_once(env, "migrate")
    assert rc == 78 and "version 7" in "\n".join(out)


def test_role_without_create_is_pointed_at_migrate(queue_db, emulator, pg_cluster):
    """One clear line pointing at `pgmq-dispatcher migrate`; the daemon goes on as with the
    ledger off (an upgrade does not stop a locked-down deployment), and uses the ledger once
    an owner has migrated."""
    queue_db.sql("DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'locked') "
                 "THEN CREATE ROLE locked LOGIN; END IF; END $$")
    queue_db.sql(f"REVOKE CREATE ON DATABASE {queue_db.dbname} FROM PUBLIC")
    queue_db.sql("GRANT USAGE ON SCHEMA pgmq TO locked; "
                 "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA pgmq TO locked; "
                 "GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA pgmq TO locked")
    env = base_env(queue_db, emulator,
                   PGMQD_DATABASE_CONNINFO=pg_cluster.conninfo_for(queue_db.dbname, user="locked"))
    queue_db.send_many([{"n": 1}])
    d = Daemon(env, args=[]).start()
    try:
        d.wait_log(r"event=ledger_unavailable")
        emulator.wait_for(lambda: len(accepted_runs(emulator)) == 1, timeout_s=15)
        errors = [l for l in d.lines if "level=error" in l]
        assert len(errors) == 1 and "`pgmq-dispatcher migrate`" in errors[0], d.output
        assert "Idempotency-Key" not in accepted_runs(emulator)[0].headers
    finally:
        d.stop()
    assert queue_db.sql("SELECT to_regnamespace(%s)", (SCHEMA,))[0][0] is None
    # An owner migrates once; then the locked-down role records its dispatches.
    assert run_once(base_env(queue_db, emulator), "migrate")[0] == 0
    queue_db.sql(f"GRANT USAGE ON SCHEMA {SCHEMA} TO locked; "
                 f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {SCHEMA} TO locked")
    queue_db.send_many([{"n": 2}])
    d = Daemon(env, args=[]).start()
    try:
        emulator.wait_for(lambda: len(accepted_runs(emulator)) == 2, timeout_s=15)
        wait_until(lambda: [r[1] for r in rows(queue_db)] == ["accepted"], 10)
        assert not [l for l in d.lines if "level=error" in l]
    finally:
        d.stop()


# ---- crash recovery ----

def metrics_text(d):
    return urllib.request.urlopen(admin_url(d, "/metrics"), timeout=5).read().decode()


def recovered(d):
    return [logfmt(l) for l in d.lines if "event=ledger_recovered_unknown" in l]


# The dead daemon's leases last LONG_LEASE: what a restart recovers at once it finds by the
# dead process's PostgreSQL session being gone, not by its lease running out.
LONG_LEASE = "600"


def test_kill_after_the_post_went_out_before_the_reply(queue_db, emulator, start_daemon):
    ids = queue_db.send_many([{"n": i} for i in range(3)])
    emulator.hold_runs()
    d = start_daemon(PGMQD_LEDGER_LEASE_S=LONG_LEASE, PGMQD_QUEUE_VT_SECONDS="600")
    emulator.wait_for(lambda: emulator.in_flight_run == 1, timeout_s=15)
    assert [r[1] for r in rows(queue_db)] == ["sending"]
    d.proc.kill()
    d.proc.wait()
    emulator.release_runs()
    d2 = start_daemon(PGMQD_LEDGER_LEASE_S=LONG_LEASE, PGMQD_QUEUE_VT_SECONDS="600")
    d2.wait_log(r"event=ledger_recovered_unknown", timeout_s=15)
    (r,) = rows(queue_db)
    assert r[1] == "unknown" and r[3] == ids
    assert states_of(r[6]) == ["sending", "unknown"]
    assert recovered(d2)[0]["msg_ids"] == "{%s}" % ",".join(map(str, ids))
    assert "pgmqd_ledger_recovered_unknown_total 1" in metrics_text(d2)     # counted
    # Nothing was lost: the messages keep their vt (a job may exist), none read twice.
    assert all(v["read_ct"] == 1 and v["invisible"] for v in queue_db.rows().values())
    d2.stop()


def test_kill_after_the_read_before_the_post(queue_db, emulator, start_daemon):
    # One /run per 10 s: the second read's batch waits for a rate slot.
    queue_db.send_many([{"n": i} for i in range(4)])
    d = start_daemon(PGMQD_LEDGER_LEASE_S=LONG_LEASE, PGMQD_QUEUE_BATCH_SIZE="2",
                     PGMQD_RUNPOD_MAX_REQUESTS_PER_10S="1")
    emulator.wait_for(lambda: len(accepted_runs(emulator)) == 1, timeout_s=15)
    wait_until(lambda: sorted(r[1] for r in rows(queue_db)) == ["accepted", "sending"], 10)
    d.proc.kill()
    d.proc.wait()
    d2 = start_daemon(PGMQD_LEDGER_LEASE_S=LONG_LEASE)
    d2.wait_log(r"event=ledger_recovered_unknown", timeout_s=15)
    got = rows(queue_db)
    assert sorted(r[1] for r in got) == ["accepted", "unknown"]
    acc = next(r for r in got if r[1] == "accepted")
    assert [acc[2]] == [j["id"] for j in emulator.jobs()]
    assert len(emulator.requests("run")) == 1     # the unknown one never went out
    d2.stop()


def test_kill_after_the_reply_before_the_ledger_update(queue_db, emulator, start_daemon, pg_cluster):
    d = start_daemon(PGMQD_LEDGER_LEASE_S=LONG_LEASE)
    d.wait_log(r"event=ledger_ready")
    # Hold the ledger's rows: the read inserts, the update after the reply waits.
    locker = pg_cluster.connect(queue_db.dbname, autocommit=False)
    emulator.hold_runs()
    queue_db.send_many([{"n": 1}])
    wait_until(lambda: [r[1] for r in rows(queue_db)] == ["sending"], 15)
    with locker.cursor() as cur:
        cur.execute(f"SELECT 1 FROM {SCHEMA}.dispatch FOR UPDATE")
    emulator.release_runs()
    d.wait_log(r"event=batch_accepted")
    d.proc.kill()
    d.proc.wait()
    locker.rollback()
    locker.close()
    d2 = start_daemon(PGMQD_LEDGER_LEASE_S=LONG_LEASE)
    # The dead daemon's backend may still commit the update it was waiting
    # with; else the row is recovered as unknown. Either is the truth.
    wait_until(lambda: rows(queue_db)[0][1] in ("unknown", "accepted"), 15)
    (r,) = rows(queue_db)
    (job,) = emulator.jobs()
    assert r[1] == "unknown" or r[2] == job["id"], r
    assert r[1] == "accepted" or recovered(d2)
    d2.stop()


def test_a_live_replicas_rows_are_not_recovered(queue_db, emulator, start_daemon):
    """A replica starting up turns into `unknown` only rows whose process is dead: a live
    replica's dispatch in flight stays `sending` and ends `accepted`."""
    queue_db.send_many([{"n": 1}])
    emulator.hold_runs()
    a = start_daemon(PGMQD_LEDGER_LEASE_S=LONG_LEASE)
    emulator.wait_for(lambda: emulator.in_flight_run == 1, timeout_s=15)
    b = start_daemon(PGMQD_LEDGER_LEASE_S="3")       # ticks every second
    b.wait_log(r"event=ledger_ready")
    owners = lambda: queue_db.sql(f"SELECT count(DISTINCT owner) FROM {SCHEMA}.lease")[0][0]
    # b's own tick ran (its lease renewal statement) at least twice meanwhile.
    t_end = __import__("time").monotonic() + 3
    wait_until(lambda: __import__("time").monotonic() > t_end, 5)
    assert [r[1] for r in rows(queue_db)] == ["sending"] and owners() == 1
    assert not recovered(b)
    emulator.release_runs()
    wait_until(lambda: [r[1] for r in rows(queue_db)] == ["accepted"], 15)
    a.stop()
    b.stop()


# ---- a job outlives the replica that sent it ----

@pytest.fixture
def slow_emulator():
    emu = RunPodEmulator(endpoint_id=ENDPOINT_ID, api_key=API_KEY, in_queue_s=20, run_s=40)
    emu.start()
    try:
        yield emu
    finally:
        emu.stop()


def test_heartbeat_survives_kill_9_of_the_sender(queue_db, slow_emulator, start_daemon):
    """IN_QUEUE 20 s then IN_PROGRESS 40 s with vt 15 s: the sender dies mid-job, a second
    replica takes the lease and keeps the heartbeat going; read_ct stays 1, one POST."""
    emu = slow_emulator
    env = dict(PGMQD_TRACKER_ENABLED="on", PGMQD_TRACKER_INTERVAL_MS="1000",
               PGMQD_LEDGER_LEASE_S="3", PGMQD_QUEUE_VT_SECONDS="15", emu=emu)
    (mid,) = queue_db.send_many([{"long": True}])
    a = start_daemon(**env)
    emu.wait_for(lambda: len(accepted_runs(emu)) == 1, timeout_s=15)
    a.wait_log(r"event=heartbeat ", timeout_s=20)           # the sender's own heartbeat
    a.proc.kill()
    a.proc.wait()
    b = start_daemon(**env)
    b.wait_log(r"event=job_claimed", timeout_s=20)
    b.wait_log(r"event=heartbeat ", timeout_s=20)
    wait_until(lambda: rows(queue_db)[0][1] == "COMPLETED", 70, what="COMPLETED in the ledger")
    assert len(emu.requests("run")) == 1                       # no second POST
    assert queue_db.sql("SELECT read_ct FROM pgmq.q_jobs WHERE msg_id = %s", (mid,)) == [(1,)]
    (r,) = rows(queue_db)
    assert r[2] == emu.jobs()[0]["id"]
    hist = states_of(r[6])
    assert hist[:2] == ["sending", "accepted"] and hist[-1] == "COMPLETED"
    assert "IN_PROGRESS" in hist
    # Never visible while the job ran: B's heartbeats came before the vt ran out.
    assert b.count_log(r"event=heartbeat ") >= 3
    b.stop()


def test_takeover_counts_max_heartbeat_from_the_jobs_start(queue_db, start_daemon):
    """After a takeover, tracker.max_heartbeat_s counts from when /run accepted the job (the
    ledger's `accepted`), not from the takeover."""
    emu = RunPodEmulator(endpoint_id=ENDPOINT_ID, api_key=API_KEY, in_queue_s=60, run_s=60)
    emu.start()
    try:
        env = dict(PGMQD_TRACKER_ENABLED="on", PGMQD_TRACKER_INTERVAL_MS="1000",
                   PGMQD_LEDGER_LEASE_S="2", PGMQD_QUEUE_VT_SECONDS="6",
                   PGMQD_TRACKER_MAX_HEARTBEAT_S="16", emu=emu)
        queue_db.send_many([{"long": True}])
        a = start_daemon(**env)
        emu.wait_for(lambda: len(accepted_runs(emu)) == 1, timeout_s=15)
        wait_until(lambda: rows(queue_db) and rows(queue_db)[0][1] == "accepted", 10)
        age = lambda: queue_db.sql(
            f"SELECT extract(epoch FROM now() - min((h->>'at')::timestamptz)) FROM "
            f"{SCHEMA}.dispatch, jsonb_array_elements(history) h "
            f"WHERE h->>'state' = 'accepted'")[0][0]
        wait_until(lambda: age() >= 9, 20, what="the job 9 s old")
        a.proc.kill()
        a.proc.wait()
        b = start_daemon(**env)
        b.wait_log(r"event=job_claimed", timeout_s=20)
        claimed_at = float(age())
        (m,) = b.wait_log(r"event=heartbeat_ceiling .*", timeout_s=20)
        ceiling_at = float(age())
        fields = logfmt(m.string)
        assert int(fields["tracked_s"]) >= 16, fields
        # From the job's start: 16 s after /run accepted it (plus a heartbeat period), far
        # before 16 s after the takeover.
        assert ceiling_at < claimed_at + 12, (claimed_at, ceiling_at)
        b.stop()
    finally:
        emu.stop()


def test_three_replicas_random_kills(queue_db, emulator, start_daemon):
    """3,000 messages, three replicas killed and restarted at random: exactly one accepted
    dispatch per message unless another is recorded unknown; nothing lost."""
    import random
    rnd = random.Random(12)
    queue_db.sql("SELECT pgmq.send_batch('jobs', array_agg(jsonb_build_object('n', g))) "
                 "FROM generate_series(1, 3000) g")
    env = dict(PGMQD_LEDGER_LEASE_S="2", PGMQD_QUEUE_VT_SECONDS="6",
               PGMQD_QUEUE_POLL_INTERVAL_MS="100", PGMQD_TRACKER_ENABLED="on",
               PGMQD_TRACKER_INTERVAL_MS="500")
    # The workers: delete a message once its job is known to the ledger.
    stop = threading.Event()
    worker_errors = []
    worker_db = queue_db.cluster.connect(queue_db.dbname)

    def work():
        while not stop.wait(0.1):
            try:
                with worker_db.cursor() as cur:
                    cur.execute(f"DELETE FROM pgmq.q_jobs WHERE msg_id IN (SELECT unnest(msg_ids) "
                                f"FROM {SCHEMA}.dispatch WHERE job_id IS NOT NULL)")
            except Exception as e:   # a deadlock with a heartbeat: try again
                worker_errors.append(e)
    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    reps = [start_daemon(**env) for _ in range(3)]
    every, killed = list(reps), set()
    for _ in range(6):
        wait_until(lambda: len(accepted_runs(emulator)) > 0, 10)
        victim = rnd.randrange(3)
        reps[victim].proc.kill()
        reps[victim].proc.wait()
        killed.add(every.index(reps[victim]))
        reps[victim] = start_daemon(**env)
        every.append(reps[victim])
        reps[victim].wait_log(r"event=ledger_ready", timeout_s=15)
    # Every message reaches a job.
    def all_accepted():
        got = queue_db.sql(f"SELECT count(DISTINCT m) FROM {SCHEMA}.dispatch, unnest(msg_ids) m "
                           f"WHERE state NOT IN ('sending', 'unknown', 'released', 'rejected')")
        return got[0][0] == 3000
    wait_until(all_accepted, 120, what="all 3000 messages accepted")
    per_msg = queue_db.sql(
        f"SELECT m, count(*) FILTER (WHERE state NOT IN ('sending', 'unknown', 'released', "
        f"'rejected', 'unsent')), count(*) FILTER (WHERE state IN ('unknown', 'sending')) "
        f"FROM {SCHEMA}.dispatch, unnest(msg_ids) m GROUP BY m")
    assert len(per_msg) == 3000
    for m, acc, unk in per_msg:
        assert acc == 1 or (acc > 1 and unk >= acc - 1), (m, acc, unk, rows(queue_db, f"msg_ids @> ARRAY[{m}::bigint]"))
    # The ledger tells the truth against what RunPod got: every message reached a job, each
    # `accepted` was a /run that RunPod accepted, and any further /run of it is an `unknown`.
    posted = {}
    for r in accepted_runs(emulator):
        for j in json.loads(r.body)["input"]["jobs"]:
            posted[j["msg_id"]] = posted.get(j["msg_id"], 0) + 1
    assert len(posted) == 3000
    for m, acc, unk in per_msg:
        assert acc <= posted[m] <= acc + unk, (m, acc, unk, posted[m])
    # Leases are held only for unfinished dispatches (one each: the primary key).
    assert queue_db.sql(f"SELECT count(*) FROM {SCHEMA}.lease l JOIN {SCHEMA}.dispatch d "
                        f"USING (dispatch_id) WHERE d.state IN ('unknown', "
                        f"'released', 'archived', 'rejected')")[0][0] == 0
    # One replica at a time follows a job: a job is taken over only from a replica that was
    # killed (its sender, or the replica that took it over before).
    holder, claims = {}, []
    for i, d in enumerate(every):
        for line in d.lines:
            f = logfmt(line) if "event=batch_accepted" in line or "event=job_claimed" in line \
                else None
            if f and f["event"] == "batch_accepted":
                holder[f["runpod_job_id"]] = i
            elif f:
                claims.append((f["time"], i, f["job_id"]))
    for _, i, job in sorted(claims):
        assert holder[job] in killed, (job, holder[job], i, killed)
        holder[job] = i
    for d in reps:
        d.stop()
    stop.set()
    worker.join()
    worker_db.close()


def test_completed_job_whose_messages_stay_is_logged_and_counted(queue_db, emulator, start_daemon):
    """The worker forgot to delete: after ledger.completed_grace_s the messages still in the
    queue are named and counted; a deleted one is not."""
    ids = queue_db.send_many([{"n": 1}, {"n": 2}])
    d = start_daemon(PGMQD_TRACKER_ENABLED="on", PGMQD_TRACKER_INTERVAL_MS="200",
                     PGMQD_LEDGER_LEASE_S="3", PGMQD_LEDGER_COMPLETED_GRACE_S="2")
    d.wait_log(r"event=ledger_ready")
    wait_until(lambda: rows(queue_db) and rows(queue_db)[0][1] == "COMPLETED", 20)
    queue_db.sql("SELECT pgmq.delete('jobs', %s::bigint)", (ids[0],))   # one of two deleted
    (m,) = d.wait_log(r"event=job_completed_messages_left .*", timeout_s=15)
    fields = logfmt(m.string)
    assert fields["msg_ids"] == "{%d}" % ids[1] and fields["job_id"] == emulator.jobs()[0]["id"]
    assert "pgmqd_ledger_completed_undeleted_total 1" in metrics_text(d)
    assert queue_db.sql(f"SELECT count(*) FROM {SCHEMA}.lease")[0][0] == 0
    d.stop()
