"""The Debian package under real systemd: a booted Debian 12 root
(systemd-nspawn -b --register=no --private-network) with PostgreSQL 15, pgmq
and the RunPod emulator as units. Checks read systemd's answers and the
root's journal. The tests run in file order against one booted root.
"""

from __future__ import annotations

import re
import subprocess
import time

from conftest import API_KEY, DB_PASSWORD, DROPIN, ENDPOINT, QUEUE, dispatcher_conf
from nspawn import wait_until

UNIT = "pgmq-dispatcher.service"
CONF = "/etc/pgmq-dispatcher/pgmq-dispatcher.conf"


def send(c, n: int, tag: str) -> None:
    c.run(["runuser", "-u", "postgres", "--", "psql", "-q", "-v", "ON_ERROR_STOP=1", "-d",
           "postgres", "-c",
           f"SELECT pgmq.send_batch('{QUEUE}', ARRAY(SELECT jsonb_build_object('tag', '{tag}', "
           f"'i', i) FROM generate_series(1, {n}) i))"])


def sql_value(c, query: str) -> str:
    return c.run(["runuser", "-u", "postgres", "--", "psql", "-qtA", "-d", "postgres", "-c",
                  query]).stdout.strip()


def run_jobs(c, after: str, status: str = "200") -> list[int]:
    """Jobs per /run request the emulator answered with status, after a cursor."""
    out = c.journal("-u", "runpod-emulator", after=after)
    return [int(m) for m in re.findall(rf"POST /v2/{ENDPOINT}/run {status} jobs=(\d+)", out)]


def daemon_lines(c, event: str, after: str, *args: str) -> list[str]:
    out = c.journal("-u", UNIT, *args, after=after)
    return [line for line in out.splitlines() if f"event={event}" in line]


def configure(c, key: str = API_KEY, **conf) -> None:
    c.write(CONF, dispatcher_conf(**conf))
    c.write("/etc/pgmq-dispatcher/runpod_api_key", key + "\n", 0o600)
    c.write("/etc/pgmq-dispatcher/database_conninfo",
            f"host=127.0.0.1 dbname=postgres user=pgmq_dispatcher password={DB_PASSWORD}\n",
            0o600)


def test_package_installed_not_enabled_not_started(booted):
    c = booted
    assert c.run(["dpkg-query", "-W", "-f=${Status}", "pgmq-dispatcher"]).stdout == \
        "install ok installed"
    # dpkg -i ran with systemd up: the unit is known, neither enabled nor started.
    assert c.show(UNIT, "LoadState") == "loaded"
    assert c.run(["systemctl", "is-enabled", UNIT], check=False).stdout.strip() == "disabled"
    assert c.show(UNIT, "ActiveState") == "inactive"
    assert c.show(UNIT, "NRestarts") == "0"
    unit = c.run(["systemctl", "cat", UNIT]).stdout
    assert "ExecStart=/usr/bin/pgmq-dispatcher\n" in unit
    assert "ExecStartPre=/usr/bin/pgmq-dispatcher --check-config\n" in unit
    assert not [line for line in unit.splitlines()
                if line.startswith("Exec") and "/usr/local/" in line]
    conffiles = c.run(["dpkg-query", "-W", "-f=${Conffiles}", "pgmq-dispatcher"]).stdout
    assert "/etc/pgmq-dispatcher/pgmq-dispatcher.conf" in conffiles
    assert "/etc/default/pgmq-dispatcher" in conffiles
    assert c.run(["test", "-f", "/usr/share/man/man8/pgmq-dispatcher.8.gz"]).returncode == 0


def test_active_only_after_ready_and_dispatches(booted):
    c = booted
    configure(c)
    c.write(f"/etc/systemd/system/{UNIT}.d/test.conf", DROPIN)
    c.run(["systemctl", "daemon-reload"])
    # PID 1 at debug level logs each sd_notify message it gets, in order with
    # its own state changes.
    c.run(["systemd-analyze", "log-level", "debug"])
    cur = c.cursor()
    try:
        started = time.monotonic()
        c.run(["systemctl", "start", UNIT])          # returns once the job is done
        c.ready_s = time.monotonic() - started
    finally:
        c.run(["systemd-analyze", "log-level", "info"])
    assert c.show(UNIT, "ActiveState") == "active"
    assert c.show(UNIT, "SubState") == "running"
    pid1 = [line for line in c.journal("_PID=1", after=cur).splitlines()
            if f"{UNIT}: " in line]
    ready = [i for i, line in enumerate(pid1)
             if "Got notification message" in line and "READY=1" in line]
    running = [i for i, line in enumerate(pid1) if re.search(r"Changed \S+ -> running", line)]
    assert ready and running, "\n".join(pid1[-40:])
    assert ready[0] < running[0], \
        "the unit became active before the daemon's READY=1:\n" + "\n".join(pid1[-40:])
    print(f"\nsystem: systemctl start to active (READY=1): {c.ready_s:.2f} s")

    cur = c.cursor()
    send(c, 25, "first")
    jobs = wait_until(lambda: sum(run_jobs(c, cur)) >= 25 and run_jobs(c, cur), 60,
                      "25 messages at the emulator")
    assert sum(jobs) == 25 and max(jobs) <= 10, jobs
    # Accepted messages stay in the queue, invisible: the worker deletes them.
    assert sql_value(c, f"SELECT count(*) FROM pgmq.q_{QUEUE} WHERE read_ct = 1") == "25"


