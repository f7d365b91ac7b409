"""One provider's whole budget: attempts under one timeout, transient failures retried with
exponential backoff and jitter, every failure leaving as a typed ProviderError."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

from lib.models import PROVIDER_NAMES, ProviderId, Quote, QuoteRequest
from lib.providers.base import (
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    QuoteSource,
    ReportActivity,
)

logger = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]

DEFAULT_MAX_ATTEMPTS = 3
BASE_DELAY_SECONDS = 1.0
MAX_DELAY_SECONDS = 8.0


def backoff_delay(
    attempt: int,
    *,
    base: float = BASE_DELAY_SECONDS,
    cap: float = MAX_DELAY_SECONDS,
    jitter: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based): base·2^(attempt-1), capped,
    then spread ±25 % so that providers failing together do not retry in lockstep."""
    nominal: float = min(cap, base * 2.0 ** (attempt - 1))
    return nominal * (0.75 + 0.5 * jitter())


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
    caller_errors: list[BaseException] = []

    async def report_for_source(message: str) -> None:
        try:
            await report(message)
        except BaseException as exc:
            caller_errors.append(exc)
            raise

    try:
        async with asyncio.timeout(timeout_seconds) as budget:
            attempt = 1
            while True:
                try:
                    return await source.get_quote(request, provider, report_for_source)
                except ProviderError as exc:
                    error = exc
                except Exception as exc:
                    if any(exc is caller_error for caller_error in caller_errors):
                        raise
                    logger.warning(
                        "%s: quote source %r raised %s; reported as provider_unavailable",
                        provider,
                        getattr(source, "name", type(source).__name__),
                        type(exc).__name__,
                    )
                    error = ProviderUnavailable(f"{name} failed unexpectedly")
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
