"""One delivery of one provider's work: claim its lease, then run attempts and act on what each
came to, until the provider has its outcome or the work is handed back to the queue."""

from __future__ import annotations

import logging
import random
import secrets
from collections.abc import Callable
from datetime import datetime, timedelta

from lib.config import Settings
from lib.models import PROVIDER_NAMES, ActivityEvent, ProviderWork
from lib.providers.base import (
    ProviderError,
    QuoteSource,
)
from lib.queue.messages import ProviderWorkMessage
from lib.store import LeaseLost, RunFinalized, RunNotFound, Store, StoreUnavailable
from lib.worker.attempt import (
    STORE_RETRY_SECONDS,
    AttemptRunner,
    Ended,
    Failed,
    HandOff,
    Lost,
    OutOfTime,
    Quoted,
)
from lib.worker.clock import SYSTEM_CLOCK, Clock
from lib.worker.delivery import Delivery, HandBack
from lib.worker.endings import Endings
from lib.worker.journal import Journal, StorageDown
from lib.worker.lease import AgentSlot, ProviderLease
from lib.worker.policy import (
    RETRY_POLICY,
    Failure,
    GiveUp,
    Retry,
    RetryPolicy,
    WaitForAgent,
    next_step,
)
from lib.workflow import agent_slot_holder, complete_if_done

log = logging.getLogger(__name__)


class ProviderTask:
    """One delivery of one provider's work."""

    def __init__(
        self,
        store: Store,
        source: QuoteSource,
        settings: Settings,
        message: ProviderWorkMessage,
        delivery: Delivery,
        *,
        clock: Clock = SYSTEM_CLOCK,
        policy: RetryPolicy = RETRY_POLICY,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._store, self._source, self._settings = store, source, settings
        self._message, self._delivery = message, delivery
        self._clock, self._policy, self._jitter = clock, policy, jitter
        owner = f"{delivery.message_id}:{delivery.count}:{secrets.token_hex(4)}"
        duration = timedelta(seconds=settings.run_lease_seconds)
        self._lease = ProviderLease(store, message.run_id, message.provider, owner, duration, clock)
        holder = agent_slot_holder(message.run_id, message.provider)
        limit = settings.tinyfish_max_concurrency
        self._slot = AgentSlot(store, holder, limit, duration, clock)

    async def run(self) -> None:
        """Raises HandBack when the work must continue in a later delivery."""
        handback = await self._deliver()
        if handback is not None:
            raise handback

    async def _deliver(self) -> HandBack | None:
        message, now = self._message, self._clock.now()
        if now >= message.deadline:
            return None  # the run's deadline message ends it and cancels what is still going
        # The provider's start rides on the claim that finds no work stored yet: one write.
        first_work = ProviderWork(attempt=1, attempt_started_at=now, first_started_at=now)
        name = PROVIDER_NAMES[message.provider]
        starting = ActivityEvent(provider=message.provider, message=f"Starting {name} quote")
        try:
            claim = await self._lease.claim(first_work, [starting])
        except StoreUnavailable as error:
            return HandBack(STORE_RETRY_SECONDS, f"storage unavailable: {error}")
        match claim.result:
            case "finished":
                await complete_if_done(self._store, message.run_id)
                return None
            case "ended" | "missing":
                return None
            case "held" if self._delivery.last:
                return None  # another delivery is alive on it; it finishes the work
            case "held":
                wait = ((claim.busy_until or now) - now).total_seconds()
                return HandBack(min(max(wait + 1, 1), 60), "held by another worker")
        journal = Journal(
            self._store, self._source, message, self._lease, claim.work or first_work, self._clock
        )
        endings = Endings(
            self._store,
            self._source,
            message,
            self._delivery,
            journal,
            self._lease,
            self._slot,
            self._clock,
        )
        try:
            return await self._work_on(journal, endings)
        except (RunFinalized, RunNotFound):
            await endings.run_ended()
        except LeaseLost:
            endings.lost()
        except StorageDown:
            return HandBack(STORE_RETRY_SECONDS, "storage unavailable")
        return None

    async def _work_on(self, journal: Journal, endings: Endings) -> HandBack | None:
        deadline = self._provider_deadline(journal.work)
        runner = AttemptRunner(
            self._source, self._message, journal, self._lease, self._slot, self._clock
        )
        while True:
            stop_at = min(deadline, self._delivery.handoff_at(self._clock.now()))
            match await runner.run(deadline, stop_at):
                case Quoted(quote):
                    await endings.quoted(quote)
                    return None
                case OutOfTime():
                    await endings.out_of_time(deadline)
                    return None
                case HandOff(delay, reason):
                    return await endings.hand_off(delay, reason)
                case Ended():
                    await endings.run_ended()
                    return None
                case Lost():
                    endings.lost()
                    return None
                case Failed(error):
                    ms_left = (deadline - self._clock.now()) // timedelta(milliseconds=1)
                    failure = Failure.of(error)
                    attempt = journal.work.attempt
                    jitter = self._jitter()
                    match next_step(
                        self._policy, failure, attempt=attempt, ms_left=ms_left, jitter=jitter
                    ):
                        case Retry(wait_ms, same_attempt):
                            await self._retry(journal, error, wait_ms, same_attempt)
                        case WaitForAgent(wait_ms):
                            return await endings.wait_for_agent(wait_ms)
                        case GiveUp():
                            await endings.gave_up(error)
                            return None

    def _provider_deadline(self, work: ProviderWork) -> datetime:
        first_started = work.first_started_at or self._clock.now()
        budget = timedelta(seconds=self._settings.provider_timeout_seconds)
        return min(first_started + budget, self._message.deadline)

    async def _retry(
        self, journal: Journal, error: ProviderError, wait_ms: int, same_attempt: bool
    ) -> None:
        """Try again after `wait_ms`: the same attempt (its agent run may exist unseen: looked up
        by its reference, never paid for twice), else the next paid one."""
        if not same_attempt:
            await journal.give_up_on(error)
        log.warning(
            "run %s %s: attempt %d failed (%s); retrying%s",
            self._message.run_id,
            self._message.provider,
            journal.work.attempt,
            error.code,
            " the same attempt" if same_attempt else "",
        )
        await self._clock.sleep(wait_ms / 1000)
        if same_attempt:
            return
        work = journal.work
        journal.work = work.model_copy(
            update={
                "attempt": work.attempt + 1,
                "attempt_started_at": self._clock.now(),
                "agent_run_id": None,
            }
        )
        name = PROVIDER_NAMES[self._message.provider]
        of = self._policy.max_attempts
        await journal.save(f"Retrying {name} (attempt {journal.work.attempt} of {of})")
