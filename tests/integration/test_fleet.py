"""One /run budget for the fleet (issue 13): three replicas draining one queue share the
endpoint's cap through PostgreSQL (include/budget.h).

Scaled: the emulator enforces 125 /run per 5 s (RunPod: 1000 per 10 s) so that a test takes
seconds; the daemons are told the same (runpod.rate_window_ms = 5000,
max_requests_per_10s = 125, fleet.validity_ms = 200: a replica starved of CPU for 100 ms on a
busy test machine must not drop its grant). A grant counts for window + 50 ms + validity =
5.25 s, so the fleet's ceiling is 5 / 5.25 = 0.952 of the cap; the tests ask 0.9.
`make bench` runs the real 1000 per 10 s once ("fleet of three replicas against the cap").
"""

import json
import os
import re
import signal
import time
import urllib.request

import pytest

from daemon import Daemon, assert_no_sanitizer_report, base_env
from pgcluster import wait_until

CAP = 125
WINDOW_S = 5.0
VALIDITY_MS = 200


# Messages per /run and batches per replica: a grant's slots free in bursts (the window's
# requests age out together), and two survivors must read fast enough to fill them; with 1
# message per read and 16 in flight a loaded machine fell to 0.86 of the cap.
BATCH = 5


def fleet_env(db, emu, **extra):
    env = dict(PGMQD_FLEET_ENABLED="on",
               PGMQD_FLEET_VALIDITY_MS=VALIDITY_MS,
               PGMQD_RUNPOD_RATE_WINDOW_MS=int(WINDOW_S * 1000),
               PGMQD_RUNPOD_MAX_REQUESTS_PER_10S=CAP,
               PGMQD_QUEUE_BATCH_SIZE=BATCH,
               PGMQD_QUEUE_MAX_IN_FLIGHT=32)
    env.update(extra)
    return base_env(db, emu, **env)


@pytest.fixture
def fleet(queue_db, emulator):
    """Factory: fleet(n) → n running replicas on one queue; all killed at teardown."""
    started = []
    emulator.rate_cap = CAP
    emulator.rate_window_s = WINDOW_S

    def start(n, **extra):
        ds = [Daemon(fleet_env(queue_db, emulator, **extra), args=("-v",)).start()
              for _ in range(n)]
        started.extend(ds)
        for d in ds:
            d.wait_log(r"event=fleet_budget .*kind=run", timeout_s=15)
        return ds

    yield start
    # A clean stop, so that a sanitizer build reports leaks (make SANITIZE=1).
    for d in started:
        if d.proc.poll() is None:
            d.stop()
    for d in started:
        assert_no_sanitizer_report(d.output)


def fleet_metric(d, name):
    """pgmqd_<name>{kind="run"} from the replica's /metrics."""
    port = d.wait_log(r"event=started .*admin_port=(\d+)")[0].group(1)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(f'pgmqd_{name}{{kind="run"}} '):
                return float(line.split()[-1])
    return None


def owner_of(d):
    m = d.wait_log(r"event=fleet_budget .*kind=run .*owner=([0-9a-f-]{36})")[0]
    return m.group(1)


def accepted_times(emu):
    return sorted(r.received_at for r in emu.requests("run") if r.accepted)


def count_429(emu):
    return sum(1 for r in emu.requests("run") if r.status == 429)


def max_in_window(times, window_s):
    """The most requests in any window of window_s (sliding, as the emulator counts)."""
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window_s:
            j += 1
        best = max(best, i - j + 1)
    return best


COUNT_S = WINDOW_S + 0.05 + VALIDITY_MS / 1000.0  # how long the database counts a grant


def share_of_cap(times, start, periods):
    """Achieved rate / the cap's rate (CAP per WINDOW_S) over [start, start + periods *
    COUNT_S). Saturated, the fleet repeats itself every COUNT_S (a slot comes back when its
    grant leaves the counted span), so a span of whole periods measures the rate whatever
    its phase; the ceiling is WINDOW_S / COUNT_S = 0.96."""
    span = periods * COUNT_S
    n = sum(1 for t in times if start <= t < start + span)
    return (n / span) / (CAP / WINDOW_S)


def enqueue(db, n):
    db.sql("SELECT count(*) FROM pgmq.send_batch(%s, ARRAY(SELECT jsonb_build_object('n', g) "
           "FROM generate_series(1, %s) g))", (db.queue, n))


