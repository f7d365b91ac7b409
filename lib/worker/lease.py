"""The two leases a provider's delivery holds: the provider's own (who works on it: claim, keep,
release) and, where TINYFISH_MAX_CONCURRENCY is set, one of the deployment's agent slots (an
agent run in flight). Both end by themselves when their holder stops renewing them."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import NoReturn

from lib.models import ProviderId, ProviderWork, RunEvent
from lib.store import Store, StoreUnavailable
from lib.store.base import RELEASED, ProviderClaim
from lib.worker.clock import Clock

log = logging.getLogger(__name__)

# A renewal storage could not take is tried again this much later.
RENEWAL_RETRY_SECONDS = 1.0


class AgentSlot:
    """This provider's place in the deployment's agent budget, held while its agent run runs."""

    def __init__(
        self, store: Store, holder: str, limit: int | None, duration: timedelta, clock: Clock
    ) -> None:
        self._store = store
        self._holder = holder
        self._limit = limit
        self._duration = duration
        self._clock = clock
        self.held = False

    async def take(self) -> bool:
        """True when the agent run may go ahead (no budget, a slot free, or this one's already).
        Raises StoreUnavailable."""
        if self._limit is None:
            return True
        now = self._clock.now()
        self.held = await self._store.take_agent_slot(
            self._holder, limit=self._limit, now=now, until=now + self._duration
        )
        return self.held

    async def renew(self) -> None:
        if self.held:
            with contextlib.suppress(StoreUnavailable):
                await self.take()

    async def release(self) -> None:
        """Free the slot (its lease would free it anyway: storage trouble is not an error)."""
        if self.held:
            with contextlib.suppress(StoreUnavailable):
                await self._store.release_agent_slot(self._holder)
            self.held = False


class ProviderLease:
    """Who works on one provider of one run, and until when."""

    def __init__(
        self,
        store: Store,
        run_id: str,
        provider: ProviderId,
        owner: str,
        duration: timedelta,
        clock: Clock,
    ) -> None:
        self._store = store
        self._run_id = run_id
        self._provider = provider
        self.owner = owner
        self.duration = duration
        self._clock = clock
        self._last_write = clock.now()

    async def claim(
        self, first_work: ProviderWork, first_events: Sequence[RunEvent]
    ) -> ProviderClaim:
        """Raises StoreUnavailable."""
        now = self._clock.now()
        claim = await self._store.claim_provider(
            self._run_id,
            self._provider,
            self.owner,
            now=now,
            lease_until=now + self.duration,
            alive_since=now - self.duration,
            first_work=first_work,
            first_events=first_events,
        )
        self._last_write = now  # a claim sets the lease
        return claim

    def written(self) -> None:
        """A write by the holder just now: a sign of life that defers the next renewal."""
        self._last_write = self._clock.now()

    def lease_end(self) -> datetime:
        return self._clock.now() + self.duration

    async def keep(self, slot: AgentSlot) -> NoReturn:
        """Renew the lease whenever the holder has written nothing for two thirds of it (a claim
        counts recent events as signs of life; a renewal that fails has the last third, retried
        every second, as Kubernetes' leader election renews a 15 s lease within 10 s; each
        renewal is a billed command), and the agent slot every third of it.
        Ends only by raising why the lease could not be kept (LeaseLost, RunFinalized,
        RunNotFound)."""
        quiet = self.duration * 2 / 3
        slot_interval = self.duration / 3
        slot_due = self._clock.now() + slot_interval
        while True:
            due = self._last_write + quiet
            if slot.held:
                due = min(due, slot_due)
            await self._clock.sleep((due - self._clock.now()).total_seconds())
            now = self._clock.now()
            if slot.held and now >= slot_due:
                await slot.renew()
                slot_due = now + slot_interval
            if now - self._last_write < quiet:
                continue
            try:
                await self._store.renew_lease(
                    self._run_id, self._provider, self.owner, now + self.duration
                )
            except StoreUnavailable:
                await self._clock.sleep(RENEWAL_RETRY_SECONDS)
                continue
            self._last_write = now

    async def release(self, work: ProviderWork) -> None:
        """Store the work and let the next delivery claim at once (best effort: a lease not
        released ends by itself)."""
        with contextlib.suppress(StoreUnavailable):
            await self._store.save_provider_work(
                self._run_id, self._provider, self.owner, work, lease_until=RELEASED
            )