def test_reload_applies_a_changed_value(booted):
    c = booted
    # As on a minimal Debian: no procps, so no /bin/kill for ExecReload to run.
    assert c.run(["test", "-e", "/bin/kill"], check=False).returncode != 0, \
        "the root has /bin/kill: this check would not show that reload works without it"
    configure(c, batch_size=5, level="debug")
    c.run(["systemd-analyze", "log-level", "debug"])
    cur = c.cursor()
    try:
        c.run(["systemctl", "reload", UNIT])
    finally:
        c.run(["systemd-analyze", "log-level", "info"])
    assert c.show(UNIT, "ActiveState") == "active"
    pid1 = "\n".join(line for line in c.journal("_PID=1", after=cur).splitlines()
                     if f"{UNIT}: Got notification message" in line)
    reloading = pid1.find("RELOADING=1")
    ready = pid1.find("READY=1", max(reloading, 0))
    assert reloading != -1 and ready > reloading, pid1[-3000:]
    assert daemon_lines(c, "reloaded", cur)
    cur = c.cursor()
    send(c, 10, "after-reload")
    jobs = wait_until(lambda: sum(run_jobs(c, cur)) >= 10 and run_jobs(c, cur), 60,
                      "10 messages after the reload")
    assert sum(jobs) == 10 and max(jobs) <= 5, f"batch_size=5 not in effect: {jobs}"
    # log.level=debug is in effect too.
    assert daemon_lines(c, "batch_read", cur)


def test_reload_with_invalid_file_keeps_old_config(booted):
    c = booted
    pid = c.show(UNIT, "MainPID")
    c.write(CONF, dispatcher_conf(batch_size=5, level="debug").replace(
        "batch_size = 5", "batch_size = banana"))
    cur = c.cursor()
    c.run(["systemctl", "reload", UNIT])
    assert c.show(UNIT, "ActiveState") == "active"
    assert c.show(UNIT, "MainPID") == pid
    errors = [line for line in c.journal("-u", UNIT, "-p", "err", after=cur).splitlines()
              if "batch_size" in line]
    assert len(errors) == 1, errors
    assert daemon_lines(c, "reload_failed", cur)
    cur = c.cursor()
    send(c, 10, "after-bad-reload")
    jobs = wait_until(lambda: sum(run_jobs(c, cur)) >= 10 and run_jobs(c, cur), 60,
                      "10 messages after the failed reload")
    assert sum(jobs) == 10 and max(jobs) <= 5, f"old batch_size=5 not kept: {jobs}"
    configure(c)
    c.run(["systemctl", "reload", UNIT])


def test_watchdog_kills_and_restarts_a_stopped_daemon(booted):
    c = booted
    pid = c.show(UNIT, "MainPID")
    restarts = int(c.show(UNIT, "NRestarts"))
    watchdog = c.show(UNIT, "WatchdogUSec")
    assert watchdog == "4s", f"the test drop-in's WatchdogSec=4s is not in force: {watchdog}"
    cur = c.cursor()
    c.sh(f"kill -STOP {pid}")
    stopped = time.monotonic()
    wait_until(lambda: "Watchdog timeout" in c.journal("-u", UNIT, after=cur), 30,
               "systemd's watchdog timeout")
    detected_s = time.monotonic() - stopped
    wait_until(lambda: c.show(UNIT, "ActiveState") == "active"
               and c.show(UNIT, "MainPID") not in ("0", pid), 60, "the restarted daemon")
    back_s = time.monotonic() - stopped
    assert int(c.show(UNIT, "NRestarts")) == restarts + 1
    print(f"\nsystem: watchdog ({watchdog}) noticed after {detected_s:.1f} s, "
          f"active again after {back_s:.1f} s")
    assert detected_s <= 4 + 2, "not within WatchdogSec=4s (+2 s slack)"


