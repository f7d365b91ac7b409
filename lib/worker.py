"""One queue delivery's work: one provider of one run, or a run's deadline.

A provider delivery claims the provider's lease in the store, resumes its paid attempt where the
last delivery left it (the agent run id is stored the moment the agent API reports it, so a
resumed attempt reattaches instead of paying for a second agent run), relays activity, and writes
the outcome. Shortly before its own invocation's deadline it releases the lease and hands the
message back to the queue (`HandBack`), and the next delivery resumes. Every agent run the
system stops caring about is cancelled. The queue SDK is not imported here: api/work.py maps
`HandBack` to the SDK's `RetryAfter`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from lib.config import Settings
from lib.models import (
    PROVIDER_NAMES,
    ActivityEvent,
    ErrorInfo,
    ProviderErrorEvent,
    ProviderOutcome,
    ProviderWork,
    Quote,
    QuoteEvent,
    utc_now,
)
from lib.providers.backoff import ATTEMPTS, STORE_WRITES
from lib.providers.base import (
    AgentAttempt,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    QuoteSource,
)
from lib.queue import MAX_DELIVERIES
from lib.queue.messages import ProviderWorkMessage, RunDeadlineMessage
from lib.run_log import log_provider_outcome
from lib.store import LeaseLost, RunFinalized, RunNotFound, Store, StoreUnavailable
from lib.store.base import RELEASED, new_nonce
from lib.workflow import complete_if_done, fail_run

log = logging.getLogger(__name__)

# A delivery hands its provider back this long before its invocation would be cut off.
HANDOFF_MARGIN_SECONDS = 15.0
HANDOFF_DELAY_SECONDS = 1.0
# Where the invocation's deadline is unknown (tests, other hosts): what Vercel gives at most.
DEFAULT_INVOCATION_SECONDS = 300.0
# Paid attempts per provider of a run, across every delivery.
MAX_ATTEMPTS = 3
# A retry that cannot get at least this long before the provider's deadline is not started.
MIN_ATTEMPT_SECONDS = 10.0
STORE_RETRY_SECONDS = 5.0
ACTIVITY_MAX_CHARS = 280


class DeliveriesExhausted(ProviderUnavailable):
    """The queue will not deliver this provider's message again: its work ends here."""

    transient = False


class HandBack(Exception):
    """Give the message back to the queue, to be delivered again after `delay` whole seconds."""

    def __init__(self, delay: float, reason: str) -> None:
        super().__init__(reason)
        # The queue takes whole seconds and truncates: a fraction rounds up, never down to 0.
        self.delay = whole_seconds(delay)


