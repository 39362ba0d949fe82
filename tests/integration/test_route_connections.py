"""Routes share their database connections (issue 13): one connection for every route on one
conninfo, and on it one LISTEN for all their channels (or, with database.listen_conninfo, one
separate LISTEN connection for all of them). Counted from pg_stat_activity, proved by NOTIFY
waking each route with polling at a minute, and kept across a connection loss.

Every wait is on a condition with a deadline."""

import signal

import conftest
from test_routes import (emus, free_port, metrics, start, stop, two_queues,  # noqa: F401
                         wait_until, write_config)

SLOW = ["poll_interval_ms = 60000"]        # polling alone would take a minute
ROUTES = ("a", "b", "c")


def backends(db, application_name):
    rows = db.sql("SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
                  (db.dbname, application_name))
    return sorted(r[0] for r in rows)


def jobs(emu):
    return {j["msg_id"] for body in emu.run_bodies() for j in body["input"]["jobs"]}


def start_three(two_queues, emus, tmp_path, listen_conninfo=None):  # noqa: F811
    queues = two_queues
    for q in queues:
        conftest.enable_insert_notify(q.cluster, q.dbname, q.queue)
    port = free_port()
    cfg = tmp_path / "three.conf"
    extra = {name: SLOW for name in ROUTES}
    write_config(cfg, queues[0], emus, port, routes=ROUTES, extra=extra)
    if listen_conninfo:
        text = cfg.read_text().replace(
            "[database]\n", f"[database]\nlisten_conninfo = {listen_conninfo}\n", 1)
        cfg.write_text(text)
    d = start(cfg)
    for name in ROUTES:
        d.wait_log(rf"event=notify_ready.*route={name}\b|route={name}\b.*event=notify_ready")
        d.wait_log(rf"event=queue_empty.*route={name}\b|route={name}\b.*event=queue_empty")
    return queues, port, d


def wake_each(queues, emus, d):
    """An insert into each queue reaches its own endpoint with no poll in between."""
    empties = d.count_log(r"event=queue_empty")
    for i, (q, emu) in enumerate(zip(queues, emus)):
        ids = set(q.send_many([{"wake": i}]))
        wait_until(lambda: ids <= jobs(emu), timeout=15, what=f"route {ROUTES[i]} woken")
    # Each wake-up read finds its one message: a poll would have read an empty queue first.
    assert d.count_log(r"event=queue_empty") <= empties + len(queues)


def test_routes_share_one_connection_and_one_listen(two_queues, emus, tmp_path):  # noqa: F811
    queues, port, d = start_three(two_queues, emus, tmp_path)
    try:
        db = queues[0]
        pids = backends(db, "pgmq-dispatcher")
        assert len(pids) == 1, pids          # three routes, one connection (ledger and LISTEN too)
        wake_each(queues, emus, d)
        # Lose it: every route hears of it, one reconnect is counted, every channel is heard again.
        db.sql("SELECT pg_terminate_backend(%s)", (pids[0],))
        for name in ROUTES:
            d.wait_log(rf"event=notify_ready.*route={name}\b|route={name}\b.*event=notify_ready",
                       count=2, timeout_s=30)
        wait_until(lambda: metrics(port).get("pgmqd_pg_reconnects_total") == 1,
                   what="one reconnect counted")
        new = backends(db, "pgmq-dispatcher")
        assert len(new) == 1 and new != pids, new
        wake_each(queues, emus, d)
        assert metrics(port)["pgmqd_pg_reconnects_total"] == 1
    finally:
        stop(d)


def test_one_listen_connection_for_every_route(two_queues, emus, tmp_path):  # noqa: F811
    db0 = two_queues[0]
    listen = f"{db0.conninfo} application_name=pgmqd_listen"
    queues, port, d = start_three(two_queues, emus, tmp_path, listen_conninfo=listen)
    try:
        assert len(backends(db0, "pgmq-dispatcher")) == 1
        assert len(backends(db0, "pgmqd_listen")) == 1
        wake_each(queues, emus, d)
    finally:
        stop(d)


def test_reload_to_a_new_conninfo_keeps_one_connection(two_queues, emus, tmp_path):  # noqa: F811
    queues, port, d = start_three(two_queues, emus, tmp_path)
    try:
        db = queues[0]
        assert len(backends(db, "pgmq-dispatcher")) == 1
        cfg = tmp_path / "three.conf"
        after = f"{db.conninfo} application_name=pgmqd_after"
        cfg.write_text(cfg.read_text().replace(f"conninfo = {db.conninfo}\n",
                                               f"conninfo = {after}\n", 1))
        d.signal(signal.SIGHUP)
        d.wait_log(r"event=reloaded")
        # Every route follows to one new connection; the old one closes.
        wait_until(lambda: len(backends(db, "pgmqd_after")) == 1 and
                   not backends(db, "pgmq-dispatcher"), timeout=30, what="one new connection")
        for name in ROUTES:
            d.wait_log(rf"event=notify_ready.*route={name}\b|route={name}\b.*event=notify_ready",
                       count=2, timeout_s=30)
        wake_each(queues, emus, d)
        assert len(backends(db, "pgmqd_after")) == 1
    finally:
        stop(d)
