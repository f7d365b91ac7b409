from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from lib.models import (
    ActivityEvent,
    Quote,
    age_on,
    cheapest_first,
    format_time,
    is_run_id,
    new_run_id,
    percent,
    vin_check_digit,
)
from lib.store.base import StoredEvent, stored_event_json, wire_event


@pytest.mark.parametrize(
    ("vin", "digit"),
    [
        ("2C3CDZAG2GH967639", "2"),
        ("1M8GDM9AXKP042788", "X"),  # the worked example of 49 CFR 565: remainder 10 is X
        ("11111111111111111", "1"),
        ("1HGCM82633A004352", "3"),
    ],
)
def test_vin_check_digit_follows_49_cfr_565(vin: str, digit: str) -> None:
    assert vin_check_digit(vin) == digit


def test_age_turns_on_the_birthday() -> None:
    assert age_on(date(2010, 11, 28), date(2026, 11, 27)) == 15
    assert age_on(date(2010, 11, 28), date(2026, 11, 28)) == 16
    assert age_on(date(2008, 2, 29), date(2026, 2, 28)) == 17


def test_times_are_rfc3339_utc_with_milliseconds() -> None:
    moment = datetime(2026, 11, 28, 14, 3, 7, 412_999, tzinfo=UTC)
    assert format_time(moment) == "2026-11-28T14:03:07.412Z"


def test_run_ids_are_unguessable_and_checked_by_form() -> None:
    ids = {new_run_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(is_run_id(i) for i in ids)
    assert not is_run_id("../../etc/passwd")
    assert not is_run_id("a" * 21)


def test_percent_rounds_down() -> None:
    assert [percent(c, 3) for c in range(4)] == [0, 33, 66, 100]


def test_quotes_sort_cheapest_first_with_a_stable_tie_break() -> None:
    def quote(provider: str, monthly: float) -> Quote:
        return Quote.model_validate(
            {
                "provider": provider,
                "monthlyPremium": monthly,
                "annualPremium": monthly * 12,
                "coverage": "standard",
                "deductible": 500,
                "source": "simulated",
                "quotedAt": "2026-11-28T14:03:07.412Z",
            }
        )

    ordered = cheapest_first(
        [quote("geico", 150), quote("allstate", 120), quote("progressive", 120)]
    )
    assert [q.provider for q in ordered] == ["allstate", "progressive", "geico"]


def test_an_event_is_stored_without_its_id_and_sent_with_it_first() -> None:
    event = ActivityEvent(provider="geico", message='Entering "vehicle"\nnext line')
    stored = stored_event_json(event, "n0nce-42")
    wire = StoredEvent(12, wire_event(12, stored))
    assert '"id"' not in stored and stored.startswith('{"n":"n0nce-42","type":"activity"')
    assert wire.data.startswith('{"id":12,"type":"activity","provider":"geico"')
    assert "\n" not in wire.data
    assert wire.as_dict() == {"id": 12, **event.model_dump(mode="json")}
    assert wire.type == "activity"
    assert not wire.is_terminal
