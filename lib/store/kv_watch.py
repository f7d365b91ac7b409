"""The KV backend's live view of one run: Redis' keyspace notifications for the run's event
list, over Upstash's /subscribe SSE, say when it changed; shared polling when push cannot be had.

`KVPush`, owned by the store, holds everything push needs on one instance: whether keyspace
notifications are on (a refusal is asked again after a few minutes), the streaming client, and
one `RunFeed` per watched run. A feed is shared by every watch of its run: the first watch opens
it, the last to leave closes it. It alone reads the run's new events (one read per notice, or
one poll per run when push is down) and hands them to each watch; a watch reads on its own only
to catch up from its own cursor.

What Upstash does not promise, the feed checks:
- a subscription has no keepalive, so a half-open one looks exactly like a quiet one: after
  `silence_seconds` without a message the feed PUBLISHes a probe on the run's channel and reads
  once (what a half-open subscription kept back arrives then, not a probe later); a probe not
  heard back within `probe_seconds` means the subscription is closed and opened again;
- a notice may be read from a replica that has not yet applied what it announced: a notice is
  not spent until the list has grown by the item it implies. A read that comes back short is
  made again on the primary (a script, which Upstash runs there: 2 billed commands, not 1), and
  while the replica is seen to lag, notices are read there first. A probe heard back is followed
  by one read, for what a notice of two items may have hidden behind a lagging read.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable

import httpx

from lib.store.base import EventWatch, StoredEvent
from lib.store.errors import StoreUnavailable

log = logging.getLogger(__name__)

# The flags readers need: keyspace events (K) for list (l) and generic (g: RENAME) commands.
NOTIFY_FLAGS = "Klg"
# How long a new watch waits for a subscription being opened before it starts from polling.
CONFIRM_WAIT_SECONDS = 2.0
# The payload of a liveness probe published on a run's channel (never a Redis notice's).
PROBE = "probe"

ReadEvents = Callable[[str, int], Awaitable[list[StoredEvent]]]
Command = Callable[[list[str]], Awaitable[object]]
Clock = Callable[[], float]


def keyspace_channel(run_id: str) -> str:
    """The channel on which Redis announces every change to the run's open event list."""
    return f"__keyspace@0__:quote:{run_id}:events"


class Delivery(enum.Enum):
    PUSH = "push"  # the run's subscription is confirmed: reads follow its notices
    POLL = "poll"  # no working subscription: the run's feed polls with backoff


