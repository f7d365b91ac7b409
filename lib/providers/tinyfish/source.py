"""The TinyFish quote source: one attempt is one agent run, started once and followed to its end
by whichever invocation holds the attempt.

- New attempt (`attempt.agent_run_id` None): POST run-sse with the goal (lib.providers.tinyfish.
  goal), the output schema and a cost cap (`agent_config.max_duration_seconds` = the attempt's
  whole seconds left, at most TinyFish's 600 s platform limit; `max_steps` = TINYFISH_MAX_STEPS).
  STARTED's run id goes to `listener.agent_run_started` before anything else; PROGRESS purposes
  become activity; COMPLETE ends the attempt. If the stream drops (or falls silent) after
  STARTED, no second run is started: the source polls the run instead.
- Reattach (`attempt.agent_run_id` set, after a hand-off or a dead worker): GET /v1/runs/{id}
  with backoff (1 s growing to 5 s) until COMPLETED, FAILED or CANCELLED. PENDING (waiting in
  TinyFish's own queue) shows as one activity message. The API reference documents a `steps`
  array on the run (the SDK 0.11 `Run` model has none): where present, steps not yet seen are
  relayed — on a reattach only the latest, the earlier ones having been relayed before.
- A new attempt begun more than 2 s ago may have started its run in a call that died between
  STARTED and storing the id: each goal carries the attempt's reference (a digest), and before
  starting, the source looks for a run with it (`GET /v1/runs?goal=…`) and takes that one.
- Steps (what TinyFish bills) go to `listener.agent_steps`: each PROGRESS on the stream is one;
  a run read back gives TinyFish's own count (`num_of_steps`, else the `steps` array's length).
- At `attempt.deadline` the source cancels the agent run and raises ProviderTimeout.
- Cancelling the awaiting coroutine (the worker's hand-off) closes the HTTP stream at once and
  leaves the agent run going, for the next call with the same attempt.
- 403 to a run carrying an optional field (`output_schema` is a beta feature; `agent_config` may
  be missing from an account too): that field is dropped — the one the error names, else
  output_schema first — for this request and every later one, and the run asked for again. The
  goal spells out the JSON wanted, so quotes still parse without the schema.

The driver's personal data leaves only inside the goal; it is never logged nor put in an
exception, and text coming back from the agent is masked (goal.redactor) before it is used.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

import httpx
from httpx_sse import SSEError

from lib.config import DEFAULT_TINYFISH_API_URL
from lib.models import PROVIDER_NAMES, ProviderId, Quote, QuoteRequest, QuoteSourceName, utc_now
from lib.providers.backoff import CANCELLING, POLLING, Backoff
from lib.providers.base import (
    AgentAttempt,
    AttemptListener,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
)
from lib.providers.tinyfish.client import (
    DEFAULT_TIMEOUT,
    RunRefused,
    TinyFishClient,
    is_agent_run_id,
)
from lib.providers.tinyfish.errors import (
    error_from_failed_run,
    error_from_response,
    retry_after_seconds,
)
from lib.providers.tinyfish.goal import INSURER_START_URLS, build_goal, redactor
from lib.providers.tinyfish.result import (
    MAX_ACTIVITY_CHARS,
    QUOTE_OUTPUT_SCHEMA,
    clip,
    quote_from_result,
)

logger = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]

# No agent run is worth starting with less time than this left in the attempt.
MIN_AGENT_SECONDS = 15
# TinyFish's own limit on one agent run.
MAX_AGENT_SECONDS = 600
TERMINAL_STATUSES = frozenset({"COMPLETED", "FAILED", "CANCELLED"})
# Fields of the run request an account may lack (403 FORBIDDEN), in the order they are dropped.
OPTIONAL_FIELDS = ("output_schema", "agent_config")
_FIELD_WORDS = {
    "output_schema": ("output_schema", "structured output"),
    "agent_config": ("agent_config", "max_steps", "max_duration"),
}
CANCEL_TRIES = 3
PENDING_MESSAGE = "Waiting for TinyFish to start the web agent (queued)"
# A new attempt begun longer ago than this may have started its run in a call that died before
# the id was stored: look for that run (by the reference in its goal) before starting one.
LOOK_FOR_EARLIER_RUN_AFTER_SECONDS = 2.0


def attempt_reference(request: QuoteRequest, provider: ProviderId, attempt: AgentAttempt) -> str:
    """A stable mark for one attempt, put in its goal (a digest: no personal data)."""
    seed = "\x1f".join(
        [request.vin, request.zip, provider, str(attempt.number), attempt.started_at.isoformat()]
    )
    return "qr-" + hashlib.sha256(seed.encode()).hexdigest()[:24]


@dataclass(slots=True)
class _AgentRun:
    """What one call knows about its attempt's agent run."""

    request: QuoteRequest
    provider: ProviderId
    listener: AttemptListener
    agent_run_id: str | None
    redact: Callable[[str], str] = field(init=False)
    progress_relayed: int = 0

    def __post_init__(self) -> None:
        self.redact = redactor(self.request)

    @property
    def insurer(self) -> str:
        return PROVIDER_NAMES[self.provider]

    async def relay(self, text: Any) -> None:
        if isinstance(text, str) and text.strip():
            await self.listener.activity(clip(self.redact(text), MAX_ACTIVITY_CHARS))


