"""The lines the person on call reads to learn what happened to a run: one per provider outcome as
it happens, and one summary when the run ends (completed, failed or cancelled), logged by whoever
ends it. Each has a `kind` (`provider_outcome`, `run_summary`) to filter on; the run id comes
from the log context.

Levels mean something: a quote is info, a provider's failure a warning, an auth or billing
failure from the agent API (`provider_auth`) an error, a run that fails as a whole an error, and
a cancelled run info (a person's choice, not a fault).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import TYPE_CHECKING

from lib.logs import log_context
from lib.terms import utc_now

if TYPE_CHECKING:
    from lib.models import ProviderId, ProviderWork, RunRecord

log = logging.getLogger(__name__)


def outcome_level(outcome: str) -> int:
    if outcome == "quoted":
        return logging.INFO
    return logging.ERROR if outcome == "provider_auth" else logging.WARNING


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start).total_seconds(), 3)


def _work_fields(work: ProviderWork | None) -> dict[str, object]:
    if work is None:
        return {"attempts": 0, "agentRunIds": []}
    fields: dict[str, object] = {"attempts": work.attempt, "agentRunIds": list(work.agent_run_ids)}
    if work.agent_steps:
        fields["agentSteps"] = work.total_agent_steps
    if work.cancelled_agent_run_ids:
        fields["cancelledAgentRunIds"] = list(work.cancelled_agent_run_ids)
    return fields


def log_provider_outcome(
    provider: ProviderId,
    outcome: str,
    work: ProviderWork,
    *,
    finished_at: datetime,
) -> None:
    """One provider's outcome, by the worker that records it: `outcome` is "quoted" or the
    error code."""
    seconds = _seconds(work.first_started_at, finished_at)
    log.log(
        outcome_level(outcome),
        "%s: %s after %d attempt(s)%s",
        provider,
        outcome,
        work.attempt,
        f" in {seconds:.1f} s" if seconds is not None else "",
        extra={
            "kind": "provider_outcome",
            "provider": provider,
            "outcome": outcome,
            **_work_fields(work),
            **({"seconds": seconds} if seconds is not None else {}),
        },
    )


def provider_summary(record: RunRecord, provider: ProviderId) -> dict[str, object]:
    """What became of one provider of an ended run: its outcome (or error code), attempts,
    deliveries, agent run ids, agent steps and time (where known: a provider never started has
    none)."""
    state = record.provider(provider)
    if state.status == "quoted":
        outcome = "quoted"
    elif state.error is not None:
        outcome = state.error.code
    else:
        outcome = state.status
    work = record.work.get(provider)
    lease = record.leases.get(provider)
    fields: dict[str, object] = {"outcome": outcome, **_work_fields(work)}
    fields["deliveries"] = lease.deliveries if lease is not None else 0
    if provider in record.agent_steps:
        fields["agentSteps"] = record.agent_steps[provider]
    finished = record.finished_at.get(provider, record.ended_at)
    seconds = _seconds(work.first_started_at if work else None, finished)
    if seconds is not None:
        fields["seconds"] = seconds
    return fields


def log_run_summary(record: RunRecord) -> None:
    """The one line that says how a run ended, by whoever ended it; `record` is the run as it
    was ended (status, error and ended_at set)."""
    providers = {p.provider: provider_summary(record, p.provider) for p in record.providers}
    quoted = sum(p.status == "quoted" for p in record.providers)
    seconds = _seconds(record.created_at, record.ended_at or utc_now())
    code = record.error.code if record.error is not None else None
    how = f"failed ({code})" if record.status == "failed" else record.status
    # Whichever provider's delivery ends the run, the line is the run's.
    with log_context(provider=None):
        log.log(
            # A cancel is a person's choice, not a fault.
            logging.ERROR if record.status == "failed" else logging.INFO,
            "run %s in %.1f s: %d quoted, %d not",
            how,
            seconds or 0.0,
            quoted,
            len(record.providers) - quoted,
            extra={
                "kind": "run_summary",
                "runId": record.run_id,
                "outcome": record.status,
                **({"errorCode": code} if code else {}),
                "seconds": seconds,
                "quoted": quoted,
                "notQuoted": len(record.providers) - quoted,
                "providers": providers,
            },
        )
