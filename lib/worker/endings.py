"""How a provider's delivery ends: a quote, a failure, a hand-back to the queue, the run's end;
and, before a provider is declared out of time or of deliveries, the last look at its agent run."""

from __future__ import annotations

import logging
from datetime import datetime

from lib.models import Quote
from lib.providers.base import (
    AgentAttempt,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    QuoteSource,
)
from lib.queue.messages import ProviderWorkMessage
from lib.store import Store
from lib.worker.clock import Clock
from lib.worker.delivery import Delivery, HandBack
from lib.worker.journal import Journal
from lib.worker.lease import AgentSlot, ProviderLease
from lib.workflow import fail_run

log = logging.getLogger(__name__)

WAITING_FOR_AN_AGENT = "Waiting for a free agent"
OUT_OF_TIME = "The insurer's site did not produce a quote in time."
OUT_OF_DELIVERIES = "The provider's queued work ran out of deliveries before it finished."


class Endings:
    """The ways one delivery of one provider's work ends, on its journal and leases."""

    def __init__(
        self,
        store: Store,
        source: QuoteSource,
        message: ProviderWorkMessage,
        delivery: Delivery,
        journal: Journal,
        lease: ProviderLease,
        slot: AgentSlot,
        clock: Clock,
    ) -> None:
        self._store, self._source = store, source
        self._message, self._delivery = message, delivery
        self._journal, self._lease, self._slot = journal, lease, slot
        self._clock = clock

    async def gave_up(self, error: ProviderError) -> None:
        """The failure is the provider's outcome."""
        await self._journal.give_up_on(error)
        await self._slot.release()
        await self._journal.failed(error)

    async def wait_for_agent(self, wait_ms: int) -> HandBack | None:
        """No agent is free (the deployment's budget, or the agent API's 429): give the slot
        and the message back; the wait counts against the provider's time, not its attempts."""
        await self._slot.release()
        if self._journal.work.last_activity != WAITING_FOR_AN_AGENT:
            await self._journal.activity(WAITING_FOR_AN_AGENT)
        return await self.hand_off(wait_ms / 1000, "no free agent")

    async def hand_off(self, delay: float, reason: str) -> HandBack | None:
        """Release the lease so the next delivery can claim at once, and give the message back;
        the last delivery cannot, and ends the provider with what its agent run has."""
        if self._delivery.last:
            if not await self._read_back():
                await self._journal.cancel_agent_run()
                await self._slot.release()
                await self._journal.failed(ProviderUnavailable(OUT_OF_DELIVERIES))
            return None
        await self._lease.release(self._journal.work)
        log.info(
            "run %s %s: handing back to the queue (delivery %d): %s",
            self._message.run_id,
            self._message.provider,
            self._delivery.count,
            reason,
        )
        return HandBack(delay, reason)

    async def out_of_time(self, deadline: datetime) -> None:
        if await self._read_back():
            return
        await self._journal.cancel_agent_run()
        await self._slot.release()
        if deadline < self._message.deadline:
            await self._journal.failed(ProviderTimeout(OUT_OF_TIME))
            return
        # The run's own deadline, not the provider's: the run ends, and every other worker's
        # next write is refused (each cancels its agent run).
        if await fail_run(self._store, self._message.run_id, "deadline_exceeded"):
            log.error("run %s ended at its deadline", self._message.run_id)

    async def _read_back(self) -> bool:
        """A paid result is never thrown away: before the provider is declared out of time or
        of deliveries, its agent run is read once, and a quote it finished is used."""
        work, now = self._journal.work, self._clock.now()
        if work.agent_run_id is None and work.attempt_started_at is None:
            return False  # no attempt began: nothing was paid for
        if work.agent_run_id in work.cancelled_agent_run_ids:
            return False
        attempt = AgentAttempt(
            number=work.attempt,
            started_at=work.attempt_started_at or now,
            deadline=now,
            agent_run_id=work.agent_run_id,
        )
        try:
            request, provider = self._message.request, self._message.provider
            quote = await self._source.read_back(request, provider, attempt, self._journal)
        except Exception:
            log.exception("run %s: reading the agent run back failed", self._message.run_id)
            return False
        if quote is None:
            return False
        log.info(
            "run %s %s: the agent run had finished: its quote is used",
            self._message.run_id,
            self._message.provider,
        )
        await self.quoted(quote)
        return True

    async def quoted(self, quote: Quote) -> None:
        await self._slot.release()
        await self._journal.quoted(quote)

    async def run_ended(self) -> None:
        # The run ended elsewhere (its deadline, or it failed as a whole): stop paying.
        await self._journal.cancel_agent_run()
        await self._slot.release()

    def lost(self) -> None:
        # Judged dead and replaced: the new owner reattaches to the same agent run.
        log.warning(
            "run %s %s: lease lost; another delivery took over",
            self._message.run_id,
            self._message.provider,
        )