class TinyFishQuoteSource:
    """Quotes read off the insurers' own sites by TinyFish web agents; see the module docstring."""

    name: QuoteSourceName = "tinyfish"
    billable = True

    def __init__(
        self,
        *,
        api_key: str,
        api_url: str = DEFAULT_TINYFISH_API_URL,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
        browser_profile: Literal["lite", "stealth"] = "stealth",
        proxy_country: str | None = "US",
        max_steps: int | None = None,
        polling: Backoff = POLLING,
        min_agent_seconds: int = MIN_AGENT_SECONDS,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._client = TinyFishClient(
            api_key=api_key, api_url=api_url, timeout=timeout, transport=transport
        )
        self._browser_profile = browser_profile
        self._proxy_country = proxy_country
        self._max_steps = max_steps
        self._polling = polling
        self._min_agent_seconds = min_agent_seconds
        self._sleep = sleep
        self._unsupported: set[str] = set()

    def __repr__(self) -> str:
        return f"TinyFishQuoteSource(api_url={self._client.base_url!r})"

    def run_body(
        self,
        request: QuoteRequest,
        provider: ProviderId,
        *,
        max_duration_seconds: int,
        reference: str | None = None,
    ) -> dict[str, Any]:
        """The run request: where to start, the goal, and what this account supports."""
        body: dict[str, Any] = {
            "url": INSURER_START_URLS[provider],
            "goal": build_goal(request, provider, reference=reference),
            "browser_profile": self._browser_profile,
        }
        if self._proxy_country:
            body["proxy_config"] = {"enabled": True, "country_code": self._proxy_country}
        if "output_schema" not in self._unsupported:
            body["output_schema"] = QUOTE_OUTPUT_SCHEMA
        if "agent_config" not in self._unsupported:
            caps: dict[str, int] = {"max_duration_seconds": max_duration_seconds}
            if self._max_steps is not None:
                caps["max_steps"] = self._max_steps
            body["agent_config"] = caps
        return body

    async def quote(
        self,
        request: QuoteRequest,
        provider: ProviderId,
        attempt: AgentAttempt,
        listener: AttemptListener,
    ) -> Quote:
        run = _AgentRun(request, provider, listener, attempt.agent_run_id)
        try:
            async with asyncio.timeout(max(attempt.remaining_seconds(), 0.0)) as budget:
                if run.agent_run_id is None:
                    quote = await self._start(run, attempt)
                    if quote is not None:
                        return quote
                    return await self._poll(run, relayed=run.progress_relayed)
                return await self._poll(run, relayed=None)
        except TimeoutError:
            if not budget.expired():
                raise
            error = ProviderTimeout(
                f"{run.insurer} gave no quote before the attempt's deadline",
                agent_run_id=run.agent_run_id,
            )
            if run.agent_run_id is None:
                error.agent_run_finished = True
            else:
                error.agent_run_finished = await self._cancel_run(run.agent_run_id)
            raise error from None
        except ProviderError as error:
            if error.agent_run_id is None:
                error.agent_run_id = run.agent_run_id
            raise

    async def _start(self, run: _AgentRun, attempt: AgentAttempt) -> Quote | None:
        """Starts the attempt's agent run and follows its stream: the quote at COMPLETE, or None
        when the stream ended after STARTED without COMPLETE (the run goes on: poll it)."""
        reference = attempt_reference(run.request, run.provider, attempt)
        if await self._reattach_to_earlier_run(run, attempt, reference):
            return None
        seconds = min(attempt.whole_seconds_left(), MAX_AGENT_SECONDS)
        if seconds < self._min_agent_seconds:
            raise ProviderTimeout(
                f"Too little time left ({max(seconds, 0)} s) to start {run.insurer}'s web agent"
            )
        while True:
            body = self.run_body(
                run.request, run.provider, max_duration_seconds=seconds, reference=reference
            )
            try:
                async with self._client.run_events(body) as events:
                    async for event in events:
                        quote = await self._on_event(run, event)
                        if quote is not None:
                            return quote
            except RunRefused as refused:
                dropped = self._drop_unsupported_field(refused.response, body)
                if dropped is None:
                    error = error_from_response(refused.response)
                    logger.warning("TinyFish run for %s refused: %s", run.provider, error.message)
                    raise error from None
                continue
            except (httpx.TransportError, SSEError) as exc:
                if run.agent_run_id is None:
                    logger.warning(
                        "TinyFish stream for %s broke before STARTED: %s",
                        run.provider,
                        type(exc).__name__,
                    )
                    raise ProviderUnavailable(
                        f"TinyFish's stream broke off before {run.insurer}'s run started"
                    ) from None
                logger.info(
                    "TinyFish stream of agent run %s (%s) broke (%s); polling the run instead",
                    run.agent_run_id,
                    run.provider,
                    type(exc).__name__,
                )
                return None
            if run.agent_run_id is None:
                raise ProviderUnavailable(
                    f"TinyFish's stream for {run.insurer} ended before the run started"
                )
            logger.info(
                "TinyFish stream of agent run %s (%s) ended before COMPLETE; polling the run",
                run.agent_run_id,
                run.provider,
            )
            return None

    async def _reattach_to_earlier_run(
        self, run: _AgentRun, attempt: AgentAttempt, reference: str
    ) -> bool:
        """For an attempt begun a while ago: finds the run an earlier call started (it died
        between STARTED and storing the id) and takes it as this attempt's. One GET; when it
        cannot be asked, a new run is started as before."""
        if (
            attempt.remaining_seconds() < 0
            or (utc_now() - attempt.started_at).total_seconds() < LOOK_FOR_EARLIER_RUN_AFTER_SECONDS
        ):
            return False
        since = (attempt.started_at - timedelta(minutes=1)).isoformat().replace("+00:00", "Z")
        try:
            response = await self._client.find_runs(goal_contains=reference, created_after=since)
            found = response.json().get("data") if response.is_success else None
        except (httpx.TransportError, ValueError, AttributeError) as exc:
            logger.info("could not look for an earlier agent run (%s)", type(exc).__name__)
            return False
        for earlier in found if isinstance(found, list) else []:
            agent_run_id = earlier.get("run_id") if isinstance(earlier, dict) else None
            goal = earlier.get("goal") if isinstance(earlier, dict) else None
            if is_agent_run_id(agent_run_id) and isinstance(goal, str) and reference in goal:
                assert isinstance(agent_run_id, str)
                logger.warning(
                    "attempt %d for %s had started agent run %s without storing it; reattaching",
                    attempt.number,
                    run.provider,
                    agent_run_id,
                )
                run.agent_run_id = agent_run_id
                await run.listener.agent_run_started(agent_run_id)
                return True
        return False

    async def _on_event(self, run: _AgentRun, event: dict[str, Any]) -> Quote | None:
        kind = event.get("type")
        if kind == "STARTED":
            agent_run_id = event.get("run_id") or event.get("runId")
            if run.agent_run_id is None and is_agent_run_id(agent_run_id):
                assert isinstance(agent_run_id, str)
                run.agent_run_id = agent_run_id
                logger.info("TinyFish agent run %s started for %s", agent_run_id, run.provider)
                await run.listener.agent_run_started(agent_run_id)
        elif kind == "PROGRESS":
            await run.relay(event.get("purpose"))
            run.progress_relayed += 1
            run.listener.agent_steps(run.progress_relayed)  # counted from the run's start
        elif kind == "COMPLETE":
            result = event["result"] if "result" in event else event.get("resultJson")
            return self._finish(run, event.get("status"), result, event.get("error"))
        # STREAMING_URL is not relayed: whoever opens it watches the driver's data being typed.
        return None

    async def _poll(self, run: _AgentRun, *, relayed: int | None) -> Quote:
        """Reads the agent run until it is over. `relayed`: how many of its steps were already
        relayed (None: unknown, a reattach — then only the latest step is relayed first)."""
        assert run.agent_run_id is not None
        reads, said_pending = 0, False
        while True:
            reads += 1
            wait = self._polling.wait(reads)
            try:
                response = await self._client.get_run(run.agent_run_id)
            except httpx.TransportError as exc:
                logger.info(
                    "reading TinyFish agent run %s failed (%s); trying again",
                    run.agent_run_id,
                    type(exc).__name__,
                )
            else:
                view = self._run_view(run, response)
                if view is not None:
                    status = str(view.get("status") or "").upper()
                    if status in TERMINAL_STATUSES:
                        self._report_steps(run, view)
                        return self._finish(run, status, view.get("result"), view.get("error"))
                    if status == "PENDING" and not said_pending:
                        said_pending = True
                        await run.listener.activity(PENDING_MESSAGE)
                    relayed = await self._relay_steps(run, view.get("steps"), relayed)
                    self._report_steps(run, view)
                else:
                    hint = retry_after_seconds(response.headers.get("retry-after"))
                    wait = max(wait, min(hint or 0.0, 60.0))
            await self._sleep(wait)

    def _run_view(self, run: _AgentRun, response: httpx.Response) -> dict[str, Any] | None:
        """The run object of a GET, None for an answer worth asking again; raises for the rest."""
        if response.status_code == 404:
            unknown = ProviderUnavailable(
                f"TinyFish no longer knows {run.insurer}'s agent run",
                agent_run_id=run.agent_run_id,
            )
            unknown.agent_run_finished = True
            raise unknown
        if not response.is_success:
            error = error_from_response(response, action="reading the agent run")
            if not error.transient:
                raise error
            logger.info("reading TinyFish agent run %s: %s", run.agent_run_id, error.message)
            return None
        try:
            view = response.json()
        except ValueError:
            view = None
        if not isinstance(view, dict):
            logger.info("TinyFish agent run %s read back as no object", run.agent_run_id)
            return None
        return view

    @staticmethod
    def _report_steps(run: _AgentRun, view: dict[str, Any]) -> None:
        """The run's step count as the API reads it back: `num_of_steps` where given (the SDK's
        finished-run field), else the documented `steps` array's length."""
        count, steps = view.get("num_of_steps"), view.get("steps")
        if type(count) is int and count >= 0:
            run.listener.agent_steps(count)
        elif isinstance(steps, list):
            run.listener.agent_steps(len(steps))

    async def _relay_steps(self, run: _AgentRun, steps: Any, relayed: int | None) -> int | None:
        if not isinstance(steps, list):
            return relayed
        texts = [_step_text(step) for step in steps]
        fresh = texts[-1:] if relayed is None else texts[relayed:]
        for text in fresh:
            await run.relay(text)
        return len(texts)

    def _finish(self, run: _AgentRun, status: Any, result: Any, error: Any) -> Quote:
        """The quote of a finished run, or the ProviderError it ended in (the run is over)."""
        status_text = str(status or "").upper()
        logger.info(
            "TinyFish agent run %s for %s finished: %s",
            run.agent_run_id,
            run.provider,
            status_text or "?",
        )
        try:
            if status_text == "COMPLETED":
                return quote_from_result(result, run.request, run.provider, run.redact)
            raise error_from_failed_run(status_text, error, run.provider, run.redact)
        except ProviderError as failure:
            failure.agent_run_id = run.agent_run_id
            failure.agent_run_finished = True
            raise

    def _drop_unsupported_field(self, response: httpx.Response, body: dict[str, Any]) -> str | None:
        """On a 403 to a request carrying optional fields, the field to drop (remembered)."""
        present = [name for name in OPTIONAL_FIELDS if name in body]
        if response.status_code != 403 or not present:
            return None
        text = response.text.lower()
        named = [n for n in present if any(word in text for word in _FIELD_WORDS[n])]
        dropped = (named or present)[0]
        self._unsupported.add(dropped)
        logger.warning(
            "TinyFish answered 403 to a run with %s; asking again without it (this account may "
            "lack the feature)%s",
            dropped,
            "; agent runs are now capped only by TinyFish's own limits and our cancel at the "
            "attempt's deadline"
            if dropped == "agent_config"
            else "",
        )
        return dropped

    async def cancel(self, agent_run_id: str) -> None:
        await self._cancel_run(agent_run_id)

    async def _cancel_run(self, agent_run_id: str) -> bool:
        """POST .../cancel with a short bounded retry; True when TinyFish says the run is over
        (cancelled now, or already finished, or unknown to it). Never raises but cancellation."""
        if not is_agent_run_id(agent_run_id):
            logger.warning(
                "not cancelling agent run with a malformed id (%d chars)", len(agent_run_id)
            )
            return False
        for attempt in range(1, CANCEL_TRIES + 1):
            hint: float | None = None
            try:
                response = await self._client.cancel_run(agent_run_id)
            except httpx.TransportError as exc:
                problem = type(exc).__name__
            else:
                status = response.status_code
                if response.is_success or status in (404, 409) or _already_over(response):
                    logger.info("TinyFish agent run %s cancelled (HTTP %d)", agent_run_id, status)
                    return True
                problem = f"HTTP {status}"
                if not (status in (408, 429) or status >= 500):
                    logger.warning(
                        "TinyFish refused to cancel agent run %s (%s)", agent_run_id, problem
                    )
                    return False
                hint = retry_after_seconds(response.headers.get("retry-after"))
            if attempt < CANCEL_TRIES:
                wait = CANCELLING.wait(attempt)
                await self._sleep(min(max(wait, hint or 0.0), CANCELLING.cap))
        logger.warning(
            "gave up cancelling TinyFish agent run %s after %d tries (%s); it ends by its own "
            "max_duration_seconds cap",
            agent_run_id,
            CANCEL_TRIES,
            problem,
        )
        return False

    async def aclose(self) -> None:
        await self._client.aclose()

    async def read_back(
        self,
        request: QuoteRequest,
        provider: ProviderId,
        attempt: AgentAttempt,
        listener: AttemptListener,
    ) -> Quote | None:
        """One GET of the attempt's agent run: its quote if TinyFish finished it COMPLETED with
        one (the last look before its provider is declared out of time), else None."""
        if attempt.agent_run_id is None:
            return None
        run = _AgentRun(request, provider, listener, attempt.agent_run_id)
        try:
            view = self._run_view(run, await self._client.get_run(attempt.agent_run_id))
            if view is None or str(view.get("status") or "").upper() != "COMPLETED":
                return None
            self._report_steps(run, view)
            return self._finish(run, "COMPLETED", view.get("result"), view.get("error"))
        except (httpx.HTTPError, ProviderError):
            return None


def _step_text(step: Any) -> str | None:
    if isinstance(step, str):
        return step
    if isinstance(step, dict):
        for key in ("purpose", "description", "action", "summary"):
            if isinstance(step.get(key), str):
                return str(step[key])
    return None


def _already_over(response: httpx.Response) -> bool:
    """A 4xx whose body says the run already finished (the cancel is then a success)."""
    return response.status_code in (400, 422) and "already" in response.text.lower()
