"""The simulated source: deterministic demo quotes, agent-like activity, one documented decline."""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest

from lib.config import settings_from_env
from lib.models import PROVIDER_IDS, PROVIDER_NAMES, ProviderId, Quote, QuoteRequest, utc_now
from lib.providers import build_quote_source
from lib.providers.base import ProviderDeclined
from lib.providers.simulated import SimulatedQuoteSource
from lib.providers.tinyfish import TinyFishQuoteSource
from tests.conftest import ActivityRecorder

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


async def quote(
    request: QuoteRequest, provider: ProviderId = "geico", scale: float = 0.0
) -> tuple[Quote, ActivityRecorder]:
    activity = ActivityRecorder()
    source = SimulatedQuoteSource(delay_scale=scale, sleep=activity.sleep)
    return await source.get_quote(request, provider, activity.report), activity


async def test_same_request_and_insurer_always_give_the_same_quote() -> None:
    first, _ = await quote(make_request())
    second, _ = await quote(make_request())
    assert first.monthly_premium == second.monthly_premium
    assert first.deductible == second.deductible


async def test_insurers_and_vins_give_different_prices() -> None:
    prices = {p: (await quote(make_request(), p))[0].monthly_premium for p in PROVIDER_IDS}
    assert len(set(prices.values())) == len(PROVIDER_IDS)
    other_vin, _ = await quote(make_request(vin="1HGCM82633A004352"))
    assert other_vin.monthly_premium != prices["geico"]


async def test_quote_shape_is_labelled_simulated_with_consistent_annual_premium() -> None:
    q, _ = await quote(make_request(coverage="full"), "state_farm")
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
    q, _ = await quote(make_request(coverage=coverage))
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
                q, _ = await quote(request, provider)
                assert 30 <= q.monthly_premium <= 800, (coverage, age, provider)


async def test_activity_reads_like_an_agent_and_carries_no_personal_data() -> None:
    for provider in PROVIDER_IDS:
        _, activity = await quote(make_request(), provider)
        assert 3 <= len(activity.messages) <= 6
        assert activity.messages[0] == f"Opening {PROVIDER_NAMES[provider]} quote page"
        assert "Entering vehicle details for VIN …7639" in activity.messages
        text = " ".join(activity.messages)
        for personal in (FIRST, LAST, BORN, "1987", "94107"):
            assert personal not in text


async def test_delays_are_deterministic_between_0_3_and_2_5_seconds_times_the_scale() -> None:
    _, first = await quote(make_request(), "progressive", scale=1.0)
    _, again = await quote(make_request(), "progressive", scale=1.0)
    _, scaled = await quote(make_request(), "progressive", scale=0.1)
    assert first.sleeps == again.sleeps
    assert len(first.sleeps) == len(first.messages)
    assert all(0.3 <= s <= 2.5 for s in first.sleeps)
    assert scaled.sleeps == pytest.approx([s * 0.1 for s in first.sleeps])


async def test_delay_scale_zero_never_sleeps() -> None:
    _, activity = await quote(make_request(), scale=0.0)
    assert activity.sleeps == []
    assert activity.messages


async def test_allstate_declines_drivers_under_21_using_the_car_for_business() -> None:
    young_business = make_request(dateOfBirth=born_years_ago(19), use="business")
    with pytest.raises(ProviderDeclined) as caught:
        await quote(young_business, "allstate")
    assert "under 21" in caught.value.message
    assert FIRST not in caught.value.message
    assert caught.value.retryable is False

    for provider in ("geico", "progressive"):
        q, _ = await quote(young_business, provider)
        assert q.provider == provider
    q, _ = await quote(make_request(dateOfBirth=born_years_ago(19), use="commute"), "allstate")
    assert q.provider == "allstate"
    q, _ = await quote(make_request(dateOfBirth=born_years_ago(30), use="business"), "allstate")
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
    assert "http://127.0.0.1:9/v1/automation/run-sse" in repr(tinyfish)
    assert "'k'" not in repr(tinyfish)
    await tinyfish.aclose()
