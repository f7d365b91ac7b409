"""The `make dev` host as the end-to-end tests drive it: its environment (on either store, or
against the local TinyFish-compatible server), a run started on it, its stream read once or to the
end reconnecting as a browser would, the run's events checked gap-free, and the lines its function
processes wrote."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from tests.fake_tinyfish import FakeTinyFishServer

ROOT = Path(__file__).resolve().parent.parent
LEASE_SECONDS = 3.0
REQUEST = {
    "vin": "2C3CDZAG2GH967639",
    "zip": "94107",
    "driver": {"firstName": "Ana", "lastName": "Lee", "dateOfBirth": "1990-04-12"},
}


def host_env(store_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> dict[str, str]:
    env = {
        "QUOTES_DB_PATH": str(tmp_path / "quotes.sqlite3"),
        "SIMULATED_DELAY_SCALE": "0.3",
        "RUN_LEASE_SECONDS": str(LEASE_SECONDS),
        "KV_REST_API_URL": "",
        "KV_REST_API_TOKEN": "",
        "TINYFISH_API_KEY": "",
        "QUOTE_RATE_LIMIT_PER_MINUTE": "0",
        "QUOTE_RUNS_PER_DAY": "0",  # KV counters outlive a test session
    }
    if store_kind == "kv":
        server = request.getfixturevalue("upstash_server")
        env.update(KV_REST_API_URL=server.url, KV_REST_API_TOKEN=server.token)
    return env


@dataclass
class StreamVisit:
    status: int
    instance: str
    events: list[dict[str, Any]] = field(default_factory=list)


async def visit_stream(
    client: httpx.AsyncClient,
    run_id: str,
    last_event_id: int | None,
    *,
    max_events: int | None = None,
    on_event: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
) -> StreamVisit:
    """Connect once; read until the terminal event, `max_events`, or the server closes."""
    headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
    async with aconnect_sse(
        client, "GET", f"/api/quotes/{run_id}/stream", headers=headers
    ) as source:
        visit = StreamVisit(
            source.response.status_code, source.response.headers.get("x-devhost-instance", "")
        )
        if visit.status != 200:
            return visit
        async for sse in source.aiter_sse():
            if not sse.data:
                continue
            event = json.loads(sse.data)
            assert sse.id == str(event["id"])
            visit.events.append(event)
            if on_event is not None:
                await on_event(event)
            if event["type"] in ("complete", "error"):
                break
            if max_events is not None and len(visit.events) >= max_events:
                break
    return visit


async def start_run(client: httpx.AsyncClient, **changes: Any) -> tuple[str, str]:
    response = await client.post("/api/quotes", json={**REQUEST, **changes})
    assert response.status_code == 202, response.text
    return response.json()["runId"], response.headers["x-devhost-instance"]


def assert_gap_free(events: list[dict[str, Any]]) -> None:
    assert [e["id"] for e in events] == list(range(len(events)))
    assert events[0]["type"] == "started"
    assert [e["type"] in ("complete", "error") for e in events].count(True) == 1
    assert events[-1]["type"] in ("complete", "error")


async def read_run_reconnecting(
    client: httpx.AsyncClient, run_id: str, events: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Read the run to its terminal event, reconnecting after every few events (and whenever a
    stream ends early), as a browser's EventSource would."""
    events = list(events or [])
    deadline = time.monotonic() + 120
    while not events or events[-1]["type"] not in ("complete", "error"):
        assert time.monotonic() < deadline, f"run {run_id} did not end"
        cursor = events[-1]["id"] if events else None
        visit = await visit_stream(client, run_id, cursor, max_events=random.randint(2, 6))
        assert visit.status in (200, 204)
        events.extend(visit.events)
    return events


def tinyfish_env(tmp: Path, tinyfish: FakeTinyFishServer, **extra: str) -> dict[str, str]:
    return {
        "QUOTES_DB_PATH": str(tmp / "quotes.sqlite3"),
        "KV_REST_API_URL": "",
        "KV_REST_API_TOKEN": "",
        "TINYFISH_API_KEY": tinyfish.api_key,
        "TINYFISH_API_URL": tinyfish.url,
        "RUN_LEASE_SECONDS": str(LEASE_SECONDS),
        "QUOTE_RATE_LIMIT_PER_MINUTE": "0",
        **extra,
    }


def function_lines(lines: list[str]) -> list[str]:
    """The lines the function processes wrote (the host prefixes each with its instance)."""
    return [line.split("] ", 1)[1] for line in lines if line.startswith("[api/")]
