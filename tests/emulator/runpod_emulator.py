#!/usr/bin/python3
"""RunPod Serverless (queue-based endpoint) emulator for pgmq-dispatcher tests.

Imitates the public job API of ``https://api.runpod.ai/v2`` closely enough for
the dispatcher's HTTP client, and records every request so that tests can
assert on what the daemon sent. Standard library only; runs under Debian's
/usr/bin/python3. Behaviour follows the project's RunPod Serverless API
reference (runpod-serverless-api.md, §1-§8.1); where the public API is
unconfirmed (error bodies, 413, retry on a non-failed job) the choices are
documented here and are configurable or injectable as faults.

In-process use (tests)::

    emu = RunPodEmulator(endpoint_id="ep1", api_key="k", in_queue_s=0.05, run_s=0.05)
    emu.start()                     # returns once the socket listens
    ... point the daemon at emu.base_url ...
    emu.add_fault(Fault.status(429, headers={"Retry-After": "2"}))
    emu.wait_for(lambda: len(emu.run_bodies()) == 3, timeout_s=10)
    emu.stop()

Command line (manual runs, C integration tests started as a subprocess)::

    /usr/bin/python3 tests/emulator/runpod_emulator.py --port 0 --endpoint EP --api-key KEY

Routes, all under ``/v2/{endpoint_id}/``: ``run`` (POST), ``runsync`` (POST),
``status/{id}`` (GET, POST), ``cancel/{id}`` (POST), ``retry/{id}`` (POST),
``purge-queue`` (POST), ``health`` (GET). Everything else is a 404 JSON reply.

HTTPS: give ``tls_cert`` and ``tls_key`` (PEM files; CLI ``--tls-cert``/``--tls-key``) and the
emulator serves TLS instead (``base_url`` then says ``https://``). Handshakes that the client
aborts, e.g. because it refused the certificate, are counted in ``tls_handshake_failures``.
"""

from __future__ import annotations

import argparse
import email.utils
import http
import http.server
import json
import math
import os
import random
import signal
import socket
import ssl
import struct
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "RunPodEmulator", "Fault", "JobPlan", "ManualClock", "RequestRecord",
    "http_date", "parse_fault_spec", "main",
    "DEFAULT_MAX_BODY_BYTES", "DEFAULT_RETENTION_S", "TERMINAL_STATUSES", "WORKER_ID",
]

DEFAULT_ENDPOINT_ID = "test-endpoint"
DEFAULT_API_KEY = "test-api-key"
DEFAULT_IN_QUEUE_S = 2.0
DEFAULT_RUN_S = 5.0
DEFAULT_FINAL_STATUS = "COMPLETED"
DEFAULT_FAILED_ERROR = "emulated failure"
DEFAULT_RETENTION_S = 30 * 60.0  # async results live 30 min after completion (§6.4)
SYNC_RETENTION_S = 60.0  # /runsync results live 1 min (§6.4)
DEFAULT_MAX_BODY_BYTES = 10 * 1000 * 1000  # /run cap (§6.3)
DEFAULT_RUNSYNC_MAX_BODY_BYTES = 20 * 1000 * 1000  # /runsync cap (§6.3)
DEFAULT_RATE_WINDOW_S = 10.0
WORKER_ID = "emu-worker-1"

TERMINAL_STATUSES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"})
RETRYABLE_STATUSES = frozenset({"FAILED", "TIMED_OUT"})

# route -> HTTP methods it accepts (§2: status accepts GET and POST)
ROUTE_METHODS = {
    "run": ("POST",),
    "runsync": ("POST",),
    "status": ("GET", "POST"),
    "cancel": ("POST",),
    "retry": ("POST",),
    "purge-queue": ("POST",),
    "health": ("GET",),
}
ROUTES_WITH_JOB_ID = frozenset({"status", "cancel", "retry"})

FAULT_KINDS = ("status", "delay", "malformed", "close", "reset")
MALFORMED_VARIANTS = ("not_json", "empty", "no_id", "id_not_string", "extra_fields",
                      "id_bad_escape", "id_nul_escape", "id_control", "id_bad_utf8", "id_too_long")
# Raw /run reply bodies whose "id" a lenient JSON parser may read as a
# plausible, cut-off id (Debian's cJSON: "job\uX000" -> "job",
# "abc\u0000def" -> "abc"). Written as bytes: json.dumps cannot make them.
_BAD_ID_BODIES = {
    "id_bad_escape": b'{"id":"job\\uX000","status":"IN_QUEUE"}',
    "id_nul_escape": b'{"id":"abc\\u0000def","status":"IN_QUEUE"}',
    "id_control": b'{"id":"abc\\u001b[2Jdef","status":"IN_QUEUE"}',
    "id_bad_utf8": b'{"id":"abc\xc0\xafdef","status":"IN_QUEUE"}',
    "id_too_long": b'{"id":"' + b"j" * 300 + b'","status":"IN_QUEUE"}',
}
ANY_ROUTE = "*"

# Bodies larger than the cap are read and discarded (so the connection stays
# usable for keep-alive) up to this size; beyond it the connection is closed.
_MAX_DRAIN_BYTES = 64 * 1000 * 1000
_DEFAULT_RESET_PARTIAL = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    b"Content-Length: 64\r\n\r\n{\"id\": \""
)
# Upper bound of one Condition.wait in wait_for(): job states change with the
# clock, not only with events, so predicates are re-checked at least this often.
_WAIT_SLICE_S = 0.05


def http_date(offset_s: float = 0.0) -> str:
    """An IMF-fixdate (RFC 9110) ``offset_s`` from now, e.g. for ``Retry-After``."""
    return email.utils.formatdate(time.time() + offset_s, usegmt=True)


def _ms(seconds: float) -> int:
    return int(round(seconds * 1000.0))


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


