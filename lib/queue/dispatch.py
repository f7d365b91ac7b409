"""Handing a new run's work to the queue: one message per provider and the run's deadline."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta

from lib.config import Settings
from lib.models import ProviderId, QuoteRequest, utc_now
from lib.queue import TOPIC, QueueUnavailable, require_queue
from lib.queue.messages import ProviderWorkMessage, RunDeadlineMessage, seal

log = logging.getLogger(__name__)

# How long after its deadline a run's messages are still worth delivering.
RETENTION_MARGIN_SECONDS = 3600


async def dispatch_run(
    settings: Settings,
    run_id: str,
    providers: list[ProviderId],
    request: QuoteRequest,
    deadline: datetime,
) -> None:
    """Enqueue the run's provider work and its deadline. Raises QueueNotConfigured or
    QueueUnavailable; a message already sent stays (its worker finds the run ended and stops)."""
    require_queue(settings)
    from vercel.queue import send

    retention = timedelta(
        seconds=max((deadline - utc_now()).total_seconds(), 0) + RETENTION_MARGIN_SECONDS
    )
    sends = [
        send(
            TOPIC,
            seal(
                ProviderWorkMessage(
                    run_id=run_id,
                    provider=provider,
                    total=len(providers),
                    deadline=deadline,
                    request=request,
                ),
                settings.secret,
            ),
            idempotency_key=f"{run_id}:{provider}",
            retention=retention,
        )
        for provider in providers
    ]
    sends.append(
        send(
            TOPIC,
            seal(RunDeadlineMessage(run_id=run_id, deadline=deadline), settings.secret),
            idempotency_key=f"{run_id}:deadline",
            retention=retention,
            delay=timedelta(seconds=max((deadline - utc_now()).total_seconds(), 0) + 1),
        )
    )
    results = await asyncio.gather(*sends, return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        first = failures[0]
        log.warning(
            "enqueueing run %s failed for %d of %d messages: %s",
            run_id,
            len(failures),
            len(results),
            type(first).__name__,
        )
        # Whatever the SDK or its HTTP client raised, the run's work is not (all) queued.
        raise QueueUnavailable("The work queue did not accept the run.") from first
