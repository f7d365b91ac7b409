"""A local stand-in for TinyFish's `POST /v1/automation/run-sse`, for tests and local runs.

It checks `X-API-Key`, validates the body the way TinyFish documents (url and goal required,
output_schema limited to the structured-output keyword allowlist), and streams the events a
real run streams — STARTED, STREAMING_URL, PROGRESS…, HEARTBEAT, COMPLETE — with realistic
pauses multiplied by `delay_scale`.

The insurer is recognised from the body's `url` (lib.providers.tinyfish.INSURER_START_URLS) and
each insurer plays a scenario (default "quote"):

    quote       COMPLETED with a deterministic monthly premium derived from the goal
    declined    COMPLETED, outcome "no_quote"
    blocked     COMPLETED, outcome "blocked" (a CAPTCHA stopped the agent)
    failed      COMPLETE with status FAILED, a SYSTEM_FAILURE error
    captcha     COMPLETE with status FAILED, an error saying a CAPTCHA blocked the agent
    http_500    HTTP 500 before any event          http_429   HTTP 429 with Retry-After: 1
    http_402    HTTP 402 (out of credit)           slow       quote, with long pauses + HEARTBEATs
    truncated   the stream ends cleanly before COMPLETE
    drop        the connection is cut mid-stream (no clean end of the chunked body)

    with FakeTinyFishServer(api_key="k", scenarios={"geico": "declined"}, delay_scale=0.01) as tf:
        settings = ... TINYFISH_API_URL=tf.url, TINYFISH_API_KEY="k"
        tf.requests  # the JSON bodies received, in order

    python -m tests.fake_tinyfish --port 0 --delay-scale 0.1 --scenario geico=declined
    # prints "READY http://127.0.0.1:<port>" once listening
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import socket
import sys
import threading
import uuid
from collections.abc import AsyncIterator
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
    "failed",
    "captcha",
    "http_500",
    "http_429",
    "http_402",
    "slow",
    "truncated",
    "drop",
)
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


class _CutConnection(Exception):
    """Raised inside a streaming body so the server drops the connection mid-response."""


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


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


def _error(status: int, code: str, message: str, **headers: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


class FakeTinyFish:
    """The ASGI app and what it has seen. `scenarios` maps insurer id → scenario name."""

    def __init__(
        self,
        *,
        api_key: str = "test-tinyfish-key",
        scenarios: dict[str, str] | None = None,
        default_scenario: str = "quote",
        delay_scale: float = 1.0,
        structured_output: bool = True,
    ) -> None:
        for scenario in [default_scenario, *(scenarios or {}).values()]:
            if scenario not in SCENARIOS:
                raise ValueError(f"unknown scenario {scenario!r}; one of {', '.join(SCENARIOS)}")
        self.api_key = api_key
        self.scenarios = dict(scenarios or {})
        self.default_scenario = default_scenario
        self.delay_scale = delay_scale
        self.structured_output = structured_output
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.app = Starlette(
            routes=[Route("/v1/automation/run-sse", self._run_sse, methods=["POST"])]
        )

    def insurer_for(self, url: str) -> str | None:
        return next((p for p, start in INSURER_START_URLS.items() if start == url), None)

    async def _pause(self, seconds: float) -> None:
        if self.delay_scale > 0:
            await asyncio.sleep(seconds * self.delay_scale)

    async def _run_sse(self, request: Request) -> Response:
        if not request.headers.get("x-api-key"):
            return _error(401, "MISSING_API_KEY", "X-API-Key header is required")
        if request.headers["x-api-key"] != self.api_key:
            return _error(401, "INVALID_API_KEY", "Invalid or expired API key")
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
        insurer = self.insurer_for(url)
        scenario = self.scenarios.get(insurer or "", self.default_scenario)
        if scenario == "http_500":
            return _error(500, "INTERNAL_ERROR", "Internal server error")
        if scenario == "http_429":
            return _error(429, "RATE_LIMIT_EXCEEDED", "Rate limit exceeded", **{"Retry-After": "1"})
        if scenario == "http_402":
            return _error(402, "INSUFFICIENT_CREDITS", "Not enough credits to start this run")
        return StreamingResponse(
            self._events(scenario, url, goal, body),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    async def _events(
        self, scenario: str, url: str, goal: str, body: dict[str, Any]
    ) -> AsyncIterator[bytes]:
        run_id = str(uuid.uuid4())
        yield _frame({"type": "STARTED", "run_id": run_id, "timestamp": _now()})
        await self._pause(0.4)
        yield _frame(
            {
                "type": "STREAMING_URL",
                "run_id": run_id,
                "streaming_url": f"https://stream.example.invalid/{run_id}",
                "timestamp": _now(),
            }
        )
        gap = 3.0 if scenario == "slow" else 0.8
        for index, step in enumerate(PROGRESS_STEPS):
            await self._pause(gap)
            if scenario == "slow" or index % 3 == 2:
                yield b": keep-alive\n\n"
                yield _frame({"type": "HEARTBEAT", "timestamp": _now()})
            yield _frame(
                {
                    "type": "PROGRESS",
                    "run_id": run_id,
                    "purpose": step.format(url=url),
                    "timestamp": _now(),
                }
            )
            if scenario in ("truncated", "drop") and index == 3:
                if scenario == "drop":
                    raise _CutConnection
                return
            if scenario in ("blocked", "captcha") and index == 1:
                break
        await self._pause(gap)
        complete: dict[str, Any] = {
            "type": "COMPLETE",
            "run_id": run_id,
            "status": "COMPLETED",
            "timestamp": _now(),
            "result": None,
            "error": None,
        }
        if scenario in ("quote", "slow"):
            complete["result"] = self.quote_result(goal)
        elif scenario == "declined":
            complete["result"] = {
                "outcome": "no_quote",
                "reason": "The site asks to call a local agent to finish this quote",
            }
        elif scenario == "blocked":
            complete["result"] = {"outcome": "blocked", "reason": "A CAPTCHA appeared"}
        elif scenario == "failed":
            complete["status"] = "FAILED"
            complete["error"] = {
                "code": "service_busy",
                "message": "Browser crashed during execution",
                "category": "SYSTEM_FAILURE",
                "retry_after": 1,
            }
        elif scenario == "captcha":
            complete["status"] = "FAILED"
            complete["error"] = {
                "message": "Agent could not continue: the site showed a CAPTCHA challenge",
                "category": "AGENT_FAILURE",
            }
        if "output_schema" not in body and complete["result"] is not None:
            complete["result"] = {"status": "success", **complete["result"]}
        yield _frame(complete)

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
    parser.add_argument("--default-scenario", default="quote", choices=SCENARIOS)
    parser.add_argument(
        "--scenario",
        action="append",
        default=[],
        metavar="INSURER=SCENARIO",
        help=f"one of {', '.join(SCENARIOS)}; repeatable",
    )
    parser.add_argument("--no-structured-output", action="store_true")
    args = parser.parse_args(argv)
    scenarios = dict(item.split("=", 1) for item in args.scenario)
    fake = FakeTinyFish(
        api_key=args.api_key,
        scenarios=scenarios,
        default_scenario=args.default_scenario,
        delay_scale=args.delay_scale,
        structured_output=not args.no_structured_output,
    )
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
