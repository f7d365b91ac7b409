"""A quote run's life in the store: its record at creation, and ending it exactly once —
completed when every provider has its outcome, failed at its deadline or when its work is lost.

Whoever notices first ends the run: the worker that records the last outcome, a redelivered
message that finds its provider finished, the run's delayed deadline message, or (the last
resort, for runs whose queued work is gone, lib/staleness.py) a reader. The store's fence makes
it happen once.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from lib.config import Settings
from lib.models import (
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
from lib.store import RunFinalized, RunNotFound, Store, StoreUnavailable

log = logging.getLogger(__name__)

RUN_ERROR_MESSAGES: dict[RunErrorCode, str] = {
    "worker_lost": "The work on this quote run was lost and nothing is left to resume it.",
    "deadline_exceeded": "The quote run did not finish within its time limit.",
    "internal": "The quote run failed unexpectedly.",
}


def new_run_record(
    run_id: str, request: QuoteRequest, providers: list[ProviderId], deadline: datetime
) -> RunRecord:
    now = utc_now()
    return RunRecord(
        run_id=run_id,
        created_at=now,
        updated_at=now,
        deadline=deadline,
        coverage=request.coverage,
        providers=[ProviderState(provider=p) for p in providers],
        priced=PricedRequest.of(request, providers),
    )


def run_deadline(settings: Settings) -> datetime:
    """A run's own deadline: RUN_MAX_SECONDS from now, whatever any invocation's limit."""
    return utc_now() + timedelta(seconds=settings.run_max_seconds)


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
