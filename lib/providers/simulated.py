"""The simulated quote source: a local/demo product feature, so the whole system runs on a laptop
with no accounts. Used when TINYFISH_API_KEY is not set.

Its figures are NEVER real prices. Every quote it returns carries `source: "simulated"`.

- Deterministic: the same request and insurer always give the same premium (a stable SHA-256 of
  VIN, ZIP, date of birth, coverage, annual mileage, use and insurer picks it within a plausible
  range that rises with coverage level, young or elderly drivers, mileage and business use).
  Deductible by coverage: minimum 0 (liability only), standard $1,000, full $500.
  `annualPremium` is round(monthly × 12, 2).
- Before quoting it reports 3–6 activity messages that read like an agent filling in the
  insurer's form, each after a pause of 0.3–2.5 s (deterministic per request and insurer),
  multiplied by SIMULATED_DELAY_SCALE (0 = instant). Messages carry no personal data: at most the
  VIN's last four characters. SIMULATED_MIN_SECONDS (default 0, not scaled) stretches every
  attempt to last at least that long: the knob tests use for a provider slower than a function.
- Resumable exactly like an agent run: an attempt's timeline (when each message is due, when it
  ends, its quote or decline) is a pure function of the request, the insurer and the attempt's
  `started_at`. A new attempt reports a stable agent run id ("sim-…"); any call sleeps until each
  remaining step is due, and a resumed call (the attempt carries that id) skips the steps already
  due when it began, so a call resumed after a hand-off or a death ends at the same moment
  (`quotedAt`) with the same quote.
- One documented failure mode, so demos show a provider_error: Allstate declines drivers under 21
  whose vehicle is for business use (ProviderDeclined).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from lib.models import (
    PROVIDER_NAMES,
    Coverage,
    ProviderId,
    Quote,
    QuoteRequest,
    QuoteSourceName,
    age_on,
    utc_now,
)
from lib.providers.base import AgentAttempt, AttemptListener, ProviderDeclined, ProviderTimeout

Sleep = Callable[[float], Awaitable[None]]

BASE_MONTHLY: dict[Coverage, float] = {"minimum": 61.0, "standard": 128.0, "full": 187.0}
DEDUCTIBLE: dict[Coverage, int] = {"minimum": 0, "standard": 1000, "full": 500}
USE_FACTOR = {"pleasure": 0.92, "commute": 1.0, "business": 1.18}
INSURER_FACTOR: dict[ProviderId, float] = {
    "geico": 0.94,
    "progressive": 0.98,
    "state_farm": 1.03,
    "allstate": 1.10,
    "liberty_mutual": 1.07,
}
MIN_DELAY_SECONDS = 0.3
MAX_DELAY_SECONDS = 2.5
DECLINING_INSURER: ProviderId = "allstate"


def _age_factor(age: int) -> float:
    if age < 21:
        return 1.9
    if age < 25:
        return 1.45
    if age < 30:
        return 1.15
    if age < 65:
        return 1.0
    if age < 75:
        return 1.08
    return 1.25


def _mileage_factor(annual_mileage: int) -> float:
    return min(1.6, max(0.85, 0.85 + 0.15 * annual_mileage / 12_000))


class _Dice:
    """Deterministic numbers in [0, 1) drawn from one SHA-256 digest of the request's fields."""

    def __init__(self, *parts: str) -> None:
        self._digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
        self._next = 0

    def roll(self) -> float:
        chunk = self._digest[self._next : self._next + 2]
        self._next = (self._next + 2) % len(self._digest)
        return int.from_bytes(chunk, "big") / 65_536


def _declines(request: QuoteRequest, provider: ProviderId, on: date) -> bool:
    age = age_on(request.driver.date_of_birth, on)
    return provider == DECLINING_INSURER and age < 21 and request.vehicle.use == "business"


def simulated_monthly_premium(
    request: QuoteRequest, provider: ProviderId, *, on: date | None = None
) -> float:
    """The simulated monthly premium for this request at this insurer on a day (never a real
    price); the driver's age is taken on `on` (today by default)."""
    dice = _Dice(
        request.vin,
        request.zip,
        request.driver.date_of_birth.isoformat(),
        request.coverage,
        str(request.vehicle.annual_mileage),
        request.vehicle.use,
        provider,
    )
    region = _Dice(request.zip[:3]).roll()
    age = age_on(request.driver.date_of_birth, on or utc_now().date())
    monthly = (
        BASE_MONTHLY[request.coverage]
        * _age_factor(age)
        * _mileage_factor(request.vehicle.annual_mileage)
        * USE_FACTOR[request.vehicle.use]
        * INSURER_FACTOR[provider]
        * (0.85 + 0.45 * region)  # where the car is garaged
        * (0.92 + 0.16 * dice.roll())  # the insurer's own view of this driver and car
    )
    return round(monthly, 2)


def _steps(request: QuoteRequest, provider: ProviderId, dice: _Dice) -> list[str]:
    name = PROVIDER_NAMES[provider]
    optional = [
        "Answering driver history questions",
        f"Selecting {request.coverage} coverage",
        "Reading the quoted premium",
    ]
    chosen = [step for step in optional if dice.roll() < 0.6]
    return [
        f"Opening {name} quote page",
        "Entering ZIP code and starting an auto quote",
        f"Entering vehicle details for VIN …{request.vin[-4:]}",
        *chosen,
    ]


