"""Quote sources: the TinyFish web-agent API when TINYFISH_API_KEY is set, else the simulated
demo source. `quote_with_retries` gives one provider its whole budget (timeout and retries)."""

from __future__ import annotations

from lib.config import Settings
from lib.providers.base import (
    ProviderAuth,
    ProviderBadOutput,
    ProviderBlocked,
    ProviderDeclined,
    ProviderError,
    ProviderRequestRejected,
    ProviderTimeout,
    ProviderUnavailable,
    QuoteSource,
    ReportActivity,
)
from lib.providers.retry import quote_with_retries
from lib.providers.simulated import SimulatedQuoteSource
from lib.providers.tinyfish import TinyFishQuoteSource

__all__ = [
    "ProviderAuth",
    "ProviderBadOutput",
    "ProviderBlocked",
    "ProviderDeclined",
    "ProviderError",
    "ProviderRequestRejected",
    "ProviderTimeout",
    "ProviderUnavailable",
    "QuoteSource",
    "ReportActivity",
    "SimulatedQuoteSource",
    "TinyFishQuoteSource",
    "build_quote_source",
    "quote_with_retries",
]


def build_quote_source(settings: Settings) -> QuoteSource:
    """TinyFish when an API key is configured, else the simulated source (never real prices)."""
    if settings.tinyfish_api_key:
        return TinyFishQuoteSource(
            api_key=settings.tinyfish_api_key, api_url=settings.tinyfish_api_url
        )
    return SimulatedQuoteSource(delay_scale=settings.simulated_delay_scale)
