"""The TinyFish adapter: the run request it sends, how it reads the SSE answer, how every failure
maps to a typed ProviderError, and that the driver's personal data goes nowhere but the goal."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
import respx

from lib.models import PROVIDER_IDS, Quote, QuoteRequest, utc_now
from lib.providers.backoff import Backoff
from lib.providers.base import (
    AgentAttempt,
    ProviderAgentFailed,
    ProviderAuth,
    ProviderBadOutput,
    ProviderBlocked,
    ProviderBusy,
    ProviderDeclined,
    ProviderError,
    ProviderRequestRejected,
    ProviderTimeout,
    ProviderUnavailable,
)
from lib.providers.tinyfish import (
    INSURER_START_URLS,
    MAX_ACTIVITY_CHARS,
    QUOTE_OUTPUT_SCHEMA,
    TinyFishQuoteSource,
)
from lib.providers.tinyfish.source import attempt_reference
from tests.fake_tinyfish import SCHEMA_KEYWORDS, FakeTinyFishServer

API_URL = "https://tinyfish.test"
ENDPOINT = f"{API_URL}/v1/automation/run-sse"
API_KEY = "tf-test-key-123"
FIRST, LAST, BORN = "Zelinda", "Quarrington", "1987-03-09"
PERSONAL = (FIRST, LAST, BORN, "03/09/1987", "3/9/1987")
SSE_HEADERS = {"content-type": "text/event-stream"}

REQUEST = QuoteRequest.model_validate(
    {
        "vin": "2C3CDZAG2GH967639",
        "zip": "94107",
        "driver": {"firstName": FIRST, "lastName": LAST, "dateOfBirth": BORN},
        "vehicle": {"annualMileage": 8500, "use": "pleasure", "ownership": "leased"},
        "coverage": "standard",
    }
)
GOOD_RESULT = {
    "outcome": "quoted",
    "monthly_premium": 142.5,
    "term_premium": None,
    "term_months": None,
    "deductible": 1000,
    "currency": "USD",
    "reason": None,
}


def frame(payload: Any) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


def started() -> bytes:
    return frame({"type": "STARTED", "run_id": "run_123", "timestamp": "2026-11-28T14:00:00Z"})


def progress(purpose: str) -> bytes:
    return frame({"type": "PROGRESS", "run_id": "run_123", "purpose": purpose})


def complete(result: Any = None, *, status: str = "COMPLETED", error: Any = None) -> bytes:
    return frame(
        {
            "type": "COMPLETE",
            "run_id": "run_123",
            "status": status,
            "result": result,
            "error": error,
        }
    )


def run_events(result: Any = GOOD_RESULT, *purposes: str) -> list[bytes]:
    return [
        started(),
        frame({"type": "STREAMING_URL", "run_id": "run_123", "streaming_url": "https://s.test/1"}),
        *(progress(p) for p in purposes),
        frame({"type": "HEARTBEAT", "timestamp": "2026-11-28T14:00:05Z"}),
        complete(result),
    ]


class Chunks(httpx.AsyncByteStream):
    """A response body delivered in the given pieces, optionally failing after the last one."""

    def __init__(self, chunks: list[bytes], error: Exception | None = None) -> None:
        self.chunks = chunks
        self.error = error

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        if self.error is not None:
            raise self.error


def sse_response(chunks: list[bytes], error: Exception | None = None) -> httpx.Response:
    return httpx.Response(200, headers=SSE_HEADERS, stream=Chunks(chunks, error))


def split_bytes(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


RUNS_URL = f"{API_URL}/v1/runs"
NO_RUNS = {"data": [], "pagination": {"total": 0, "has_more": False, "next_cursor": None}}


@pytest.fixture
def api() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=False) as router:
        # The lookup by reference: TinyFish lists no run of the attempt unless a test says so.
        router.get(RUNS_URL, name="lookup").mock(return_value=httpx.Response(200, json=NO_RUNS))
        yield router


class Activity:
    """An AttemptListener that records what it is told."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.agent_runs: list[str] = []
        self.steps: list[int] = []

    async def activity(self, message: str) -> None:
        self.messages.append(message)

    async def agent_run_started(self, agent_run_id: str) -> None:
        self.agent_runs.append(agent_run_id)

    def agent_steps(self, steps: int) -> None:
        self.steps.append(steps)


def new_attempt(seconds: float = 300, agent_run_id: str | None = None) -> AgentAttempt:
    now = utc_now()
    return AgentAttempt(
        number=1,
        started_at=now,
        deadline=now + timedelta(seconds=seconds),
        agent_run_id=agent_run_id,
    )


def fast_source(api_url: str = API_URL, **options: Any) -> TinyFishQuoteSource:
    """A source that polls (and retries cancels) without real waits."""
    options.setdefault("sleep", no_sleep)
    return TinyFishQuoteSource(api_key=API_KEY, api_url=api_url, **options)


async def no_sleep(seconds: float) -> None:
    await asyncio.sleep(0)


async def ask(
    api: respx.MockRouter,
    *responses: httpx.Response | Exception,
    provider: Any = "geico",
    request: QuoteRequest = REQUEST,
) -> tuple[Quote, Activity, respx.Route]:
    route = api.post(ENDPOINT).mock(side_effect=list(responses))
    activity = Activity()
    source = fast_source()
    try:
        return await source.quote(request, provider, new_attempt(), activity), activity, route
    finally:
        await source.aclose()


async def failure(api: respx.MockRouter, *responses: httpx.Response | Exception) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        await ask(api, *responses)
    return caught.value


# --- the request on the wire ------------------------------------------------------------------


async def test_run_request_wire_format(api: respx.MockRouter) -> None:
    _, _, route = await ask(api, sse_response(run_events()), provider="progressive")

    sent = route.calls.last.request
    assert sent.method == "POST"
    assert str(sent.url) == ENDPOINT
    assert sent.headers["x-api-key"] == API_KEY
    assert sent.headers["content-type"] == "application/json"
    assert sent.headers["accept"] == "text/event-stream"
    body = json.loads(sent.content)
    assert body["url"] == "https://www.progressive.com/auto/"
    assert body["output_schema"] == QUOTE_OUTPUT_SCHEMA
    assert body["browser_profile"] == "stealth"
    assert body["proxy_config"] == {"enabled": True, "country_code": "US"}
    # The cost cap: the attempt's whole seconds left (300 s budget, a moment spent).
    assert body["agent_config"] in ({"max_duration_seconds": 299}, {"max_duration_seconds": 300})
    assert "max_steps" not in body["agent_config"]


async def test_caps_carry_max_steps_and_never_exceed_tinyfishs_own_limit(
    api: respx.MockRouter,
) -> None:
    route = api.post(ENDPOINT).mock(side_effect=[sse_response(run_events())])
    source = fast_source(max_steps=60)
    try:
        await source.quote(REQUEST, "geico", new_attempt(seconds=3600), Activity())
    finally:
        await source.aclose()
    body = json.loads(route.calls.last.request.content)
    assert body["agent_config"] == {"max_duration_seconds": 600, "max_steps": 60}


