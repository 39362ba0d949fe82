"""Throwaway PostgreSQL clusters for integration tests.

    from pgcluster import PgCluster

    with PgCluster() as pg:                 # initdb + start on a free 127.0.0.1 port
        pg.createdb("app")
        pg.load_sql("tests/fixtures/pgmq.sql", "app")
        conn = pg.connect("app")            # psycopg2, autocommit
        daemon_conninfo = pg.conninfo_for(dbname="app")

Everything lives in one temporary directory (data directory, Unix socket, server log) that is
removed when the cluster is closed: by the context manager, by close(), at interpreter exit
(atexit), or on SIGTERM. PostgreSQL refuses to run as root, so when the tests run as root the
server binaries are run as the ``postgres`` user through runuser(1).

Only the standard library and psycopg2 are used. Waits are condition polls with deadlines.
"""

import atexit
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

__all__ = ["PgCluster", "PgClusterError", "DEFAULT_BINDIR", "wait_until"]

DEFAULT_BINDIR = "/usr/lib/postgresql/15/bin"
SUPERUSER = "postgres"
AUTH_METHODS = ("trust", "md5", "scram")

# Client-side PG* variables would silently change where psql and pg_ctl connect or what
# options they send; the helpers always say exactly what they mean instead.
_PG_ENV_BLOCKLIST = (
    "PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGPASSWORD", "PGPASSFILE",
    "PGSERVICE", "PGSERVICEFILE", "PGOPTIONS", "PGSSLMODE", "PGDATA", "PGTZ", "PGCONNECT_TIMEOUT",
    "PGTARGETSESSIONATTRS", "PGAPPNAME", "PGCLIENTENCODING",
)


class PgClusterError(RuntimeError):
    """A cluster operation failed; the message includes the tail of the server log."""


def wait_until(predicate, timeout, interval=0.02, what="condition"):
    """Poll ``predicate()`` until it returns a truthy value or ``timeout`` seconds pass.

    Returns the truthy value. Raises TimeoutError naming ``what`` on expiry. Tests should wait
    on observable conditions like this rather than sleep a fixed time.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _free_port():
    """A TCP port on 127.0.0.1 that is free right now (the kernel picks it for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env():
    env = {k: v for k, v in os.environ.items() if k not in _PG_ENV_BLOCKLIST}
    # English, untranslated messages from the client tools.
    env["LC_ALL"] = "C"
    env.pop("LANGUAGE", None)
    return env


# Clusters not closed yet; the atexit and SIGTERM hooks close them. Strong references on
# purpose: a cluster object that the caller dropped must still be stopped.
_live_clusters = set()
_hooks_lock = threading.Lock()
_hooks_installed = False


def _cleanup_all():
    for cluster in list(_live_clusters):
        try:
            cluster.close()
        except Exception:  # noqa: BLE001 - best effort at exit, keep cleaning the others
            pass


def _on_sigterm(signum, frame):
    # Stop the clusters, then die from SIGTERM as the process would have without us.
    _cleanup_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_hooks():
    global _hooks_installed
    with _hooks_lock:
        if _hooks_installed:
            return
        _hooks_installed = True
        # atexit covers normal exit and uncaught exceptions. A plain SIGTERM would skip atexit
        # and leave a postmaster behind, so take it over only if nobody else handles it
        # (signal handlers can only be installed from the main thread).
        atexit.register(_cleanup_all)
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL):
            signal.signal(signal.SIGTERM, _on_sigterm)


