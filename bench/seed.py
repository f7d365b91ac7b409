"""The seed's design (`shared/seed/shared-storage-fix.md`), faithfully, as the baseline.

- A run is one JSON blob, `quote:{runId}` = `{"status": ..., "events": [...]}`, SET with EX 7200.
- Appending an event is read-modify-write: GET the blob, add the event, SET the blob back
  (`updateQuoteRunEvents`). Two writers at once both read the same blob and one event is lost.
- A streaming client is served by a loop that GETs the whole blob every 500 ms
  (`setInterval(..., 500)`) and sends the events it has not sent yet, until the run is done.

Run against the same Upstash REST endpoint, through the Python SDK (`upstash-redis`) as this
project's KV store is. Two choices favour the seed, so its figures are a lower bound: replies are
plain JSON (`rest_encoding=None`, as this project uses; the JS SDK's default base64 would add a
third to every byte read), and its poll loop hands events straight to the client here, without the
HTTP hop through a function that this project's figures include.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httpx

from lib.store.upstash import UpstashRest

TTL_SECONDS = 7200
POLL_SECONDS = 0.5


def seed_key(run_id: str) -> str:
    return f"quote:{run_id}"


class SeedStore:
    """`getQuoteRun` / `setQuoteRun` / `updateQuoteRunEvents` of the seed, against KV."""

    def __init__(
        self, url: str, token: str, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self._redis = UpstashRest(url, token, transport=transport, timeout=10.0)

    async def get_run(self, run_id: str) -> dict[str, Any] | None:
        raw = await self._redis.command("GET", seed_key(run_id))
        if raw is None:
            return None
        run: dict[str, Any] = json.loads(raw)
        return run

    async def set_run(self, run_id: str, run: dict[str, Any]) -> None:
        blob = json.dumps(run, separators=(",", ":"))
        await self._redis.command("SET", seed_key(run_id), blob, "EX", TTL_SECONDS)

    async def create_run(self, run_id: str) -> None:
        await self.set_run(run_id, {"status": "processing", "events": []})

    async def append_event(
        self, run_id: str, event: dict[str, Any], *, status: str | None = None
    ) -> None:
        """`updateQuoteRunEvents`: read the whole run, add the event, write the whole run back."""
        run = await self.get_run(run_id)
        if run is None:
            raise LookupError(f"seed run {run_id} not found")
        run["events"].append(event)
        if status is not None:
            run["status"] = status
        await self.set_run(run_id, run)

    async def stream(
        self,
        run_id: str,
        on_event: Callable[[int, dict[str, Any]], None],
        *,
        first_poll_delay: float = 0.0,
        within: float = 60.0,
    ) -> None:
        """The seed's SSE handler: send what is there, then poll the whole blob every 500 ms and
        send the events not sent yet (their index is their id) until the run is no longer
        processing. `first_poll_delay` staggers independent clients' poll phases."""
        sent = 0
        give_up = time.monotonic() + within
        next_poll = time.monotonic() + first_poll_delay
        while time.monotonic() < give_up:
            await asyncio.sleep(max(0.0, next_poll - time.monotonic()))
            next_poll += POLL_SECONDS  # setInterval: a fixed cadence, whatever a GET takes
            run = await self.get_run(run_id)
            if run is None:
                return
            events: list[dict[str, Any]] = run["events"]
            for index in range(sent, len(events)):
                on_event(index, events[index])
            sent = len(events)
            if run["status"] != "processing":
                return

    async def aclose(self) -> None:
        await self._redis.aclose()
