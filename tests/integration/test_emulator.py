"""Tests of the RunPod Serverless emulator itself (tests/emulator/runpod_emulator.py).

Run with: /usr/bin/python3 -m pytest tests/integration/test_emulator.py -q

The emulator runs in-process on a free 127.0.0.1 port; requests go through
http.client or plain sockets. Waits are bounded by deadlines (emulator.wait_for
or futures with timeouts); nothing sleeps and hopes.
"""

from __future__ import annotations

import concurrent.futures
import email.utils
import http.client
import importlib.util
import json
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

EMULATOR_PATH = Path(__file__).resolve().parent.parent / "emulator" / "runpod_emulator.py"


def _load_emulator_module():
    """Import the emulator by path (tests/emulator is not a package)."""
    existing = sys.modules.get("runpod_emulator")
    if existing is not None and Path(existing.__file__).resolve() == EMULATOR_PATH:
        return existing
    spec = importlib.util.spec_from_file_location("runpod_emulator", EMULATOR_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while executing it
    spec.loader.exec_module(module)
    return module


rpe = _load_emulator_module()

EP = "ep-test-1"
KEY = "sk-test-secret-0123456789"
JOB_ID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}-u1$")
WAIT_S = 5.0  # generous deadline for conditions that should hold within milliseconds


# ----------------------------------------------------------------- helpers


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def request(emu, method: str, path: str, body: Any = None, *, auth: str | None = f"Bearer {KEY}",
            headers: dict[str, str] | None = None, conn: http.client.HTTPConnection | None = None,
            timeout: float = WAIT_S) -> Reply:
    """One HTTP exchange; ``path`` is relative to the base URL's /v2 when it has no leading '/'."""
    if not path.startswith("/"):
        path = f"/v2/{path}"
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    all_headers = {"Content-Type": "application/json"}
    if auth is not None:
        all_headers["Authorization"] = auth
    all_headers.update(headers or {})
    own_conn = conn is None
    if own_conn:
        conn = http.client.HTTPConnection("127.0.0.1", emu.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=all_headers)
        resp = conn.getresponse()
        return Reply(resp.status, resp.headers, resp.read())
    finally:
        if own_conn:
            conn.close()


def post_run(emu, body: Any = None, endpoint: str = EP, **kw) -> Reply:
    if body is None:
        body = {"input": {"queue": "q", "jobs": [{"msg_id": 1}, {"msg_id": 2}]}}
    return request(emu, "POST", f"{endpoint}/run", body, **kw)


def get_status(emu, job_id: str, endpoint: str = EP, method: str = "GET", **kw) -> Reply:
    return request(emu, method, f"{endpoint}/status/{job_id}", **kw)