class ManualClock:
    """A clock that moves only when told to, for deterministic job lifecycles.

    Pass as ``RunPodEmulator(clock=ManualClock())``; it drives job states,
    retention, ``policy.ttl`` and the rate-cap window. Request timestamps in the
    records always use ``time.monotonic()``.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds


@dataclass(frozen=True)
class JobPlan:
    """How one job behaves; ``None`` fields take the emulator's defaults.

    ``output`` defaults to ``{"transcribed": len(input["jobs"])}`` (0 when the
    input has no ``jobs`` list); ``omit_output`` imitates a COMPLETED job whose
    result upload failed (§4). ``error`` defaults to "emulated failure" for FAILED.
    """

    in_queue_s: float | None = None
    run_s: float | None = None
    final_status: str | None = None
    error: str | None = None
    output: Any = None
    omit_output: bool = False


@dataclass(frozen=True)
class Fault:
    """One injected misbehaviour of the emulator.

    kind       "status" (answer ``code`` with ``body``/``headers``), "delay" (sleep
               ``delay_s`` then answer normally), "malformed" (200 with a broken
               body, see ``variant``), "close" (read the request, then close the
               connection without any response), "reset" (send ``body`` or a
               partial 200 response, then reset the connection with RST).
    delay_s    Sleep before acting; for every kind, so ``Fault.status(504,
               delay_s=2)`` is a slow gateway timeout.
    variant    For "malformed": "not_json" (200 text/html), "empty" (200, no
               body), "no_id" (``{"status": "IN_QUEUE"}``), "id_not_string"
               (``{"id": 12345, ...}``), "extra_fields" (normal handling plus
               unknown members in the JSON reply; a /run is then accepted),
               "id_bad_escape" (``"job\\uX000"``), "id_nul_escape"
               (``"abc\\u0000def"``), "id_control" (an escaped ESC), "id_bad_utf8"
               (an overlong UTF-8 sequence), "id_too_long" (300 bytes): ids a
               lenient parser may take as a plausible, cut-off id.
    create_job For "status", "malformed" (except "extra_fields"), "close" and
               "reset" on /run: whether a job is still created from a valid body
               (the "outcome unknown" case: RunPod queued it, the reply was lost).
    route      Route the fault applies to: "run" (default), "status", "health",
               "cancel", "runsync", "retry", "purge-queue", or "*" for any.
    """

    kind: str
    code: int = 500
    body: bytes | str | dict | list | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    variant: str = "not_json"
    create_job: bool = False
    route: str = "run"

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {FAULT_KINDS}")
        if self.variant not in MALFORMED_VARIANTS:
            raise ValueError(f"unknown malformed variant {self.variant!r}")
        if self.route != ANY_ROUTE and self.route not in ROUTE_METHODS:
            raise ValueError(f"unknown route {self.route!r}")
        if not 100 <= self.code <= 999:
            raise ValueError(f"bad HTTP status code {self.code}")

    # Convenience constructors: Fault.status(429, headers={"Retry-After": "2"}) etc.
    @classmethod
    def status(cls, code: int, body: Any = None, headers: Mapping[str, str] | None = None,
               **kw: Any) -> "Fault":
        return cls("status", code=code, body=body, headers=dict(headers or {}), **kw)

    @classmethod
    def delay(cls, delay_s: float, **kw: Any) -> "Fault":
        return cls("delay", delay_s=delay_s, **kw)

    @classmethod
    def malformed(cls, variant: str = "not_json", **kw: Any) -> "Fault":
        return cls("malformed", variant=variant, **kw)

    @classmethod
    def close(cls, create_job: bool = False, **kw: Any) -> "Fault":
        return cls("close", create_job=create_job, **kw)

    @classmethod
    def reset(cls, create_job: bool = False, **kw: Any) -> "Fault":
        return cls("reset", create_job=create_job, **kw)

    def applies_to(self, route: str | None) -> bool:
        return self.route == ANY_ROUTE or self.route == route


@dataclass
class RequestRecord:
    """One request as the emulator saw it and answered it.

    ``status`` is None when no response was sent ("close"/"reset" faults, or the
    client vanished mid-body). ``accepted`` is true only for a /run that created
    a job and answered 2xx with its id — the client may still have missed the
    answer (see ``client_error``), which is the "outcome unknown" case.
    """

    seq: int
    received_at: float
    method: str
    path: str
    route: str | None
    endpoint_id: str | None
    headers: dict[str, str]
    client_address: tuple
    body: bytes = b""
    body_length: int = 0
    json: Any = None
    json_error: str | None = None
    responded_at: float | None = None
    status: int | None = None
    job_id: str | None = None
    accepted: bool = False
    fault: Fault | None = None
    client_error: str | None = None

    def header(self, name: str, default: str | None = None) -> str | None:
        """Case-insensitive header lookup."""
        wanted = name.lower()
        for key, value in self.headers.items():
            if key.lower() == wanted:
                return value
        return default

    def summary(self) -> str:
        """One concise line, also used for the CLI log; never shows headers (API key)."""
        parts = [self.method, self.path, str(self.status) if self.status is not None else "-"]
        if self.route in ("run", "runsync") and isinstance(self.json, dict):
            job_input = self.json.get("input")
            if isinstance(job_input, dict) and isinstance(job_input.get("jobs"), list):
                parts.append(f"jobs={len(job_input['jobs'])}")
        if self.job_id:
            parts.append(f"id={self.job_id}")
        if self.fault is not None:
            parts.append(f"fault={self.fault.kind}")
        if self.client_error:
            parts.append(f"client_error={self.client_error!r}")
        if self.responded_at is not None:
            parts.append(f"{(self.responded_at - self.received_at) * 1000.0:.1f}ms")
        return " ".join(parts)


@dataclass
class _Reply:
    """What the API layer decided; the HTTP layer turns it into bytes (or not)."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
    action: str = "respond"  # "respond" | "close" | "reset"


def _json_reply(status: int, obj: Any, headers: Mapping[str, str] | None = None) -> _Reply:
    return _Reply(status=status, body=_json_bytes(obj), headers=dict(headers or {}))


def _error_reply(status: int, message: str, headers: Mapping[str, str] | None = None) -> _Reply:
    return _json_reply(status, {"error": message}, headers)


class _Job:
    """A job's whole timeline, computed from its plan and the clock (no threads)."""

    def __init__(self, job_id: str, endpoint_id: str, job_input: Any, ttl_s: float | None,
                 sync: bool) -> None:
        self.id = job_id
        self.endpoint_id = endpoint_id
        self.input = job_input
        self.ttl_s = ttl_s
        self.sync = sync
        self.retries = 0
        self.created = 0.0
        self.plan = JobPlan()
        self.cancelled_at: float | None = None
        self.stalled_since: float | None = None  # no healthy worker takes it (crash loop)
        self.stalled_s = 0.0  # time spent stalled before, added to the queue wait

    def schedule(self, created: float, plan: JobPlan) -> None:
        """(Re)start the timeline; ``plan`` has every field resolved."""
        self.created = created
        self.plan = plan
        self.cancelled_at = None
        self.stalled_s = 0.0

    def stall(self, now: float, new: bool = False) -> None:
        """Workers crash at start: a job still queued (or new) stays IN_QUEUE until unstalled."""
        if self.stalled_since is None and (new or self.status(now) == "IN_QUEUE"):
            self.stalled_since = now

    def unstall(self, now: float) -> None:
        """Healthy workers again: the queue wait goes on where it stopped."""
        if self.stalled_since is not None:
            self.stalled_s += now - self.stalled_since
            self.stalled_since = None

    @property
    def start_at(self) -> float:
        if self.stalled_since is not None:
            return math.inf
        return self.created + self.plan.in_queue_s + self.stalled_s

    @property
    def finished_at(self) -> float:
        if self.cancelled_at is not None:
            return self.cancelled_at
        return self.start_at + self.plan.run_s

    def status(self, now: float) -> str:
        if self.cancelled_at is not None:
            return "CANCELLED"
        if now < self.start_at:
            return "IN_QUEUE"
        if now < self.finished_at:
            return "IN_PROGRESS"
        return self.plan.final_status

    def expired(self, now: float, retention_s: float) -> bool:
        if self.ttl_s is not None and now >= self.created + self.ttl_s:
            return True  # policy.ttl deletes a job even mid-run (§3.1)
        if self.sync:
            retention_s = min(retention_s, SYNC_RETENTION_S)
        return self.status(now) in TERMINAL_STATUSES and now >= self.finished_at + retention_s

    def view(self, now: float) -> dict[str, Any]:
        """The job object of §4 as /status returns it."""
        status = self.status(now)
        view: dict[str, Any] = {"id": self.id, "status": status}
        if now >= self.start_at and (self.cancelled_at is None or self.cancelled_at >= self.start_at):
            view["delayTime"] = _ms(self.start_at - self.created)
            view["executionTime"] = _ms(min(now, self.finished_at) - self.start_at)
            view["workerId"] = WORKER_ID
        if status == "COMPLETED" and not self.plan.omit_output:
            view["output"] = self.plan.output
        if status in RETRYABLE_STATUSES and self.plan.error is not None:
            view["error"] = self.plan.error
        if self.retries:
            view["retries"] = self.retries
        return view


