"""A real run through the functions: the `make dev` host (every `api/` function as its own
processes, the embedded Vercel Queues service delivering to `api/work.py`) on the benchmark's
Upstash REST endpoint, the simulated quote source slowed so the run lasts about four minutes,
one POST with all five providers and one SSE viewer to `complete`. Everything the workers, their
lease renewals, admission and the stream send is billed, not only what bench/workload.py writes.

The seed's figure is the same run in the seed's design, kept in lockstep on a redis-server and
endpoint of its own (so neither count includes the other's): its blob is created when our POST
is answered, every event the viewer receives is appended to it as the seed appends (GET + SET of
the blob), and its one viewer polls the blob every 500 ms until the run is no longer processing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import aconnect_sse

from bench.infra import ROOT, BenchError, RedisServer, UpstashEndpoint, command_calls
from bench.scenarios import WRITE_COMMANDS, Setup, _span_figures
from bench.seed import SeedStore
from lib.admission import kv as admission_kv
from lib.models import PROVIDER_IDS, QuoteRequest
from lib.providers.simulated import simulated_timeline
from lib.store import kv as store_kv
from lib.store.upstash import LuaScript
from tools.devhost import RunningDevHost, start_devhost_process

TARGET_SECONDS = 240.0  # the seed's own example run
# The run ends a little after its slowest provider (its outcome, the finish, the stream's read).
END_MARGIN_SECONDS = 2.0
REQUEST: dict[str, Any] = {
    "vin": "2C3CDZAG2GH967639",
    "zip": "94107",
    "driver": {"firstName": "Ana", "lastName": "Lee", "dateOfBirth": "1990-04-12"},
}
MAX_CONNECTIONS = 20  # a viewer's reconnections before the run is called stuck
QUIET_SECONDS = 3.0  # the bill has settled once no command has run for this long


@dataclass
class FunctionsRun:
    """One run through the functions, and the same run in the seed's design."""

    delay_scale: float
    seconds: float  # POST sent → `complete` parsed by the viewer
    events: int
    duplicated: int
    reconnects: int
    terminal: str
    billed: int
    billed_by_command: Counter[str]
    seed_billed: int
    seed_by_command: Counter[str]

    @property
    def billed_writes(self) -> int:
        return sum(n for name, n in self.billed_by_command.items() if name in WRITE_COMMANDS)

    @property
    def seed_writes(self) -> int:
        return sum(n for name, n in self.seed_by_command.items() if name in WRITE_COMMANDS)


def delay_scale_for(seconds: float) -> float:
    """SIMULATED_DELAY_SCALE that makes the slowest provider's simulated attempt end `seconds`
    after it began (a timeline is a pure function of the request and the insurer)."""
    request = QuoteRequest.model_validate(REQUEST)
    slowest = max(
        simulated_timeline(request, provider, delay_scale=1.0).ends_after
        for provider in PROVIDER_IDS
    )
    return seconds / slowest


def _load_scripts(endpoint: UpstashEndpoint) -> None:
    """SCRIPT LOAD every script the functions send, before the counted span: a deployed KV's
    script cache is warm, so no measured EVALSHA pays a NOSCRIPT round trip. Through the
    endpoint, which translates Upstash's `allow-key-locking` shebang for redis-server."""
    scripts = [
        value
        for module in (store_kv, admission_kv)
        for value in vars(module).values()
        if isinstance(value, LuaScript)
    ]
    headers = {"Authorization": f"Bearer {UpstashEndpoint.TOKEN}"}
    with httpx.Client(headers=headers, timeout=10) as http:
        for script in scripts:
            answer = http.post(endpoint.url, json=["SCRIPT", "LOAD", script.source]).json()
            if answer.get("result") != script.sha:
                raise BenchError(f"SCRIPT LOAD of {script.name} answered {answer}")


async def _settled(url: str, within: float = 30.0) -> Counter[str]:
    """Wait until nothing has run for QUIET_SECONDS (the workers' last writes, the queue's
    acknowledgements, the stream's unsubscribe); the counts then."""
    deadline = time.monotonic() + within
    last = await asyncio.to_thread(command_calls, url)
    while time.monotonic() < deadline:
        await asyncio.sleep(QUIET_SECONDS)
        now = await asyncio.to_thread(command_calls, url)
        if now == last:
            break
        last = now
    return last


def host_env(setup: Setup, delay_scale: float, data_dir: Path) -> dict[str, str]:
    return {
        "KV_REST_API_URL": setup.endpoint.url,
        "KV_REST_API_TOKEN": UpstashEndpoint.TOKEN,
        "TINYFISH_API_KEY": "",  # the simulated quote source
        "SIMULATED_DELAY_SCALE": f"{delay_scale:.4f}",
        # An attempt lasts about the whole run: the 180 s default would time it out.
        "PROVIDER_TIMEOUT_SECONDS": str(int(TARGET_SECONDS + 60)),
        "QUOTES_DB_PATH": str(data_dir / "unused.sqlite3"),
        "VERCEL_ENV": "development",
        # The bench's own stream host runs with a 600 s lease; these functions use the default.
        "RUN_LEASE_SECONDS": "",
        "STREAM_MAX_SECONDS": "",
    }


