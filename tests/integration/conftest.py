"""Shared pytest fixtures for the integration tests (run with /usr/bin/python3 -m pytest).

Which PGMQ the suite runs against: the real extension (pgmq 1.5.1, the version Supabase ships)
whenever ../shared/vendor/pgmq-1.5.1/ is beside the repository, else the project's look-alike
schema tests/fixtures/pgmq.sql. The pytest header and summary say which. PGMQD_TEST_PGMQ=fixture
forces the look-alike; PGMQD_TEST_PGMQ=real makes a missing extension an error (CI).
Tests of the 1.10 column layout and the 1.12 read overload always load the look-alike and its
add-ons: no real 1.5.1 has them.
"""

import filecmp
import itertools
import os
import shutil
import subprocess

import pytest

from pgcluster import DEFAULT_BINDIR, PgCluster

# ----------------------------------------------------------------------------------------------
# PostgreSQL cluster and PGMQ fixture databases (owner: tests/integration/test_fixture.py)
# ----------------------------------------------------------------------------------------------

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES_DIR = os.path.join(REPO_ROOT, "tests", "fixtures")
PGMQ_SQL = os.path.join(FIXTURES_DIR, "pgmq.sql")
# Optional add-ons, loaded after PGMQ_SQL (see the header of pgmq.sql).
PGMQ_ADDONS = {
    "1.10": os.path.join(FIXTURES_DIR, "pgmq-1.10-layout.sql"),
    "1.12": os.path.join(FIXTURES_DIR, "pgmq-1.12-read-overload.sql"),
}
DEMO_JOBS_SQL = os.path.join(FIXTURES_DIR, "demo_jobs.sql")
NOTIFY_TRIGGER_PRE_1_7_SQL = os.path.join(FIXTURES_DIR, "notify-trigger-pre-1.7.sql")
REAL_PGMQ_VERSION = "1.5.1"
REAL_PGMQ_DIR = os.path.join(os.path.dirname(REPO_ROOT), "shared", "vendor",
                             f"pgmq-{REAL_PGMQ_VERSION}")
REAL_PGMQ_FILES = ("pgmq.control", f"pgmq--{REAL_PGMQ_VERSION}.sql")


def _install_real_pgmq():
    """Makes the real extension available to PostgreSQL 15 as its README says (the control and
    SQL files in the share directory). Returns None when it is usable, else why not."""
    if not all(os.path.isfile(os.path.join(REAL_PGMQ_DIR, f)) for f in REAL_PGMQ_FILES):
        return f"{REAL_PGMQ_DIR} not found"
    sharedir = subprocess.run([os.path.join(DEFAULT_BINDIR, "pg_config"), "--sharedir"],
                              capture_output=True, text=True, check=True).stdout.strip()
    extdir = os.path.join(sharedir, "extension")
    for name in REAL_PGMQ_FILES:
        src, dst = os.path.join(REAL_PGMQ_DIR, name), os.path.join(extdir, name)
        if os.path.isfile(dst) and filecmp.cmp(src, dst, shallow=False):
            continue
        if not os.access(extdir, os.W_OK):
            return f"{dst} is missing or differs and {extdir} is not writable (run as root)"
        # Copy then rename: another test run may be reading the file at this moment.
        tmp = f"{dst}.tmp{os.getpid()}"
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    return None


def _choose_pgmq():
    """('real', why) or ('fixture', why), decided once per session."""
    wanted = os.environ.get("PGMQD_TEST_PGMQ", "")
    if wanted == "fixture":
        return "fixture", "PGMQD_TEST_PGMQ=fixture"
    problem = _install_real_pgmq()
    if problem is None:
        return "real", REAL_PGMQ_DIR
    if wanted == "real":
        raise pytest.UsageError(f"PGMQD_TEST_PGMQ=real but the real pgmq is unusable: {problem}")
    return "fixture", problem


PGMQ_KIND, PGMQ_WHY = _choose_pgmq()
REAL_PGMQ = PGMQ_KIND == "real"