async def test_too_little_time_left_starts_no_agent_run(api: respx.MockRouter) -> None:
    route = api.post(ENDPOINT).mock(side_effect=[sse_response(run_events())])
    source = fast_source()
    try:
        with pytest.raises(ProviderTimeout) as caught:
            await source.quote(REQUEST, "geico", new_attempt(seconds=8), Activity())
    finally:
        await source.aclose()
    assert not route.called
    assert caught.value.agent_run_id is None
    assert caught.value.agent_run_id is None or caught.value.agent_run_finished


async def test_started_reports_the_agent_run_before_anything_else(api: respx.MockRouter) -> None:
    order: list[str] = []

    class Ordered(Activity):
        async def activity(self, message: str) -> None:
            order.append(f"activity:{message}")

        async def agent_run_started(self, agent_run_id: str) -> None:
            order.append(f"started:{agent_run_id}")

    api.post(ENDPOINT).mock(side_effect=[sse_response(run_events(GOOD_RESULT, "Navigating"))])
    source = fast_source()
    try:
        await source.quote(REQUEST, "geico", new_attempt(), Ordered())
    finally:
        await source.aclose()
    assert order == ["started:run_123", "activity:Navigating"]


def test_output_schema_uses_only_keywords_tinyfish_accepts() -> None:
    def keywords(node: dict[str, Any]) -> set[str]:
        found = set(node)
        for child in node.get("properties", {}).values():
            found |= keywords(child)
        return found

    assert keywords(QUOTE_OUTPUT_SCHEMA) <= SCHEMA_KEYWORDS
    assert QUOTE_OUTPUT_SCHEMA["required"] == ["outcome"]


def test_every_insurer_has_an_https_quote_start_page() -> None:
    assert set(INSURER_START_URLS) == set(PROVIDER_IDS)
    assert all(url.startswith("https://www.") for url in INSURER_START_URLS.values())


# --- reading the stream -------------------------------------------------------------------------


async def test_progress_purpose_becomes_activity(api: respx.MockRouter) -> None:
    _, activity, _ = await ask(
        api,
        sse_response(
            run_events(GOOD_RESULT, "Navigating to https://www.geico.com", "Entering the ZIP code")
        ),
    )
    assert activity.messages == ["Navigating to https://www.geico.com", "Entering the ZIP code"]
    assert activity.steps == [1, 2]  # each PROGRESS is a step TinyFish bills


async def test_completed_result_becomes_a_tinyfish_quote(api: respx.MockRouter) -> None:
    quote, _, _ = await ask(api, sse_response(run_events()))
    assert quote.provider == "geico"
    assert quote.source == "tinyfish"
    assert quote.monthly_premium == 142.5
    assert quote.annual_premium == 1710.0
    assert quote.deductible == 1000
    assert quote.coverage == "standard"
    assert quote.currency == "USD"


async def test_amounts_given_as_dollar_strings_are_read(api: respx.MockRouter) -> None:
    result = {"outcome": "quoted", "monthlyPremium": "$1,142.50/mo", "deductible": "$1,000"}
    quote, _, _ = await ask(api, sse_response(run_events(result)))
    assert (quote.monthly_premium, quote.deductible) == (1142.5, 1000)


async def test_a_six_month_total_is_turned_into_a_monthly_premium(api: respx.MockRouter) -> None:
    result = {"outcome": "quoted", "term_premium": "$855.00", "term_months": 6, "deductible": 1000}
    quote, _, _ = await ask(api, sse_response(run_events(result)))
    assert (quote.monthly_premium, quote.annual_premium) == (142.5, 1710.0)


async def test_a_result_sent_as_a_json_string_is_read(api: respx.MockRouter) -> None:
    quote, _, _ = await ask(api, sse_response(run_events(json.dumps(GOOD_RESULT))))
    assert quote.monthly_premium == 142.5


async def test_events_split_into_tiny_chunks_with_crlf_and_comments_are_read(
    api: respx.MockRouter,
) -> None:
    lines = [b": connected\n\n", b"event: message\nid: 7\n", *run_events(GOOD_RESULT, "Étape 1")]
    body = b"".join(lines).replace(b"\n", b"\r\n")
    quote, activity, _ = await ask(api, sse_response(split_bytes(body, 3)))
    assert activity.messages == ["Étape 1"]
    assert quote.monthly_premium == 142.5


async def test_a_multibyte_character_split_between_chunks_survives(api: respx.MockRouter) -> None:
    body = b"".join(run_events(GOOD_RESULT, "Reading the premium — $142.50"))
    cut = body.index("—".encode()) + 1  # inside the three bytes of the em dash
    _, activity, _ = await ask(api, sse_response([body[:cut], body[cut:]]))
    assert activity.messages == ["Reading the premium — $142.50"]


async def test_unknown_event_types_and_malformed_data_are_skipped(api: respx.MockRouter) -> None:
    chunks = [
        started(),
        b"data: {not json\n\n",
        b"data: [1, 2, 3]\n\n",
        b"data:\n\n",
        frame({"type": "SCREENSHOT", "url": "https://s.test/1.png"}),
        frame({"purpose": "no type at all"}),
        progress("Reading the premium"),
        complete(GOOD_RESULT),
    ]
    quote, activity, _ = await ask(api, sse_response(chunks))
    assert quote.monthly_premium == 142.5
    assert activity.messages == ["Reading the premium"]


async def test_result_under_the_old_result_json_name_is_read(api: respx.MockRouter) -> None:
    event = {"type": "COMPLETE", "status": "COMPLETED", "resultJson": GOOD_RESULT}
    quote, _, _ = await ask(api, sse_response([started(), frame(event)]))
    assert quote.monthly_premium == 142.5


async def test_long_purpose_is_truncated(api: respx.MockRouter) -> None:
    _, activity, _ = await ask(api, sse_response(run_events(GOOD_RESULT, "Clicking " * 100)))
    assert len(activity.messages[0]) == MAX_ACTIVITY_CHARS
    assert activity.messages[0].endswith("…")