class PushTimings:
    """The feed's clock and intervals, one value so tests can shorten them all at once."""

    def __init__(
        self,
        *,
        silence_seconds: float = 16.0,
        probe_seconds: float | None = None,
        refusal_recheck_seconds: float = 180.0,
        poll_min: float = 0.05,
        # Two billed commands an idle poll (the open list, then the ended run's): ≤ 1 a second.
        poll_max: float = 2.5,
        # How long notices are read on the primary after a replica was seen behind.
        primary_seconds: float = 30.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self.silence_seconds = silence_seconds
        # A probe's echo comes back in a round trip: a quarter of the silence, at most 3 s.
        self.probe_seconds = (
            min(3.0, silence_seconds / 4) if probe_seconds is None else probe_seconds
        )
        self.refusal_recheck_seconds = refusal_recheck_seconds
        self.poll_min, self.poll_max = poll_min, poll_max
        self.primary_seconds = primary_seconds
        self.clock = clock


class KVPush:
    """One instance's push state for one KV database: notifications, subscriptions, feeds."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        read_events: ReadEvents,
        read_on_primary: ReadEvents,
        command: Command,
        timings: PushTimings | None = None,
    ) -> None:
        self._url = url.rstrip("/")
        self._token = token
        self.read_events = read_events
        self._read_on_primary = read_on_primary
        self._command = command
        self.timings = timings or PushTimings()
        self._feeds: dict[str, RunFeed] = {}
        self._stream_client: httpx.AsyncClient | None = None
        self._enabling: asyncio.Future[bool] | None = None
        self._enabled = False
        self._refused_at: float | None = None

    # --- keyspace notifications ----------------------------------------------------------------

    async def enabled(self) -> bool:
        """Whether Redis announces list changes on keyspace channels, turning them on if need
        be: once per instance when it works; a refusal is asked again after a few minutes."""
        if self._enabled:
            return True
        clock = self.timings.clock
        if (
            self._refused_at is not None
            and clock() - self._refused_at < self.timings.refusal_recheck_seconds
        ):
            return False
        if self._enabling is None:
            self._enabling = asyncio.ensure_future(self._enable())
        enabling = self._enabling
        try:
            self._enabled = await asyncio.shield(enabling)
        except Exception:
            self._enabled = False
        if self._enabling is enabling:
            self._enabling = None
            if not self._enabled:
                self._refused_at = clock()
        return self._enabled

    async def _enable(self) -> bool:
        try:
            reply = await self._command(["CONFIG", "GET", "notify-keyspace-events"])
            current = str(reply[1]) if isinstance(reply, list) and len(reply) > 1 else ""
            expanded = current.replace("A", "g$lshzxe")
            if all(flag in expanded for flag in NOTIFY_FLAGS):
                return True
            wanted = current + "".join(f for f in NOTIFY_FLAGS if f not in expanded)
            await self._command(["CONFIG", "SET", "notify-keyspace-events", wanted])
            log.info("enabled keyspace notifications (%s) for push delivery", wanted)
            return True
        except StoreUnavailable as error:
            log.warning("keyspace notifications unavailable (%s): readers poll", error)
            return False

    # --- feeds ---------------------------------------------------------------------------------

    def watch(self, run_id: str) -> KVEventWatch:
        return KVEventWatch(self, run_id)

    def join(self, run_id: str, watcher: KVEventWatch) -> RunFeed:
        feed = self._feeds.get(run_id)
        if feed is None:
            feed = self._feeds[run_id] = RunFeed(self, run_id)
        feed.join(watcher)
        return feed

    def forget(self, feed: RunFeed) -> None:
        if self._feeds.get(feed.run_id) is feed:
            del self._feeds[feed.run_id]

    @property
    def open_feeds(self) -> int:
        """How many runs this instance follows (for tests and the benchmark)."""
        return len(self._feeds)

    async def read_on_primary(self, run_id: str, after: int) -> list[StoredEvent]:
        """The events after `after` as the primary has them: Upstash serves a script there
        (a read region can be behind a notice), at 2 billed commands instead of 1."""
        return await self._read_on_primary(run_id, after)

    async def probe(self, run_id: str) -> None:
        """Publish a probe on the run's channel: a live subscription hears it back (1 billed
        command)."""
        await self._command(["PUBLISH", keyspace_channel(run_id), PROBE])

    @property
    def stream_client(self) -> httpx.AsyncClient:
        if self._stream_client is None:
            # Subscriptions stay open for minutes: no read timeout (the probe checks them), but
            # a bounded connect.
            self._stream_client = httpx.AsyncClient(
                timeout=httpx.Timeout(None, connect=3.0),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=20),
            )
        return self._stream_client

    def subscribe_request(self, run_id: str) -> tuple[str, dict[str, str]]:
        return (
            f"{self._url}/subscribe/{keyspace_channel(run_id)}",
            {"Authorization": f"Bearer {self._token}", "Accept": "text/event-stream"},
        )

    async def aclose(self) -> None:
        for feed in list(self._feeds.values()):
            await feed.close()
        self._feeds.clear()
        if self._stream_client is not None:
            await self._stream_client.aclose()
            self._stream_client = None


class RunFeed:
    """One run on one instance, shared by its watches: the subscription (when push can be had)
    and the one reader that follows its notices, or polls while it is down."""

    def __init__(self, push: KVPush, run_id: str) -> None:
        self._push = push
        self.run_id = run_id
        self.watchers: set[KVEventWatch] = set()
        self.live = False  # the subscription is confirmed and not found wanting since
        self._was_live = False
        self.settled = asyncio.Event()  # confirmed, or known to be unavailable for now
        # The last event id read for (or by) this run's watches; -1 before any read.
        self.cursor = -1
        # The highest event id a notice implies is stored (each push notice: one more item).
        self._announced = -1
        self._catch_up = False
        self._primary_until = 0.0  # notices are read on the primary until this clock() time
        self._unverified = False  # the last read followed notices, on a replica
        self._probe_sent: float | None = None
        self._connecting_since: float | None = None  # a subscribe request awaits confirmation
        self._last_signal = push.timings.clock()
        self._wake = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None
        self._subscription: asyncio.Task[None] | None = None
        # Watches' own reads in flight by cursor, with the notices counted when each began.
        self._notices = 0
        self._reads: dict[int, tuple[int, asyncio.Future[list[StoredEvent]]]] = {}

    def join(self, watcher: KVEventWatch) -> None:
        self.watchers.add(watcher)
        if self._pump is None:
            self._pump = asyncio.create_task(self._follow())

    async def leave(self, watcher: KVEventWatch) -> None:
        self.watchers.discard(watcher)
        if not self.watchers:
            # Forgotten before awaiting anything: a watch arriving now opens a new feed.
            self._push.forget(self)
            await self.close()

    async def close(self) -> None:
        tasks = [t for t in (self._pump, self._subscription) if t is not None]
        self._pump = self._subscription = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def seen(self, event_id: int) -> None:
        """A watch read up to `event_id` on its own (its catch-up): later reads start after it."""
        self.cursor = max(self.cursor, event_id)

    async def read_after(self, after: int) -> list[StoredEvent]:
        """A watch's own read of the events after `after`: one KV read for every watch that asks
        for the same cursor while it is in flight (500 watches joining are mostly at one
        cursor), unless a notice came since it began (what the notice announced may postdate
        it)."""
        in_flight = self._reads.get(after)
        if in_flight is None or in_flight[0] != self._notices:
            read = asyncio.ensure_future(self._push.read_events(self.run_id, after))
            in_flight = self._reads[after] = (self._notices, read)

            def done(future: asyncio.Future[list[StoredEvent]]) -> None:
                if self._reads.get(after, (0, None))[1] is future:
                    del self._reads[after]
                if not future.cancelled():
                    future.exception()  # retrieved here, whoever is still waiting

            read.add_done_callback(done)
        # Shielded: a watch that leaves does not cancel the read the others wait for.
        return list(await asyncio.shield(in_flight[1]))

    # --- the one reader ------------------------------------------------------------------------

    async def _follow(self) -> None:
        """Read for every watch: what notices announce while push is live, a poll with backoff
        while it is not; probe a silent subscription and reopen one found wanting."""
        timings = self._push.timings
        clock = timings.clock
        poll_delay, short_rounds = timings.poll_min, 0
        if await self._push.enabled():
            self._open_subscription()
            # Not polling while the first subscription is being confirmed: the watches read
            # their backlogs once it is.
            await self._sleep(CONFIRM_WAIT_SECONDS)
        else:
            self.settled.set()
        while True:
            self._wake.clear()
            if not self.live:
                events = await self._read() or []
                poll_delay = timings.poll_min if events else min(poll_delay * 2, timings.poll_max)
                if self._subscription is None and await self._push.enabled():
                    self._open_subscription()  # a refusal asked again, and now granted
                elif (
                    self._connecting_since is not None
                    and clock() - self._connecting_since > timings.probe_seconds
                ):
                    log.info("subscription never confirmed: reopening it")
                    self._reopen_subscription()
                if not self.live and not events:
                    await self._sleep(poll_delay)
                continue
            if self._catch_up or self._announced > self.cursor:
                self._catch_up = False
                on_primary = clock() < self._primary_until
                read = await self._read(on_primary=on_primary)
                if read is not None and not on_primary:
                    if self._announced <= self.cursor:
                        short_rounds = 0
                    else:
                        # The replica lacks what was announced: the primary has it (or nothing
                        # was missing: a notice counted for an item a watch had already read).
                        read = await self._read(on_primary=True)
                        short_rounds = short_rounds + 1 if read else 0
                        # Twice in a row, not a race with a write: notices go to the primary.
                        if short_rounds >= 2:
                            log.info("a read region is behind its notices: reading on primary")
                            self._primary_until = clock() + timings.primary_seconds
                            short_rounds = 0
                if read is None:
                    await self._sleep(timings.poll_min)  # failed: read again shortly
                continue
            now = clock()
            if self._probe_sent is None:
                wait = self._last_signal + timings.silence_seconds - now
                if wait <= 0:
                    self._probe_sent = now
                    # What a half-open subscription kept from us is read now, not after the probe.
                    self._catch_up = True
                    try:
                        await self._push.probe(self.run_id)
                    except StoreUnavailable:
                        self._catch_up = True  # read instead; probe again after the silence
                        self._probe_sent, self._last_signal = None, clock()
                    continue
            else:
                wait = self._probe_sent + timings.probe_seconds - now
                if wait <= 0:
                    log.info("subscription silent through a probe: reopening it")
                    self._reopen_subscription()
                    continue
            await self._sleep(wait)

    async def _read(self, *, on_primary: bool = False) -> list[StoredEvent] | None:
        """Read the events after the cursor and hand them to every watch: the new ones, or None
        if the read failed.
        On the primary, the read also spends every notice heard before it was sent."""
        heard = self._announced
        pending = heard > self.cursor
        try:
            if on_primary:
                events = await self._push.read_on_primary(self.run_id, self.cursor)
            else:
                events = await self._push.read_events(self.run_id, self.cursor)
        except StoreUnavailable as error:  # the next round reads again
            log.info("reading the run's events failed: %s", error)
            return None
        # A watch's own catch-up may have read past some of these meanwhile.
        fresh = [e for e in events if e.id > self.cursor]
        if fresh:
            self.cursor = fresh[-1].id
            for watcher in tuple(self.watchers):
                watcher.on_events(fresh)
        if on_primary and self._announced == heard:
            # Nothing left unread (a notice counted for an item a watch had already read).
            self._announced = self.cursor
        # A replica's read can hold all that was counted and still lack a write's last item.
        self._unverified = pending and not on_primary
        return fresh

    async def _sleep(self, seconds: float) -> None:
        """Sleep `seconds` or until a message, a confirmation or a drop wakes the feed."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, seconds)):
                await self._wake.wait()

    # --- the subscription ----------------------------------------------------------------------

    def _open_subscription(self) -> None:
        self._connecting_since = self._push.timings.clock()
        self._subscription = asyncio.create_task(self._subscribe_forever())

    def _reopen_subscription(self) -> None:
        if self._subscription is not None:
            self._subscription.cancel()
        self._set_down()
        self._open_subscription()

    def _set_down(self) -> None:
        self.live = False
        self._probe_sent = self._connecting_since = None
        self.settled.set()  # waiting watches start from polling
        for watcher in tuple(self.watchers):
            watcher.wake()
        self._wake.set()

    def _on_message(self, payload: str) -> None:
        self._last_signal = self._push.timings.clock()
        if payload == PROBE and self._probe_sent is not None and self._unverified:
            # The channel is sound; what the notices since the last look counted is checked once.
            self._catch_up = True
        self._probe_sent = None
        if payload != PROBE:
            self._notices += 1
            if "push" in payload:  # rpush (RPUSHX) adds at least one item; others add none
                self._announced = max(self._announced, self.cursor) + 1
        self._wake.set()

    def _on_subscribed(self) -> None:
        self._notices += 1  # a watch's catch-up read from now on must be fresh
        # Whatever was published before this point (while push was down) was not pushed; at
        # the first confirmation, before anything was read, each watch's backlog read covers it.
        self._catch_up = self._was_live or self.cursor >= 0 or bool(self._reads)
        self.live = self._was_live = True
        self._probe_sent = self._connecting_since = None
        self._last_signal = self._push.timings.clock()
        self.settled.set()
        for watcher in tuple(self.watchers):
            watcher.wake()
        self._wake.set()

    async def _subscribe_forever(self) -> None:
        url, headers = self._push.subscribe_request(self.run_id)
        delay = 0.25
        while True:
            try:
                # POST, as Upstash's own JS SDK subscribes. Each `data:` line is one pub/sub
                # reply ("message,<channel>,<notice>"), read line by line so the stream works
                # whether or not the server separates them with blank lines.
                async with self._push.stream_client.stream(
                    "POST", url, headers=headers, json=[]
                ) as response:
                    response.raise_for_status()
                    async for line in response.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        kind, _, rest = line[5:].removeprefix(" ").partition(",")
                        if kind == "message":
                            self._on_message(rest.partition(",")[2])
                        elif kind == "subscribe":
                            self._on_subscribed()
                            delay = 0.25
            except asyncio.CancelledError:
                raise
            except Exception as error:  # any failure of the push channel means: poll instead
                log.info("subscription to run events failed: %s", type(error).__name__)
            self._set_down()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            self._connecting_since = self._push.timings.clock()


