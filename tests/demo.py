#!/usr/bin/python3
"""`make run`: the main job on a throwaway setup, for a person to watch.

Starts a private PostgreSQL 15 cluster with the PGMQ-compatible schema and the
queue video_audio_transcription, loads 25 real-shaped transcription jobs,
starts the RunPod emulator on 127.0.0.1 (jobs wait 2 s, run 5 s, then
COMPLETED), and runs pgmq-dispatcher in the foreground at the default (info)
level with the job tracker on, so each batch is followed to COMPLETED. A new
job is enqueued every few seconds so that the daemon keeps having work.

Every line goes through one printer, whole, with a tag saying who wrote it
([demo], [dispatcher], [runpod]); the emulator shows its /run requests only.
Ctrl-C (or SIGTERM) stops the daemon gracefully, then the emulator and the
cluster.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "integration"))
sys.path.insert(0, os.path.join(HERE, "emulator"))

from pgcluster import PgCluster  # noqa: E402
from runpod_emulator import RunPodEmulator  # noqa: E402

QUEUE = "video_audio_transcription"
ENDPOINT_ID = "demo-endpoint"
API_KEY = "rp_demo_key_not_a_real_secret"
BINARY = os.environ.get("DISPATCHER_BIN", os.path.join(REPO, "build", "pgmq-dispatcher"))
TRICKLE_S = float(os.environ.get("DEMO_TRICKLE_S", "4"))

_print_lock = threading.Lock()


def emit(tag, text):
    """One whole line per write, never two writers at once."""
    with _print_lock:
        try:
            sys.stdout.write(f"{tag} {text}\n")
            sys.stdout.flush()
        except (OSError, ValueError):
            pass


def say(text):
    emit("[demo]      ", text)


def emulator_line(line):
    # /status and /health polls every second are noise for a person; /run is the story.
    if line.startswith("POST ") and line.split(" ", 2)[1].endswith("/run"):
        emit("[runpod]    ", line)


def relay(stream, signalled):
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace").rstrip("\n")
        if " event=signal " in line:
            signalled.set()  # the daemon has its own signal: never send a second one
        emit("[dispatcher]", line)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    stop = threading.Event()
    # Ctrl-C reaches the whole foreground process group; the daemon handles
    # its own copy. Here it only ends the wait below.
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    cluster = PgCluster()
    emulator = None
    daemon = None
    reader = None
    try:
        say("starting a throwaway PostgreSQL 15 cluster ...")
        cluster.start()
        cluster.createdb("pgmqd_demo")
        cluster.load_sql(os.path.join(HERE, "fixtures", "pgmq.sql"), "pgmqd_demo")
        cluster.load_sql(os.path.join(HERE, "fixtures", "demo_jobs.sql"), "pgmqd_demo")
        conn = cluster.connect("pgmqd_demo")
        with conn.cursor() as cur:
            # pgmq >= 1.7's insert notification: the daemon wakes on every enqueue.
            cur.execute("SELECT pgmq.enable_notify_insert(%s, 0)", (QUEUE,))
            cur.execute("SELECT count(*) FROM pgmq.q_video_audio_transcription")
            waiting = cur.fetchone()[0]

        emulator = RunPodEmulator(endpoint_id=ENDPOINT_ID, api_key=API_KEY, in_queue_s=2.0,
                                  run_s=5.0, log=emulator_line)
        emulator.start()
        admin = f"127.0.0.1:{free_port()}"
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "DATABASE_URL": cluster.conninfo_for("pgmqd_demo"),
            "PGMQD_QUEUE_NAME": QUEUE,
            "PGMQD_QUEUE_POLL_INTERVAL_MS": "1000",
            "PGMQD_RUNPOD_BASE_URL": emulator.base_url,
            "RUNPOD_ENDPOINT_ID": ENDPOINT_ID,
            "RUNPOD_API_KEY": API_KEY,
            "PGMQD_TRACKER_ENABLED": "on",
            "PGMQD_TRACKER_INTERVAL_MS": "2000",
            "PGMQD_ADMIN_LISTEN": admin,
        }
        rule = "-" * 72
        say(rule)
        say(f"PostgreSQL   127.0.0.1:{cluster.port}, database pgmqd_demo, "
            f"queue {QUEUE} ({waiting} jobs waiting)")
        say(f"RunPod       emulator at {emulator.base_url}, endpoint {ENDPOINT_ID}: "
            "jobs queue 2 s, run 5 s, then COMPLETED")
        say(f"dispatcher   {os.path.relpath(BINARY, REPO)}: batches of 10 to /run, "
            "tracker following each job")
        say(f"watch        http://{admin}/metrics and /healthz")
        say(f"meanwhile    one new job every {TRICKLE_S:g} s;  Ctrl-C stops everything")
        say(rule)
        daemon = subprocess.Popen([BINARY], env=env, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        signalled = threading.Event()
        reader = threading.Thread(target=relay, args=(daemon.stdout, signalled), daemon=True)
        reader.start()

        n = 0
        conn.autocommit = False  # each enqueue its own transaction, committed below
        while not stop.wait(TRICKLE_S):
            if daemon.poll() is not None:
                reader.join(5)
                say(f"the dispatcher exited with {daemon.returncode}")
                return daemon.returncode or 1
            n += 1
            job = {"document_id": f"9e000000-0000-4000-8000-{n:012d}",
                   "media_url": f"https://media.example.com/uploads/live/{n}/standup.m4a",
                   "media_type": "audio", "language": "en", "model": "large-v3",
                   "diarize": False, "title": f"Daily stand-up #{n}"}
            # Said before the commit: the insert notification goes out at
            # commit, so the daemon's batch_accepted line always comes after.
            with conn:
                with conn.cursor() as cur:
                    cur.execute("SELECT pgmq.send(%s, %s::jsonb)", (QUEUE, json.dumps(job)))
                    say(f"enqueued msg_id {cur.fetchone()[0]} ({job['title']})")
        conn.close()
        say("stopping ...")
        # Ctrl-C in a terminal reaches the daemon too (same process group):
        # a second signal would cut its drain short. Only when it has not
        # logged its own signal (SIGTERM or a SIGINT to this script alone)
        # does it get one SIGTERM from here.
        if not signalled.wait(2) and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
        rc = daemon.wait(timeout=30)
        reader.join(5)
        accepted = sum(1 for r in emulator.requests("run") if r.accepted)
        plural = "" if accepted == 1 else "s"
        if rc == 0:
            say(f"stopped: the dispatcher finished its drain and exited 0; "
                f"{accepted} /run request{plural} accepted")
        else:
            say(f"the dispatcher exited with {rc}; {accepted} /run request{plural} accepted")
        return 0 if rc == 0 else (rc if rc > 0 else 1)
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        if emulator is not None:
            emulator.stop()
        cluster.close()
        say("PostgreSQL and the emulator are stopped")


if __name__ == "__main__":
    sys.exit(main())
