"""A local stand-in for TinyFish's agent API, for tests and local runs: agent runs that live on
the server, on their own clock, whatever their clients do.

Endpoints (field names as in the official `tinyfish` SDK 0.11 and TinyFish's API reference):

    POST /v1/automation/run-sse     start a run; stream its events (STARTED, STREAMING_URL,
                                    PROGRESS…, HEARTBEAT, COMPLETE)
    POST /v1/automation/run-async   start a run; answer {"run_id", "error": null} at once
    GET  /v1/runs                   runs, newest first; ?goal= (case-insensitive part of the goal),
                                    ?created_after=, ?status=, ?limit= 1–100 (400 outside)
                                    ({"data": [...], "pagination"})
    GET  /v1/runs/{id}              the run: status PENDING|RUNNING|COMPLETED|FAILED|CANCELLED,
                                    result, error {code, message, category, retry_after}, steps
    POST /v1/runs/{id}/cancel       idempotent: {"run_id", "status", "cancelled_at", "message"}
    GET  /_fake/runs                inspection (not TinyFish's): every run started, in order

Every /v1 call checks `X-API-Key`. A run request is validated the way TinyFish documents (url and
goal required; output_schema limited to the structured-output keyword allowlist; agent_config's
max_steps 1–500 and max_duration_seconds ≥ 1) and refused with 403 for a beta-gated field the
account lacks, each on its own: `output_schema` (structured_output=False), `agent_config.max_steps`
or `agent_config.mode` (beta_agent_config=False); `max_duration_seconds` is never gated.
`busy_first=N` answers the first N run requests 429 with Retry-After (`busy_retry_after`).

An agent run is a task on the server's event loop, started by the run request and independent of
any connection: a client that disconnects or dies does not stop it; it goes on and finishes on
its own clock, and GET reads it back. Above the account's concurrency cap (`concurrency`) a new
run waits PENDING in the queue, and its STARTED event is sent only when it leaves the queue (the
stream says nothing meanwhile). It honours the caps it was given: past
`agent_config.max_duration_seconds` (counted from its start) or after `max_steps` steps it ends
FAILED (AGENT_FAILURE, code MAX_DURATION_EXCEEDED / MAX_STEPS_EXCEEDED — the fake's guess at
TinyFish's wording).

`drop_before_started=True` cuts the first run-sse connection of each quote (the same insurer and
goal, an attempt reference `qr-…` aside) right after its run was created, before STARTED: the run
goes on, billed, whatever the client does next.

Scripting, per insurer (recognised from the body's `url`, as in INSURER_START_URLS): a scenario,
optionally a duration (seconds the agent works, not scaled; default: realistic pauses times
`delay_scale`) and a pending time (seconds spent PENDING in TinyFish's queue first).

    quote            COMPLETED with a deterministic premium derived from the goal (6-month total)
    declined         COMPLETED, outcome "no_quote"
    blocked          COMPLETED, outcome "blocked" (a CAPTCHA stopped the agent)
    system_failure   FAILED, SYSTEM_FAILURE (retry_after 1)     (alias: failed)
    agent_failure    FAILED, AGENT_FAILURE: the agent could not find the quote form
    captcha          FAILED, AGENT_FAILURE saying a CAPTCHA blocked the agent
    billing_failure  FAILED, BILLING_FAILURE (out of credits)
    slow             quote, with long pauses and HEARTBEATs
    truncated        quote; the SSE stream ends cleanly after the 4th PROGRESS (the run goes on)
    drop             quote; the SSE connection is cut after the 4th PROGRESS (the run goes on)
    http_500 / http_429 / http_402   the run request is refused (no run is created)

    with FakeTinyFishServer(api_key="k", delay_scale=0.01,
                            scenarios={"geico": "declined", "allstate": "quote,duration=30"}) as tf:
        ... TINYFISH_API_URL=tf.url, TINYFISH_API_KEY="k"
        tf.requests        # the run requests' JSON bodies, in order
        tf.run_records()   # the ledger (GET /_fake/runs): one dict per run created, with its
                           # request body, final status and steps

    python -m tests.fake_tinyfish --port 0 --delay-scale 0.1 --concurrency 4 \\
        --scenario geico=declined --scenario allstate=quote,duration=30,pending=2
    # prints "READY http://127.0.0.1:<port>" once listening

A scenario spec is `SCENARIO[,duration=SECONDS][,pending=SECONDS]`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import socket
import sys
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from lib.providers.tinyfish import INSURER_START_URLS

SCENARIOS = (
    "quote",
    "declined",
    "blocked",
    "system_failure",
    "failed",
    "agent_failure",
    "captcha",
    "billing_failure",
    "slow",
    "truncated",
    "drop",
    "http_500",
    "http_429",
    "http_402",
)
TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED"})
# TinyFish's structured-output validator rejects any keyword outside this list.
SCHEMA_KEYWORDS = frozenset(
    {
        "anyOf",
        "enum",
        "format",
        "items",
        "maxItems",
        "maximum",
        "minItems",
        "minimum",
        "nullable",
        "properties",
        "propertyOrdering",
        "required",
        "type",
    }
)
PROGRESS_STEPS = (
    "Navigating to {url}",
    "Entering the ZIP code and starting a new auto quote",
    "Looking up the vehicle by VIN",
    "Filling in driver details",
    "Answering prior insurance and driving history questions",
    "Selecting coverage limits and deductibles",
    "Reading the premium on the quote summary page",
)
FAILURES: dict[str, dict[str, Any]] = {
    "system_failure": {
        "code": "service_busy",
        "message": "Browser crashed during execution",
        "category": "SYSTEM_FAILURE",
        "retry_after": 1,
    },
    "agent_failure": {
        "code": "goal_not_achieved",
        "message": "Could not find an online quote form on the page",
        "category": "AGENT_FAILURE",
        "retry_after": None,
    },
    "captcha": {
        "message": "Agent could not continue: the site showed a CAPTCHA challenge",
        "category": "AGENT_FAILURE",
    },
    "billing_failure": {
        "code": "INSUFFICIENT_CREDITS",
        "message": "Insufficient credits to continue this run",
        "category": "BILLING_FAILURE",
    },
}
STREAM_CUT_AFTER = 4  # PROGRESS events before "truncated"/"drop" end the stream
RUN_STATUSES = frozenset({"PENDING", "RUNNING", *TERMINAL})
# An attempt reference as the adapter writes it (lib.providers.tinyfish.source.attempt_reference).
_REFERENCE = re.compile(r"qr-[0-9a-f]+")


class _CutConnection(Exception):
    """Raised inside a streaming body so the server drops the connection mid-response."""


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


def _frame(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def _schema_problems(node: Any, path: str = "output_schema") -> list[str]:
    if not isinstance(node, dict):
        return [f"{path}: must be an object"]
    problems = [f"{path}.{key}: unsupported keyword" for key in node if key not in SCHEMA_KEYWORDS]
    for name, child in (node.get("properties") or {}).items():
        problems += _schema_problems(child, f"{path}.properties.{name}")
    if "items" in node:
        problems += _schema_problems(node["items"], f"{path}.items")
    return problems


def _agent_config_problems(config: Any) -> list[str]:
    if not isinstance(config, dict):
        return ["agent_config: must be an object"]
    problems = []
    steps, seconds = config.get("max_steps"), config.get("max_duration_seconds")
    if steps is not None and not (type(steps) is int and 1 <= steps <= 500):
        problems.append("agent_config.max_steps: must be an integer from 1 to 500")
    if seconds is not None and not (type(seconds) is int and seconds >= 1):
        problems.append("agent_config.max_duration_seconds: must be an integer of at least 1")
    return problems


def _error(status: int, code: str, message: str, **headers: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


@dataclass(frozen=True, slots=True)
class Script:
    """What one insurer's agent runs do."""

    scenario: str = "quote"
    duration: float | None = None  # seconds of work, not scaled; None: the realistic pauses
    pending: float = 0.0  # seconds in TinyFish's queue (PENDING) first

    @classmethod
    def parse(cls, spec: str) -> Script:
        """`SCENARIO[,duration=SECONDS][,pending=SECONDS]`."""
        name, *options = [part.strip() for part in spec.split(",")]
        if name not in SCENARIOS:
            raise ValueError(f"unknown scenario {name!r}; one of {', '.join(SCENARIOS)}")
        values: dict[str, float] = {}
        for option in options:
            key, _, raw = option.partition("=")
            if key not in ("duration", "pending"):
                raise ValueError(f"unknown scenario option {key!r}; duration or pending")
            values[key] = float(raw)
        return cls(name, values.get("duration"), values.get("pending", 0.0))