def test_three_replicas_share_the_cap(queue_db, emulator, fleet):
    enqueue(queue_db, 1000 * BATCH)
    fleet(3)
    # The first window, then three periods measured: 16 s of saturated draining.
    emulator.wait_for(lambda: len(accepted_times(emulator)) >= 1, timeout_s=20)
    t0 = accepted_times(emulator)[0]
    emulator.wait_for(lambda: time.monotonic() > t0 + WINDOW_S + 3 * COUNT_S + 0.5,
                      timeout_s=40)
    times = accepted_times(emulator)
    share = share_of_cap(times, t0 + WINDOW_S, 3)
    left = queue_db.sql("SELECT count(*) FROM pgmq.q_jobs WHERE vt <= clock_timestamp()")[0][0]
    assert left > 0, "the queue ran dry: the measure is not of a saturated fleet"
    print(f"fleet of 3: {share:.3f} of the cap over 3 periods, max in any window "
          f"{max_in_window(times, WINDOW_S)}, 429s {count_429(emulator)}")
    assert count_429(emulator) == 0
    assert max_in_window(times, WINDOW_S) <= CAP
    assert share >= 0.9, share
    # Every replica took part: the budget is shared, not won by one.
    senders = queue_db.sql(
        "SELECT count(DISTINCT owner) FROM pgmq_dispatcher.budget_grant")[0][0]
    assert senders == 3, senders


def test_killed_replica_holds_no_budget_past_its_grant(queue_db, emulator, fleet):
    enqueue(queue_db, 1400 * BATCH)
    ds = fleet(3)
    victim = ds[0]
    owner = owner_of(victim)
    emulator.wait_for(lambda: len(accepted_times(emulator)) >= CAP, timeout_s=30)
    # Kill it the moment the database shows it holding a grant still within its validity.
    deadline = time.monotonic() + 30
    held = None
    while time.monotonic() < deadline:
        rows = queue_db.sql(
            "SELECT slots, extract(epoch FROM clock_timestamp() - granted_at) * 1000 "
            "FROM pgmq_dispatcher.budget_grant WHERE owner = %s "
            "AND granted_at > clock_timestamp() - make_interval(secs => %s) "
            "ORDER BY granted_at DESC LIMIT 1", (owner, VALIDITY_MS / 1000.0))
        if rows:
            victim.proc.send_signal(signal.SIGKILL)
            t_kill = time.monotonic()
            held = rows[0]
            break
    assert held is not None, "the replica never held a grant"
    victim.proc.wait()
    print(f"killed while holding {held[0]} slot(s) granted {float(held[1]):.1f} ms before")
    # Its grant counts until window + margin + validity after it was made; then the two
    # others go on at the full rate.
    start = t_kill + COUNT_S
    emulator.wait_for(lambda: time.monotonic() > start + 3 * COUNT_S + 0.5, timeout_s=40)
    times = accepted_times(emulator)
    share = share_of_cap(times, start, 3)
    left = queue_db.sql("SELECT count(*) FROM pgmq.q_jobs WHERE vt <= clock_timestamp()")[0][0]
    assert left > 0, "the queue ran dry: the measure is not of a saturated fleet"
    print(f"two survivors: {share:.3f} of the cap over 3 periods, 429s {count_429(emulator)}; "
          f"slots granted / unused / denied grants: "
          + ", ".join(f"{fleet_metric(d, 'fleet_slots_granted_total'):.0f} / "
                      f"{fleet_metric(d, 'fleet_slots_unused_total'):.0f} / "
                      f"{fleet_metric(d, 'fleet_grants_denied_total'):.0f}" for d in ds[1:]))
    assert count_429(emulator) == 0
    assert share >= 0.9, share
    for d in ds[1:]:
        assert d.proc.poll() is None