def pgmq_description():
    if REAL_PGMQ:
        return f"ran against the real pgmq {REAL_PGMQ_VERSION} (CREATE EXTENSION pgmq)"
    return f"ran against the look-alike tests/fixtures/pgmq.sql, not the real pgmq ({PGMQ_WHY})"


def pytest_report_header(config):
    return "pgmq: " + pgmq_description().replace("ran against", "runs against")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    terminalreporter.write_sep("=", "pgmq: " + pgmq_description())


@pytest.fixture(scope="session")
def pg_cluster():
    """One throwaway PostgreSQL 15 cluster for the whole test session (trust auth).

    Stopped and removed at the end of the session whatever the test outcomes; pgcluster's
    atexit/SIGTERM hooks cover an interrupted run.
    """
    cluster = PgCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


# The seed project's PostgREST wrapper (not part of pgmq; the look-alike defines the same one).
SEED_PGMQ_READ_WRAPPER = """
CREATE FUNCTION public.pgmq_read(queue_name text, vt integer, qty integer)
RETURNS SETOF pgmq.message_record LANGUAGE plpgsql SET search_path = '' AS $fn$
BEGIN
    RETURN QUERY SELECT * FROM pgmq.read(pgmq_read.queue_name, pgmq_read.vt, pgmq_read.qty);
END;
$fn$"""


def load_pgmq(cluster, dbname, addons=(), fixture=False):
    """Loads PGMQ into ``dbname``: the real extension when the session uses it and neither
    ``addons`` nor ``fixture`` ask for the look-alike, else tests/fixtures/pgmq.sql and each
    add-on ("1.10", "1.12") in the given order. Returns 'real' or 'fixture'."""
    if REAL_PGMQ and not addons and not fixture:
        conn = cluster.connect(dbname)
        try:
            with conn.cursor() as cur:
                cur.execute("CREATE EXTENSION pgmq")
                cur.execute(SEED_PGMQ_READ_WRAPPER)
        finally:
            conn.close()
        return "real"
    cluster.load_sql(PGMQ_SQL, dbname)
    for addon in addons:
        cluster.load_sql(PGMQ_ADDONS[addon], dbname)
    return "fixture"


@pytest.fixture(scope="session")
def make_pgmq_db(pg_cluster):
    """Factory: make_pgmq_db(addons=(), prefix="pgmq", fixture=False) creates a fresh database
    with PGMQ (see load_pgmq) and returns its name."""
    counter = itertools.count(1)

    def make(addons=(), prefix="pgmq", fixture=False):
        name = f"{prefix}_{next(counter)}"
        pg_cluster.createdb(name)
        load_pgmq(pg_cluster, name, addons, fixture)
        return name

    return make


def enable_insert_notify(cluster, dbname, queue, throttle_ms=0):
    """Makes inserts into ``queue`` notify pgmq.q_<queue>.INSERT: pgmq.enable_notify_insert
    where PGMQ has it (>= 1.7, and the look-alike), else the trigger docs/operations.md gives
    for older versions (the real 1.5.1 has no notifications of its own; no throttle there)."""
    conn = cluster.connect(dbname)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT to_regprocedure('pgmq.enable_notify_insert(text,integer)')")
            if cur.fetchone()[0] is not None:
                cur.execute("SELECT pgmq.enable_notify_insert(%s, %s)", (queue, throttle_ms))
                return "pgmq"
    finally:
        conn.close()
    cluster.load_sql(NOTIFY_TRIGGER_PRE_1_7_SQL, dbname)
    conn = cluster.connect(dbname)
    try:
        with conn.cursor() as cur:
            cur.execute(f'CREATE TRIGGER pgmqd_notify_insert AFTER INSERT ON pgmq."q_{queue}" '
                        "FOR EACH STATEMENT EXECUTE FUNCTION public.pgmqd_notify_insert()")
    finally:
        conn.close()
    return "docs"


# ----------------------------------------------------------------------------------------------
# Daemon + RunPod emulator fixtures (owner: tests/integration/daemon.py)
# ----------------------------------------------------------------------------------------------

from daemon import emulator, queue_db, start_daemon  # noqa: E402,F401  (pytest fixtures)
