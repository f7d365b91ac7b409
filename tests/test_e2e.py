"""End to end: every function in its own OS processes (two instances each, requests spread
round-robin) under Vercel's Python runtime, hosted by the same code as `make dev`, on both
stores. Streams are read over real sockets and reconnect onto other instances."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from tests.fake_tinyfish import FakeTinyFishServer
from tests.hosts import (
    LEASE_SECONDS,
    ROOT,
    assert_gap_free,
    host_env,
    read_run_reconnecting,
    start_run,
    tinyfish_env,
    visit_stream,
)
from tools.devhost import RunningDevHost, start_devhost_process

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=["sqlite", "kv"])
def host(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[RunningDevHost]:
    env = host_env(request.param, tmp_path_factory.mktemp(request.param), request)
    with start_devhost_process(ROOT, instances=2, env=env) as running:
        running.store_kind = request.param  # type: ignore[attr-defined]
        yield running


@pytest.fixture
def kv_server(host: RunningDevHost, request: pytest.FixtureRequest) -> Any:
    """The KV endpoint behind the host, for tests of push delivery (the KV backend's alone:
    they take the host on KV only, `@ON_KV`)."""
    if host.store_kind != "kv":  # type: ignore[attr-defined]
        raise AssertionError("push delivery is the KV backend's: mark the test @ON_KV")
    return request.getfixturevalue("upstash_server")


ON_KV = pytest.mark.parametrize("host", ["kv"], indirect=True)


@pytest.fixture
async def client(host: RunningDevHost) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=host.url, timeout=30) as http:
        yield http


async def read_whole_run(client: httpx.AsyncClient, run_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    while not events or events[-1]["type"] not in ("complete", "error"):
        cursor = events[-1]["id"] if events else None
        visit = await visit_stream(client, run_id, cursor)
        assert visit.status == 200
        events.extend(visit.events)
    return events


async def subscriptions_back_to(server: Any, baseline: int, *, within: float) -> None:
    """Wait until the KV endpoint holds no more subscriptions than `baseline`."""
    closed_at = time.monotonic()
    while server.stats()["open_subscriptions"] > baseline:
        assert time.monotonic() - closed_at < within, "a stream kept its subscription"
        await asyncio.sleep(0.05)


async def test_reconnecting_client_gets_every_event_once_across_instances(client) -> None:
    run_id, _ = await start_run(client)
    received: list[dict[str, Any]] = []
    instances: set[str] = set()
    while not received or received[-1]["type"] != "complete":
        cursor = received[-1]["id"] if received else None
        visit = await visit_stream(client, run_id, cursor, max_events=3)
        assert visit.status == 200
        instances.add(visit.instance)
        received.extend(visit.events)
    assert_gap_free(received)
    assert len(instances) == 2, "reconnects should have landed on both stream instances"
    after_end = await visit_stream(client, run_id, received[-1]["id"])
    assert after_end.status == 204
    snapshot = (await client.get(f"/api/quotes/{run_id}")).json()
    assert snapshot["status"] == "completed"
    assert snapshot["lastEventId"] == received[-1]["id"]


async def test_twenty_concurrent_runs_all_complete_with_gap_free_ids(client) -> None:
    runs = await asyncio.gather(*(start_run(client) for _ in range(20)))
    results = await asyncio.gather(*(read_whole_run(client, run_id) for run_id, _ in runs))
    for events in results:
        assert_gap_free(events)
        assert events[-1]["type"] == "complete"
    assert len({instance for _, instance in runs}) == 2


async def test_a_worker_killed_mid_run_is_resumed_and_the_run_completes(client, host) -> None:
    run_id, _ = await start_run(client)
    first = await visit_stream(client, run_id, None, max_events=4)
    assert [e["type"] for e in first.events][:1] == ["started"]
    killed = host.instance_pids("api/work.py")
    assert killed
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    events = await read_run_reconnecting(client, run_id, first.events)
    assert_gap_free(events)
    assert events[-1]["type"] == "complete"
    snapshot = (await client.get(f"/api/quotes/{run_id}")).json()
    assert snapshot["status"] == "completed"
    assert {p["status"] for p in snapshot["providers"]} == {"quoted"}
    assert all(pid not in host.instance_pids("api/work.py") for pid in killed)


def is_a_start(event: dict[str, Any]) -> bool:
    return event["type"] == "activity" and event["message"].startswith("Starting ")


async def test_where_visibility_alone_brings_a_dead_delivery_back_it_is_back_within_a_lease(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A host that honours visibility alone (no redelivery after a failed push): the killed
    worker's messages come back when their hold ends, about RUN_LEASE_SECONDS (10 s), not when
    the push's own lease does (api/work.py's maxDuration, 300 s)."""
    # A lease long enough for the killed instances to be restarted before it ends: a push to an
    # instance still down fails, and on this host waits out the push's own 300 s lease.
    env = {
        **host_env("sqlite", tmp_path, request),
        "SIMULATED_MIN_SECONDS": "4",
        "RUN_LEASE_SECONDS": "10",
    }
    with start_devhost_process(
        ROOT, instances=2, env=env, queue_visibility_only=True
    ) as visibility_host:
        async with httpx.AsyncClient(base_url=visibility_host.url, timeout=30) as client:
            run_id, _ = await start_run(client)
            # Every insurer's "Starting" line: each delivery has held its message by then.
            seen: list[dict[str, Any]] = []
            while len({e["provider"] for e in seen if is_a_start(e)}) < 5:
                cursor = seen[-1]["id"] if seen else None
                visit = await visit_stream(client, run_id, cursor, max_events=2)
                seen.extend(visit.events)
            killed = visibility_host.instance_pids("api/work.py")
            assert killed
            for pid in killed:
                os.kill(pid, signal.SIGKILL)
            began = time.monotonic()
            try:
                events = await asyncio.wait_for(read_run_reconnecting(client, run_id, seen), 60)
            except TimeoutError:
                lines = [
                    line
                    for line in visibility_host.output_lines()
                    if "queue:" in line or "holding" in line
                ]
                pytest.fail("the run did not end; the queue said:\n" + "\n".join(lines))
            took = time.monotonic() - began
    assert events[-1]["type"] == "complete"
    assert took < 60, f"the run took {took:.0f} s to finish after its worker was killed"