def run_object(status: str, result: Any = None, error: Any = None, **extra: Any) -> dict[str, Any]:
    """GET /v1/runs/{id}'s answer, shaped like the SDK's Run."""
    return {
        "run_id": "run_123",
        "status": status,
        "goal": "…",
        "created_at": "2026-11-28T14:00:00Z",
        "result": result,
        "error": error,
        **extra,
    }


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param(None, id="clean end before COMPLETE"),
        pytest.param(httpx.RemoteProtocolError("peer closed connection"), id="dropped"),
        pytest.param(httpx.ReadTimeout("timed out"), id="silent past the read timeout"),
    ],
)
async def test_a_stream_lost_after_started_polls_that_run_and_starts_no_other(
    api: respx.MockRouter, broken: Exception | None
) -> None:
    start = api.post(ENDPOINT).mock(
        side_effect=[sse_response([started(), progress("Entering vehicle details")], broken)]
    )
    poll = api.get(f"{API_URL}/v1/runs/run_123").mock(
        side_effect=[
            httpx.Response(200, json=run_object("RUNNING")),
            httpx.Response(503),
            httpx.ConnectError("refused"),
            httpx.Response(200, json=run_object("COMPLETED", GOOD_RESULT)),
        ]
    )
    source, activity = fast_source(), Activity()
    try:
        quote = await source.quote(REQUEST, "geico", new_attempt(), activity)
    finally:
        await source.aclose()
    assert quote.monthly_premium == 142.5
    assert start.call_count == 1
    assert poll.call_count == 4
    assert poll.calls.last.request.headers["x-api-key"] == API_KEY
    assert activity.agent_runs == ["run_123"]
    assert activity.messages == ["Entering vehicle details"]
    assert activity.steps[0] == 1


async def test_a_polled_run_reports_the_step_count_the_api_gives(api: respx.MockRouter) -> None:
    running = run_object("RUNNING") | {"steps": [{"purpose": "a"}, {"purpose": "b"}]}
    done = run_object("COMPLETED", GOOD_RESULT) | {"num_of_steps": 7}
    api.get(f"{API_URL}/v1/runs/run_123").mock(
        side_effect=[httpx.Response(200, json=running), httpx.Response(200, json=done)]
    )
    source, activity = fast_source(), Activity()
    try:
        await source.quote(REQUEST, "geico", new_attempt(agent_run_id="run_123"), activity)
    finally:
        await source.aclose()
    assert activity.steps == [2, 7]  # the steps array while it runs, num_of_steps at its end


async def test_a_stream_that_ends_before_started_is_transient_unavailable(
    api: respx.MockRouter,
) -> None:
    error = await failure(api, sse_response([b": keep-alive\n\n"]))
    assert isinstance(error, ProviderUnavailable)
    assert error.transient
    assert error.agent_run_id is None
    assert "before" in error.message


async def test_connection_refused_is_transient_unavailable(api: respx.MockRouter) -> None:
    error = await failure(api, httpx.ConnectError("connection refused"))
    assert isinstance(error, ProviderUnavailable)
    assert error.transient


async def test_a_200_that_is_not_an_event_stream_is_unavailable(api: respx.MockRouter) -> None:
    error = await failure(api, httpx.Response(200, html="<html>maintenance</html>"))
    assert isinstance(error, ProviderUnavailable)


# --- what a finished run amounts to -----------------------------------------------------------


async def test_no_quote_outcome_is_provider_declined_with_its_reason(
    api: respx.MockRouter,
) -> None:
    result = {"outcome": "no_quote", "reason": "The site asks to call an agent"}
    error = await failure(api, sse_response(run_events(result)))
    assert isinstance(error, ProviderDeclined)
    assert error.message == "GEICO offered no quote online: The site asks to call an agent"
    assert not error.retryable


async def test_blocked_outcome_is_provider_blocked(api: respx.MockRouter) -> None:
    error = await failure(
        api, sse_response(run_events({"outcome": "blocked", "reason": "A CAPTCHA appeared"}))
    )
    assert isinstance(error, ProviderBlocked)
    assert error.retryable
    assert not error.transient


async def test_free_form_failure_result_is_read_for_a_verdict(api: respx.MockRouter) -> None:
    result = {"status": "failure", "reason": "Unable to provide a quote online for this vehicle"}
    assert isinstance(await failure(api, sse_response(run_events(result))), ProviderDeclined)


@pytest.mark.parametrize(
    "result",
    [
        pytest.param({"outcome": "quoted", "deductible": 500}, id="no premium"),
        pytest.param({"outcome": "quoted", "monthly_premium": 0.4, "deductible": 0}, id="too low"),
        pytest.param(
            {"outcome": "quoted", "monthly_premium": 98_000, "deductible": 0}, id="too high"
        ),
        pytest.param(
            {"outcome": "quoted", "monthly_premium": "call for price", "deductible": 0},
            id="words",
        ),
        pytest.param(
            {"outcome": "quoted", "monthly_premium": "$120-$140", "deductible": 0}, id="range"
        ),
        pytest.param({"outcome": "quoted", "monthly_premium": -5, "deductible": 0}, id="negative"),
        pytest.param(
            {"outcome": "quoted", "monthly_premium": 120, "deductible": 0, "currency": "EUR"},
            id="currency",
        ),
        pytest.param({"outcome": "quoted", "monthly_premium": 120}, id="no deductible"),
        pytest.param({"outcome": "maybe", "monthly_premium": 120}, id="unknown outcome"),
        pytest.param([GOOD_RESULT], id="a list"),
        pytest.param(None, id="null"),
        pytest.param("I found the price: about 140 dollars", id="prose"),
    ],
)
async def test_result_that_does_not_fit_is_provider_bad_output(
    api: respx.MockRouter, result: Any
) -> None:
    error = await failure(api, sse_response(run_events(result)))
    assert isinstance(error, ProviderBadOutput)
    assert error.transient


async def test_minimum_coverage_without_deductible_means_zero(api: respx.MockRouter) -> None:
    request = REQUEST.model_copy(update={"coverage": "minimum"})
    quote, _, _ = await ask(
        api,
        sse_response(run_events({"outcome": "quoted", "monthly_premium": 61})),
        request=request,
    )
    assert (quote.deductible, quote.coverage) == (0, "minimum")


async def test_failed_run_blocked_by_a_captcha_is_provider_blocked(api: respx.MockRouter) -> None:
    failed = {"message": "Blocked by a CAPTCHA challenge", "category": "AGENT_FAILURE"}
    error = await failure(api, sse_response([started(), complete(status="FAILED", error=failed)]))
    assert isinstance(error, ProviderBlocked)


async def test_failed_run_for_a_system_failure_is_transient_with_its_retry_after(
    api: respx.MockRouter,
) -> None:
    failed = {
        "code": "service_busy",
        "message": "Browser crashed during execution",
        "category": "SYSTEM_FAILURE",
        "retry_after": 60,
    }
    error = await failure(api, sse_response([started(), complete(status="FAILED", error=failed)]))
    assert isinstance(error, ProviderUnavailable)
    assert error.transient
    assert error.retry_after == 60
    assert "Browser crashed during execution" in error.message


async def test_failed_run_with_a_plain_string_error_is_unavailable(api: respx.MockRouter) -> None:
    error = await failure(
        api, sse_response([started(), complete(status="FAILED", error="Task failed")])
    )
    assert isinstance(error, ProviderUnavailable)
    assert "Task failed" in error.message


