"""What `make bench` measures. Each scenario uses a fresh run id and returns plain figures;
`bench/report.py` turns them into the table.

Latency is taken the same way for both designs: the worker notes `time.time()` just before the
request that appends event N, each client notes `time.time()` the moment it has parsed event N,
and the difference is one sample (all in this process, so one clock). KV traffic is what the
Upstash REST endpoint counted between a reset and the end of the scenario: the worker's requests
and every reader's, subscriptions included. Billed commands are the benchmark's own
redis-server's `INFO commandstats` delta over the same span (bench/infra.py `command_calls`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import aconnect_sse

from bench.infra import ROOT, FunctionHost, UpstashEndpoint, command_calls
from bench.seed import SeedStore
from bench.workload import RunPlan, Write, new_record, plan_run, renew_while_quiet, write
from lib.models import PROVIDER_IDS, ActivityEvent, CompleteEvent, new_run_id
from lib.store.kv import KVStore

STREAM_FUNCTION = "api/quotes/[runId]/stream.py"
TTL_SECONDS = 7200


# --- shared plumbing ---


@dataclass
class Setup:
    """The processes every scenario talks to."""

    endpoint: UpstashEndpoint
    stream: FunctionHost
    function_env: dict[str, str]
    log_dir: Path
    redis_url: str

    def kv_store(self, transport: httpx.AsyncBaseTransport | None = None) -> KVStore:
        return KVStore(
            self.endpoint.url, UpstashEndpoint.TOKEN, ttl_seconds=TTL_SECONDS, transport=transport
        )

    def seed_store(self, transport: httpx.AsyncBaseTransport | None = None) -> SeedStore:
        return SeedStore(self.endpoint.url, UpstashEndpoint.TOKEN, transport=transport)

    async def stats(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.endpoint.stats)

    async def reset_stats(self) -> None:
        await asyncio.to_thread(self.endpoint.reset_stats)

    async def command_calls(self) -> Counter[str]:
        return await asyncio.to_thread(command_calls, self.redis_url)

    async def subscriptions_settle(self, count: int, within: float = 10.0) -> int:
        return await asyncio.to_thread(self.endpoint.wait_for_subscriptions, count, within)


def stream_url(base_url: str, run_id: str) -> str:
    # Vercel's routing passes [runId] as a query parameter; the path is kept as clients see it.
    return f"{base_url}/api/quotes/{run_id}/stream?runId={run_id}"


def sse_client(connections: int | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=httpx.Timeout(None, connect=10.0),
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=0),
    )


def percentile(samples: list[float], fraction: float) -> float:
    """Nearest-rank percentile (p99 of 100 samples is the 99th smallest)."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    rank = max(1, min(len(ordered), round(fraction * len(ordered) + 0.5 - 1e-9)))
    return ordered[rank - 1]


async def sleep_until(moment: float) -> None:
    await asyncio.sleep(max(0.0, moment - time.monotonic()))


def is_terminal_data(data: str) -> bool:
    kind = json.loads(data).get("type")
    return kind in ("complete", "error")


# --- delivery: 100 events, N clients streaming throughout ---


@dataclass
class Delivery:
    design: str
    clients: int
    duration: float  # the run as planned, first append to last
    events: int
    event_bytes: float  # mean stored size of an event
    seconds: float  # first append to last receipt
    latencies_ms: list[float]
    missing: int  # (client, event) pairs never received
    duplicated: int
    requests: int  # REST requests the endpoint served (writers, readers, subscriptions)
    commands_top_level: int  # commands as the REST requests name them (a script counts 1)
    bytes_out: int
    billed: int  # redis-server's INFO commandstats delta: every command a script ran, too
    billed_by_command: Counter[str]  # with SUBSCRIBE's UNSUBSCRIBE and the CONFIG commands
    writer_requests: int  # REST requests the writers sent (-1: could not be counted)

    @property
    def delivered(self) -> int:
        return len(self.latencies_ms)

    @property
    def p50(self) -> float:
        return percentile(self.latencies_ms, 0.50)

    @property
    def p99(self) -> float:
        return percentile(self.latencies_ms, 0.99)

    @property
    def bytes_per_event(self) -> float:
        return self.bytes_out / max(1, self.delivered)

    @property
    def billed_per_event(self) -> float:
        return self.billed / self.events

    @property
    def billed_writes(self) -> int:
        """Commands each read region bills again."""
        return sum(n for name, n in self.billed_by_command.items() if name in WRITE_COMMANDS)

    @property
    def requests_per_append(self) -> float:
        # The run's creation is one more request of the writers' (the seed's: a SET).
        return (self.writer_requests - 1) / self.events


