"""A quote run's life in the store: its record at creation, and ending it exactly once —
completed when every provider has its outcome, failed at its deadline or when its work is lost,
cancelled when whoever started it says stop (DELETE).

Whoever notices first ends the run: the worker that records the last outcome, a redelivered
message that finds its provider finished, the run's delayed deadline message, or (the last
resort, for runs whose queued work is gone, lib/staleness.py) a reader. The store's fence makes
it happen once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, NamedTuple

from lib.config import Settings
from lib.models import (
    CancelledEvent,
    CompleteEvent,
    ErrorEvent,
    ErrorInfo,
    PricedRequest,
    ProviderId,
    ProviderState,
    QuoteRequest,
    RunEnd,
    RunErrorCode,
    RunRecord,
    utc_now,
)
from lib.run_log import log_run_summary

if TYPE_CHECKING:
    from lib.providers.base import QuoteSource
from lib.store import (
    OutcomesChanged,
    RunFinalized,
    RunNotFound,
    RunState,
    Store,
    StoreUnavailable,
)

log = logging.getLogger(__name__)

RUN_ERROR_MESSAGES: dict[RunErrorCode, str] = {
    "worker_lost": "The work on this quote run was lost and nothing is left to resume it.",
    "deadline_exceeded": "The quote run did not finish within its time limit.",
    "internal": "The quote run failed unexpectedly.",
}


def new_run_record(
    run_id: str,
    request: QuoteRequest,
    providers: list[ProviderId],
    deadline: datetime,
    *,
    now: datetime | None = None,
) -> RunRecord:
    now = now or utc_now()
    return RunRecord(
        run_id=run_id,
        created_at=now,
        updated_at=now,
        deadline=deadline,
        coverage=request.coverage,
        providers=[ProviderState(provider=p) for p in providers],
        priced=PricedRequest.of(request, providers),
    )


def run_deadline(settings: Settings, now: datetime | None = None) -> datetime:
    """A run's own deadline: RUN_MAX_SECONDS from now (from its creation, given `now`),
    whatever any invocation's limit."""
    return (now or utc_now()) + timedelta(seconds=settings.run_max_seconds)


def complete_event(record: RunRecord) -> CompleteEvent:
    quotes = record.quotes
    failed = [p.provider for p in record.providers if p.status == "failed"]
    return CompleteEvent(quotes=quotes, best=quotes[0].provider if quotes else None, failed=failed)


async def complete_if_done(store: Store, run_id: str) -> bool:
    """Write the run's `complete` event if every provider has its outcome. True when the run has
    ended (now, or before)."""
    state = await store.get_run(run_id, tail=0)
    if state is None or state.finalized:
        return state is not None
    if state.record.completed < len(state.record.providers):
        return False
    event = complete_event(state.record)
    try:
        await store.finish_run(
            run_id, event, RunEnd(status="completed", ended_at=event.ts, error=None)
        )
    except (RunFinalized, RunNotFound):
        return True
    log_run_summary(state.record.model_copy(update={"status": "completed", "ended_at": event.ts}))
    return True


async def fail_run(store: Store, run_id: str, code: RunErrorCode) -> bool:
    """End the run as failed with `code`; False when it had already ended."""
    message = RUN_ERROR_MESSAGES[code]
    event = ErrorEvent(code=code, message=message)
    end = RunEnd(status="failed", ended_at=event.ts, error=ErrorInfo(code=code, message=message))
    try:
        await store.finish_run(run_id, event, end)
    except (RunFinalized, RunNotFound):
        return False
    try:
        ended = await store.get_run(run_id, tail=0)
    except StoreUnavailable:
        ended = None
    if ended is not None:
        log_run_summary(ended.record)
    else:
        log.error("run %s failed (%s); its summary could not be read", run_id, code)
    return True


def cancelled_event(record: RunRecord) -> CancelledEvent:
    quotes = record.quotes
    return CancelledEvent(
        quotes=quotes,
        best=quotes[0].provider if quotes else None,
        failed=[p.provider for p in record.providers if p.status == "failed"],
        stopped=[p.provider for p in record.providers if p.status not in ("quoted", "failed")],
    )


class Cancelled(NamedTuple):
    """What a cancel found or did. `ended`: the run as this cancel ended it (None when it had
    ended before: by an earlier cancel, or otherwise, as `state` says). `state`: the run now."""

    state: RunState
    ended: RunRecord | None


