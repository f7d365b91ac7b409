"""The KV backend's live view of one run: Redis' keyspace notifications for the run's event
list, over Upstash's /subscribe SSE, say when it changed; polling when push cannot be had.

Every watch of one run on one store shares ONE subscription (`RunSubscription`): the first watch
opens it, the last to leave closes it. A notice carries no event, so the subscription reads the
new events once (one LRANGE from the furthest cursor any of its watches reached) and hands them
to every watch. Each watch keeps its own cursor state (what was handed to it but not yet taken,
whether it trusts push or polls), so the catch-up, silence checks and the polling fallback hold
for every watcher on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from typing import TYPE_CHECKING
from weakref import WeakKeyDictionary

from lib.store.base import EventWatch, StoredEvent

if TYPE_CHECKING:
    from lib.store.kv import KVStore

log = logging.getLogger(__name__)

# How long a new watch waits for a subscription being opened before it starts by polling.
CONFIRM_WAIT_SECONDS = 2.0


class ChannelState(enum.Enum):
    CONNECTING = "connecting"  # a subscribe request is under way, not yet confirmed
    LIVE = "live"  # confirmed: every message published from now on is pushed
    DOWN = "down"  # failed or dropped; waiting to resubscribe (watchers poll meanwhile)


class Delivery(enum.Enum):
    PUSH = "push"  # the subscription is trusted: wait for pushed events, read only when due
    POLL = "poll"  # no working subscription (or it missed events): read with backoff


class ReadDue(enum.Enum):
    NONE = "none"
    CATCH_UP = "catch-up"  # (re)subscribed, a gap, or a heartbeat naming a later id
    SILENCE_CHECK = "silence-check"  # nothing heard for too long: events found mean push failed


# Per store, per run: the one subscription its watches share.
_SUBSCRIPTIONS: WeakKeyDictionary[KVStore, dict[str, RunSubscription]] = WeakKeyDictionary()


class RunSubscription:
    """One run's channel on one store, shared by reference: `acquire` the first time opens it,
    `release` by the last watcher closes it."""

    def __init__(self, store: KVStore, run_id: str) -> None:
        self._store = store
        self.run_id = run_id
        self.state = ChannelState.CONNECTING
        self.watchers: set[KVEventWatch] = set()
        self._task: asyncio.Task[None] | None = None
        # The last event id read for (or by) this run's watches; -1 before any read.
        self.cursor = -1
        self._notice = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        # Notices seen so far, and the watches' reads in flight by cursor with the count each
        # began at.
        self._notices = 0
        self._reads: dict[int, tuple[int, asyncio.Future[list[StoredEvent]]]] = {}

    @classmethod
    def acquire(cls, store: KVStore, run_id: str, watcher: KVEventWatch) -> RunSubscription:
        by_run = _SUBSCRIPTIONS.setdefault(store, {})
        subscription = by_run.get(run_id)
        if subscription is None:
            subscription = by_run[run_id] = cls(store, run_id)
        subscription.watchers.add(watcher)
        watcher.on_joined(subscription.state)
        if subscription._task is None:
            subscription._task = asyncio.create_task(subscription._subscribe_forever())
        return subscription

    @classmethod
    def open_count(cls, store: KVStore) -> int:
        """How many runs this store holds a subscription for (for tests and the benchmark)."""
        return len(_SUBSCRIPTIONS.get(store, {}))

    async def release(self, watcher: KVEventWatch) -> None:
        self.watchers.discard(watcher)
        if self.watchers:
            return
        by_run = _SUBSCRIPTIONS.get(self._store, {})
        if by_run.get(self.run_id) is self:
            # Dropped before awaiting anything: a watch arriving now opens a new subscription.
            del by_run[self.run_id]
        task, self._task = self._task, None
        if self._reader is not None:
            self._reader.cancel()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def seen(self, event_id: int) -> None:
        """A watch read up to `event_id` on its own (its catch-up): later reads start after it."""
        self.cursor = max(self.cursor, event_id)

    async def read_after(self, after: int) -> list[StoredEvent]:
        """A watch's own read of the events after `after` (its catch-up, silence check or poll):
        one KV read for every watch that asks for the same cursor while it is in flight (500
        watches polling after a drop are mostly at one cursor), unless a notice came since it
        began (what the notice announced may postdate it)."""
        in_flight = self._reads.get(after)
        if in_flight is None or in_flight[0] != self._notices:
            read = asyncio.ensure_future(self._store.read_events(self.run_id, after))
            in_flight = self._reads[after] = (self._notices, read)

            def done(future: asyncio.Future[list[StoredEvent]]) -> None:
                if self._reads.get(after, (0, None))[1] is future:
                    del self._reads[after]
                if not future.cancelled():
                    future.exception()  # retrieved here, whoever is still waiting

            read.add_done_callback(done)
        # Shielded: a watch that leaves does not cancel the read the others wait for.
        return list(await asyncio.shield(in_flight[1]))

    def _on_notice(self) -> None:
        self._notices += 1
        # Notices that arrive while a read is under way are answered by one more read.
        self._notice.set()
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read_for_watchers())

    async def _read_for_watchers(self) -> None:
        while self._notice.is_set():
            self._notice.clear()
            try:
                events = await self._store.read_events(self.run_id, self.cursor)
            except Exception as error:  # a failed read: every watch reads for itself instead
                log.info("reading notified events failed: %s", type(error).__name__)
                for watcher in tuple(self.watchers):
                    watcher.on_read_due()
                return
            if not events:
                continue
            heard = time.time()
            self.cursor = max(self.cursor, events[-1].id)
            for watcher in tuple(self.watchers):
                watcher.on_events(events, heard)

    async def _subscribe_forever(self) -> None:
        url, headers = self._store.subscribe_request(self.run_id)
        delay = 0.25
        while True:
            self.state = ChannelState.CONNECTING
            try:
                # POST, as Upstash's own JS SDK subscribes. Each `data:` line is one pub/sub
                # reply ("message,<channel>,<notice>"), read line by line so the stream works
                # whether or not the server separates them with blank lines.
                async with self._store.stream_client.stream(
                    "POST", url, headers=headers, json=[]
                ) as response:
                    response.raise_for_status()
                    async for line in response.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        kind = line[5:].removeprefix(" ").partition(",")[0]
                        if kind == "message":
                            self._on_notice()
                        elif kind == "subscribe":
                            self._notices += 1  # a catch-up read from now on must be fresh
                            self.state = ChannelState.LIVE
                            for watcher in tuple(self.watchers):
                                watcher.on_subscribed()
                            delay = 0.25
            except asyncio.CancelledError:
                raise
            except Exception as error:  # any failure of the push channel means: poll instead
                log.info("subscription to run events failed: %s", type(error).__name__)
            self.state = ChannelState.DOWN
            for watcher in tuple(self.watchers):
                watcher.on_push_lost()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


class KVEventWatch(EventWatch):
    """Push first: the run's shared subscription carries every appended event, so a healthy
    stream costs no reads at all. The stored list stays the truth: a gap in the pushed ids, a
    heartbeat naming a later id, or silence for longer than the worker's heartbeat interval
    triggers a read from the cursor; a dropped or unavailable subscription falls back to
    polling with backoff while it resubscribes."""

    _POLL_MIN, _POLL_MAX = 0.05, 1.0

    def __init__(self, store: KVStore, run_id: str) -> None:
        self._store = store
        self._run_id = run_id
        self._pending: dict[int, str] = {}
        self._latest = -1
        self._wake = asyncio.Event()
        self._subscribed = asyncio.Event()
        self._delivery = Delivery.POLL
        self._read_due = ReadDue.CATCH_UP
        self._poll_delay = self._POLL_MIN
        self._last_heard: float | None = None
        self._last_signal = time.monotonic()
        self._subscription: RunSubscription | None = None

    @property
    def last_heard(self) -> float | None:
        return self._last_heard

    @property
    def delivery(self) -> Delivery:
        return self._delivery

    async def __aenter__(self) -> KVEventWatch:
        if not await self._store.notifications_enabled():
            return self  # no push: next_events polls with backoff
        self._subscription = RunSubscription.acquire(self._store, self._run_id, self)
        try:
            # Reading the backlog only once subscribed means no event falls between the two.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._subscribed.wait(), CONFIRM_WAIT_SECONDS)
        except BaseException:
            # The reader left (cancelled) while we waited: nobody will call __aexit__.
            await self.aclose()
            raise
        return self

    async def aclose(self) -> None:
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            await subscription.release(self)

    async def next_events(self, after: int, timeout: float) -> list[StoredEvent]:
        end = time.monotonic() + timeout
        while True:
            # Cleared before looking, so a message that lands during an await still wakes us.
            self._wake.clear()
            batch = self._take_contiguous(after)
            if batch:
                return batch
            due = self._read_due
            if due is not ReadDue.NONE or self._delivery is Delivery.POLL or self._latest > after:
                self._read_due = ReadDue.NONE
                events = await self._read_after(after)
                if events:
                    if self._subscription is not None:
                        self._subscription.seen(events[-1].id)
                    self._last_heard = time.time()
                    self._last_signal = time.monotonic()
                    self._poll_delay = self._POLL_MIN
                    if due is ReadDue.SILENCE_CHECK:
                        # Push looked healthy yet missed these: poll until it proves itself.
                        self._delivery = Delivery.POLL
                    return events
            now = time.monotonic()
            if now >= end:
                return []
            if self._delivery is Delivery.PUSH:
                wait = max(0.0, self._last_signal + self._store.silence_seconds - now)
            else:
                wait = self._poll_delay
                self._poll_delay = min(self._poll_delay * 2, self._POLL_MAX)
            try:
                await asyncio.wait_for(self._wake.wait(), min(wait, end - now))
            except TimeoutError:
                if self._delivery is Delivery.PUSH and time.monotonic() < end:
                    self._read_due = ReadDue.SILENCE_CHECK
                    self._last_signal = time.monotonic()

    async def _read_after(self, after: int) -> list[StoredEvent]:
        if self._subscription is None:
            return await self._store.read_events(self._run_id, after)
        return await self._subscription.read_after(after)

    def _take_contiguous(self, after: int) -> list[StoredEvent]:
        for stale in [i for i in self._pending if i <= after]:
            del self._pending[stale]
        batch: list[StoredEvent] = []
        next_id = after + 1
        while next_id in self._pending:
            batch.append(StoredEvent(next_id, self._pending.pop(next_id)))
            next_id += 1
        return batch

    # --- what the shared subscription tells each of its watchers --------------------------------

    def on_joined(self, state: ChannelState) -> None:
        if state is ChannelState.LIVE:
            # Already subscribed: everything published from now on reaches us; the catch-up
            # read (due from the start) covers what came before.
            self.on_subscribed()
        elif state is ChannelState.DOWN:
            self._subscribed.set()  # nothing to wait for: start by polling

    def on_subscribed(self) -> None:
        # Whatever was published before this point (while resubscribing, or after a backlog
        # read that beat a slow confirmation) was not pushed.
        self._read_due = ReadDue.CATCH_UP
        self._delivery = Delivery.PUSH
        self._last_signal = time.monotonic()
        self._subscribed.set()
        self._wake.set()

    def on_events(self, events: list[StoredEvent], heard: float) -> None:
        self._last_heard = heard
        self._last_signal = time.monotonic()
        for event in events:
            self._pending[event.id] = event.data
            self._latest = max(self._latest, event.id)
        # Notified events arriving is the sign the channel works.
        self._delivery = Delivery.PUSH
        self._wake.set()

    def on_read_due(self) -> None:
        self._read_due = ReadDue.CATCH_UP
        self._wake.set()

    def on_push_lost(self) -> None:
        self._delivery = Delivery.POLL
        self._subscribed.set()
        self._wake.set()
