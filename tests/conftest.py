from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest

from lib.config import get_settings
from lib.models import (
    PROVIDER_IDS,
    ProviderId,
    ProviderState,
    Quote,
    RunRecord,
    new_run_id,
    utc_now,
)
from lib.store import Store, open_store
from lib.store.kv import KVStore
from lib.store.sqlite import SQLiteStore
from tests.functions import VercelRouter

pytest_plugins = ["tests.upstash_rest", "tests.log_capture", "tests.kv_meter"]
# The shared helpers' asserts fail with the detail a test's own do (pytest rewrites the asserts
# of test modules, conftest.py and plugins only).
pytest.register_assert_rewrite(
    "tests.hosts",
    "tests.http_helpers",
    "tests.store_steps",
    "tests.stored_data",
    "tests.tinyfish_attempts",
    "tests.worker_inputs",
)


def make_record(run_id: str | None = None, **changes: object) -> RunRecord:
    now = utc_now()
    record = RunRecord(
        run_id=run_id or new_run_id(),
        created_at=now,
        updated_at=now,
        deadline=now + timedelta(seconds=290),
        coverage="standard",
        providers=[ProviderState(provider=p) for p in PROVIDER_IDS],
    )
    return record.model_copy(update=changes)


def make_quote(provider: ProviderId = "geico", monthly: float = 120.0) -> Quote:
    return Quote(
        provider=provider,
        monthly_premium=monthly,
        annual_premium=round(monthly * 12, 2),
        coverage="standard",
        deductible=1000,
        source="simulated",
        quoted_at=utc_now(),
    )


async def eventually(
    condition: Callable[[], Awaitable[object] | object], what: str = "", within: float = 15.0
) -> None:
    """Wait for `condition` (sync or async) to hold, looking again whenever the loop has run
    others; `within` only bounds a broken build."""
    give_up = time.monotonic() + within
    while True:
        value = condition()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return
        assert time.monotonic() < give_up, f"never happened: {what or condition}"
        await asyncio.sleep(0.01)


