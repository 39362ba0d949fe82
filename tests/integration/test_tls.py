"""TLS as production has it (issue 11 item 7): PostgreSQL with ssl = on and sslmode=verify-full,
RunPod over HTTPS with a private CA (runpod.ca_file), a certificate for another name refused
before anything is sent, plain http:// only to loopback, and HTTPS_PROXY/NO_PROXY through a
local CONNECT proxy. The CAs are made at test time with openssl; all traffic is on 127.0.0.1.
"""

import itertools
import json
import os
import select
import socket
import threading

import pytest

import conftest
from daemon import (API_KEY, ENDPOINT_ID, Daemon, QueueDb, RunPodEmulator, base_env, logfmt,
                    run_once)
from pgcluster import PgCluster
from tlsca import TestCA

PG_NAME = "pg.test"          # the name in PostgreSQL's certificate; reached through hostaddr


def accepted_ids(emu):
    return [j["msg_id"] for r in emu.requests("run") if r.accepted
            for j in json.loads(r.body)["input"]["jobs"]]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A trusted test CA, an unrelated one, and server certificates from the trusted one."""
    d = str(tmp_path_factory.mktemp("pki"))
    ca, other_ca = TestCA(d, "Test CA"), TestCA(d, "Other CA")
    return dict(
        ca=ca.cert, other_ca=other_ca.cert,
        local=ca.issue("local", dns=["localhost"], ips=["127.0.0.1"]),
        elsewhere=ca.issue("elsewhere", dns=["runpod.invalid"]),
        pg=ca.issue("pg", dns=[PG_NAME]),
        dir=d)


@pytest.fixture
def tls_emulator(pki):
    """The emulator serving HTTPS with a certificate for 127.0.0.1 from the test CA."""
    cert, key = pki["local"]
    emu = RunPodEmulator(endpoint_id=ENDPOINT_ID, api_key=API_KEY, in_queue_s=0.2, run_s=0.2,
                         tls_cert=cert, tls_key=key)
    emu.start()
    try:
        yield emu
    finally:
        emu.stop()


# ------------------------------------------------------------------------- RunPod over HTTPS

def test_https_with_ca_file_dispatches(queue_db, tls_emulator, start_daemon, pki):
    assert tls_emulator.base_url.startswith("https://127.0.0.1:")
    ids = queue_db.send_many([{"document_id": f"d{i}"} for i in range(3)])
    d = start_daemon("-v", emu=tls_emulator, PGMQD_RUNPOD_CA_FILE=pki["ca"])
    tls_emulator.wait_for(lambda: sorted(accepted_ids(tls_emulator)) == ids, timeout_s=15)
    assert tls_emulator.tls_handshake_failures == 0
    assert d.stop() == 0


def test_without_ca_file_the_system_store_refuses_the_test_ca(queue_db, tls_emulator,
                                                              start_daemon):
    """The default is the system store, which does not know the test CA: nothing is sent."""
    queue_db.send_many([{"document_id": "x"}])
    d = start_daemon("-v", emu=tls_emulator, PGMQD_QUEUE_VT_SECONDS=600)
    line = d.wait_log(r"event=batch_rejected .*request_sent=no", timeout_s=30)[0].string
    assert "certificate" in line.lower(), line
    assert tls_emulator.requests() == []
    # The server's side of the failed handshake may be counted after the daemon logged it.
    tls_emulator.wait_for(lambda: tls_emulator.tls_handshake_failures >= 1, timeout_s=10)
    d.stop()


def test_certificate_for_another_name_is_refused_before_anything_is_sent(queue_db, pki,
                                                                         start_daemon):
    cert, key = pki["elsewhere"]          # signed by the trusted CA, but for runpod.invalid
    emu = RunPodEmulator(endpoint_id=ENDPOINT_ID, api_key=API_KEY, tls_cert=cert, tls_key=key)
    emu.start()
    try:
        ids = queue_db.send_many([{"document_id": "a"}, {"document_id": "b"}])
        d = start_daemon("-v", emu=emu, PGMQD_RUNPOD_CA_FILE=pki["ca"],
                         PGMQD_QUEUE_VT_SECONDS=600, PGMQD_RUNPOD_BACKOFF_BASE_MS=100,
                         PGMQD_RUNPOD_BACKOFF_MAX_MS=200)
        line = d.wait_log(r"event=batch_rejected .*request_sent=no", timeout_s=15)[0].string
        fields = logfmt(line)
        assert "no alternative certificate subject name matches" in fields["error"], line
        # Released: set_vt makes them visible after the short backoff instead of the 600 s vt
        # of the read, so they are read (and refused) again.
        d.wait_log(r"event=batch_rejected .*request_sent=no", timeout_s=15, count=2)
        rows = queue_db.rows()
        assert sorted(rows) == ids and all(r["read_ct"] >= 2 for r in rows.values()), rows
        assert emu.requests() == [], "a request reached a server with the wrong name"
        assert fields.get("request_sent") == "no" and fields.get("curl_code") == "60", line
        d.stop()
    finally:
        emu.stop()


@pytest.mark.parametrize("url,ok", [
    ("http://runpod.example/v2", False),
    ("http://10.0.0.1:8000/v2", False),
    ("http://user@api.runpod.ai/v2", False),
    ("http://127.0.0.1.example/v2", False),
    ("http://127.0.0.1:8000/v2", True),
    ("http://localhost:8000/v2", True),
    ("http://[::1]:8000/v2", True),
    ("https://runpod.example/v2", True),
])
def test_plain_http_only_to_loopback(queue_db, url, ok):
    env = base_env(queue_db, None, PGMQD_RUNPOD_BASE_URL=url)
    rc, lines = run_once(env, "--check-config")
    if ok:
        assert rc == 0, lines
    else:
        assert rc == 78, lines
        errors = [line for line in lines if "runpod.base_url" in line]
        assert len(errors) == 1 and "loopback" in errors[0], lines


@pytest.mark.parametrize("value,problem", [("/nonexistent/ca.pem", "no such file"),
                                           ("relative.pem", "absolute"),
                                           ("/", "not a regular file")])
def test_bad_ca_file_is_refused_at_load(queue_db, value, problem):
    rc, lines = run_once(base_env(queue_db, None, PGMQD_RUNPOD_CA_FILE=value), "--check-config")
    assert rc == 78, lines
    errors = [line for line in lines if "runpod.ca_file" in line]
    assert len(errors) == 1 and problem in errors[0], lines


# -------------------------------------------------------------------------- proxies

class ConnectProxy(threading.Thread):
    """A minimal HTTP CONNECT proxy on 127.0.0.1 that tunnels only to 127.0.0.1 and records
    every CONNECT target."""

    def __init__(self):
        super().__init__(daemon=True)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.targets = []
        self._lock = threading.Lock()

    def run(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def close(self):
        self.sock.close()

    def _serve(self, client):
        with client:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(4096)
                if not chunk:
                    return
                head += chunk
            method, target = head.split(b"\r\n", 1)[0].split(b" ")[:2]
            host, _, port = target.decode().rpartition(":")
            with self._lock:
                self.targets.append(target.decode())
            if method != b"CONNECT" or host != "127.0.0.1":
                client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                return
            with socket.create_connection(("127.0.0.1", int(port))) as upstream:
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                rest = head.split(b"\r\n\r\n", 1)[1]
                if rest:
                    upstream.sendall(rest)
                self._pump(client, upstream)

    @staticmethod
    def _pump(a, b):
        peers = {a: b, b: a}
        while True:
            readable, _, _ = select.select(list(peers), [], [], 30)
            if not readable:
                return
            for s in readable:
                data = s.recv(65536)
                if not data:
                    return
                peers[s].sendall(data)


@pytest.mark.parametrize("no_proxy", ["example.invalid", "127.0.0.1"])
def test_https_proxy_and_no_proxy(queue_db, tls_emulator, start_daemon, pki, no_proxy):
    proxy = ConnectProxy()
    proxy.start()
    try:
        ids = queue_db.send_many([{"document_id": "p1"}, {"document_id": "p2"}])
        # Set both spellings explicitly: nothing from the caller's environment may leak in.
        d = start_daemon("-v", emu=tls_emulator, PGMQD_RUNPOD_CA_FILE=pki["ca"],
                         HTTPS_PROXY=f"http://127.0.0.1:{proxy.port}",
                         https_proxy=f"http://127.0.0.1:{proxy.port}",
                         NO_PROXY=no_proxy, no_proxy=no_proxy)
        tls_emulator.wait_for(lambda: sorted(accepted_ids(tls_emulator)) == ids, timeout_s=15)
        assert d.stop() == 0
        tunnelled = f"127.0.0.1:{tls_emulator.port}"
        if no_proxy == "127.0.0.1":
            assert proxy.targets == []
        else:
            assert proxy.targets and set(proxy.targets) == {tunnelled}, proxy.targets
    finally:
        proxy.close()


# ------------------------------------------------------------------- PostgreSQL with ssl = on

@pytest.fixture(scope="module")
def ssl_cluster(pki):
    """A PostgreSQL 15 cluster with ssl = on, a certificate for pg.test from the test CA, and
    TCP clients allowed only over TLS (hostssl)."""
    cert, key = pki["pg"]
    cluster = PgCluster(settings={"ssl": "on"})
    try:
        cluster._init()
        for src, name in ((cert, "server.crt"), (key, "server.key")):
            dst = os.path.join(cluster.datadir, name)
            with open(src, "rb") as f_in, open(dst, "wb") as f_out:
                f_out.write(f_in.read())
            os.chmod(dst, 0o600)
            if cluster._as_postgres:
                import pwd
                pw = pwd.getpwnam("postgres")
                os.chown(dst, pw.pw_uid, pw.pw_gid)
        with open(os.path.join(cluster.datadir, "pg_hba.conf"), "w", encoding="utf-8") as f:
            f.write("local all all trust\nhostssl all all 127.0.0.1/32 trust\n")
        cluster.start()
        yield cluster
    finally:
        cluster.close()


_db_counter = itertools.count(1)


@pytest.fixture
def ssl_queue_db(ssl_cluster):
    name = f"tls_{next(_db_counter)}"
    ssl_cluster.createdb(name)
    conftest.load_pgmq(ssl_cluster, name)
    db = QueueDb(ssl_cluster, name)
    yield db
    db.close()


def ssl_conninfo(db, host=PG_NAME, rootcert=None, **extra):
    return db.cluster.conninfo_for(db.dbname, sslmode="verify-full", sslrootcert=rootcert,
                                   **extra).replace("host=127.0.0.1",
                                                    f"host={host} hostaddr=127.0.0.1")


def test_postgres_verify_full(ssl_queue_db, emulator, pki):
    db = ssl_queue_db
    ids = db.send_many([{"document_id": f"s{i}"} for i in range(3)])
    env = base_env(db, emulator, PGMQD_DATABASE_CONNINFO=ssl_conninfo(db, rootcert=pki["ca"]))
    d = Daemon(env, args=["-v"]).start()
    try:
        emulator.wait_for(lambda: sorted(accepted_ids(emulator)) == ids, timeout_s=15)
        # The daemon's session is encrypted (hostssl would refuse anything else anyway).
        rows = db.sql("SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
                      "WHERE a.datname = %s AND a.pid <> pg_backend_pid() "
                      "AND a.client_addr IS NOT NULL", (db.dbname,))
        assert rows and all(r[0] for r in rows), rows
    finally:
        assert d.stop() == 0


@pytest.mark.parametrize("case", ["wrong_ca", "wrong_name"])
def test_postgres_wrong_ca_or_name_fails_with_one_clear_line_and_retries(ssl_queue_db, emulator,
                                                                         pki, case):
    db = ssl_queue_db
    db.send_many([{"document_id": "never"}])
    if case == "wrong_ca":
        conninfo, reason = ssl_conninfo(db, rootcert=pki["other_ca"]), "certificate verify failed"
    else:
        conninfo = ssl_conninfo(db, host="other.test", rootcert=pki["ca"])
        reason = f'server certificate for "{PG_NAME}" does not match host name "other.test"'
    env = base_env(db, emulator, PGMQD_DATABASE_CONNINFO=conninfo)
    d = Daemon(env, args=["-v"]).start()
    try:
        # Retried: two more attempts after the first failure, each failing the same way.
        failures = [m.string for m in d.wait_log(r"event=db_connect_failed", timeout_s=30,
                                                 count=3)]
        assert d.proc.poll() is None            # still running, still retrying
        assert emulator.requests() == []
    finally:
        d.stop()
    assert all(reason in logfmt(line)["error"] for line in failures), failures
    # One clear line at the default level (warn); the retries only at debug level.
    warnings = [line for line in failures if logfmt(line).get("level") in ("warn", "warning")]
    assert len(warnings) == 1, failures
    # Each names its attempt; the warning is the first (the next one is due when the error
    # changes or a minute has passed: tests/unit/test_decisions.c db_outage_warn_table).
    assert [int(logfmt(line)["attempt"]) for line in failures] == [1, 2, 3], failures
    assert failures[0] == warnings[0]