def test_wrong_api_key_opens_circuit_unit_stays_active(booted):
    c = booted
    configure(c, key="rpa_WRONG_" + "x" * 20)
    cur = c.cursor()
    c.run(["systemctl", "restart", UNIT])
    restarts = int(c.show(UNIT, "NRestarts"))
    send(c, 3, "wrong-key")
    wait_until(lambda: daemon_lines(c, "circuit_open", cur, "-p", "err"), 30,
               "circuit_open at priority err")
    assert run_jobs(c, cur, "401"), "the emulator saw no 401"
    assert c.show(UNIT, "ActiveState") == "active"
    assert int(c.show(UNIT, "NRestarts")) == restarts
    assert not run_jobs(c, cur), "accepted with a wrong key"
    configure(c)
    cur = c.cursor()
    c.run(["systemctl", "restart", UNIT])
    wait_until(lambda: sum(run_jobs(c, cur)) >= 3, 60, "the 3 messages with the right key")


def test_stop_drains_in_flight_and_exits_0(booted):
    c = booted
    # A slow emulator keeps requests in flight while the daemon stops.
    c.write("/etc/systemd/system/runpod-emulator.service.d/slow.conf",
            "[Service]\nExecStart=\nExecStart=/usr/bin/python3 /opt/pgmqd-test/runpod_emulator.py "
            f"--host 127.0.0.1 --port 8000 --endpoint {ENDPOINT} --api-key-file "
            "/opt/pgmqd-test/emulator_key --latency-ms 3000\n")
    c.run(["systemctl", "daemon-reload"])
    c.run(["systemctl", "restart", "runpod-emulator"])
    wait_until(lambda: "listening" in c.journal("-u", "runpod-emulator", "-n", "3"), 30,
               "the slow emulator")
    try:
        send(c, 20, "drain")
        # Read (read_ct 1, invisible) but still in the queue: in flight.
        wait_until(lambda: sql_value(c, f"SELECT count(*) FROM pgmq.q_{QUEUE} "
                                        "WHERE read_ct > 0 AND message->>'tag' = 'drain'") != "0", 30, "messages in flight")
        cur = c.cursor()
        c.run(["systemctl", "stop", UNIT])
        assert c.show(UNIT, "Result") == "success"
        assert c.show(UNIT, "ExecMainStatus") == "0"
        stopping = daemon_lines(c, "stopping", cur)
        assert stopping and not re.search(r"in_flight=0\b", stopping[0]), stopping
        exiting = daemon_lines(c, "exiting", cur)
        assert exiting and "exit_code=0" in exiting[0], exiting
        assert "messages_released=0" in exiting[0], exiting
    finally:
        c.run(["rm", "-rf", "/etc/systemd/system/runpod-emulator.service.d"])
        c.run(["systemctl", "daemon-reload"])
        c.run(["systemctl", "restart", "runpod-emulator"])


def test_security_exposure_at_most_1_5(booted):
    c = booted
    out = c.run(["systemd-analyze", "security", "--no-pager", UNIT], check=False).stdout
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
    assert m, out[-2000:]
    print(f"\nsystem: systemd-analyze security in the booted root: {m.group(1)}")
    assert float(m.group(1)) <= 1.5


def test_enabled_unit_boot_to_ready(booted):
    """Enabled, the unit comes up with the system: the time from systemd's
    start in the container to the unit's READY=1 (active)."""
    c = booted
    c.run(["systemctl", "enable", UNIT])
    assert c.poweroff() == 0
    boot_s = c.boot()
    wait_until(lambda: c.show(UNIT, "ActiveState") == "active", 60, "the unit after boot")
    wall_s = time.monotonic() - c.boot_started
    userspace = int(c.run(["systemctl", "show", "-P", "UserspaceTimestampMonotonic"]).stdout)
    active = int(c.show(UNIT, "ActiveEnterTimestampMonotonic"))
    ready_s = (active - userspace) / 1e6
    print(f"\nsystem: boot to READY=1: {ready_s:.2f} s after PID 1 started "
          f"({wall_s:.1f} s from launching systemd-nspawn; boot finished after {boot_s:.1f} s)")
    assert 0 < ready_s < 60
    assert c.show(UNIT, "NRestarts") == "0"


def test_secrets_never_in_journal(booted):
    c = booted
    # Read from outside, every field of every entry, binary-safe.
    out = subprocess.run(["journalctl", "-D", str(c.root / "var/log/journal"), "-o", "export",
                          "--no-pager"], capture_output=True, check=True).stdout
    assert b"event=started" in out and b"event=circuit_open" in out, \
        "not the journal the tests wrote"
    assert API_KEY.encode() not in out
    assert DB_PASSWORD.encode() not in out