async def test_failed_run_for_billing_is_provider_auth(api: respx.MockRouter) -> None:
    failed = {"message": "Insufficient credits", "category": "BILLING_FAILURE"}
    error = await failure(api, sse_response([started(), complete(status="FAILED", error=failed)]))
    assert isinstance(error, ProviderAuth)
    assert not error.retryable


async def test_cancelled_run_is_unavailable(api: respx.MockRouter) -> None:
    error = await failure(api, sse_response([started(), complete(status="CANCELLED")]))
    assert isinstance(error, ProviderUnavailable)
    assert "cancelled" in error.message


# --- HTTP errors ----------------------------------------------------------------------------


def api_error(status: int, code: str, **headers: str) -> httpx.Response:
    return httpx.Response(
        status, json={"error": {"code": code, "message": "details"}}, headers=headers
    )


async def test_http_401_is_provider_auth_and_not_retryable(api: respx.MockRouter) -> None:
    error = await failure(api, api_error(401, "INVALID_API_KEY"))
    assert isinstance(error, ProviderAuth)
    assert not error.retryable
    assert not error.transient
    assert "HTTP 401 INVALID_API_KEY" in error.message


async def test_http_402_is_provider_auth_and_not_retryable(api: respx.MockRouter) -> None:
    error = await failure(api, api_error(402, "INSUFFICIENT_CREDITS"))
    assert isinstance(error, ProviderAuth)
    assert not error.retryable
    assert not error.transient
    assert "credit" in error.message


async def test_http_429_is_transient_and_carries_retry_after(api: respx.MockRouter) -> None:
    error = await failure(api, api_error(429, "RATE_LIMIT_EXCEEDED", **{"Retry-After": "12"}))
    assert isinstance(error, ProviderUnavailable)
    assert error.transient
    assert error.retry_after == 12.0


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408])
async def test_server_errors_are_transient_unavailable(api: respx.MockRouter, status: int) -> None:
    error = await failure(api, httpx.Response(status, text="upstream trouble"))
    assert isinstance(error, ProviderUnavailable)
    assert error.transient
    assert f"HTTP {status}" in error.message


async def test_http_400_is_a_rejected_request_and_not_retried(api: respx.MockRouter) -> None:
    error = await failure(api, api_error(400, "INVALID_INPUT"))
    assert isinstance(error, ProviderRequestRejected)
    assert error.code == "provider_unavailable"
    assert not error.transient
    assert not error.retryable


async def test_403_to_output_schema_retries_once_without_it_and_remembers(
    api: respx.MockRouter,
) -> None:
    route = api.post(ENDPOINT).mock(
        side_effect=[
            httpx.Response(403, json={"error": {"code": "FORBIDDEN", "message": "beta only"}}),
            sse_response(run_events()),
            sse_response(run_events()),
        ]
    )
    source = fast_source()
    try:
        first = await source.quote(REQUEST, "geico", new_attempt(), Activity())
        second = await source.quote(REQUEST, "allstate", new_attempt(), Activity())
    finally:
        await source.aclose()
    bodies = [json.loads(call.request.content) for call in route.calls]
    assert ["output_schema" in body for body in bodies] == [True, False, False]
    assert all("agent_config" in body for body in bodies)
    assert "monthly_premium" in bodies[1]["goal"]
    assert (first.provider, second.provider) == ("geico", "allstate")


async def test_403_naming_max_steps_drops_it_and_keeps_the_duration_cap(
    api: respx.MockRouter,
) -> None:
    refused = {"error": {"code": "FORBIDDEN", "message": "agent_config.max_steps is not enabled"}}
    route = api.post(ENDPOINT).mock(
        side_effect=[httpx.Response(403, json=refused), sse_response(run_events())]
    )
    source = fast_source(max_steps=40)
    try:
        await source.quote(REQUEST, "geico", new_attempt(), Activity())
    finally:
        await source.aclose()
    bodies = [json.loads(call.request.content) for call in route.calls]
    assert [("output_schema" in b, b["agent_config"].get("max_steps")) for b in bodies] == [
        (True, 40),
        (True, None),
    ]
    assert all(b["agent_config"]["max_duration_seconds"] >= 299 for b in bodies)


async def test_403_with_nothing_left_to_drop_is_provider_auth(api: respx.MockRouter) -> None:
    route = api.post(ENDPOINT).mock(side_effect=[api_error(403, "FORBIDDEN")] * 4)
    source = fast_source(max_steps=40)
    try:
        with pytest.raises(ProviderAuth):
            await source.quote(REQUEST, "geico", new_attempt(), Activity())
    finally:
        await source.aclose()
    bodies = [json.loads(call.request.content) for call in route.calls]
    # Each gated field goes on its own; the duration cap is never dropped.
    assert [("output_schema" in b, sorted(b["agent_config"])) for b in bodies] == [
        (True, ["max_duration_seconds", "max_steps"]),
        (False, ["max_duration_seconds", "max_steps"]),
        (False, ["max_duration_seconds"]),
    ]


# --- personal data ------------------------------------------------------------------------------


