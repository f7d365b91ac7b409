"""The KV push watch's fan-out: every watch of one run on one store shares one subscription on
the (tests') Upstash endpoint, which counts the subscriptions it holds open."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest

from lib.models import ActivityEvent
from lib.store import kv_watch
from lib.store.kv import KVStore
from lib.store.kv_watch import Delivery, KVEventWatch, RunSubscription
from tests.conftest import make_record
from tests.upstash_rest import UpstashRestServer

WATCHES = 20


@pytest.fixture
async def kv(upstash_server: UpstashRestServer) -> AsyncIterator[KVStore]:
    store = KVStore(upstash_server.url, upstash_server.token, ttl_seconds=7200)
    try:
        yield store
    finally:
        upstash_server.configure_subscriptions("normal", fail_subscribe=False)
        await store.aclose()


async def open_subscriptions(server: UpstashRestServer) -> int:
    return int((await asyncio.to_thread(server.stats))["open_subscriptions"])


async def until(condition: Callable[[], object], what: str, within: float = 15.0) -> None:
    """Wait for `condition` (sync or async) to hold; `within` only bounds a broken build."""
    give_up = time.monotonic() + within
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        assert time.monotonic() < give_up, f"never happened: {what}"
        await asyncio.sleep(0.02)


async def subscriptions_become(server: UpstashRestServer, count: int) -> None:
    async def reached() -> bool:
        return await open_subscriptions(server) == count

    await until(reached, f"the endpoint holds {count} subscriptions")


def activity(message: str) -> ActivityEvent:
    return ActivityEvent(provider="geico", message=message)


async def collect(watch: KVEventWatch, count: int) -> list[int]:
    """Event ids as `next_events` hands them out, until `count` have come."""
    ids: list[int] = []
    async with asyncio.timeout(15):
        while len(ids) < count:
            ids += [e.id for e in await watch.next_events(ids[-1] if ids else -1, timeout=5)]
    return ids


async def test_watches_of_one_run_share_one_subscription_and_each_gets_every_event(
    kv: KVStore, upstash_server: UpstashRestServer
) -> None:
    record, other = make_record(), make_record()
    await kv.create_run(record)
    await kv.create_run(other)
    baseline = await open_subscriptions(upstash_server)
    watches = [kv.watch(record.run_id) for _ in range(WATCHES)]
    for watch in watches:
        await watch.__aenter__()
    try:
        await kv.append_event(record.run_id, activity("before the late watch"))
        assert await open_subscriptions(upstash_server) == baseline + 1
        assert RunSubscription.open_count(kv) == 1
        async with kv.watch(record.run_id) as late, kv.watch(other.run_id):
            # A watch of another run has its own; a late watch of this one joins the first.
            await subscriptions_become(upstash_server, baseline + 2)
            assert RunSubscription.open_count(kv) == 2
            for n in (1, 2):
                await kv.append_event(record.run_id, activity(f"live {n}"))
            results = await asyncio.gather(*(collect(w, 4) for w in [*watches, late]))
        # `started` (id 0, written with the run), then the three appends.
        assert results == [[0, 1, 2, 3]] * (WATCHES + 1)
        assert all(w.delivery is Delivery.PUSH for w in watches)
    finally:
        for watch in watches:
            await watch.aclose()
    await subscriptions_become(upstash_server, baseline)


async def test_the_subscription_lasts_until_the_last_watch_leaves(
    kv: KVStore, upstash_server: UpstashRestServer
) -> None:
    record = make_record()
    await kv.create_run(record)
    baseline = await open_subscriptions(upstash_server)
    first, second, last = (kv.watch(record.run_id) for _ in range(3))
    for watch in (first, second, last):
        await watch.__aenter__()
    await first.aclose()
    await second.aclose()
    await first.aclose()  # closing twice releases once
    assert RunSubscription.open_count(kv) == 1
    assert await open_subscriptions(upstash_server) == baseline + 1
    await kv.append_event(record.run_id, activity("still pushed"))
    assert await collect(last, 2) == [0, 1]  # `started`, then the append
    assert last.delivery is Delivery.PUSH
    await last.aclose()
    assert RunSubscription.open_count(kv) == 0
    await subscriptions_become(upstash_server, baseline)


async def test_a_dropped_shared_subscription_falls_back_to_polling_for_every_watch(
    kv: KVStore, upstash_server: UpstashRestServer
) -> None:
    record = make_record()
    await kv.create_run(record)
    baseline = await open_subscriptions(upstash_server)
    watches = [kv.watch(record.run_id) for _ in range(5)]
    for watch in watches:
        await watch.__aenter__()
    try:
        assert all(w.delivery is Delivery.PUSH for w in watches)
        await asyncio.to_thread(upstash_server.configure_subscriptions, "drop", fail_subscribe=True)
        await until(lambda: all(w.delivery is Delivery.POLL for w in watches), "every watch polls")
        await kv.append_event(record.run_id, activity("while push is down"))
        assert await asyncio.gather(*(collect(w, 2) for w in watches)) == [[0, 1]] * 5
        assert all(w.delivery is Delivery.POLL for w in watches)
        # Push comes back: one subscription again, and pushed events put every watch back on it.
        await asyncio.to_thread(upstash_server.set_fail_subscribe, False)
        await subscriptions_become(upstash_server, baseline + 1)
        await kv.append_event(record.run_id, activity("pushed again"))
        assert await asyncio.gather(*(collect(w, 3) for w in watches)) == [[0, 1, 2]] * 5
        await until(lambda: all(w.delivery is Delivery.PUSH for w in watches), "push again")
    finally:
        for watch in watches:
            await watch.aclose()
    await subscriptions_become(upstash_server, baseline)


async def test_watches_that_leave_before_the_subscription_is_confirmed_release_it(
    kv: KVStore, upstash_server: UpstashRestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kv_watch, "CONFIRM_WAIT_SECONDS", 60.0)  # still entering when cancelled
    record = make_record()
    await kv.create_run(record)
    baseline = await open_subscriptions(upstash_server)
    # Silent: the endpoint holds the subscription but never confirms it, so entering waits.
    await asyncio.to_thread(upstash_server.set_subscription_mode, "silent")

    async def enter_and_stay() -> None:
        async with kv.watch(record.run_id):
            await asyncio.Event().wait()

    entering = [asyncio.create_task(enter_and_stay()) for _ in range(3)]
    await subscriptions_become(upstash_server, baseline + 1)
    assert not any(task.done() for task in entering)
    for task in entering:
        task.cancel()
    await asyncio.gather(*entering, return_exceptions=True)
    assert RunSubscription.open_count(kv) == 0
    await subscriptions_become(upstash_server, baseline)


async def test_watches_at_one_cursor_share_one_read(
    kv: KVStore, upstash_server: UpstashRestServer
) -> None:
    record = make_record()
    await kv.create_run(record)
    await kv.append_event(record.run_id, activity("in the backlog"))
    watches = [kv.watch(record.run_id) for _ in range(WATCHES)]
    for watch in watches:
        await watch.__aenter__()
    try:
        # Each watch owes a catch-up read since it subscribed; all of them are at one cursor.
        await asyncio.to_thread(upstash_server.reset_stats)
        batches = await asyncio.gather(*(w.next_events(-1, timeout=5) for w in watches))
        reads = (await asyncio.to_thread(upstash_server.stats))["by_kind"]["command"]["requests"]
    finally:
        for watch in watches:
            await watch.aclose()
    stored = [e.id for e in await kv.read_events(record.run_id, -1)]
    assert [[e.id for e in batch] for batch in batches] == [stored] * WATCHES
    assert reads <= 2, f"{WATCHES} watches at one cursor read {reads} times"
