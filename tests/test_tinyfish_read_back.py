"""TinyFishQuoteSource.read_back: the one GET of a paid agent run before its provider is declared
out of time (lib/worker/endings.py). A run TinyFish finished with a quote is used; anything else
is None, and nothing is started or cancelled. An attempt whose run id was never learnt (its create
died before STARTED) is looked up by its reference: found finished, it is used; still going, it is
cancelled, since nobody would read it."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

import httpx
import pytest

from lib.models import QuoteRequest, utc_now
from lib.providers.base import AgentAttempt
from lib.providers.tinyfish import TinyFishQuoteSource

API_URL = "https://tinyfish.test"
REQUEST = QuoteRequest.model_validate(
    {
        "vin": "2C3CDZAG2GH967639",
        "zip": "94107",
        "driver": {"firstName": "Ana", "lastName": "Lee", "dateOfBirth": "1990-04-12"},
        "coverage": "standard",
    }
)
QUOTED = {
    "outcome": "quoted",
    "monthly_premium": 142.5,
    "term_premium": None,
    "term_months": None,
    "deductible": 1000,
    "currency": "USD",
    "reason": None,
}


class Steps:
    """The listener: read_back reports the run's steps and nothing else."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    async def activity(self, message: str) -> None:
        raise AssertionError("a read-back relays no activity")

    async def agent_run_started(self, agent_run_id: str) -> None:
        raise AssertionError("a read-back starts nothing")

    def agent_steps(self, steps: int) -> None:
        self.steps.append(steps)


def attempt_past_its_deadline() -> AgentAttempt:
    now = utc_now()
    return AgentAttempt(
        number=1, started_at=now - timedelta(seconds=200), deadline=now, agent_run_id="run_123"
    )


async def read_back(answer: httpx.Response | Exception) -> tuple[Any, list[str], Steps]:
    calls: list[str] = []

    def reply(request: httpx.Request) -> httpx.Response:
        calls.append(f"{request.method} {request.url.path}")
        if isinstance(answer, Exception):
            raise answer
        return answer

    source = TinyFishQuoteSource(
        api_key="tf-key", api_url=API_URL, transport=httpx.MockTransport(reply)
    )
    listener = Steps()
    try:
        quote = await source.read_back(REQUEST, "geico", attempt_past_its_deadline(), listener)
    finally:
        await source.aclose()
    return quote, calls, listener


def run(status: str, result: Any = None, **extra: Any) -> httpx.Response:
    body = {"run_id": "run_123", "status": status, "result": result, "error": None, **extra}
    return httpx.Response(200, json=body)


async def test_a_run_tinyfish_completed_with_a_quote_is_read_back_once() -> None:
    quote, calls, listener = await read_back(run("COMPLETED", QUOTED, num_of_steps=31))
    assert quote is not None and quote.monthly_premium == 142.5
    assert calls == ["GET /v1/runs/run_123"]
    assert listener.steps == [31]


@pytest.mark.parametrize(
    "answer",
    [
        run("RUNNING"),
        run("PENDING"),
        run("FAILED"),
        run("COMPLETED", {"outcome": "declined", "reason": "no online quote"}),
        httpx.Response(404),
        httpx.Response(503),
        httpx.ConnectError("refused"),
    ],
    ids=["running", "pending", "failed", "completed-without-a-quote", "unknown", "5xx", "down"],
)
async def test_anything_but_a_finished_quote_reads_back_as_none_and_cancels_nothing(
    answer: httpx.Response | Exception,
) -> None:
    quote, calls, _ = await read_back(answer)
    assert quote is None
    assert calls == ["GET /v1/runs/run_123"]


class Adopting(Steps):
    """An attempt whose run id was never learnt: the run found by reference is reported."""

    def __init__(self) -> None:
        super().__init__()
        self.started: list[str] = []

    async def agent_run_started(self, agent_run_id: str) -> None:
        self.started.append(agent_run_id)


async def read_back_unseen(status: str) -> tuple[Any, list[str], Adopting]:
    """The attempt's create died before STARTED: TinyFish lists its run under the reference."""
    from lib.providers.tinyfish.source import attempt_reference

    calls: list[str] = []
    unseen = dataclasses.replace(attempt_past_its_deadline(), agent_run_id=None)
    reference = attempt_reference(REQUEST, "geico", unseen)

    def reply(request: httpx.Request) -> httpx.Response:
        calls.append(f"{request.method} {request.url.path}")
        if request.url.path == "/v1/runs":
            assert request.url.params["goal"] == reference
            listed = {"run_id": "run_456", "status": status, "goal": f"{reference} Get a quote"}
            return httpx.Response(200, json={"data": [listed], "pagination": {}})
        if request.url.path.endswith("/cancel"):
            return httpx.Response(200, json={"run_id": "run_456", "status": "CANCELLED"})
        body = {"run_id": "run_456", "status": status, "error": None, "num_of_steps": 12}
        body["result"] = QUOTED if status == "COMPLETED" else None
        return httpx.Response(200, json=body)

    source = TinyFishQuoteSource(
        api_key="tf-key", api_url=API_URL, transport=httpx.MockTransport(reply)
    )
    listener = Adopting()
    try:
        quote = await source.read_back(REQUEST, "geico", unseen, listener)
    finally:
        await source.aclose()
    return quote, calls, listener


async def test_an_unseen_run_found_finished_by_its_reference_is_used() -> None:
    quote, calls, listener = await read_back_unseen("COMPLETED")
    assert quote is not None and quote.monthly_premium == 142.5
    assert listener.started == ["run_456"]
    assert calls == ["GET /v1/runs", "GET /v1/runs/run_456"]


async def test_an_unseen_run_found_still_going_by_its_reference_is_cancelled() -> None:
    quote, calls, listener = await read_back_unseen("RUNNING")
    assert quote is None
    assert listener.started == ["run_456"]
    assert calls == ["GET /v1/runs", "GET /v1/runs/run_456", "POST /v1/runs/run_456/cancel"]