async def test_personal_data_reaches_no_log_record_activity_or_error(
    api: respx.MockRouter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    echoing = f"Typing {FIRST} {LAST} and 03/09/1987 into the driver form"
    scenarios: list[list[httpx.Response | Exception]] = [
        [sse_response(run_events(GOOD_RESULT, echoing, f"Checking {LAST.upper()}'s record"))],
        [sse_response(run_events({"outcome": "no_quote", "reason": f"{FIRST} is too young"}))],
        [
            sse_response(
                [started(), complete(status="FAILED", error={"message": f"Crashed on {BORN}"})]
            )
        ],
        [
            httpx.Response(
                400, json={"error": {"code": "INVALID_INPUT", "message": f"bad goal {FIRST}"}}
            )
        ],
        [sse_response([started(), progress(echoing)], httpx.ReadError(f"reset {LAST}"))],
        [sse_response([frame({"type": "COMPLETE", "status": "COMPLETED", "result": [FIRST]})])],
    ]
    seen: list[str] = []
    for responses in scenarios:
        activity = Activity()
        api.routes.clear()
        api.post(ENDPOINT).mock(side_effect=responses)
        api.get(f"{API_URL}/v1/runs/run_123").mock(
            return_value=httpx.Response(
                200,
                json=run_object(
                    "FAILED",
                    error={"message": f"{FIRST} {LAST} typed", "category": "AGENT_FAILURE"},
                    steps=[{"purpose": f"Typing {BORN}"}],
                ),
            )
        )
        source = fast_source()
        try:
            await source.quote(REQUEST, "geico", new_attempt(), activity)
        except ProviderError as exc:
            seen += [str(exc), exc.message, repr(exc)]
        finally:
            await source.aclose()
        seen += activity.messages
    seen += [record.getMessage() for record in caplog.records]
    assert any("[redacted]" in text for text in seen)
    for text in seen:
        for personal in PERSONAL:
            assert personal.lower() not in text.lower(), text


# --- the client's lifetime ------------------------------------------------------------------------


async def test_one_client_is_created_lazily_reused_and_closed(
    api: respx.MockRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    api.post(ENDPOINT).mock(side_effect=[sse_response(run_events()), sse_response(run_events())])
    opened: list[httpx.AsyncClient] = []

    class RecordedClient(httpx.AsyncClient):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            opened.append(self)

    monkeypatch.setattr(httpx, "AsyncClient", RecordedClient)
    source = TinyFishQuoteSource(api_key=API_KEY, api_url=API_URL)
    assert opened == []
    await source.quote(REQUEST, "geico", new_attempt(), Activity())
    assert len(opened) == 1
    await source.quote(REQUEST, "state_farm", new_attempt(), Activity())
    assert len(opened) == 1
    (client,) = opened
    assert not client.is_closed
    await source.aclose()
    assert client.is_closed
    await source.aclose()


# --- over real sockets, against the fake TinyFish ------------------------------------------------


async def test_adapter_against_fake_tinyfish_over_real_sockets() -> None:
    scenarios = {
        "progressive": "declined",
        "state_farm": "captcha",
        "allstate": "drop",
        "liberty_mutual": "http_402",
    }
    with FakeTinyFishServer(api_key=API_KEY, scenarios=scenarios, delay_scale=0.002) as fake:
        source = TinyFishQuoteSource(
            api_key=API_KEY, api_url=fake.url, polling=Backoff(first=0.02, cap=0.05)
        )
        try:
            activity = Activity()
            quote = await source.quote(REQUEST, "geico", new_attempt(), activity)
            assert quote.source == "tinyfish"
            assert quote.deductible == 1000
            assert 80 <= quote.monthly_premium <= 230
            assert activity.messages[0] == "Navigating to https://www.geico.com/auto-insurance/"
            assert len(activity.messages) == 7

            dropped = await source.quote(REQUEST, "allstate", new_attempt(), Activity())
            outcomes: dict[str, type[ProviderError]] = {}
            for provider in ("progressive", "state_farm", "liberty_mutual"):
                with pytest.raises(ProviderError) as caught:
                    await source.quote(REQUEST, provider, new_attempt(), Activity())  # type: ignore[arg-type]
                outcomes[provider] = type(caught.value)
        finally:
            await source.aclose()
        assert outcomes == {
            "progressive": ProviderDeclined,
            "state_farm": ProviderBlocked,
            "liberty_mutual": ProviderAuth,
        }
        # The stream was cut, the run went on: read back by id, one agent run, quoted.
        assert dropped.provider == "allstate"
        assert fake.requests[0]["url"] == INSURER_START_URLS["geico"]
        assert "output_schema" in fake.requests[0]


async def test_wrong_key_and_missing_beta_against_fake_tinyfish() -> None:
    with FakeTinyFishServer(api_key="right", structured_output=False, delay_scale=0) as fake:
        wrong = TinyFishQuoteSource(api_key="wrong", api_url=fake.url)
        right = TinyFishQuoteSource(api_key="right", api_url=fake.url)
        try:
            with pytest.raises(ProviderAuth):
                await wrong.quote(REQUEST, "geico", new_attempt(), Activity())
            quote = await right.quote(REQUEST, "geico", new_attempt(), Activity())
        finally:
            await wrong.aclose()
            await right.aclose()
        assert quote.monthly_premium > 0
        assert ["output_schema" in body for body in fake.requests] == [True, False]


async def test_the_worker_retries_over_real_sockets_and_ends_in_the_last_transient_error(
    tmp_path,
) -> None:
    from datetime import timedelta

    from lib.config import settings_from_env
    from lib.models import new_run_id
    from lib.queue.messages import ProviderWorkMessage
    from lib.store.sqlite import SQLiteStore
    from lib.worker import Delivery, ProviderTask
    from lib.workflow import new_run_record

    store = SQLiteStore(str(tmp_path / "quotes.sqlite3"), ttl_seconds=7200)
    with FakeTinyFishServer(api_key=API_KEY, default_scenario="http_500", delay_scale=0) as fake:
        source = TinyFishQuoteSource(api_key=API_KEY, api_url=fake.url)
        try:
            run_id = new_run_id()
            deadline = utc_now() + timedelta(seconds=120)
            await store.create_run(new_run_record(run_id, REQUEST, ["geico"], deadline))
            work = ProviderWorkMessage(
                run_id=run_id, provider="geico", total=1, deadline=deadline, request=REQUEST
            )
            delivery = Delivery(message_id="m-1", count=1, invocation_deadline=None)
            settings = settings_from_env({"PROVIDER_TIMEOUT_SECONDS": "60"})
            await ProviderTask(store, source, settings, work, delivery).run()
            events = [e.as_dict() for e in await store.read_events(run_id, -1)]
        finally:
            await source.aclose()
            await store.aclose()
    assert len(fake.requests) == 3  # three paid attempts at most (none started: all refused)
    failure = next(e for e in events if e["type"] == "provider_error")
    assert failure["code"] == "provider_unavailable" and "HTTP 500" in failure["message"]
    retries = [
        e["message"] for e in events if e["type"] == "activity" and "attempt" in e["message"]
    ]
    assert retries == ["Retrying GEICO (attempt 2 of 3)", "Retrying GEICO (attempt 3 of 3)"]


# --- reattaching to an agent run by its id ------------------------------------------------------

RUN_URL = f"{API_URL}/v1/runs/run_123"
CANCEL_URL = f"{RUN_URL}/cancel"


async def reattach(
    api: respx.MockRouter, *answers: httpx.Response | Exception, seconds: float = 300
) -> tuple[Quote | ProviderError, Activity, respx.Route]:
    start = api.post(ENDPOINT).mock(side_effect=AssertionError("a second agent run was started"))
    poll = api.get(RUN_URL).mock(side_effect=list(answers))
    source, activity = fast_source(), Activity()
    try:
        outcome: Quote | ProviderError = await source.quote(
            REQUEST, "geico", new_attempt(seconds, agent_run_id="run_123"), activity
        )
    except ProviderError as error:
        outcome = error
    finally:
        await source.aclose()
    assert not start.called
    assert activity.agent_runs == []
    return outcome, activity, poll


def got(status: str, result: Any = None, error: Any = None, **extra: Any) -> httpx.Response:
    return httpx.Response(200, json=run_object(status, result, error, **extra))


async def test_reattach_relays_the_latest_step_then_each_new_one(api: respx.MockRouter) -> None:
    a, b, c = ({"purpose": p} for p in ("Opening the page", "Typing the ZIP", "Reading the price"))
    outcome, activity, poll = await reattach(
        api,
        got("RUNNING", steps=[a, b]),
        got("RUNNING", steps=[a, b]),
        got("RUNNING", steps=[a, b, {"screenshot": None}]),
        got("RUNNING", steps=[a, b, {"screenshot": None}, c]),
        got("COMPLETED", GOOD_RESULT, steps=[a, b, {}, c]),
    )
    assert isinstance(outcome, Quote)
    assert outcome.monthly_premium == 142.5
    assert poll.call_count == 5
    # The steps before the hand-off were relayed by the call that handed off: only the latest.
    assert activity.messages == ["Typing the ZIP", "Reading the price"]


async def test_a_run_waiting_in_tinyfishs_queue_shows_once_as_activity(
    api: respx.MockRouter,
) -> None:
    outcome, activity, _ = await reattach(
        api,
        got("PENDING", steps=[]),
        got("PENDING", steps=[]),
        got("RUNNING", steps=[{"purpose": "Opening the page"}]),
        got("COMPLETED", GOOD_RESULT),
    )
    assert isinstance(outcome, Quote)
    assert activity.messages == [
        "Waiting for TinyFish to start the web agent (queued)",
        "Opening the page",
    ]


async def test_reattach_to_a_run_without_steps_relays_nothing_but_pending(
    api: respx.MockRouter,
) -> None:
    # SDK 0.11's Run has no steps: RUNNING then shows nothing new.
    outcome, activity, _ = await reattach(
        api, got("RUNNING"), got("RUNNING"), got("COMPLETED", GOOD_RESULT)
    )
    assert isinstance(outcome, Quote)
    assert activity.messages == []


async def test_polling_backs_off_from_one_second_to_five() -> None:
    waits: list[float] = []

    async def record(seconds: float) -> None:
        waits.append(seconds)

    with respx.mock() as api:
        api.get(RUN_URL).mock(side_effect=[got("RUNNING")] * 7 + [got("COMPLETED", GOOD_RESULT)])
        source = TinyFishQuoteSource(api_key=API_KEY, api_url=API_URL, sleep=record)
        try:
            await source.quote(REQUEST, "geico", new_attempt(agent_run_id="run_123"), Activity())
        finally:
            await source.aclose()
    assert waits == pytest.approx([1.0, 1.5, 2.25, 3.375, 5.0, 5.0, 5.0])


@pytest.mark.parametrize(
    ("error", "kind", "transient", "words"),
    [
        pytest.param(
            {
                "code": "service_busy",
                "message": "Browser crashed",
                "category": "SYSTEM_FAILURE",
                "retry_after": 30,
            },
            ProviderUnavailable,
            True,
            "Browser crashed",
            id="system failure",
        ),
        pytest.param(
            {"message": "Something odd", "category": "UNKNOWN"},
            ProviderUnavailable,
            True,
            "Something odd",
            id="unknown",
        ),
        pytest.param(
            {
                "message": "The goal asks for a page that does not exist",
                "category": "AGENT_FAILURE",
            },
            ProviderAgentFailed,
            False,
            "could not finish the quote: The goal asks",
            id="agent",
        ),
        pytest.param(
            {"category": "AGENT_FAILURE"},
            ProviderAgentFailed,
            False,
            "TinyFish gave no reason",
            id="agent without message",
        ),
        pytest.param(
            {
                "code": "MAX_DURATION_EXCEEDED",
                "message": "The run reached its max_duration_seconds (60 s)",
                "category": "AGENT_FAILURE",
            },
            ProviderTimeout,
            False,
            "ran out of time",
            id="its own duration cap",
        ),
        pytest.param(
            {"message": "Out of credits", "category": "BILLING_FAILURE"},
            ProviderAuth,
            False,
            "billing",
            id="billing",
        ),
    ],
)
async def test_error_category_decides_whether_to_try_again(
    api: respx.MockRouter, error: dict[str, Any], kind: type, transient: bool, words: str
) -> None:
    outcome, _, _ = await reattach(api, got("FAILED", error=error))
    assert type(outcome) is kind
    assert isinstance(outcome, ProviderError)
    assert outcome.transient is transient
    assert words in outcome.message
    assert outcome.agent_run_id == "run_123"
    assert outcome.agent_run_finished
    if "retry_after" in error:
        assert outcome.retry_after == 30


async def test_a_run_cancelled_on_tinyfishs_side_is_not_retried(api: respx.MockRouter) -> None:
    outcome, _, _ = await reattach(api, got("CANCELLED"))
    assert isinstance(outcome, ProviderUnavailable)
    assert not outcome.transient
    assert "cancelled" in outcome.message


async def test_a_run_tinyfish_no_longer_knows_is_transient_and_over(api: respx.MockRouter) -> None:
    outcome, _, _ = await reattach(api, httpx.Response(404, json={"error": {"code": "NOT_FOUND"}}))
    assert isinstance(outcome, ProviderUnavailable)
    assert outcome.transient
    assert outcome.agent_run_id is None or outcome.agent_run_finished


async def test_a_refused_key_while_polling_leaves_the_run_to_cancel(api: respx.MockRouter) -> None:
    outcome, _, _ = await reattach(api, got("RUNNING"), api_error(401, "INVALID_API_KEY"))
    assert isinstance(outcome, ProviderAuth)
    assert outcome.agent_run_id is not None and not outcome.agent_run_finished


async def test_polling_past_the_deadline_cancels_the_run_and_times_out() -> None:
    with respx.mock() as api:
        api.get(RUN_URL).mock(return_value=got("RUNNING"))
        cancel = api.post(CANCEL_URL).mock(
            return_value=httpx.Response(200, json={"run_id": "run_123", "status": "CANCELLED"})
        )
        source = TinyFishQuoteSource(
            api_key=API_KEY, api_url=API_URL, polling=Backoff(first=0.01, cap=0.01)
        )
        try:
            with pytest.raises(ProviderTimeout) as caught:
                await source.quote(
                    REQUEST, "geico", new_attempt(0.2, agent_run_id="run_123"), Activity()
                )
        finally:
            await source.aclose()
    assert cancel.call_count == 1
    assert caught.value.agent_run_id == "run_123"
    assert caught.value.agent_run_finished


# --- cancel -------------------------------------------------------------------------------------


async def cancel_with(*answers: httpx.Response | Exception) -> respx.Route:
    with respx.mock() as api:
        route = api.post(CANCEL_URL).mock(side_effect=list(answers))
        source = fast_source()
        try:
            await source.cancel("run_123")
        finally:
            await source.aclose()
    return route


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(
            httpx.Response(
                200,
                json={
                    "run_id": "run_123",
                    "status": "CANCELLED",
                    "cancelled_at": "2026-12-01T09:00:00Z",
                    "message": None,
                },
            ),
            id="cancelled",
        ),
        pytest.param(
            httpx.Response(
                200,
                json={
                    "run_id": "run_123",
                    "status": "COMPLETED",
                    "cancelled_at": None,
                    "message": "Run already finished",
                },
            ),
            id="finished",
        ),
        pytest.param(httpx.Response(404), id="unknown"),
        pytest.param(httpx.Response(409), id="conflict"),
        pytest.param(
            httpx.Response(400, json={"error": {"message": "Run already cancelled"}}), id="already"
        ),
    ],
)
async def test_cancel_is_one_request_when_tinyfish_says_the_run_is_over(
    answer: httpx.Response,
) -> None:
    route = await cancel_with(answer)
    assert route.call_count == 1
    sent = route.calls.last.request
    assert sent.headers["x-api-key"] == API_KEY
    assert sent.content == b""


