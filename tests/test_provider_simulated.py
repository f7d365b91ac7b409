"""The simulated source: deterministic demo quotes, agent-like activity, one documented decline."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from lib.config import ConfigError, settings_from_env
from lib.models import PROVIDER_IDS, PROVIDER_NAMES, ProviderId, Quote, QuoteRequest, utc_now
from lib.providers import build_quote_source
from lib.providers.base import AgentAttempt, ProviderDeclined, ProviderTimeout
from lib.providers.simulated import SimulatedQuoteSource, simulated_timeline
from lib.providers.tinyfish import TinyFishQuoteSource

FIRST, LAST, BORN = "Zelinda", "Quarrington", "1987-03-09"


def born_years_ago(years: int) -> str:
    today = utc_now().date()
    return date(today.year - years, 1, 1).isoformat()


def make_request(**changes: Any) -> QuoteRequest:
    body: dict[str, Any] = {
        "vin": "2C3CDZAG2GH967639",
        "zip": "94107",
        "driver": {"firstName": FIRST, "lastName": LAST, "dateOfBirth": BORN},
        "vehicle": {"annualMileage": 12000, "use": "commute", "ownership": "owned"},
        "coverage": "standard",
    }
    for key, value in changes.items():
        if key in ("annualMileage", "use", "ownership"):
            body["vehicle"][key] = value
        elif key == "dateOfBirth":
            body["driver"][key] = value
        else:
            body[key] = value
    return QuoteRequest.model_validate(body)


class Clock:
    """A UTC clock that moves only when the source sleeps on it."""

    def __init__(self, now: datetime) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> datetime:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += timedelta(seconds=seconds)


class Listener:
    def __init__(self, *, signal_after: int = 0) -> None:
        self.messages: list[str] = []
        self.agent_runs: list[str] = []
        self.steps = 0
        self.signal_after = signal_after
        self.reached = asyncio.Event()

    async def activity(self, message: str) -> None:
        self.messages.append(message)
        if len(self.messages) == self.signal_after:
            self.reached.set()

    async def agent_run_started(self, agent_run_id: str) -> None:
        self.agent_runs.append(agent_run_id)

    def agent_steps(self, steps: int) -> None:
        self.steps = max(self.steps, steps)


STARTED_AT = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def new_attempt(started_at: datetime = STARTED_AT, budget: float = 600) -> AgentAttempt:
    return AgentAttempt(
        number=1, started_at=started_at, deadline=started_at + timedelta(seconds=budget)
    )


async def quote(
    request: QuoteRequest, provider: ProviderId = "geico", scale: float = 0.0
) -> tuple[Quote, Clock, Listener]:
    clock, listener = Clock(utc_now()), Listener()
    source = SimulatedQuoteSource(delay_scale=scale, sleep=clock.sleep, clock=clock)
    got = await source.quote(request, provider, new_attempt(clock.now), listener)
    return got, clock, listener


async def test_same_request_and_insurer_always_give_the_same_quote() -> None:
    first, _, _ = await quote(make_request())
    second, _, _ = await quote(make_request())
    assert first.monthly_premium == second.monthly_premium
    assert first.deductible == second.deductible


async def test_insurers_and_vins_give_different_prices() -> None:
    prices = {p: (await quote(make_request(), p))[0].monthly_premium for p in PROVIDER_IDS}
    assert len(set(prices.values())) == len(PROVIDER_IDS)
    other_vin, _, _ = await quote(make_request(vin="1HGCM82633A004352"))
    assert other_vin.monthly_premium != prices["geico"]


async def test_quote_shape_is_labelled_simulated_with_consistent_annual_premium() -> None:
    q, _, _ = await quote(make_request(coverage="full"), "state_farm")
    assert q.source == "simulated"
    assert q.provider == "state_farm"
    assert q.coverage == "full"
    assert q.currency == "USD"
    assert q.annual_premium == round(q.monthly_premium * 12, 2)
    assert round(q.monthly_premium, 2) == q.monthly_premium
    assert (utc_now() - q.quoted_at).total_seconds() < 5


@pytest.mark.parametrize(
    ("coverage", "deductible"), [("minimum", 0), ("standard", 1000), ("full", 500)]
)
async def test_deductible_follows_coverage(coverage: str, deductible: int) -> None:
    q, _, _ = await quote(make_request(coverage=coverage))
    assert q.deductible == deductible


async def test_premium_rises_with_coverage_youth_mileage_and_business_use() -> None:
    async def monthly(**changes: Any) -> float:
        return (await quote(make_request(**changes)))[0].monthly_premium

    assert await monthly(coverage="minimum") < await monthly() < await monthly(coverage="full")
    assert await monthly(dateOfBirth=born_years_ago(19)) > await monthly(
        dateOfBirth=born_years_ago(40)
    )
    assert await monthly(annualMileage=30000) > await monthly(annualMileage=5000)
    assert await monthly(use="business") > await monthly(use="pleasure")


async def test_premiums_stay_in_a_plausible_range() -> None:
    for coverage in ("minimum", "standard", "full"):
        for age in (17, 30, 80):
            for provider in PROVIDER_IDS:
                request = make_request(coverage=coverage, dateOfBirth=born_years_ago(age))
                q, _, _ = await quote(request, provider)
                assert 30 <= q.monthly_premium <= 800, (coverage, age, provider)


async def test_activity_reads_like_an_agent_and_carries_no_personal_data() -> None:
    for provider in PROVIDER_IDS:
        _, _, activity = await quote(make_request(), provider)
        assert 3 <= len(activity.messages) <= 6
        assert activity.messages[0] == f"Opening {PROVIDER_NAMES[provider]} quote page"
        assert "Entering vehicle details for VIN …7639" in activity.messages
        text = " ".join(activity.messages)
        for personal in (FIRST, LAST, BORN, "1987", "94107"):
            assert personal not in text


async def test_delays_are_deterministic_between_0_3_and_2_5_seconds_times_the_scale() -> None:
    _, first, told = await quote(make_request(), "progressive", scale=1.0)
    _, again, _ = await quote(make_request(), "progressive", scale=1.0)
    _, scaled, _ = await quote(make_request(), "progressive", scale=0.1)
    # Due times are datetimes: a sleep is exact to the microsecond.
    assert first.sleeps == pytest.approx(again.sleeps, abs=1e-6)
    assert len(first.sleeps) == len(told.messages)
    assert all(0.3 - 1e-6 <= s <= 2.5 + 1e-6 for s in first.sleeps)
    assert scaled.sleeps == pytest.approx([s * 0.1 for s in first.sleeps], abs=1e-5)


async def test_delay_scale_zero_never_sleeps() -> None:
    _, clock, activity = await quote(make_request(), scale=0.0)
    assert clock.sleeps == []
    assert activity.messages


async def test_allstate_declines_drivers_under_21_using_the_car_for_business() -> None:
    young_business = make_request(dateOfBirth=born_years_ago(19), use="business")
    with pytest.raises(ProviderDeclined) as caught:
        await quote(young_business, "allstate")
    assert "under 21" in caught.value.message
    assert FIRST not in caught.value.message
    assert caught.value.retryable is False

    for provider in ("geico", "progressive"):
        q, _, _ = await quote(young_business, provider)
        assert q.provider == provider
    q, _, _ = await quote(make_request(dateOfBirth=born_years_ago(19), use="commute"), "allstate")
    assert q.provider == "allstate"
    q, _, _ = await quote(make_request(dateOfBirth=born_years_ago(30), use="business"), "allstate")
    assert q.provider == "allstate"


async def test_build_quote_source_is_simulated_without_a_key_and_tinyfish_with_one() -> None:
    simulated = build_quote_source(settings_from_env({"SIMULATED_DELAY_SCALE": "0"}))
    assert isinstance(simulated, SimulatedQuoteSource)
    assert simulated.name == "simulated"

    tinyfish = build_quote_source(
        settings_from_env({"TINYFISH_API_KEY": "k", "TINYFISH_API_URL": "http://127.0.0.1:9/"})
    )
    assert isinstance(tinyfish, TinyFishQuoteSource)
    assert tinyfish.name == "tinyfish"
    assert "http://127.0.0.1:9" in repr(tinyfish)
    assert "'k'" not in repr(tinyfish)
    await tinyfish.aclose()


# --- resumable like an agent run ----------------------------------------------------------------


def same_moment(a: datetime, b: datetime) -> bool:
    """Equal to the millisecond, the precision a Quote keeps."""
    return abs((a - b).total_seconds()) < 0.001


class HandOff(Exception):
    """Stands in for the worker cancelling the call before its own deadline."""


def handing_off_after(clock: Clock, sleeps: int):  # type: ignore[no-untyped-def]
    async def sleep(seconds: float) -> None:
        if len(clock.sleeps) == sleeps:
            raise HandOff
        await clock.sleep(seconds)

    return sleep


async def test_a_new_attempt_reports_a_stable_agent_run_id_of_its_own() -> None:
    source = SimulatedQuoteSource(delay_scale=0)
    runs = []
    for started_at in (STARTED_AT, STARTED_AT, STARTED_AT + timedelta(seconds=1)):
        listener = Listener()
        await source.quote(make_request(), "geico", new_attempt(started_at), listener)
        runs += listener.agent_runs
    assert runs[0] == runs[1] != runs[2]
    assert all(run.startswith("sim-") for run in runs)
    assert FIRST not in runs[0]


async def test_a_resumed_attempt_ends_at_the_same_moment_with_the_same_quote() -> None:
    request = make_request()
    clock, whole = Clock(STARTED_AT), Listener()
    uninterrupted = await SimulatedQuoteSource(sleep=clock.sleep, clock=clock).quote(
        request, "state_farm", new_attempt(), whole
    )
    assert same_moment(uninterrupted.quoted_at, clock.now)

    clock, before = Clock(STARTED_AT), Listener()
    first_call = SimulatedQuoteSource(sleep=handing_off_after(clock, 2), clock=clock)
    with pytest.raises(HandOff):
        await first_call.quote(request, "state_farm", new_attempt(), before)
    assert before.messages == whole.messages[:2]

    clock.now += timedelta(milliseconds=100)  # the next delivery arrives a little later
    after = Listener()
    resumed = new_attempt().with_agent_run(before.agent_runs[0])
    second_call = SimulatedQuoteSource(sleep=clock.sleep, clock=clock)
    again = await second_call.quote(request, "state_farm", resumed, after)
    assert after.agent_runs == []
    assert before.messages + after.messages == whole.messages
    assert again == uninterrupted
    steps = len(simulated_timeline(request, "state_farm", delay_scale=1.0).steps)
    assert whole.steps == after.steps == steps > 0  # the resumed call counts the earlier steps


async def test_a_call_resumed_after_the_end_returns_at_once_with_the_same_quote() -> None:
    timeline = simulated_timeline(make_request(), "geico", delay_scale=1.0)
    clock = Clock(STARTED_AT + timedelta(seconds=timeline.ends_after + 30))
    listener = Listener()
    attempt = new_attempt().with_agent_run("sim-earlier")
    got = await SimulatedQuoteSource(sleep=clock.sleep, clock=clock).quote(
        make_request(), "geico", attempt, listener
    )
    assert (clock.sleeps, listener.messages) == ([], [])
    assert same_moment(got.quoted_at, STARTED_AT + timedelta(seconds=timeline.ends_after))


async def test_min_seconds_stretches_an_attempt_and_the_deadline_cuts_it() -> None:
    clock, listener = Clock(STARTED_AT), Listener()
    slow = SimulatedQuoteSource(delay_scale=0.01, min_seconds=40, sleep=clock.sleep, clock=clock)
    got = await slow.quote(make_request(), "geico", new_attempt(), listener)
    assert got.quoted_at == STARTED_AT + timedelta(seconds=40)
    assert same_moment(clock.now, got.quoted_at)

    clock = Clock(STARTED_AT)
    slow = SimulatedQuoteSource(delay_scale=0.01, min_seconds=40, sleep=clock.sleep, clock=clock)
    with pytest.raises(ProviderTimeout) as caught:
        await slow.quote(
            make_request(),
            "geico",
            new_attempt(budget=30).with_agent_run("sim-x"),
            Listener(),
        )
    assert clock.now == STARTED_AT + timedelta(seconds=30)
    assert caught.value.agent_run_id == "sim-x"


async def test_real_sleeps_resume_after_a_cancelled_call() -> None:
    """The hand-off the worker really does: asyncio cancellation, then a call with the id."""
    source = SimulatedQuoteSource(delay_scale=0.02)
    attempt, first = new_attempt(utc_now()), Listener(signal_after=2)
    task = asyncio.create_task(source.quote(make_request(), "geico", attempt, first))
    await first.reached.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    second = Listener()
    got = await source.quote(
        make_request(), "geico", attempt.with_agent_run(first.agent_runs[0]), second
    )
    timeline = simulated_timeline(make_request(), "geico", delay_scale=0.02)
    assert same_moment(got.quoted_at, attempt.started_at + timedelta(seconds=timeline.ends_after))
    assert second.agent_runs == []
    # Nothing replayed, nothing out of order (a step due during the gap may be skipped).
    everything = [message for _, message in timeline.steps]
    told = first.messages + second.messages
    # The first call told at least its two steps before the cancel, and possibly more: a loaded
    # machine may let it run on a step or two before the cancel lands.
    assert len(first.messages) >= 2
    assert first.messages == everything[: len(first.messages)]
    assert told == [message for message in everything if message in told]


def test_settings_for_the_simulated_knob_and_the_step_cap() -> None:
    settings = settings_from_env({"SIMULATED_MIN_SECONDS": "400", "TINYFISH_MAX_STEPS": "60"})
    assert (settings.simulated_min_seconds, settings.tinyfish_max_steps) == (400, 60)
    defaults = settings_from_env({})
    assert (defaults.simulated_min_seconds, defaults.tinyfish_max_steps) == (0, None)
    for bad in ("0", "501", "12.5", "ten", "١٢"):
        with pytest.raises(ConfigError, match="TINYFISH_MAX_STEPS"):
            settings_from_env({"TINYFISH_MAX_STEPS": bad})
