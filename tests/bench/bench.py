#!/usr/bin/python3
"""Benchmark harness of pgmq-dispatcher (issue 5). Run it with `make bench`.

    /usr/bin/python3 tests/bench/bench.py [--output docs/performance.md] [--only 1,4]

Starts its own PostgreSQL 15 (tests/integration/pgcluster.py), a fast HTTP sink (Debian's nginx,
tests/bench/nginx.conf.in) and, where latency, a rate cap or receive times are needed, the RunPod
emulator (tests/emulator/runpod_emulator.py, in this process). Every figure is measured in the
same run as its reference and printed as a ratio beside the absolutes; the results table goes to
docs/performance.md (or --output) together with the machine and the versions, and to stdout.

BENCH_QUICK=1 shrinks every count and duration to a smoke run of well under a minute (the
figures are then only good for checking that the harness works).

Every process the harness starts (PostgreSQL, nginx, the daemons, pgbench) is stopped when it
ends, also on an exception, Ctrl-C or SIGTERM. The binary is $DISPATCHER_BIN (default
build/pgmq-dispatcher); `make bench` builds one with -O2 in build-bench/ first.

Standard library and psycopg2 only.
"""

import argparse
import datetime
import json
import math
import os
import platform
import random
import resource
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO_ROOT, "tests", "integration"))
sys.path.insert(0, os.path.join(REPO_ROOT, "tests", "emulator"))

from pgcluster import PgCluster, wait_until  # noqa: E402
from runpod_emulator import RunPodEmulator  # noqa: E402

PGMQ_SQL = os.path.join(REPO_ROOT, "tests", "fixtures", "pgmq.sql")
NGINX_TEMPLATE = os.path.join(HERE, "nginx.conf.in")
DEFAULT_BINARY = os.path.join(REPO_ROOT, "build", "pgmq-dispatcher")
DEFAULT_OUTPUT = os.path.join(REPO_ROOT, "docs", "performance.md")
PG_BINDIR = "/usr/lib/postgresql/15/bin"

QUEUE = "bench"
ENDPOINT_ID = "ep-bench"
API_KEY = "rp_BENCHKEY_0123456789abcdef"
CHANNEL = f"pgmq.q_{QUEUE}.INSERT"
MB = 1_000_000  # sizes are reported in decimal megabytes (10^6 bytes)

QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")

# Sizes. The full run keeps `make bench` within 15 minutes on a 2-core machine (about 10 on
# the one of docs/performance.md, build included).
if QUICK:
    SIZES = dict(drain_n=5_000, drain_reps=(1, 1), latency_n=100, latency_gap_s=(0.002, 0.018),
                 runpod_window_s=10.0, runpod_cap=100, idle_s=5.0, memory_n=20_000)
else:
    SIZES = dict(drain_n=100_000, drain_reps=(5, 3), latency_n=2_000, latency_gap_s=(0.002, 0.038),
                 runpod_window_s=30.0, runpod_cap=1000, idle_s=60.0, memory_n=1_000_000)

RUNPOD_LATENCY_S = 0.2
RUNPOD_RATE_WINDOW_S = 10.0
RUNPOD_MAX_IN_FLIGHT = 32      # Little's law: 100 req/s x 0.2 s needs 20 in flight
POLL_ONLY_INTERVAL_MS = 1000
# nginx is not RunPod: the drain of scenario 1 lifts the client-side /run cap (default 1000 per
# 10 s, RunPod's limit), which would otherwise bound a batch-10 drain at 1,000 msg/s. 100,000
# requests/s is far above what the database allows here (checked after each run: fuller reads
# with the ledger off passed 5,000 /run per s, half of the 100,000 per 10 s used before).
SINK_RATE_CAP = 1_000_000
NOTIFY_THROTTLE_MS = 0         # every insert notifies (pgmq's default throttle is 250 ms)
LOAD_CHUNK = 50_000
WORKER_PERIOD_S = 0.05
METRICS_POLL_S = 0.02

# The message every scenario enqueues: shaped like the transcription jobs of the seed project.
MESSAGE_SQL = ("jsonb_build_object('document_id', md5(g::text)::uuid, "
               "'media_url', 'https://media.example.com/audio/' || g || '.m4a', "
               "'language', 'en', 'seq', g)")


def log(msg):
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


T0 = time.monotonic()


# ------------------------------------------------------------------------------ processes

class Children:
    """Every process the harness starts; stop_all() ends them, newest first.

    Children run in their own session, so a Ctrl-C in the terminal reaches only the harness,
    which then stops them in order. Where util-linux's setpriv is available they also get
    PR_SET_PDEATHSIG=SIGTERM, so that even a SIGKILLed harness does not leave them behind.
    """

    def __init__(self):
        self.procs = []
        self.setpriv = shutil.which("setpriv")

    def spawn(self, argv, **kwargs):
        if self.setpriv:
            argv = [self.setpriv, "--pdeathsig", "TERM", "--"] + list(argv)
        proc = subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL, **kwargs)
        self.procs.append(proc)
        return proc

    @staticmethod
    def stop(proc, sig=signal.SIGTERM, timeout=20.0):
        if proc.poll() is None:
            try:
                proc.send_signal(sig)
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def stop_all(self):
        for proc in reversed(self.procs):
            try:
                self.stop(proc, timeout=10.0)
            except Exception as exc:  # noqa: BLE001 - keep stopping the others
                log(f"could not stop pid {proc.pid}: {exc}")
        self.procs.clear()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class NginxSink:
    """nginx answering every POST .../run with {"id":"bench-<request id>","status":"IN_QUEUE"}."""

    def __init__(self, children, workdir):
        self.children = children
        self.prefix = os.path.join(workdir, "nginx")
        os.makedirs(self.prefix)
        # The workers run as nobody when nginx is started as root.
        os.chmod(self.prefix, 0o755)
        self.port = None
        self.proc = None

    def start(self):
        with open(NGINX_TEMPLATE, encoding="utf-8") as f:
            template = f.read()
        for _ in range(3):  # another process may take the free port before nginx binds it
            self.port = free_port()
            conf = os.path.join(self.prefix, "nginx.conf")
            with open(conf, "w", encoding="utf-8") as f:
                f.write(template.replace("@PREFIX@", self.prefix).replace("@PORT@", str(self.port)))
            errlog = os.path.join(self.prefix, "error.log")
            self.proc = self.children.spawn(["nginx", "-p", self.prefix, "-c", conf, "-e", errlog],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_until(lambda: port_open(self.port) or self.proc.poll() is not None, 10,
                           what="nginx to listen")
            except TimeoutError:
                pass
            if self.proc.poll() is None and port_open(self.port):
                return self
            Children.stop(self.proc)
        raise RuntimeError("nginx did not start:\n" + self.error_log())

    def error_log(self):
        try:
            with open(os.path.join(self.prefix, "error.log"), encoding="utf-8") as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.port}/v2"

    def stop(self):
        if self.proc is not None:
            Children.stop(self.proc)  # SIGTERM: fast shutdown of master and worker


def proc_sample(pid):
    """CPU seconds (utime + stime of all threads), memory and context switches of a process."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    sample = {"cpu_s": (int(fields[11]) + int(fields[12])) / ticks}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                sample[key] = int(value.split()[0]) * 1024
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
            for line in f:
                if line.startswith("Pss:"):
                    sample["Pss"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    # Context switches are counted per thread: sum them over the threads that exist now.
    vol = nonvol = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        vol += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches:"):
                        nonvol += int(line.split()[1])
        except FileNotFoundError:
            pass
    sample["ctxt_vol"], sample["ctxt_nonvol"] = vol, nonvol
    return sample


def tree_cpu(root_pid):
    """CPU seconds used so far by a process and its children: its own utime + stime, the
    children it has reaped (cutime + cstime) and those still alive. Used on the postmaster
    (backends come and go) and on the nginx master."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(pid) == root_pid:
            total += sum(int(x) for x in fields[11:15])
        elif int(fields[1]) == root_pid:
            total += int(fields[11]) + int(fields[12])
    return total / ticks


