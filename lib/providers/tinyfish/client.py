"""The HTTP side of TinyFish's agent API, over httpx + httpx-sse (both already run-time
dependencies; the official SDK would add tenacity and a retry loop of its own):

- `POST /v1/automation/run-sse` with `X-API-Key`: starts an agent run and streams its events
  (`data:` JSON with a `type`: STARTED `run_id`, STREAMING_URL, PROGRESS `purpose`, HEARTBEAT,
  COMPLETE `status` `result` `error`). Dropping the stream does not stop the run.
- `GET /v1/runs/{id}`: the run (`status` PENDING|RUNNING|COMPLETED|FAILED|CANCELLED, `result`,
  `error`, and per the API reference a `steps` array the SDK 0.11 `Run` model does not declare).
- `GET /v1/runs?goal=…&created_after=…`: runs whose goal contains a text (case-insensitive).
- `POST /v1/runs/{id}/cancel`: idempotent; a run already over answers with its final status.

Field names follow the official `tinyfish` SDK 0.11 (agent/types.py, runs/types.py). This module
knows URLs, headers and framing; what answers mean is lib.providers.tinyfish.errors' business.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from httpx_sse import aconnect_sse

logger = logging.getLogger(__name__)

RUN_SSE_PATH = "/v1/automation/run-sse"
RUNS_PATH = "/v1/runs"
# Generous: the agent can think for a while between events; HEARTBEATs keep the stream alive.
DEFAULT_TIMEOUT = httpx.Timeout(connect=10.0, read=90.0, write=10.0, pool=10.0)
# What TinyFish documents for a run id (path parameter pattern ^[A-Za-z0-9_-]+$).
_AGENT_RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def is_agent_run_id(value: object) -> bool:
    return isinstance(value, str) and _AGENT_RUN_ID.fullmatch(value) is not None


class RunRefused(Exception):
    """A non-2xx answer to the run request (its body read), for the caller to classify."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response


class TinyFishClient:
    """One connection pool to the agent API, created on first use."""

    def __init__(
        self,
        *,
        api_key: str,
        api_url: str,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._api_key = api_key
        self.base_url = api_url.rstrip("/")
        self._timeout = timeout
        self._transport = transport
        self._client: httpx.AsyncClient | None = None

    def __repr__(self) -> str:
        return f"TinyFishClient(base_url={self.base_url!r})"

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=self._timeout,
                transport=self._transport,
                headers={"User-Agent": "quote-runs/0.1 (+httpx)", "X-API-Key": self._api_key},
            )
        return self._client

    @asynccontextmanager
    async def run_events(
        self, body: dict[str, Any]
    ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """Starts an agent run; yields its events as JSON objects (malformed ones skipped).
        Raises RunRefused for a non-2xx answer; transport errors and httpx_sse.SSEError (an
        answer that is not an event stream) propagate."""
        async with aconnect_sse(
            self._http(), "POST", self.base_url + RUN_SSE_PATH, json=body
        ) as source:
            if not source.response.is_success:
                await source.response.aread()
                raise RunRefused(source.response)
            yield _event_objects(source.aiter_sse())

    async def get_run(self, agent_run_id: str) -> httpx.Response:
        """GET /v1/runs/{id}, body read; the caller judges the status."""
        return await self._http().get(f"{self.base_url}{RUNS_PATH}/{agent_run_id}")

    async def find_runs(self, *, goal_contains: str, created_after: str) -> httpx.Response:
        """GET /v1/runs?goal=…&created_after=… (newest first), body read."""
        return await self._http().get(
            self.base_url + RUNS_PATH,
            params={"goal": goal_contains, "created_after": created_after, "limit": 10},
        )

    async def cancel_run(self, agent_run_id: str) -> httpx.Response:
        """POST /v1/runs/{id}/cancel (no body), body read; the caller judges the status."""
        return await self._http().post(f"{self.base_url}{RUNS_PATH}/{agent_run_id}/cancel")

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


async def _event_objects(events: AsyncIterator[Any]) -> AsyncIterator[dict[str, Any]]:
    async for sse in events:
        event = event_json(sse.data)
        if event is not None:
            yield event


def event_json(data: str) -> dict[str, Any] | None:
    """One event's JSON object, or None for an empty or malformed `data:` (skipped, not fatal)."""
    if not data.strip():
        return None
    try:
        event = json.loads(data)
    except ValueError:
        logger.debug("skipped a TinyFish event whose data is not JSON (%d chars)", len(data))
        return None
    return event if isinstance(event, dict) else None