class Viewer:
    """One SSE viewer, reconnecting with Last-Event-ID as a browser's EventSource does."""

    def __init__(
        self,
        base_url: str,
        run_id: str,
        on_event: Callable[[dict[str, Any], str], Awaitable[None]],
    ) -> None:
        self.url = f"{base_url}/api/quotes/{run_id}/stream"
        self.ids: set[int] = set()
        self.duplicated = 0
        self.reconnects = -1
        self.terminal = ""
        self._on_event = on_event

    async def watch(self, within: float) -> None:
        async with asyncio.timeout(within), httpx.AsyncClient(timeout=httpx.Timeout(None)) as http:
            for _ in range(MAX_CONNECTIONS):
                if await self._visit(http):
                    return
                await asyncio.sleep(1.0)  # EventSource's reconnection delay, roughly
            raise BenchError(f"the viewer reconnected {MAX_CONNECTIONS} times without an end")

    async def _visit(self, http: httpx.AsyncClient) -> bool:
        """One connection, read until the run's terminal event (True) or the server closes."""
        self.reconnects += 1
        headers = {"Last-Event-ID": str(max(self.ids))} if self.ids else {}
        async with aconnect_sse(http, "GET", self.url, headers=headers) as source:
            source.response.raise_for_status()
            async for sse in source.aiter_sse():
                if sse.data:
                    await self._note(int(sse.id), json.loads(sse.data))
                    if self.terminal:
                        return True
        return False

    async def _note(self, event_id: int, event: dict[str, Any]) -> None:
        if event_id in self.ids:
            self.duplicated += 1
            return
        self.ids.add(event_id)
        if event.get("type") in ("complete", "error"):
            self.terminal = str(event["type"])
        await self._on_event(event, self.terminal)


async def functions_run(setup: Setup, target_seconds: float = TARGET_SECONDS) -> FunctionsRun:
    if not RedisServer.available():
        raise BenchError("the seed's lockstep run needs a redis-server of its own")
    delay_scale = delay_scale_for(target_seconds - END_MARGIN_SECONDS)
    await asyncio.to_thread(_load_scripts, setup.endpoint)
    with contextlib.ExitStack() as stack:
        data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-fn-")))
        seed_redis = stack.enter_context(RedisServer(setup.log_dir, name="seed-redis-server"))
        seed_endpoint = stack.enter_context(
            UpstashEndpoint(seed_redis.url, setup.log_dir, name="seed-upstash-rest")
        )
        host: RunningDevHost = await asyncio.to_thread(
            start_devhost_process, ROOT, instances=1, env=host_env(setup, delay_scale, data_dir)
        )
        stack.callback(host.stop)
        seed = SeedStore(seed_endpoint.url, UpstashEndpoint.TOKEN)
        try:
            return await _measure(setup, host, seed, seed_redis.url, delay_scale, target_seconds)
        finally:
            await seed.aclose()


async def _measure(
    setup: Setup,
    host: RunningDevHost,
    seed: SeedStore,
    seed_url: str,
    delay_scale: float,
    target_seconds: float,
) -> FunctionsRun:
    before = await _settled(setup.redis_url)
    seed_before = await asyncio.to_thread(command_calls, seed_url)
    async with httpx.AsyncClient(base_url=host.url, timeout=30) as http:
        began = time.monotonic()
        response = await http.post("/api/quotes", json=REQUEST)
    if response.status_code != 202:
        raise BenchError(f"POST /api/quotes answered {response.status_code}: {response.text}")
    run_id = str(response.json()["runId"])
    await seed.create_run(run_id)
    seed_viewer = asyncio.create_task(
        seed.stream(run_id, lambda _index, _event: None, within=target_seconds + 120)
    )

    async def mirror(event: dict[str, Any], terminal: str) -> None:
        # The seed appends each event as it happens; its last one ends the run.
        await seed.append_event(run_id, event, status="completed" if terminal else None)

    viewer = Viewer(host.url, run_id, mirror)
    await viewer.watch(within=target_seconds + 120)
    seconds = time.monotonic() - began
    async with asyncio.timeout(30):
        await seed_viewer
    await setup.subscriptions_settle(0)
    after = await _settled(setup.redis_url)
    figures = await _span_figures(setup, before)
    if after != await setup.command_calls():
        raise BenchError("commands were still running when the run's bill was taken")
    seed_billed = await asyncio.to_thread(command_calls, seed_url) - seed_before
    return FunctionsRun(
        delay_scale=delay_scale,
        seconds=seconds,
        events=len(viewer.ids),
        duplicated=viewer.duplicated,
        reconnects=viewer.reconnects,
        terminal=viewer.terminal,
        billed=int(figures["billed"]),
        billed_by_command=figures["billed_by_command"],
        seed_billed=sum(seed_billed.values()),
        seed_by_command=seed_billed,
    )