@pytest.fixture(params=["sqlite", "kv"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_factory(store_kind: str, tmp_path, request: pytest.FixtureRequest):
    """Builds stores of the parametrised kind that share one backing storage, as instances do."""
    if store_kind == "kv":
        server = request.getfixturevalue("upstash_server")

        def build(ttl_seconds: int = 7200, **options: object) -> Store:
            return KVStore(server.url, server.token, ttl_seconds=ttl_seconds, **options)  # type: ignore[arg-type]
    else:
        path = str(tmp_path / "quotes.sqlite3")

        def build(ttl_seconds: int = 7200, **options: object) -> Store:
            options.pop("silence_seconds", None)
            return SQLiteStore(path, ttl_seconds=ttl_seconds)

    build.kind = store_kind  # type: ignore[attr-defined]
    build.cli_args = (  # type: ignore[attr-defined]
        [
            "kv",
            request.getfixturevalue("upstash_server").url,
            request.getfixturevalue("upstash_server").token,
        ]
        if store_kind == "kv"
        else ["sqlite", str(tmp_path / "quotes.sqlite3")]
    )
    return build


@pytest.fixture
async def store(store_factory) -> AsyncIterator[Store]:
    built = store_factory()
    yield built
    await built.aclose()


async def run_end(api: httpx.AsyncClient, run_id: str) -> dict[str, Any]:
    """The run's snapshot once the queue worker has finished it (each stream GET returns after
    the next events, or after STREAM_MAX_SECONDS)."""
    for _ in range(20):
        snapshot: dict[str, Any] = (await api.get(f"/api/quotes/{run_id}")).json()
        if snapshot["status"] != "processing":
            return snapshot
        cursor = str(snapshot["lastEventId"])
        await api.get(f"/api/quotes/{run_id}/stream", headers={"Last-Event-ID": cursor})
    raise AssertionError(f"run {run_id} did not finish")


@pytest.fixture(scope="session")
def queue_server() -> Iterator[Any]:
    """vercel-queue's embedded queue service on a local port, for the whole session."""
    from vercel.queue.devserver import embedded_queue_dev_server

    with embedded_queue_dev_server(manual_clock=False) as server:
        yield server


@pytest.fixture
def queue_env(queue_server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """This process's functions send to the embedded queue service, as `make dev`'s do."""
    queue_server.reset()
    monkeypatch.setenv("VERCEL_QUEUE_BASE_URL", queue_server.base_url)
    monkeypatch.setenv("VERCEL_QUEUE_TOKEN", "vc-dev-token")
    monkeypatch.setenv("VERCEL_REGION", "dev1")
    from vercel.queue.testing import reset_default_queue_clients

    reset_default_queue_clients()
    return queue_server


@pytest.fixture
async def queue_worker(queue_env: Any) -> AsyncIterator[Any]:
    """The worker function (api/work.py) consuming the queue in this process: the SDK's own
    polling loop hands each message to the function's subscriber."""
    from vercel.queue import poll_and_handle

    from tests.functions import FUNCTION_FILES, load_function

    worker = load_function(FUNCTION_FILES["work"])
    consumer = asyncio.create_task(poll_and_handle(worker.subscriber(), interval=0.02))
    yield worker
    consumer.cancel()
    # Bounded: a delivery cut mid-way can leave the SDK's lease renewal waiting (seen once in
    # CI as a 120 s teardown); the next test's fixture starts from fresh clients anyway.
    with contextlib.suppress(asyncio.CancelledError, TimeoutError):
        await asyncio.wait_for(consumer, 10)
    from vercel.queue.testing import reset_default_async_queue_clients

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(reset_default_async_queue_clients(), 10)


@pytest.fixture
def embedded_queue(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """vercel-queue's embedded queue service over HTTP, as `make dev` runs it, with this process's
    environment pointing the SDK at it (what `make dev` gives every function). Yields the SDK's
    EmbeddedQueueDevServer: `.base_url`, `.state`, `.iter_push_deliveries(topic, consumer)`."""
    from vercel.queue.devserver import embedded_queue_dev_server  # 0.4 s: only where used

    with embedded_queue_dev_server(manual_clock=False) as server:
        monkeypatch.setenv("VERCEL_QUEUE_BASE_URL", server.base_url)
        monkeypatch.setenv("VERCEL_QUEUE_TOKEN", "vc-dev-token")
        monkeypatch.setenv("VERCEL_REGION", "dev1")
        yield server


# The routes' fixtures: a function instance's environment on each store, and clients of it.


@pytest.fixture
def configure(store_kind: str, tmp_path, monkeypatch, request: pytest.FixtureRequest):
    """Sets the environment of a function instance; call again to change it."""

    def apply(**env: str) -> None:
        for name in (
            *("KV_REST_API_URL", "KV_REST_API_TOKEN", "VERCEL", "VERCEL_ENV", "TINYFISH_API_KEY"),
            *("QUOTES_API_KEYS", "QUOTES_SECRET", "QUOTES_PUBLIC", "QUOTE_RUNS_PER_DAY_TOTAL"),
        ):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("QUOTES_DB_PATH", str(tmp_path / "quotes.sqlite3"))
        monkeypatch.setenv("SIMULATED_DELAY_SCALE", "0")
        monkeypatch.setenv("RUN_LEASE_SECONDS", "3")
        monkeypatch.setenv("STREAM_MAX_SECONDS", "5")
        monkeypatch.setenv("QUOTE_RATE_LIMIT_PER_MINUTE", "0")
        # The KV tier's counters outlive a test; the tests of limits set their own.
        monkeypatch.setenv("QUOTE_RUNS_PER_DAY", "0")
        if store_kind == "kv":
            server = request.getfixturevalue("upstash_server")
            monkeypatch.setenv("KV_REST_API_URL", server.url)
            monkeypatch.setenv("KV_REST_API_TOKEN", server.token)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()

    apply()
    yield apply
    get_settings.cache_clear()


BASE_URL = "http://testserver"

FreshInstance = Callable[..., httpx.AsyncClient]


@pytest.fixture
async def api(configure, queue_worker) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=VercelRouter())
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
        yield client


@pytest.fixture
async def fresh_instance(configure, queue_worker) -> AsyncIterator[FreshInstance]:
    """Opens a client of a new function instance, which reads the environment `configure` set
    last; keyword options go to its transport (`client=(host, port)` is the caller's address)."""
    async with contextlib.AsyncExitStack() as opened:

        def open_instance(app: VercelRouter | None = None, **options: Any) -> httpx.AsyncClient:
            transport = httpx.ASGITransport(app=VercelRouter() if app is None else app, **options)
            client = httpx.AsyncClient(transport=transport, base_url=BASE_URL)
            opened.push_async_callback(client.aclose)
            return client

        yield open_instance


@pytest.fixture
async def configured_store(configure) -> AsyncIterator[Store]:
    """The store as the function instance `configure` set up opens it, from its settings (not
    `store`: a store of `store_kind` built directly)."""
    built = open_store(get_settings())
    yield built
    await built.aclose()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test has a node id of its own. pytest-xdist (`make test` runs on several workers)
    schedules by node id, so two tests sharing one would quietly run as one."""
    seen: set[str] = set()
    shared = {item.nodeid for item in items if item.nodeid in seen or seen.add(item.nodeid)}
    if shared:
        raise pytest.UsageError(f"tests share node ids (give them ids of their own): {shared}")