async def test_cancel_retries_transient_failures_briefly() -> None:
    route = await cancel_with(
        httpx.Response(503), httpx.ConnectError("refused"), httpx.Response(200, json={})
    )
    assert route.call_count == 3


async def test_cancel_gives_up_with_a_warning_and_never_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    route = await cancel_with(*[httpx.Response(500)] * 5)
    assert route.call_count == 3
    assert "gave up cancelling TinyFish agent run run_123" in caplog.text

    route = await cancel_with(api_error(401, "INVALID_API_KEY"))
    assert route.call_count == 1
    assert "refused to cancel agent run run_123" in caplog.text


async def test_cancel_of_a_malformed_id_sends_nothing() -> None:
    with respx.mock(assert_all_called=False) as api:
        route = api.route().mock(return_value=httpx.Response(200))
        source = fast_source()
        await source.cancel("../../v1/automation/run")
        await source.aclose()
    assert not route.called


# --- the worker's hand-off: asyncio cancellation -------------------------------------------------


class Hanging(httpx.AsyncByteStream):
    """Sends some chunks, then waits forever; records when httpx closes it."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.closed = asyncio.Event()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        await asyncio.Event().wait()

    async def aclose(self) -> None:
        self.closed.set()


async def test_cancelling_the_call_closes_the_stream_and_leaves_the_agent_run_going(
    api: respx.MockRouter,
) -> None:
    body = Hanging([started(), progress("Filling in")])
    api.post(ENDPOINT).mock(return_value=httpx.Response(200, headers=SSE_HEADERS, stream=body))
    cancel = api.post(CANCEL_URL).mock(return_value=httpx.Response(200, json={}))
    source, activity = fast_source(), Activity()
    reached = asyncio.Event()

    class Signalling(Activity):
        async def activity(self, message: str) -> None:
            await super().activity(message)
            reached.set()

    listener = Signalling()
    task = asyncio.create_task(source.quote(REQUEST, "geico", new_attempt(), listener))
    await reached.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(body.closed.wait(), 5)
    await source.aclose()
    assert listener.agent_runs == ["run_123"]
    assert not cancel.called
    assert activity.messages == []


# --- a run request whose fate is unknown: settled by the attempt's reference ----------------------


def listed(*runs: dict[str, Any]) -> httpx.Response:
    """GET /v1/runs' answer: {data, pagination}, as the SDK's RunListResponse."""
    pagination = {"total": len(runs), "has_more": False, "next_cursor": None}
    return httpx.Response(200, json={"data": list(runs), "pagination": pagination})


def attempt_run(
    attempt: AgentAttempt, status: str, run_id: str = "run_123", **extra: Any
) -> dict[str, Any]:
    """A run TinyFish lists whose goal opens with `attempt`'s reference."""
    reference = attempt_reference(REQUEST, "geico", attempt)
    goal = f"(Reference {reference}: for our records only, not part of the task.)\nGet a quote"
    return run_object(status, **extra) | {"run_id": run_id, "goal": goal}