class Daemon:
    """One pgmq-dispatcher, configured purely through its environment (as in a container)."""

    def __init__(self, ctx, name, conninfo, base_url, **settings):
        self.ctx = ctx
        self.name = name
        self.log_path = os.path.join(ctx.workdir, f"daemon-{name}.log")
        self.env = {
            "PATH": "/usr/bin:/bin",
            "PGMQD_DATABASE_CONNINFO": conninfo,
            "PGMQD_QUEUE_NAME": QUEUE,
            "PGMQD_RUNPOD_BASE_URL": base_url,
            "RUNPOD_ENDPOINT_ID": ENDPOINT_ID,
            "RUNPOD_API_KEY": API_KEY,
            "PGMQD_ADMIN_LISTEN": "127.0.0.1:0",
        }
        for key, value in settings.items():
            self.env["PGMQD_" + key.upper()] = str(value)
        self.proc = None
        self.port = None
        self.spawned_at = None
        self.args = []

    def start(self):
        logf = open(self.log_path, "wb")  # noqa: SIM115 - the child keeps it
        try:
            self.spawned_at = time.monotonic()
            self.spawned_wall = time.time()
            self.proc = self.ctx.children.spawn([self.ctx.binary, *self.args], env=self.env,
                                                stdout=logf,
                                                stderr=subprocess.STDOUT)
        finally:
            logf.close()
        self.port = int(wait_until(self._admin_port, 15, what=f"daemon {self.name} to start"))
        return self

    def _admin_port(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"daemon {self.name} exited with {self.proc.returncode}:\n"
                               + self.log_tail())
        m = re.search(r"event=started .*admin_port=(\d+)", self.log_text())
        return m and m.group(1)

    def log_text(self):
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def last_event_time(self, event):
        """Wall-clock time (epoch seconds, ms resolution) of the last log line of `event`."""
        last = None
        for line in self.log_text().splitlines():
            if f" event={event} " in line:
                last = line
        if last is None:
            raise RuntimeError(f"daemon {self.name} logged no {event}")
        stamp = re.match(r"time=(\S+)", last).group(1).replace("Z", "+00:00")
        return datetime.datetime.fromisoformat(stamp).timestamp()

    def log_tail(self, n=30):
        return "\n".join(self.log_text().splitlines()[-n:])

    def metrics(self):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def counter(self, name, metrics=None):
        """Sum of every series of pgmqd_<name> (all label values)."""
        metrics = metrics if metrics is not None else self.metrics()
        full = "pgmqd_" + name
        return sum(v for k, v in metrics.items() if k == full or k.startswith(full + "{"))

    def wait_counter(self, name, at_least, timeout, interval=METRICS_POLL_S):
        def reached():
            self._check_alive()
            return self.counter(name) >= at_least
        wait_until(reached, timeout, interval, what=f"{name} >= {at_least} in daemon {self.name}")
        return time.monotonic()

    def _check_alive(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"daemon {self.name} exited with {self.proc.returncode}:\n"
                               + self.log_tail())

    def sample(self):
        return proc_sample(self.proc.pid)

    def stop(self):
        if self.proc is None:
            return None
        rc = Children.stop(self.proc, timeout=30.0)
        if rc not in (0, -signal.SIGTERM):
            raise RuntimeError(f"daemon {self.name} exited with {rc}:\n" + self.log_tail())
        return rc


# ------------------------------------------------------------------------------ database

class Context:
    def __init__(self, workdir, binary):
        self.workdir = workdir
        self.binary = binary
        self.children = Children()
        self.cluster = None
        self.nginx = None
        self.emulators = []
        self.db_counter = 0

    def new_db(self, notify_throttle_ms=None):
        """A fresh database with the PGMQ fixture and the empty queue 'bench'; with
        notify_throttle_ms the insert NOTIFY trigger is enabled. Returns (name, conn)."""
        self.db_counter += 1
        name = f"bench_{self.db_counter}"
        self.cluster.createdb(name)
        self.cluster.load_sql(PGMQ_SQL, name)
        conn = self.cluster.connect(name)
        with conn.cursor() as cur:
            cur.execute("SELECT pgmq.create(%s)", (QUEUE,))
            if notify_throttle_ms is not None:
                cur.execute("SELECT pgmq.enable_notify_insert(%s, %s)", (QUEUE, notify_throttle_ms))
        return name, conn

    def conninfo(self, db):
        return self.cluster.conninfo_for(dbname=db)

    def pg_cpu(self):
        with open(os.path.join(self.cluster.datadir, "postmaster.pid"), encoding="ascii") as f:
            return tree_cpu(int(f.readline()))

    def nginx_cpu(self):
        return tree_cpu(self.nginx.proc.pid)

    def emulator(self, **kw):
        emu = RunPodEmulator(endpoint_id=ENDPOINT_ID, api_key=API_KEY, in_queue_s=1.0, run_s=1.0,
                             **kw)
        emu.start()
        self.emulators.append(emu)
        return emu

    def close(self):
        for emu in self.emulators:
            try:
                emu.stop()
            except Exception:  # noqa: BLE001
                pass
        self.children.stop_all()
        if self.cluster is not None:
            self.cluster.close()


def load_queue(conn, n, queue=QUEUE):
    """Enqueues n messages with pgmq.send_batch in chunks, then VACUUM ANALYZE."""
    with conn.cursor() as cur:
        for start in range(1, n + 1, LOAD_CHUNK):
            end = min(n, start + LOAD_CHUNK - 1)
            cur.execute(f"SELECT count(*) FROM pgmq.send_batch(%s, ARRAY(SELECT {MESSAGE_SQL} "
                        f"FROM generate_series(%s::bigint, %s::bigint) g))", (queue, start, end))
        cur.execute(f"VACUUM ANALYZE pgmq.q_{queue}")


def visible_count(conn):
    with conn.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM pgmq.q_{QUEUE} WHERE vt <= clock_timestamp()")
        return cur.fetchone()[0]


class Worker(threading.Thread):
    """Stands in for the RunPod workers: deletes what the reader took (vt pushed > 60 s ahead,
    found through the vt index), every 50 ms on its own connection. Without it every read would
    step over all the invisible rows read before (pgmq keeps them until the worker deletes
    them), and a long drain would measure that instead. The same worker runs beside pgbench."""

    def __init__(self, ctx, db, queue=QUEUE):
        super().__init__(daemon=True, name=f"worker-{db}-{queue}")
        self.queue = queue
        self.conn = ctx.cluster.connect(db)
        self.halt = threading.Event()
        self.deleted = 0
        self.error = None

    def run(self):
        try:
            with self.conn.cursor() as cur:
                while not self.halt.is_set():
                    cur.execute(f"DELETE FROM pgmq.q_{self.queue} "
                                f"WHERE vt > clock_timestamp() + interval '60 seconds'")
                    self.deleted += cur.rowcount
                    self.halt.wait(WORKER_PERIOD_S)
        except Exception as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    def stop(self):
        self.halt.set()
        self.join(timeout=30)
        self.conn.close()
        if self.error is not None:
            raise RuntimeError(f"worker failed: {self.error}")


# ------------------------------------------------------------------------------ scenarios