def test_grant_arithmetic_in_the_database(queue_db, emulator, fleet):
    """budget_take's arithmetic is budget_grant_size's (unit tested in test_budget.c): the
    cap, grant_max, the share among active owners, and a retry when the cap is used up."""
    ds = fleet(1)
    ds[0].wait_log(r"event=ledger_ready .*version=\d")  # the schema, migrated
    ds[0].stop()

    def take(owner, cap, want, grant_max, count_s=60.0):
        return queue_db.sql(
            "SELECT slots, retry_s, active FROM pgmq_dispatcher.budget_take("
            "'ep-arith', 'run', %s::uuid, %s, %s, %s, %s)",
            (owner, cap, count_s, want, grant_max))[0]

    a = "00000000-0000-4000-8000-00000000000a"
    b = "00000000-0000-4000-8000-00000000000b"
    assert take(a, 10, 4, 20)[0] == 4          # what it asks for
    assert take(a, 10, 50, 3)[0] == 3          # at most grant_max
    slots, _, active = take(b, 10, 50, 20)     # 3 free, two owners: ceil(3 / 2)
    assert (slots, active) == (2, 2)
    assert take(a, 10, 50, 20)[0] == 1         # the last one
    slots, retry_s, _ = take(b, 10, 1, 20)     # used up: when the oldest leaves the span
    assert slots == 0 and 55.0 < retry_s <= 60.0, retry_s
    # Grants older than the span are pruned by the next grant. The span is short, and the
    # grants above are waited out on the database's clock: three round trips can fit in 1 ms.
    wait_until(lambda: queue_db.sql(
        "SELECT bool_and(granted_at < clock_timestamp() - interval '50 milliseconds') "
        "FROM pgmq_dispatcher.budget_grant WHERE endpoint_id = 'ep-arith'")[0][0],
        timeout=5, what="the grants to be older than 50 ms")
    assert take(a, 10, 5, 20, count_s=0.05)[0] == 5
    n = queue_db.sql("SELECT count(*) FROM pgmq_dispatcher.budget_grant "
                     "WHERE endpoint_id = 'ep-arith'")[0][0]
    assert n == 1
    # 4 sent in fallback are reported: they count, and only 1 of the 10 is left.
    slots = queue_db.sql(
        "SELECT slots FROM pgmq_dispatcher.budget_take('ep-arith', 'run', %s::uuid, 10, 60, "
        "50, 20, 4)", (b,))[0][0]
    assert slots == 1


TAKE_SIG = ("pgmq_dispatcher.budget_take(text, text, uuid, integer, double precision, integer, "
            "integer, integer)")


def test_database_unavailable_falls_back_to_the_local_share(queue_db, emulator, fleet):
    """The grant statement failing (here: the function renamed away) is what an unusable
    database looks like to the budget: each replica goes on at cap / expected_replicas, counting
    what it sent just before, and reports what it sent meanwhile when grants come back."""
    enqueue(queue_db, 1400 * BATCH)
    # Twice as many as there are: two windows' shares (2 x 3 x 20) then fit in one window of
    # the emulator, whose own threads admit late on a loaded machine (three shares of 41 left 2
    # of 125 and drew 429s under the whole suite). The quiet span has a test of its own below
    # (here each replica's own sends hold its share back anyway); both timing rules are unit
    # tested in tests/unit/test_budget.c.
    ds = fleet(3, PGMQD_FLEET_EXPECTED_REPLICAS=6)
    emulator.wait_for(lambda: len(accepted_times(emulator)) >= CAP, timeout_s=30)
    queue_db.sql(f"ALTER FUNCTION {TAKE_SIG} RENAME TO budget_take_away")
    t_off = time.monotonic()
    for d in ds:
        d.wait_log(r"event=fleet_budget_fallback .*kind=run .*local_cap=20", timeout_s=10)
    emulator.wait_for(lambda: time.monotonic() > t_off + 2 * COUNT_S, timeout_s=30)
    # Quiet for one counted span after the last grant, then each at its share (20 of 125).
    during = sum(1 for t in accepted_times(emulator) if t_off + 1.0 <= t < t_off + 2 * COUNT_S)
    queue_db.sql("ALTER FUNCTION pgmq_dispatcher.budget_take_away(text, text, uuid, integer, "
                 "double precision, integer, integer, integer) RENAME TO budget_take")
    t_on = time.monotonic()
    for d in ds:
        d.wait_log(r"event=fleet_budget_restored .*kind=run", timeout_s=10)
    emulator.wait_for(lambda: time.monotonic() > t_on + 2 * COUNT_S, timeout_s=30)
    times = accepted_times(emulator)
    r429 = [round(r.received_at - t_off, 2) for r in emulator.requests("run") if r.status == 429]
    print(f"429s at {r429} after the rename; restored at {t_on - t_off:.2f}")
    print(f"fallback: {during} /run sent while the database could not grant, "
          f"max in any window {max_in_window(times, WINDOW_S)}, 429s {count_429(emulator)}")
    assert count_429(emulator) == 0
    assert max_in_window(times, WINDOW_S) <= CAP
    assert 0.9 * 3 * 20 <= during <= 2 * 3 * 20, during  # it went on, at its share
    # What they sent meanwhile was reported as grants of their own.
    assert queue_db.sql("SELECT count(*) FROM pgmq_dispatcher.budget_grant")[0][0] > 0


