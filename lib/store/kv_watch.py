"""The KV backend's live view of one run: push over Upstash's /subscribe SSE, polling when push
cannot be had."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from typing import TYPE_CHECKING

from lib.store.base import EventWatch, StoredEvent

if TYPE_CHECKING:
    from lib.store.kv import KVStore

log = logging.getLogger(__name__)

_EVENT_ID = re.compile(r'\{"id":(\d+),')
_LAST_ID = re.compile(r'\{"lastId":(-?\d+)\}')


class KVEventWatch(EventWatch):
    """Push first: a subscription to the run's channel (Upstash's /subscribe SSE endpoint) carries
    every appended event, so a healthy stream costs no reads at all. The stored list stays the
    truth: a gap in the pushed ids, a heartbeat naming a later id, or silence for longer than the
    worker's heartbeat interval triggers a read from the cursor; a dropped or unavailable
    subscription falls back to polling with backoff while it resubscribes."""

    _POLL_MIN, _POLL_MAX = 0.05, 1.0

    def __init__(self, store: KVStore, run_id: str) -> None:
        self._store = store
        self._run_id = run_id
        self._pending: dict[int, str] = {}
        self._latest = -1
        self._wake = asyncio.Event()
        self._subscribed = asyncio.Event()
        self._push_healthy = False
        self._poll_delay = self._POLL_MIN
        self._last_heard: float | None = None
        self._last_signal = time.monotonic()
        self._need_read = True
        self._after_silence = False
        self._task: asyncio.Task[None] | None = None

    @property
    def last_heard(self) -> float | None:
        return self._last_heard

    async def __aenter__(self) -> KVEventWatch:
        self._task = asyncio.create_task(self._subscribe_forever())
        try:
            # Reading the backlog only once subscribed means no event falls between the two.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._subscribed.wait(), 2.0)
        except BaseException:
            # The reader left (cancelled) while we waited: nobody will call __aexit__.
            await self.aclose()
            raise
        return self

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def next_events(self, after: int, timeout: float) -> list[StoredEvent]:
        end = time.monotonic() + timeout
        while True:
            # Cleared before looking, so a message that lands during an await still wakes us.
            self._wake.clear()
            batch = self._take_contiguous(after)
            if batch:
                return batch
            if self._need_read or not self._push_healthy or self._latest > after:
                after_silence, self._after_silence = self._after_silence, False
                self._need_read = False
                events = await self._store.read_events(self._run_id, after)
                if events:
                    self._heard()
                    self._poll_delay = self._POLL_MIN
                    if after_silence:
                        # Push looked healthy yet missed these: poll until it proves itself.
                        self._push_healthy = False
                    return events
            now = time.monotonic()
            if now >= end:
                return []
            if self._push_healthy:
                wait = max(0.0, self._last_signal + self._store.silence_seconds - now)
            else:
                wait = self._poll_delay
                self._poll_delay = min(self._poll_delay * 2, self._POLL_MAX)
            try:
                await asyncio.wait_for(self._wake.wait(), min(wait, end - now))
            except TimeoutError:
                if self._push_healthy and time.monotonic() < end:
                    self._need_read = self._after_silence = True
                    self._last_signal = time.monotonic()

    def _take_contiguous(self, after: int) -> list[StoredEvent]:
        for stale in [i for i in self._pending if i <= after]:
            del self._pending[stale]
        batch: list[StoredEvent] = []
        next_id = after + 1
        while next_id in self._pending:
            batch.append(StoredEvent(next_id, self._pending.pop(next_id)))
            next_id += 1
        return batch

    def _heard(self) -> None:
        self._last_heard = time.time()
        self._last_signal = time.monotonic()

    def _on_message(self, payload: str) -> None:
        self._heard()
        if match := _EVENT_ID.match(payload):
            event_id = int(match.group(1))
            self._pending[event_id] = payload
            self._latest = max(self._latest, event_id)
            if not self._push_healthy:
                # A pushed event arriving again is the sign the channel works.
                self._push_healthy = True
        elif match := _LAST_ID.match(payload):
            self._latest = max(self._latest, int(match.group(1)))
        self._wake.set()

    async def _subscribe_forever(self) -> None:
        url, headers = self._store.subscribe_request(self._run_id)
        delay = 0.25
        while True:
            try:
                # POST, as Upstash's own JS SDK subscribes. Each `data:` line is one pub/sub
                # reply ("message,<channel>,<payload>"), read line by line so the stream works
                # whether or not the server separates them with blank lines.
                async with self._store.stream_client.stream(
                    "POST", url, headers=headers, json=[]
                ) as response:
                    response.raise_for_status()
                    async for line in response.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        kind, _, rest = line[5:].removeprefix(" ").partition(",")
                        _channel, _, payload = rest.partition(",")
                        if kind == "subscribe":
                            # Whatever was published before this point (while resubscribing, or
                            # after a backlog read that beat a slow confirmation) was not pushed.
                            self._need_read = True
                            self._push_healthy = True
                            self._last_signal = time.monotonic()
                            self._subscribed.set()
                            self._wake.set()
                            delay = 0.25
                        elif kind == "message":
                            self._on_message(payload)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # any failure of the push channel means: poll instead
                log.info("subscription to run events failed: %s", type(error).__name__)
            self._push_healthy = False
            self._subscribed.set()
            self._wake.set()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