def whole_seconds(delay: float) -> int:
    """A delay as the queue can hold it: whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(delay))


@dataclass(frozen=True, slots=True)
class Delivery:
    """What the queue said about this delivery."""

    message_id: str
    count: int
    invocation_deadline: datetime | None

    @property
    def last(self) -> bool:
        return self.count >= MAX_DELIVERIES

    def handoff_at(self) -> datetime:
        deadline = self.invocation_deadline or utc_now() + timedelta(
            seconds=DEFAULT_INVOCATION_SECONDS
        )
        return deadline - timedelta(seconds=HANDOFF_MARGIN_SECONDS)


def normalised_activity(message: str) -> str:
    return " ".join(message.split())[:ACTIVITY_MAX_CHARS] or "Working"


class ProviderTask:
    """One delivery of one provider's work."""

    def __init__(
        self,
        store: Store,
        source: QuoteSource,
        settings: Settings,
        message: ProviderWorkMessage,
        delivery: Delivery,
    ) -> None:
        self._store = store
        self._source = source
        self._settings = settings
        self._message = message
        self._delivery = delivery
        self._owner = f"{delivery.message_id}:{delivery.count}:{secrets.token_hex(4)}"
        self._work = ProviderWork()
        self._last_write = 0.0
        self._lease = timedelta(seconds=settings.run_lease_seconds)

    @property
    def run_id(self) -> str:
        return self._message.run_id

    @property
    def provider(self) -> str:
        return self._message.provider

    async def run(self) -> None:
        """Raises HandBack when the work must continue in a later delivery."""
        message = self._message
        now = utc_now()
        if now >= message.deadline:
            return  # the run's deadline message ends it and cancels what is still going
        # The provider's start (its first attempt and "Starting" line) rides on the claim that
        # finds no work stored yet: one write, not two.
        first_work = ProviderWork(attempt=1, attempt_started_at=now, first_started_at=now)
        starting = ActivityEvent(
            provider=message.provider, message=f"Starting {PROVIDER_NAMES[message.provider]} quote"
        )
        try:
            claim = await self._store.claim_provider(
                self.run_id,
                message.provider,
                self._owner,
                now=now,
                lease_until=now + self._lease,
                alive_since=now - self._lease,
                first_work=first_work,
                first_events=[starting],
            )
        except StoreUnavailable as error:
            raise HandBack(STORE_RETRY_SECONDS, f"storage unavailable: {error}") from None
        if claim.result == "finished":
            await complete_if_done(self._store, self.run_id)
            return
        if claim.result in ("ended", "missing"):
            return
        if claim.result == "held":
            if self._delivery.last:
                return  # another delivery is alive on it; it finishes the work
            wait = (claim.busy_until or now) - now
            raise HandBack(min(max(wait.total_seconds() + 1, 1), 60), "held by another worker")
        self._work = claim.work or first_work
        self._last_write = asyncio.get_running_loop().time()  # the claim set the lease just now
        try:
            await self._work_on()
        except (RunFinalized, RunNotFound):
            # The run ended elsewhere (its deadline, or it failed as a whole): stop paying.
            await self._cancel_agent_run()
        except LeaseLost:
            # Judged dead and replaced: the new owner reattaches to the same agent run.
            log.warning(
                "run %s %s: lease lost; another delivery took over", self.run_id, self.provider
            )

    async def _work_on(self) -> None:
        message = self._message
        first_started = self._work.first_started_at or utc_now()
        provider_deadline = min(
            first_started + timedelta(seconds=self._settings.provider_timeout_seconds),
            message.deadline,
        )
        while True:
            try:
                quote = await self._attempt(provider_deadline)
            except ProviderTimeout:
                if provider_deadline < message.deadline:
                    await self._fail(
                        ProviderTimeout("The insurer's site did not produce a quote in time.")
                    )
                    return
                # The run's own deadline, not the provider's: the run ends, and every other
                # worker's next write is refused (each cancels its agent run).
                await self._cancel_agent_run()
                if await fail_run(self._store, self.run_id, "deadline_exceeded"):
                    log.error("run %s ended at its deadline", self.run_id)
                return
            except ProviderError as error:
                if await self._retry(error, provider_deadline):
                    continue
                await self._give_up_on(error)
                await self._fail(error)
                return
            await self._finish(quote)
            return

    async def _attempt(self, provider_deadline: datetime) -> Quote:
        """Run (or resume) the current attempt until it ends, the provider's budget runs out,
        or this delivery must hand the work back."""
        now = utc_now()
        handoff_at = self._delivery.handoff_at()
        stop_at = min(provider_deadline, handoff_at)
        if now >= provider_deadline:
            await self._cancel_agent_run()
            raise ProviderTimeout("The insurer's site did not produce a quote in time.")
        work = self._work
        attempt = AgentAttempt(
            number=work.attempt,
            started_at=work.attempt_started_at or now,
            deadline=provider_deadline,
            agent_run_id=work.agent_run_id,
        )
        quote_task = asyncio.ensure_future(
            self._source.quote(self._message.request, self._message.provider, attempt, self)
        )
        keeper = asyncio.ensure_future(self._keep_lease())
        try:
            done, _ = await asyncio.wait(
                {quote_task, keeper},
                timeout=(stop_at - now).total_seconds(),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if quote_task in done:
                return self._result_of(quote_task)
            if keeper in done:
                keeper.result()  # raises why the lease could not be kept
        finally:
            # Stops waiting on the agent; the agent run itself goes on until it is cancelled.
            for task in (quote_task, keeper):
                task.cancel()
            for task in (quote_task, keeper):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if utc_now() >= provider_deadline - timedelta(seconds=0.5):
            await self._cancel_agent_run()
            raise ProviderTimeout("The insurer's site did not produce a quote in time.")
        await self._hand_back()
        raise AssertionError("unreachable")

    def _result_of(self, quote_task: asyncio.Future[Quote]) -> Quote:
        """The attempt's quote, or its typed failure; a bug in a source is a blip, not a crash
        that would burn the message's deliveries (its text may hold the request's data)."""
        try:
            return quote_task.result()
        except (ProviderError, RunFinalized, RunNotFound, LeaseLost, HandBack, StoreUnavailable):
            raise
        except Exception:
            log.exception(
                "run %s %s: the quote source failed unexpectedly", self.run_id, self.provider
            )
            raise ProviderUnavailable("The quote source failed unexpectedly.") from None

    async def _hand_back(self) -> None:
        """Release the lease so the next delivery can claim at once, and give the message back."""
        if self._delivery.last:
            await self._cancel_agent_run()
            raise DeliveriesExhausted(
                "The provider's queued work ran out of deliveries before it finished."
            )
        with contextlib.suppress(StoreUnavailable):
            await self._store.save_provider_work(
                self.run_id, self._message.provider, self._owner, self._work, lease_until=RELEASED
            )
        log.info(
            "run %s %s: handing back to the queue (delivery %d)",
            self.run_id,
            self.provider,
            self._delivery.count,
        )
        raise HandBack(HANDOFF_DELAY_SECONDS, "the invocation's deadline is near")

    async def _retry(self, error: ProviderError, provider_deadline: datetime) -> bool:
        """Start the next paid attempt when the failure was a blip and budget remains."""
        if not error.transient or self._work.attempt >= MAX_ATTEMPTS:
            return False
        wait = min(
            max(error.retry_after or 0.0, ATTEMPTS.wait(self._work.attempt, random.random)), 30.0
        )
        start = utc_now() + timedelta(seconds=wait)
        if provider_deadline - start < timedelta(seconds=MIN_ATTEMPT_SECONDS):
            return False
        await self._give_up_on(error)
        log.warning(
            "run %s %s: attempt %d failed (%s); retrying",
            self.run_id,
            self.provider,
            self._work.attempt,
            error.code,
        )
        if wait:
            await asyncio.sleep(wait)
        self._work = self._work.model_copy(
            update={
                "attempt": self._work.attempt + 1,
                "attempt_started_at": utc_now(),
                "agent_run_id": None,
            }
        )
        name = PROVIDER_NAMES[self._message.provider]
        await self._save(
            [
                ActivityEvent(
                    provider=self._message.provider,
                    message=f"Retrying {name} (attempt {self._work.attempt} of {MAX_ATTEMPTS})",
                )
            ]
        )
        return True

    def _agent_steps(self) -> int | None:
        return self._work.total_agent_steps if self._work.agent_run_ids else None

    async def _finish(self, quote: Quote) -> None:
        outcome = ProviderOutcome(
            status="quoted", quote=quote, finished_at=utc_now(), agent_steps=self._agent_steps()
        )
        await self._record(outcome, QuoteEvent(provider=self._message.provider, quote=quote))

    async def _fail(self, error: ProviderError) -> None:
        info = ErrorInfo(code=error.code, message=error.message)
        outcome = ProviderOutcome(
            status="failed", error=info, finished_at=utc_now(), agent_steps=self._agent_steps()
        )
        event = ProviderErrorEvent(
            provider=self._message.provider,
            code=error.code,
            message=error.message,
            retryable=error.retryable,
        )
        await self._record(outcome, event)

    async def _record(
        self, outcome: ProviderOutcome, event: QuoteEvent | ProviderErrorEvent
    ) -> None:
        written = await self._with_store_retries(
            lambda _again: self._store.record_outcome(
                self.run_id, self._message.provider, outcome, event, total=self._message.total
            )
        )
        if written.first_id is not None:
            log_provider_outcome(
                self._message.provider,
                outcome.error.code if outcome.error else outcome.status,
                self._work,
                finished_at=outcome.finished_at,
            )
        if written.completed >= self._message.total:
            await complete_if_done(self._store, self.run_id)

    async def _give_up_on(self, error: ProviderError) -> None:
        """Cancel the attempt's agent run unless the agent API said it is over already."""
        if error.agent_run_finished and error.agent_run_id == self._work.agent_run_id:
            return
        await self._cancel_agent_run()

    async def _cancel_agent_run(self) -> None:
        """Cancel the current attempt's agent run (idempotent; never raises)."""
        agent_run_id = self._work.agent_run_id
        if agent_run_id is None or agent_run_id in self._work.cancelled_agent_run_ids:
            return
        try:
            await self._source.cancel(agent_run_id)
        except Exception:  # cancelling is best effort; the agent's own caps bound its cost
            log.exception("run %s %s: cancelling agent run failed", self.run_id, self.provider)
            return
        self._work = self._work.model_copy(
            update={"cancelled_agent_run_ids": [*self._work.cancelled_agent_run_ids, agent_run_id]}
        )
        log.info("run %s %s: cancelled agent run %s", self.run_id, self.provider, agent_run_id)

    # --- the source's listener ----------------------------------------------------------------

    async def activity(self, message: str) -> None:
        text = normalised_activity(message)
        self._work = self._work.model_copy(update={"last_activity": text})
        event = ActivityEvent(provider=self._message.provider, message=text)
        nonce = new_nonce()
        await self._with_store_retries(
            lambda again: self._store.append_events(self.run_id, [event], nonce=nonce, again=again)
        )
        self._last_write = asyncio.get_running_loop().time()

    async def agent_run_started(self, agent_run_id: str) -> None:
        self._work = self._work.model_copy(
            update={
                "agent_run_id": agent_run_id,
                "agent_run_ids": [*self._work.agent_run_ids, agent_run_id],
            }
        )
        name = PROVIDER_NAMES[self._message.provider]
        await self._save(
            [ActivityEvent(provider=self._message.provider, message=f"{name} agent started")]
        )

    def agent_steps(self, steps: int) -> None:
        # Kept in the work state: saved with its next write (hand-back, retry) and the outcome.
        agent_run_id = self._work.agent_run_id
        if agent_run_id is None or steps <= self._work.agent_steps.get(agent_run_id, 0):
            return
        self._work = self._work.model_copy(
            update={"agent_steps": {**self._work.agent_steps, agent_run_id: steps}}
        )

    # --- storage ------------------------------------------------------------------------------

    async def _save(self, events: list[ActivityEvent]) -> None:
        work, nonce = self._work, new_nonce()
        await self._with_store_retries(
            lambda again: self._store.save_provider_work(
                self.run_id,
                self._message.provider,
                self._owner,
                work,
                events,
                nonce=nonce,
                again=again,
            )
        )
        self._last_write = asyncio.get_running_loop().time()

    async def _with_store_retries[T](self, write: Callable[[bool], Awaitable[T]]) -> T:
        """A write storage could not take is retried for a while (each backend makes its own
        retries land once); past that the work is handed back to the queue."""
        give_up = asyncio.get_running_loop().time() + 30.0
        tries = 0
        while True:
            try:
                return await write(tries > 0)
            except StoreUnavailable:
                tries += 1
                delay = STORE_WRITES.wait(tries, random.random)
                if asyncio.get_running_loop().time() + delay > give_up:
                    raise HandBack(STORE_RETRY_SECONDS, "storage unavailable") from None
                await asyncio.sleep(delay)

    async def _keep_lease(self) -> None:
        """Renew the lease whenever this worker has written nothing for a third of it (a claim
        also counts recent events as signs of life). Returns only by raising why it stopped."""
        interval = self._lease.total_seconds() / 3
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(0.0, self._last_write + interval - loop.time()))
            if loop.time() - self._last_write < interval:
                continue
            try:
                await self._store.renew_lease(
                    self.run_id, self._message.provider, self._owner, utc_now() + self._lease
                )
            except StoreUnavailable:
                await asyncio.sleep(1.0)
                continue
            self._last_write = loop.time()


