"""No personal data in any log line or stored record: the driver's names and birth date go to
the quote source's goal and nowhere else."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from lib.models import QuoteRequest

FIRST_NAME, LAST_NAME, BIRTH_DATE = "Zephyrine", "Quillfeather", "1987-03-19"
PERSONAL = (FIRST_NAME, LAST_NAME, BIRTH_DATE)
REQUEST: dict[str, Any] = {
    "vin": "2C3CDZAG2GH967639",
    "zip": "94107",
    "driver": {"firstName": FIRST_NAME, "lastName": LAST_NAME, "dateOfBirth": BIRTH_DATE},
}


def personal_data_in(text: str) -> list[str]:
    return [value for value in PERSONAL if value in text]


def test_a_requests_repr_leaves_the_driver_out() -> None:
    request = QuoteRequest.model_validate(REQUEST, context={"providers": ("geico",)})
    assert request.driver.first_name == FIRST_NAME
    assert personal_data_in(repr(request)) == []
    assert personal_data_in(str(request)) == []
    assert personal_data_in(f"{request.driver!r} {request.driver}") == []


@pytest.mark.parametrize(
    "driver",
    [
        {"firstName": FIRST_NAME, "lastName": LAST_NAME, "dateOfBirth": "1887-03-19"},
        {"firstName": FIRST_NAME, "lastName": LAST_NAME, "dateOfBirth": 19870319},
        {"firstName": FIRST_NAME, "lastName": LAST_NAME, "dateOfBirth": BIRTH_DATE, "x": LAST_NAME},
        f"{FIRST_NAME} {LAST_NAME} {BIRTH_DATE}",
    ],
)
def test_a_validation_errors_text_never_quotes_the_input(driver: object) -> None:
    with pytest.raises(ValidationError) as raised:
        QuoteRequest.model_validate({**REQUEST, "driver": driver}, context={"providers": ()})
    assert personal_data_in(str(raised.value)) == []
    assert personal_data_in(repr(raised.value)) == []
