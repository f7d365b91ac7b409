"""quote_with_retries: one provider's budget, retries of transient failures, typed errors only."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from lib.models import ProviderId, Quote, QuoteRequest, utc_now
from lib.providers.backoff import CANCELLING, POLLING, Backoff
from lib.providers.base import (
    AgentAttempt,
    AttemptListener,
    ProviderBadOutput,
    ProviderBlocked,
    ProviderDeclined,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
)
from lib.providers.retry import backoff_delay, quote_with_retries
from tests.conftest import ActivityRecorder, make_quote

REQUEST = QuoteRequest.model_validate(
    {
        "vin": "2C3CDZAG2GH967639",
        "zip": "94107",
        "driver": {"firstName": "Zelinda", "lastName": "Quarrington", "dateOfBirth": "1987-03-09"},
    }
)


class ScriptedSource:
    """Plays one outcome per attempt: an exception to raise, or a quote to return. Each attempt
    reports an agent run "agent-N" first when `agent_runs` is set; cancels are recorded."""

    name = "scripted"
    billable = False

    def __init__(
        self, *outcomes: BaseException | Quote | Callable[[], object], agent_runs: bool = False
    ) -> None:
        self.outcomes = list(outcomes)
        self.attempts = 0
        self.agent_runs = agent_runs
        self.seen: list[AgentAttempt] = []
        self.cancelled: list[str] = []

    async def quote(
        self,
        request: QuoteRequest,
        provider: ProviderId,
        attempt: AgentAttempt,
        listener: AttemptListener,
    ) -> Quote:
        self.attempts += 1
        self.seen.append(attempt)
        if self.agent_runs:
            await listener.agent_run_started(f"agent-{self.attempts}")
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        if isinstance(outcome, Quote):
            return outcome
        result = outcome()
        if asyncio.iscoroutine(result):
            result = await result
        assert isinstance(result, Quote)
        return result

    async def cancel(self, agent_run_id: str) -> None:
        self.cancelled.append(agent_run_id)

    async def aclose(self) -> None:
        return None


async def test_first_success_is_returned_without_retry_messages() -> None:
    rec, quote = ActivityRecorder(), make_quote()
    source = ScriptedSource(quote)
    got = await quote_with_retries(
        source, REQUEST, "geico", rec.report, timeout_seconds=30, sleep=rec.sleep
    )
    assert got is quote
    assert (source.attempts, rec.messages, rec.sleeps) == (1, [], [])


async def test_transient_error_is_retried_with_growing_backoff_and_a_message() -> None:
    rec, quote = ActivityRecorder(), make_quote()
    source = ScriptedSource(
        ProviderUnavailable("TinyFish returned HTTP 503"),
        ProviderBadOutput("GEICO's agent finished without a monthly premium"),
        quote,
    )
    got = await quote_with_retries(
        source, REQUEST, "geico", rec.report, timeout_seconds=60, sleep=rec.sleep
    )
    assert got is quote
    assert rec.messages == [
        "Retrying after TinyFish returned HTTP 503 (attempt 2 of 3)",
        "Retrying after GEICO's agent finished without a monthly premium (attempt 3 of 3)",
    ]
    assert 0.75 <= rec.sleeps[0] <= 1.25
    assert 1.5 <= rec.sleeps[1] <= 2.5


async def test_transient_errors_past_the_last_attempt_raise_the_last_error() -> None:
    rec = ActivityRecorder()
    last = ProviderUnavailable("TinyFish returned HTTP 502")
    source = ScriptedSource(ProviderUnavailable("first"), ProviderUnavailable("second"), last)
    with pytest.raises(ProviderUnavailable) as caught:
        await quote_with_retries(
            source, REQUEST, "geico", rec.report, timeout_seconds=60, sleep=rec.sleep
        )
    assert caught.value is last
    assert source.attempts == 3
    assert len(rec.sleeps) == 2


@pytest.mark.parametrize(
    "error",
    [ProviderDeclined("no quote"), ProviderBlocked("captcha"), ProviderTimeout("agent timeout")],
)
async def test_non_transient_error_is_raised_at_once(error: ProviderError) -> None:
    rec = ActivityRecorder()
    source = ScriptedSource(error, make_quote())
    with pytest.raises(type(error)) as caught:
        await quote_with_retries(
            source, REQUEST, "geico", rec.report, timeout_seconds=60, sleep=rec.sleep
        )
    assert caught.value is error
    assert (source.attempts, rec.messages, rec.sleeps) == (1, [], [])


async def test_unexpected_exception_becomes_provider_unavailable_without_its_text() -> None:
    rec, quote = ActivityRecorder(), make_quote()
    source = ScriptedSource(KeyError("Zelinda Quarrington 1987-03-09"), quote)
    got = await quote_with_retries(
        source, REQUEST, "progressive", rec.report, timeout_seconds=60, sleep=rec.sleep
    )
    assert got is quote
    assert rec.messages[0] == "Retrying after Progressive failed unexpectedly (attempt 2 of 3)"

    source = ScriptedSource(ValueError("Zelinda"), ValueError("Zelinda"), ValueError("Zelinda"))
    with pytest.raises(ProviderUnavailable) as caught:
        await quote_with_retries(
            source, REQUEST, "progressive", rec.report, timeout_seconds=60, sleep=rec.sleep
        )
    assert "Zelinda" not in str(caught.value)
    assert caught.value.__cause__ is None


async def test_an_exception_raised_by_report_is_the_callers_and_propagates() -> None:
    class StoreFenced(Exception):
        pass

    async def failing_report(message: str) -> None:
        raise StoreFenced(message)

    class ReportingSource(ScriptedSource):
        async def quote(
            self,
            request: QuoteRequest,
            provider: ProviderId,
            attempt: AgentAttempt,
            listener: AttemptListener,
        ) -> Quote:
            await listener.activity("Opening GEICO quote page")
            return make_quote()

    with pytest.raises(StoreFenced):
        await quote_with_retries(
            ReportingSource(), REQUEST, "geico", failing_report, timeout_seconds=5
        )


async def test_budget_running_out_during_an_attempt_raises_provider_timeout() -> None:
    async def forever() -> Quote:
        await asyncio.sleep(60)
        raise AssertionError("unreachable")

    source = ScriptedSource(forever)
    with pytest.raises(ProviderTimeout, match=r"GEICO gave no quote within 0\.05 s"):
        await quote_with_retries(
            source, REQUEST, "geico", ActivityRecorder().report, timeout_seconds=0.05
        )


async def test_budget_running_out_during_backoff_raises_provider_timeout() -> None:
    waits: list[float] = []

    async def slow_sleep(seconds: float) -> None:
        waits.append(seconds)
        await asyncio.sleep(60)

    source = ScriptedSource(ProviderUnavailable("TinyFish returned HTTP 500"), make_quote())
    # With no jitter the first backoff is 0.75 s: it fits the 0.9 s budget, which ends mid-wait.
    with pytest.raises(ProviderTimeout):
        await quote_with_retries(
            source,
            REQUEST,
            "geico",
            ActivityRecorder().report,
            timeout_seconds=0.9,
            sleep=slow_sleep,
            jitter=lambda: 0.0,
        )
    assert waits == [0.75]
    assert source.attempts == 1


async def test_retry_after_is_respected_when_it_fits_the_budget() -> None:
    rec, quote = ActivityRecorder(), make_quote()
    source = ScriptedSource(ProviderUnavailable("TinyFish rate limit", retry_after=7), quote)
    assert (
        await quote_with_retries(
            source, REQUEST, "geico", rec.report, timeout_seconds=60, sleep=rec.sleep
        )
        is quote
    )
    assert rec.sleeps == [7]


async def test_a_wait_that_does_not_fit_the_budget_raises_the_error_now() -> None:
    rec = ActivityRecorder()
    error = ProviderUnavailable("TinyFish rate limit", retry_after=120)
    source = ScriptedSource(error, make_quote())
    with pytest.raises(ProviderUnavailable) as caught:
        await quote_with_retries(
            source, REQUEST, "geico", rec.report, timeout_seconds=30, sleep=rec.sleep
        )
    assert caught.value is error
    assert (source.attempts, rec.sleeps, rec.messages) == (1, [], [])


async def test_cancellation_propagates_and_is_not_turned_into_a_provider_error() -> None:
    started = asyncio.Event()

    async def hang() -> Quote:
        started.set()
        await asyncio.sleep(60)
        raise AssertionError("unreachable")

    task = asyncio.create_task(
        quote_with_retries(
            ScriptedSource(hang), REQUEST, "geico", ActivityRecorder().report, timeout_seconds=30
        )
    )
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_backoff_doubles_from_one_second_and_is_capped_with_jitter() -> None:
    nominal = [backoff_delay(n, jitter=lambda: 0.5) for n in range(1, 7)]
    assert nominal == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert backoff_delay(3, jitter=lambda: 0.0) == 3.0
    assert backoff_delay(3, jitter=lambda: 0.999999) == pytest.approx(5.0, abs=1e-4)


async def test_attempts_are_numbered_and_share_the_budgets_deadline() -> None:
    rec, quote = ActivityRecorder(), make_quote()
    source = ScriptedSource(ProviderUnavailable("a"), ProviderUnavailable("b"), quote)
    before = utc_now()
    await quote_with_retries(
        source, REQUEST, "geico", rec.report, timeout_seconds=60, sleep=rec.sleep
    )
    assert [a.number for a in source.seen] == [1, 2, 3]
    assert all(a.agent_run_id is None for a in source.seen)
    assert len({a.deadline for a in source.seen}) == 1
    assert 59 <= (source.seen[0].deadline - before).total_seconds() <= 61


async def test_an_agent_run_left_going_is_cancelled_before_the_next_attempt() -> None:
    rec, quote = ActivityRecorder(), make_quote()
    going = ProviderUnavailable("TinyFish stopped answering")
    over = ProviderBadOutput("GEICO's agent finished without a monthly premium")
    over.agent_run_finished = True
    source = ScriptedSource(going, over, quote, agent_runs=True)
    got = await quote_with_retries(
        source, REQUEST, "geico", rec.report, timeout_seconds=60, sleep=rec.sleep
    )
    assert got is quote
    # agent-1 may still be going (cancelled); agent-2 was over; agent-3 gave the quote.
    assert source.cancelled == ["agent-1"]
    assert going.agent_run_id == "agent-1"


async def test_the_agent_run_of_an_attempt_cut_by_the_budget_is_cancelled() -> None:
    async def forever() -> Quote:
        await asyncio.sleep(60)
        raise AssertionError("unreachable")

    source = ScriptedSource(forever, agent_runs=True)
    with pytest.raises(ProviderTimeout):
        await quote_with_retries(
            source, REQUEST, "geico", ActivityRecorder().report, timeout_seconds=0.05
        )
    assert source.cancelled == ["agent-1"]


async def test_the_agent_run_of_a_cancelled_caller_is_cancelled() -> None:
    started = asyncio.Event()

    async def hang() -> Quote:
        started.set()
        await asyncio.sleep(60)
        raise AssertionError("unreachable")

    source = ScriptedSource(hang, agent_runs=True)
    task = asyncio.create_task(
        quote_with_retries(source, REQUEST, "geico", ActivityRecorder().report, timeout_seconds=30)
    )
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert source.cancelled == ["agent-1"]


async def test_a_quoted_attempt_cancels_nothing() -> None:
    source = ScriptedSource(make_quote(), agent_runs=True)
    rec = ActivityRecorder()
    await quote_with_retries(source, REQUEST, "geico", rec.report, timeout_seconds=5)
    assert source.cancelled == []


def test_the_named_policies_grow_to_their_caps() -> None:
    assert [POLLING.wait(n) for n in range(1, 7)] == pytest.approx([1, 1.5, 2.25, 3.375, 5, 5])
    assert [CANCELLING.wait(n) for n in range(1, 4)] == [0.5, 1.0, 2.0]
    assert Backoff(first=2, cap=3).wait(5, jitter=lambda: 0.0) == 3  # no spread, no jitter