async def test_twenty_runs_survive_every_worker_being_killed_once(client, host) -> None:
    runs = [(await start_run(client))[0] for _ in range(20)]
    readers = [asyncio.create_task(read_run_reconnecting(client, run_id)) for run_id in runs]
    killed: set[int] = set()
    for _ in range(4):  # each of the two instances, then each of their replacements
        await asyncio.sleep(random.uniform(0.3, 1.5))
        for pid in host.instance_pids("api/work.py"):
            if pid not in killed:
                killed.add(pid)
                os.kill(pid, signal.SIGKILL)
                break
    endings = await asyncio.wait_for(asyncio.gather(*readers), timeout=180)
    assert len(killed) >= 3
    for run_id, events in zip(runs, endings, strict=True):
        assert_gap_free(events)
        assert events[-1]["type"] == "complete", run_id
        stored = (await client.get(f"/api/quotes/{run_id}?since=-1&limit=1000")).json()
        assert [e["id"] for e in stored["events"]] == [e["id"] for e in events]
        assert stored["events"] == events


@ON_KV
async def test_a_stream_whose_push_goes_silent_still_delivers_every_event(
    client, kv_server
) -> None:
    silence_window = LEASE_SECONDS / 3 + 1
    received_at: dict[int, float] = {}

    async def silence_push_after_the_first_live_event(event: dict[str, Any]) -> None:
        received_at[event["id"]] = time.time()
        if event["id"] == 1:
            # The subscription is established and delivering; now it goes quiet.
            await asyncio.to_thread(kv_server.set_subscription_mode, "silent")

    try:
        run_id, _ = await start_run(client)
        visit = await asyncio.wait_for(
            visit_stream(client, run_id, None, on_event=silence_push_after_the_first_live_event),
            timeout=30,
        )
    finally:
        kv_server.set_subscription_mode("normal")
    assert_gap_free(visit.events)
    assert visit.events[-1]["type"] == "complete"
    lateness = [
        received_at[e["id"]] - datetime.fromisoformat(e["ts"]).timestamp() for e in visit.events
    ]
    assert max(lateness) < silence_window + 1.0
    assert max(lateness) > 0.5, "push was silenced, so some events must have come by polling"


@ON_KV
async def test_a_stream_whose_subscription_drops_falls_back_to_polling(client, kv_server) -> None:
    run_id, _ = await start_run(client)
    first = await visit_stream(client, run_id, None, max_events=2)
    reader = asyncio.create_task(visit_stream(client, run_id, first.events[-1]["id"]))
    await asyncio.sleep(0.3)
    kv_server.set_subscription_mode("drop")
    kv_server.set_fail_subscribe(True)
    try:
        rest = await asyncio.wait_for(reader, timeout=30)
    finally:
        kv_server.set_fail_subscribe(False)
    events = first.events + rest.events
    assert_gap_free(events)
    assert events[-1]["type"] == "complete"


