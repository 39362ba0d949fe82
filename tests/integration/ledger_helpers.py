"""What the ledger's tests share (test_ledger.py, test_ledger_jobs.py): the ledger's schema and
its dispatch rows, the accepted /run requests, and a daemon's admin URL."""

import re

SCHEMA = "pgmq_dispatcher"


def rows(db, where="true"):
    """The dispatch rows matching where, oldest read first: (dispatch_id, state, job_id,
    msg_ids, read_cts, http_status, history, error)."""
    return db.sql(f"SELECT dispatch_id::text, state, job_id, msg_ids, read_cts, http_status, "
                  f"history, error FROM {SCHEMA}.dispatch WHERE {where} ORDER BY read_at, dispatch_id")


def states_of(history):
    return [h["state"] for h in history]


def accepted_runs(emu):
    return [r for r in emu.requests("run") if r.accepted]


def admin_url(d, path):
    """http://127.0.0.1:PORT/path of the daemon's admin listener (its `started` line)."""
    port = int(re.search(r"admin_port=(\d+)", d.output).group(1))
    return f"http://127.0.0.1:{port}{path}"
