"""What the worker tests hand the worker, made by hand as the queue SDK would make it: a run
and its request, a provider's work message, a delivery, settings, and a simulated source that
records every attempt it runs and every cancel."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

from lib.config import settings_from_env
from lib.models import (
    PROVIDER_IDS,
    ProviderId,
    Quote,
    QuoteRequest,
    new_run_id,
    utc_now,
)
from lib.providers.base import AgentAttempt, AttemptListener
from lib.providers.simulated import SimulatedQuoteSource
from lib.queue.messages import ProviderWorkMessage
from lib.store import Store
from lib.worker import Delivery
from lib.workflow import new_run_record
from tests.clock import VirtualClock

REQUEST = QuoteRequest.model_validate(
    {
        "vin": "2C3CDZAG2GH967639",
        "zip": "94107",
        "driver": {"firstName": "Ana", "lastName": "Lee", "dateOfBirth": "1990-04-12"},
    }
)


def settings(**env: str) -> Any:
    return settings_from_env(
        {
            "SIMULATED_DELAY_SCALE": "0.01",
            "RUN_LEASE_SECONDS": "1.5",
            "PROVIDER_TIMEOUT_SECONDS": "60",
            "RUN_MAX_SECONDS": "120",
            **env,
        }
    )


async def new_run(
    store: Store, providers: list[ProviderId] | None = None, *, deadline_in: float = 120
) -> tuple[str, list[ProviderId], datetime]:
    run_id = new_run_id()
    chosen = providers or list(PROVIDER_IDS)
    deadline = utc_now() + timedelta(seconds=deadline_in)
    await store.create_run(new_run_record(run_id, REQUEST, chosen, deadline))
    return run_id, chosen, deadline


def message(
    run_id: str, provider: ProviderId, total: int, deadline: datetime
) -> ProviderWorkMessage:
    return ProviderWorkMessage(
        run_id=run_id, provider=provider, total=total, deadline=deadline, request=REQUEST
    )


def delivery(
    count: int = 1, *, deadline_in: float | None = None, clock: VirtualClock | None = None
) -> Delivery:
    now = clock.now() if clock else utc_now()
    deadline = now + timedelta(seconds=deadline_in) if deadline_in is not None else None
    return Delivery(message_id=f"m-{new_run_id()}", count=count, invocation_deadline=deadline)


class RecordingSource:
    """Wraps a real source: records every attempt it was asked to run and every cancel."""

    name = "simulated"

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.attempts: list[tuple[ProviderId, AgentAttempt]] = []
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.read_backs: list[AgentAttempt] = []
        self._start = asyncio.Event()

    def record_start(self, agent_run_id: str) -> None:
        self.started.append(agent_run_id)
        self._start.set()

    async def wait_for_starts(self, count: int = 1) -> None:
        while len(self.started) < count:
            self._start.clear()
            await asyncio.wait_for(self._start.wait(), 10)

    async def quote(
        self,
        request: QuoteRequest,
        provider: ProviderId,
        attempt: AgentAttempt,
        listener: AttemptListener,
    ) -> Quote:
        self.attempts.append((provider, attempt))
        source = self

        class Spy:
            async def activity(self, text: str) -> None:
                await listener.activity(text)

            async def agent_run_started(self, agent_run_id: str) -> None:
                await listener.agent_run_started(agent_run_id)
                source.record_start(agent_run_id)  # once the store has it

            def agent_steps(self, steps: int) -> None:
                listener.agent_steps(steps)

        quote: Quote = await self.inner.quote(request, provider, attempt, Spy())
        return quote

    async def read_back(
        self,
        request: QuoteRequest,
        provider: ProviderId,
        attempt: AgentAttempt,
        listener: AttemptListener,
    ) -> Quote | None:
        self.read_backs.append(attempt)
        if self.inner is None or attempt.agent_run_id in self.cancelled:
            return None
        quote: Quote | None = await self.inner.read_back(request, provider, attempt, listener)
        return quote

    async def cancel(self, agent_run_id: str) -> None:
        self.cancelled.append(agent_run_id)

    async def aclose(self) -> None:
        return None


def simulated(clock: VirtualClock | None = None, **options: float) -> RecordingSource:
    if clock is None:
        return RecordingSource(SimulatedQuoteSource(delay_scale=0.01, **options))
    inner = SimulatedQuoteSource(delay_scale=0.01, sleep=clock.sleep, clock=clock.now, **options)
    return RecordingSource(inner)