@ON_KV
async def test_a_client_that_goes_away_releases_its_push_subscription_at_once(
    client, kv_server
) -> None:
    run_id, _ = await start_run(client)
    baseline = kv_server.stats()["open_subscriptions"]
    async with aconnect_sse(client, "GET", f"/api/quotes/{run_id}/stream") as source:
        async for sse in source.aiter_sse():
            if sse.data:
                break
        assert kv_server.stats()["open_subscriptions"] == baseline + 1
    await subscriptions_back_to(kv_server, baseline, within=2)


@ON_KV
async def test_a_client_gone_before_the_subscription_is_confirmed_releases_it(
    client, kv_server
) -> None:
    run_id, _ = await start_run(client)
    baseline = kv_server.stats()["open_subscriptions"]
    for _ in range(5):
        # Leave right after the retry line: the stream is still waiting for its subscription.
        async with client.stream("GET", f"/api/quotes/{run_id}/stream") as response:
            async for line in response.aiter_lines():
                if line.startswith("retry:"):
                    break
    await subscriptions_back_to(kv_server, baseline, within=3)


@pytest.fixture(scope="module")
def tinyfish_host(tmp_path_factory) -> Iterator[tuple[RunningDevHost, FakeTinyFishServer]]:
    with FakeTinyFishServer(
        delay_scale=0.2, scenarios={"allstate": "declined", "state_farm": "blocked"}
    ) as tinyfish:
        env = {
            "QUOTES_DB_PATH": str(tmp_path_factory.mktemp("tinyfish") / "quotes.sqlite3"),
            "KV_REST_API_URL": "",
            "KV_REST_API_TOKEN": "",
            "TINYFISH_API_KEY": tinyfish.api_key,
            "TINYFISH_API_URL": tinyfish.url,
            "RUN_LEASE_SECONDS": str(LEASE_SECONDS),
        }
        with start_devhost_process(ROOT, instances=2, env=env) as running:
            yield running, tinyfish


async def test_a_run_against_the_tinyfish_api_streams_real_agent_progress(tinyfish_host) -> None:
    host, tinyfish = tinyfish_host
    async with httpx.AsyncClient(base_url=host.url, timeout=30) as client:
        run_id, _ = await start_run(client)
        events = await read_whole_run(client, run_id)
    assert_gap_free(events)
    by_type: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        by_type.setdefault(event["type"], []).append(event)
    quotes = {e["provider"]: e["quote"] for e in by_type["quote"]}
    errors = {e["provider"]: e for e in by_type["provider_error"]}
    assert set(quotes) == {"geico", "progressive", "liberty_mutual"}
    assert all(q["source"] == "tinyfish" for q in quotes.values())
    assert errors["allstate"]["code"] == "provider_declined"
    assert errors["state_farm"]["code"] == "provider_blocked"
    agent_messages = [
        e["message"] for e in by_type["activity"] if not e["message"].startswith("Starting")
    ]
    assert agent_messages, "the agent's PROGRESS purposes should arrive as activity events"
    complete = events[-1]
    assert complete["best"] == complete["quotes"][0]["provider"]
    assert sorted(complete["failed"]) == ["allstate", "state_farm"]
    assert len(tinyfish.requests) == 5
    goals = [r["goal"] for r in tinyfish.requests]
    assert all("Ana" in g and "1990-04-12" in g for g in goals)
    for event in events:
        assert "Ana" not in json.dumps(event) and "1990-04-12" not in json.dumps(event)


# --- a provider that takes longer than one worker invocation -------------------------------------

WORKER_MAX_DURATION = 18  # the worker hands back 15 s before its deadline: after about 3 s


@pytest.fixture(scope="module")
def short_worker_host(tmp_path_factory) -> Iterator[tuple[RunningDevHost, Path]]:
    """A copy of the project whose worker may run only WORKER_MAX_DURATION seconds, and a
    simulated source whose attempts take 8 s: every provider needs several deliveries."""
    root = tmp_path_factory.mktemp("short-worker")
    for folder in ("api", "lib", "public"):
        shutil.copytree(ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "openapi.json", root / "openapi.json")
    config = json.loads((ROOT / "vercel.json").read_text())
    config["functions"]["api/work.py"]["maxDuration"] = WORKER_MAX_DURATION
    (root / "vercel.json").write_text(json.dumps(config))
    db = root / "quotes.sqlite3"
    env = {
        "QUOTES_DB_PATH": str(db),
        "SIMULATED_DELAY_SCALE": "0.3",
        "SIMULATED_MIN_SECONDS": "8",
        "RUN_LEASE_SECONDS": str(LEASE_SECONDS),
        "KV_REST_API_URL": "",
        "KV_REST_API_TOKEN": "",
        "TINYFISH_API_KEY": "",
        "QUOTE_RATE_LIMIT_PER_MINUTE": "0",
        "PYTHONPATH": str(root),
    }
    with start_devhost_process(root, instances=2, env=env) as running:
        yield running, db


