"""The TinyFish quote source: one attempt is one agent run, started once and followed to its end
by whichever invocation holds the attempt.

- New attempt (`attempt.agent_run_id` None): POST run-sse with the goal (lib.providers.tinyfish.
  goal), the output schema and a cost cap (`agent_config.max_duration_seconds` = the attempt's
  whole seconds left, at most TinyFish's 600 s platform limit, on every request; `max_steps` =
  TINYFISH_MAX_STEPS). STARTED's run id goes to `listener.agent_run_started` before anything
  else; PROGRESS purposes become activity; COMPLETE ends the attempt. If the stream drops (or
  falls silent) after STARTED, no second run is started: the source polls the run instead.
- No orphan: TinyFish has no idempotency key, so a run request whose fate is unknown (the stream
  broke or closed before STARTED, a 408/5xx answer, no STARTED within `started_patience` — the
  run may wait PENDING in TinyFish's queue at the account's cap) is settled by looking the run up
  by the attempt's reference (`GET /v1/runs?goal=<reference>&created_after=…`) before anything
  else: a run found is adopted (reported to `listener.agent_run_started`, polled by id, its steps
  relayed; a queued one shows as activity), any other run of the attempt cancelled; a new run is
  asked for only in a later call, and only when the lookup said there is none. A lookup that
  cannot be answered raises a transient ProviderUnavailable with `same_attempt` set: the caller
  must retry the same attempt — the same `number` and `started_at` (the reference is their
  digest), no id — never a new one; that call looks the run up again before asking for one.
  A request never sent (connection refused) and a refusal (4xx, 429) created nothing and need
  no lookup.
- 429 to the run request: ProviderBusy with TinyFish's Retry-After (no run was created).
- Reattach (`attempt.agent_run_id` set, after a hand-off or a dead worker): GET /v1/runs/{id}
  with backoff (1 s growing to 5 s) until COMPLETED, FAILED or CANCELLED. PENDING (waiting in
  TinyFish's own queue) shows as one activity message. The API reference documents a `steps`
  array on the run (the SDK 0.11 `Run` model has none): where present, steps not yet seen are
  relayed — on a reattach only the latest, the earlier ones having been relayed before.
- A new attempt begun more than 2 s ago may have started its run in a call that died (or was
  handed off) before the id was stored: each goal opens with the attempt's reference (a digest),
  and before starting, the source looks for a run with it and adopts that one.
- Steps (what TinyFish bills) go to `listener.agent_steps`: each PROGRESS on the stream is one;
  a run read back gives TinyFish's own count (`num_of_steps`, else the `steps` array's length).
- At `attempt.deadline` the source cancels the agent run and raises ProviderTimeout; a run asked
  for whose id never came is looked up by reference and cancelled too.
- Cancelling the awaiting coroutine (the worker's hand-off) closes the HTTP stream at once and
  leaves the agent run going, for the next call with the same attempt.
- 403 to a run carrying a beta-gated field (`output_schema`; `agent_config.max_steps` and
  `agent_config.mode`): that field alone is dropped — the one the error names, else
  output_schema first — for this request and every later one, and the run asked for again.
  `max_duration_seconds` is not gated and is never dropped. The goal spells out the JSON
  wanted, so quotes still parse without the schema.

The driver's personal data leaves only inside the goal; it is never logged nor put in an
exception, and text coming back from the agent is masked (goal.redactor) before it is used.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, timedelta
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
# Beta-gated parts of the run request (403 without access), in the order they are dropped when
# the refusal names none; the duration cap is not gated and is never dropped.
GATED_FIELDS = ("output_schema", "max_steps", "mode")
_GATED_WORDS = {
    "output_schema": re.compile(r"output_schema|structured output", re.IGNORECASE),
    "max_steps": re.compile(r"max_steps", re.IGNORECASE),
    "mode": re.compile(r"\bmode\b", re.IGNORECASE),
}
CANCEL_TRIES = 3
PENDING_MESSAGE = "Waiting for TinyFish to start the web agent (queued)"
# A new run's stream may say nothing until TinyFish starts it (PENDING in its queue at the
# account's cap): past this, the run is looked up by reference and followed by id instead.
STARTED_PATIENCE_SECONDS = 10.0
# Tries at the lookup by reference before the attempt is left for the caller to retry.
LOOKUP_TRIES = 3
# A stream that opened means TinyFish took the request: an empty lookup is asked again this many
# times before it is believed (a run just created may not be listed at once).
LOOKUP_TRIES_AFTER_OPENED = 3
# Bound on the lookup-and-cancel of a run whose id never came, once the attempt's time is over.
CLEANUP_SECONDS = 5.0
# Whichever of an attempt's runs is adopted: a finished quote first, then the furthest along.
_ADOPTION_ORDER = {"COMPLETED": 0, "RUNNING": 1, "PENDING": 2}
# A new attempt begun longer ago than this may have started its run in a call that died before
# the id was stored: look for that run (by the reference in its goal) before starting one.
LOOK_FOR_EARLIER_RUN_AFTER_SECONDS = 2.0


def attempt_reference(request: QuoteRequest, provider: ProviderId, attempt: AgentAttempt) -> str:
    """A stable mark for one attempt, put in its goal (a digest: no personal data)."""
    # Milliseconds in UTC: the same instant reads back the same from either store.
    started = attempt.started_at.astimezone(UTC).isoformat(timespec="milliseconds")
    seed = "\x1f".join([request.vin, request.zip, provider, str(attempt.number), started])
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
    # Steps of the run already relayed when polling begins (None: unknown, relay the latest).
    poll_from: int | None = 0
    # A run request went out whose run may exist though its id never came.
    asked_for_run: bool = False

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
        started_patience: float = STARTED_PATIENCE_SECONDS,
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
        self._started_patience = started_patience
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
        caps: dict[str, int] = {"max_duration_seconds": max_duration_seconds}
        if self._max_steps is not None and "max_steps" not in self._unsupported:
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
        # A resumed attempt with no id may have a run an earlier call asked for.
        run.asked_for_run = run.agent_run_id is None and self._begun_earlier(attempt)
        try:
            if attempt.remaining_seconds() <= 0:
                raise await self._out_of_time(run, attempt)
            async with asyncio.timeout(attempt.remaining_seconds()) as budget:
                if run.agent_run_id is None:
                    quote = await self._start(run, attempt)
                    if quote is not None:
                        return quote
                    return await self._poll(run, relayed=run.poll_from)
                return await self._poll(run, relayed=None)
        except TimeoutError:
            if not budget.expired():
                raise
            raise await self._out_of_time(run, attempt) from None
        except ProviderError as error:
            if error.agent_run_id is None:
                error.agent_run_id = run.agent_run_id
            raise

    async def _out_of_time(self, run: _AgentRun, attempt: AgentAttempt) -> ProviderTimeout:
        """The attempt's deadline passed: its agent run (known or not) is cancelled."""
        error = ProviderTimeout(
            f"{run.insurer} gave no quote before the attempt's deadline",
            agent_run_id=run.agent_run_id,
        )
        if run.agent_run_id is not None:
            error.agent_run_finished = await self._cancel_run(run.agent_run_id)
        else:
            error.agent_run_finished = await self._cancel_unseen_runs(run, attempt)
        return error

    async def _start(self, run: _AgentRun, attempt: AgentAttempt) -> Quote | None:
        """Starts the attempt's agent run (or adopts the one an earlier call started) and follows
        its stream: the quote at COMPLETE, or None when the run is to be polled by id."""
        reference = attempt_reference(run.request, run.provider, attempt)
        since = _since(attempt)
        # A call that died (or was handed off) before the id was stored may have started it.
        if run.asked_for_run and await self._adopt_by_reference(
            run, reference, since, relayed=None
        ):
            logger.warning(
                "attempt %d for %s had started agent run %s without storing it; reattaching",
                attempt.number,
                run.provider,
                run.agent_run_id,
            )
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
            opened = False
            try:
                run.asked_for_run = True
                async with asyncio.timeout(self._started_patience) as patience:
                    async with self._client.run_events(body) as events:
                        opened = True
                        async for event in events:
                            if event.get("type") == "STARTED":
                                # Before the id is stored: the store write is not to be cut.
                                patience.reschedule(None)
                            quote = await self._on_event(run, event)
                            if quote is not None:
                                return quote
            except RunRefused as refused:
                response = refused.response
                if self._drop_gated_field(response, body):
                    continue
                error = error_from_response(response)
                logger.warning("TinyFish run for %s refused: %s", run.provider, error.message)
                if not (response.status_code == 408 or response.status_code >= 500):
                    run.asked_for_run = False  # a refusal: no run was created
                    raise error from None
                # TinyFish may have created the run before it failed to answer.
                fate_unknown: ProviderError = error
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                run.asked_for_run = False  # the request never left: no run was created
                raise ProviderUnavailable(
                    f"TinyFish could not be reached to start {run.insurer}'s web agent "
                    f"({type(exc).__name__})"
                ) from None
            except (httpx.TransportError, SSEError, TimeoutError) as exc:
                if isinstance(exc, TimeoutError) and not patience.expired():
                    raise
                if run.agent_run_id is not None:
                    logger.info(
                        "TinyFish stream of agent run %s (%s) broke (%s); polling the run instead",
                        run.agent_run_id,
                        run.provider,
                        type(exc).__name__,
                    )
                    run.poll_from = run.progress_relayed
                    return None
                what = (
                    "said nothing"
                    if isinstance(exc, TimeoutError)
                    else f"broke off ({type(exc).__name__})"
                )
                logger.warning(
                    "TinyFish stream for %s %s before STARTED; looking the run up",
                    run.provider,
                    what,
                )
                fate_unknown = ProviderUnavailable(
                    f"TinyFish's stream {what} before {run.insurer}'s run started"
                )
            else:
                if run.agent_run_id is not None:
                    logger.info(
                        "TinyFish stream of agent run %s (%s) ended before COMPLETE; polling",
                        run.agent_run_id,
                        run.provider,
                    )
                    run.poll_from = run.progress_relayed
                    return None
                logger.warning(
                    "TinyFish stream for %s ended before STARTED; looking the run up", run.provider
                )
                fate_unknown = ProviderUnavailable(
                    f"TinyFish's stream for {run.insurer} ended before the run started"
                )
            tries = LOOKUP_TRIES_AFTER_OPENED if opened else 1
            if await self._adopt_by_reference(run, reference, since, relayed=0, tries=tries):
                return None
            run.asked_for_run = False  # TinyFish says it created none
            raise fate_unknown

    @staticmethod
    def _begun_earlier(attempt: AgentAttempt) -> bool:
        """An attempt resumed rather than begun by this call (it may have a run already)."""
        begun = (utc_now() - attempt.started_at).total_seconds()
        return begun >= LOOK_FOR_EARLIER_RUN_AFTER_SECONDS

    async def _adopt_by_reference(
        self,
        run: _AgentRun,
        reference: str,
        since: str,
        *,
        relayed: int | None,
        tries: int = 1,
    ) -> bool:
        """Settles whether the attempt has an agent run: adopts the best one found (reported,
        then polled by id), cancels any other; False when TinyFish lists none. Raises a
        transient ProviderUnavailable with `same_attempt` when TinyFish cannot say."""
        found: list[dict[str, Any]] = []
        for asked in range(1, tries + 1):
            found = await self._find_attempt_runs(run, reference, since)
            if found:
                break
            if asked < tries:
                await self._sleep(self._polling.wait(asked))
        if not found:
            return False
        found.sort(key=lambda r: _ADOPTION_ORDER.get(str(r.get("status") or "").upper(), 3))
        adopted, *others = found
        for other in others:
            if str(other.get("status") or "").upper() not in TERMINAL_STATUSES:
                logger.warning(
                    "attempt for %s had a second agent run %s; cancelling it",
                    run.provider,
                    other["run_id"],
                )
                await self._cancel_run(str(other["run_id"]))
        agent_run_id = str(adopted["run_id"])
        logger.info(
            "TinyFish agent run %s (%s) found by the attempt's reference: %s",
            agent_run_id,
            run.provider,
            adopted.get("status"),
        )
        run.agent_run_id = agent_run_id
        run.poll_from = relayed
        await run.listener.agent_run_started(agent_run_id)
        return True

    async def _find_attempt_runs(
        self, run: _AgentRun, reference: str, since: str
    ) -> list[dict[str, Any]]:
        """The agent runs whose goal carries `reference` (a short bounded retry); raises a
        transient ProviderUnavailable with `same_attempt` when TinyFish cannot say."""
        problem = ""
        for asked in range(1, LOOKUP_TRIES + 1):
            try:
                response = await self._client.find_runs(
                    goal_contains=reference, created_after=since
                )
            except httpx.TransportError as exc:
                problem = type(exc).__name__
            else:
                if response.is_success:
                    try:
                        listed = response.json().get("data")
                    except (ValueError, AttributeError):
                        listed = None
                    if isinstance(listed, list):
                        return [
                            found
                            for found in listed
                            if isinstance(found, dict)
                            and is_agent_run_id(found.get("run_id"))
                            and reference in str(found.get("goal") or "")
                        ]
                    problem = "an answer without data"
                else:
                    error = error_from_response(response, action="the run lookup")
                    if not error.transient:
                        raise error
                    problem = f"HTTP {response.status_code}"
            logger.info("looking up %s's agent run by reference: %s", run.provider, problem)
            if asked < LOOKUP_TRIES:
                await self._sleep(self._polling.wait(asked))
        unsettled = ProviderUnavailable(
            f"TinyFish could not say whether {run.insurer}'s agent run was created ({problem})"
        )
        unsettled.same_attempt = True
        raise unsettled

    async def _cancel_unseen_runs(self, run: _AgentRun, attempt: AgentAttempt) -> bool:
        """At the attempt's deadline with no run id: cancels whatever run the attempt asked for.
        True when no run of the attempt is left going (as far as TinyFish can say in time)."""
        if not run.asked_for_run:
            return True
        reference = attempt_reference(run.request, run.provider, attempt)
        since = _since(attempt)
        try:
            async with asyncio.timeout(CLEANUP_SECONDS):
                found = await self._find_attempt_runs(run, reference, since)
                over = True
                for unseen in found:
                    if str(unseen.get("status") or "").upper() not in TERMINAL_STATUSES:
                        over = await self._cancel_run(str(unseen["run_id"])) and over
                return over
        except (TimeoutError, ProviderError) as exc:
            logger.warning(
                "could not settle %s's agent run at the deadline (%s); its max_duration_seconds "
                "cap ends it",
                run.provider,
                type(exc).__name__,
            )
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
                        await self._relay_steps(run, view.get("steps"), relayed)
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

    def _drop_gated_field(self, response: httpx.Response, body: dict[str, Any]) -> bool:
        """On a 403 to a request carrying beta-gated fields: drops one (the one the refusal
        names, else the first present) for this account from now on; False when none is left."""
        caps = body.get("agent_config") or {}
        present = [name for name in GATED_FIELDS if name in body or name in caps]
        if response.status_code != 403 or not present:
            return False
        text = response.text
        named = [name for name in present if _GATED_WORDS[name].search(text)]
        dropped = (named or present)[0]
        self._unsupported.add(dropped)
        logger.warning(
            "TinyFish answered 403 to a run with %s; asking again without it (this account may "
            "lack the beta feature)%s",
            dropped,
            "; agent runs stay capped by max_duration_seconds"
            if dropped != "output_schema"
            else "",
        )
        return True

    async def cancel(self, agent_run_id: str) -> None:
        await self._cancel_run(agent_run_id)

    async def agent_steps(self, agent_run_id: str) -> int | None:
        """One GET of the run: `num_of_steps` where given, else the `steps` array's length."""
        if not is_agent_run_id(agent_run_id):
            return None
        try:
            response = await self._client.get_run(agent_run_id)
            view = response.json() if response.is_success else None
        except (httpx.TransportError, ValueError):
            return None
        if not isinstance(view, dict):
            return None
        count, steps = view.get("num_of_steps"), view.get("steps")
        if type(count) is int and count >= 0:
            return count
        return len(steps) if isinstance(steps, list) else None

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
        one (the last look before its provider is declared out of time), else None. An attempt
        whose run id was never learnt is looked up by its reference: a run found finished is
        used, one still going is cancelled (nobody would read it)."""
        run = _AgentRun(request, provider, listener, attempt.agent_run_id)
        if attempt.agent_run_id is None:
            run.asked_for_run = True
            try:
                async with asyncio.timeout(CLEANUP_SECONDS):
                    if not await self._adopt_by_reference(
                        run,
                        attempt_reference(request, provider, attempt),
                        _since(attempt),
                        relayed=None,
                    ):
                        return None
            except (TimeoutError, ProviderError):
                await self._cancel_unseen_runs(run, attempt)
                return None
        agent_run_id = run.agent_run_id
        if agent_run_id is None:
            return None
        try:
            view = self._run_view(run, await self._client.get_run(agent_run_id))
            if view is None or str(view.get("status") or "").upper() != "COMPLETED":
                if attempt.agent_run_id is None:  # adopted just now: the caller never saw it
                    await self._cancel_run(agent_run_id)
                return None
            self._report_steps(run, view)
            return self._finish(run, "COMPLETED", view.get("result"), view.get("error"))
        except (httpx.HTTPError, ProviderError):
            return None


def _since(attempt: AgentAttempt) -> str:
    """How far back a lookup by reference looks: a minute before the attempt began."""
    return (attempt.started_at - timedelta(minutes=1)).isoformat().replace("+00:00", "Z")


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
