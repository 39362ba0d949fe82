"""Fixtures for the system tests: the .deb, a booted Debian 12 root with
PostgreSQL 15, pgmq and the RunPod emulator as units, and a Docker engine.

Run by `make test-system` (root). Each fixture stops what it started, also
when a test fails.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from nspawn import Container, wait_until

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PGMQ_VENDOR = REPO.parent / "shared" / "vendor" / "pgmq-1.5.1"

QUEUE = "sys_jobs"
ENDPOINT = "ep-sys"
# Test secrets, made up for this run: the checks look for them in the journal.
API_KEY = "rpa_SYSTEST_" + os.urandom(12).hex()
DB_PASSWORD = "pw_SYSTEST_" + os.urandom(12).hex()


_rootfs: subprocess.Popen | None = None


def pytest_configure(config):
    """Starts building (or finding) the cached Debian root at once, so that its
    debootstrap overlaps the Docker tests' on a cold machine."""
    global _rootfs
    if os.geteuid() != 0:
        pytest.exit("tests/system needs root (systemd-nspawn, dockerd)", returncode=1)
    _rootfs = subprocess.Popen(["sh", str(HERE / "rootfs.sh")], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)


def cached_root() -> str:
    out, err = _rootfs.communicate(timeout=1800)
    assert _rootfs.returncode == 0, f"tests/system/rootfs.sh failed:\n{err}"
    return out.strip()


def _deb() -> Path:
    debs = sorted(glob.glob(str(REPO / "build-deb" / "pgmq-dispatcher_*_*.deb")))
    debs = [d for d in debs if "-dbgsym_" not in d]
    if not debs:
        subprocess.run(["make", "-C", str(REPO), "deb"], check=True)
        return _deb()
    return Path(debs[-1])


@pytest.fixture(scope="session")
def deb() -> Path:
    return _deb()


def pgmq_source() -> tuple[str, list[Path]]:
    """Which pgmq the root gets: the real 1.5.1 extension when ../shared has it,
    else the project's look-alike schema (said in the summary)."""
    if (PGMQ_VENDOR / "pgmq.control").exists():
        return "real pgmq 1.5.1 (extension)", [PGMQ_VENDOR / "pgmq.control",
                                               PGMQ_VENDOR / "pgmq--1.5.1.sql"]
    return "tests/fixtures/pgmq.sql (look-alike; ../shared/vendor/pgmq-1.5.1 missing)", \
        [REPO / "tests" / "fixtures" / "pgmq.sql"]


EMULATOR_UNIT = f"""[Unit]
Description=RunPod Serverless emulator (tests)
[Service]
ExecStart=/usr/bin/python3 /opt/pgmqd-test/runpod_emulator.py --host 127.0.0.1 --port 8000 \\
  --endpoint {ENDPOINT} --api-key-file /opt/pgmqd-test/emulator_key --in-queue-s 0.05 --run-s 0.05
Environment=PYTHONUNBUFFERED=1
[Install]
WantedBy=multi-user.target
"""

SETUP_UNIT = """[Unit]
Description=Test database: pgmq, the queue and the dispatcher's role
Requires=postgresql@15-main.service
After=postgresql@15-main.service
[Service]
Type=oneshot
RemainAfterExit=yes
User=postgres
ExecStart=/usr/bin/psql -v ON_ERROR_STOP=1 -q -d postgres -f /opt/pgmqd-test/setup.sql
[Install]
WantedBy=multi-user.target
"""


def setup_sql(extension: bool) -> str:
    load = "CREATE EXTENSION IF NOT EXISTS pgmq;" if extension else \
        "\\i /opt/pgmqd-test/pgmq.sql"
    return f"""{load}
SELECT pgmq.create('{QUEUE}');
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pgmq_dispatcher') THEN
    CREATE ROLE pgmq_dispatcher LOGIN PASSWORD '{DB_PASSWORD}';
  END IF;
END $$;
GRANT USAGE ON SCHEMA pgmq TO pgmq_dispatcher;
GRANT ALL ON ALL TABLES IN SCHEMA pgmq TO pgmq_dispatcher;
GRANT ALL ON ALL SEQUENCES IN SCHEMA pgmq TO pgmq_dispatcher;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA pgmq TO pgmq_dispatcher;
"""


