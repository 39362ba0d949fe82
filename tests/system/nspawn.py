"""A Debian 12 root booted with systemd as PID 1 under systemd-nspawn.

Owns one container: boots it with ``systemd-nspawn -b --register=no
--private-network`` (its own loopback only; no bridge, no host network),
runs commands inside it with ``nsenter`` into the container's namespaces
(``systemd-run -M`` needs a registered machine), and reads its persistent
journal from outside with ``journalctl -D``. Knows nothing of
pgmq-dispatcher: the tests put files into the root and ask systemd.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def wait_until(cond, timeout_s: float, what: str, interval_s: float = 0.2):
    """Polls cond() until it returns a true value (returned) or timeout_s passes
    (AssertionError naming what)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


class Container:
    """A booted root at ``root``; console output goes to ``console_log``."""

    def __init__(self, root: Path, console_log: Path):
        self.root = root
        self.console_log = console_log
        self.proc: subprocess.Popen | None = None
        self.leader = 0
        self.boot_started = 0.0

    # -- lifetime -------------------------------------------------------
    def boot(self, timeout_s: float = 120.0) -> float:
        """Boots the root and waits until systemd finished starting up
        (is-system-running says running or degraded). Returns the seconds
        from launching systemd-nspawn to that point."""
        self.boot_started = time.monotonic()
        log = open(self.console_log, "ab")
        self.proc = subprocess.Popen(
            # --keep-unit: no scope from a host systemd, which need not run.
            ["systemd-nspawn", "-q", "-b", "--register=no", "--keep-unit", "--private-network",
             "--link-journal=no", "--console=read-only", "--kill-signal=SIGRTMIN+3",
             "-D", str(self.root)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        log.close()
        self.leader = wait_until(self._find_leader, 60, "the container's PID 1")
        state = wait_until(self._system_state, timeout_s, "systemd to finish booting", 0.5)
        assert state in ("running", "degraded"), f"system state {state}"
        return time.monotonic() - self.boot_started

    def _find_leader(self) -> int:
        """The container's init: the first descendant of systemd-nspawn whose
        command is systemd (or init), found through /proc."""
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"systemd-nspawn exited; see {self.console_log}")
        todo = [self.proc.pid]
        while todo:
            pid = todo.pop()
            try:
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                try:
                    comm = Path(f"/proc/{child}/comm").read_text().strip()
                except OSError:
                    continue
                if comm in ("systemd", "init"):
                    return child
                todo.append(child)
        return 0

    def _system_state(self) -> str:
        r = self.run(["systemctl", "is-system-running"], check=False)
        state = r.stdout.strip()
        return state if state not in ("", "initializing", "starting", "offline", "unknown") else ""

    def poweroff(self, timeout_s: float = 90.0) -> int:
        """Asks systemd in the container to power off; returns nspawn's exit
        code (kills it after timeout_s)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.run(["systemctl", "--no-block", "poweroff"], check=False)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        rc = self.proc.returncode
        self.proc = None
        self.leader = 0
        return rc

    # -- inside ---------------------------------------------------------
    def run(self, argv: list[str], check: bool = True, timeout_s: float = 120.0,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Runs argv inside the container (all its namespaces, root, a clean
        environment); returns the completed process (text)."""
        assert self.leader, "container not booted"
        cmd = ["nsenter", "--target", str(self.leader), "--mount", "--uts", "--ipc",
               "--net", "--pid", "--cgroup", "--root",
               "env", "-i", "-C", "/", f"PATH={PATH}", "LANG=C.UTF-8", "SYSTEMD_PAGER=cat",
               "SYSTEMD_COLORS=0", *argv]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                           input=input)
        if check and r.returncode != 0:
            raise AssertionError(f"{argv} exit {r.returncode}\nstdout: {r.stdout}\n"
                                 f"stderr: {r.stderr}")
        return r

    def sh(self, script: str, check: bool = True, timeout_s: float = 120.0):
        return self.run(["/bin/sh", "-ec", script], check=check, timeout_s=timeout_s)

    def show(self, unit: str, prop: str) -> str:
        return self.run(["systemctl", "show", "-P", prop, unit]).stdout.strip()

    def cursor(self) -> str:
        """A mark for reading only the journal entries that come after it: the
        wall clock in microseconds (shared with the container). Journal
        cursors taken before journald moved to /var/log/journal do not seek
        reliably there, so entries are filtered by __REALTIME_TIMESTAMP."""
        return str(time.time_ns() // 1000)

    def journal(self, *args: str, after: str = "") -> str:
        """journalctl inside the container (extra args such as -u UNIT, -p err),
        one "IDENT[PID]: MESSAGE" line per entry, only entries after a mark."""
        argv = ["journalctl", "--no-pager", "-q", "-o", "json", *args]
        if after:
            argv.append(f"--since=@{int(after) // 1_000_000 - 1}")
        lines = []
        for raw in self.run(argv, check=False).stdout.splitlines():
            try:
                entry = json.loads(raw)
            except ValueError:
                continue
            if after and int(entry.get("__REALTIME_TIMESTAMP", 0)) <= int(after):
                continue
            msg = entry.get("MESSAGE", "")
            if isinstance(msg, list):
                msg = bytes(msg).decode("utf-8", "replace")
            lines.append(f"{entry.get('SYSLOG_IDENTIFIER', '?')}[{entry.get('_PID', '?')}]: "
                         f"{msg}")
        return "\n".join(lines) + ("\n" if lines else "")

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        """Writes a file into the root from outside."""
        dest = self.root / path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text)
        os.chmod(dest, mode)