class KVEventWatch(EventWatch):
    """One reader's view of its run's feed: events handed over by the feed wait here until
    `next_events` takes them in order; a gap (a cursor behind what the feed read, a backlog)
    is read on the watch's own account, shared with every watch at the same cursor."""

    def __init__(self, push: KVPush, run_id: str) -> None:
        self._push = push
        self._run_id = run_id
        self._pending: dict[int, str] = {}
        self._latest = -1
        self._wake = asyncio.Event()
        self._catch_up = True  # the backlog after the reader's cursor
        self._last_heard: float | None = None
        self._feed: RunFeed | None = None

    @property
    def last_heard(self) -> float | None:
        return self._last_heard

    @property
    def delivery(self) -> Delivery:
        return Delivery.PUSH if self._feed is not None and self._feed.live else Delivery.POLL

    async def __aenter__(self) -> KVEventWatch:
        self._feed = self._push.join(self._run_id, self)
        try:
            # Reading the backlog only once subscribed means no event falls between the two.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CONFIRM_WAIT_SECONDS):
                    await self._feed.settled.wait()
        except BaseException:
            # The reader left (cancelled) while we waited: nobody will call __aexit__.
            await self.aclose()
            raise
        return self

    async def aclose(self) -> None:
        feed, self._feed = self._feed, None
        if feed is not None:
            await feed.leave(self)

    async def next_events(self, after: int, timeout: float) -> list[StoredEvent]:
        feed = self._feed
        if feed is None:
            raise RuntimeError("a watch is read inside `async with`")
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            # Cleared before looking, so events handed over during an await still wake us.
            self._wake.clear()
            batch = self._take_contiguous(after)
            if batch:
                return batch
            if self._catch_up or self._latest > after or feed.cursor > after:
                self._catch_up = False
                events = await feed.read_after(after)
                if events:
                    feed.seen(events[-1].id)
                    self._last_heard = time.time()
                    return events
            # asyncio.timeout, not wait_for: no task per wait, 500 streams wake at once.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await self._wake.wait()
            if asyncio.get_running_loop().time() >= deadline:
                return self._take_contiguous(after)

    def _take_contiguous(self, after: int) -> list[StoredEvent]:
        if not self._pending:
            return []
        for stale in [i for i in self._pending if i <= after]:
            del self._pending[stale]
        batch: list[StoredEvent] = []
        next_id = after + 1
        while next_id in self._pending:
            batch.append(StoredEvent(next_id, self._pending.pop(next_id)))
            next_id += 1
        return batch

    # --- what the feed tells each of its watches ------------------------------------------------

    def on_events(self, events: list[StoredEvent]) -> None:
        self._last_heard = time.time()
        for event in events:
            self._pending[event.id] = event.data
        self._latest = max(self._latest, events[-1].id)
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()