async def cancel_run(store: Store, run_id: str) -> Cancelled | None:
    """End the run as cancelled, keeping the quotes received; None when there is no such run.
    Each try writes only if no outcome landed since its read (at most one per provider)."""
    state = await store.get_run(run_id, tail=0)
    tries = 0
    while state is not None and not state.finalized and tries <= len(state.record.providers):
        tries += 1
        event = cancelled_event(state.record)
        end = RunEnd(status="cancelled", ended_at=event.ts)
        try:
            await store.cancel_run(run_id, event, end, completed=state.record.completed)
        except (OutcomesChanged, RunFinalized):
            state = await store.get_run(run_id, tail=0)
            continue
        except RunNotFound:
            return None
        ended = state.record.model_copy(
            update={
                "status": "cancelled",
                "ended_at": event.ts,
                "providers": [
                    p.model_copy(update={"status": "cancelled"})
                    if p.provider in event.stopped
                    else p
                    for p in state.record.providers
                ],
            }
        )
        now = await store.get_run(run_id)
        return Cancelled(now, ended) if now is not None else None
    if state is None:
        return None
    if not state.finalized:
        raise StoreUnavailable(f"run {run_id} kept changing; try the cancel again", retry_after=1)
    # Re-read with the tail the snapshot shows each provider's latest activity from.
    now = await store.get_run(run_id)
    return Cancelled(now, None) if now is not None else None


def agent_slot_holder(run_id: str, provider: ProviderId) -> str:
    """Who holds an agent slot (TINYFISH_MAX_CONCURRENCY) for one insurer of one run: the same
    name for every delivery of it, so whoever ends the run can give the slot back."""
    return f"{run_id}:{provider}"


async def free_agent_slots(store: Store, record: RunRecord, agent_limit: int | None) -> None:
    """Give back the agent slots of a run's unfinished insurers when the run ends by its deadline
    or a cancel (their workers, if alive, give theirs back too; one that is gone would hold its
    slot until its lease ran out, keeping another run's agent waiting). Nothing to do, and no
    command, without an agent budget. Best effort: a slot not given back expires."""
    if agent_limit is None:
        return
    for provider in record.providers:
        if provider.status in ("quoted", "failed"):
            continue  # its worker gave the slot back with the outcome
        with contextlib.suppress(StoreUnavailable):
            await store.release_agent_slot(agent_slot_holder(record.run_id, provider.provider))


def agent_runs_to_cancel(record: RunRecord) -> Iterable[tuple[ProviderId, str]]:
    """The agent runs of the run's unfinished providers not known to be cancelled yet."""
    for provider in record.providers:
        if provider.status in ("quoted", "failed"):
            continue
        work = record.work.get(provider.provider)
        if work is None:
            continue
        for agent_run_id in work.agent_run_ids:
            if agent_run_id not in work.cancelled_agent_run_ids:
                yield provider.provider, agent_run_id


async def stop_agent_runs(source: QuoteSource, ended: RunRecord) -> None:
    """After a cancel: cancel each agent run still going, all at once (best effort: a worker
    that finds its run ended cancels its own too), then log the run's summary with those it
    cancelled and the steps each had taken."""

    async def stop(provider: ProviderId, agent_run_id: str) -> tuple[bool, int | None]:
        try:
            await source.cancel(agent_run_id)
        except Exception:  # best effort; the agent's own caps bound its cost
            log.exception("run %s %s: cancelling agent run failed", ended.run_id, provider)
            return False, None
        log.info("run %s %s: cancelled agent run %s", ended.run_id, provider, agent_run_id)
        # The workers store an attempt's steps only with its next write: ask what was paid.
        return True, await source.agent_steps(agent_run_id)

    going = list(agent_runs_to_cancel(ended))
    results = await asyncio.gather(*(stop(provider, run) for provider, run in going))
    work, steps = dict(ended.work), dict(ended.agent_steps)
    for (provider, agent_run_id), (cancelled, paid) in zip(going, results, strict=True):
        if not cancelled:
            continue
        state = work[provider]
        paid = max(paid or 0, state.agent_steps.get(agent_run_id, 0))
        work[provider] = state.model_copy(
            update={
                "cancelled_agent_run_ids": [*state.cancelled_agent_run_ids, agent_run_id],
                "agent_steps": {**state.agent_steps, agent_run_id: paid}
                if paid
                else state.agent_steps,
            }
        )
        if work[provider].agent_steps:
            steps[provider] = work[provider].total_agent_steps
    log_run_summary(ended.model_copy(update={"work": work, "agent_steps": steps}))
