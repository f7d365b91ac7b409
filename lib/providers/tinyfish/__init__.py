"""The TinyFish web-agent quote source (the agent API formerly called Mino), in four parts:

- goal.py    the agent's instructions — the only place the driver's personal data leaves;
- result.py  what a finished run's result means (a Quote or a ProviderError);
- errors.py  how TinyFish's failures and HTTP statuses map to ProviderErrors;
- client.py  the HTTP calls (run-sse, get run, cancel) over httpx + httpx-sse;
- source.py  one attempt = one agent run: start, follow, reattach, cancel.
"""

from lib.providers.tinyfish.goal import INSURER_START_URLS, build_goal
from lib.providers.tinyfish.result import MAX_ACTIVITY_CHARS, QUOTE_OUTPUT_SCHEMA
from lib.providers.tinyfish.source import TinyFishQuoteSource

__all__ = [
    "INSURER_START_URLS",
    "MAX_ACTIVITY_CHARS",
    "QUOTE_OUTPUT_SCHEMA",
    "TinyFishQuoteSource",
    "build_goal",
]