def _parse_path(path: str) -> tuple[str | None, str | None, str | None]:
    """``/v2/{endpoint}/{route}[/{job_id}]`` -> (route, endpoint_id, job_id).

    route is None for a path that is not a known operation; endpoint_id is None
    when the path is not under ``/v2/{endpoint}/`` at all.
    """
    parts = path.split("/")
    if len(parts) < 4 or parts[0] != "" or parts[1] != "v2" or not parts[2]:
        return None, None, None
    endpoint_id, route, rest = parts[2], parts[3], parts[4:]
    if route not in ROUTE_METHODS:
        return None, endpoint_id, None
    if route in ROUTES_WITH_JOB_ID:
        if len(rest) != 1 or not rest[0]:
            return None, endpoint_id, None
        return route, endpoint_id, rest[0]
    if rest:
        return None, endpoint_id, None
    return route, endpoint_id, None


def _extract_api_key(authorization: str | None) -> str | None:
    """Accept ``Bearer <key>`` (what the SDKs send) and the bare key (docs examples)."""
    if authorization is None:
        return None
    value = authorization.strip()
    scheme, _, rest = value.partition(" ")
    if scheme.lower() == "bearer" and rest.strip():
        return rest.strip()
    return value or None


def _job_body_error(record: RequestRecord) -> str | None:
    """Why a /run or /runsync body is unacceptable, or None (§3, §3.3)."""
    if not record.body:
        return "request body is empty"
    if record.json_error is not None:
        return f"request body is not valid JSON: {record.json_error}"
    if not isinstance(record.json, dict):
        return "request body must be a JSON object"
    if "input" not in record.json:
        return 'missing required member "input"'
    if not isinstance(record.json["input"], dict):
        return '"input" must be a JSON object'
    return None


def _default_output(job_input: Any) -> Any:
    jobs = job_input.get("jobs") if isinstance(job_input, dict) else None
    return {"transcribed": len(jobs) if isinstance(jobs, list) else 0}


def _policy_ttl_s(body: Any) -> float | None:
    policy = body.get("policy") if isinstance(body, dict) else None
    ttl = policy.get("ttl") if isinstance(policy, dict) else None
    if isinstance(ttl, (int, float)) and not isinstance(ttl, bool) and ttl > 0:
        return ttl / 1000.0
    return None


