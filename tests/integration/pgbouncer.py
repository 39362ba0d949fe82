"""A throwaway PgBouncer (Debian's package) in front of a PgCluster, for integration tests.

    with PgBouncer(cluster, pool_mode="transaction") as bouncer:   # free 127.0.0.1 port
        conninfo = bouncer.conninfo_for("app")
        bouncer.restart()                                           # same port

Runs as the ``postgres`` user when the tests run as root (PgBouncer refuses root), in a temporary
directory that is removed on close(), at interpreter exit, or with the cluster's SIGTERM hook.
Trust authentication, loopback only, logs to a file (``read_log()``). Waits are condition polls.
"""

import atexit
import os
import pwd
import shutil
import signal
import subprocess
import tempfile

import psycopg2

from pgcluster import _free_port, _quote_conninfo_value, wait_until

BINARY = "/usr/sbin/pgbouncer"
_live = set()


def _cleanup_all():
    for bouncer in list(_live):
        try:
            bouncer.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


atexit.register(_cleanup_all)


class PgBouncer:
    """PgBouncer on 127.0.0.1 forwarding every database to ``cluster``."""

    def __init__(self, cluster, pool_mode="transaction", start_timeout=20):
        self.cluster = cluster
        self.pool_mode = pool_mode
        self.start_timeout = start_timeout
        self.host = "127.0.0.1"
        self.port = None
        self.dir = None
        self.proc = None

    # ----------------------------------------------------------------------------- lifecycle

    def start(self):
        if self.proc is not None and self.proc.poll() is None:
            return self
        if self.dir is None:
            self._init()
        _live.add(self)
        kwargs = {}
        if os.geteuid() == 0:
            kwargs = dict(user="postgres", group="postgres", extra_groups=[])
        self.proc = subprocess.Popen([BINARY, self.ini], cwd=self.dir, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"}, **kwargs)
        wait_until(self._accepts, self.start_timeout, interval=0.05,
                   what=f"PgBouncer on port {self.port}\n{self.read_log()[-2000:]}")
        return self

    def stop(self, sig=signal.SIGTERM):
        """SIGTERM: immediate shutdown; SIGINT: safe shutdown (waits for transactions), as
        Debian's unit stops it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=self.start_timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def restart(self, sig=signal.SIGTERM):
        """Stop with ``sig`` and start again on the same port."""
        self.stop(sig)
        return self.start()

    def close(self):
        try:
            self.stop(signal.SIGTERM)
        finally:
            _live.discard(self)
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)
                self.dir = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()
        return False

    # ------------------------------------------------------------------------------- access

    def conninfo_for(self, dbname, user="postgres"):
        """Keyword/value conninfo through the pooler (no TLS: PgBouncer has none configured)."""
        params = {"host": self.host, "port": self.port, "user": user, "dbname": dbname,
                  "sslmode": "disable"}
        return " ".join(f"{k}={_quote_conninfo_value(v)}" for k, v in params.items())

    def show(self, what):
        """Rows of ``SHOW <what>`` on the admin console, as dicts."""
        conn = psycopg2.connect(host=self.host, port=self.port, user="postgres",
                                dbname="pgbouncer", sslmode="disable")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f"SHOW {what}")
                names = [d.name for d in cur.description]
                return [dict(zip(names, row)) for row in cur.fetchall()]
        finally:
            conn.close()

    def read_log(self):
        try:
            with open(os.path.join(self.dir, "pgbouncer.log"), encoding="utf-8",
                      errors="replace") as f:
                return f.read()
        except (OSError, TypeError):
            return ""

    # ------------------------------------------------------------------------------ internals

    def _init(self):
        self.dir = tempfile.mkdtemp(prefix="pgbouncer-")
        self.port = _free_port()
        self.ini = os.path.join(self.dir, "pgbouncer.ini")
        with open(os.path.join(self.dir, "userlist.txt"), "w", encoding="ascii") as f:
            f.write('"postgres" ""\n')
        with open(self.ini, "w", encoding="ascii") as f:
            f.write(f"""[databases]
* = host={self.cluster.host} port={self.cluster.port}

[pgbouncer]
listen_addr = {self.host}
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.dir}/userlist.txt
admin_users = postgres
pool_mode = {self.pool_mode}
max_client_conn = 200
default_pool_size = 20
logfile = {self.dir}/pgbouncer.log
pidfile = {self.dir}/pgbouncer.pid
""")
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            for name in (self.dir, *(os.path.join(self.dir, n) for n in os.listdir(self.dir))):
                os.chown(name, pw.pw_uid, pw.pw_gid)

    def _accepts(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"pgbouncer exited with {self.proc.returncode}:\n"
                               f"{self.read_log()[-2000:]}")
        try:
            self.show("VERSION")
            return True
        except psycopg2.OperationalError:
            return False
