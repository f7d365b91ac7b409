"""One provider's whole budget in one process: attempts under one timeout, transient failures
retried with exponential backoff and jitter, every failure leaving as a typed ProviderError, every
abandoned agent run cancelled."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from datetime import timedelta

from lib.models import PROVIDER_NAMES, ProviderId, Quote, QuoteRequest, utc_now
from lib.providers.backoff import ATTEMPTS
from lib.providers.base import (
    AgentAttempt,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    QuoteSource,
    ReportActivity,
)

logger = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]

DEFAULT_MAX_ATTEMPTS = 3
# How long an abandoned agent run's cancel may hold up the caller (cancel retries inside it).
CANCEL_WAIT_SECONDS = 5.0


def backoff_delay(attempt: int, *, jitter: Callable[[], float] = random.random) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based): 1 s doubling up to 8 s,
    spread ±25 % so that providers failing together do not retry in lockstep."""
    return ATTEMPTS.wait(attempt, jitter)


class _InProcessAttempt:
    """The listener of one in-process attempt: relays activity, remembers the agent run id, and
    tells the caller's own exceptions apart from the source's."""

    def __init__(self, report: ReportActivity) -> None:
        self._report = report
        self.agent_run_id: str | None = None
        self.caller_errors: list[BaseException] = []

    async def activity(self, message: str) -> None:
        try:
            await self._report(message)
        except BaseException as exc:
            self.caller_errors.append(exc)
            raise

    async def agent_run_started(self, agent_run_id: str) -> None:
        self.agent_run_id = agent_run_id

    def raised_by_caller(self, exc: BaseException) -> bool:
        return any(exc is caller_error for caller_error in self.caller_errors)


async def _cancel_abandoned(source: QuoteSource, agent_run_id: str | None) -> None:
    """Cancels an agent run nobody will read, within a bounded wait, even while cancelled."""
    if agent_run_id is None:
        return
    try:
        await asyncio.shield(asyncio.wait_for(source.cancel(agent_run_id), CANCEL_WAIT_SECONDS))
    except TimeoutError:
        logger.warning("gave up waiting to cancel abandoned agent run %s", agent_run_id)


async def quote_with_retries(
    source: QuoteSource,
    request: QuoteRequest,
    provider: ProviderId,
    report: ReportActivity,
    *,
    timeout_seconds: float,
    sleep: Sleep = asyncio.sleep,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    jitter: Callable[[], float] = random.random,
) -> Quote:
    """Ask `source` for `provider`'s quote within `timeout_seconds`, all attempts and waits in.

    In-process, for the workflow that runs a whole run in one invocation (the queue worker keeps
    attempts in the store instead). Each attempt is one `source.quote` with a fresh AgentAttempt
    whose deadline is the end of the budget; an agent run an attempt leaves behind (an error
    while it may still be going, the budget running out, cancellation) is cancelled before
    anything else happens, so two agent runs for one provider never overlap.

    - An error whose class is `transient` is retried (at most `max_attempts` attempts in all),
      after `report("Retrying after <reason> (attempt N of M)")` and a backoff wait (longer when
      the error carries `retry_after`). When that wait would not fit in the budget left, the error
      is raised now rather than after a pointless wait.
    - Any other ProviderError is raised at once.
    - An unexpected exception from the source becomes ProviderUnavailable (its text is not kept:
      it could carry the request's personal data). Exceptions raised by `report` itself belong to
      the caller and propagate unchanged, as does cancellation.
    - The budget running out raises ProviderTimeout.
    """
    name = PROVIDER_NAMES[provider]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_seconds
    budget_ends = utc_now() + timedelta(seconds=timeout_seconds)
    listener: _InProcessAttempt | None = None

    try:
        async with asyncio.timeout(timeout_seconds) as budget:
            attempt = 1
            while True:
                listener = current = _InProcessAttempt(report)
                this_attempt = AgentAttempt(
                    number=attempt, started_at=utc_now(), deadline=budget_ends
                )
                try:
                    quote = await source.quote(request, provider, this_attempt, current)
                    listener = None
                    return quote
                except ProviderError as exc:
                    error = exc
                except Exception as exc:
                    if current.raised_by_caller(exc):
                        raise
                    logger.warning(
                        "%s: quote source %r raised %s; reported as provider_unavailable",
                        provider,
                        getattr(source, "name", type(source).__name__),
                        type(exc).__name__,
                    )
                    error = ProviderUnavailable(
                        f"{name} failed unexpectedly", agent_run_id=current.agent_run_id
                    )
                if error.agent_run_id is None:
                    error.agent_run_id = current.agent_run_id
                if error.agent_run_may_be_going:
                    await _cancel_abandoned(source, error.agent_run_id)
                listener = None
                if not error.transient or attempt >= max_attempts:
                    raise error
                delay = backoff_delay(attempt, jitter=jitter)
                if error.retry_after is not None:
                    delay = max(delay, error.retry_after)
                if delay >= deadline - loop.time():
                    raise error
                attempt += 1
                logger.info(
                    "%s: retrying in %.1f s after %s (attempt %d of %d)",
                    provider,
                    delay,
                    error.code,
                    attempt,
                    max_attempts,
                )
                await report(
                    f"Retrying after {error.message.rstrip('.')} "
                    f"(attempt {attempt} of {max_attempts})"
                )
                await sleep(delay)
    except TimeoutError:
        if budget.expired():
            raise ProviderTimeout(f"{name} gave no quote within {timeout_seconds:g} s") from None
        raise
    finally:
        # Still set: the attempt ended by the budget, by cancellation or by the caller's error.
        if listener is not None:
            await _cancel_abandoned(source, listener.agent_run_id)