class PgCluster:
    """A private PostgreSQL cluster in a temporary directory.

    auth:       'trust' (default), 'md5' or 'scram'. Applies to TCP connections from 127.0.0.1;
                the Unix socket (used by this class for its own work) is always trusted.
    bindir:     directory with initdb, pg_ctl, psql (default: PostgreSQL 15 on Debian).
    settings:   extra postgresql.conf settings, e.g. {"log_min_messages": "debug1"}.
    superuser_password: with password auth, also give ``postgres`` this password so that
                ``conninfo_for(password=...)`` works for the superuser over TCP.
    """

    def __init__(self, auth="trust", bindir=DEFAULT_BINDIR, settings=None,
                 superuser_password=None, start_timeout=60):
        if auth not in AUTH_METHODS:
            raise ValueError(f"auth must be one of {AUTH_METHODS}, got {auth!r}")
        self.auth = auth
        self.bindir = bindir
        self.settings = dict(settings or {})
        self.superuser_password = superuser_password
        self.start_timeout = start_timeout
        self.host = "127.0.0.1"
        self.port = None
        self.basedir = None
        self.datadir = None
        self.socket_dir = None
        self.logfile = None
        self._running = False
        # PostgreSQL will not run as root: run the server tools as the postgres user.
        self._as_postgres = os.geteuid() == 0

    # ----------------------------------------------------------------------------- lifecycle

    def start(self):
        """Create the cluster on first use, then start the server and wait until it accepts
        connections. Returns self. Restarts keep the data directory and the port."""
        if self._running:
            return self
        _install_hooks()
        if self.basedir is None:
            self._init()
        _live_clusters.add(self)
        # Another process may grab the port between _free_port() and the bind; on the first
        # start a bind failure is retried on a fresh port. A restart must keep its port.
        attempts = 3 if self.port is None else 1
        if self.port is None:
            self.port = _free_port()
        for attempt in range(attempts):
            try:
                self._pg_ctl_start()
                break
            except PgClusterError:
                if attempt + 1 == attempts or "could not bind" not in self.read_log():
                    raise
                self.port = _free_port()
        self._running = True
        if self.superuser_password is not None and self.auth != "trust":
            self.set_password(SUPERUSER, self.superuser_password)
        return self

    def stop(self, mode="fast"):
        """Stop the server (mode: 'smart', 'fast' or 'immediate'); keeps the data directory."""
        # postmaster.pid also catches a server whose start() failed after pg_ctl launched it.
        if not self._running and self._postmaster_pid() is None:
            return
        result = self._run_tool(["pg_ctl", "stop", "-D", self.datadir, "-m", mode, "-w",
                                 "-t", str(self.start_timeout)], check=False)
        if result.returncode != 0 and mode != "immediate":
            # A stuck backend must not keep the cluster alive past the test run.
            result = self._run_tool(["pg_ctl", "stop", "-D", self.datadir, "-m", "immediate",
                                     "-w", "-t", str(self.start_timeout)], check=False)
        if result.returncode != 0 and self._postmaster_pid() is not None:
            raise PgClusterError(self._describe("pg_ctl stop failed", result))
        self._running = False

    def restart(self, mode="fast"):
        """Stop with ``mode`` and start again on the same port. Returns self."""
        self.stop(mode)
        return self.start()

    def close(self):
        """Stop the server and remove the temporary directory. Safe to call more than once."""
        try:
            self.stop("fast")
        finally:
            _live_clusters.discard(self)
            if self.basedir is not None:
                shutil.rmtree(self.basedir, ignore_errors=True)
                self.basedir = None

    def __enter__(self):
        return self.start()

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return False

    @property
    def is_running(self):
        return self._running

    # ---------------------------------------------------------------------- connection info

    @property
    def conninfo(self):
        """Keyword/value conninfo of the superuser over TCP (no password)."""
        return self.conninfo_for()

    @property
    def dsn(self):
        """Same string as ``conninfo``; psycopg2.connect() and libpq both accept it."""
        return self.conninfo_for()

    def conninfo_for(self, dbname="postgres", user=SUPERUSER, password=None, **extra):
        """Keyword/value conninfo over TCP for any database/user, with a password if given.

        Values are quoted as libpq requires, so passwords with spaces or quotes work.
        """
        params = {"host": self.host, "port": self.port, "user": user, "dbname": dbname}
        if password is not None:
            params["password"] = password
        params.update(extra)
        return " ".join(f"{key}={_quote_conninfo_value(value)}" for key, value in params.items())

    def connect(self, dbname="postgres", user=SUPERUSER, password=None, autocommit=True, **kwargs):
        """A psycopg2 connection (autocommit by default).

        Without a password it goes through the Unix socket, which is trusted whatever ``auth``
        says; with a password it uses TCP, i.e. the configured authentication method.
        """
        if password is None:
            conn = psycopg2.connect(host=self.socket_dir, port=self.port, user=user,
                                    dbname=dbname, **kwargs)
        else:
            conn = psycopg2.connect(host=self.host, port=self.port, user=user, dbname=dbname,
                                    password=password, **kwargs)
        conn.autocommit = autocommit
        return conn

    # --------------------------------------------------------------------------- admin helpers

    def createdb(self, name, template="template1"):
        """CREATE DATABASE ``name``; returns the name."""
        with self._admin() as conn, conn.cursor() as cur:
            cur.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)))
        return name

    def dropdb(self, name):
        """DROP DATABASE IF EXISTS ``name``, disconnecting its sessions first."""
        with self._admin() as conn, conn.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))

    def load_sql(self, path, dbname="postgres"):
        """Run an SQL file with psql -v ON_ERROR_STOP=1 (the whole file must succeed).

        Returns psql's stdout. Raises PgClusterError with psql's stderr on failure.
        """
        result = subprocess.run(
            [os.path.join(self.bindir, "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
             "-h", self.socket_dir, "-p", str(self.port), "-U", SUPERUSER, "-d", dbname,
             "-f", os.fspath(path)],
            env=_clean_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
            check=False)
        if result.returncode != 0:
            raise PgClusterError(f"psql -f {path} on {dbname} failed "
                                 f"(exit {result.returncode}):\n{result.stderr.strip()}")
        return result.stdout

    def set_password(self, user, password):
        """Create login role ``user`` if needed and set its password.

        The password is hashed client-side (libpq's PQencryptPasswordConn, using the server's
        password_encryption), so the clear text is never sent in a statement and cannot show
        up in the server log even with log_statement=all.
        """
        with self._admin() as conn, conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (user,))
            if cur.fetchone() is None:
                cur.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(user)))
            verifier = psycopg2.extensions.encrypt_password(password, user, conn)
            cur.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                sql.Identifier(user), sql.Literal(verifier)))

    def read_log(self):
        """The server log so far ('' before the first start)."""
        if self.logfile is None or not os.path.exists(self.logfile):
            return ""
        with open(self.logfile, encoding="utf-8", errors="replace") as f:
            return f.read()

    # ------------------------------------------------------------------------------ internals

    def _init(self):
        self.basedir = tempfile.mkdtemp(prefix="pgcluster-")
        self.datadir = os.path.join(self.basedir, "data")
        self.socket_dir = os.path.join(self.basedir, "sock")
        self.logfile = os.path.join(self.basedir, "postgresql.log")
        os.mkdir(self.socket_dir)
        # Readable by others so that a daemon under test running as another user can reach
        # the socket and the log can be inspected; the data directory itself stays 0700.
        os.chmod(self.basedir, 0o755)
        os.chmod(self.socket_dir, 0o755)
        if self._as_postgres:
            pw = pwd.getpwnam(SUPERUSER)
            for path in (self.basedir, self.socket_dir):
                os.chown(path, pw.pw_uid, pw.pw_gid)

        # -U postgres: the superuser is called postgres even when not run as the postgres user.
        # --no-locale + UTF8: byte-order collation, English messages, any character in jsonb.
        self._run_tool(["initdb", "-D", self.datadir, "-U", SUPERUSER, "--no-locale",
                        "--encoding=UTF8", "--auth=trust", "--no-sync"])

        conf = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": self.socket_dir,
            "max_connections": "100",
            # Durability is irrelevant for a throwaway cluster; speed is not.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "timezone": "UTC",
            "lc_messages": "C",
            "logging_collector": "off",
            "log_line_prefix": "%m [%p] %q%u@%d ",
            "password_encryption": "md5" if self.auth == "md5" else "scram-sha-256",
        }
        conf.update(self.settings)
        with open(os.path.join(self.datadir, "postgresql.conf"), "a", encoding="utf-8") as f:
            f.write("\n# pgcluster.py\n")
            for key, value in conf.items():
                f.write(f"{key} = {_quote_conf_value(value)}\n")

        method = {"trust": "trust", "md5": "md5", "scram": "scram-sha-256"}[self.auth]
        with open(os.path.join(self.datadir, "pg_hba.conf"), "w", encoding="utf-8") as f:
            f.write("# pgcluster.py: the socket is for the test harness, TCP is what clients see\n"
                    "local all all trust\n"
                    f"host  all all 127.0.0.1/32 {method}\n")

    def _pg_ctl_start(self):
        # The port goes on the command line so that restart() and a retried bind need no edit
        # of postgresql.conf.
        result = self._run_tool(["pg_ctl", "start", "-D", self.datadir, "-l", self.logfile,
                                 "-w", "-t", str(self.start_timeout), "-o", f"-p {self.port}"],
                                check=False)
        if result.returncode != 0:
            raise PgClusterError(self._describe("pg_ctl start failed", result))
        # pg_ctl -w already waited for "ready"; confirm that this process can connect.
        wait_until(self._accepts_connections, self.start_timeout,
                   what="PostgreSQL to accept connections")

    def _accepts_connections(self):
        try:
            psycopg2.connect(host=self.socket_dir, port=self.port, user=SUPERUSER,
                             dbname="postgres", connect_timeout=5).close()
            return True
        except psycopg2.OperationalError:
            return False

    def _admin(self):
        return _closing(self.connect("postgres"))

    def _postmaster_pid(self):
        if self.datadir is None:
            return None
        try:
            with open(os.path.join(self.datadir, "postmaster.pid"), encoding="ascii") as f:
                return int(f.readline())
        except (OSError, ValueError):
            return None

    def _run_tool(self, argv, check=True):
        cmd = [os.path.join(self.bindir, argv[0])] + argv[1:]
        if self._as_postgres:
            cmd = ["runuser", "-u", SUPERUSER, "--"] + cmd
        # cwd=basedir: runuser keeps the cwd, which the postgres user may not be able to read.
        result = subprocess.run(cmd, env=_clean_env(), cwd=self.basedir, stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, check=False)
        if check and result.returncode != 0:
            raise PgClusterError(self._describe(f"{argv[0]} failed", result))
        return result

    def _describe(self, what, result):
        log_tail = "\n".join(self.read_log().splitlines()[-20:])
        return (f"{what} (exit {result.returncode})\nstdout: {result.stdout.strip()}\n"
                f"stderr: {result.stderr.strip()}\nserver log (tail):\n{log_tail}")


class _closing:
    """Context manager that closes a psycopg2 connection (psycopg2's own `with conn` only
    ends the transaction)."""

    def __init__(self, conn):
        self.conn = conn

    def __enter__(self):
        return self.conn

    def __exit__(self, *exc):
        self.conn.close()
        return False


def _quote_conninfo_value(value):
    text = str(value)
    if text and all(c not in text for c in " '\\\t\n"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _quote_conf_value(value):
    return "'" + str(value).replace("'", "''") + "'"
