"""A clock for the worker's tests (lib/worker/clock.py's `Clock`): its time moves only when
nothing else can run, straight to the next sleeper's due time, so a test of leases, hand-offs
and retries takes milliseconds instead of their seconds. Storage calls take no time on it
(`ClockedStore`), so a slow loopback request never lets a lease run out under a live worker."""

from __future__ import annotations

import asyncio
import heapq
import inspect
import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from lib.models import utc_now

# Real time given to other work (a store call in its thread, a loopback request) before the
# clock jumps: this clock stands still while anything can still run.
SETTLE_SECONDS = 0.002


class VirtualClock:
    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or utc_now()
        self._sleepers: list[tuple[datetime, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._driver: asyncio.Task[None] | None = None
        self._held = 0

    @contextmanager
    def held(self) -> Iterator[None]:
        """Time stands still inside: for a step that must happen while others sleep."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1

    def now(self) -> datetime:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        wake = asyncio.get_running_loop().create_future()
        due = self._now + timedelta(seconds=seconds)
        heapq.heappush(self._sleepers, (due, next(self._order), wake))
        if self._driver is None or self._driver.done():
            self._driver = asyncio.ensure_future(self._drive())
        await wake

    async def _drive(self) -> None:
        while self._sleepers:
            await asyncio.sleep(SETTLE_SECONDS)
            if self._held:
                continue
            while self._sleepers and self._sleepers[0][2].done():  # a sleeper was cancelled
                heapq.heappop(self._sleepers)
            if not self._sleepers:
                return
            due, _, wake = heapq.heappop(self._sleepers)
            self._now = max(self._now, due)
            wake.set_result(None)


class ClockedStore:
    """A store whose calls take no time on `clock`: the clock stands still while one is in
    flight (over loopback HTTP or in the store's thread), as if storage answered at once."""

    def __init__(self, store: Any, clock: VirtualClock) -> None:
        self._store = store
        self._clock = clock

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._store, name)
        if not inspect.iscoroutinefunction(attribute):
            return attribute

        async def call(*args: Any, **kwargs: Any) -> Any:
            with self._clock.held():
                return await attribute(*args, **kwargs)

        return call
