"""A reader's last resort: whether a processing run's worker is gone (its heartbeat older than
the lease) or its deadline passed, and finalizing such a run exactly once, by whichever reader
sees it first. The stream and snapshot functions call this on every request, so it imports no
models until a run actually has to be finalized."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from lib.terms import RunErrorCode, utc_now

if TYPE_CHECKING:
    from lib.config import Settings
    from lib.models import RunRecord
    from lib.store import RunState, Store

log = logging.getLogger(__name__)

RUN_ERROR_MESSAGES: dict[RunErrorCode, str] = {
    "worker_lost": "The worker running this quote stopped responding.",
    "deadline_exceeded": "The quote run did not finish within its time limit.",
    "internal": "The quote run failed unexpectedly.",
}


def failed_record(record: RunRecord, code: RunErrorCode) -> RunRecord:
    """The record of a run that failed as a whole: unfinished providers fail with its code."""
    from lib.models import ErrorInfo

    message = RUN_ERROR_MESSAGES[code]
    now = utc_now()
    return record.model_copy(
        update={
            "status": "failed",
            "updated_at": now,
            "heartbeat_at": now,
            "error": ErrorInfo(code=code, message=message),
            "providers": [
                p
                if p.status in ("quoted", "failed")
                else p.model_copy(
                    update={"status": "failed", "error": ErrorInfo(code=code, message=message)}
                )
                for p in record.providers
            ],
        }
    )


def stale_reason(state: RunState, settings: Settings, now: datetime) -> RunErrorCode | None:
    """Why a processing run must be finalized by a reader, or None while its worker is alive."""
    record = state.record
    if state.finalized or record.status != "processing":
        return None
    if now >= record.deadline:
        return "deadline_exceeded"
    if now - record.heartbeat_at > timedelta(seconds=settings.run_lease_seconds):
        return "worker_lost"
    return None


def next_stale_check(state: RunState, settings: Settings, last_heard: float | None) -> float:
    """time.time() at which the run would turn stale if its worker shows no sign of life."""
    heartbeat = state.record.heartbeat_at.timestamp()
    if last_heard is not None:
        heartbeat = max(heartbeat, last_heard)
    return min(heartbeat + settings.run_lease_seconds, state.record.deadline.timestamp()) + 0.05


async def finalize_if_stale(store: Store, state: RunState, settings: Settings) -> bool:
    """Finalize a run whose worker is gone or whose deadline passed: once, by whichever reader
    sees it first. Returns True when the run is (now) finalized by this or another reader."""
    reason = stale_reason(state, settings, utc_now())
    if reason is None:
        return False
    from lib.models import ErrorEvent

    event = ErrorEvent(code=reason, message=RUN_ERROR_MESSAGES[reason])
    event_id = await store.finalize_stale_run(state, event, failed_record(state.record, reason))
    if event_id is not None:
        log.info("run %s finalized as %s by a reader", state.record.run_id, reason)
    return True
