#!/usr/bin/python3
"""`make run`: the main job on a throwaway setup.

Starts a private PostgreSQL 15 cluster with the PGMQ-compatible schema and the
queue video_audio_transcription, loads 25 real-shaped transcription jobs,
starts the RunPod emulator on 127.0.0.1, and runs pgmq-dispatcher in the
foreground with -v, configured from the environment alone. A new job is
enqueued every few seconds so that the daemon keeps having work. Ctrl-C (or
SIGTERM) stops the daemon gracefully, then the emulator and the cluster.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

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


def say(text):
    print(f"[demo] {text}", flush=True)


def main():
    stop = threading.Event()
    # Ctrl-C reaches the whole foreground process group; the daemon handles
    # its own copy. Here it only ends the wait below.
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    cluster = PgCluster()
    emulator = None
    daemon = None
    try:
        say("starting PostgreSQL 15 (throwaway cluster) ...")
        cluster.start()
        cluster.createdb("pgmqd_demo")
        cluster.load_sql(os.path.join(HERE, "fixtures", "pgmq.sql"), "pgmqd_demo")
        cluster.load_sql(os.path.join(HERE, "fixtures", "demo_jobs.sql"), "pgmqd_demo")
        conn = cluster.connect("pgmqd_demo")
        with conn.cursor() as cur:
            # pgmq >= 1.7's insert notification: the daemon wakes on every enqueue.
            cur.execute("SELECT pgmq.enable_notify_insert(%s, 0)", (QUEUE,))
            cur.execute("SELECT count(*) FROM pgmq.q_video_audio_transcription")
            say(f"queue {QUEUE}: {cur.fetchone()[0]} jobs waiting "
                f"(PostgreSQL on 127.0.0.1:{cluster.port})")

        emulator = RunPodEmulator(endpoint_id=ENDPOINT_ID, api_key=API_KEY, in_queue_s=2.0,
                                  run_s=5.0, log=lambda line: print(f"[runpod-emulator] {line}",
                                                                    flush=True))
        emulator.start()
        say(f"RunPod emulator on {emulator.base_url} (endpoint {ENDPOINT_ID})")

        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "DATABASE_URL": cluster.conninfo_for("pgmqd_demo"),
            "PGMQD_QUEUE_NAME": QUEUE,
            "PGMQD_QUEUE_POLL_INTERVAL_MS": "1000",
            "PGMQD_RUNPOD_BASE_URL": emulator.base_url,
            "RUNPOD_ENDPOINT_ID": ENDPOINT_ID,
            "RUNPOD_API_KEY": API_KEY,
            # Any free port: an installed service may already use the default 9187.
            "PGMQD_ADMIN_LISTEN": "127.0.0.1:0",
        }
        say(f"starting {os.path.relpath(BINARY, REPO)} -v   (Ctrl-C to stop everything)")
        daemon = subprocess.Popen([BINARY, "-v"], env=env, stdin=subprocess.DEVNULL)

        n = 0
        while not stop.wait(TRICKLE_S):
            if daemon.poll() is not None:
                say(f"daemon exited with {daemon.returncode}")
                return daemon.returncode or 1
            n += 1
            job = {"document_id": f"9e000000-0000-4000-8000-{n:012d}",
                   "media_url": f"https://media.example.com/uploads/live/{n}/standup.m4a",
                   "media_type": "audio", "language": "en", "model": "large-v3",
                   "diarize": False, "title": f"Daily stand-up #{n}"}
            with conn.cursor() as cur:
                cur.execute("SELECT pgmq.send(%s, %s::jsonb)", (QUEUE, json.dumps(job)))
                say(f"enqueued msg_id {cur.fetchone()[0]} ({job['title']})")
        conn.close()
        say("stopping ...")
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGINT)  # no-op if the terminal already sent it
        rc = daemon.wait(timeout=30)
        say(f"daemon exited with {rc}; accepted /run requests: "
            f"{sum(1 for r in emulator.requests('run') if r.accepted)}")
        return rc
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