async def test_a_provider_longer_than_the_workers_max_duration_completes_across_deliveries(
    short_worker_host,
) -> None:
    from lib.store.sqlite import SQLiteStore

    host, db = short_worker_host
    async with httpx.AsyncClient(base_url=host.url, timeout=30) as client:
        run_id, _ = await start_run(client, providers=["geico", "progressive"])
        events = await read_run_reconnecting(client, run_id)
    assert_gap_free(events)
    assert events[-1]["type"] == "complete"
    assert {q["provider"] for q in events[-1]["quotes"]} == {"geico", "progressive"}
    store = SQLiteStore(str(db), ttl_seconds=7200)
    try:
        state = await store.get_run(run_id)
    finally:
        await store.aclose()
    assert state is not None
    for provider in ("geico", "progressive"):
        assert state.record.leases[provider].deliveries >= 2
        # Every delivery resumed the one attempt: a single (simulated) agent run.
        assert state.record.work[provider].attempt == 1
        assert len(state.record.work[provider].agent_run_ids) == 1


# --- paid agent runs across deaths and deadlines (the local TinyFish-compatible server) ----------


async def wait_for_activity(client: httpx.AsyncClient, run_id: str, message: str) -> int:
    """The id of the first activity event carrying `message`, waiting for it to be written."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        body = (await client.get(f"/api/quotes/{run_id}?since=-1&limit=1000")).json()
        for event in body["events"]:
            if event["type"] == "activity" and event["message"] == message:
                return int(event["id"])
        await asyncio.sleep(0.1)
    raise AssertionError(f"no activity {message!r} in run {run_id}")


async def test_a_worker_killed_mid_agent_run_reattaches_and_starts_no_second_agent_run(
    tmp_path,
) -> None:
    scenarios = {p: "quote,duration=4" for p in ("geico", "progressive", "state_farm")}
    with FakeTinyFishServer(delay_scale=0.2, scenarios=scenarios) as tinyfish:
        env = tinyfish_env(tmp_path, tinyfish, RUN_MAX_SECONDS="120")
        with start_devhost_process(ROOT, instances=2, env=env) as host:
            async with httpx.AsyncClient(base_url=host.url, timeout=30) as client:
                run_id, _ = await start_run(client, providers=list(scenarios))
                # The agent run's id is stored with this activity, in one write.
                await wait_for_activity(client, run_id, "GEICO agent started")
                for pid in host.instance_pids("api/work.py"):
                    os.kill(pid, signal.SIGKILL)
                events = await read_run_reconnecting(client, run_id)
    assert_gap_free(events)
    assert events[-1]["type"] == "complete"
    assert {q["provider"] for q in events[-1]["quotes"]} == set(scenarios)
    runs = tinyfish.run_records()
    by_insurer: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_insurer.setdefault(run["insurer"], []).append(run)
    # Exactly one paid agent run per insurer, though every worker died mid-run...
    assert {insurer: len(r) for insurer, r in by_insurer.items()} == dict.fromkeys(scenarios, 1)
    # ...and the resumed worker read GEICO's back by its id instead of starting another.
    assert by_insurer["geico"][0]["get_calls"] >= 1
    assert all(r["status"] == "COMPLETED" for r in runs)


async def test_the_runs_deadline_cancels_every_agent_run_still_going(tmp_path) -> None:
    scenarios = {p: "quote,duration=60" for p in ("geico", "progressive", "allstate")}
    with FakeTinyFishServer(delay_scale=0.2, scenarios=scenarios) as tinyfish:
        # Long enough for the adapter to start agents at all (it wants 15 s), then over.
        env = tinyfish_env(tmp_path, tinyfish, RUN_MAX_SECONDS="20")
        with start_devhost_process(ROOT, instances=2, env=env) as host:
            async with httpx.AsyncClient(base_url=host.url, timeout=30) as client:
                run_id, _ = await start_run(client, providers=list(scenarios))
                events = await read_run_reconnecting(client, run_id)
                snapshot = (await client.get(f"/api/quotes/{run_id}")).json()
    assert_gap_free(events)
    assert events[-1]["type"] == "error"
    assert events[-1]["code"] == "deadline_exceeded"
    assert snapshot["status"] == "failed"
    assert {p["status"] for p in snapshot["providers"]} == {"failed"}
    runs = tinyfish.run_records()
    assert sorted(r["insurer"] for r in runs) == sorted(scenarios)
    # The server saw each cancel, and no agent run is left going (and billing). An agent whose
    # own duration cap (the attempt's time left) ran out at the same moment may end FAILED first.
    assert all(r["cancel_calls"] >= 1 for r in runs), runs
    assert {r["status"] for r in runs} <= {"CANCELLED", "FAILED"}, runs