@dataclass(slots=True)
class FakeAgentRun:
    """One agent run on the fake's side; `events` is its SSE history, in order."""

    run_id: str
    insurer: str | None
    script: Script
    body: dict[str, Any]
    created_at: datetime = field(default_factory=_now)
    status: str = "PENDING"
    started_at: datetime | None = None
    finished_at: datetime | None = None
    cancelled_at: datetime | None = None
    result: Any = None
    error: dict[str, Any] | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    cancel_calls: int = 0
    get_calls: int = 0
    stream_clients: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def emit(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self.changed.set()
        self.changed = asyncio.Event()

    def finish(self, status: str, *, result: Any = None, error: Any = None) -> None:
        if self.status in TERMINAL:
            return
        self.status, self.result, self.error = status, result, error
        self.finished_at = _now()
        if status == "CANCELLED":
            self.cancelled_at = self.finished_at
        self.emit(
            {
                "type": "COMPLETE",
                "run_id": self.run_id,
                "status": status,
                "timestamp": _iso(self.finished_at),
                "result": result,
                "error": error,
            }
        )

    def as_run(self) -> dict[str, Any]:
        """GET /v1/runs/{id}'s answer (the SDK's Run, plus the documented steps)."""
        return {
            "run_id": self.run_id,
            "status": self.status,
            "goal": self.body.get("goal"),
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "num_of_steps": len(self.steps) if self.status in TERMINAL else None,
            "result": self.result,
            "error": self.error,
            "output_schema": self.body.get("output_schema"),
            "streaming_url": f"https://stream.example.invalid/{self.run_id}",
            "browser_config": {"proxy_enabled": False, "proxy_country_code": None},
            "steps": list(self.steps),
        }

    def as_record(self) -> dict[str, Any]:
        """What the inspection endpoint says about this run."""
        return {
            "run_id": self.run_id,
            "insurer": self.insurer,
            "scenario": self.script.scenario,
            "status": self.status,
            "created_at": _iso(self.created_at),
            "finished_at": _iso(self.finished_at),
            "cancel_calls": self.cancel_calls,
            "cancelled": self.cancelled_at is not None,
            "get_calls": self.get_calls,
            "stream_clients": self.stream_clients,
            "steps": len(self.steps),
            "agent_config": self.body.get("agent_config"),
            "body": self.body,
        }


class FakeTinyFish:
    """The ASGI app and what it has seen. `scenarios` maps insurer id → a scenario spec."""

    def __init__(
        self,
        *,
        api_key: str = "test-tinyfish-key",
        scenarios: dict[str, str] | None = None,
        default_scenario: str = "quote",
        delay_scale: float = 1.0,
        structured_output: bool = True,
        beta_agent_config: bool = True,
        concurrency: int | None = None,
        drop_before_started: bool = False,
        busy_first: int = 0,
        busy_retry_after: int = 1,
    ) -> None:
        self.api_key = api_key
        self.scripts = {insurer: Script.parse(spec) for insurer, spec in (scenarios or {}).items()}
        self.default_script = Script.parse(default_scenario)
        self.delay_scale = delay_scale
        self.structured_output = structured_output
        self.beta_agent_config = beta_agent_config
        self.concurrency = concurrency
        self.drop_before_started = drop_before_started
        self.busy_first = busy_first
        self.busy_retry_after = busy_retry_after
        self._slots: asyncio.Semaphore | None = None
        self._quotes_connected: set[tuple[str, str]] = set()
        self.dropped_connections = 0
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.runs: dict[str, FakeAgentRun] = {}
        self.list_calls = 0
        self._lock = threading.Lock()
        self.app = Starlette(
            routes=[
                Route("/v1/automation/run-sse", self._run_sse, methods=["POST"]),
                Route("/v1/automation/run-async", self._run_async, methods=["POST"]),
                Route("/v1/runs", self._list_v1_runs, methods=["GET"]),
                Route("/v1/runs/{run_id}", self._get_run, methods=["GET"]),
                Route("/v1/runs/{run_id}/cancel", self._cancel_run, methods=["POST"]),
                Route("/_fake/runs", self._list_runs, methods=["GET"]),
            ]
        )

    def insurer_for(self, url: str) -> str | None:
        return next((p for p, start in INSURER_START_URLS.items() if start == url), None)

    def run_records(self) -> list[dict[str, Any]]:
        """Every agent run started so far, oldest first (safe to call from another thread)."""
        with self._lock:
            return [run.as_record() for run in self.runs.values()]

    def _refusal(self, request: Request) -> JSONResponse | None:
        key = request.headers.get("x-api-key")
        if not key:
            return _error(401, "MISSING_API_KEY", "X-API-Key header is required")
        if key != self.api_key:
            return _error(401, "INVALID_API_KEY", "Invalid or expired API key")
        return None

    async def _start(self, request: Request) -> FakeAgentRun | Response:
        """Validates a run request and starts its agent run, or says why not."""
        refused = self._refusal(request)
        if refused is not None:
            return refused
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "INVALID_INPUT", "Body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "INVALID_INPUT", "Body must be an object")
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        url, goal = body.get("url"), body.get("goal")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            return _error(400, "INVALID_INPUT", 'Field "url": expected a URL')
        if not isinstance(goal, str) or not goal:
            return _error(400, "INVALID_INPUT", 'Field "goal": expected a non-empty string')
        if "output_schema" in body:
            if not self.structured_output:
                return _error(403, "FORBIDDEN", "output_schema requires beta access")
            problems = _schema_problems(body["output_schema"])
            if problems:
                return _error(400, "INVALID_INPUT", "; ".join(problems))
        if "agent_config" in body:
            problems = _agent_config_problems(body["agent_config"])
            if problems:
                return _error(400, "INVALID_INPUT", "; ".join(problems))
            gated = [k for k in ("max_steps", "mode") if k in body["agent_config"]]
            if gated and not self.beta_agent_config:
                return _error(403, "FORBIDDEN", f"agent_config.{gated[0]} requires beta access")
        if self.busy_first > 0:
            self.busy_first -= 1
            return _error(
                429,
                "RATE_LIMIT_EXCEEDED",
                "Too many concurrent requests",
                **{"Retry-After": str(self.busy_retry_after)},
            )
        insurer = self.insurer_for(url)
        script = self.scripts.get(insurer or "", self.default_script)
        if script.scenario == "http_500":
            return _error(500, "INTERNAL_ERROR", "Internal server error")
        if script.scenario == "http_429":
            return _error(429, "RATE_LIMIT_EXCEEDED", "Rate limit exceeded", **{"Retry-After": "1"})
        if script.scenario == "http_402":
            return _error(402, "INSUFFICIENT_CREDITS", "Not enough credits to start this run")
        run = FakeAgentRun(run_id=str(uuid.uuid4()), insurer=insurer, script=script, body=body)
        with self._lock:
            self.runs[run.run_id] = run
        run.task = asyncio.get_running_loop().create_task(self._play(run))
        return run

    async def _run_sse(self, request: Request) -> Response:
        started = await self._start(request)
        if isinstance(started, Response):
            return started
        quote = (str(started.body["url"]), _REFERENCE.sub("", str(started.body["goal"])))
        cut = self.drop_before_started and quote not in self._quotes_connected
        self._quotes_connected.add(quote)
        return StreamingResponse(
            self._stream(started, cut_before_started=cut),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    async def _run_async(self, request: Request) -> Response:
        started = await self._start(request)
        if isinstance(started, Response):
            return started
        return JSONResponse({"run_id": started.run_id, "error": None})

    async def _list_v1_runs(self, request: Request) -> Response:
        refused = self._refusal(request)
        if refused is not None:
            return refused
        self.list_calls += 1
        goal = request.query_params.get("goal", "").lower()
        after = request.query_params.get("created_after")
        status = request.query_params.get("status")
        try:
            since = datetime.fromisoformat(after.replace("Z", "+00:00")) if after else None
            limit = int(request.query_params.get("limit", "20"))
        except ValueError:
            return _error(400, "INVALID_INPUT", "created_after or limit is malformed")
        if not 1 <= limit <= 100:
            return _error(400, "INVALID_INPUT", "limit must be from 1 to 100")
        if status is not None and status not in RUN_STATUSES:
            return _error(400, "INVALID_INPUT", f"status must be one of {sorted(RUN_STATUSES)}")
        matching = [
            run.as_run()
            for run in reversed(list(self.runs.values()))
            # TinyFish searches a goal's first 500 characters.
            if goal in str(run.body.get("goal", ""))[:500].lower()
            and (since is None or run.created_at > since)
            and (status is None or run.status == status)
        ]
        return JSONResponse(
            {
                "data": matching[:limit],
                "pagination": {
                    "total": len(matching),
                    "has_more": len(matching) > limit,
                    "next_cursor": None,
                },
            }
        )

    async def _get_run(self, request: Request) -> Response:
        refused = self._refusal(request)
        if refused is not None:
            return refused
        run = self.runs.get(request.path_params["run_id"])
        if run is None:
            return _error(404, "NOT_FOUND", "Run not found")
        run.get_calls += 1
        return JSONResponse(run.as_run())

    async def _cancel_run(self, request: Request) -> Response:
        refused = self._refusal(request)
        if refused is not None:
            return refused
        run = self.runs.get(request.path_params["run_id"])
        if run is None:
            return _error(404, "NOT_FOUND", "Run not found")
        run.cancel_calls += 1
        message: str | None = None
        if run.status == "CANCELLED":
            message = "Run already cancelled"
        elif run.status in TERMINAL:
            message = "Run already finished"
        else:
            if run.task is not None:
                run.task.cancel()
            run.finish("CANCELLED")
        return JSONResponse(
            {
                "run_id": run.run_id,
                "status": run.status,
                "cancelled_at": _iso(run.cancelled_at),
                "message": message,
            }
        )

    async def _list_runs(self, request: Request) -> Response:
        return JSONResponse({"runs": self.run_records()})

    async def _pause(self, seconds: float) -> None:
        if seconds > 0:
            await asyncio.sleep(seconds)

    async def _play(self, run: FakeAgentRun) -> None:
        """The agent run's life, on its own clock: queue, steps, outcome, within its caps."""
        caps = run.body.get("agent_config") or {}
        max_seconds, max_steps = caps.get("max_duration_seconds"), caps.get("max_steps")
        await self._pause(run.script.pending)
        if self.concurrency is None:
            await self._run(run, max_seconds, max_steps)
            return
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.concurrency)
        async with self._slots:  # past the account's cap, the run waits PENDING
            await self._run(run, max_seconds, max_steps)

    async def _run(self, run: FakeAgentRun, max_seconds: Any, max_steps: Any) -> None:
        run.status, run.started_at = "RUNNING", _now()
        run.emit({"type": "STARTED", "run_id": run.run_id, "timestamp": _iso(run.started_at)})
        try:
            async with asyncio.timeout(max_seconds):
                await self._work(run, max_steps)
        except TimeoutError:
            run.finish(
                "FAILED",
                error={
                    "code": "MAX_DURATION_EXCEEDED",
                    "message": f"The run reached its max_duration_seconds ({max_seconds} s)",
                    "category": "AGENT_FAILURE",
                    "retry_after": None,
                },
            )

    async def _work(self, run: FakeAgentRun, max_steps: int | None) -> None:
        scenario, url, goal = run.script.scenario, run.body["url"], run.body["goal"]
        steps = PROGRESS_STEPS[:2] if scenario in ("blocked", "captcha") else PROGRESS_STEPS
        if run.script.duration is not None:
            gap = run.script.duration / (len(steps) + 1)
        else:
            gap = (3.0 if scenario == "slow" else 0.8) * self.delay_scale
        run.emit(
            {
                "type": "STREAMING_URL",
                "run_id": run.run_id,
                "streaming_url": f"https://stream.example.invalid/{run.run_id}",
                "timestamp": _iso(_now()),
            }
        )
        for index, step in enumerate(steps):
            await self._pause(gap)
            if max_steps is not None and index >= max_steps:
                run.finish(
                    "FAILED",
                    error={
                        "code": "MAX_STEPS_EXCEEDED",
                        "message": f"The run reached its max_steps ({max_steps})",
                        "category": "AGENT_FAILURE",
                        "retry_after": None,
                    },
                )
                return
            if scenario == "slow" or index % 3 == 2:
                run.emit({"type": "HEARTBEAT", "timestamp": _iso(_now())})
            purpose = step.format(url=url)
            run.steps.append({"purpose": purpose, "timestamp": _iso(_now())})
            run.emit(
                {
                    "type": "PROGRESS",
                    "run_id": run.run_id,
                    "purpose": purpose,
                    "timestamp": _iso(_now()),
                }
            )
        await self._pause(gap)
        if scenario in FAILURES or scenario == "failed":
            run.finish("FAILED", error=FAILURES.get(scenario, FAILURES["system_failure"]))
            return
        if scenario == "declined":
            result: dict[str, Any] = {
                "outcome": "no_quote",
                "reason": "The site asks to call a local agent to finish this quote",
            }
        elif scenario == "blocked":
            result = {"outcome": "blocked", "reason": "A CAPTCHA appeared"}
        else:
            result = self.quote_result(goal)
        if "output_schema" not in run.body:
            result = {"status": "success", **result}
        run.finish("COMPLETED", result=result)

    async def _stream(
        self, run: FakeAgentRun, *, cut_before_started: bool = False
    ) -> AsyncIterator[bytes]:
        """One client's view of the run's events; leaving early leaves the run going."""
        run.stream_clients += 1
        if cut_before_started:
            self.dropped_connections += 1
            yield b": connected\n\n"
            raise _CutConnection
        sent, progress = 0, 0
        while True:
            waiting = run.changed
            while sent < len(run.events):
                event = run.events[sent]
                sent += 1
                if event["type"] == "HEARTBEAT":
                    yield b": keep-alive\n\n"
                yield _frame(event)
                if event["type"] == "COMPLETE":
                    return
                if event["type"] == "PROGRESS":
                    progress += 1
                    if progress == STREAM_CUT_AFTER and run.script.scenario == "drop":
                        raise _CutConnection
                    if progress == STREAM_CUT_AFTER and run.script.scenario == "truncated":
                        return
            await waiting.wait()

    @staticmethod
    def quote_result(goal: str) -> dict[str, Any]:
        """A stable, plausible quote for this goal (monthly premium 80–230, 6-month total)."""
        digest = int(hashlib.sha256(goal.encode()).hexdigest()[:8], 16)
        monthly = 80 + (digest % 15_000) / 100
        return {
            "outcome": "quoted",
            "monthly_premium": None,
            "term_premium": f"${monthly * 6:,.2f}",
            "term_months": 6,
            "deductible": 500 if "$500 deductible" in goal else 1000 if "$1,000" in goal else 0,
            "currency": "USD",
            "reason": None,
        }


class FakeTinyFishServer(FakeTinyFish):
    """FakeTinyFish served by uvicorn on 127.0.0.1 (an ephemeral port) in a background thread."""

    def __init__(self, *, port: int = 0, **options: Any) -> None:
        super().__init__(**options)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", port))
        self.port: int = self._socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(
            uvicorn.Config(
                self.app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1
            )
        )
        self._thread: threading.Thread | None = None

    def start(self) -> FakeTinyFishServer:
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the fake TinyFish server did not start")
            threading.Event().wait(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._socket.close()

    def __enter__(self) -> FakeTinyFishServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay-scale", type=float, default=1.0)
    parser.add_argument("--api-key", default="test-tinyfish-key")
    parser.add_argument("--default-scenario", default="quote", metavar="SPEC")
    parser.add_argument(
        "--scenario",
        action="append",
        default=[],
        metavar="INSURER=SPEC",
        help="SPEC is SCENARIO[,duration=S][,pending=S]; "
        f"SCENARIO one of {', '.join(SCENARIOS)}; repeatable",
    )
    parser.add_argument("--no-structured-output", action="store_true")
    parser.add_argument(
        "--no-beta-agent-config", action="store_true", help="403 for agent_config.max_steps/mode"
    )
    parser.add_argument("--concurrency", type=int, default=None, help="the account's agent cap")
    parser.add_argument("--drop-before-started", action="store_true")
    args = parser.parse_args(argv)
    try:
        fake = FakeTinyFish(
            api_key=args.api_key,
            scenarios=dict(item.split("=", 1) for item in args.scenario),
            default_scenario=args.default_scenario,
            delay_scale=args.delay_scale,
            structured_output=not args.no_structured_output,
            beta_agent_config=not args.no_beta_agent_config,
            concurrency=args.concurrency,
            drop_before_started=args.drop_before_started,
        )
    except ValueError as exc:
        parser.error(str(exc))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    server = _AnnouncingServer(uvicorn.Config(fake.app, log_level="warning", lifespan="off"))
    server.run(sockets=[sock])
    sys.exit(0)


class _AnnouncingServer(uvicorn.Server):
    """Prints "READY <url>" once listening, for the process that started this one."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and sockets:
            print(f"READY http://127.0.0.1:{sockets[0].getsockname()[1]}", flush=True)


if __name__ == "__main__":
    main()