class RunPodEmulator:
    """An in-process RunPod Serverless endpoint emulator with request recording.

    Tunables below are plain attributes that tests may change at run time;
    ``reset()`` puts them back to the constructor values.

    endpoints        {endpoint_id: api_key}; default {endpoint_id: api_key}.
    in_queue_s, run_s, final_status
                     Default job timeline; per job override via ``job_plan``.
    retention_s      How long a finished job stays visible to /status (then 404).
    max_body_bytes   /run body cap (413 above); /runsync uses max(this, 20 MB).
    latency_s        Added before answering every request (routed ones).
    status_delay_s   Extra delay before answering /status.
    unhealthy_workers
                     Workers in a crash loop (§7 ``workers.unhealthy``); while it is
                     above 0 no job starts: queued jobs stay IN_QUEUE (running ones
                     go on). Change it with ``set_unhealthy_workers()``.
    rate_cap, rate_window_s, rate_retry_after
                     Sliding window: at most rate_cap /run admitted per window,
                     others get 429. rate_retry_after: None (no header), a
                     number/string sent as is, or "auto" (seconds until a slot frees).
    concurrency_cap, concurrency_retry_after
                     /run requests being processed at once beyond the cap get 429.
    seed             Seed of the RNG used by standing (random) faults.
    clock            Callable returning seconds (default time.monotonic); drives
                     job lifecycles and the rate window. See ManualClock.
    log              Callable receiving one summary line per request (CLI: print).
    job_plan         Attribute, not an argument: callable(job_input) returning a
                     JobPlan, a dict of JobPlan fields, or None for defaults.
    """

    def __init__(
        self,
        endpoints: Mapping[str, str] | None = None,
        *,
        endpoint_id: str = DEFAULT_ENDPOINT_ID,
        api_key: str = DEFAULT_API_KEY,
        host: str = "127.0.0.1",
        port: int = 0,
        in_queue_s: float = DEFAULT_IN_QUEUE_S,
        run_s: float = DEFAULT_RUN_S,
        final_status: str = DEFAULT_FINAL_STATUS,
        retention_s: float = DEFAULT_RETENTION_S,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        latency_s: float = 0.0,
        status_delay_s: float = 0.0,
        rate_cap: int | None = None,
        rate_window_s: float = DEFAULT_RATE_WINDOW_S,
        rate_retry_after: int | float | str | None = None,
        concurrency_cap: int | None = None,
        concurrency_retry_after: int | float | str | None = None,
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
        log: Callable[[str], None] | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        unhealthy_workers: int = 0,
    ) -> None:
        self.host = host
        self.tls_context: ssl.SSLContext | None = None
        if tls_cert:
            self.tls_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.tls_context.load_cert_chain(tls_cert, tls_key)
        self.tls_handshake_failures = 0
        self.requested_port = port
        self.clock = clock
        self.log = log
        self._initial_endpoints = dict(endpoints) if endpoints else {endpoint_id: api_key}
        self._tunables = dict(
            in_queue_s=in_queue_s, run_s=run_s, final_status=final_status,
            retention_s=retention_s, max_body_bytes=max_body_bytes, latency_s=latency_s,
            status_delay_s=status_delay_s, rate_cap=rate_cap, rate_window_s=rate_window_s,
            rate_retry_after=rate_retry_after, concurrency_cap=concurrency_cap,
            concurrency_retry_after=concurrency_retry_after,
        )
        self._seed = seed
        # One re-entrant lock guards all mutable state; the condition wakes wait_for().
        self._cond = threading.Condition(threading.RLock())
        self._generation = 0  # bumped on every state change wait_for() may care about
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._gate = threading.Event()  # cleared by hold_runs(): /run waits before answering
        self._in_flight_run = 0
        self._held_run = 0  # /run requests parked by hold_runs(), past every cap
        self._initial_unhealthy = unhealthy_workers
        self._reset_state()

    # ----------------------------------------------------------- lifecycle

    def start(self) -> "RunPodEmulator":
        """Bind, listen and serve in a background thread; returns once listening."""
        if self._server is not None:
            raise RuntimeError("emulator already started")
        self._stopping.clear()
        server = _Server((self.host, self.requested_port), self)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                  name="runpod-emulator", daemon=True)
        thread.start()
        self._server, self._thread = server, thread
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop serving, close the listening socket and every open connection."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()  # wakes delay faults, latency and held /run requests
        self._gate.set()
        server.shutdown()
        server.close_connections()
        server.server_close()
        if thread is not None:
            thread.join(timeout_s)
        server.wait_connections_closed(timeout_s)
        self._server = self._thread = None

    def __enter__(self) -> "RunPodEmulator":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("emulator not started")
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>/v2`` (``https://`` with TLS) — the daemon's base URL."""
        host = self.host if self.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        scheme = "https" if self.tls_context else "http"
        return f"{scheme}://{host}:{self.port}/v2"

    @property
    def endpoint_id(self) -> str:
        """The first configured endpoint id."""
        return next(iter(self._endpoints))

    @property
    def api_key(self) -> str:
        """The key of the first configured endpoint."""
        return self._endpoints[self.endpoint_id]

    def url(self, route: str, job_id: str | None = None, endpoint_id: str | None = None) -> str:
        """Full URL of an operation, e.g. ``emu.url("status", job_id)``."""
        url = f"{self.base_url}/{endpoint_id or self.endpoint_id}/{route}"
        return f"{url}/{job_id}" if job_id is not None else url

    def add_endpoint(self, endpoint_id: str, api_key: str) -> None:
        with self._cond:
            self._endpoints[endpoint_id] = api_key

    # ----------------------------------------------------------- test state

    def reset(self) -> None:
        """Forget requests, jobs, faults, counters and job_plan; restore tunables."""
        with self._cond:
            self._reset_state()
            self._changed()

    def _reset_state(self) -> None:
        for name, value in self._tunables.items():
            setattr(self, name, value)
        self.job_plan: Callable[[Any], JobPlan | Mapping[str, Any] | None] | None = None
        self._endpoints = dict(self._initial_endpoints)
        self._records: list[RequestRecord] = []
        self._next_seq = 1
        self._jobs: dict[str, _Job] = {}
        self._last_prune = 0.0
        self._retried: dict[str, int] = {}
        self._faults: deque[Fault] = deque()
        self._standing_faults: list[tuple[float, Fault]] = []
        self._rng = random.Random(self._seed)
        self._rate_window: deque[float] = deque()
        self.unhealthy_workers = self._initial_unhealthy
        # _in_flight_run is not reset: requests still in flight finish after a reset.
        self._max_concurrent_run = self._in_flight_run
        self._gate.set()

    def forget(self, job_id: str) -> bool:
        """Drops a job as RunPod's queue may lose one (or its TTL runs out): /status
        answers 404 for it from now on. Returns whether the job existed."""
        with self._cond:
            found = self._jobs.pop(job_id, None) is not None
            self._changed()
            return found

    def set_unhealthy_workers(self, n: int) -> None:
        """Puts n workers in a crash loop (n > 0: every job still queued, and every
        new one, stays IN_QUEUE and /health reports them unhealthy) or heals them
        (0: queued jobs resume their wait where it stopped)."""
        with self._cond:
            now = self.clock()
            self.unhealthy_workers = max(0, int(n))
            for job in self._jobs.values():
                if self.unhealthy_workers:
                    job.stall(now)
                else:
                    job.unstall(now)
            self._changed()

    def add_fault(self, *faults: Fault) -> None:
        """Queue one-shot faults; each is used by the next request on its route (FIFO)."""
        with self._cond:
            self._faults.extend(faults)

    def add_random_fault(self, fault: Fault, probability: float) -> None:
        """A standing fault hitting each matching request with ``probability``.

        Drawn from an RNG seeded with ``seed``, only when no one-shot fault applies;
        several standing faults are tried in the order they were added.
        """
        if not 0.0 <= probability <= 1.0:
            raise ValueError("probability must be within [0, 1]")
        with self._cond:
            self._standing_faults.append((probability, fault))

    def clear_faults(self) -> None:
        """Drop pending one-shot faults and all standing faults."""
        with self._cond:
            self._faults.clear()
            self._standing_faults.clear()

    def pending_faults(self) -> list[Fault]:
        """One-shot faults not used yet, in FIFO order."""
        with self._cond:
            return list(self._faults)

    def hold_runs(self) -> None:
        """Make /run requests wait (after auth, caps and faults) until release_runs()."""
        self._gate.clear()

    def release_runs(self) -> None:
        self._gate.set()

    # ----------------------------------------------------------- assertions

    def requests(self, path_suffix: str | None = None, *, endpoint_id: str | None = None,
                 method: str | None = None) -> list[RequestRecord]:
        """Answered requests (and dropped ones), in arrival order.

        ``path_suffix`` matches a route name ("run", "status", "health", ...)
        or the end of the path (e.g. f"status/{job_id}").
        """
        with self._cond:
            records = list(self._records)
        result = []
        for rec in records:
            if endpoint_id is not None and rec.endpoint_id != endpoint_id:
                continue
            if method is not None and rec.method != method.upper():
                continue
            if path_suffix is not None:
                path = urlsplit(rec.path).path
                if rec.route != path_suffix and not path.endswith("/" + path_suffix.lstrip("/")):
                    continue
            result.append(rec)
        return sorted(result, key=lambda rec: rec.seq)

    def run_bodies(self, endpoint_id: str | None = None) -> list[Any]:
        """Parsed bodies of accepted /run requests (job created, 2xx with id)."""
        return [r.json for r in self.requests("run", endpoint_id=endpoint_id) if r.accepted]

    def jobs(self) -> list[dict[str, Any]]:
        """Every live job (including ones created by faults) as /status shows it, plus "input"."""
        with self._cond:
            now = self.clock()
            return [dict(job.view(now), input=job.input) for job in self._jobs.values()
                    if not job.expired(now, self.retention_s)]

    def job(self, job_id: str) -> dict[str, Any] | None:
        """The job object /status would return now, or None if it would be 404."""
        with self._cond:
            job = self._live_job(None, job_id)
            return job.view(self.clock()) if job else None

    @property
    def max_concurrent_run(self) -> int:
        """Highest number of /run requests processed at the same time."""
        with self._cond:
            return self._max_concurrent_run

    @property
    def held_run(self) -> int:
        """/run requests admitted (past the caps) and parked by hold_runs() right now."""
        with self._cond:
            return self._held_run

    @property
    def in_flight_run(self) -> int:
        """/run requests being processed right now."""
        with self._cond:
            return self._in_flight_run

    def wait_for(self, predicate: Callable[[], Any], timeout_s: float = 5.0,
                 what: str | None = None) -> Any:
        """Wait until ``predicate()`` is truthy and return its value.

        Sleeps on the emulator's condition variable, which is notified on every
        finished request, job change and in-flight change; it re-checks at least
        every 50 ms because job states also change with the clock. The predicate
        runs without the lock held; it should look at emulator state rather than
        send requests through the emulator. Raises TimeoutError with a summary.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            with self._cond:
                generation = self._generation
            value = predicate()
            if value:
                return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(self._timeout_message(predicate, timeout_s, what))
            with self._cond:
                if self._generation == generation:
                    self._cond.wait(min(remaining, _WAIT_SLICE_S))

    def _timeout_message(self, predicate: Callable[[], Any], timeout_s: float,
                         what: str | None) -> str:
        with self._cond:
            records = list(self._records)
            in_flight = self._in_flight_run
        name = what or getattr(predicate, "__qualname__", repr(predicate))
        lines = [f"timed out after {timeout_s:g}s waiting for {name}; "
                 f"{len(records)} requests recorded, {in_flight} /run in flight"]
        lines += [f"  #{r.seq} {r.summary()}" for r in records[-10:]]
        return "\n".join(lines)

    # ----------------------------------------------------------- internals: bookkeeping

    def _changed(self) -> None:
        """Call with the lock held after any change wait_for() predicates may read."""
        self._generation += 1
        self._cond.notify_all()

    def _begin(self, handler: "_Handler") -> RequestRecord:
        route, endpoint_id, _ = _parse_path(urlsplit(handler.path).path)
        with self._cond:
            rec = RequestRecord(
                seq=self._next_seq, received_at=time.monotonic(), method=handler.command,
                path=handler.path, route=route, endpoint_id=endpoint_id,
                headers=dict(handler.headers.items()), client_address=handler.client_address)
            self._next_seq += 1
            if route == "run":
                self._in_flight_run += 1
                self._max_concurrent_run = max(self._max_concurrent_run, self._in_flight_run)
                self._changed()
        return rec

    def _finish(self, rec: RequestRecord, reply: _Reply) -> None:
        """Publish the record just before the reply is written, so that a client
        that has read its reply always finds the record (and in-flight count) updated."""
        with self._cond:
            rec.status = reply.status if reply.action == "respond" else None
            rec.responded_at = time.monotonic()
            if rec.route == "run":
                self._in_flight_run -= 1
            self._records.append(rec)
            self._changed()

    def _note_client_error(self, rec: RequestRecord, error: str) -> None:
        with self._cond:
            rec.client_error = error
            self._changed()

    def _sleep(self, seconds: float) -> None:
        """Sleep that stop() interrupts, so shutdown never waits for a delay fault."""
        if seconds > 0:
            self._stopping.wait(seconds)

    def _take_fault(self, route: str) -> Fault | None:
        with self._cond:
            for fault in self._faults:
                if fault.applies_to(route):
                    self._faults.remove(fault)
                    return fault
            for probability, fault in self._standing_faults:
                if fault.applies_to(route) and self._rng.random() < probability:
                    return fault
        return None

    def body_cap(self, route: str | None) -> int:
        """Largest accepted request body for a route, in bytes (413 above)."""
        if route == "runsync":
            return max(self.max_body_bytes, DEFAULT_RUNSYNC_MAX_BODY_BYTES)
        return self.max_body_bytes

    # ----------------------------------------------------------- internals: API

    def _dispatch(self, rec: RequestRecord, query: dict[str, list[str]]) -> _Reply:
        """Auth, routing and faults, then the route handler. May sleep."""
        if rec.endpoint_id is None:
            return _error_reply(404, "not found")
        key = _extract_api_key(rec.header("Authorization"))
        with self._cond:
            endpoint_key = self._endpoints.get(rec.endpoint_id)
            known_key = key is not None and key in self._endpoints.values()
        # Auth first (any configured key is a valid account key), then the endpoint.
        if not known_key:
            return _error_reply(401, "Unauthorized: invalid api key")
        if endpoint_key is None:
            return _error_reply(404, f"endpoint not found: {rec.endpoint_id}")
        if key != endpoint_key:
            return _error_reply(401, "Unauthorized: api key has no access to this endpoint")
        if rec.route is None or rec.method not in ROUTE_METHODS[rec.route]:
            return _error_reply(404, "not found")

        fault = self._take_fault(rec.route)
        rec.fault = fault
        extra_fields = fault is not None and fault.kind == "malformed" \
            and fault.variant == "extra_fields"
        if fault is not None:
            self._sleep(fault.delay_s)
            # "delay" and "extra_fields" still go through normal handling.
            if fault.kind != "delay" and not extra_fields:
                return self._fault_reply(rec, fault)
        self._sleep(self.latency_s)
        if self._stopping.is_set():
            return _Reply(action="close")  # a delay cut short by stop(): drop, do not act
        reply = self._route(rec, query)
        return self._with_extra_fields(reply) if extra_fields else reply

    def _route(self, rec: RequestRecord, query: dict[str, list[str]]) -> _Reply:
        _, _, job_id = _parse_path(urlsplit(rec.path).path)
        if rec.route == "run":
            return self._handle_run(rec)
        if rec.route == "runsync":
            return self._handle_runsync(rec, query)
        if rec.route == "status":
            self._sleep(self.status_delay_s)
            return self._handle_status(rec, job_id)
        if rec.route == "cancel":
            return self._handle_cancel(rec, job_id)
        if rec.route == "retry":
            return self._handle_retry(rec, job_id)
        if rec.route == "purge-queue":
            return self._handle_purge(rec)
        return self._handle_health(rec)

    def _fault_reply(self, rec: RequestRecord, fault: Fault) -> _Reply:
        if fault.create_job and rec.route == "run" and _job_body_error(rec) is None:
            rec.job_id = self._create_job(rec, sync=False).id
        if fault.kind == "close":
            return _Reply(action="close")
        if fault.kind == "reset":
            partial = _DEFAULT_RESET_PARTIAL if fault.body is None else _coerce_body(fault.body)
            return _Reply(body=partial, action="reset")
        if fault.kind == "status":
            if fault.body is None:
                body = _json_bytes({"error": _reason(fault.code)})
            else:
                body = _coerce_body(fault.body)
            return _Reply(status=fault.code, body=body, headers=dict(fault.headers))
        # malformed: a 200 that a careful client must not take as an accepted job
        if fault.variant == "not_json":
            body = b"<html><body>upstream error</body></html>" if fault.body is None \
                else _coerce_body(fault.body)
            return _Reply(body=body, content_type="text/html", headers=dict(fault.headers))
        if fault.variant == "empty":
            return _Reply(body=b"", headers=dict(fault.headers))
        if fault.variant == "no_id":
            return _json_reply(200, {"status": "IN_QUEUE"}, fault.headers)
        if fault.variant in _BAD_ID_BODIES:
            return _Reply(body=_BAD_ID_BODIES[fault.variant], headers=dict(fault.headers))
        return _json_reply(200, {"id": 12345, "status": "IN_QUEUE"}, fault.headers)

    @staticmethod
    def _with_extra_fields(reply: _Reply) -> _Reply:
        """Add members a client must ignore (§2.1: 'ignore unknown members')."""
        try:
            obj = json.loads(reply.body) if reply.status == 200 else None
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            return reply
        obj.update({"delayTime": 0, "emulatorExtra": {"nested": [1, 2, 3]}, "zzz": None})
        return replace(reply, body=_json_bytes(obj))

    def _admit_run(self) -> _Reply | None:
        """Concurrency and rate caps for /run; a 429 reply, or None when admitted."""
        with self._cond:
            if self.concurrency_cap is not None and self._in_flight_run > self.concurrency_cap:
                return _error_reply(429, "too many concurrent requests",
                                    _retry_after_header(self.concurrency_retry_after, 1.0))
            if self.rate_cap is not None:
                now = self.clock()
                window = self._rate_window
                while window and window[0] <= now - self.rate_window_s:
                    window.popleft()
                if len(window) >= self.rate_cap:
                    free_in = window[0] + self.rate_window_s - now
                    return _error_reply(429, "rate limit exceeded",
                                        _retry_after_header(self.rate_retry_after, free_in))
                window.append(now)
        return None

    def _handle_run(self, rec: RequestRecord) -> _Reply:
        limited = self._admit_run()
        if limited is not None:
            return limited
        with self._cond:
            self._held_run += 1
            self._cond.notify_all()
        try:
            while not self._gate.wait(0.1):  # hold_runs(): park here until released or stopped
                if self._stopping.is_set():
                    return _Reply(action="close")
        finally:
            with self._cond:
                self._held_run -= 1
                self._cond.notify_all()
        error = _job_body_error(rec)
        if error is not None:
            return _error_reply(400, error)
        job = self._create_job(rec, sync=False)
        rec.job_id = job.id
        rec.accepted = True
        return _json_reply(200, {"id": job.id, "status": "IN_QUEUE"})

    def _handle_runsync(self, rec: RequestRecord, query: dict[str, list[str]]) -> _Reply:
        error = _job_body_error(rec)
        if error is not None:
            return _error_reply(400, error)
        job = self._create_job(rec, sync=True)
        rec.job_id = job.id
        try:
            wait_ms = int(query.get("wait", ["90000"])[0])
        except ValueError:
            return _error_reply(400, "wait must be an integer number of milliseconds")
        wait_s = min(max(wait_ms, 1000), 300000) / 1000.0
        # Waits in real time; with a ManualClock it simply returns the current state.
        self._sleep(min(max(job.finished_at - self.clock(), 0.0), wait_s))
        with self._cond:
            view = job.view(self.clock())
        return _json_reply(200, view)

    def _handle_status(self, rec: RequestRecord, job_id: str | None) -> _Reply:
        with self._cond:
            job = self._live_job(rec.endpoint_id, job_id)
            if job is None:
                return _error_reply(404, "job not found")
            return _json_reply(200, job.view(self.clock()))

    def _handle_cancel(self, rec: RequestRecord, job_id: str | None) -> _Reply:
        with self._cond:
            job = self._live_job(rec.endpoint_id, job_id)
            if job is None:
                return _error_reply(404, "job not found")
            now = self.clock()
            if job.status(now) not in TERMINAL_STATUSES:
                job.cancelled_at = now
                self._changed()
            return _json_reply(200, job.view(now))

    def _handle_retry(self, rec: RequestRecord, job_id: str | None) -> _Reply:
        with self._cond:
            job = self._live_job(rec.endpoint_id, job_id)
            if job is None:
                return _error_reply(404, "job not found")
            status = job.status(self.clock())
        if status not in RETRYABLE_STATUSES:
            return _error_reply(400, f"job is {status}; only FAILED or TIMED_OUT jobs can be retried")
        plan = self._resolve_plan(job.input)  # outside the lock: job_plan is user code
        with self._cond:
            job.schedule(self.clock(), plan)
            if self.unhealthy_workers:
                job.stall(self.clock(), new=True)
            job.retries += 1
            self._retried[job.endpoint_id] = self._retried.get(job.endpoint_id, 0) + 1
            self._changed()
        return _json_reply(200, {"id": job.id, "status": "IN_QUEUE"})

    def _handle_purge(self, rec: RequestRecord) -> _Reply:
        with self._cond:
            now = self.clock()
            queued = [j.id for j in self._jobs.values()
                      if j.endpoint_id == rec.endpoint_id and j.status(now) == "IN_QUEUE"]
            for job_id in queued:
                del self._jobs[job_id]
            self._changed()
        return _json_reply(200, {"removed": len(queued), "status": "completed"})

    def _handle_health(self, rec: RequestRecord) -> _Reply:
        counts = {"completed": 0, "failed": 0, "inProgress": 0, "inQueue": 0}
        # TIMED_OUT counts as failed; CANCELLED jobs are in no counter.
        key_of = {"COMPLETED": "completed", "FAILED": "failed", "TIMED_OUT": "failed",
                  "IN_PROGRESS": "inProgress", "IN_QUEUE": "inQueue"}
        with self._cond:
            now = self.clock()
            self._prune(now)
            for job in self._jobs.values():
                key = key_of.get(job.status(now)) if job.endpoint_id == rec.endpoint_id else None
                if key is not None:
                    counts[key] += 1
            counts["retried"] = self._retried.get(rec.endpoint_id, 0)
            unhealthy = self.unhealthy_workers
        running = counts["inProgress"]
        idle = 0 if running or unhealthy else 1
        workers = {"idle": idle, "initializing": 0, "ready": idle, "running": running,
                   "throttled": 0, "unhealthy": unhealthy}
        return _json_reply(200, {"jobs": counts, "workers": workers})

    # ----------------------------------------------------------- internals: jobs

    def _resolve_plan(self, job_input: Any) -> JobPlan:
        hook = self.job_plan
        plan = hook(job_input) if hook is not None else None
        if plan is None:
            plan = JobPlan()
        elif isinstance(plan, Mapping):
            plan = JobPlan(**plan)
        elif not isinstance(plan, JobPlan):
            raise TypeError(f"job_plan must return JobPlan, dict or None, not {type(plan).__name__}")
        final_status = plan.final_status or self.final_status
        error = plan.error
        if error is None and final_status == "FAILED":
            error = DEFAULT_FAILED_ERROR
        return JobPlan(
            in_queue_s=self.in_queue_s if plan.in_queue_s is None else plan.in_queue_s,
            run_s=self.run_s if plan.run_s is None else plan.run_s,
            final_status=final_status,
            error=error,
            output=_default_output(job_input) if plan.output is None else plan.output,
            omit_output=plan.omit_output,
        )

    def _create_job(self, rec: RequestRecord, sync: bool) -> _Job:
        body = rec.json
        job_input = body["input"]
        plan = self._resolve_plan(job_input)  # outside the lock: job_plan is user code
        prefix = "sync-" if sync else ""
        job = _Job(f"{prefix}{uuid.uuid4()}-u1", rec.endpoint_id, job_input,
                   _policy_ttl_s(body), sync)
        with self._cond:
            now = self.clock()
            job.schedule(now, plan)
            if self.unhealthy_workers:
                job.stall(now, new=True)
            self._jobs[job.id] = job
            if now - self._last_prune >= 1.0:  # keep soak runs from growing without bound
                self._prune(now)
            self._changed()
        return job

    def _prune(self, now: float) -> None:
        self._last_prune = now
        for job_id in [j.id for j in self._jobs.values() if j.expired(now, self.retention_s)]:
            del self._jobs[job_id]

    def _live_job(self, endpoint_id: str | None, job_id: str | None) -> _Job | None:
        """The job if it exists (for this endpoint) and has not expired; lock held."""
        job = self._jobs.get(job_id) if job_id is not None else None
        if job is None or (endpoint_id is not None and job.endpoint_id != endpoint_id):
            return None
        if job.expired(self.clock(), self.retention_s):
            del self._jobs[job.id]
            return None
        return job


def _coerce_body(body: bytes | str | dict | list) -> bytes:
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode("utf-8")
    return _json_bytes(body)


def _reason(code: int) -> str:
    try:
        return http.HTTPStatus(code).phrase
    except ValueError:
        return "Unknown"


def _retry_after_header(value: int | float | str | None, free_in_s: float) -> dict[str, str]:
    if value is None:
        return {}
    if value == "auto":
        return {"Retry-After": str(max(1, math.ceil(free_in_s)))}
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return {"Retry-After": str(value)}


# ------------------------------------------------------------------ HTTP layer


class _Server(http.server.ThreadingHTTPServer):
    """Threading server that tracks its connections so stop() can close them."""

    daemon_threads = True
    block_on_close = False  # connections are closed and awaited by the emulator instead
    allow_reuse_address = True
    request_queue_size = 256  # soak tests open many connections at once

    def __init__(self, address: tuple[str, int], emulator: RunPodEmulator) -> None:
        self.emulator = emulator
        self._conn_cond = threading.Condition()
        self._connections: set[socket.socket] = set()
        self._aborted: set[socket.socket] = set()
        super().__init__(address, _Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        context = self.emulator.tls_context
        if context is not None:
            # The handshake runs in the connection's own thread (_Handler.setup), never here.
            sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        with self._conn_cond:
            self._connections.add(request)
        super().process_request(request, client_address)

    def abort_on_close(self, sock: socket.socket) -> None:
        """Make the coming close() send RST instead of FIN (SO_LINGER with 0 s)."""
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with self._conn_cond:
            self._aborted.add(sock)

    def shutdown_request(self, request: socket.socket) -> None:
        with self._conn_cond:
            aborted = request in self._aborted
            self._aborted.discard(request)
        try:
            if aborted:
                request.close()  # no shutdown(SHUT_WR) first: that would send a FIN
            else:
                super().shutdown_request(request)
        finally:
            with self._conn_cond:
                self._connections.discard(request)
                self._conn_cond.notify_all()

    def close_connections(self) -> None:
        """Wake handler threads blocked on idle keep-alive connections."""
        with self._conn_cond:
            connections = list(self._connections)
        for sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def wait_connections_closed(self, timeout_s: float) -> bool:
        with self._conn_cond:
            return self._conn_cond.wait_for(lambda: not self._connections, timeout_s)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError, ssl.SSLError, OSError)):
            return  # clients vanishing (or refusing our certificate) is normal in tests
        super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive handler: reads bodies, writes replies, closes or resets."""

    protocol_version = "HTTP/1.1"
    server_version = "runpod-emulator/1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        # Replies are written in one send; NODELAY also spares the client's
        # pipelined requests from Nagle / delayed-ACK stalls.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if isinstance(self.connection, ssl.SSLSocket):
            try:
                self.connection.do_handshake()
            except (ssl.SSLError, OSError):
                emulator = self.server.emulator
                with emulator._cond:
                    emulator.tls_handshake_failures += 1
                    emulator._generation += 1
                    emulator._cond.notify_all()
                raise

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib name)
        pass  # the emulator logs its own one-line summaries

    def do_GET(self) -> None:
        self._serve()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def handle_expect_100(self) -> bool:
        """Refuse an over-size body before the client sends it, as a proxy would."""
        emulator = self.server.emulator
        route, _, _ = _parse_path(urlsplit(self.path).path)
        length = self._content_length()
        if length is not None and length > emulator.body_cap(route):
            rec = emulator._begin(self)
            rec.body_length = length
            # The client may send the body anyway; never parse it as a request.
            self.close_connection = True
            self._complete(rec, _error_reply(413, "request body too large"))
            return False
        return super().handle_expect_100()

    def _serve(self) -> None:
        emulator = self.server.emulator
        rec = emulator._begin(self)
        try:
            reply = self._read_body(rec, emulator.body_cap(rec.route))
            if reply is None:
                self._parse_json(rec)
                reply = emulator._dispatch(rec, parse_qs(urlsplit(self.path).query))
        except (ConnectionError, TimeoutError) as exc:
            rec.client_error = f"{type(exc).__name__}: {exc}"
            reply = _Reply(action="close")
        except Exception as exc:  # a bug in the emulator or a test's job_plan hook
            traceback.print_exc(file=sys.stderr)
            reply = _error_reply(500, f"emulator error: {type(exc).__name__}: {exc}")
        self._complete(rec, reply)

    def _complete(self, rec: RequestRecord, reply: _Reply) -> None:
        emulator = self.server.emulator
        emulator._finish(rec, reply)
        # Logged before the reply goes out, so a client's sequential requests
        # log in order; a failed write adds a second line with client_error.
        if emulator.log is not None:
            emulator.log(rec.summary())
        error = self._send(reply)
        if error is not None:
            emulator._note_client_error(rec, error)
            if emulator.log is not None:
                emulator.log(rec.summary())

    def _content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        if value is None:
            return None
        try:
            length = int(value)
        except ValueError:
            return -1
        return length if length >= 0 else -1

    def _read_body(self, rec: RequestRecord, cap: int) -> _Reply | None:
        """Read the body into rec; returns an error reply instead when it must be refused."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked(rec, cap)
        length = self._content_length()
        if length is None:
            return None
        if length < 0:
            self.close_connection = True  # framing unknown: the connection is unusable
            return _error_reply(400, "invalid Content-Length")
        rec.body_length = length
        if length > cap:
            if length <= _MAX_DRAIN_BYTES:
                self._discard(length)  # keeps the connection in sync for keep-alive
            else:
                self.close_connection = True
            return _error_reply(413, "request body too large")
        rec.body = self._read_exact(length)
        return None

    def _read_exact(self, length: int) -> bytes:
        data = self.rfile.read(length)
        if len(data) < length:
            raise ConnectionResetError(f"client closed after {len(data)} of {length} body bytes")
        return data

    def _discard(self, length: int) -> None:
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 20))
            if not chunk:
                raise ConnectionResetError("client closed while sending an over-size body")
            length -= len(chunk)

    def _read_chunked(self, rec: RequestRecord, cap: int) -> _Reply | None:
        parts: list[bytes] = []
        total = 0
        while True:
            size_line = self.rfile.readline(1024)
            if not size_line:
                raise ConnectionResetError("client closed inside a chunked body")
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                return _error_reply(400, "invalid chunked encoding")
            if size == 0:
                while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                break
            total += size
            if total > cap:
                rec.body_length = total
                self.close_connection = True  # rest of the body is unread
                return _error_reply(413, "request body too large")
            parts.append(self._read_exact(size))
            self.rfile.readline(3)  # CRLF after the chunk
        rec.body = b"".join(parts)
        rec.body_length = total
        return None

    @staticmethod
    def _parse_json(rec: RequestRecord) -> None:
        if not rec.body:
            return
        try:
            rec.json = json.loads(rec.body)
        except ValueError as exc:  # includes UnicodeDecodeError
            rec.json_error = str(exc)

    def _send(self, reply: _Reply) -> str | None:
        """Write the reply (or close / reset); returns the write error, if any."""
        try:
            if reply.action == "close":
                self.close_connection = True
            elif reply.action == "reset":
                self.wfile.write(reply.body)
                self.server.abort_on_close(self.connection)
                self.close_connection = True
            else:
                self.wfile.write(self._response_bytes(reply))
        except OSError as exc:  # client gone (e.g. it timed out during a delay fault)
            self.close_connection = True
            return f"{type(exc).__name__}: {exc}"
        return None

    def _response_bytes(self, reply: _Reply) -> bytes:
        headers = {
            "Server": self.server_version,
            "Date": email.utils.formatdate(usegmt=True),
            "Content-Type": reply.content_type,
            "Content-Length": str(len(reply.body)),
        }
        headers.update(reply.headers)
        if headers.get("Connection", "").lower() == "close":
            self.close_connection = True
        elif self.close_connection:
            headers["Connection"] = "close"
        lines = [f"HTTP/1.1 {reply.status} {_reason(reply.status)}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + reply.body


# ------------------------------------------------------------------ CLI


def parse_fault_spec(spec: str) -> tuple[float, Fault]:
    """``PROB:KIND[:ARG[:ARG2]]`` -> (probability, Fault), for --random-fault.

    Examples: ``0.05:status:503``, ``0.1:status:429:2`` (Retry-After 2),
    ``0.02:delay:3``, ``0.01:malformed:no_id``, ``0.01:close:create``, ``0.01:reset``.
    """
    parts = spec.split(":")
    if len(parts) < 2:
        raise ValueError(f"bad fault spec {spec!r}; expected PROB:KIND[:ARG]")
    probability, kind, args = float(parts[0]), parts[1], parts[2:]
    if kind == "status":
        if not args:
            raise ValueError("status fault needs a code, e.g. 0.05:status:503")
        headers = {"Retry-After": args[1]} if len(args) > 1 else {}
        return probability, Fault.status(int(args[0]), headers=headers)
    if kind == "delay":
        return probability, Fault.delay(float(args[0]) if args else 1.0)
    if kind == "malformed":
        return probability, Fault.malformed(args[0] if args else "not_json")
    if kind in ("close", "reset"):
        return probability, Fault(kind, create_job=bool(args and args[0] == "create"))
    raise ValueError(f"unknown fault kind {kind!r}")


def _endpoints_from_args(args: argparse.Namespace) -> dict[str, str]:
    keys = list(args.api_key or [])
    if args.api_key_file:
        with open(args.api_key_file, encoding="utf-8") as fh:
            keys.append(fh.read().strip())
    if not keys and os.environ.get("RUNPOD_API_KEY"):
        keys.append(os.environ["RUNPOD_API_KEY"])
    if not keys:
        raise SystemExit("runpod-emulator: an API key is required "
                         "(--api-key, --api-key-file or RUNPOD_API_KEY)")
    if len(keys) == 1:
        keys = keys * len(args.endpoint)
    if len(keys) != len(args.endpoint):
        raise SystemExit("runpod-emulator: give one API key, or one per --endpoint")
    return dict(zip(args.endpoint, keys))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="runpod_emulator.py",
        description="RunPod Serverless queue-endpoint emulator for local tests.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; keep it on loopback)")
    parser.add_argument("--port", type=int, default=8000,
                        help="port to listen on (default 8000; 0 picks a free port)")
    parser.add_argument("--endpoint", action="append", required=True,
                        help="endpoint id; repeat for several endpoints")
    parser.add_argument("--api-key", action="append",
                        help="API key (one for all endpoints, or one per --endpoint); "
                             "default $RUNPOD_API_KEY")
    parser.add_argument("--api-key-file", help="read the API key from this file")
    parser.add_argument("--in-queue-s", type=float, default=DEFAULT_IN_QUEUE_S,
                        help="seconds a new job stays IN_QUEUE before it runs "
                             f"(default {DEFAULT_IN_QUEUE_S:g})")
    parser.add_argument("--run-s", type=float, default=DEFAULT_RUN_S,
                        help=f"seconds a job stays IN_PROGRESS (default {DEFAULT_RUN_S:g})")
    parser.add_argument("--final-status", default=DEFAULT_FINAL_STATUS,
                        help="status a job ends in: COMPLETED, FAILED, CANCELLED or TIMED_OUT "
                             f"(default {DEFAULT_FINAL_STATUS})")
    parser.add_argument("--retention-s", type=float, default=DEFAULT_RETENTION_S,
                        help="seconds a finished job's result stays readable through /status "
                             f"(default {DEFAULT_RETENTION_S:g}, RunPod's 30 min)")
    parser.add_argument("--latency-ms", type=float, default=0.0,
                        help="delay before every reply, in ms (default 0)")
    parser.add_argument("--status-delay-ms", type=float, default=0.0,
                        help="extra delay before /status replies, in ms (default 0)")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help="largest /run body accepted; larger ones get 413 "
                             f"(default {DEFAULT_MAX_BODY_BYTES})")
    parser.add_argument("--rate-cap", type=int, help="max /run per window (default off)")
    parser.add_argument("--rate-window-s", type=float, default=DEFAULT_RATE_WINDOW_S,
                        help="length of the --rate-cap window in seconds "
                             f"(default {DEFAULT_RATE_WINDOW_S:g})")
    parser.add_argument("--rate-retry-after",
                        help='Retry-After on rate-cap 429s: seconds, an HTTP-date or "auto"')
    parser.add_argument("--concurrency-cap", type=int, help="max concurrent /run (default off)")
    parser.add_argument("--random-fault", action="append", default=[], metavar="PROB:KIND[:ARG]",
                        help="standing fault hitting each /run with probability PROB; repeatable. "
                             "Kinds: status:CODE[:RETRY_AFTER], delay:SECONDS, malformed:VARIANT "
                             f"({', '.join(MALFORMED_VARIANTS)}), close[:create], reset[:create]; "
                             "e.g. 0.05:status:503, 0.01:malformed:id_nul_escape")
    parser.add_argument("--seed", type=int, default=0, help="seed for --random-fault")
    parser.add_argument("--unhealthy-workers", type=int, default=0, metavar="N",
                        help="N workers in a crash loop: /health reports them unhealthy and no "
                             "job leaves IN_QUEUE (default 0)")
    parser.add_argument("--quiet", action="store_true", help="no per-request lines")
    parser.add_argument("--tls-cert", metavar="PEM",
                        help="serve HTTPS with this certificate (chain) instead of HTTP")
    parser.add_argument("--tls-key", metavar="PEM",
                        help="private key of --tls-cert (default: in the --tls-cert file)")
    args = parser.parse_args(argv)

    endpoints = _endpoints_from_args(args)
    try:
        faults = [parse_fault_spec(spec) for spec in args.random_fault]
    except ValueError as exc:
        parser.error(str(exc))

    log_lock = threading.Lock()  # handler threads log concurrently; keep lines whole

    def log_line(line: str) -> None:
        try:
            with log_lock:
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
        except (OSError, ValueError):
            pass  # stdout closed by the parent; keep serving

    emulator = RunPodEmulator(
        endpoints, host=args.host, port=args.port, in_queue_s=args.in_queue_s,
        run_s=args.run_s, final_status=args.final_status, retention_s=args.retention_s,
        max_body_bytes=args.max_body_bytes, latency_s=args.latency_ms / 1000.0,
        status_delay_s=args.status_delay_ms / 1000.0, rate_cap=args.rate_cap,
        rate_window_s=args.rate_window_s, rate_retry_after=args.rate_retry_after,
        concurrency_cap=args.concurrency_cap, seed=args.seed,
        log=None if args.quiet else log_line, tls_cert=args.tls_cert, tls_key=args.tls_key,
        unhealthy_workers=args.unhealthy_workers)
    for probability, fault in faults:
        emulator.add_random_fault(fault, probability)

    stop_requested = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop_requested.set())
    signal.signal(signal.SIGTERM, lambda *_: stop_requested.set())
    emulator.start()
    log_line(f"runpod-emulator listening on {emulator.base_url} endpoint={','.join(endpoints)}")
    while not stop_requested.wait(1.0):
        pass
    emulator.stop()
    log_line("runpod-emulator stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