def first_run_carrying(emu, above_msg_id):
    """The emulator's receipt time (time.monotonic) of the first accepted /run carrying a
    message with msg_id > above_msg_id, or None."""
    times = [r.received_at for r in emu.requests("run") if r.accepted
             and any(j["msg_id"] > above_msg_id for j in json.loads(r.body)["input"]["jobs"])]
    return min(times) if times else None


def accepted_ids(emu):
    return [j["msg_id"] for r in emu.requests("run") if r.accepted
            for j in json.loads(r.body)["input"]["jobs"]]


def test_fallback_waits_one_counted_span_after_the_last_grant(queue_db, emulator, fleet):
    """The rule test_database_unavailable_falls_back_to_the_local_share cannot see (there a
    saturated replica's own sends hold its share back anyway): a replica whose own window is
    empty sends nothing in fallback until every grant made before the database stopped
    answering has left the counted span (window + 50 ms + validity), and a replica starting
    without any grant waits one span from its start. Times: the database's granted_at and
    the emulator's receipts, both put on time.monotonic."""
    wall_minus_mono = time.time() - time.monotonic()
    # The whole cap as the local share: only the wait can hold these few sends back.
    d = fleet(1, PGMQD_FLEET_EXPECTED_REPLICAS=1)[0]
    enqueue(queue_db, 10)
    emulator.wait_for(lambda: len(accepted_ids(emulator)) >= 10, timeout_s=30)
    queue_db.sql(f"ALTER FUNCTION {TAKE_SIG} RENAME TO budget_take_away")
    last_grant = float(queue_db.sql(
        "SELECT extract(epoch FROM max(granted_at)) FROM pgmq_dispatcher.budget_grant")[0][0])
    last_grant -= wall_minus_mono
    # Past the last grant's validity: what comes next needs a grant or the fallback.
    emulator.wait_for(lambda: time.monotonic() > last_grant + VALIDITY_MS / 1000.0 + 0.1,
                      timeout_s=5)
    enqueue(queue_db, 10)
    d.wait_log(r"event=fleet_budget_fallback .*kind=run .*local_cap=125", timeout_s=10)
    emulator.wait_for(lambda: len(accepted_ids(emulator)) >= 20, timeout_s=30)
    first = first_run_carrying(emulator, 10)
    print(f"idle replica: first fallback /run {first - last_grant:.2f} s after the last grant "
          f"(span {COUNT_S:.2f} s)")
    # 10 ms for the two clocks' readings above.
    assert first >= last_grant + COUNT_S - 0.01, first - last_grant

    # A replica started while the database cannot grant: one span from its start.
    d.stop()
    started = time.monotonic()
    d = fleet(1, PGMQD_FLEET_EXPECTED_REPLICAS=1)[0]
    enqueue(queue_db, 10)
    d.wait_log(r"event=fleet_budget_fallback .*kind=run .*local_cap=125", timeout_s=10)
    emulator.wait_for(lambda: len(accepted_ids(emulator)) >= 30, timeout_s=30)
    first = first_run_carrying(emulator, 20)
    print(f"new replica: first fallback /run {first - started:.2f} s after its start")
    assert first >= started + COUNT_S, first - started
    assert sorted(accepted_ids(emulator)) == list(range(1, 31))
    assert count_429(emulator) == 0


def test_database_unavailable_with_no_expected_replicas_sends_nothing_and_loses_nothing(
        queue_db, emulator, fleet):
    enqueue(queue_db, 150)
    ds = fleet(2)
    emulator.wait_for(lambda: len(accepted_times(emulator)) >= 20, timeout_s=30)
    queue_db.sql(f"ALTER FUNCTION {TAKE_SIG} RENAME TO budget_take_away")
    for d in ds:
        d.wait_log(r"event=fleet_budget_fallback .*kind=run .*local_cap=0", timeout_s=10)
    # Grants already held may still be spent within their validity; then nothing.
    quiet_from = time.monotonic() + VALIDITY_MS / 1000.0 + 0.3
    emulator.wait_for(lambda: time.monotonic() > quiet_from + 2.0, timeout_s=10)
    sent_in_outage = [t for t in accepted_times(emulator) if quiet_from <= t < quiet_from + 2.0]
    assert sent_in_outage == []
    queue_db.sql("ALTER FUNCTION pgmq_dispatcher.budget_take_away(text, text, uuid, integer, "
                 "double precision, integer, integer, integer) RENAME TO budget_take")
    # Every message reaches the emulator exactly once.
    def ids():
        return [j["msg_id"] for r in emulator.requests("run") if r.accepted
                for j in json.loads(r.body)["input"]["jobs"]]
    emulator.wait_for(lambda: len(ids()) >= 150, timeout_s=30)
    assert sorted(ids()) == list(range(1, 151))
    assert count_429(emulator) == 0


