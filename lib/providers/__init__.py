"""Quote sources: the TinyFish web-agent API when TINYFISH_API_KEY is set, else the simulated
demo source. A source runs one attempt (`QuoteSource.quote`, lib.providers.base), resumable after
a hand-off; the queue worker (lib.worker) gives a provider its attempts across deliveries.

Kept light on purpose: the stream and snapshot functions import this package (for the error
types) and should not pay for importing either source on a cold start."""

from __future__ import annotations

from lib.config import Settings
from lib.providers.base import QuoteSource


def build_quote_source(settings: Settings) -> QuoteSource:
    """TinyFish when an API key is configured, else the simulated source (never real prices)."""
    if settings.tinyfish_api_key:
        from lib.providers.tinyfish import TinyFishQuoteSource

        return TinyFishQuoteSource(
            api_key=settings.tinyfish_api_key,
            api_url=settings.tinyfish_api_url,
            max_steps=settings.tinyfish_max_steps,
        )
    from lib.providers.simulated import SimulatedQuoteSource

    return SimulatedQuoteSource(
        delay_scale=settings.simulated_delay_scale, min_seconds=settings.simulated_min_seconds
    )