def dispatcher_conf(batch_size: int = 10, level: str = "info", extra: str = "") -> str:
    return f"""; written by tests/system
[database]
conninfo = host=127.0.0.1 dbname=postgres user=pgmq_dispatcher
[queue]
name = {QUEUE}
batch_size = {batch_size}
poll_interval_ms = 200
{extra}
[runpod]
endpoint_id = {ENDPOINT}
base_url = http://127.0.0.1:8000/v2
backoff_base_ms = 250
backoff_max_ms = 1000
[log]
level = {level}
"""


# The watchdog check shortens WatchdogSec; a SIGSTOPped process acts on the
# watchdog's SIGABRT only once continued, so systemd kills it with SIGKILL after
# TimeoutAbortSec, shortened here too. The database password rides in the
# conninfo credential, as docs/operations.md describes.
DROPIN = """[Service]
WatchdogSec=4s
TimeoutAbortSec=3s
LoadCredential=database_conninfo:/etc/pgmq-dispatcher/database_conninfo
"""


def prepare_root(root: Path) -> str:
    """Files the booted root needs; returns which pgmq it got."""
    subprocess.run(["systemd-machine-id-setup", f"--root={root}"], check=True,
                   capture_output=True)
    (root / "var/log/journal").mkdir(parents=True, exist_ok=True)
    opt = root / "opt/pgmqd-test"
    opt.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "tests/emulator/runpod_emulator.py", opt)
    (opt / "emulator_key").write_text(API_KEY + "\n")
    what, files = pgmq_source()
    extension = files[0].name == "pgmq.control"
    if extension:
        extdir = root / "usr/share/postgresql/15/extension"
        for f in files:
            shutil.copy(f, extdir)
    else:
        shutil.copy(files[0], opt / "pgmq.sql")
    (opt / "setup.sql").write_text(setup_sql(extension))
    os.chmod(opt, 0o755)
    for f in opt.iterdir():
        os.chmod(f, 0o644)
    units = root / "etc/systemd/system"
    (units / "runpod-emulator.service").write_text(EMULATOR_UNIT)
    (units / "pgmqd-test-db.service").write_text(SETUP_UNIT)
    wants = units / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    for unit in ("runpod-emulator.service", "pgmqd-test-db.service"):
        link = wants / unit
        if not link.exists():
            link.symlink_to(f"/etc/systemd/system/{unit}")
    # Quiet, fast boots: no console login, no apt timers.
    for unit in ("console-getty.service", "apt-daily.timer", "apt-daily-upgrade.timer",
                 "e2scrub_all.timer", "fstrim.timer"):
        (units / unit).unlink(missing_ok=True)
        (units / unit).symlink_to("/dev/null")
    return what


@pytest.fixture(scope="module")
def booted(deb, request):
    """A booted root (cached debootstrap, copied), the .deb installed in it
    with dpkg while systemd runs (so its maintainer scripts meet a live
    systemd), PostgreSQL, pgmq and the emulator up."""
    base = cached_root()
    work = Path(tempfile.mkdtemp(prefix="pgmqd-system-", dir="/var/tmp"))
    root = work / "root"
    subprocess.run(["cp", "-a", "--reflink=auto", base, str(root)], check=True)
    what = prepare_root(root)
    shutil.copy(deb, root / "root" / "pgmq-dispatcher.deb")
    c = Container(root, work / "console.log")
    c.pgmq = what
    ok = False
    try:
        c.boot_s = c.boot()
        print(f"\nsystem: booted in {c.boot_s:.1f} s; pgmq: {what}")
        c.run(["dpkg", "-i", "/root/pgmq-dispatcher.deb"])
        wait_until(lambda: c.show("pgmqd-test-db.service", "ActiveState") == "active", 60,
                   "the test database (pgmq, queue, role)")
        wait_until(lambda: "listening" in c.journal("-u", "runpod-emulator"), 30,
                   "the emulator to listen")
        yield c
        ok = True
    finally:
        rc = c.poweroff()
        if not ok or request.session.testsfailed:
            print(f"system: container exit {rc}; kept {work} for inspection")
        else:
            shutil.rmtree(work, ignore_errors=True)
