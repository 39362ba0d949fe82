"""The project's Dockerfile under a real Docker engine (Debian's docker.io).

Starts dockerd (--bridge=none --iptables=false) when none runs and stops it
afterwards; makes the base image debian:bookworm-slim from debootstrap
--variant=minbase when it is missing; builds the image with --network host;
runs it --read-only --cap-drop=ALL --security-opt no-new-privileges
--network host, secrets from *_FILE, against a private PostgreSQL cluster and
the RunPod emulator, both on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import PGMQ_VENDOR, REPO
from nspawn import wait_until

sys.path.insert(0, str(REPO / "tests" / "integration"))
sys.path.insert(0, str(REPO / "tests" / "emulator"))
from pgcluster import PgCluster  # noqa: E402
from runpod_emulator import RunPodEmulator  # noqa: E402

DOCKER = "/usr/bin/docker" if os.path.exists("/usr/bin/docker") else "docker"
BASE = "debian:bookworm-slim"
IMAGE = "pgmq-dispatcher:system-test"
NAME = "pgmqd-system-test"
QUEUE = "docker_jobs"
ENDPOINT = "ep-docker"
API_KEY = "rpa_DOCKERTEST_" + os.urandom(12).hex()
DB_PASSWORD = "pw_DOCKERTEST_" + os.urandom(12).hex()
# The image may grow by at most this over its base (measured +14.8 MB).
MAX_IMAGE_GROWTH_MB = 25


def docker(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    r = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: exit {r.returncode}\n{r.stderr[-3000:]}")
    return r


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def engine():
    """A running Docker engine; started here (and stopped at the end) if none runs."""
    if docker("info", check=False, timeout=30).returncode == 0:
        yield None
        return
    log = open("/var/tmp/pgmqd-system-dockerd.log", "ab")
    proc = subprocess.Popen(["dockerd", "--bridge=none", "--iptables=false"],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    log.close()
    try:
        wait_until(lambda: proc.poll() is not None or
                   docker("info", check=False, timeout=30).returncode == 0, 60, "dockerd")
        assert proc.poll() is None, "dockerd exited; see /var/tmp/pgmqd-system-dockerd.log"
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


@pytest.fixture(scope="module")
def image(engine):
    if docker("image", "inspect", BASE, check=False).returncode != 0:
        tmp = Path(tempfile.mkdtemp(prefix="pgmqd-base-", dir="/var/tmp"))
        try:
            subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(tmp / "root"),
                            "http://deb.debian.org/debian"], check=True, capture_output=True)
            # The downloaded .debs stay behind otherwise (~100 MB).
            subprocess.run(["chroot", str(tmp / "root"), "apt-get", "clean"], check=True)
            tar = subprocess.Popen(["tar", "-C", str(tmp / "root"), "-c", "."],
                                   stdout=subprocess.PIPE)
            subprocess.run([DOCKER, "import", "-", BASE], stdin=tar.stdout, check=True,
                           capture_output=True)
            assert tar.wait() == 0
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    docker("build", "--network", "host", "-t", IMAGE, str(REPO), timeout=1800)
    yield IMAGE


@pytest.fixture
def database():
    with PgCluster(auth="scram", superuser_password=DB_PASSWORD) as pg:
        pg.start()
        if (PGMQ_VENDOR / "pgmq.control").exists():
            sharedir = subprocess.run(["/usr/lib/postgresql/15/bin/pg_config", "--sharedir"],
                                      capture_output=True, text=True, check=True).stdout.strip()
            for f in ("pgmq.control", "pgmq--1.5.1.sql"):
                shutil.copy(PGMQ_VENDOR / f, Path(sharedir) / "extension" / f)
            with pg.connect() as conn, conn.cursor() as cur:
                cur.execute("CREATE EXTENSION pgmq")
        else:
            pg.load_sql(str(REPO / "tests/fixtures/pgmq.sql"))
        with pg.connect() as conn, conn.cursor() as cur:
            cur.execute("SELECT pgmq.create(%s)", (QUEUE,))
        yield pg


def queue_count(pg, where: str = "true") -> int:
    with pg.connect() as conn, conn.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM pgmq.q_{QUEUE} WHERE {where}")
        return cur.fetchone()[0]


def send(pg, n: int) -> None:
    with pg.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT pgmq.send_batch(%s, ARRAY(SELECT jsonb_build_object('i', i) "
                    "FROM generate_series(1, %s) i))", (QUEUE, n))


def test_image_size_above_base(image):
    base = int(docker("image", "inspect", "-f", "{{.Size}}", BASE).stdout)
    size = int(docker("image", "inspect", "-f", "{{.Size}}", image).stdout)
    growth_mb = (size - base) / 1e6
    print(f"\ndocker: {BASE} {base / 1e6:.1f} MB, {image} {size / 1e6:.1f} MB, "
          f"+{growth_mb:.1f} MB above its base")
    assert growth_mb <= MAX_IMAGE_GROWTH_MB


def test_container_dispatches_turns_healthy_and_stops_with_exit_0(image, database):
    pg = database
    emu = RunPodEmulator(endpoint_id=ENDPOINT, api_key=API_KEY, in_queue_s=0.05, run_s=0.05,
                         latency_s=1.5)
    emu.start()
    secrets = Path(tempfile.mkdtemp(prefix="pgmqd-secrets-", dir="/var/tmp"))
    try:
        (secrets / "runpod_api_key").write_text(API_KEY + "\n")
        (secrets / "database_url").write_text(
            pg.conninfo_for(user="postgres", password=DB_PASSWORD) + "\n")
        for f in secrets.iterdir():
            os.chown(f, 10001, 10001)
            os.chmod(f, 0o400)
        os.chmod(secrets, 0o755)
        docker("rm", "-f", NAME, check=False)
        admin = f"127.0.0.1:{free_port()}"
        docker("run", "-d", "--name", NAME, "--read-only", "--cap-drop=ALL",
               "--security-opt", "no-new-privileges", "--network", "host",
               # The image's HEALTHCHECK command, probed every 2 s instead of 30 s.
               "--health-interval", "2s",
               "-e", f"PGMQD_QUEUE_NAME={QUEUE}", "-e", f"RUNPOD_ENDPOINT_ID={ENDPOINT}",
               "-e", f"RUNPOD_ENDPOINT_BASE_URL={emu.base_url}",
               "-e", "RUNPOD_API_KEY_FILE=/run/secrets/runpod_api_key",
               "-e", "DATABASE_URL_FILE=/run/secrets/database_url",
               "-e", "PGMQD_QUEUE_POLL_INTERVAL_MS=200", "-e", f"PGMQD_ADMIN_LISTEN={admin}",
               "-v", f"{secrets}:/run/secrets:ro", image)
        try:
            send(pg, 25)

            def dispatched():
                state = json.loads(docker("inspect", NAME).stdout)[0]["State"]
                assert state["Running"], docker("logs", NAME, check=False).stderr[-3000:]
                return sum(len(b["input"]["jobs"]) for b in emu.run_bodies()) >= 25
            try:
                wait_until(dispatched, 90, "25 messages dispatched")
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{docker('logs', NAME).stderr[-3000:]}") from None
            jobs = sum(len(b["input"]["jobs"]) for b in emu.run_bodies())
            assert jobs == 25, jobs
            # Accepted messages stay invisible in the queue: the worker deletes them.
            assert queue_count(pg, "read_ct = 1") == 25

            def health():
                state = json.loads(docker("inspect", NAME).stdout)[0]["State"]
                assert state["Running"], docker("logs", NAME, check=False).stderr[-3000:]
                return state["Health"]["Status"] == "healthy"
            wait_until(health, 60, "HEALTHCHECK healthy", 1.0)

            # Stop with requests in flight (the emulator answers after 1.5 s).
            send(pg, 20)
            wait_until(lambda: queue_count(pg, "read_ct > 0 AND msg_id > 25") > 0, 30,
                       "messages in flight")
            docker("stop", "-t", "15", NAME, timeout=60)
            state = json.loads(docker("inspect", NAME).stdout)[0]["State"]
            logs = docker("logs", NAME)
            out = logs.stdout + logs.stderr
            assert state["ExitCode"] == 0, out[-3000:]
            lines = out.splitlines()
            stopping = [i for i, line in enumerate(lines) if "event=stopping" in line]
            exiting = [i for i, line in enumerate(lines) if "event=exiting" in line]
            assert stopping and exiting and stopping[0] < exiting[0], out[-3000:]
            assert "in_flight=0" not in lines[stopping[0]], lines[stopping[0]]
            assert "exit_code=0" in lines[exiting[0]] and \
                "messages_released=0" in lines[exiting[0]], lines[exiting[0]]
            inspect = docker("inspect", NAME).stdout
            for secret in (API_KEY, DB_PASSWORD):
                assert secret not in out, "a secret in docker logs"
                assert secret not in inspect, "a secret in docker inspect"
        finally:
            docker("rm", "-f", NAME, check=False)
    finally:
        emu.stop()
        shutil.rmtree(secrets, ignore_errors=True)