def raw_exchange(emu, data: bytes, timeout: float = WAIT_S) -> tuple[bytes, BaseException | None]:
    """Send raw bytes, read until EOF; returns (bytes read, exception that ended reading)."""
    with socket.create_connection(("127.0.0.1", emu.port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return received, None
                received += chunk
        except OSError as exc:
            return received, exc


def run_request_bytes(body: bytes, extra: str = "") -> bytes:
    head = (f"POST /v2/{EP}/run HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n")
    return head.encode() + body


@pytest.fixture
def make_emulator():
    """Factory: start an emulator with test defaults; every one is stopped afterwards."""
    started = []

    def make(**kwargs):
        if "endpoints" not in kwargs:
            kwargs.setdefault("endpoint_id", EP)
            kwargs.setdefault("api_key", KEY)
        emu = rpe.RunPodEmulator(**kwargs).start()
        started.append(emu)
        return emu

    yield make
    for emu in started:
        emu.stop()


@pytest.fixture
def emu(make_emulator):
    """An emulator whose jobs stay IN_QUEUE for the whole test unless a test says otherwise."""
    return make_emulator(in_queue_s=60.0, run_s=60.0)


# ----------------------------------------------------------------- /run basics


def test_run_success_shape_and_content_type(emu):
    reply = post_run(emu)
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "application/json"
    assert int(reply.headers["Content-Length"]) == len(reply.body)
    assert set(reply.json) == {"id", "status"}
    assert reply.json["status"] == "IN_QUEUE"
    assert JOB_ID_RE.match(reply.json["id"]), reply.json["id"]
    assert post_run(emu).json["id"] != reply.json["id"]


@pytest.mark.parametrize("authorization", [f"Bearer {KEY}", f"bearer {KEY}", KEY, f"  {KEY}  "])
def test_auth_accepts_bearer_and_bare_key(emu, authorization):
    reply = post_run(emu, auth=authorization)
    assert reply.status == 200, reply.body
    assert len(emu.run_bodies()) == 1


@pytest.mark.parametrize("authorization", [None, "", "Bearer wrong", "wrong", "Bearer ",
                                           f"Basic {KEY}", f"Bearer {KEY}x"])
def test_auth_rejects_missing_or_wrong_key(emu, authorization):
    reply = post_run(emu, auth=authorization)
    assert reply.status == 401
    assert reply.headers["Content-Type"] == "application/json"
    assert "error" in reply.json and "nauthorized" in reply.json["error"]
    assert emu.jobs() == []
    assert emu.run_bodies() == []
    assert emu.requests("run")[-1].status == 401


def test_each_endpoint_has_its_own_key(make_emulator):
    emu = make_emulator(endpoints={"ep-a": "key-a", "ep-b": "key-b"})
    assert post_run(emu, endpoint="ep-a", auth="Bearer key-a").status == 200
    assert post_run(emu, endpoint="ep-b", auth="key-b").status == 200
    assert post_run(emu, endpoint="ep-a", auth="Bearer key-b").status == 401
    assert len(emu.run_bodies("ep-a")) == 1
    assert len(emu.run_bodies("ep-b")) == 1


def test_unknown_endpoint_is_404_after_auth(emu):
    reply = post_run(emu, endpoint="no-such-endpoint")
    assert reply.status == 404
    assert "endpoint" in reply.json["error"]
    # Auth is checked first: a wrong key on an unknown endpoint is a 401.
    assert post_run(emu, endpoint="no-such-endpoint", auth="Bearer wrong").status == 401


@pytest.mark.parametrize("method,path", [
    ("GET", f"{EP}/run"),
    ("DELETE", f"{EP}/run"),
    ("POST", f"{EP}/nope"),
    ("POST", f"{EP}/status"),
    ("GET", f"{EP}/health/extra"),
    ("GET", "/"),
    ("POST", f"/v1/{EP}/run"),
])
def test_unknown_routes_are_404_json(emu, method, path):
    reply = request(emu, method, path, {"input": {}})
    assert reply.status == 404
    assert reply.headers["Content-Type"] == "application/json"
    assert "error" in reply.json


@pytest.mark.parametrize("body,message", [
    (b"", "empty"),
    (b"not json", "not valid JSON"),
    (b'{"input": ', "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b"{}", 'missing required member "input"'),
    (b'{"inputs": {}}', 'missing required member "input"'),
    (b'{"input": null}', '"input" must be a JSON object'),
    (b'{"input": []}', '"input" must be a JSON object'),
    (b'{"input": "text"}', '"input" must be a JSON object'),
    (b'{"input": 3}', '"input" must be a JSON object'),
])
def test_bad_bodies_are_400_with_json_error(emu, body, message):
    reply = post_run(emu, body)
    assert reply.status == 400
    assert message in reply.json["error"]
    assert emu.jobs() == []
    assert emu.run_bodies() == []


def test_empty_input_object_is_accepted(emu):
    assert post_run(emu, {"input": {}}).status == 200


def test_default_body_cap_is_10_mb(emu):
    assert rpe.DEFAULT_MAX_BODY_BYTES == 10 * 1000 * 1000
    assert emu.max_body_bytes == rpe.DEFAULT_MAX_BODY_BYTES
    skeleton = b'{"input":{"pad":""}}'
    at_cap = skeleton[:-3] + b"x" * (emu.max_body_bytes - len(skeleton)) + skeleton[-3:]
    assert len(at_cap) == 10_000_000
    conn = http.client.HTTPConnection("127.0.0.1", emu.port, timeout=30)
    try:
        assert post_run(emu, at_cap, conn=conn).status == 200
        assert post_run(emu, at_cap + b" ", conn=conn).status == 413
    finally:
        conn.close()


def test_body_cap_413_keeps_connection_usable(make_emulator):
    emu = make_emulator(max_body_bytes=1000)
    body = b'{"input": {"pad": "' + b"x" * 2000 + b'"}}'
    conn = http.client.HTTPConnection("127.0.0.1", emu.port, timeout=WAIT_S)
    try:
        reply = post_run(emu, body, conn=conn)
        assert reply.status == 413
        assert "too large" in reply.json["error"]
        sock = conn.sock
        # The over-size body was drained, so the same connection serves the next request.
        assert post_run(emu, conn=conn).status == 200
        assert conn.sock is sock
    finally:
        conn.close()
    rejected = emu.requests("run")[0]
    assert rejected.status == 413 and rejected.body_length == len(body) and rejected.body == b""
    assert len(emu.jobs()) == 1


def test_expect_100_continue_over_cap_is_refused_before_the_body(make_emulator):
    emu = make_emulator(max_body_bytes=100)
    head = (f"POST /v2/{EP}/run HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Length: 101\r\nExpect: 100-continue\r\n\r\n").encode()
    received, error = raw_exchange(emu, head)  # the body is never sent
    assert error is None
    assert received.startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in received
    assert b"Connection: close" in received


def test_expect_100_continue_under_cap_gets_continue(emu):
    body = json.dumps({"input": {"a": 1}}).encode()
    head = run_request_bytes(b"", "Expect: 100-continue\r\n").replace(
        b"Content-Length: 0", f"Content-Length: {len(body)}".encode())
    with socket.create_connection(("127.0.0.1", emu.port), timeout=WAIT_S) as sock:
        sock.sendall(head)
        interim = sock.recv(4096)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        final = b""
        while b"}" not in final:
            final += sock.recv(4096)
    assert final.startswith(b"HTTP/1.1 200 ")
    assert emu.run_bodies() == [{"input": {"a": 1}}]


def test_chunked_request_body_is_accepted(emu):
    body = json.dumps({"input": {"jobs": [1, 2, 3]}}).encode()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:7], body[7:])) \
        + b"0\r\n\r\n"
    head = (f"POST /v2/{EP}/run HTTP/1.1\r\nHost: x\r\nAuthorization: {KEY}\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode()
    received, error = raw_exchange(emu, head + chunked)
    assert error is None and received.startswith(b"HTTP/1.1 200 "), received
    assert emu.run_bodies() == [{"input": {"jobs": [1, 2, 3]}}]


# ----------------------------------------------------------------- job lifecycle


def test_lifecycle_on_a_fast_real_clock(make_emulator):
    emu = make_emulator(in_queue_s=0.5, run_s=0.5)
    job_id = post_run(emu).json["id"]
    first = get_status(emu, job_id).json
    assert first == {"id": job_id, "status": "IN_QUEUE"}

    emu.wait_for(lambda: emu.job(job_id)["status"] != "IN_QUEUE", WAIT_S, "job picked up")
    running = get_status(emu, job_id, method="POST").json  # POST is accepted on /status too
    assert running["status"] in ("IN_PROGRESS", "COMPLETED")
    assert running["delayTime"] == 500

    emu.wait_for(lambda: emu.job(job_id)["status"] == "COMPLETED", WAIT_S, "job completed")
    done = get_status(emu, job_id).json
    assert done["status"] == "COMPLETED"
    assert done["delayTime"] == 500 and done["executionTime"] == 500
    assert isinstance(done["delayTime"], int) and isinstance(done["executionTime"], int)
    assert done["output"] == {"transcribed": 2}


def test_lifecycle_on_a_manual_clock(make_emulator):
    clock = rpe.ManualClock()
    emu = make_emulator(clock=clock, in_queue_s=2.0, run_s=5.0, retention_s=60.0)
    job_id = post_run(emu, {"input": {"jobs": [{}, {}, {}]}}).json["id"]
    assert get_status(emu, job_id).json == {"id": job_id, "status": "IN_QUEUE"}

    clock.advance(2.0)
    assert get_status(emu, job_id).json == {"id": job_id, "status": "IN_PROGRESS", "delayTime": 2000,
                                            "executionTime": 0, "workerId": rpe.WORKER_ID}
    clock.advance(1.5)
    assert get_status(emu, job_id).json["executionTime"] == 1500

    clock.advance(3.5)
    done = get_status(emu, job_id).json
    assert done["status"] == "COMPLETED"
    assert (done["delayTime"], done["executionTime"]) == (2000, 5000)
    assert done["output"] == {"transcribed": 3}

    clock.advance(59.9)
    assert get_status(emu, job_id).status == 200
    clock.advance(0.2)  # 60.1 s after completion: past retention
    gone = get_status(emu, job_id)
    assert gone.status == 404 and "error" in gone.json
    assert emu.job(job_id) is None


def test_failed_job_reports_error_text(make_emulator):
    emu = make_emulator(in_queue_s=0.0, run_s=0.0)
    emu.job_plan = lambda job_input: {"final_status": "FAILED", "error": "boom: CUDA OOM"}
    job_id = post_run(emu).json["id"]
    emu.wait_for(lambda: emu.job(job_id)["status"] == "FAILED", WAIT_S)
    failed = get_status(emu, job_id).json
    assert failed["status"] == "FAILED"
    assert failed["error"] == "boom: CUDA OOM"
    assert "output" not in failed


def test_job_plan_chooses_per_job_and_defaults_fill_gaps(make_emulator):
    clock = rpe.ManualClock()
    emu = make_emulator(clock=clock, in_queue_s=1.0, run_s=1.0, final_status="COMPLETED")
    emu.job_plan = lambda job_input: (rpe.JobPlan(final_status="FAILED", run_s=3.0)
                                      if job_input.get("fail") else None)
    ok_id = post_run(emu, {"input": {"fail": False}}).json["id"]
    bad_id = post_run(emu, {"input": {"fail": True}}).json["id"]
    clock.advance(2.0)
    assert emu.job(ok_id)["status"] == "COMPLETED"
    assert emu.job(bad_id)["status"] == "IN_PROGRESS"
    clock.advance(2.0)
    bad = get_status(emu, bad_id).json
    assert bad["status"] == "FAILED" and bad["error"] == rpe.DEFAULT_FAILED_ERROR
    assert bad["executionTime"] == 3000


def test_job_plan_errors_become_500(make_emulator):
    emu = make_emulator()
    emu.job_plan = lambda job_input: {"no_such_field": 1}
    reply = post_run(emu)
    assert reply.status == 500
    assert "emulator error" in reply.json["error"]


def test_status_404_for_unknown_job_and_after_retention(make_emulator):
    emu = make_emulator(in_queue_s=0.0, run_s=0.0, retention_s=0.2)
    assert get_status(emu, "no-such-job").status == 404
    job_id = post_run(emu).json["id"]
    assert get_status(emu, job_id).json["status"] == "COMPLETED"
    # A job is only reachable on its own endpoint.
    emu.add_endpoint("ep-other", KEY)
    assert get_status(emu, job_id, endpoint="ep-other").status == 404
    emu.wait_for(lambda: emu.job(job_id) is None, WAIT_S, "retention to expire")
    assert get_status(emu, job_id).status == 404


def test_policy_ttl_deletes_the_job(make_emulator):
    clock = rpe.ManualClock()
    emu = make_emulator(clock=clock, in_queue_s=5.0, run_s=60.0)
    job_id = post_run(emu, {"input": {}, "policy": {"ttl": 10000}}).json["id"]
    clock.advance(9.9)
    assert get_status(emu, job_id).json["status"] == "IN_PROGRESS"
    clock.advance(0.2)
    assert get_status(emu, job_id).status == 404


def test_cancel_purge_and_retry(make_emulator):
    clock = rpe.ManualClock()
    emu = make_emulator(clock=clock, in_queue_s=10.0, run_s=10.0)
    cancelled = post_run(emu).json["id"]
    queued = [post_run(emu).json["id"] for _ in range(2)]

    reply = request(emu, "POST", f"{EP}/cancel/{cancelled}")
    assert reply.status == 200 and reply.json["status"] == "CANCELLED"
    assert get_status(emu, cancelled).json["status"] == "CANCELLED"
    assert request(emu, "POST", f"{EP}/cancel/nope").status == 404

    purge = request(emu, "POST", f"{EP}/purge-queue", {})
    assert purge.json == {"removed": 2, "status": "completed"}
    assert all(get_status(emu, job_id).status == 404 for job_id in queued)

    emu.job_plan = lambda job_input: {"final_status": "FAILED"}
    failing = post_run(emu).json["id"]
    assert request(emu, "POST", f"{EP}/retry/{failing}").status == 400  # still IN_QUEUE
    clock.advance(20.0)
    emu.job_plan = None
    retried = request(emu, "POST", f"{EP}/retry/{failing}")
    assert retried.json == {"id": failing, "status": "IN_QUEUE"}
    clock.advance(20.0)
    again = get_status(emu, failing).json
    assert again["status"] == "COMPLETED" and again["retries"] == 1


def test_runsync_waits_for_the_result(make_emulator):
    emu = make_emulator(in_queue_s=0.05, run_s=0.05)
    reply = request(emu, "POST", f"{EP}/runsync", {"input": {"jobs": [1]}})
    assert reply.status == 200
    assert reply.json["id"].startswith("sync-")
    assert reply.json["status"] == "COMPLETED" and reply.json["output"] == {"transcribed": 1}
    assert emu.run_bodies() == []  # only /run bodies are listed there


def test_health_counts_follow_the_jobs(make_emulator):
    clock = rpe.ManualClock()
    emu = make_emulator(clock=clock)
    plans = {"queued": {"in_queue_s": 60.0, "run_s": 1.0},
             "running": {"in_queue_s": 0.0, "run_s": 60.0},
             "done": {"in_queue_s": 0.0, "run_s": 0.0},
             "failed": {"in_queue_s": 0.0, "run_s": 0.0, "final_status": "FAILED"}}
    emu.job_plan = lambda job_input: plans[job_input["kind"]]
    ids = {}
    for kind in ("queued", "running", "done", "done", "failed"):
        ids[kind] = post_run(emu, {"input": {"kind": kind}}).json["id"]

    health = request(emu, "GET", f"{EP}/health")
    assert health.status == 200
    assert health.json["jobs"] == {"completed": 2, "failed": 1, "inProgress": 1, "inQueue": 1,
                                   "retried": 0}
    assert health.json["workers"]["running"] == 1
    assert set(health.json["workers"]) >= {"idle", "running"}

    assert request(emu, "POST", f"{EP}/retry/{ids['failed']}").status == 200
    clock.advance(1.0)  # the retried job fails again at once, "queued" is still queued
    assert request(emu, "GET", f"{EP}/health").json["jobs"] == {
        "completed": 2, "failed": 1, "inProgress": 1, "inQueue": 1, "retried": 1}


def test_unhealthy_workers_hold_the_queue(make_emulator):
    """A crash loop: /health says unhealthy, queued jobs stay IN_QUEUE (running ones go
    on); healed, the queue wait resumes where it stopped."""
    clock = rpe.ManualClock()
    emu = make_emulator(clock=clock)
    emu.job_plan = lambda job_input: {"in_queue_s": job_input["q"], "run_s": 10.0}
    running = post_run(emu, {"input": {"q": 0.0}}).json["id"]
    queued = post_run(emu, {"input": {"q": 2.0}}).json["id"]
    clock.advance(1.0)
    emu.set_unhealthy_workers(3)
    late = post_run(emu, {"input": {"q": 0.0}}).json["id"]
    clock.advance(100.0)
    workers = request(emu, "GET", f"{EP}/health").json["workers"]
    assert workers["unhealthy"] == 3 and workers["idle"] == 0
    assert [emu.job(j)["status"] for j in (queued, late)] == ["IN_QUEUE", "IN_QUEUE"]
    assert emu.job(running)["status"] == "COMPLETED"
    emu.set_unhealthy_workers(0)
    assert request(emu, "GET", f"{EP}/health").json["workers"]["unhealthy"] == 0
    assert emu.job(late)["status"] == "IN_PROGRESS"          # its wait was 0
    assert emu.job(queued)["status"] == "IN_QUEUE"           # 1 s of its 2 s left
    clock.advance(1.0)
    view = get_status(emu, queued).json
    assert view["status"] == "IN_PROGRESS" and view["delayTime"] == 102000


# ----------------------------------------------------------------- faults


def test_status_fault_429_with_retry_after_is_one_shot(emu):
    emu.add_fault(rpe.Fault.status(429, headers={"Retry-After": "2"}))
    limited = post_run(emu)
    assert limited.status == 429
    assert limited.headers["Retry-After"] == "2"
    assert limited.json == {"error": "Too Many Requests"}
    assert emu.jobs() == [] and emu.pending_faults() == []
    assert post_run(emu).status == 200  # the fault was used up
    records = emu.requests("run")
    assert [r.status for r in records] == [429, 200]
    assert records[0].fault.kind == "status" and records[1].fault is None
    assert records[0].accepted is False and records[1].accepted is True


def test_status_fault_retry_after_http_date_and_custom_body(emu):
    date = rpe.http_date(30)
    emu.add_fault(rpe.Fault.status(503, body="upstream down", headers={"Retry-After": date}))
    reply = post_run(emu)
    assert reply.status == 503 and reply.body == b"upstream down"
    retry_at = email.utils.parsedate_to_datetime(reply.headers["Retry-After"]).timestamp()
    assert 20 < retry_at - time.time() <= 31


def test_faults_are_consumed_in_fifo_order(emu):
    emu.add_fault(rpe.Fault.status(500), rpe.Fault.status(502), rpe.Fault.status(504))
    assert [post_run(emu).status for _ in range(4)] == [500, 502, 504, 200]


def test_status_fault_with_create_job_leaves_a_job_behind(emu):
    emu.add_fault(rpe.Fault.status(504, create_job=True))
    assert post_run(emu).status == 504
    record = emu.requests("run")[0]
    assert record.job_id is not None and not record.accepted
    assert [job["id"] for job in emu.jobs()] == [record.job_id]
    assert emu.run_bodies() == []


def test_delay_fault_times_out_the_client_but_creates_the_job(emu):
    emu.add_fault(rpe.Fault.delay(0.6))
    with pytest.raises(TimeoutError):
        post_run(emu, timeout=0.2)
    record = emu.wait_for(lambda: emu.requests("run"), WAIT_S, "the delayed /run")[0]
    assert record.status == 200 and record.accepted and record.fault.kind == "delay"
    assert record.responded_at - record.received_at >= 0.6
    assert emu.job(record.job_id)["status"] == "IN_QUEUE"
    assert len(emu.run_bodies()) == 1


def _usable_job_id(body: bytes) -> str | None:
    """The job id a careful client would take from a /run reply, or None."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    job_id = obj.get("id") if isinstance(obj, dict) else None
    return job_id if isinstance(job_id, str) and job_id else None


@pytest.mark.parametrize("variant,content_type", [
    ("not_json", "text/html"),
    ("empty", "application/json"),
    ("no_id", "application/json"),
    ("id_not_string", "application/json"),
])
def test_malformed_fault_answers_200_without_a_usable_id(emu, variant, content_type):
    emu.add_fault(rpe.Fault.malformed(variant))
    reply = post_run(emu)
    assert reply.status == 200
    assert reply.headers["Content-Type"] == content_type
    assert _usable_job_id(reply.body) is None, reply.body
    assert (reply.body == b"") == (variant == "empty")
    assert emu.jobs() == [] and emu.run_bodies() == []
    assert _usable_job_id(post_run(emu).body) is not None  # one-shot


def test_malformed_extra_fields_is_still_an_accept(emu):
    emu.add_fault(rpe.Fault.malformed("extra_fields"))
    reply = post_run(emu)
    assert reply.status == 200
    assert JOB_ID_RE.match(reply.json["id"]) and reply.json["status"] == "IN_QUEUE"
    assert set(reply.json) - {"id", "status"}  # unknown members to be ignored
    assert len(emu.run_bodies()) == 1


@pytest.mark.parametrize("create_job", [False, True])
def test_close_fault_drops_the_connection_without_reply(emu, create_job):
    emu.add_fault(rpe.Fault.close(create_job=create_job))
    body = json.dumps({"input": {"jobs": [1]}}).encode()
    received, error = raw_exchange(emu, run_request_bytes(body))
    assert received == b"" and error is None  # orderly EOF, no status line
    record = emu.requests("run")[0]
    assert record.status is None and record.fault.kind == "close"
    assert record.body == body  # the request was read in full first
    assert len(emu.jobs()) == (1 if create_job else 0)
    assert emu.run_bodies() == []
    with pytest.raises(http.client.RemoteDisconnected):
        emu.add_fault(rpe.Fault.close())
        post_run(emu)


@pytest.mark.parametrize("create_job", [False, True])
def test_reset_fault_resets_the_connection_mid_response(emu, create_job):
    emu.add_fault(rpe.Fault.reset(create_job=create_job))
    received, error = raw_exchange(emu, run_request_bytes(b'{"input": {}}'))
    assert isinstance(error, ConnectionResetError), (received, error)
    assert b"\r\n\r\n{\"id\": \"" in received or received == b""  # at most the partial reply
    record = emu.requests("run")[0]
    assert record.status is None and record.fault.kind == "reset"
    assert len(emu.jobs()) == (1 if create_job else 0)
    emu.add_fault(rpe.Fault.reset())
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        post_run(emu)


def test_fault_restricted_to_status_route(emu):
    emu.add_fault(rpe.Fault.status(503, route="status"))
    job_id = post_run(emu).json["id"]  # /run does not consume the status fault
    assert get_status(emu, job_id).status == 503
    assert get_status(emu, job_id).status == 200
    emu.add_fault(rpe.Fault.malformed("not_json", route="health"))
    health = request(emu, "GET", f"{EP}/health")
    assert health.status == 200 and health.headers["Content-Type"] == "text/html"


def test_fault_rejects_unknown_kind_and_route():
    with pytest.raises(ValueError):
        rpe.Fault("explode")
    with pytest.raises(ValueError):
        rpe.Fault.status(500, route="nowhere")


def test_random_faults_are_reproducible_with_a_seed(make_emulator):
    sequences = []
    for _ in range(2):
        emu = make_emulator(seed=1234)
        emu.add_random_fault(rpe.Fault.status(503), probability=0.5)
        sequences.append([post_run(emu).status for _ in range(40)])
    assert sequences[0] == sequences[1]
    assert set(sequences[0]) == {200, 503}


def test_random_fault_probability_bounds(make_emulator):
    emu = make_emulator()
    emu.add_random_fault(rpe.Fault.status(500), probability=0.0)
    emu.add_random_fault(rpe.Fault.status(502), probability=1.0)
    assert [post_run(emu).status for _ in range(5)] == [502] * 5
    emu.add_fault(rpe.Fault.status(429))  # one-shot faults come first
    assert post_run(emu).status == 429
    with pytest.raises(ValueError):
        emu.add_random_fault(rpe.Fault.status(500), probability=1.5)


def test_parse_fault_spec():
    probability, fault = rpe.parse_fault_spec("0.1:status:429:2")
    assert probability == 0.1 and fault.code == 429 and fault.headers == {"Retry-After": "2"}
    assert rpe.parse_fault_spec("0.01:close:create")[1].create_job is True
    assert rpe.parse_fault_spec("0.5:delay:3")[1].delay_s == 3.0
    with pytest.raises(ValueError):
        rpe.parse_fault_spec("0.5:explode")


# ----------------------------------------------------------------- caps and concurrency


def test_rate_cap_sliding_window(make_emulator):
    clock = rpe.ManualClock()
    emu = make_emulator(clock=clock, rate_cap=3, rate_window_s=10.0, rate_retry_after="auto")
    assert [post_run(emu).status for _ in range(3)] == [200, 200, 200]
    clock.advance(4.0)
    limited = post_run(emu)
    assert limited.status == 429
    assert limited.headers["Retry-After"] == "6"  # the oldest slot frees 6 s from now
    assert "rate limit" in limited.json["error"]
    clock.advance(6.0)
    assert post_run(emu).status == 200
    assert len(emu.run_bodies()) == 4


def test_rate_cap_without_retry_after_header(make_emulator):
    emu = make_emulator(rate_cap=1)
    assert post_run(emu).status == 200
    limited = post_run(emu)
    assert limited.status == 429 and "Retry-After" not in limited.headers


def test_max_concurrent_run_tracks_overlapping_requests(emu):
    emu.hold_runs()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(post_run, emu) for _ in range(4)]
        emu.wait_for(lambda: emu.in_flight_run == 4, WAIT_S, "4 /run in flight")
        emu.release_runs()
        assert [f.result(timeout=WAIT_S).status for f in futures] == [200] * 4
    assert emu.in_flight_run == 0
    post_run(emu)  # sequential requests do not raise the maximum
    assert emu.max_concurrent_run == 4
    assert len(emu.run_bodies()) == 5


def test_concurrency_cap_answers_429(make_emulator):
    emu = make_emulator(concurrency_cap=2, concurrency_retry_after=1)
    emu.hold_runs()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        held = [pool.submit(post_run, emu) for _ in range(2)]
        # Parked at the gate means admitted: counting them merely in flight
        # raced with their admission, which a third request could then fail.
        emu.wait_for(lambda: emu.held_run == 2, WAIT_S, "2 /run admitted and held")
        over = post_run(emu)
        assert over.status == 429 and over.headers["Retry-After"] == "1"
        emu.release_runs()
        assert [f.result(timeout=WAIT_S).status for f in held] == [200, 200]
    assert post_run(emu).status == 200
    assert emu.max_concurrent_run == 3


# ----------------------------------------------------------------- HTTP behaviour and recording


def test_keep_alive_serves_two_requests_on_one_connection(emu):
    conn = http.client.HTTPConnection("127.0.0.1", emu.port, timeout=WAIT_S)
    try:
        first = post_run(emu, conn=conn)
        sock = conn.sock
        assert sock is not None  # the server did not close it after the first reply
        second = get_status(emu, first.json["id"], conn=conn)
        assert conn.sock is sock
        assert second.status == 200 and second.json["id"] == first.json["id"]
        third = post_run(emu, b"junk", conn=conn)  # an error reply keeps the connection too
        assert third.status == 400 and conn.sock is sock
    finally:
        conn.close()
    addresses = {record.client_address for record in emu.requests()}
    assert len(addresses) == 1
    assert "Connection" not in first.headers


def test_requests_are_recorded_for_assertions(emu):
    body = {"input": {"queue": "q", "jobs": [{"msg_id": 9007199254740993}]}}
    raw = json.dumps(body).encode()
    before = time.monotonic()
    job_id = post_run(emu, raw, headers={"X-Trace": "abc"}).json["id"]
    post_run(emu, b"{}")  # rejected: recorded but not in run_bodies()
    get_status(emu, job_id)

    runs = emu.requests("run")
    assert len(runs) == 2 and len(emu.requests()) == 3
    record = runs[0]
    assert record.method == "POST" and record.path == f"/v2/{EP}/run"
    assert record.route == "run" and record.endpoint_id == EP
    assert record.body == raw and record.json == body
    assert record.json["input"]["jobs"][0]["msg_id"] == 2**53 + 1  # exact integer
    assert record.header("x-trace") == "abc" and record.header("AUTHORIZATION") == f"Bearer {KEY}"
    assert record.header("missing") is None
    assert record.status == 200 and record.job_id == job_id and record.accepted
    assert before <= record.received_at <= record.responded_at <= time.monotonic()
    assert runs[1].status == 400 and not runs[1].accepted and runs[1].job_id is None
    assert emu.run_bodies() == [body]
    assert [r.status for r in emu.requests(f"status/{job_id}")] == [200]
    assert emu.requests("runsync") == []
    assert "jobs=1" in record.summary() and KEY not in record.summary()


def test_wait_for_returns_value_and_times_out_with_a_summary(emu):
    post_run(emu)
    assert emu.wait_for(lambda: len(emu.run_bodies()), 1.0) == 1
    started = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        emu.wait_for(lambda: len(emu.run_bodies()) == 2, 0.2, "a second /run")
    assert time.monotonic() - started >= 0.2
    assert "a second /run" in str(info.value) and f"POST /v2/{EP}/run 200" in str(info.value)


def test_wait_for_wakes_on_a_new_request(emu):
    result: list[Any] = []
    waiter = threading.Thread(
        target=lambda: result.append(emu.wait_for(lambda: emu.run_bodies(), WAIT_S)))
    waiter.start()
    post_run(emu)
    waiter.join(WAIT_S)
    assert not waiter.is_alive() and len(result[0]) == 1


def test_reset_forgets_requests_jobs_faults_and_tunables(emu):
    post_run(emu)
    emu.add_fault(rpe.Fault.status(500))
    emu.add_random_fault(rpe.Fault.status(502), 1.0)
    emu.job_plan = lambda job_input: {"final_status": "FAILED"}
    emu.rate_cap = 0
    emu.reset()
    assert emu.requests() == [] and emu.jobs() == [] and emu.pending_faults() == []
    assert emu.max_concurrent_run == 0 and emu.job_plan is None and emu.rate_cap is None
    assert post_run(emu).status == 200


def test_latency_and_status_delay(make_emulator):
    emu = make_emulator(latency_s=0.1, status_delay_s=0.2)
    started = time.monotonic()
    job_id = post_run(emu).json["id"]
    assert time.monotonic() - started >= 0.1
    started = time.monotonic()
    assert get_status(emu, job_id).status == 200
    assert time.monotonic() - started >= 0.3


def test_stop_closes_listener_and_idle_connections(make_emulator):
    emu = make_emulator()
    port = emu.port
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_S)
    post_run(emu, conn=conn)
    idle = conn.sock
    emu.stop()
    idle.settimeout(WAIT_S)
    assert idle.recv(1) == b""  # the server closed the kept-alive connection
    conn.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
    emu.stop()  # idempotent


def test_base_url_and_url_helper(emu):
    assert emu.base_url == f"http://127.0.0.1:{emu.port}/v2"
    assert emu.url("status", "abc") == f"{emu.base_url}/{EP}/status/abc"
    assert emu.endpoint_id == EP and emu.api_key == KEY


# ----------------------------------------------------------------- command line


def _line_reader(stream) -> tuple["queue.Queue[str]", threading.Thread]:
    """Lines of a subprocess pipe, read by a thread so that waits can have deadlines."""
    lines: "queue.Queue[str]" = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line.rstrip("\n"))

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return lines, thread


def _expect_line(lines: "queue.Queue[str]", pattern: str, seen: list[str],
                 timeout: float = WAIT_S) -> re.Match:
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no line matching {pattern!r}; saw {seen}")
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            continue
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_cli_logs_requests_without_the_key_and_exits_on_signal(stop_signal):
    cmd = [sys.executable, str(EMULATOR_PATH), "--host", "127.0.0.1", "--port", "0",
           "--endpoint", EP, "--api-key", KEY, "--in-queue-s", "0", "--run-s", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    try:
        lines, pump = _line_reader(proc.stdout)
        match = _expect_line(
            lines, rf"^runpod-emulator listening on http://127\.0\.0\.1:(\d+)/v2 endpoint={EP}$",
            seen)
        port = int(match.group(1))
        assert port > 0

        class Target:  # what request() needs from an emulator
            pass
        target = Target()
        target.port = port
        body = {"input": {"jobs": [{"msg_id": 1}, {"msg_id": 2}]}}
        job_id = post_run(target, body).json["id"]
        assert post_run(target, auth="Bearer nope").status == 401
        assert get_status(target, job_id).json["status"] == "COMPLETED"
        _expect_line(lines, rf"^POST /v2/{EP}/run 200 jobs=2 id={re.escape(job_id)} ", seen)
        _expect_line(lines, rf"^POST /v2/{EP}/run 401 ", seen)
        _expect_line(lines, rf"^GET /v2/{EP}/status/{re.escape(job_id)} 200 ", seen)

        proc.send_signal(stop_signal)
        assert proc.wait(timeout=WAIT_S) == 0
        pump.join(WAIT_S)
        while not lines.empty():
            seen.append(lines.get())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read()
    assert seen[-1] == "runpod-emulator stopped"
    assert KEY not in "\n".join(seen) + stderr
    assert stderr == ""
