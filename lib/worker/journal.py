"""What a provider's delivery writes: its work state, activity, agent runs and steps (as the
quote source's `AttemptListener`), and its outcome; and the agent runs it stops caring about."""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable

from lib.models import (
    PROVIDER_NAMES,
    ActivityEvent,
    ErrorInfo,
    ProviderErrorEvent,
    ProviderOutcome,
    ProviderWork,
    Quote,
    QuoteEvent,
)
from lib.providers.backoff import STORE_WRITES
from lib.providers.base import AttemptListener, ProviderError, QuoteSource
from lib.queue.messages import ProviderWorkMessage
from lib.run_log import log_provider_outcome
from lib.store import Store, StoreUnavailable
from lib.store.base import new_nonce
from lib.worker.clock import Clock
from lib.worker.lease import ProviderLease
from lib.workflow import complete_if_done

log = logging.getLogger(__name__)

ACTIVITY_MAX_CHARS = 280
# How long a write storage could not take is retried before the work is handed back.
STORE_WRITE_GIVE_UP_SECONDS = 30.0


class StorageDown(Exception):
    """Storage took no write for a while: the delivery hands its work back to the queue."""


def normalised_activity(message: str) -> str:
    return " ".join(message.split())[:ACTIVITY_MAX_CHARS] or "Working"


class Journal(AttemptListener):
    """One provider's writes during one delivery, under its lease."""

    def __init__(
        self,
        store: Store,
        source: QuoteSource,
        message: ProviderWorkMessage,
        lease: ProviderLease,
        work: ProviderWork,
        clock: Clock,
    ) -> None:
        self._store = store
        self._source = source
        self._message = message
        self._lease = lease
        self._clock = clock
        self.work = work

    @property
    def _run_id(self) -> str:
        return self._message.run_id

    async def activity(self, message: str) -> None:
        text = normalised_activity(message)
        self.work = self.work.model_copy(update={"last_activity": text})
        event = ActivityEvent(provider=self._message.provider, message=text)
        nonce = new_nonce()
        await self._retrying(
            lambda again: self._store.append_events(self._run_id, [event], nonce=nonce, again=again)
        )

    async def agent_run_started(self, agent_run_id: str) -> None:
        self.work = self.work.model_copy(
            update={
                "agent_run_id": agent_run_id,
                "agent_run_ids": [*self.work.agent_run_ids, agent_run_id],
            }
        )
        await self.save(f"{PROVIDER_NAMES[self._message.provider]} agent started")

    def agent_steps(self, steps: int) -> None:
        # Kept in the work state: saved with its next write (hand-back, retry) and the outcome.
        agent_run_id = self.work.agent_run_id
        if agent_run_id is None or steps <= self.work.agent_steps.get(agent_run_id, 0):
            return
        self.work = self.work.model_copy(
            update={"agent_steps": {**self.work.agent_steps, agent_run_id: steps}}
        )

    async def save(self, activity: str | None = None) -> None:
        """Store the work state (with an activity line) under the lease."""
        provider = self._message.provider
        events = [ActivityEvent(provider=provider, message=activity)] if activity else []
        work, nonce = self.work, new_nonce()
        await self._retrying(
            lambda again: self._store.save_provider_work(
                self._run_id,
                self._message.provider,
                self._lease.owner,
                work,
                events,
                nonce=nonce,
                again=again,
            )
        )

    async def quoted(self, quote: Quote) -> None:
        outcome = ProviderOutcome(
            status="quoted", quote=quote, finished_at=self._clock.now(), agent_steps=self._steps()
        )
        await self._record(outcome, QuoteEvent(provider=self._message.provider, quote=quote))

    async def failed(self, error: ProviderError) -> None:
        info = ErrorInfo(code=error.code, message=error.message)
        outcome = ProviderOutcome(
            status="failed", error=info, finished_at=self._clock.now(), agent_steps=self._steps()
        )
        event = ProviderErrorEvent(
            provider=self._message.provider,
            code=error.code,
            message=error.message,
            retryable=error.retryable,
        )
        await self._record(outcome, event)

    async def give_up_on(self, error: ProviderError) -> None:
        """Cancel the attempt's agent run unless the agent API said it is over already."""
        if error.agent_run_finished and error.agent_run_id == self.work.agent_run_id:
            return
        await self.cancel_agent_run()

    async def cancel_agent_run(self) -> None:
        """Cancel the current attempt's agent run (idempotent; never raises)."""
        agent_run_id = self.work.agent_run_id
        if agent_run_id is None or agent_run_id in self.work.cancelled_agent_run_ids:
            return
        try:
            await self._source.cancel(agent_run_id)
        except Exception:  # cancelling is best effort; the agent's own caps bound its cost
            log.exception("run %s: cancelling agent run %s failed", self._run_id, agent_run_id)
            return
        cancelled = [*self.work.cancelled_agent_run_ids, agent_run_id]
        self.work = self.work.model_copy(update={"cancelled_agent_run_ids": cancelled})
        log.info("run %s: cancelled agent run %s", self._run_id, agent_run_id)

    def _steps(self) -> int | None:
        return self.work.total_agent_steps if self.work.agent_run_ids else None

    async def _record(
        self, outcome: ProviderOutcome, event: QuoteEvent | ProviderErrorEvent
    ) -> None:
        message = self._message
        written = await self._retrying(
            lambda _again: self._store.record_outcome(
                message.run_id, message.provider, outcome, event, total=message.total
            )
        )
        if written.first_id is not None:
            code = outcome.error.code if outcome.error else outcome.status
            log_provider_outcome(message.provider, code, self.work, finished_at=outcome.finished_at)
        if written.completed >= message.total:
            await complete_if_done(self._store, message.run_id)

    async def _retrying[T](self, write: Callable[[bool], Awaitable[T]]) -> T:
        """A write storage could not take is retried for a while (each backend makes its own
        retries land once); past that it raises StorageDown."""
        started, tries = self._clock.now(), 0
        while True:
            try:
                result = await write(tries > 0)
            except StoreUnavailable:
                tries += 1
                delay = STORE_WRITES.wait(tries, random.random)
                spent = (self._clock.now() - started).total_seconds()
                if spent + delay > STORE_WRITE_GIVE_UP_SECONDS:
                    raise StorageDown("storage unavailable") from None
                await self._clock.sleep(delay)
                continue
            self._lease.written()
            return result