async def enforce_deadline(store: Store, source: QuoteSource, message: RunDeadlineMessage) -> None:
    """At the run's deadline: cancel every agent run still going and end the run."""
    remaining = (message.deadline - utc_now()).total_seconds()
    if remaining > 0:
        raise HandBack(remaining + 0.5, "the run's deadline has not come yet")
    try:
        state = await store.get_run(message.run_id, tail=0)
    except StoreUnavailable as error:
        raise HandBack(STORE_RETRY_SECONDS, f"storage unavailable: {error}") from None
    if state is None or state.finalized:
        return
    if await complete_if_done(store, message.run_id):
        return
    record = state.record
    for provider in record.providers:
        if provider.status in ("quoted", "failed"):
            continue
        work = record.work.get(provider.provider)
        if work is None:
            continue
        for agent_run_id in work.agent_run_ids:
            if agent_run_id in work.cancelled_agent_run_ids:
                continue
            with contextlib.suppress(Exception):
                await source.cancel(agent_run_id)
                log.info(
                    "run %s %s: cancelled agent run %s at the run's deadline",
                    message.run_id,
                    provider.provider,
                    agent_run_id,
                )
    if await fail_run(store, message.run_id, "deadline_exceeded"):
        log.error("run %s ended at its deadline", message.run_id)
