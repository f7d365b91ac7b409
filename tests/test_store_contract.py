"""The Store contract, run unchanged against both backends (SQLite file; KV through the
tests-only Upstash REST endpoint in front of a real redis-server)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis.asyncio as redis_asyncio

from lib.models import ActivityEvent, CompleteEvent, ErrorEvent, StartedEvent, utc_now
from lib.store import IdempotencyClaim, RunFinalized, RunNotFound, Store
from lib.store.kv import KVStore
from lib.store.sqlite import SQLiteStore
from tests.conftest import make_record
from tests.upstash_rest import kv_redis_url

ROOT = Path(__file__).resolve().parent.parent


def activity(n: int | str) -> ActivityEvent:
    return ActivityEvent(provider="geico", message=f"step {n}")


def complete() -> CompleteEvent:
    return CompleteEvent(quotes=[], best=None, failed=[])


async def test_created_run_reads_back_with_no_events(store: Store) -> None:
    record = make_record()
    outcome = await store.create_run(record)
    state = await store.get_run(record.run_id)
    assert outcome.created
    assert state is not None
    assert state.record == record
    assert state.last_event_id == -1
    assert not state.finalized


async def test_unknown_run_reads_as_none(store: Store) -> None:
    assert await store.get_run(make_record().run_id) is None


async def test_append_returns_consecutive_ids_and_reads_from_a_cursor(store: Store) -> None:
    record = make_record()
    await store.create_run(record)
    ids = [await store.append_event(record.run_id, activity(i)) for i in range(5)]
    after_two = await store.read_events(record.run_id, after=2)
    limited = await store.read_events(record.run_id, after=-1, limit=2)
    assert ids == [0, 1, 2, 3, 4]
    assert [e.id for e in after_two] == [3, 4]
    assert after_two[0].as_dict()["message"] == "step 3"
    assert after_two[0].data.startswith('{"id":3,"type":"activity",')
    assert [e.id for e in limited] == [0, 1]


async def test_get_run_returns_events_after_cursor_in_the_same_read(store: Store) -> None:
    record = make_record()
    await store.create_run(record)
    for i in range(4):
        await store.append_event(record.run_id, activity(i))
    state = await store.get_run(record.run_id, events_after=0, limit=2)
    assert state is not None
    assert state.last_event_id == 3
    assert [e.id for e in state.events] == [1, 2]


async def test_append_with_record_replaces_the_record_atomically(store: Store) -> None:
    record = make_record()
    await store.create_run(record)
    changed = record.model_copy(update={"status": "completed"})
    await store.append_event(record.run_id, complete(), record=changed)
    state = await store.get_run(record.run_id)
    assert state is not None
    assert state.record.status == "completed"
    assert state.finalized


async def test_append_to_unknown_run_is_refused(store: Store) -> None:
    with pytest.raises(RunNotFound):
        await store.append_event(make_record().run_id, activity(0))


async def test_fifty_concurrent_writers_lose_and_duplicate_nothing(store: Store) -> None:
    record = make_record()
    await store.create_run(record)

    async def writer(w: int) -> list[int]:
        return [await store.append_event(record.run_id, activity(f"{w}:{i}")) for i in range(100)]

    returned = await asyncio.gather(*(writer(w) for w in range(50)))
    events = await store.read_events(record.run_id, after=-1)
    assert sorted(i for ids in returned for i in ids) == list(range(5000))
    assert [e.id for e in events] == list(range(5000))
    messages = [e.as_dict()["message"] for e in events]
    assert len(set(messages)) == 5000
    for w in range(50):
        mine = [m for m in messages if str(m).startswith(f"step {w}:")]
        assert mine == [f"step {w}:{i}" for i in range(100)], "a writer's events were reordered"


async def test_retried_append_with_the_same_nonce_is_applied_once(store: Store) -> None:
    record = make_record()
    await store.create_run(record)
    first = await store.append_event(record.run_id, activity(0), nonce="n-1")
    again = await store.append_event(record.run_id, activity(0), nonce="n-1")
    assert first == again == 0
    assert len(await store.read_events(record.run_id, after=-1)) == 1


async def test_terminal_event_fences_the_run(store: Store) -> None:
    record = make_record()
    await store.create_run(record)
    await store.append_event(record.run_id, StartedEvent(providers=["geico"], total=1))
    terminal_id = await store.append_event(record.run_id, complete(), nonce="end")
    with pytest.raises(RunFinalized):
        await store.append_event(record.run_id, activity("late"))
    with pytest.raises(RunFinalized):
        await store.update_run(record)
    with pytest.raises(RunFinalized):
        await store.append_event(record.run_id, ErrorEvent(code="internal", message="second end"))
    # A retry of the terminal append itself still answers with its id.
    assert await store.append_event(record.run_id, complete(), nonce="end") == terminal_id
    events = await store.read_events(record.run_id, after=-1)
    assert [e.type for e in events] == ["started", "complete"]


async def test_update_run_replaces_the_record(store: Store) -> None:
    record = make_record()
    await store.create_run(record)
    beat = record.model_copy(update={"heartbeat_at": utc_now()})
    await store.update_run(beat)
    state = await store.get_run(record.run_id)
    assert state is not None
    assert state.record.heartbeat_at == beat.heartbeat_at
    with pytest.raises(RunNotFound):
        await store.update_run(make_record())


async def test_finalize_stale_run_refuses_when_the_worker_wrote_since(store: Store) -> None:
    record = make_record()
    await store.create_run(record)
    observed = await store.get_run(record.run_id)
    assert observed is not None
    await store.append_event(
        record.run_id,
        activity("alive"),
        record=record.model_copy(update={"heartbeat_at": utc_now()}),
    )
    failed = record.model_copy(update={"status": "failed"})
    result = await store.finalize_stale_run(
        observed, ErrorEvent(code="worker_lost", message="gone"), failed
    )
    assert result is None
    assert [e.type for e in await store.read_events(record.run_id, after=-1)] == ["activity"]


async def test_concurrent_finalizers_write_exactly_one_terminal_event(store: Store) -> None:
    record = make_record()
    await store.create_run(record)
    observed = await store.get_run(record.run_id)
    assert observed is not None
    failed = record.model_copy(update={"status": "failed"})
    results = await asyncio.gather(
        *(
            store.finalize_stale_run(
                observed, ErrorEvent(code="worker_lost", message="gone"), failed
            )
            for _ in range(10)
        )
    )
    assert sorted(results, key=lambda r: r is None) == [0] + [None] * 9
    events = await store.read_events(record.run_id, after=-1)
    assert [e.type for e in events] == ["error"]


def _run_cli(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.store_cli", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _result(process: subprocess.Popen[str]) -> dict[str, float | int | None]:
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    value: dict[str, float | int | None] = json.loads(out.strip().splitlines()[-1])
    return value


async def test_two_processes_racing_to_finalize_write_one_terminal_event(
    store: Store, store_factory
) -> None:
    record = make_record()
    await store.create_run(record)
    at = time.time() + 1.5
    racers = [
        _run_cli([*store_factory.cli_args, "finalize-at", record.run_id, str(at)]) for _ in range(2)
    ]
    results = [_result(p)["id"] for p in racers]
    assert sorted(results, key=lambda r: r is None) == [0, None]
    events = await store.read_events(record.run_id, after=-1)
    assert [e.type for e in events] == ["error"]


async def test_waiting_reader_is_woken_by_an_append_from_another_process(
    store: Store, store_factory
) -> None:
    record = make_record()
    await store.create_run(record)
    # KV pushes; SQLite polls at most every 200 ms.
    budget = 0.1 if store_factory.kind == "kv" else 0.25
    async with store.watch(record.run_id) as watch:
        assert await watch.next_events(-1, timeout=0.05) == []
        at = time.time() + 1.5
        writer = _run_cli([*store_factory.cli_args, "append-at", record.run_id, str(at)])
        events = await watch.next_events(-1, timeout=10)
        received = time.time()
    sent = _result(writer)
    assert [e.id for e in events] == [0]
    assert received - float(sent["started"] or 0) < budget


async def test_watch_delivers_backlog_then_live_events_in_order_exactly_once(store: Store) -> None:
    record = make_record()
    await store.create_run(record)
    for i in range(3):
        await store.append_event(record.run_id, activity(i))

    async def write_more() -> None:
        for i in range(3, 40):
            await store.append_event(record.run_id, activity(i))
            if i % 7 == 0:
                await asyncio.sleep(0.03)

    received: list[int] = []
    async with store.watch(record.run_id) as watch:
        writer = asyncio.create_task(write_more())
        cursor = -1
        while cursor < 39:
            batch = await watch.next_events(cursor, timeout=5)
            assert batch, "watch stalled"
            received.extend(e.id for e in batch)
            cursor = batch[-1].id
        await writer
    assert received == list(range(40))


async def test_idempotency_key_maps_to_the_first_run(store: Store) -> None:
    claim = IdempotencyClaim.for_request(f"key-{uuid.uuid4()}", '{"vin":"X"}', b"secret")
    first, second = make_record(), make_record()
    created = await store.create_run(first, claim)
    repeated = await store.create_run(second, claim)
    assert created.created
    assert not repeated.created
    assert repeated.run_id == first.run_id
    assert repeated.body_hash == claim.body_hash
    assert await store.get_run(second.run_id) is None


async def test_concurrent_requests_with_one_idempotency_key_create_one_run(store: Store) -> None:
    claim = IdempotencyClaim.for_request(f"key-{uuid.uuid4()}", "{}", b"secret")
    outcomes = await asyncio.gather(*(store.create_run(make_record(), claim) for _ in range(10)))
    assert sum(o.created for o in outcomes) == 1
    assert len({o.run_id for o in outcomes}) == 1


async def test_idempotency_body_hash_is_keyed_by_the_secret() -> None:
    body = '{"driver":{"firstName":"Ana"}}'
    one = IdempotencyClaim.for_request("k", body, b"secret-1")
    two = IdempotencyClaim.for_request("k", body, b"secret-2")
    assert one.key_hash == two.key_hash
    assert one.body_hash != two.body_hash
    assert "Ana" not in one.body_hash


async def test_runs_expire_after_the_ttl(store_factory) -> None:
    short = store_factory(ttl_seconds=1)
    try:
        record = make_record()
        await short.create_run(record)
        await short.append_event(record.run_id, activity(0))
        await asyncio.sleep(1.3)
        assert await short.get_run(record.run_id) is None
        assert await short.read_events(record.run_id, after=-1) == []
        with pytest.raises(RunNotFound):
            await short.append_event(record.run_id, activity(1))
    finally:
        await short.aclose()


async def test_every_key_the_kv_store_writes_expires_within_the_ttl(upstash_server) -> None:
    ttl = 600
    kv = KVStore(upstash_server.url, upstash_server.token, ttl_seconds=ttl)
    record = make_record()
    claim = IdempotencyClaim.for_request(f"key-{uuid.uuid4()}", "{}", b"secret")
    try:
        await kv.create_run(record, claim)
        await kv.append_event(record.run_id, activity(0), record=record)
        await kv.update_run(record)
        await kv.append_event(record.run_id, complete())
    finally:
        await kv.aclose()
    redis = redis_asyncio.Redis.from_url(kv_redis_url())
    try:
        run_keys = [k async for k in redis.scan_iter(f"quote:{record.run_id}*")]
        written = [*run_keys, f"quote:idem:{claim.key_hash}".encode()]
        assert len(run_keys) == 4  # record, events, appends, final
        for key in written:
            remaining = await redis.ttl(key)
            assert 0 < remaining <= ttl, (key, remaining)
    finally:
        await redis.aclose()


async def test_every_row_the_sqlite_store_writes_expires_within_the_ttl(tmp_path) -> None:
    ttl = 600
    path = str(tmp_path / "quotes.sqlite3")
    local = SQLiteStore(path, ttl_seconds=ttl)
    record = make_record()
    try:
        await local.create_run(record, IdempotencyClaim.for_request("k", "{}", b"s"))
        await local.append_event(record.run_id, complete())
    finally:
        await local.aclose()
    db = sqlite3.connect(path)
    horizon = time.time() + ttl + 1
    for table in ("runs", "idempotency"):
        rows = db.execute(f"SELECT expires_at FROM {table}").fetchall()
        assert rows, table
        assert all(row[0] <= horizon for row in rows), table
    db.close()


async def test_wait_for_events_returns_what_arrives_or_nothing_at_the_timeout(store: Store) -> None:
    record = make_record()
    await store.create_run(record)
    assert await store.wait_for_events(record.run_id, after=-1, timeout=0.2) == []

    async def append_soon() -> None:
        await asyncio.sleep(0.1)
        await store.append_event(record.run_id, activity("soon"))

    writer = asyncio.create_task(append_soon())
    events = await store.wait_for_events(record.run_id, after=-1, timeout=5)
    await writer
    assert [e.id for e in events] == [0]
