"""The one clock a delivery reads and waits on, injected so tests can drive time."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Protocol

from lib.models import utc_now


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time (UTC)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` of this clock's time (nothing when it is not positive)."""
        ...


class SystemClock:
    """Wall time, and the event loop's sleep."""

    def now(self) -> datetime:
        return utc_now()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(seconds, 0.0))


SYSTEM_CLOCK = SystemClock()
