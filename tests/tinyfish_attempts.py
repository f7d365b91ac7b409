"""One attempt of the TinyFish adapter against the local TinyFish-compatible server: the
account's key, a request, a listener recording what the source reports, the attempt itself, and
the source pointed at the server."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from lib.models import QuoteRequest, utc_now
from lib.providers.backoff import Backoff
from lib.providers.base import AgentAttempt
from lib.providers.tinyfish import TinyFishQuoteSource
from tests.fake_tinyfish import FakeTinyFishServer

API_KEY = "tf-agent-runs-key"
REQUEST = QuoteRequest.model_validate(
    {
        "vin": "2C3CDZAG2GH967639",
        "zip": "94107",
        "driver": {"firstName": "Zelinda", "lastName": "Quarrington", "dateOfBirth": "1987-03-09"},
    }
)


class Listener:
    """Records what the source reports; `progressed` is set at the first activity."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.agent_runs: list[str] = []
        self.steps = 0
        self.progressed = asyncio.Event()

    async def activity(self, message: str) -> None:
        self.messages.append(message)
        self.progressed.set()

    async def agent_run_started(self, agent_run_id: str) -> None:
        self.agent_runs.append(agent_run_id)

    def agent_steps(self, steps: int) -> None:
        self.steps = max(self.steps, steps)


def attempt(seconds: float = 120, agent_run_id: str | None = None) -> AgentAttempt:
    now = utc_now()
    return AgentAttempt(
        number=1,
        started_at=now,
        deadline=now + timedelta(seconds=seconds),
        agent_run_id=agent_run_id,
    )


def source_for(fake: FakeTinyFishServer, **options: Any) -> TinyFishQuoteSource:
    options.setdefault("polling", Backoff(first=0.05, cap=0.2))
    return TinyFishQuoteSource(api_key=API_KEY, api_url=fake.url, **options)