@dataclass(frozen=True, slots=True)
class SimulatedTimeline:
    """When each activity message is due and when the attempt ends, in seconds after it began."""

    steps: tuple[tuple[float, str], ...]
    ends_after: float


def simulated_timeline(
    request: QuoteRequest, provider: ProviderId, *, delay_scale: float, min_seconds: float = 0
) -> SimulatedTimeline:
    """The attempt's schedule: a pure function of the request, the insurer and the knobs."""
    dice = _Dice("activity", request.vin, request.zip, request.coverage, provider)
    offset, steps = 0.0, []
    for message in _steps(request, provider, dice):
        delay = MIN_DELAY_SECONDS + (MAX_DELAY_SECONDS - MIN_DELAY_SECONDS) * dice.roll()
        offset += delay * delay_scale
        steps.append((offset, message))
    return SimulatedTimeline(steps=tuple(steps), ends_after=max(offset, min_seconds))


def simulated_agent_run_id(
    request: QuoteRequest, provider: ProviderId, started_at: datetime
) -> str:
    """A stable id for one attempt's simulated agent run (no personal data goes into it)."""
    seed = "\x1f".join(
        [request.vin, request.zip, request.coverage, provider, started_at.isoformat()]
    )
    return "sim-" + hashlib.sha256(seed.encode()).hexdigest()[:24]


class SimulatedQuoteSource:
    """Deterministic demo quotes with agent-like activity; see the module docstring."""

    name: QuoteSourceName = "simulated"

    def __init__(
        self,
        *,
        delay_scale: float = 1.0,
        min_seconds: float = 0.0,
        sleep: Sleep = asyncio.sleep,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._delay_scale = delay_scale
        self._min_seconds = min_seconds
        self._sleep = sleep
        self._clock = clock

    async def quote(
        self,
        request: QuoteRequest,
        provider: ProviderId,
        attempt: AgentAttempt,
        listener: AttemptListener,
    ) -> Quote:
        began = attempt.started_at
        timeline = simulated_timeline(
            request, provider, delay_scale=self._delay_scale, min_seconds=self._min_seconds
        )
        resumed = attempt.agent_run_id is not None
        if not resumed:
            await listener.agent_run_started(simulated_agent_run_id(request, provider, began))
        called_at = self._clock()
        for taken, (offset, message) in enumerate(timeline.steps, start=1):
            due = began + timedelta(seconds=offset)
            if resumed and due < called_at:
                listener.agent_steps(taken)  # taken before the hand-off (or while nobody worked)
                continue
            await self._wait_until(due, attempt, provider)
            await listener.activity(message)
            listener.agent_steps(taken)
        ended_at = began + timedelta(seconds=timeline.ends_after)
        await self._wait_until(ended_at, attempt, provider)
        if _declines(request, provider, began.date()):
            raise ProviderDeclined(
                f"{PROVIDER_NAMES[provider]} offers no online quote for drivers under 21 "
                "using the vehicle for business (simulated)"
            )
        return self._quote(request, provider, began, ended_at)

    @staticmethod
    def _quote(
        request: QuoteRequest, provider: ProviderId, began: datetime, ended_at: datetime
    ) -> Quote:
        monthly = simulated_monthly_premium(request, provider, on=began.date())
        return Quote(
            provider=provider,
            monthly_premium=monthly,
            annual_premium=round(monthly * 12, 2),
            coverage=request.coverage,
            deductible=DEDUCTIBLE[request.coverage],
            source="simulated",
            quoted_at=ended_at,
        )

    async def _wait_until(self, due: datetime, attempt: AgentAttempt, provider: ProviderId) -> None:
        if due > attempt.deadline:
            await self._sleep_until(attempt.deadline)
            raise ProviderTimeout(
                f"{PROVIDER_NAMES[provider]} gave no quote in time (simulated)",
                agent_run_id=attempt.agent_run_id,
            )
        await self._sleep_until(due)

    async def _sleep_until(self, moment: datetime) -> None:
        seconds = (moment - self._clock()).total_seconds()
        if seconds > 0:
            await self._sleep(seconds)

    async def read_back(
        self,
        request: QuoteRequest,
        provider: ProviderId,
        attempt: AgentAttempt,
        listener: AttemptListener,
    ) -> Quote | None:
        timeline = simulated_timeline(
            request, provider, delay_scale=self._delay_scale, min_seconds=self._min_seconds
        )
        ended_at = attempt.started_at + timedelta(seconds=timeline.ends_after)
        if self._clock() < ended_at or _declines(request, provider, attempt.started_at.date()):
            return None
        listener.agent_steps(len(timeline.steps))
        return self._quote(request, provider, attempt.started_at, ended_at)

    async def cancel(self, agent_run_id: str) -> None:
        return None  # nothing runs between calls: the timeline is arithmetic

    async def agent_steps(self, agent_run_id: str) -> int | None:
        return None  # a simulated attempt costs nothing

    async def aclose(self) -> None:
        return None