def pct(values, p):
    """Nearest-rank percentile."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(p / 100.0 * len(ordered)) - 1))
    return ordered[k]


# The reference statement, and the daemon's own read statement (src/pgmq.c READ_SQL), which
# also renders enqueued_at as JSON, extracts document_id and sorts.
READ_ALONE = "SELECT * FROM pgmq.read('{q}'::text, 1800::integer, {b}::integer);"
READ_AS_DAEMON = ("SELECT msg_id, read_ct, to_json(enqueued_at) AS enqueued_at, message, "
                  "message->'document_id' AS document_id "
                  "FROM pgmq.read('{q}'::text, 1800::integer, {b}::integer) ORDER BY msg_id;")


def drain_reference(ctx, n, batch, statement=READ_ALONE):
    """pgmq.read alone: pgbench, 1 client (the daemon reads on one connection), extended
    protocol with unnamed statements (as the daemon's PQsendQueryParams), n / batch reads."""
    db, conn = ctx.new_db()
    load_queue(conn, n)
    script = os.path.join(ctx.workdir, f"read-{db}.sql")
    with open(script, "w", encoding="utf-8") as f:
        f.write(statement.format(q=QUEUE, b=batch) + "\n")
    out_path = os.path.join(ctx.workdir, f"pgbench-{db}.out")
    worker = Worker(ctx, db)
    worker.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    with open(out_path, "wb") as out:
        pg0, self0 = ctx.pg_cpu(), resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        proc = ctx.children.spawn(
            [os.path.join(PG_BINDIR, "pgbench"), "-n", "-M", "extended", "-c", "1", "-j", "1",
             "-t", str(n // batch), "-h", "127.0.0.1", "-p", str(ctx.cluster.port),
             "-U", "postgres", "-f", script, db],
            env=env, stdout=out, stderr=subprocess.STDOUT)
        rc = proc.wait(timeout=900)
        elapsed = time.monotonic() - started
        pg1, self1 = ctx.pg_cpu(), resource.getrusage(resource.RUSAGE_CHILDREN)
    worker.stop()
    with open(out_path, encoding="utf-8", errors="replace") as f:
        output = f.read()
    if rc != 0:
        raise RuntimeError(f"pgbench failed ({rc}):\n{output[-2000:]}")
    left = visible_count(conn)
    conn.close()
    if left:
        raise RuntimeError(f"pgbench left {left} of {n} messages unread")
    tps = float(re.search(r"tps = ([0-9.]+)", output).group(1))
    client = (self1.ru_utime + self1.ru_stime) - (self0.ru_utime + self0.ru_stime)
    return {"msgs_per_s": n / elapsed, "elapsed_s": elapsed, "tps": tps,
            "cpu_us_per_msg": {"PostgreSQL": (pg1 - pg0) / n * 1e6, "pgbench": client / n * 1e6}}


def drain_daemon(ctx, n, batch, **settings):
    db, conn = ctx.new_db()
    load_queue(conn, n)
    worker = Worker(ctx, db)
    worker.start()
    d = Daemon(ctx, f"drain-{db}", ctx.conninfo(db), ctx.nginx.base_url, queue_batch_size=batch,
               runpod_max_requests_per_10s=SINK_RATE_CAP, **settings)
    try:
        pg0, nginx0 = ctx.pg_cpu(), ctx.nginx_cpu()
        d.start()
        # Polled slowly (each scrape costs the daemon a little); the end time comes from the
        # log line of the last accepted batch, to the millisecond.
        d.wait_counter("messages_dispatched_total", n, timeout=900, interval=0.1)
        elapsed = d.last_event_time("batch_accepted") - d.spawned_wall
        cpu = {"daemon": d.sample()["cpu_s"], "PostgreSQL": ctx.pg_cpu() - pg0,
               "nginx": ctx.nginx_cpu() - nginx0}
        m = d.metrics()
    finally:
        d.stop()
        worker.stop()
    conn.close()
    dispatched = d.counter("messages_dispatched_total", m)
    requests = d.counter("runpod_requests_total", m)
    reads = m.get('pgmqd_reads_total{result="rows"}', 0)
    if dispatched != n:
        raise RuntimeError(f"daemon dispatched {dispatched} of {n}")
    if requests / elapsed > 0.5 * SINK_RATE_CAP / 10:
        raise RuntimeError(f"{requests / elapsed:.0f} /run per s: the lifted cap may bind")
    return {"msgs_per_s": n / elapsed, "elapsed_s": elapsed, "requests": requests,
            "rows_per_read": n / reads if reads else 0.0,
            "cpu_us_per_msg": {k: v / n * 1e6 for k, v in cpu.items()}}


def scenario_drain(ctx, results):
    n = SIZES["drain_n"]
    for batch, reps in zip((10, 100), SIZES["drain_reps"]):
        refs, runs, own = [], [], []
        for rep in range(reps):  # interleaved, so that drift hits all sides alike
            refs.append(drain_reference(ctx, n, batch))
            log(f"1. batch {batch} run {rep + 1}/{reps}: pgmq.read alone "
                f"{refs[-1]['msgs_per_s']:,.0f} msg/s")
            own.append(drain_reference(ctx, n, batch, READ_AS_DAEMON))
            log(f"1. batch {batch} run {rep + 1}/{reps}: the daemon's read statement alone "
                f"{own[-1]['msgs_per_s']:,.0f} msg/s")
            runs.append(drain_daemon(ctx, n, batch))
            log(f"1. batch {batch} run {rep + 1}/{reps}: daemon "
                f"{runs[-1]['msgs_per_s']:,.0f} msg/s")
        results[f"drain_{batch}"] = {
            "n": n, "batch": batch,
            "daemon": statistics.median(r["msgs_per_s"] for r in runs),
            "reference": statistics.median(r["msgs_per_s"] for r in refs),
            "daemon_runs": runs, "reference_runs": refs,
            "own_sql": statistics.median(r["msgs_per_s"] for r in own), "own_sql_runs": own,
        }


QUEUE2 = "bench2"


def drain_two_routes(ctx, n, batch):
    """One daemon, two routes (queues bench and bench2, two endpoint ids on the nginx sink),
    n messages queued in each: the aggregate drain rate."""
    db, conn = ctx.new_db()
    with conn.cursor() as cur:
        cur.execute("SELECT pgmq.create(%s)", (QUEUE2,))
    load_queue(conn, n)
    load_queue(conn, n, QUEUE2)
    workers = [Worker(ctx, db), Worker(ctx, db, QUEUE2)]
    for w in workers:
        w.start()
    path = os.path.join(ctx.workdir, f"routes-{db}.conf")
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"[route.one]\nqueue = {QUEUE}\nendpoint_id = {ENDPOINT_ID}\n"
                f"[route.two]\nqueue = {QUEUE2}\nendpoint_id = {ENDPOINT_ID}-two\n")
    d = Daemon(ctx, f"routes-{db}", ctx.conninfo(db), ctx.nginx.base_url, queue_batch_size=batch,
               runpod_max_requests_per_10s=SINK_RATE_CAP)
    d.args = ["-c", path]
    try:
        d.start()
        d.wait_counter("messages_dispatched_total", 2 * n, timeout=900, interval=0.1)
        elapsed = d.last_event_time("batch_accepted") - d.spawned_wall
        m = d.metrics()
    finally:
        d.stop()
        for w in workers:
            w.stop()
    conn.close()
    per_route = [m.get(f'pgmqd_route_messages_dispatched_total{{route="{r}"}}', 0)
                 for r in ("one", "two")]
    if per_route != [n, n]:
        raise RuntimeError(f"routes dispatched {per_route}, expected {n} each")
    return {"msgs_per_s": 2 * n / elapsed, "elapsed_s": elapsed}


def scenario_two_routes(ctx, results):
    n = SIZES["drain_n"] // 2
    one = drain_daemon(ctx, 2 * n, 10)
    log(f"7. one route, {2 * n:,} messages: {one['msgs_per_s']:,.0f} msg/s")
    two = drain_two_routes(ctx, n, 10)
    log(f"7. two routes, {n:,} each: {two['msgs_per_s']:,.0f} msg/s")
    results["two_routes"] = {"n": n, "one": one["msgs_per_s"], "two": two["msgs_per_s"]}


# Scenario 9's in-flight ceiling: RunPod allows 200 concurrent requests per endpoint; 32 is the
# RunPod-like scenario's (3). With queue.read_batches at its default (every free slot) a read
# claims up to 320 messages; with the default max_in_flight of 8, up to 80.
FULLER_MAX_IN_FLIGHT = 32


def scenario_fuller_reads(ctx, results):
    """Batch 10 with fuller reads (queue.read_batches at its default, every free slot: one
    read claims batch_size x the free in-flight slots, sent as bodies of 10), ledger on (the
    default) and off, against single-connection pgmq.read(..., 10) in the same run, and the
    daemon reading one batch per read (queue.read_batches=1) for comparison. Runs alternate."""
    n, reps = SIZES["drain_n"], SIZES["drain_reps"][1]
    refs, on, off, one = [], [], [], []
    fuller = dict(queue_max_in_flight=FULLER_MAX_IN_FLIGHT)
    for rep in range(reps):
        refs.append(drain_reference(ctx, n, 10))
        log(f"9. run {rep + 1}/{reps}: pgmq.read(..., 10) alone: "
            f"{refs[-1]['msgs_per_s']:,.0f} msg/s, PostgreSQL "
            f"{refs[-1]['cpu_us_per_msg']['PostgreSQL']:.0f} us/msg (load {os.getloadavg()[0]:.2f})")
        on.append(drain_daemon(ctx, n, 10, **fuller))
        off.append(drain_daemon(ctx, n, 10, ledger_enabled="off", **fuller))
        for label, r in (("ledger on", on[-1]), ("ledger off", off[-1])):
            log(f"9. run {rep + 1}/{reps}: fuller reads, {label}: {r['msgs_per_s']:,.0f} msg/s, "
                f"PostgreSQL {r['cpu_us_per_msg']['PostgreSQL']:.0f} us/msg, "
                f"{r['rows_per_read']:.0f} rows per read")
    one.append(drain_daemon(ctx, n, 10, queue_read_batches=1, **fuller))
    log(f"9. read_batches 1: {one[-1]['msgs_per_s']:,.0f} msg/s, PostgreSQL "
        f"{one[-1]['cpu_us_per_msg']['PostgreSQL']:.0f} us/msg")
    med = statistics.median
    results["fuller"] = {
        "n": n, "runs": reps, "load": os.getloadavg(),
        "ref": med(r["msgs_per_s"] for r in refs),
        "ref_pg_us": med(r["cpu_us_per_msg"]["PostgreSQL"] for r in refs),
        "on": med(r["msgs_per_s"] for r in on), "off": med(r["msgs_per_s"] for r in off),
        "pg_us_on": med(r["cpu_us_per_msg"]["PostgreSQL"] for r in on),
        "pg_us_off": med(r["cpu_us_per_msg"]["PostgreSQL"] for r in off),
        "rows_per_read": med(r["rows_per_read"] for r in on),
        "one": one[0], "ref_runs": refs, "on_runs": on, "off_runs": off,
    }


def scenario_ledger(ctx, results):
    """The dispatch ledger's cost (issue 12): the same batch-10 drain with ledger.enabled on
    and off, interleaved, and PostgreSQL's CPU per message for each."""
    n, reps = SIZES["drain_n"], SIZES["drain_reps"][0]
    on, off = [], []
    for rep in range(reps):
        off.append(drain_daemon(ctx, n, 10, ledger_enabled="off"))
        log(f"6. run {rep + 1}/{reps}: ledger off {off[-1]['msgs_per_s']:,.0f} msg/s")
        on.append(drain_daemon(ctx, n, 10, ledger_enabled="on"))
        log(f"6. run {rep + 1}/{reps}: ledger on {on[-1]['msgs_per_s']:,.0f} msg/s")
    med = statistics.median
    results["ledger"] = {
        "n": n, "runs": reps,
        "on": med(r["msgs_per_s"] for r in on), "off": med(r["msgs_per_s"] for r in off),
        "pg_us_on": med(r["cpu_us_per_msg"]["PostgreSQL"] for r in on),
        "pg_us_off": med(r["cpu_us_per_msg"]["PostgreSQL"] for r in off),
        "on_runs": on, "off_runs": off,
    }


class Listener(threading.Thread):
    """A bare LISTEN client: the arrival time of every insert notification."""

    def __init__(self, ctx, db):
        super().__init__(daemon=True, name="listener")
        self.conn = ctx.cluster.connect(db)
        with self.conn.cursor() as cur:
            cur.execute(f'LISTEN "{CHANNEL}"')
        self.times = []
        self.halt = threading.Event()

    def run(self):
        while not self.halt.is_set():
            if select.select([self.conn], [], [], 0.2)[0]:
                self.conn.poll()
                now = time.monotonic()
                while self.conn.notifies:
                    # The trigger's notifications have no payload; the daemon's own
                    # self-test NOTIFY on the same channel has one.
                    if self.conn.notifies.pop(0).payload == "":
                        self.times.append(now)

    def stop(self):
        self.halt.set()
        self.join(timeout=5)
        self.conn.close()


def latency_run(ctx, notify, count, seed, debounce_ms=None):
    """count single messages at random intervals; enqueue time is the midpoint of the
    harness's monotonic clock around the autocommit pgmq.send; arrival is the emulator's
    receive time of the POST (same process, same clock)."""
    db, conn = ctx.new_db(notify_throttle_ms=NOTIFY_THROTTLE_MS if notify else None)
    emu = ctx.emulator()
    listener = Listener(ctx, db) if notify else None
    settings = {"queue_notify": "on" if notify else "off",
                "queue_poll_interval_ms": POLL_ONLY_INTERVAL_MS}
    if debounce_ms is not None:
        settings["queue_notify_debounce_ms"] = debounce_ms
    d = Daemon(ctx, f"latency-{'notify' if notify else 'poll'}-{debounce_ms}", ctx.conninfo(db),
               emu.base_url, **settings)
    rng = random.Random(seed)
    sent = []
    try:
        d.start()
        d.wait_counter("reads_total", 1, timeout=15)  # the catch-up read after connecting
        time.sleep(0.5)
        if listener:
            listener.start()
        with conn.cursor() as cur:
            for seq in range(count):
                time.sleep(rng.uniform(*SIZES["latency_gap_s"]))
                body = json.dumps({"document_id": f"lat-{seq}", "seq": seq})
                t0 = time.monotonic()
                cur.execute("SELECT pgmq.send(%s, %s::jsonb)", (QUEUE, body))
                t1 = time.monotonic()
                sent.append((t0, t1))

        def arrivals():
            got = {}
            for rec in emu.requests("run"):
                if rec.accepted:
                    for job in rec.json["input"]["jobs"]:
                        got.setdefault(job["message"]["seq"], rec.received_at)
            return got if len(got) >= count else None
        got = emu.wait_for(arrivals, timeout_s=30, what="every latency message at the sink")
    finally:
        d.stop()
        if listener:
            listener.stop()
        emu.stop()
        conn.close()
    mids = [(t0 + t1) / 2 for t0, t1 in sent]
    lat = [(got[i] - mids[i]) * 1000 for i in range(count)]
    out = {"p50": pct(lat, 50), "p99": pct(lat, 99), "max": max(lat), "n": count,
           "send_rtt_p50": pct([(t1 - t0) * 1000 for t0, t1 in sent], 50),
           "requests": len(emu.requests("run"))}
    if listener:
        if len(listener.times) != count:
            raise RuntimeError(f"bare listener saw {len(listener.times)} notifications for "
                               f"{count} inserts")
        ref = [(listener.times[i] - mids[i]) * 1000 for i in range(count)]
        out["ref"] = {"p50": pct(ref, 50), "p99": pct(ref, 99), "max": max(ref)}
    return out


def config_default(ctx, key):
    """The binary's default for a key, from its --dump-config."""
    env = Daemon(ctx, "dump", "host=127.0.0.1", "http://127.0.0.1:9/v2").env
    out = subprocess.run([ctx.binary, "-T"], env=env, stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, check=True).stdout
    return re.search(rf"^{re.escape(key)}\s*=\s*(\S+)", out, re.M).group(1)


def scenario_latency(ctx, results):
    n = SIZES["latency_n"]
    results["debounce_default"] = config_default(ctx, "queue.notify_debounce_ms")
    results["latency_notify"] = latency_run(ctx, True, n, seed=5)
    r = results["latency_notify"]
    log(f"2. NOTIFY: p50 {r['p50']:.2f} ms, p99 {r['p99']:.2f} ms, max {r['max']:.2f} ms")
    results["latency_poll"] = latency_run(ctx, False, n, seed=5)
    r = results["latency_poll"]
    log(f"2. polling: p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms, max {r['max']:.1f} ms")
    # Where the NOTIFY latency goes: the same run without the debounce.
    results["latency_notify_nodebounce"] = latency_run(ctx, True, n, seed=5, debounce_ms=0)
    r = results["latency_notify_nodebounce"]
    log(f"2. NOTIFY, debounce 0: p50 {r['p50']:.2f} ms, p99 {r['p99']:.2f} ms, "
        f"max {r['max']:.2f} ms")


def scenario_runpod(ctx, results):
    """Emulator with 200 ms per request and a sliding-window cap of `cap` /run per 10 s; the
    queue never runs dry. Counted: /run accepted with a receive time within `window` seconds
    of the first one (at most cap per 10 s are possible), and every 429 of the whole run."""
    window, cap = SIZES["runpod_window_s"], SIZES["runpod_cap"]
    per_s = cap / RUNPOD_RATE_WINDOW_S
    batch = 10
    n = int(per_s * batch * (window + 10) * 1.3)
    db, conn = ctx.new_db()
    load_queue(conn, n)
    worker = Worker(ctx, db)
    worker.start()
    emu = ctx.emulator(latency_s=RUNPOD_LATENCY_S, rate_cap=cap, rate_window_s=RUNPOD_RATE_WINDOW_S)
    d = Daemon(ctx, "runpod", ctx.conninfo(db), emu.base_url, queue_batch_size=batch,
               queue_max_in_flight=RUNPOD_MAX_IN_FLIGHT, runpod_max_requests_per_10s=cap)
    try:
        d.start()
        first = emu.wait_for(lambda: emu.requests("run"), timeout_s=15, what="the first /run")
        t_first = min(r.received_at for r in first)
        while time.monotonic() < t_first + window + RUNPOD_LATENCY_S + 0.3:
            d._check_alive()
            time.sleep(0.1)
    finally:
        d.stop()
        worker.stop()
        emu.stop()
        conn.close()
    runs = emu.requests("run")
    accepted = [r for r in runs if r.accepted and t_first <= r.received_at < t_first + window]
    n429 = sum(1 for r in runs if r.status == 429)
    if visible_count_safe(ctx, db) == 0:
        log("3. warning: the queue ran dry; the rate is a lower bound")
    results["runpod"] = {"achieved": len(accepted) / window, "cap_per_s": per_s,
                         "n429": n429, "requests": len(runs), "window_s": window, "cap": cap,
                         "max_concurrent": emu.max_concurrent_run}
    log(f"3. {len(accepted) / window:.1f} /run per s of {per_s:.0f}, {n429} x 429")


FLEET_REPLICAS = 3
FLEET_VALIDITY_MS = 250  # fleet.validity_ms's default
FLEET_MARGIN_S = 0.05    # RATE_MARGIN_S (include/ratelimit.h)


def scenario_fleet(ctx, results):
    """Three replicas with fleet.enabled draining one queue against the emulator's sliding-window
    cap of `cap` /run per 10 s (RunPod's 1000 in the full run), 200 ms per request. A grant
    counts for 10 s + margin + validity, so the fleet repeats itself every count_s: the rate is
    measured over whole periods after the first window (any phase gives the same count), and
    every 429 of the whole run is counted."""
    cap = SIZES["runpod_cap"]
    periods = 1 if QUICK else 3
    count_s = RUNPOD_RATE_WINDOW_S + FLEET_MARGIN_S + FLEET_VALIDITY_MS / 1000.0
    per_s = cap / RUNPOD_RATE_WINDOW_S
    batch = 10
    n = int(per_s * batch * (RUNPOD_RATE_WINDOW_S + periods * count_s + 10) * 1.3)
    db, conn = ctx.new_db()
    load_queue(conn, n)
    worker = Worker(ctx, db)
    worker.start()
    emu = ctx.emulator(latency_s=RUNPOD_LATENCY_S, rate_cap=cap, rate_window_s=RUNPOD_RATE_WINDOW_S)
    ds = [Daemon(ctx, f"fleet-{i}", ctx.conninfo(db), emu.base_url, queue_batch_size=batch,
                 queue_max_in_flight=RUNPOD_MAX_IN_FLIGHT, runpod_max_requests_per_10s=cap,
                 fleet_enabled="on", fleet_validity_ms=FLEET_VALIDITY_MS)
          for i in range(FLEET_REPLICAS)]
    try:
        for d in ds:
            d.start()
        first = emu.wait_for(lambda: emu.requests("run"), timeout_s=30, what="the first /run")
        t_first = min(r.received_at for r in first)
        start = t_first + RUNPOD_RATE_WINDOW_S
        span = periods * count_s
        while time.monotonic() < start + span + RUNPOD_LATENCY_S + 0.3:
            for d in ds:
                d._check_alive()
            time.sleep(0.1)
        granted = sum(d.counter("fleet_slots_granted_total") for d in ds)
        unused = sum(d.counter("fleet_slots_unused_total") for d in ds)
    finally:
        for d in ds:
            d.stop()
        worker.stop()
        emu.stop()
        conn.close()
    runs = emu.requests("run")
    accepted = [r for r in runs if r.accepted and start <= r.received_at < start + span]
    times = sorted(r.received_at for r in runs if r.accepted)
    most, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - RUNPOD_RATE_WINDOW_S:
            j += 1
        most = max(most, i - j + 1)
    n429 = sum(1 for r in runs if r.status == 429)
    if visible_count_safe(ctx, db) == 0:
        log("7. warning: the queue ran dry; the rate is a lower bound")
    results["fleet"] = {"achieved": len(accepted) / span, "cap_per_s": per_s, "n429": n429,
                        "requests": len(runs), "span_s": span, "cap": cap, "most": most,
                        "ceiling": RUNPOD_RATE_WINDOW_S / count_s, "granted": granted,
                        "unused": unused}
    log(f"7. {len(accepted) / span:.1f} /run per s of {per_s:.0f}, {n429} x 429, "
        f"at most {most} in any 10 s")


def visible_count_safe(ctx, db):
    conn = ctx.cluster.connect(db)
    try:
        return visible_count(conn)
    finally:
        conn.close()


def xacts(ctx, db):
    """Transactions committed + rolled back in database db (pg_stat_database)."""
    conn = ctx.cluster.connect("postgres")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_stat_clear_snapshot()")
            cur.execute("SELECT xact_commit + xact_rollback FROM pg_stat_database "
                        "WHERE datname = %s", (db,))
            return cur.fetchone()[0]
    finally:
        conn.close()


def shared_libraries(pid):
    """How many distinct shared objects a process has mapped."""
    with open(f"/proc/{pid}/maps", encoding="utf-8") as f:
        return len({line.split()[-1] for line in f if ".so" in line.split()[-1]})


def set_autovacuum(ctx, on):
    conn = ctx.cluster.connect("postgres")
    try:
        with conn.cursor() as cur:
            cur.execute(f"ALTER SYSTEM SET autovacuum = {'on' if on else 'off'}")
            cur.execute("SELECT pg_reload_conf()")
    finally:
        conn.close()


def scenario_idle(ctx, results):
    """Two daemons idle side by side on empty queues: NOTIFY on (measured) and polling only
    every 1000 ms (reference). Measured over two windows after the first read and a 1 s settle:
    the first minute (idle polls still backing off) and the second (steady idle)."""
    seconds = SIZES["idle_s"]
    runs = {}
    for name, notify in (("notify", True), ("poll", False)):
        db, conn = ctx.new_db(notify_throttle_ms=NOTIFY_THROTTLE_MS if notify else None)
        conn.close()
        settings = {"queue_notify": "on" if notify else "off"}
        if not notify:
            settings["queue_poll_interval_ms"] = POLL_ONLY_INTERVAL_MS
        runs[name] = {"db": db, "daemon": Daemon(ctx, f"idle-{name}", ctx.conninfo(db),
                                                 ctx.nginx.base_url, **settings), "points": []}

    def checkpoint():
        # /proc first, then the scrape, then /proc again: the scrape's own wake-ups and CPU
        # fall between two windows, never inside one.
        for r in runs.values():
            d = r["daemon"]
            end = d.sample()
            reads, xact = d.counter("reads_total"), xacts(ctx, r["db"])
            r["points"].append({"end": end, "reads": reads, "xacts": xact, "start": d.sample()})
    # Autovacuum visits every database and would count as transactions there; nothing to
    # vacuum on empty queues, so it is off for the idle windows.
    set_autovacuum(ctx, False)
    try:
        for r in runs.values():
            r["daemon"].start()
        for r in runs.values():
            r["daemon"].wait_counter("reads_total", 1, timeout=15)
        time.sleep(1.0)
        checkpoint()
        for _ in range(2):
            time.sleep(seconds)
            checkpoint()
        for r in runs.values():
            r["libraries"] = shared_libraries(r["daemon"].proc.pid)
    finally:
        for r in runs.values():
            r["daemon"].stop()
        set_autovacuum(ctx, True)
    out = {"seconds": seconds}
    for name, r in runs.items():
        out[name] = windows = []
        for p0, p1 in zip(r["points"], r["points"][1:]):
            s0, s1 = p0["start"], p1["end"]
            windows.append({
                "cpu_s": s1["cpu_s"] - s0["cpu_s"],
                "wakeups": (s1["ctxt_vol"] + s1["ctxt_nonvol"])
                           - (s0["ctxt_vol"] + s0["ctxt_nonvol"]),
                "wakeups_vol": s1["ctxt_vol"] - s0["ctxt_vol"],
                "reads": p1["reads"] - p0["reads"],
                "xacts": p1["xacts"] - p0["xacts"],
                "hwm": s1["VmHWM"], "rss": s1["VmRSS"], "rss_anon": s1["RssAnon"],
                "rss_file": s1["RssFile"], "pss": s1.get("Pss", 0),
            })
    # The floor under the daemon's RSS: the same binary loading its libraries and exiting.
    # GNU time, because anything forked from this (large) Python process inherits its peak RSS
    # before exec in getrusage's ru_maxrss.
    peak = subprocess.run(["/usr/bin/time", "-f", "%M", ctx.binary, "-V"], stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=True)
    out["version_maxrss"] = int(peak.stderr.split()[-1]) * 1024
    out["libraries"] = runs["notify"]["libraries"]
    results["idle"] = out
    for i, w in enumerate(out["notify"]):
        log(f"4. idle window {i + 1} ({seconds:.0f} s): CPU {w['cpu_s']:.2f} s, "
            f"{w['wakeups']} wake-ups, {w['reads']:.0f} reads, {w['xacts']} transactions, "
            f"peak RSS {w['hwm'] / MB:.2f} MB")


def scenario_memory(ctx, results):
    n = SIZES["memory_n"]
    batch = 100
    db, conn = ctx.new_db()
    t = time.monotonic()
    load_queue(conn, n)
    log(f"5. loaded {n:,} messages in {time.monotonic() - t:.1f} s")
    worker = Worker(ctx, db)
    worker.start()
    d = Daemon(ctx, "memory", ctx.conninfo(db), ctx.nginx.base_url, queue_batch_size=batch)
    samples = []
    halt = threading.Event()

    def sampler():
        while not halt.is_set():
            try:
                samples.append((time.monotonic(), proc_sample(d.proc.pid)["VmRSS"]))
            except (FileNotFoundError, ProcessLookupError, KeyError):
                return
            halt.wait(0.2)
    th = threading.Thread(target=sampler, daemon=True)
    try:
        d.start()
        th.start()
        d.wait_counter("messages_dispatched_total", 1, timeout=30, interval=0.005)
        start = (time.monotonic(), proc_sample(d.proc.pid)["VmRSS"])
        marks = {}  # RSS when 10 %, 50 %, 90 % of the messages were dispatched
        for share in (10, 50, 90, 100):
            done = d.wait_counter("messages_dispatched_total", n * share // 100, timeout=900,
                                  interval=0.05)
            marks[share] = proc_sample(d.proc.pid)["VmRSS"]
        end = (done, marks.pop(100))
        m = d.metrics()
    finally:
        halt.set()
        if th.is_alive():
            th.join(timeout=5)
        d.stop()
        worker.stop()
        conn.close()
    if d.counter("messages_dispatched_total", m) != n:
        raise RuntimeError("memory drain: not every message was dispatched")
    during = [rss for ts, rss in samples if start[0] <= ts <= end[0]] + [start[1], end[1]]
    results["memory"] = {"n": n, "batch": batch, "start": start[1], "end": end[1],
                         "peak": max(during), "min": min(during), "growth": end[1] - start[1],
                         "samples": len(during), "elapsed_s": done - d.spawned_at,
                         "marks": marks,
                         "msgs_per_s": n / (done - d.spawned_at)}
    r = results["memory"]
    log(f"5. RSS {r['start'] / MB:.2f} -> {r['end'] / MB:.2f} MB (peak {r['peak'] / MB:.2f}) "
        f"over {n:,} messages at {r['msgs_per_s']:,.0f} msg/s")


SCENARIOS = [("1", "drain vs pgmq.read", scenario_drain),
             ("2", "latency", scenario_latency),
             ("3", "RunPod-like sink", scenario_runpod),
             ("4", "idle", scenario_idle),
             ("5", "memory under load", scenario_memory),
             ("6", "dispatch ledger on vs off", scenario_ledger),
             ("7", "fleet of three replicas against the cap", scenario_fleet),
             ("8", "two routes in one daemon", scenario_two_routes),
             ("9", "fuller reads", scenario_fuller_reads)]


# ------------------------------------------------------------------------------ report

def run_text(argv):
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=False,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def dpkg_version(pkg):
    return run_text(["dpkg-query", "-W", "-f=${Version}", pkg]) or "?"


def machine_info(ctx):
    cpu = "?"
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo", encoding="utf-8") as f:
        mem_kb = int(f.readline().split()[1])
    conn = ctx.cluster.connect("postgres")
    with conn.cursor() as cur:
        cur.execute("SHOW server_version")
        pg_version = cur.fetchone()[0]
    conn.close()
    commit = run_text(["git", "-C", REPO_ROOT, "rev-parse", "--short=12", "HEAD"]) or "?"
    if run_text(["git", "-C", REPO_ROOT, "status", "--porcelain", "--untracked-files=no"]):
        commit += " (with uncommitted changes)"
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    return [
        ("date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
        ("machine", f"{os.cpu_count()} CPUs (nproc {run_text(['nproc'])}), {cpu}, "
                    f"{mem_kb / 1024 / 1024:.1f} GiB RAM"),
        ("kernel", f"{platform.system()} {platform.release()} {platform.machine()}"),
        ("pgmq-dispatcher", f"{run_text([ctx.binary, '-V'])}, commit {commit}, "
                            f"binary {os.path.relpath(ctx.binary, REPO_ROOT)}"),
        ("PostgreSQL", f"{pg_version} (server and pgbench, package postgresql-15 "
                       f"{dpkg_version('postgresql-15')}), libpq5 {dpkg_version('libpq5')}"),
        ("libcurl", f"{run_text(['pkg-config', '--modversion', 'libcurl'])} "
                    f"(libcurl4 {dpkg_version('libcurl4')})"),
        ("libev", f"libev4 {dpkg_version('libev4')}"),
        ("sink", f"{nginx.replace('nginx version: ', '')} (nginx-light "
                 f"{dpkg_version('nginx-light')}); RunPod emulator on Python "
                 f"{platform.python_version()}"),
        ("mode", "BENCH_QUICK=1 (smoke sizes: figures not comparable to targets)" if QUICK
                 else "full"),
    ]


def f_rate(v):
    return f"{v:,.0f} msg/s"


def f_ms(v):
    return f"{v:.1f} ms" if v >= 100 else f"{v:.2f} ms"


def f_mb(v):
    return f"{v / MB:.2f} MB"


def yes_no(ok):
    return "yes" if ok else "**no**"


def build_rows(res):
    """(id, scenario, measured, reference, ratio, target, met) per row; met is True/False/None."""
    rows = []
    for batch in (10, 100):
        r = res.get(f"drain_{batch}")
        if not r:
            continue
        ratio = r["daemon"] / r["reference"]
        target = "≥ 0.8 of the bound" if batch == 10 else "—"
        met = ratio >= 0.8 if batch == 10 else None
        rows.append((f"1{'a' if batch == 10 else 'b'}",
                     f"drain {r['n']:,} queued, batch {batch}, nginx sink, /run cap lifted "
                     f"(median of {len(r['daemon_runs'])})",
                     f_rate(r["daemon"]),
                     f"`pgmq.read` alone (pgbench, 1 client): {f_rate(r['reference'])}",
                     f"{ratio:.2f}", target, met))
    r = res.get("ledger")
    if r:
        ratio = r["on"] / r["off"]
        rows.append(("6a", f"drain {r['n']:,} queued, batch 10, ledger on (median of {r['runs']})",
                     f_rate(r["on"]), f"same drain, `ledger.enabled = off`: {f_rate(r['off'])}",
                     f"{ratio:.2f}", "≥ 0.85", ratio >= 0.85))
        rows.append(("6b", "PostgreSQL CPU per message in that drain, ledger on",
                     f"{r['pg_us_on']:.1f} µs", f"ledger off: {r['pg_us_off']:.1f} µs",
                     f"×{r['pg_us_on'] / r['pg_us_off']:.2f}", "—", None))
    r = res.get("latency_notify")
    if r:
        ref = r["ref"]
        met = r["p50"] <= 5.0 and r["p99"] <= 25.0
        rows.append(("2a", f"latency enqueue → POST at the sink, {r['n']:,} single messages, "
                           f"NOTIFY on",
                     f"p50 {f_ms(r['p50'])} · p99 {f_ms(r['p99'])} · max {f_ms(r['max'])}",
                     f"NOTIFY at a bare LISTEN client: p50 {f_ms(ref['p50'])} · "
                     f"p99 {f_ms(ref['p99'])} · max {f_ms(ref['max'])}",
                     f"p50 ×{r['p50'] / ref['p50']:.1f} · p99 ×{r['p99'] / ref['p99']:.1f}",
                     "p50 ≤ 5 ms, p99 ≤ 25 ms", met))
    r = res.get("latency_poll")
    if r:
        iv = POLL_ONLY_INTERVAL_MS
        rows.append(("2b", f"latency, same arrivals, polling only every {iv} ms",
                     f"p50 {f_ms(r['p50'])} · p99 {f_ms(r['p99'])} · max {f_ms(r['max'])}",
                     f"arrivals uniform over one poll period: p50 {f_ms(iv * 0.5)} · "
                     f"p99 {f_ms(iv * 0.99)} · max {f_ms(iv)}",
                     f"p50 ×{r['p50'] / (iv * 0.5):.2f} · p99 ×{r['p99'] / (iv * 0.99):.2f}",
                     "—", None))
    r = res.get("latency_notify_nodebounce")
    if r:
        ref = r["ref"]
        rows.append(("2c", "latency, same arrivals, NOTIFY on with `queue.notify_debounce_ms=0` "
                           f"(default {res.get('debounce_default', '?')})",
                     f"p50 {f_ms(r['p50'])} · p99 {f_ms(r['p99'])} · max {f_ms(r['max'])}",
                     f"NOTIFY at a bare LISTEN client: p50 {f_ms(ref['p50'])} · "
                     f"p99 {f_ms(ref['p99'])} · max {f_ms(ref['max'])}",
                     f"p50 ×{r['p50'] / ref['p50']:.1f} · p99 ×{r['p99'] / ref['p99']:.1f}",
                     "—", None))
    r = res.get("fuller")
    if r:
        what = (f"batch 10, max_in_flight {FULLER_MAX_IN_FLIGHT}, fuller reads "
                f"(`queue.read_batches` at its default: median "
                f"{r['rows_per_read']:.0f} rows per read)")
        rows.append(("9a", f"drain {r['n']:,}, {what}, ledger on, nginx sink "
                           f"(median of {r['runs']})",
                     f_rate(r["on"]),
                     f"`pgmq.read(..., 10)` alone (pgbench, 1 client): {f_rate(r['ref'])}",
                     f"{r['on'] / r['ref']:.2f}", "≥ 2× the single-connection read",
                     r["on"] >= 2 * r["ref"]))
        rows.append(("9b", "PostgreSQL CPU per dispatched message in that drain, ledger on",
                     f"{r['pg_us_on']:.1f} µs/msg",
                     f"`pgmq.read(..., 10)` alone: {r['ref_pg_us']:.1f} µs/msg",
                     f"{r['pg_us_on'] / r['ref_pg_us']:.2f}", "≤ 40 µs/msg",
                     r["pg_us_on"] <= 40))
        rows.append(("9c", "the same drain with `ledger.enabled = off`",
                     f"{f_rate(r['off'])}, PostgreSQL {r['pg_us_off']:.1f} µs/msg",
                     f"`pgmq.read(..., 10)` alone: {f_rate(r['ref'])}, "
                     f"{r['ref_pg_us']:.1f} µs/msg",
                     f"{r['off'] / r['ref']:.2f} · {r['pg_us_off'] / r['ref_pg_us']:.2f}",
                     "—", None))
    r = res.get("two_routes")
    if r:
        rows.append(("8", f"two routes in one daemon (two queues, two endpoint ids), {r['n']:,} "
                          "queued in each, batch 10, nginx sink",
                     f_rate(r["two"]), f"one route, {2 * r['n']:,} queued: {f_rate(r['one'])}",
                     f"{r['two'] / r['one']:.2f}", "—", None))
    r = res.get("runpod")
    if r:
        frac = r["achieved"] / r["cap_per_s"]
        rows.append(("3", f"RunPod-like sink: emulator, {RUNPOD_LATENCY_S * 1000:.0f} ms per "
                          f"request, cap {r['cap']:,} /run per 10 s, batch 10, max_in_flight "
                          f"{RUNPOD_MAX_IN_FLIGHT}, {r['window_s']:.0f} s",
                     f"{r['achieved']:.1f} /run per s, {r['n429']} × 429",
                     f"the cap: {r['cap_per_s']:.1f} /run per s, 0 × 429",
                     f"{frac:.3f}", "≥ 0.95 of the cap, zero 429s",
                     frac >= 0.95 and r["n429"] == 0))
    r = res.get("fleet")
    if r:
        frac = r["achieved"] / r["cap_per_s"]
        rows.append(("7", f"fleet of {FLEET_REPLICAS} replicas against the cap: emulator, cap "
                          f"{r['cap']:,} /run per 10 s, batch 10, fleet.validity_ms "
                          f"{FLEET_VALIDITY_MS}, {r['span_s']:.1f} s after the first window",
                     f"{r['achieved']:.1f} /run per s together, {r['n429']} × 429",
                     f"the cap: {r['cap_per_s']:.1f} /run per s, 0 × 429",
                     f"{frac:.3f}", "≥ 0.9 of the cap, zero 429s",
                     frac >= 0.9 and r["n429"] == 0))
    r = res.get("idle")
    if r:
        (n1, n), (p1, p), secs = r["notify"], r["poll"], r["seconds"]
        per_min = 60.0 / secs
        ref = f"polling only every {POLL_ONLY_INTERVAL_MS} ms: "
        span = f"{secs:.0f} s" if secs != 60 else "minute"

        def ratio(a, b):
            return f"{a / b:.2f}" if b else "—"
        first = f"1st {span}"
        rows.append(("4a", f"idle, empty queue, NOTIFY on: CPU in the 2nd {span}",
                     f"{n['cpu_s']:.2f} s ({first}: {n1['cpu_s']:.2f} s)",
                     ref + f"{p['cpu_s']:.2f} s ({first}: {p1['cpu_s']:.2f} s)",
                     ratio(n["cpu_s"], p["cpu_s"]), "≤ 0.1 s per minute",
                     n["cpu_s"] * per_min <= 0.1))
        rows.append(("4b", f"idle: loop wake-ups (context switches, all threads) in the 2nd "
                           f"{span}",
                     f"{n['wakeups']:,} ({first}: {n1['wakeups']:,})",
                     ref + f"{p['wakeups']:,} ({first}: {p1['wakeups']:,})",
                     ratio(n["wakeups"], p["wakeups"]), "—", None))
        rows.append(("4c", f"idle: database reads (`pgmqd_reads_total`) in the 2nd {span}",
                     f"reads {n['reads']:.0f}, transactions of any kind {n['xacts']} ({first}: "
                     f"{n1['reads']:.0f} and {n1['xacts']})",
                     ref + f"reads {p['reads']:.0f}, transactions {p['xacts']} ({first}: "
                     f"{p1['reads']:.0f} and {p1['xacts']})",
                     ratio(n["reads"], p["reads"]), "≤ 1 per minute",
                     n["reads"] * per_min <= 1.0))
        rows.append(("4d", "idle: peak RSS (VmHWM)",
                     f"{f_mb(n['hwm'])} (at the end {f_mb(n['rss_anon'])} anon + "
                     f"{f_mb(n['rss_file'])} file-backed; PSS {f_mb(n['pss'])})",
                     f"`pgmq-dispatcher -V` (maps its {r['libraries']} shared libraries, "
                     f"prints, exits): {f_mb(r['version_maxrss'])}; " + ref + f_mb(p["hwm"]),
                     ratio(n["hwm"], r["version_maxrss"]), "≤ 6 MB", n["hwm"] <= 6 * MB))
    r = res.get("memory")
    if r:
        rows.append(("5", f"memory while draining {r['n']:,} (batch {r['batch']}, nginx sink, "
                          f"defaults incl. the /run cap: {r['msgs_per_s']:,.0f} msg/s)",
                     f"RSS growth {r['growth'] / MB:+.2f} MB ({f_mb(r['start'])} → "
                     f"{f_mb(r['end'])}, peak {f_mb(r['peak'])}, {r['samples']} samples)",
                     f"RSS at the start: {f_mb(r['start'])}",
                     f"end/start {r['end'] / r['start']:.3f}", "growth ≤ 1 MB",
                     r["growth"] <= 1 * MB))
    return rows


METHOD = """\
## How it was measured

- **Set-up.** One throwaway PostgreSQL 15 cluster (`tests/integration/pgcluster.py`: fsync and
  synchronous_commit off, `autovacuum_naptime` 1 s), a fresh database with the PGMQ look-alike
  (`tests/fixtures/pgmq.sql`) for every run, the daemon configured only through `PGMQD_*`
  variables with its defaults unless stated, logging at `info` (one line per batch) to a file,
  everything on 127.0.0.1 over TCP. Messages are ~170-byte JSON objects, enqueued with
  `pgmq.send_batch` over `generate_series` in chunks of 50,000.
- **Stand-in worker.** In the drains (1, 3, 5) a harness thread plays the RunPod worker and
  deletes what was read (rows whose vt is more than 60 s ahead, through the vt index) every
  50 ms, on its own connection, beside pgbench and beside the daemon alike. Without it pgmq's
  read steps over every invisible row read before, and a drain measures that growing scan.
- **1. Drain.** Daemon: wall time from spawning the binary to the log line of the batch that
  brought `pgmqd_messages_dispatched_total` to N (CLOCK_REALTIME, 1 ms); nginx answers every
  `/run` at once; defaults except `runpod.max_requests_per_10s=1000000` (nginx is not RunPod; with
  the default cap of 1000 per 10 s a batch-10 drain cannot pass 1,000 msg/s, which is the point of
  the cap, see 3). At its defaults the daemon records every read in the ledger and reads fuller
  (one read claims B × the 8 free in-flight slots and sends bodies of B), so it runs fewer, larger
  statements than the reference; 9 compares it with one batch per read. Reference: pgbench with
  one client (the daemon reads on one connection), `-M extended` (unnamed statements, as the
  daemon's `PQsendQueryParams`), running `SELECT * FROM pgmq.read('bench', 1800, B)` N/B times on
  an identically loaded queue; wall time from spawning pgbench to its exit. A second pgbench run
  uses the daemon's plain read statement (ledger off, one batch: `to_json(enqueued_at)`,
  `message->'document_id'` and `ORDER BY msg_id` around the same call). Runs alternate; medians
  are compared. CPU per message: the daemon's utime + stime; the postmaster's with its children's
  (reaped ones included) and nginx's likewise; pgbench's from `getrusage(RUSAGE_CHILDREN)`. The
  stand-in worker's backend counts as PostgreSQL on both sides.
- **2. Latency.** The harness inserts single messages with `pgmq.send` (autocommit) after
  random gaps (uniform {gap}); the enqueue time is the midpoint of its monotonic clock around
  the statement (median round trip {rtt}), the arrival time is when the in-process RunPod
  emulator has parsed the POST's headers, on the same clock. With NOTIFY the queue has pgmq's
  insert trigger (`enable_notify_insert`, throttle {throttle} ms, so every insert notifies) and
  the reference is a bare psycopg2 LISTEN client in the harness receiving the same
  notifications. Polling only: no trigger, `queue.notify=off`, `queue.poll_interval_ms=1000`;
  the reference is what a 1000 ms poll gives arrivals spread evenly over the period. 2c repeats
  2a with `queue.notify_debounce_ms=0` to show what the debounce adds.
- **3. RunPod-like.** Emulator with {lat} ms before every answer and a sliding window of at
  most the cap `/run` per 10 s (429 without Retry-After beyond it); the daemon with
  `runpod.max_requests_per_10s` = the cap and `queue.max_in_flight={mif}` (the default 8 could
  carry at most 8 / 0.2 s = 40 requests/s). Counted: accepted `/run` received within the first
  {win} s after the first one (at most the cap per 10 s is possible), and every 429 of the run.
- **4. Idle.** Two daemons side by side on empty queues, one with NOTIFY on (the insert trigger
  exists), one polling only every 1000 ms (the reference); autovacuum off meanwhile. After the
  first read and 1 s, two windows of {idle} s: the first while idle polls still back off, the
  second steady (the targets are judged on it, per minute). CPU = utime + stime from
  `/proc/<pid>/stat`; loop wake-ups = growth of `voluntary_ctxt_switches +
  nonvoluntary_ctxt_switches` summed over `/proc/<pid>/task/*/status` (a proxy: the loop sleeps
  in `epoll_wait`, and each wake-up is a voluntary switch); database reads = growth of
  `pgmqd_reads_total` (all results); transactions of any kind (LISTEN, the periodic
  `pgmq.metrics`, ...) from `pg_stat_database`, which backends update at most once a second;
  peak RSS = `VmHWM` at the end, PSS from `/proc/<pid>/smaps_rollup`; its reference is the
  peak RSS (GNU time's `%M`) of the same binary run with `-V`, which only loads its libraries.
- **5. Memory.** `VmRSS` sampled every 200 ms while draining with batch 100 and the default
  configuration (so the /run cap of 1000 per 10 s sets the pace: 10,000 msg/s at most);
  start = the first accepted batch, end = the last one.
- **9. Fuller reads.** The drain of 1 at batch 10 with `queue.max_in_flight=32` and
  `queue.read_batches` at its default (one read claims 10 × the free in-flight slots, at most 320,
  and waits up to 5 ms for half the slots to be free while a backlog lasts), ledger on (the default)
  and off, alternating with pgbench's single-connection `pgmq.read(..., 10)` on an identically
  loaded queue; medians of the runs. PostgreSQL CPU per message counts the whole cluster (the read's
  backend, the stand-in worker's, autovacuum, the WAL writer) from before the daemon starts to the
  last accepted batch, divided by the messages dispatched. A last drain with `queue.read_batches=1`
  (one batch per read) shows what the fuller reads change. On a shared machine every figure moves
  with the load: the load average is given in the runs.
- Sizes are in decimal megabytes (10^6 bytes). Targets are reported, never asserted by tests.
"""


def render(res, info, timings):
    rows = build_rows(res)
    lines = ["# Performance", "",
             "Written by `make bench` (`tests/bench/bench.py`); do not edit by hand, run it again. "
             "Every figure is measured in the same run as its reference.", "",
             "| | |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in info]
    lines += ["", "## Results", "",
              "| # | scenario | pgmq-dispatcher | reference (same run) | ratio | target | met |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for rid, scen, measured, ref, ratio, target, met in rows:
        lines.append(f"| {rid} | {scen} | {measured} | {ref} | {ratio} | {target} | "
                     f"{'—' if met is None else yes_no(met)} |")
    judged = [r for r in rows if r[6] is not None]
    missed = [r[0] for r in judged if not r[6]]
    lines += ["", f"Targets met: {len(judged) - len(missed)} of {len(judged)}"
              + (f" (not met: {', '.join(missed)})." if missed else "."), ""]
    lines += ["## Runs", "",
              "| scenario | wall time | details |", "| --- | --- | --- |"]
    for sid, name, secs in timings:
        lines.append(f"| {sid}. {name} | {secs:.0f} s | {run_details(res, sid)} |")
    lat = res.get("latency_notify") or res.get("latency_poll") or {}
    lines += ["", METHOD.format(
        gap=f"{SIZES['latency_gap_s'][0] * 1000:.0f}-{SIZES['latency_gap_s'][1] * 1000:.0f} ms",
        rtt=f_ms(lat["send_rtt_p50"]) if lat else "—", throttle=NOTIFY_THROTTLE_MS,
        lat=f"{RUNPOD_LATENCY_S * 1000:.0f}", mif=RUNPOD_MAX_IN_FLIGHT,
        win=f"{SIZES['runpod_window_s']:.0f}", idle=f"{SIZES['idle_s']:.0f}")]
    return "\n".join(lines)


def cpu_split(runs):
    mid = sorted(runs, key=lambda x: x["msgs_per_s"])[len(runs) // 2]["cpu_us_per_msg"]
    return " + ".join(f"{k} {v:.1f} µs" for k, v in mid.items())


def run_details(res, sid):
    if sid == "1":
        parts = []
        for batch in (10, 100):
            r = res.get(f"drain_{batch}")
            if r:
                parts.append(f"batch {batch}: daemon "
                             + ", ".join(f"{x['msgs_per_s']:,.0f}" for x in r["daemon_runs"])
                             + " msg/s; pgbench "
                             + ", ".join(f"{x['msgs_per_s']:,.0f} ({x['tps']:,.0f} tps)"
                                         for x in r["reference_runs"])
                             + "; pgbench with the daemon's own read statement "
                             + ", ".join(f"{x['msgs_per_s']:,.0f}" for x in r["own_sql_runs"])
                             + f" (median {r['own_sql']:,.0f}, ratio of the daemon to it "
                             + f"{r['daemon'] / r['own_sql']:.2f})"
                             + ". CPU per message (median run): daemon run "
                             + cpu_split(r["daemon_runs"]) + "; pgbench run "
                             + cpu_split(r["reference_runs"]))
        return "<br>".join(parts)
    if sid == "2":
        parts = []
        for key, label in (("latency_notify", "NOTIFY"), ("latency_poll", "polling"),
                           ("latency_notify_nodebounce", "NOTIFY without debounce")):
            r = res.get(key)
            if r:
                parts.append(f"{label}: {r['requests']} /run requests for {r['n']} messages")
        return "; ".join(parts)
    if sid == "3" and "runpod" in res:
        r = res["runpod"]
        return (f"{r['requests']} /run requests in all, at most {r['max_concurrent']} "
                f"in flight at once")
    if sid == "7" and "fleet" in res:
        r = res["fleet"]
        return (f"{r['requests']} /run requests in all, at most {r['most']} in any 10 s; "
                f"ceiling 10 s / (10 s + margin + validity) = {r['ceiling']:.3f}; "
                f"{r['granted']:.0f} slots granted, {r['unused']:.0f} dropped unused")
    if sid == "9" and "fuller" in res:
        r = res["fuller"]

        def runs(key):
            return ", ".join(f"{x['msgs_per_s']:,.0f} ({x['cpu_us_per_msg']['PostgreSQL']:.0f} µs)"
                             for x in r[key])
        o = r["one"]
        return (f"msg/s (PostgreSQL µs per message): pgbench {runs('ref_runs')}; ledger on "
                f"{runs('on_runs')}; ledger off {runs('off_runs')}; one batch per read "
                f"(`queue.read_batches=1`, ledger on) {o['msgs_per_s']:,.0f} "
                f"({o['cpu_us_per_msg']['PostgreSQL']:.0f} µs). Load average at the end "
                + " / ".join(f"{x:.2f}" for x in r["load"]))
    if sid == "4" and "idle" in res:
        n = res["idle"]["notify"][-1]
        return f"NOTIFY daemon at the end: VmRSS {f_mb(n['rss'])}"
    if sid == "5" and "memory" in res:
        r = res["memory"]
        return (f"{r['elapsed_s']:.1f} s for {r['n']:,} messages; RSS at 10 % / 50 % / 90 % "
                f"of them: " + " / ".join(f_mb(v) for v in r["marks"].values())
                + f"; lowest sample {f_mb(r['min'])}")
    return ""


# ------------------------------------------------------------------------------ main

class Interrupted(BaseException):
    """SIGTERM/SIGHUP, raised in the main thread like KeyboardInterrupt for Ctrl-C. A
    BaseException for the same reason: the harness's `except Exception` cleanups (an
    emulator that will not stop, a worker thread's error) must not swallow it."""


def _on_signal(signum, frame):
    raise Interrupted(f"signal {signal.Signals(signum).name}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=os.environ.get("BENCH_OUTPUT", DEFAULT_OUTPUT),
                        help="markdown file to write (default docs/performance.md)")
    parser.add_argument("--only", default="",
                        help="comma-separated scenario numbers (default: all)")
    args = parser.parse_args(argv)
    binary = os.path.abspath(os.environ.get("DISPATCHER_BIN", DEFAULT_BINARY))
    only = {s.strip() for s in args.only.split(",") if s.strip()}

    for tool in ("nginx", os.path.join(PG_BINDIR, "pgbench"), "/usr/bin/time", binary):
        if not shutil.which(tool):
            sys.exit(f"bench: {tool} not found (make deps; make)")

    # SIGTERM and SIGHUP end the run like Ctrl-C: through the finally below. Installed before
    # pgcluster looks, so that it leaves SIGTERM to us.
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)

    workdir = tempfile.mkdtemp(prefix="pgmqd-bench-")
    os.chmod(workdir, 0o755)
    ctx = Context(workdir, binary)
    results, timings = {}, []
    ok = False
    try:
        log(f"bench: {'quick' if QUICK else 'full'} run, workdir {workdir}, binary {binary}")
        ctx.cluster = PgCluster(settings={"autovacuum_naptime": "1s"}).start()
        log(f"bench: PostgreSQL on port {ctx.cluster.port}, data {ctx.cluster.datadir}")
        ctx.nginx = NginxSink(ctx.children, workdir).start()
        log(f"bench: nginx sink on port {ctx.nginx.port}")
        for sid, name, fn in SCENARIOS:
            if only and sid not in only:
                continue
            started = time.monotonic()
            log(f"{sid}. {name}")
            fn(ctx, results)
            timings.append((sid, name, time.monotonic() - started))
            log(f"{sid}. {name}: {timings[-1][2]:.0f} s")
        info = machine_info(ctx)
        ok = True
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            ctx.close()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            log("bench: stopped every process it started" + ("" if ok else " (run failed)"))
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    text = render(results, info, timings)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print(text)
    log(f"bench: wrote {args.output} in {time.monotonic() - T0:.0f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (KeyboardInterrupt, Interrupted) as exc:
        print(f"bench: interrupted ({exc or 'Ctrl-C'}); nothing written", file=sys.stderr)
        sys.exit(130)
