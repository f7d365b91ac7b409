"""A run's steps written straight to a store, as the store and cancel tests write them: a
worker's claim under a lease, its activity, a provider quoted or failed, the run's end (completed,
or its work lost); a new run, an orphaned one, its events read back; and several store instances
on one storage."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any

from lib.models import (
    ActivityEvent,
    CompleteEvent,
    ErrorEvent,
    ErrorInfo,
    ProviderErrorEvent,
    ProviderId,
    ProviderOutcome,
    QuoteEvent,
    RunEnd,
    utc_now,
)
from lib.store import ProviderClaim, Store
from tests.conftest import make_quote, make_record

LEASE = timedelta(seconds=45)


def activity(message: str, provider: ProviderId = "geico", **fields: Any) -> ActivityEvent:
    return ActivityEvent(provider=provider, message=message, **fields)


def quoted(provider: ProviderId) -> tuple[ProviderOutcome, QuoteEvent]:
    quote = make_quote(provider)
    outcome = ProviderOutcome(status="quoted", quote=quote, finished_at=utc_now())
    return outcome, QuoteEvent(provider=provider, quote=quote)


def failed(provider: ProviderId) -> tuple[ProviderOutcome, ProviderErrorEvent]:
    error = ErrorInfo(code="provider_blocked", message="The site showed a CAPTCHA.")
    outcome = ProviderOutcome(status="failed", error=error, finished_at=utc_now())
    event = ProviderErrorEvent(
        provider=provider, code="provider_blocked", message=error.message, retryable=False
    )
    return outcome, event


def completed() -> tuple[CompleteEvent, RunEnd]:
    event = CompleteEvent(quotes=[], best=None, failed=[])
    return event, RunEnd(status="completed", ended_at=event.ts)


def lost() -> tuple[ErrorEvent, RunEnd]:
    event = ErrorEvent(code="worker_lost", message="The run's work was lost.")
    error = ErrorInfo(code=event.code, message=event.message)
    return event, RunEnd(status="failed", ended_at=event.ts, error=error)


async def new_run(store: Store) -> str:
    record = make_record()
    assert (await store.create_run(record)).created
    return record.run_id


async def claim(
    store: Store,
    run_id: str,
    owner: str,
    *,
    now: datetime,
    alive_since: datetime | None = None,
    provider: ProviderId = "geico",
) -> ProviderClaim:
    """A worker's claim at `now` (a moment the test chooses: leases are judged by it)."""
    return await store.claim_provider(
        run_id,
        provider,
        owner,
        now=now,
        lease_until=now + LEASE,
        alive_since=alive_since if alive_since is not None else now - LEASE,
    )


async def events_of(store: Store, run_id: str) -> list[dict[str, Any]]:
    return [e.as_dict() for e in await store.read_events(run_id, after=-1)]


@asynccontextmanager
async def instances(
    store_factory: Any, count: int, **options: object
) -> AsyncIterator[list[Store]]:
    """`count` stores on the same storage, as separate function instances."""
    stores: list[Store] = [store_factory(**options) for _ in range(count)]
    try:
        yield stores
    finally:
        await asyncio.gather(*(s.aclose() for s in stores))


async def orphan_run(store: Store, *, past_deadline: float) -> str:
    """A processing run whose queued work is gone: nobody writing, its deadline passed."""
    record = make_record(deadline=utc_now() - timedelta(seconds=past_deadline))
    await store.create_run(record)
    await store.append_event(record.run_id, ActivityEvent(provider="geico", message="working"))
    return record.run_id
