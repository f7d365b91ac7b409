"""What `make bench` measures. Each scenario uses a fresh run id and returns plain figures;
`bench/report.py` turns them into the table.

Latency is taken the same way for both designs: the worker notes `time.time()` just before the
request that appends event N, each client notes `time.time()` the moment it has parsed event N,
and the difference is one sample (all in this process, so one clock). KV traffic is what the
Upstash REST endpoint counted between a reset and the end of the scenario: the worker's requests
and every reader's, subscriptions included.
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
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import aconnect_sse

from bench.infra import ROOT, FunctionHost, UpstashEndpoint
from bench.seed import SeedStore
from lib.models import (
    PROVIDER_IDS,
    PROVIDER_NAMES,
    ActivityEvent,
    CompleteEvent,
    Quote,
    QuoteEvent,
    QuoteRequest,
    RunEvent,
    RunRecord,
    StartedEvent,
    new_run_id,
    utc_now,
)
from lib.store.base import stored_event_json
from lib.store.kv import KVStore
from lib.workflow import new_run_record

STREAM_FUNCTION = "api/quotes/[runId]/stream.py"
EVENTS_PER_RUN = 100
# The worker's pace: a gap drawn uniformly from this range (seconds) before each event.
PACE = (0.020, 0.050)
TTL_SECONDS = 7200


# --- shared plumbing ---


@dataclass
class Setup:
    """The processes every scenario talks to."""

    endpoint: UpstashEndpoint
    stream: FunctionHost
    function_env: dict[str, str]
    log_dir: Path

    def kv_store(self) -> KVStore:
        return KVStore(self.endpoint.url, UpstashEndpoint.TOKEN, ttl_seconds=TTL_SECONDS)

    def seed_store(self) -> SeedStore:
        return SeedStore(self.endpoint.url, UpstashEndpoint.TOKEN)

    async def stats(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.endpoint.stats)

    async def reset_stats(self) -> None:
        await asyncio.to_thread(self.endpoint.reset_stats)

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


SAMPLE_REQUEST = QuoteRequest.model_validate(
    {
        "vin": "2C3CDZAG2GH967639",
        "zip": "94107",
        "driver": {"firstName": "Ana", "lastName": "Lee", "dateOfBirth": "1990-04-12"},
    }
)


def new_record(run_id: str) -> RunRecord:
    """A processing run of all five insurers, as POST /api/quotes creates it."""
    return new_run_record(
        run_id, SAMPLE_REQUEST, list(PROVIDER_IDS), utc_now() + timedelta(seconds=290)
    )


def completed_record(record: RunRecord) -> RunRecord:
    return record.model_copy(update={"status": "completed", "updated_at": utc_now()})


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


# --- the events of a realistic run ---

_STEPS = (
    "Opening {name} quote page",
    "Entering ZIP code and starting an auto quote",
    "Entering vehicle details for VIN …7639",
    "Answering driver history questions",
    "Selecting standard coverage",
    "Waiting for the premium to be calculated",
    "Reading the quoted premium",
)


def _quote(provider: str, index: int) -> Quote:
    monthly = 118.0 + 9.5 * index
    return Quote.model_validate(
        {
            "provider": provider,
            "monthlyPremium": monthly,
            "annualPremium": round(monthly * 12, 2),
            "coverage": "standard",
            "deductible": 1000,
            "source": "simulated",
            "quotedAt": utc_now(),
        }
    )


def run_events(count: int = EVENTS_PER_RUN) -> list[RunEvent]:
    """`started`, agent activity from five insurers, a quote from each, then `complete`."""
    quotes = [_quote(p, i) for i, p in enumerate(PROVIDER_IDS)]
    quote_at = {count - 2 - 4 * i: q for i, q in enumerate(reversed(quotes))}
    events: list[RunEvent] = [StartedEvent(providers=list(PROVIDER_IDS), total=len(PROVIDER_IDS))]
    for index in range(1, count - 1):
        if index in quote_at:
            quote = quote_at[index]
            events.append(QuoteEvent(provider=quote.provider, quote=quote))
            continue
        provider = PROVIDER_IDS[index % len(PROVIDER_IDS)]
        step = _STEPS[(index // len(PROVIDER_IDS)) % len(_STEPS)]
        message = f"{step.format(name=PROVIDER_NAMES[provider])} (step {index})"
        events.append(ActivityEvent(provider=provider, message=message))
    events.append(CompleteEvent(quotes=quotes, best=quotes[0].provider, failed=[]))
    return events


def event_gaps(count: int, scale: float = 1.0, seed: int = 20261128) -> list[float]:
    """The same pseudo-random gaps for both designs."""
    rng = random.Random(seed)
    return [rng.uniform(*PACE) * scale for _ in range(count)]


# --- delivery: 100 events, N clients streaming throughout ---


@dataclass
class Delivery:
    design: str
    clients: int
    events: int
    event_bytes: float  # mean stored size of an event
    seconds: float  # first append to last receipt
    latencies_ms: list[float]
    missing: int  # (client, event) pairs never received
    duplicated: int
    requests: int
    commands: int
    bytes_out: int

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


async def _write_paced(
    events: list[RunEvent],
    gaps: list[float],
    append: Callable[[int, RunEvent], Awaitable[None]],
    sent: dict[int, float],
) -> None:
    moment = time.monotonic()
    for index, event in enumerate(events):
        moment += gaps[index]
        await sleep_until(moment)
        sent[index] = time.time()
        await append(index, event)


def _counted(design: str, clients: int, events: list[RunEvent], **figures: Any) -> Delivery:
    stats: dict[str, Any] = figures.pop("stats")
    return Delivery(
        design=design,
        clients=clients,
        events=len(events),
        event_bytes=statistics.fmean(len(stored_event_json(e).encode()) for e in events),
        requests=int(stats["requests"]),
        commands=int(stats["commands"]),
        bytes_out=int(stats["bytes_out"]),
        **figures,
    )


async def project_delivery(setup: Setup, clients: int, gap_scale: float = 1.0) -> Delivery:
    """This design: N SSE clients on the hosted stream function; the worker appends with
    `KVStore.append_event` (one Lua script each; the terminal one with the final record)."""
    events = run_events()
    gaps = event_gaps(len(events), gap_scale)
    await setup.subscriptions_settle(0)
    store = setup.kv_store()
    receipts = Receipts(clients)
    sent: dict[int, float] = {}
    run_id = new_run_id()
    record = new_record(run_id)
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

    async def append(index: int, event: RunEvent) -> None:
        final = completed_record(record) if index == len(events) - 1 else None
        event_id = await store.append_event(run_id, event, record=final)
        assert event_id == index, f"append returned id {event_id} for event {index}"

    await setup.reset_stats()
    try:
        async with sse_client() as http:
            await store.create_run(record)
            readers = [asyncio.create_task(listen(c, http)) for c in range(clients)]
            async with asyncio.timeout(15):
                await asyncio.gather(*(c.wait() for c in connected))
            await setup.subscriptions_settle(clients, within=5)
            started = time.time()
            await _write_paced(events, gaps, append, sent)
            async with asyncio.timeout(30):
                await asyncio.gather(*readers)
        stats = await setup.stats()
    finally:
        await store.aclose()
    return _counted(
        "this",
        clients,
        events,
        stats=stats,
        seconds=receipts.last - started,
        latencies_ms=receipts.latencies_ms(sent),
        missing=receipts.missing(len(events)),
        duplicated=receipts.duplicated,
    )


async def seed_delivery(setup: Setup, clients: int, gap_scale: float = 1.0) -> Delivery:
    """The seed: the same events at the same pace, appended by read-modify-write of the run's
    blob; each client's loop polls the whole blob every 500 ms, phases spread at random."""
    events = run_events()
    gaps = event_gaps(len(events), gap_scale)
    store = setup.seed_store()
    receipts = Receipts(clients)
    sent: dict[int, float] = {}
    run_id = new_run_id()
    phases = random.Random(clients).random

    async def append(index: int, event: RunEvent) -> None:
        status = "completed" if index == len(events) - 1 else None
        await store.append_event(run_id, json.loads(stored_event_json(event)), status=status)

    await setup.reset_stats()
    try:
        await store.create_run(run_id)
        readers = [
            asyncio.create_task(
                store.stream(
                    run_id,
                    lambda index, _event, c=c: receipts.note(c, index),
                    first_poll_delay=0.5 * phases(),
                )
            )
            for c in range(clients)
        ]
        started = time.time()
        await _write_paced(events, gaps, append, sent)
        async with asyncio.timeout(30):
            await asyncio.gather(*readers)
        stats = await setup.stats()
    finally:
        await store.aclose()
    return _counted(
        "seed",
        clients,
        events,
        stats=stats,
        seconds=receipts.last - started,
        latencies_ms=receipts.latencies_ms(sent),
        missing=receipts.missing(len(events)),
        duplicated=receipts.duplicated,
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
            await store.append_event(run_id, final, record=completed_record(record))
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
        await store.append_event(run_id, json.loads(stored_event_json(_writer_event(w, seq))))

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


async def concurrent_streams(setup: Setup, target: int = 500) -> Streams:
    """A fresh instance of the stream function; `target` SSE clients on one run. Counted as held
    when a stream sent `retry:` and then delivered a live event appended once all were open;
    memory is read from /proc while all of them are open."""
    host = FunctionHost(STREAM_FUNCTION, setup.function_env, setup.log_dir)
    store = setup.kv_store()
    failures: Counter[str] = Counter()
    run_id = new_run_id()
    record = new_record(run_id)
    opened = [asyncio.Event() for _ in range(target)]
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
                    if sse.data:
                        if not live[client].is_set():
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
            subscriptions = await setup.subscriptions_settle(target, within=20)
            sent = time.time()
            await store.append_event(run_id, _writer_event(0, 0))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(20):
                    await asyncio.gather(*(e.wait() for e in live))
            held = sum(1 for t, e in zip(tasks, live, strict=True) if e.is_set() and not t.done())
            memory, fds = host.memory_kib(), host.open_fds()
            final = CompleteEvent(quotes=[], best=None, failed=[])
            await store.append_event(run_id, final, record=completed_record(record))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(30):
                    await asyncio.gather(*tasks)
            for task in tasks:
                task.cancel()
    finally:
        await store.aclose()
        await asyncio.to_thread(host.stop)
    return Streams(
        target=target,
        opened=sum(e.is_set() for e in opened),
        held=held,
        rss_idle_kib=rss_idle,
        rss_kib=memory["VmRSS"],
        hwm_kib=memory["VmHWM"],
        fds=fds,
        subscriptions=subscriptions,
        fanout_p99_ms=percentile([(t - sent) * 1000 for t in live_at], 0.99),
        failures=failures,
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
    functions: dict[str, float]  # api file -> median ms
    bare_asgi: float
    bare_starlette: float


def _median_import_ms(path: Path, repeats: int) -> float:
    """Import `path` fresh in a new interpreter `repeats` times (after one untimed run that
    leaves the bytecode cache as a deployed function has it); the median, in ms."""
    samples = []
    for attempt in range(repeats + 1):
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
        if attempt:
            samples.append(float(done.stdout.strip().splitlines()[-1]))
    return statistics.median(samples)


def cold_imports(function_files: list[str], repeats: int = 7) -> Imports:
    with tempfile.TemporaryDirectory(prefix="bench-imports-") as scratch:
        bare = Path(scratch, "bare_asgi.py")
        bare.write_text(BARE_ASGI)
        starlette = Path(scratch, "bare_starlette.py")
        starlette.write_text(BARE_STARLETTE)
        return Imports(
            repeats=repeats,
            functions={f: _median_import_ms(ROOT / f, repeats) for f in function_files},
            bare_asgi=_median_import_ms(bare, repeats),
            bare_starlette=_median_import_ms(starlette, repeats),
        )