class Receipts:
    """Who received which event when."""

    def __init__(self, clients: int) -> None:
        self.at: list[dict[int, float]] = [{} for _ in range(clients)]
        self.duplicated = 0

    def note(self, client: int, event_id: int) -> None:
        if event_id in self.at[client]:
            self.duplicated += 1
        else:
            self.at[client][event_id] = time.time()

    def latencies_ms(self, sent: dict[int, float]) -> list[float]:
        return [
            (received - sent[event_id]) * 1000
            for per_client in self.at
            for event_id, received in per_client.items()
            if event_id in sent
        ]

    def missing(self, expected: int) -> int:
        return sum(expected - len(set(per_client) & set(range(expected))) for per_client in self.at)

    @property
    def last(self) -> float:
        return max((max(c.values()) for c in self.at if c), default=time.time())


class CountedRequests(httpx.AsyncBaseTransport):
    """httpx's transport, counting the REST requests a store sends through it."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=200))
        self.sent = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent += 1
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


def _mean_event_bytes(plan: RunPlan) -> float:
    return statistics.fmean(len(w.event.model_dump_json().encode()) for w in plan.in_time_order)


async def _counted_span(setup: Setup) -> Counter[str]:
    await setup.reset_stats()
    return await setup.command_calls()


# What Upstash replicates to each read region, and so bills once more per region: the commands
# that change data (a script's own EVALSHA is the primary's; the writes it runs are replicated).
WRITE_COMMANDS = frozenset(
    {"set", "setex", "del", "unlink", "expire", "pexpire", "rename", "incr", "incrby", "decr"}
    | {"hset", "hsetnx", "hdel", "hincrby", "rpush", "rpushx", "lpush", "lpushx", "ltrim"}
)


async def _span_figures(setup: Setup, before: Counter[str]) -> dict[str, Any]:
    after = await setup.command_calls()
    stats = await setup.stats()
    billed = after - before
    # Upstash bills a subscription's end (UNSUBSCRIBE) as well as its start; the endpoint ends
    # one by dropping its Redis connection, which no command counts.
    if billed["subscribe"]:
        billed["unsubscribe"] = billed["subscribe"]
    return {
        "requests": int(stats["requests"]),
        "commands_top_level": int(stats["commands"]),
        "bytes_out": int(stats["bytes_out"]),
        "billed": sum(billed.values()),
        "billed_by_command": billed,
    }


async def project_delivery(setup: Setup, clients: int, duration: float) -> Delivery:
    """This design: POST creates the run, N SSE clients connect to the hosted stream function,
    then the run is written as bench/workload.py plans it (five provider workers at once)."""
    run_id = new_run_id()
    record = new_record(run_id)
    plan = plan_run(record, duration)
    await setup.subscriptions_settle(0)
    writer_requests = CountedRequests()
    store = setup.kv_store(writer_requests)
    receipts = Receipts(clients)
    sent: dict[int, float] = {}
    url = stream_url(setup.stream.base_url, run_id)
    connected = [asyncio.Event() for _ in range(clients)]

    async def listen(client: int, http: httpx.AsyncClient) -> None:
        async with aconnect_sse(http, "GET", url) as source:
            source.response.raise_for_status()
            async for sse in source.aiter_sse():
                if sse.retry is not None:
                    connected[client].set()
                if not sse.data:
                    continue
                receipts.note(client, int(sse.id))
                if is_terminal_data(sse.data):
                    return

    async def write_all(writes: list[Write], began: float) -> None:
        last_write: float | None = None  # a provider's worker holds its lease from its claim
        for w in writes:
            if last_write is not None and w.provider is not None:
                await renew_while_quiet(store, run_id, w, last_write, began)
            await sleep_until(began + w.at)
            at = time.time()
            for event_id in await write(store, run_id, w):
                sent[event_id] = at
            last_write = None if w.outcome is not None else time.monotonic()

    before = await _counted_span(setup)
    try:
        async with sse_client() as http:
            await store.create_run(record)
            readers = [asyncio.create_task(listen(c, http)) for c in range(clients)]
            async with asyncio.timeout(30):
                await asyncio.gather(*(c.wait() for c in connected))
            started = time.time()
            began = time.monotonic()
            await write_all(plan.opening, began)
            await asyncio.gather(*(write_all(ws, began) for ws in plan.workers))
            async with asyncio.timeout(30):
                await asyncio.gather(*readers)
        figures = await _span_figures(setup, before)
    finally:
        await store.aclose()
    return Delivery(
        design="this",
        clients=clients,
        duration=duration,
        events=plan.events,
        event_bytes=_mean_event_bytes(plan),
        seconds=receipts.last - started,
        latencies_ms=receipts.latencies_ms(sent),
        missing=receipts.missing(plan.events),
        duplicated=receipts.duplicated,
        writer_requests=writer_requests.sent,
        **figures,
    )


async def seed_delivery(setup: Setup, clients: int, duration: float) -> Delivery:
    """The seed: the same events at the same moments, appended one after another by
    read-modify-write of the run's blob; each client's loop polls the whole blob every 500 ms,
    phases spread at random."""
    run_id = new_run_id()
    plan = plan_run(new_record(run_id), duration)
    writes = plan.in_time_order
    writer_requests = CountedRequests()
    store = setup.seed_store(writer_requests)
    receipts = Receipts(clients)
    sent: dict[int, float] = {}
    phases = random.Random(clients).random

    before = await _counted_span(setup)
    try:
        await store.create_run(run_id)
        readers = [
            asyncio.create_task(
                store.stream(
                    run_id,
                    lambda index, _event, c=c: receipts.note(c, index),
                    first_poll_delay=0.5 * phases(),
                    within=duration + 60,
                )
            )
            for c in range(clients)
        ]
        started = time.time()
        began = time.monotonic()
        for index, w in enumerate(writes):
            await sleep_until(began + w.at)
            sent[index] = time.time()
            status = "completed" if index == len(writes) - 1 else None
            await store.append_event(run_id, json.loads(w.event.model_dump_json()), status=status)
        async with asyncio.timeout(30):
            await asyncio.gather(*readers)
        figures = await _span_figures(setup, before)
    finally:
        await store.aclose()
    return Delivery(
        design="seed",
        clients=clients,
        duration=duration,
        events=plan.events,
        event_bytes=_mean_event_bytes(plan),
        seconds=receipts.last - started,
        latencies_ms=receipts.latencies_ms(sent),
        missing=receipts.missing(plan.events),
        duplicated=receipts.duplicated,
        writer_requests=writer_requests.sent,
        **figures,
    )


# --- 50 concurrent writers (and reconnecting readers) ---

_WRITER_MESSAGE = re.compile(r"writer (\d+) event (\d+)")


@dataclass
class Writers:
    design: str
    writers: int
    each: int
    seconds: float
    stored: list[str]  # the stored events' messages
    errors: Counter[str] = field(default_factory=Counter)
    reader_missing: int | None = None
    reader_duplicated: int | None = None
    reader_reconnects: int = 0
    # Subscriptions the endpoint held, beyond one per reader, once the writers were done (before
    # the terminal event, which ends every stream anyway): streams whose client dropped them.
    leaked_subscriptions: int = 0

    @property
    def expected(self) -> int:
        return self.writers * self.each

    @property
    def appends_per_second(self) -> float:
        return self.expected / self.seconds

    @property
    def _tags(self) -> list[tuple[int, int]]:
        return [
            (int(m.group(1)), int(m.group(2)))
            for m in map(_WRITER_MESSAGE.search, self.stored)
            if m is not None
        ]

    @property
    def lost(self) -> int:
        return self.expected - len(set(self._tags))

    @property
    def duplicated(self) -> int:
        tags = self._tags
        return len(tags) - len(set(tags))


def _writer_event(writer: int, seq: int) -> ActivityEvent:
    provider = PROVIDER_IDS[writer % len(PROVIDER_IDS)]
    return ActivityEvent(provider=provider, message=f"Agent progress: writer {writer} event {seq}")


async def _run_writers(
    writers: int, each: int, append: Callable[[int, int], Awaitable[None]]
) -> tuple[float, Counter[str]]:
    errors: Counter[str] = Counter()

    async def writer(w: int) -> None:
        for seq in range(each):
            try:
                await append(w, seq)
            except Exception as error:  # counted and reported: a failed append is a lost event
                errors[type(error).__name__] += 1

    started = time.perf_counter()
    async with asyncio.timeout(90):
        await asyncio.gather(*(writer(w) for w in range(writers)))
    return time.perf_counter() - started, errors


@dataclass
class ReaderLog:
    ids: list[int] = field(default_factory=list)
    reconnects: int = 0


async def _reconnecting_reader(
    http: httpx.AsyncClient, url: str, rng: random.Random, connected: asyncio.Event
) -> ReaderLog:
    """Reads until the terminal event, dropping its connection every 3-10 events and coming
    back with Last-Event-ID, as an EventSource does after a network blip."""
    log = ReaderLog()
    last: int | None = None
    while True:
        headers = {"Last-Event-ID": str(last)} if last is not None else {}
        budget = rng.randint(3, 10)
        async with aconnect_sse(http, "GET", url, headers=headers) as source:
            if source.response.status_code == 204:
                return log  # the run is over and we have everything
            if source.response.status_code != 200:
                await asyncio.sleep(0.1)
                continue
            async for sse in source.aiter_sse():
                if sse.retry is not None:
                    connected.set()
                if not sse.data:
                    continue
                last = int(sse.id)
                log.ids.append(last)
                if is_terminal_data(sse.data):
                    return log
                budget -= 1
                if budget == 0:
                    break  # leaving the block closes the connection mid-stream
        log.reconnects += 1


async def project_writers(
    setup: Setup, writers: int = 50, each: int = 20, readers: int = 0
) -> Writers:
    """This design: `writers` tasks appending concurrently to one run (one KVStore, as one
    instance's providers would), then the terminal event; optionally with reconnecting readers
    on the stream function, whose ids are checked for gaps and repeats."""
    await setup.subscriptions_settle(0)
    store = setup.kv_store()
    run_id = new_run_id()
    record = new_record(run_id)
    url = stream_url(setup.stream.base_url, run_id)
    rng = random.Random(readers)
    connected = [asyncio.Event() for _ in range(readers)]

    async def append(w: int, seq: int) -> None:
        await store.append_event(run_id, _writer_event(w, seq))

    try:
        await store.create_run(record)
        async with sse_client() as http:
            reading = [
                asyncio.create_task(_reconnecting_reader(http, url, rng, connected[r]))
                for r in range(readers)
            ]
            if readers:
                async with asyncio.timeout(15):
                    await asyncio.gather(*(c.wait() for c in connected))
            seconds, errors = await _run_writers(writers, each, append)
            await asyncio.sleep(1.0)  # any stream a client dropped has had a second to end
            leaked = max(0, int((await setup.stats())["open_subscriptions"]) - readers)
            final = CompleteEvent(quotes=[], best=None, failed=[])
            await store.append_event(run_id, final)
            async with asyncio.timeout(60):
                logs = await asyncio.gather(*reading)
        stored = await store.read_events(run_id, -1)
    finally:
        await store.aclose()
    messages = [str(e.as_dict().get("message", "")) for e in stored]
    result = Writers("this", writers, each, seconds, messages, errors)
    if readers:
        total = len(stored)
        result.reader_missing = sum(total - len(set(log.ids)) for log in logs)
        result.reader_duplicated = sum(len(log.ids) - len(set(log.ids)) for log in logs)
        result.reader_reconnects = sum(log.reconnects for log in logs)
        result.leaked_subscriptions = leaked
    return result


async def seed_writers(setup: Setup, writers: int = 50, each: int = 20) -> Writers:
    """The seed: the same writers, each append a GET and a SET of the whole run."""
    store = setup.seed_store()
    run_id = new_run_id()

    async def append(w: int, seq: int) -> None:
        await store.append_event(run_id, json.loads(_writer_event(w, seq).model_dump_json()))

    try:
        await store.create_run(run_id)
        seconds, errors = await _run_writers(writers, each, append)
        run = await store.get_run(run_id)
    finally:
        await store.aclose()
    stored = [str(e.get("message", "")) for e in (run or {}).get("events", [])]
    return Writers("seed", writers, each, seconds, stored, errors)


# --- concurrent open streams in one function instance ---


@dataclass
class Streams:
    target: int
    opened: int  # answered with `retry:`
    held: int  # still open and received the live event
    rss_idle_kib: int
    rss_kib: int
    hwm_kib: int
    fds: int
    subscriptions: int
    fanout_p99_ms: float
    failures: Counter[str]


# The run's `started` event is id 0 (create_run): the warm-up event every stream must have
# received first is id 1, and the timed one id 2.
WARM_UP_ID, TIMED_ID = 1, 2


async def concurrent_streams(setup: Setup, target: int = 500) -> Streams:
    """A fresh instance of the stream function; `target` SSE clients on one run. Counted as held
    when a stream sent `retry:`, a first event, and then the live event appended once every
    stream had the first; memory is read from /proc while all of them are open."""
    host = FunctionHost(STREAM_FUNCTION, setup.function_env, setup.log_dir)
    store = setup.kv_store()
    failures: Counter[str] = Counter()
    run_id = new_run_id()
    record = new_record(run_id)
    opened = [asyncio.Event() for _ in range(target)]
    warmed = [asyncio.Event() for _ in range(target)]
    live = [asyncio.Event() for _ in range(target)]
    live_at: list[float] = []
    gate = asyncio.Semaphore(50)  # clients arrive in a burst, not all in the same millisecond

    async def hold(client: int, http: httpx.AsyncClient, url: str) -> None:
        try:
            async with gate:
                source_cm = aconnect_sse(http, "GET", url)
                source = await source_cm.__aenter__()
            try:
                source.response.raise_for_status()
                async for sse in source.aiter_sse():
                    if sse.retry is not None:
                        opened[client].set()
                    if not sse.data:
                        continue
                    if sse.id == str(WARM_UP_ID):
                        warmed[client].set()
                    elif sse.id == str(TIMED_ID):
                        live_at.append(time.time())
                        live[client].set()
                    if is_terminal_data(sse.data):
                        return
            finally:
                await source_cm.__aexit__(None, None, None)
        except Exception as error:  # counted and reported: the stream was not held
            failures[f"{type(error).__name__}: {str(error)[:60]}"] += 1

    await setup.subscriptions_settle(0)
    await asyncio.to_thread(host.start)
    try:
        async with sse_client() as http:
            # One request first, so the idle figure includes what serving one costs.
            await http.get(stream_url(host.base_url, "x" * 22))
            rss_idle = host.memory_kib()["VmRSS"]
            await store.create_run(record)
            url = stream_url(host.base_url, run_id)
            tasks = [asyncio.create_task(hold(c, http, url)) for c in range(target)]
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(60):
                    await asyncio.gather(*(e.wait() for e in opened))
            # One run: the instance's streams share one subscription.
            subscriptions = await setup.subscriptions_settle(1, within=20)
            # A stream answers `retry:` before it has subscribed and read its backlog: a first
            # event that every stream has received shows each is live, then the timed one.
            assert await store.append_event(run_id, _writer_event(0, 0)) == WARM_UP_ID
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(60):
                    await asyncio.gather(*(e.wait() for e in warmed))
            sent = time.time()
            assert await store.append_event(run_id, _writer_event(0, 1)) == TIMED_ID
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(20):
                    await asyncio.gather(*(e.wait() for e in live))
            held = sum(1 for t, e in zip(tasks, live, strict=True) if e.is_set() and not t.done())
            memory, fds = host.memory_kib(), host.open_fds()
            final = CompleteEvent(quotes=[], best=None, failed=[])
            await store.append_event(run_id, final)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(30):
                    await asyncio.gather(*tasks)
            for task in tasks:
                task.cancel()
    finally:
        await store.aclose()
        await asyncio.to_thread(host.stop)
    latencies = [(t - sent) * 1000 for t in live_at]
    if latencies and min(latencies) < 0:
        raise AssertionError("a stream had the timed event before it was sent: wrong event timed")
    return Streams(
        target=target,
        opened=sum(e.is_set() for e in opened),
        held=held,
        rss_idle_kib=rss_idle,
        rss_kib=memory["VmRSS"],
        hwm_kib=memory["VmHWM"],
        fds=fds,
        subscriptions=subscriptions,
        fanout_p99_ms=percentile(latencies, 0.99),
        failures=failures,
    )


# --- reads served by a replica behind the primary ---

REPLICA_LAG_MS = 100


async def replica_delivery(setup: Setup, duration: float) -> Delivery:
    """`project_delivery` with 1 client while every read is served by a read region
    REPLICA_LAG_MS behind the primary (the stream learns of an append from the primary's
    notice before its replica has it)."""
    await asyncio.to_thread(setup.endpoint.configure, replica_lag_ms=REPLICA_LAG_MS)
    try:
        return await project_delivery(setup, 1, duration)
    finally:
        await asyncio.to_thread(setup.endpoint.configure, replica_lag_ms=0)


# --- many viewers of one run, without push ---


@dataclass
class Polling:
    viewers: int
    idle_seconds: float
    idle_billed: int  # billed commands while nothing was appended
    idle_by_command: Counter[str]
    events: int  # appended after the idle span
    missing: int  # (viewer, event) pairs never received
    duplicated: int
    seed_idle_per_second: float  # the seed's: every viewer GETs the blob every 500 ms

    @property
    def idle_per_second(self) -> float:
        return self.idle_billed / self.idle_seconds


async def shared_polling(
    setup: Setup, viewers: int = 200, idle_seconds: float = 20.0, events: int = 5
) -> Polling:
    """A fresh stream-function instance with push refused (CONFIG answered with an error and
    /subscribe failing): `viewers` SSE clients on one run; billed commands while the run is
    idle, then `events` appends every viewer must receive."""
    await asyncio.to_thread(setup.endpoint.configure, refuse_config=True, fail_subscribe=True)
    host = FunctionHost(STREAM_FUNCTION, setup.function_env, setup.log_dir)
    store = setup.kv_store()
    run_id = new_run_id()
    receipts = Receipts(viewers)
    first = [asyncio.Event() for _ in range(viewers)]
    total = 1 + events + 1  # started, the appends, the terminal event
    gate = asyncio.Semaphore(50)

    async def view(viewer: int, http: httpx.AsyncClient, url: str) -> None:
        async with gate:
            source_cm = aconnect_sse(http, "GET", url)
            source = await source_cm.__aenter__()
        try:
            source.response.raise_for_status()
            async for sse in source.aiter_sse():
                if not sse.data:
                    continue
                receipts.note(viewer, int(sse.id))
                first[viewer].set()
                if is_terminal_data(sse.data):
                    return
        finally:
            await source_cm.__aexit__(None, None, None)

    await asyncio.to_thread(host.start)
    try:
        async with sse_client() as http:
            await store.create_run(new_record(run_id))
            url = stream_url(host.base_url, run_id)
            tasks = [asyncio.create_task(view(v, http, url)) for v in range(viewers)]
            async with asyncio.timeout(60):
                await asyncio.gather(*(e.wait() for e in first))
            await asyncio.sleep(8.0)  # the poll backs off to its idle pace
            before = await setup.command_calls()
            await asyncio.sleep(idle_seconds)
            idle = await setup.command_calls()
            idle.subtract(before)
            for n in range(events):
                await store.append_event(run_id, _writer_event(0, n))
                await asyncio.sleep(0.5)
            await store.append_event(run_id, CompleteEvent(quotes=[], best=None, failed=[]))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(30):
                    await asyncio.gather(*tasks, return_exceptions=True)
            for task in tasks:
                task.cancel()
    finally:
        await store.aclose()
        await asyncio.to_thread(host.stop)
        await asyncio.to_thread(setup.endpoint.configure, refuse_config=False, fail_subscribe=False)
    spent = Counter({name: n for name, n in idle.items() if n > 0})
    return Polling(
        viewers=viewers,
        idle_seconds=idle_seconds,
        idle_billed=sum(spent.values()),
        idle_by_command=spent,
        events=total,
        missing=receipts.missing(total),
        duplicated=receipts.duplicated,
        seed_idle_per_second=viewers / 0.5,
    )


# --- cold import time ---

_IMPORT_CHILD = """\
import importlib.util, sys, time
root, path = sys.argv[1], sys.argv[2]
sys.path.insert(0, root)
started = time.perf_counter()
spec = importlib.util.spec_from_file_location("function_under_test", path)
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
elapsed = time.perf_counter() - started
assert callable(getattr(module, "app", None)), "the module has no app"
print(f"{elapsed * 1000:.3f}")
"""
BARE_ASGI = "async def app(scope, receive, send):\n    ...\n"
BARE_STARLETTE = "from starlette.applications import Starlette\n\napp = Starlette()\n"


@dataclass
class Imports:
    repeats: int
    functions: dict[str, float]  # api file -> fastest import, ms
    bare_asgi: float
    bare_starlette: float


def _import_ms(path: Path) -> float:
    """Import `path` fresh in a new interpreter; the time its import took, in ms."""
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_CHILD, str(ROOT), str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"importing {path} failed:\n{done.stderr[-800:]}")
    return float(done.stdout.strip().splitlines()[-1])


def cold_imports(function_files: list[str], repeats: int = 7) -> Imports:
    """Each file imported `repeats` times, round-robin (so a burst of load on this shared
    machine hits every file alike), after one untimed round that leaves the bytecode cache as
    a deployed function has it; the fastest of each (on a shared machine noise only adds)."""
    with tempfile.TemporaryDirectory(prefix="bench-imports-") as scratch:
        bare = Path(scratch, "bare_asgi.py")
        bare.write_text(BARE_ASGI)
        starlette = Path(scratch, "bare_starlette.py")
        starlette.write_text(BARE_STARLETTE)
        paths = {f: ROOT / f for f in function_files} | {"asgi": bare, "starlette": starlette}
        samples: dict[str, list[float]] = {name: [] for name in paths}
        for round_ in range(repeats + 1):
            for name, path in paths.items():
                elapsed = _import_ms(path)
                if round_:
                    samples[name].append(elapsed)
        fastest = {name: min(values) for name, values in samples.items()}
        return Imports(
            repeats=repeats,
            functions={f: fastest[f] for f in function_files},
            bare_asgi=fastest["asgi"],
            bare_starlette=fastest["starlette"],
        )
