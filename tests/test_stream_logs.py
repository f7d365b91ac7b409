"""The stream function's lines: one when a stream opens and one when it closes, saying why."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from lib.staleness import LOST_AFTER_DEADLINE_SECONDS
from lib.store import StoreUnavailable
from lib.store.sqlite import SQLiteEventWatch
from tests.functions import VercelRouter
from tests.store_steps import orphan_run


def stream_lines(json_logs, run_id: str) -> list[dict[str, Any]]:
    return [o for o in json_logs.matching(runId=run_id) if o["message"].startswith("stream")]


async def test_a_stream_that_sends_the_terminal_event_logs_open_and_close_terminal(
    api, configured_store, json_logs
) -> None:
    run_id = await orphan_run(configured_store, past_deadline=LOST_AFTER_DEADLINE_SECONDS + 5)
    response = await api.get(f"/api/quotes/{run_id}/stream", headers={"Last-Event-ID": "0"})
    assert response.status_code == 200
    opened, closed = stream_lines(json_logs, run_id)
    assert opened["message"] == "stream opened"
    assert opened["lastEventId"] == 0
    assert closed["level"] == "info"
    assert closed["closeReason"] == "terminal"
    assert closed["events"] == 2
    assert closed["lastEventId"] == 2


async def test_a_stream_that_reaches_its_own_deadline_logs_close_deadline(
    configured_store, configure, fresh_instance, json_logs
) -> None:
    configure(STREAM_MAX_SECONDS="1", RUN_LEASE_SECONDS="60")
    api = fresh_instance()
    run_id = await orphan_run(configured_store, past_deadline=-200)
    await asyncio.wait_for(api.get(f"/api/quotes/{run_id}/stream"), timeout=10)
    _, closed = stream_lines(json_logs, run_id)
    assert closed["closeReason"] == "deadline"
    assert closed["events"] == 2
    assert closed["seconds"] >= 0.9


async def test_a_stream_of_a_finished_run_with_nothing_new_logs_that_it_did_not_open(
    api, configured_store, json_logs
) -> None:
    run_id = await orphan_run(configured_store, past_deadline=LOST_AFTER_DEADLINE_SECONDS + 5)
    await api.get(f"/api/quotes/{run_id}")  # finalizes it: events 0..2
    response = await api.get(f"/api/quotes/{run_id}/stream", headers={"Last-Event-ID": "2"})
    assert response.status_code == 204
    (line,) = stream_lines(json_logs, run_id)
    assert line["message"] == "stream not opened: the run has ended"


@pytest.mark.parametrize("store_kind", ["sqlite"])
async def test_a_stream_whose_storage_fails_logs_a_warning_and_close_storage_error(
    configured_store, configure, fresh_instance, json_logs, monkeypatch
) -> None:
    configure(RUN_LEASE_SECONDS="60")

    async def unavailable(self: SQLiteEventWatch, after: int, timeout: float) -> list[Any]:
        raise StoreUnavailable("disk I/O error")

    monkeypatch.setattr(SQLiteEventWatch, "next_events", unavailable)
    api = fresh_instance()
    run_id = await orphan_run(configured_store, past_deadline=-200)
    await asyncio.wait_for(api.get(f"/api/quotes/{run_id}/stream"), timeout=10)
    _, warning, closed = stream_lines(json_logs, run_id)
    assert warning["level"] == "warning"
    assert "disk I/O error" in warning["message"]
    assert closed["closeReason"] == "storage_error"


async def test_a_stream_whose_client_leaves_logs_close_client_left(
    configured_store, configure, json_logs
) -> None:
    configure(RUN_LEASE_SECONDS="60")
    router = VercelRouter()
    run_id = await orphan_run(configured_store, past_deadline=-200)
    first_event = asyncio.Event()
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await first_event.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)
        if b"data:" in message.get("body", b""):
            first_event.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": f"/api/quotes/{run_id}/stream",
        "raw_path": f"/api/quotes/{run_id}/stream".encode(),
        "query_string": b"",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 5000),
        "server": ("testserver", 80),
    }
    await asyncio.wait_for(router(scope, receive, send), timeout=10)
    assert messages[0]["status"] == 200
    _, closed = stream_lines(json_logs, run_id)
    assert closed["closeReason"] == "client_left"
    assert closed["events"] >= 1