UNKNOWN_FATES = [
    pytest.param(sse_response([b": keep-alive\n\n"]), id="stream closed before STARTED"),
    pytest.param(
        sse_response([b": keep-alive\n\n"], httpx.RemoteProtocolError("peer closed")),
        id="connection dropped before STARTED",
    ),
    pytest.param(
        sse_response([], httpx.ReadTimeout("timed out")), id="read timeout before STARTED"
    ),
    pytest.param(httpx.ReadError("reset after the request was sent"), id="read error"),
    pytest.param(httpx.Response(502, text="bad gateway"), id="502"),
    pytest.param(httpx.Response(504, text="gateway timeout"), id="504"),
]


@pytest.mark.parametrize("broken", UNKNOWN_FATES)
async def test_a_run_created_before_the_call_failed_is_adopted_never_bought_twice(
    api: respx.MockRouter, broken: httpx.Response | Exception
) -> None:
    attempt = new_attempt()
    start = api.post(ENDPOINT).mock(side_effect=[broken, AssertionError("second run")])
    lookup = api.get(RUNS_URL).mock(return_value=listed(attempt_run(attempt, "RUNNING")))
    poll = api.get(RUN_URL).mock(
        side_effect=[
            got("RUNNING", steps=[{"purpose": "Typing"}]),
            got("COMPLETED", GOOD_RESULT, num_of_steps=6),
        ]
    )
    source, activity = fast_source(), Activity()
    try:
        quote = await source.quote(REQUEST, "geico", attempt, activity)
    finally:
        await source.aclose()
    assert quote.monthly_premium == 142.5
    assert start.call_count == 1
    assert activity.agent_runs == ["run_123"]
    assert activity.messages == ["Typing"]  # the adopted run's steps are relayed
    assert activity.steps[-1] == 6
    assert poll.call_count == 2
    params = lookup.calls.last.request.url.params
    assert params["goal"] == attempt_reference(REQUEST, "geico", attempt)
    assert params["created_after"] < attempt.started_at.isoformat()


@pytest.mark.parametrize("broken", UNKNOWN_FATES)
async def test_a_lookup_that_finds_nothing_fails_the_attempt_transiently(
    api: respx.MockRouter, broken: httpx.Response | Exception
) -> None:
    start = api.post(ENDPOINT).mock(side_effect=[broken])
    lookup = api.routes["lookup"]
    error = await failure(api, broken)
    assert isinstance(error, ProviderUnavailable)
    assert error.transient and not error.same_attempt
    assert error.agent_run_id is None
    assert lookup.called
    assert start.call_count <= 1


async def test_an_answer_that_opened_is_looked_up_again_before_it_is_believed_empty(
    api: respx.MockRouter,
) -> None:
    attempt = new_attempt()
    api.post(ENDPOINT).mock(side_effect=[sse_response([b": keep-alive\n\n"])])
    lookup = api.get(RUNS_URL).mock(side_effect=[listed(), listed(attempt_run(attempt, "PENDING"))])
    api.get(RUN_URL).mock(side_effect=[got("PENDING"), got("COMPLETED", GOOD_RESULT)])
    source, activity = fast_source(), Activity()
    try:
        await source.quote(REQUEST, "geico", attempt, activity)
    finally:
        await source.aclose()
    assert lookup.call_count == 2
    assert activity.agent_runs == ["run_123"]
    assert activity.messages == ["Waiting for TinyFish to start the web agent (queued)"]


