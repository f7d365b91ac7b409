"""The quote-run workflow against a real (SQLite) store and scripted quote sources."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest

from lib.config import settings_from_env
from lib.models import (
    PROVIDER_IDS,
    ErrorEvent,
    ProviderId,
    Quote,
    QuoteRequest,
    RunEvent,
    RunRecord,
    utc_now,
)
from lib.providers.base import AgentAttempt, AttemptListener, ProviderDeclined
from lib.store import StoreUnavailable
from lib.store.sqlite import SQLiteStore
from lib.workflow import QuoteRun, new_run_record
from tests.conftest import make_quote

REQUEST = QuoteRequest.model_validate(
    {
        "vin": "2C3CDZAG2GH967639",
        "zip": "94107",
        "driver": {"firstName": "Ana", "lastName": "Lee", "dateOfBirth": "1990-04-12"},
    }
)
SETTINGS = replace(settings_from_env({}), run_lease_seconds=0.6, provider_timeout_seconds=5)


class ScriptedSource:
    """Quotes `100 + index` for each provider; `gate` holds every provider until it is set."""

    name = "scripted"

    def __init__(
        self, *, gate: asyncio.Event | None = None, declines: tuple[str, ...] = ()
    ) -> None:
        self.gate = gate
        self.declines = declines
        self.started: list[str] = []
        self.all_started = asyncio.Event()
        self.cancelled: list[str] = []

    async def quote(
        self,
        request: QuoteRequest,
        provider: ProviderId,
        attempt: AgentAttempt,
        listener: AttemptListener,
    ) -> Quote:
        self.started.append(provider)
        if len(self.started) == len(PROVIDER_IDS):
            self.all_started.set()
        await listener.activity(f"Filling in the {provider} form")
        try:
            if self.gate is not None:
                await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled.append(provider)
            raise
        if provider in self.declines:
            raise ProviderDeclined("No quote is offered online for this driver.")
        return make_quote(provider, 100 + PROVIDER_IDS.index(provider))

    async def cancel(self, agent_run_id: str) -> None:
        return None

    async def aclose(self) -> None:
        return None


@pytest.fixture
async def store(tmp_path) -> AsyncIterator[SQLiteStore]:
    built = SQLiteStore(str(tmp_path / "quotes.sqlite3"), ttl_seconds=7200)
    yield built
    await built.aclose()


async def new_run(store: Any, *, deadline_in: float = 60) -> RunRecord:
    record = new_run_record(
        "r" * 22, REQUEST, list(PROVIDER_IDS), utc_now() + timedelta(seconds=deadline_in)
    )
    await store.create_run(record)
    return record


async def events_of(store: Any, run_id: str) -> list[dict[str, Any]]:
    return [e.as_dict() for e in await store.read_events(run_id, after=-1)]


async def test_providers_finishing_at_once_still_count_progress_one_by_one(store) -> None:
    gate = asyncio.Event()
    source = ScriptedSource(gate=gate)
    record = await new_run(store)
    run = asyncio.create_task(QuoteRun(store, source, SETTINGS, REQUEST, record).run())
    await source.all_started.wait()
    gate.set()  # all five answer in the same instant
    await run
    events = await events_of(store, record.run_id)
    progress = [e["completed"] for e in events if e["type"] == "progress"]
    assert progress == [1, 2, 3, 4, 5]
    for i, event in enumerate(events):
        if event["type"] == "progress":
            assert events[i - 1]["type"] in ("quote", "provider_error")


async def test_a_run_ends_with_one_complete_event_cheapest_first(store) -> None:
    source = ScriptedSource(declines=("geico",))
    record = await new_run(store)
    await QuoteRun(store, source, SETTINGS, REQUEST, record).run()
    events = await events_of(store, record.run_id)
    assert [e["id"] for e in events] == list(range(len(events)))
    complete = events[-1]
    assert complete["type"] == "complete"
    assert [q["provider"] for q in complete["quotes"]] == [
        "progressive",
        "state_farm",
        "allstate",
        "liberty_mutual",
    ]
    assert complete["best"] == "progressive"
    assert complete["failed"] == ["geico"]
    declined = next(e for e in events if e["type"] == "provider_error")
    assert (declined["code"], declined["retryable"]) == ("provider_declined", False)
    state = await store.get_run(record.run_id)
    assert state.record.status == "completed"
    assert state.record.provider("geico").error.code == "provider_declined"
    assert state.finalized


async def test_a_run_past_its_deadline_fails_and_its_unfinished_providers_with_it(store) -> None:
    source = ScriptedSource(gate=asyncio.Event())  # never answers
    record = await new_run(store, deadline_in=0.4)
    started = time.monotonic()
    await QuoteRun(store, source, SETTINGS, REQUEST, record).run()
    assert time.monotonic() - started < 2
    events = await events_of(store, record.run_id)
    assert events[-1]["type"] == "error"
    assert events[-1]["code"] == "deadline_exceeded"
    state = await store.get_run(record.run_id)
    assert state.record.status == "failed"
    assert {p.error.code for p in state.record.providers} == {"deadline_exceeded"}
    assert sorted(source.cancelled) == sorted(PROVIDER_IDS)


async def test_an_idle_run_keeps_its_heartbeat_fresh_without_events(store) -> None:
    gate = asyncio.Event()
    record = await new_run(store)
    run = asyncio.create_task(
        QuoteRun(store, ScriptedSource(gate=gate), SETTINGS, REQUEST, record).run()
    )
    await asyncio.sleep(0.3)
    before = await store.get_run(record.run_id)
    await asyncio.sleep(SETTINGS.run_lease_seconds * 1.5)
    after = await store.get_run(record.run_id)
    gate.set()
    await run
    assert after.last_event_id == before.last_event_id, "no event was written while idle"
    assert after.record.heartbeat_at > before.record.heartbeat_at
    assert utc_now() - after.record.heartbeat_at < timedelta(seconds=SETTINGS.run_lease_seconds)


async def test_a_worker_whose_run_was_finalized_elsewhere_stops_asking_providers(store) -> None:
    source = ScriptedSource(gate=asyncio.Event())
    record = await new_run(store)
    run = asyncio.create_task(QuoteRun(store, source, SETTINGS, REQUEST, record).run())
    await source.all_started.wait()
    while (await store.get_run(record.run_id)).last_event_id < 10:  # noqa: ASYNC110
        await asyncio.sleep(0.01)  # every provider has reported and now waits on its site
    # A reader judged the worker lost and fenced the run.
    await store.append_event(record.run_id, ErrorEvent(code="worker_lost", message="gone"))
    await asyncio.wait_for(run, timeout=SETTINGS.run_lease_seconds * 2)
    assert sorted(source.cancelled) == sorted(PROVIDER_IDS)
    events = await events_of(store, record.run_id)
    assert [e["type"] for e in events].count("error") == 1
    assert events[-1]["type"] == "error"


class FlakyStore(SQLiteStore):
    """Applies an append, then reports storage unavailable for it: the reply was lost."""

    lose_every = 3

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0

    async def append_event(self, run_id: str, event: RunEvent, **kwargs: Any) -> int:
        event_id = await super().append_event(run_id, event, **kwargs)
        self.calls += 1
        if self.calls % self.lose_every == 0:
            raise StoreUnavailable("reply lost")
        return event_id


async def test_appends_retried_after_storage_faults_land_exactly_once(tmp_path) -> None:
    store = FlakyStore(str(tmp_path / "flaky.sqlite3"), ttl_seconds=7200)
    record = await new_run(store)
    run = QuoteRun(store, ScriptedSource(), SETTINGS, REQUEST, record)
    run.store_retry_delay = 0.001
    await run.run()
    events = await events_of(store, record.run_id)
    await store.aclose()
    assert store.calls > len(events), "some appends were retried"
    assert [e["id"] for e in events] == list(range(len(events)))
    keys = [(e["type"], e.get("provider"), e.get("message"), e.get("completed")) for e in events]
    assert len(keys) == len(set(keys)), "an event was written twice"
    assert events[-1]["type"] == "complete"