def test_three_replicas_through_pgbouncer_transaction_mode(queue_db, emulator, fleet, pg_cluster):
    """One autocommit statement per grant, no session state: the budget works through a
    transaction pooler (Supabase's port 6543) as directly."""
    from pgbouncer import PgBouncer

    with PgBouncer(pg_cluster, pool_mode="transaction") as bouncer:
        assert any(r["key"] == "pool_mode" and r["value"] == "transaction"
                   for r in bouncer.show("CONFIG"))
        enqueue(queue_db, 1000 * BATCH)
        ds = fleet(3, PGMQD_DATABASE_CONNINFO=bouncer.conninfo_for(queue_db.dbname))
        emulator.wait_for(lambda: len(accepted_times(emulator)) >= 1, timeout_s=30)
        t0 = accepted_times(emulator)[0]
        emulator.wait_for(lambda: time.monotonic() > t0 + WINDOW_S + 2 * COUNT_S + 0.5,
                          timeout_s=40)
        times = accepted_times(emulator)
        share = share_of_cap(times, t0 + WINDOW_S, 2)
        owners = queue_db.sql(
            "SELECT count(DISTINCT owner) FROM pgmq_dispatcher.budget_grant")[0][0]
        xacts = sum(int(r["total_xact_count"]) for r in bouncer.show("STATS")
                    if r["database"] == queue_db.dbname)
        for d in ds:
            d.stop()  # while their pooler is still there
    print(f"through PgBouncer: {share:.3f} of the cap over 2 periods, 429s "
          f"{count_429(emulator)}, {xacts} transactions through the pooler")
    assert count_429(emulator) == 0
    assert max_in_window(times, WINDOW_S) <= CAP
    assert share >= 0.9, share
    assert owners == 3
    assert xacts > 100


def test_tracker_status_cap_is_shared_too(queue_db, emulator, fleet):
    """With [tracker], /status and /health take their slots from a second budget row
    (kind 'status', cap tracker.max_status_per_10s over the same window)."""
    status_cap = 40
    enqueue(queue_db, 300)
    ds = fleet(3, PGMQD_QUEUE_BATCH_SIZE=1, PGMQD_TRACKER_ENABLED="on",
               PGMQD_TRACKER_INTERVAL_MS=100,
               PGMQD_TRACKER_MAX_STATUS_PER_10S=status_cap)
    for d in ds:
        d.wait_log(r"event=fleet_budget .*kind=status", timeout_s=10)

    def status_times():
        return sorted(r.received_at for r in emulator.requests()
                      if r.route in ("status", "health"))

    emulator.wait_for(lambda: len(status_times()) >= 1, timeout_s=30)
    t0 = status_times()[0]
    emulator.wait_for(lambda: time.monotonic() > t0 + 3 * COUNT_S, timeout_s=40)
    times = status_times()
    n = sum(1 for t in times if t0 + WINDOW_S <= t < t0 + WINDOW_S + 2 * COUNT_S)
    share = (n / (2 * COUNT_S)) / (status_cap / WINDOW_S)
    owners = queue_db.sql("SELECT count(DISTINCT owner) FROM pgmq_dispatcher.budget_grant "
                          "WHERE kind = 'status'")[0][0]
    print(f"/status + /health: at most {max_in_window(times, WINDOW_S)} in any window of "
          f"{status_cap} allowed, {share:.3f} of that cap over 2 periods, {owners} replicas")
    assert max_in_window(times, WINDOW_S) <= status_cap
    assert share >= 0.8, share  # the demand (about 75 per s) keeps it saturated
    assert owners == 3


def test_fuller_reads_claim_no_more_than_the_grant_holds(queue_db, emulator, fleet):
    """queue.read_batches with the fleet budget: a read claims at most the bodies the replica's
    grant lets out now (grant_max 4 here), not what its local cap and free slots would allow
    (16), so no read holds rows the fleet will not send."""
    enqueue(queue_db, 600)
    ds = fleet(2, PGMQD_QUEUE_READ_BATCHES=16, PGMQD_FLEET_GRANT_MAX=4)
    emulator.wait_for(lambda: len(accepted_times(emulator)) >= 60, timeout_s=30)
    reads = [int(m.group(1)) for d in ds
             for m in (re.search(r"event=batch_read .*\bjobs=(\d+)", l) for l in d.lines) if m]
    assert reads, "no read logged"
    assert max(reads) <= 4 * BATCH, reads
    assert count_429(emulator) == 0