@pytest.mark.parametrize(
    "answers",
    [
        pytest.param([httpx.Response(503)] * 3, id="503"),
        pytest.param([httpx.ConnectError("refused")] * 3, id="unreachable"),
        pytest.param([httpx.Response(200, json={"nope": 1})] * 3, id="no data"),
    ],
)
async def test_a_lookup_that_cannot_settle_asks_for_the_same_attempt_again(
    api: respx.MockRouter, answers: list[httpx.Response | Exception]
) -> None:
    attempt = new_attempt()
    start = api.post(ENDPOINT).mock(
        side_effect=[httpx.Response(500), AssertionError("a second run while the first may exist")]
    )
    api.get(RUNS_URL).mock(side_effect=answers)
    source = fast_source()
    try:
        with pytest.raises(ProviderUnavailable) as caught:
            await source.quote(REQUEST, "geico", attempt, Activity())
    finally:
        await source.aclose()
    assert caught.value.same_attempt
    assert caught.value.transient
    assert caught.value.agent_run_id is None
    assert start.call_count == 1


async def test_the_same_attempt_resumed_looks_up_before_it_creates(api: respx.MockRouter) -> None:
    now = utc_now()
    resumed = AgentAttempt(
        number=2, started_at=now - timedelta(seconds=30), deadline=now + timedelta(seconds=300)
    )
    start = api.post(ENDPOINT).mock(side_effect=AssertionError("a second agent run"))
    api.get(RUNS_URL).mock(
        side_effect=[httpx.Response(503), listed(attempt_run(resumed, "COMPLETED"))]
    )
    api.get(RUN_URL).mock(side_effect=[got("COMPLETED", GOOD_RESULT)])
    source, activity = fast_source(), Activity()
    try:
        quote = await source.quote(REQUEST, "geico", resumed, activity)
    finally:
        await source.aclose()
    assert quote.provider == "geico"
    assert not start.called
    assert activity.agent_runs == ["run_123"]


async def test_a_resumed_attempt_whose_lookup_cannot_settle_creates_nothing(
    api: respx.MockRouter,
) -> None:
    now = utc_now()
    resumed = AgentAttempt(
        number=1, started_at=now - timedelta(seconds=30), deadline=now + timedelta(seconds=300)
    )
    start = api.post(ENDPOINT).mock(side_effect=AssertionError("a run bought blind"))
    api.get(RUNS_URL).mock(side_effect=[httpx.Response(502)] * 3)
    source = fast_source()
    try:
        with pytest.raises(ProviderUnavailable) as caught:
            await source.quote(REQUEST, "geico", resumed, Activity())
    finally:
        await source.aclose()
    assert caught.value.same_attempt
    assert not start.called


async def test_of_two_runs_of_one_attempt_the_finished_one_is_adopted_the_other_cancelled(
    api: respx.MockRouter,
) -> None:
    attempt = new_attempt()
    api.post(ENDPOINT).mock(side_effect=[httpx.Response(503)])
    api.get(RUNS_URL).mock(
        return_value=listed(
            attempt_run(attempt, "RUNNING", run_id="run_later"),
            attempt_run(attempt, "COMPLETED"),
            run_object("RUNNING") | {"run_id": "someone_elses", "goal": "another reference"},
        )
    )
    api.get(RUN_URL).mock(side_effect=[got("COMPLETED", GOOD_RESULT)])
    cancel = api.post(f"{API_URL}/v1/runs/run_later/cancel").mock(
        return_value=httpx.Response(200, json={"run_id": "run_later", "status": "CANCELLED"})
    )
    strangers = api.post(f"{API_URL}/v1/runs/someone_elses/cancel")
    source, activity = fast_source(), Activity()
    try:
        await source.quote(REQUEST, "geico", attempt, activity)
    finally:
        await source.aclose()
    assert activity.agent_runs == ["run_123"]
    assert cancel.call_count == 1
    assert not strangers.called


async def test_a_request_that_never_left_needs_no_lookup(api: respx.MockRouter) -> None:
    lookup = api.routes["lookup"]
    error = await failure(api, httpx.ConnectError("connection refused"))
    assert error.transient and not error.same_attempt
    assert not lookup.called


@pytest.mark.parametrize(
    ("answer", "wait"),
    [
        pytest.param(api_error(429, "RATE_LIMIT_EXCEEDED", **{"Retry-After": "2.2"}), 3, id="hdr"),
        pytest.param(
            httpx.Response(429, json={"error": {"code": "BUSY", "message": "x", "retry_after": 7}}),
            7,
            id="body",
        ),
        pytest.param(api_error(429, "RATE_LIMIT_EXCEEDED"), 5, id="unsaid"),
    ],
)
async def test_a_429_is_provider_busy_with_whole_seconds_and_no_lookup(
    api: respx.MockRouter, answer: httpx.Response, wait: int
) -> None:
    lookup = api.routes["lookup"]
    error = await failure(api, answer)
    assert isinstance(error, ProviderBusy)
    assert error.retry_after == wait
    assert error.transient and not error.same_attempt
    assert not lookup.called


async def test_a_403_to_output_schema_alone_keeps_every_cap(api: respx.MockRouter) -> None:
    refused = {"error": {"code": "FORBIDDEN", "message": "output_schema requires beta access"}}
    route = api.post(ENDPOINT).mock(
        side_effect=[httpx.Response(403, json=refused), sse_response(run_events())]
    )
    source = fast_source(max_steps=40)
    try:
        await source.quote(REQUEST, "geico", new_attempt(), Activity())
    finally:
        await source.aclose()
    bodies = [json.loads(call.request.content) for call in route.calls]
    assert ["output_schema" in b for b in bodies] == [True, False]
    assert [sorted(b["agent_config"]) for b in bodies] == [
        ["max_duration_seconds", "max_steps"]
    ] * 2


async def test_a_resumed_attempt_past_its_deadline_cancels_the_run_it_never_saw(
    api: respx.MockRouter,
) -> None:
    now = utc_now()
    late = AgentAttempt(number=1, started_at=now - timedelta(seconds=200), deadline=now)
    start = api.post(ENDPOINT).mock(side_effect=AssertionError("a run bought past the deadline"))
    api.get(RUNS_URL).mock(return_value=listed(attempt_run(late, "PENDING")))
    cancel = api.post(CANCEL_URL).mock(
        return_value=httpx.Response(200, json={"run_id": "run_123", "status": "CANCELLED"})
    )
    source = fast_source()
    try:
        with pytest.raises(ProviderTimeout) as caught:
            await source.quote(REQUEST, "geico", late, Activity())
    finally:
        await source.aclose()
    assert not start.called
    assert cancel.call_count == 1
    assert caught.value.agent_run_finished
