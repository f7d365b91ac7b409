"""One paid attempt at a provider's quote, run until it ends, the provider's time runs out, or the
delivery must hand it back; what it came to is returned as a `Step`, never raised."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from lib.models import Quote
from lib.providers.base import (
    AgentAttempt,
    ProviderBusy,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    QuoteSource,
)
from lib.queue.messages import ProviderWorkMessage
from lib.store import LeaseLost, RunFinalized, RunNotFound, StoreUnavailable
from lib.worker.clock import Clock
from lib.worker.journal import Journal, StorageDown
from lib.worker.lease import AgentSlot, ProviderLease

log = logging.getLogger(__name__)

HANDOFF_DELAY_SECONDS = 1.0
STORE_RETRY_SECONDS = 5.0
# An attempt stopped this close to the provider's deadline has run out of time.
DEADLINE_SLACK = timedelta(seconds=0.5)


@dataclass(frozen=True, slots=True)
class Quoted:
    quote: Quote


@dataclass(frozen=True, slots=True)
class Failed:
    error: ProviderError


@dataclass(frozen=True, slots=True)
class HandOff:
    """This delivery stops here (its invocation ends soon, or storage is down)."""

    delay: float
    reason: str


@dataclass(frozen=True, slots=True)
class OutOfTime:
    """The provider's deadline came."""


@dataclass(frozen=True, slots=True)
class Ended:
    """The run ended elsewhere (its deadline, or it failed as a whole)."""


@dataclass(frozen=True, slots=True)
class Lost:
    """This delivery was judged dead and replaced: the new owner carries on."""


Step = Quoted | Failed | HandOff | OutOfTime | Ended | Lost


class AttemptRunner:
    """Runs (or resumes) the provider's current attempt, keeping its leases meanwhile."""

    def __init__(
        self,
        source: QuoteSource,
        message: ProviderWorkMessage,
        journal: Journal,
        lease: ProviderLease,
        slot: AgentSlot,
        clock: Clock,
    ) -> None:
        self._source = source
        self._message = message
        self._journal = journal
        self._lease = lease
        self._slot = slot
        self._clock = clock

    async def run(self, deadline: datetime, stop_at: datetime) -> Step:
        """The attempt until `deadline` (the provider's), or until `stop_at` (the hand-off)."""
        now = self._clock.now()
        if now >= deadline:
            return OutOfTime()
        work = self._journal.work
        try:
            free = await self._slot.take()
        except StoreUnavailable as error:
            return HandOff(STORE_RETRY_SECONDS, f"storage unavailable: {error}")
        if not free and work.agent_run_id is None:  # an agent run already going goes on
            return Failed(ProviderBusy("No agent is free in this deployment now."))
        attempt = AgentAttempt(
            number=work.attempt,
            started_at=work.attempt_started_at or now,
            deadline=deadline,
            agent_run_id=work.agent_run_id,
        )
        request, provider = self._message.request, self._message.provider
        quote_task: asyncio.Future[Any] = asyncio.ensure_future(
            self._source.quote(request, provider, attempt, self._journal)
        )
        keeper: asyncio.Future[Any] = asyncio.ensure_future(self._lease.keep(self._slot))
        timer: asyncio.Future[Any] = asyncio.ensure_future(
            self._clock.sleep((stop_at - now).total_seconds())
        )
        try:
            done, _ = await asyncio.wait(
                {quote_task, keeper, timer}, return_when=asyncio.FIRST_COMPLETED
            )
            for task in (quote_task, keeper):
                if task in done:
                    return self._step_of(task)
        finally:
            # Stops waiting on the agent; the agent run itself goes on until it is cancelled.
            for task in (quote_task, keeper, timer):
                task.cancel()
            for task in (quote_task, keeper, timer):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._clock.now() >= deadline - DEADLINE_SLACK:
            return OutOfTime()
        return HandOff(HANDOFF_DELAY_SECONDS, "the invocation's deadline is near")

    def _step_of(self, task: asyncio.Future[Any]) -> Step:
        """What the attempt (or the lease keeper, which only ends by raising) came to. A bug in
        a source is a blip, not a crash that would burn the message's deliveries."""
        try:
            return Quoted(task.result())
        except ProviderTimeout:
            return OutOfTime()
        except ProviderError as error:
            return Failed(error)
        except (RunFinalized, RunNotFound):
            return Ended()
        except LeaseLost:
            return Lost()
        except (StorageDown, StoreUnavailable) as error:
            return HandOff(STORE_RETRY_SECONDS, f"storage unavailable: {error}")
        except Exception:
            message = self._message
            log.exception(
                "run %s %s: the quote source failed unexpectedly", message.run_id, message.provider
            )
            return Failed(ProviderUnavailable("The quote source failed unexpectedly."))
