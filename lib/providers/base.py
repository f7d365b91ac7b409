"""What a quote source is: given a validated request and an insurer, it reports what its agent is
doing through a callback and returns a Quote, or raises a typed ProviderError."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import ClassVar, Protocol

from lib.models import ProviderErrorCode, ProviderId, Quote, QuoteRequest

ReportActivity = Callable[[str], Awaitable[None]]


class ProviderError(Exception):
    """A provider failed to quote. `retryable`: asking this insurer again later could succeed."""

    code: ClassVar[ProviderErrorCode]
    retryable: ClassVar[bool]
    # Worth another attempt within this run's budget (a blip, not a verdict).
    transient: ClassVar[bool] = False

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        # Seconds the far side asked us to wait before trying again (HTTP Retry-After), if it said.
        self.retry_after = retry_after


class ProviderTimeout(ProviderError):
    code = "provider_timeout"
    retryable = True


class ProviderBlocked(ProviderError):
    code = "provider_blocked"
    retryable = True


class ProviderDeclined(ProviderError):
    code = "provider_declined"
    retryable = False


class ProviderBadOutput(ProviderError):
    code = "provider_bad_output"
    retryable = True
    transient = True


class ProviderUnavailable(ProviderError):
    code = "provider_unavailable"
    retryable = True
    transient = True


class ProviderRequestRejected(ProviderUnavailable):
    """The agent API refused the request itself (HTTP 400, 404, 422…): our integration is at
    fault, so the same request will fail the same way. Reported as provider_unavailable."""

    retryable = False
    transient = False


class ProviderAuth(ProviderError):
    code = "provider_auth"
    retryable = False


class QuoteSource(Protocol):
    name: str

    async def get_quote(
        self, request: QuoteRequest, provider: ProviderId, report: ReportActivity
    ) -> Quote: ...

    async def aclose(self) -> None: ...
