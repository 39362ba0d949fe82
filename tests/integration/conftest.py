"""Shared pytest fixtures for the integration tests (run with /usr/bin/python3 -m pytest)."""

import itertools
import os

import pytest

from pgcluster import PgCluster

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


@pytest.fixture(scope="session")
def make_pgmq_db(pg_cluster):
    """Factory: make_pgmq_db(addons=(), prefix="pgmq") creates a fresh database with the PGMQ
    fixture loaded, then each add-on of ``addons`` ("1.10", "1.12") in the given order, and
    returns the database name."""
    counter = itertools.count(1)

    def make(addons=(), prefix="pgmq"):
        name = f"{prefix}_{next(counter)}"
        pg_cluster.createdb(name)
        pg_cluster.load_sql(PGMQ_SQL, name)
        for addon in addons:
            pg_cluster.load_sql(PGMQ_ADDONS[addon], name)
        return name

    return make


# ----------------------------------------------------------------------------------------------
# Daemon + RunPod emulator fixtures (owner: tests/integration/daemon.py)
# ----------------------------------------------------------------------------------------------

from daemon import emulator, queue_db, start_daemon  # noqa: E402,F401  (pytest fixtures)
