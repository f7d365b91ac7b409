"""One delivery of one provider's work: claim its lease, then run attempts and act on what each
came to, until the provider has its outcome or the work is handed back to the queue."""

from __future__ import annotations

import logging
import random
import secrets
from collections.abc import Callable
from datetime import datetime, timedelta

from lib.config import Settings
from lib.models import PROVIDER_NAMES, ActivityEvent, ProviderWork, Quote
from lib.providers.base import (
    AgentAttempt,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
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
from lib.workflow import complete_if_done, fail_run

log = logging.getLogger(__name__)

WAITING_FOR_AN_AGENT = "Waiting for a free agent"
OUT_OF_TIME = "The insurer's site did not produce a quote in time."
OUT_OF_DELIVERIES = "The provider's queued work ran out of deliveries before it finished."


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
        holder = f"{message.run_id}:{message.provider}"
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
        try:
            return await self._work_on(journal)
        except (RunFinalized, RunNotFound):
            await self._run_ended(journal)
        except LeaseLost:
            self._lost()
        except StorageDown:
            return HandBack(STORE_RETRY_SECONDS, "storage unavailable")
        return None

    async def _work_on(self, journal: Journal) -> HandBack | None:
        deadline = self._provider_deadline(journal.work)
        runner = AttemptRunner(
            self._source, self._message, journal, self._lease, self._slot, self._clock
        )
        while True:
            stop_at = min(deadline, self._delivery.handoff_at(self._clock.now()))
            match await runner.run(deadline, stop_at):
                case Quoted(quote):
                    await self._quoted(journal, quote)
                    return None
                case OutOfTime():
                    await self._out_of_time(journal, deadline)
                    return None
                case HandOff(delay, reason):
                    return await self._hand_off(journal, delay, reason)
                case Ended():
                    await self._run_ended(journal)
                    return None
                case Lost():
                    self._lost()
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
                            return await self._wait_for_agent(journal, wait_ms)
                        case GiveUp():
                            await journal.give_up_on(error)
                            await self._slot.release()
                            await journal.failed(error)
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

    async def _wait_for_agent(self, journal: Journal, wait_ms: int) -> HandBack | None:
        """No agent is free (the deployment's budget, or the agent API's 429): give the slot
        and the message back; the wait counts against the provider's time, not its attempts."""
        await self._slot.release()
        if journal.work.last_activity != WAITING_FOR_AN_AGENT:
            await journal.activity(WAITING_FOR_AN_AGENT)
        return await self._hand_off(journal, wait_ms / 1000, "no free agent")

    async def _hand_off(self, journal: Journal, delay: float, reason: str) -> HandBack | None:
        """Release the lease so the next delivery can claim at once, and give the message back;
        the last delivery cannot, and ends the provider with what its agent run has."""
        if self._delivery.last:
            if not await self._read_back(journal):
                await journal.cancel_agent_run()
                await self._slot.release()
                await journal.failed(ProviderUnavailable(OUT_OF_DELIVERIES))
            return None
        await self._lease.release(journal.work)
        log.info(
            "run %s %s: handing back to the queue (delivery %d): %s",
            self._message.run_id,
            self._message.provider,
            self._delivery.count,
            reason,
        )
        return HandBack(delay, reason)

    async def _out_of_time(self, journal: Journal, deadline: datetime) -> None:
        if await self._read_back(journal):
            return
        await journal.cancel_agent_run()
        await self._slot.release()
        if deadline < self._message.deadline:
            await journal.failed(ProviderTimeout(OUT_OF_TIME))
            return
        # The run's own deadline, not the provider's: the run ends, and every other worker's
        # next write is refused (each cancels its agent run).
        if await fail_run(self._store, self._message.run_id, "deadline_exceeded"):
            log.error("run %s ended at its deadline", self._message.run_id)

    async def _read_back(self, journal: Journal) -> bool:
        """A paid result is never thrown away: before the provider is declared out of time or
        of deliveries, its agent run is read once, and a quote it finished is used."""
        work, now = journal.work, self._clock.now()
        if work.agent_run_id is None or work.agent_run_id in work.cancelled_agent_run_ids:
            return False
        attempt = AgentAttempt(
            number=work.attempt,
            started_at=work.attempt_started_at or now,
            deadline=now,
            agent_run_id=work.agent_run_id,
        )
        try:
            request, provider = self._message.request, self._message.provider
            quote = await self._source.read_back(request, provider, attempt, journal)
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
        await self._quoted(journal, quote)
        return True

    async def _quoted(self, journal: Journal, quote: Quote) -> None:
        await self._slot.release()
        await journal.quoted(quote)

    async def _run_ended(self, journal: Journal) -> None:
        # The run ended elsewhere (its deadline, or it failed as a whole): stop paying.
        await journal.cancel_agent_run()
        await self._slot.release()

    def _lost(self) -> None:
        # Judged dead and replaced: the new owner reattaches to the same agent run.
        log.warning(
            "run %s %s: lease lost; another delivery took over",
            self._message.run_id,
            self._message.provider,
        )
