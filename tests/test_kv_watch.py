"""The KV push watch: every watch of one run on one store shares one feed (one subscription on
the tests' Upstash endpoint, which counts the subscriptions it holds open, and one reader); the
feed heals a half-open subscription, reads through a lagging replica, asks a refused
`CONFIG SET` again, and polls once per run when push cannot be had."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from lib.models import ActivityEvent
from lib.store import kv_watch
from lib.store.kv import KVStore
from lib.store.kv_watch import Delivery, KVEventWatch, PushTimings
from tests.conftest import eventually, make_record
from tests.upstash_rest import UpstashRestServer

WATCHES = 20


@pytest.fixture
async def kv(upstash_server: UpstashRestServer) -> AsyncIterator[KVStore]:
    store = KVStore(upstash_server.url, upstash_server.token, ttl_seconds=7200)
    try:
        yield store
    finally:
        await store.aclose()


@pytest.fixture(autouse=True)
def endpoint_restored(upstash_server: UpstashRestServer) -> AsyncIterator[None] | None:
    yield None
    upstash_server.configure_subscriptions(
        "normal", fail_subscribe=False, refuse_config=False, replica_lag_ms=0
    )


async def open_subscriptions(server: UpstashRestServer) -> int:
    return int((await asyncio.to_thread(server.stats))["open_subscriptions"])


async def stats_of(server: UpstashRestServer, kind: str, figure: str = "requests") -> int:
    return int((await asyncio.to_thread(server.stats))["by_kind"][kind][figure])


async def subscriptions_become(server: UpstashRestServer, count: int) -> None:
    async def reached() -> bool:
        return await open_subscriptions(server) == count

    await eventually(reached, f"the endpoint holds {count} subscriptions")


def activity(message: str) -> ActivityEvent:
    return ActivityEvent(provider="geico", message=message)


async def collect(
    watch: KVEventWatch, count: int, within: float = 15, after: int = -1
) -> list[int]:
    """Event ids as `next_events` hands them out after `after`, until `count` have come."""
    ids: list[int] = []
    async with asyncio.timeout(within):
        while len(ids) < count:
            ids += [e.id for e in await watch.next_events(ids[-1] if ids else after, timeout=5)]
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
        assert kv.push.open_feeds == 1
        async with kv.watch(record.run_id) as late, kv.watch(other.run_id):
            # A watch of another run has its own; a late watch of this one joins the first.
            await subscriptions_become(upstash_server, baseline + 2)
            assert kv.push.open_feeds == 2
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
    assert kv.push.open_feeds == 1
    assert await open_subscriptions(upstash_server) == baseline + 1
    await kv.append_event(record.run_id, activity("still pushed"))
    assert await collect(last, 2) == [0, 1]  # `started`, then the append
    assert last.delivery is Delivery.PUSH
    await last.aclose()
    assert kv.push.open_feeds == 0
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
        await eventually(lambda: all(w.delivery is Delivery.POLL for w in watches), "all poll")
        await kv.append_event(record.run_id, activity("while push is down"))
        assert await asyncio.gather(*(collect(w, 2) for w in watches)) == [[0, 1]] * 5
        assert all(w.delivery is Delivery.POLL for w in watches)
        # Push comes back: one subscription again, and every watch is back on it at once.
        await asyncio.to_thread(upstash_server.set_fail_subscribe, False)
        await subscriptions_become(upstash_server, baseline + 1)
        await eventually(lambda: all(w.delivery is Delivery.PUSH for w in watches), "push again")
        await kv.append_event(record.run_id, activity("pushed again"))
        assert await asyncio.gather(*(collect(w, 3) for w in watches)) == [[0, 1, 2]] * 5
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
    assert kv.push.open_feeds == 0
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
        reads = await stats_of(upstash_server, "command")
    finally:
        for watch in watches:
            await watch.aclose()
    stored = [e.id for e in await kv.read_events(record.run_id, -1)]
    assert [[e.id for e in batch] for batch in batches] == [stored] * WATCHES
    assert reads <= 2, f"{WATCHES} watches at one cursor read {reads} times"


async def test_a_half_open_subscription_is_probed_reopened_and_push_resumes(
    upstash_server: UpstashRestServer,
) -> None:
    timings = PushTimings(silence_seconds=0.3, probe_seconds=0.3)
    reader = KVStore(upstash_server.url, upstash_server.token, ttl_seconds=7200)
    reader.push.timings = timings
    writer = KVStore(upstash_server.url, upstash_server.token, ttl_seconds=7200)
    record = make_record()
    await writer.create_run(record)
    try:
        async with reader.watch(record.run_id) as watch:
            assert await collect(watch, 1) == [0]
            assert watch.delivery is Delivery.PUSH
            subscribed = await stats_of(upstash_server, "subscribe")
            # Half-open: the endpoint keeps every stream open and sends nothing on it.
            await asyncio.to_thread(upstash_server.set_subscription_mode, "silent")
            await eventually(lambda: watch.delivery is Delivery.POLL, "the probe goes unheard")
            await writer.append_event(record.run_id, activity("while the channel is mute"))
            assert [e.id for e in await watch.next_events(0, timeout=10)] == [1]
            await asyncio.to_thread(upstash_server.set_subscription_mode, "normal")

            async def resubscribed() -> bool:
                return await stats_of(upstash_server, "subscribe") > subscribed

            await eventually(resubscribed, "the subscription is opened again")
            await eventually(lambda: watch.delivery is Delivery.PUSH, "push resumes")
            await writer.append_event(record.run_id, activity("pushed again"))
            assert [e.id for e in await watch.next_events(1, timeout=10)] == [2]
    finally:
        await reader.aclose()
        await writer.aclose()


async def test_a_quiet_healthy_subscription_costs_one_probe_and_one_read_per_silence(
    upstash_server: UpstashRestServer,
) -> None:
    reader = KVStore(upstash_server.url, upstash_server.token, ttl_seconds=7200)
    reader.push.timings = PushTimings(silence_seconds=0.2, probe_seconds=2.0)
    record = make_record()
    await reader.create_run(record)
    try:
        async with reader.watch(record.run_id) as watch:
            assert await collect(watch, 1) == [0]
            subscribed = await stats_of(upstash_server, "subscribe")
            await asyncio.to_thread(upstash_server.reset_stats)
            assert await watch.next_events(0, timeout=1.0) == []
            probes = await stats_of(upstash_server, "command")
            assert watch.delivery is Delivery.PUSH
    finally:
        await reader.aclose()
    assert await stats_of(upstash_server, "subscribe") <= subscribed, "never reopened"
    # Per 0.2 s of silence (at most 6 in the second watched), one PUBLISH heard back and one
    # read of what a half-open channel would have kept back: with nothing new, the open list's
    # LRANGE and the ended one's (2 commands). Nothing else.
    assert 4 <= probes <= 3 * 6, probes


async def test_a_notice_is_not_spent_until_a_lagging_replica_has_what_it_announced(
    upstash_server: UpstashRestServer,
) -> None:
    # No probe within the test: only the notice can make the reader read again.
    reader = KVStore(
        upstash_server.url, upstash_server.token, ttl_seconds=7200, silence_seconds=3600
    )
    writer = KVStore(upstash_server.url, upstash_server.token, ttl_seconds=7200)
    await asyncio.to_thread(upstash_server.set_replica_lag, 300)
    record = make_record()
    await writer.create_run(record)
    try:
        async with reader.watch(record.run_id) as watch:
            assert await collect(watch, 1) == [0]
            # Two writes close together: a lagging read may show the first and not the second.
            await writer.append_event(record.run_id, activity("first"))
            await asyncio.sleep(0.1)
            await writer.append_events(record.run_id, [activity("second"), activity("third")])
            assert await collect(watch, 3, within=3, after=0) == [1, 2, 3]
            await writer.append_event(record.run_id, activity("alone"))
            assert [e.id for e in await watch.next_events(3, timeout=3)] == [4]
    finally:
        await reader.aclose()
        await writer.aclose()


async def test_a_writer_reads_its_own_writes_through_the_replica(
    upstash_server: UpstashRestServer,
) -> None:
    await asyncio.to_thread(upstash_server.set_replica_lag, 300)
    writer = KVStore(upstash_server.url, upstash_server.token, ttl_seconds=7200)
    other = KVStore(upstash_server.url, upstash_server.token, ttl_seconds=7200)
    record = make_record()
    try:
        await writer.create_run(record)
        await writer.append_event(record.run_id, activity("mine"))
        theirs = [e.id for e in await other.read_events(record.run_id, -1)]
        mine = [e.id for e in await writer.read_events(record.run_id, -1)]
    finally:
        await writer.aclose()
        await other.aclose()
    assert mine == [0, 1], "read-your-writes: the sync token waits for the replica"
    assert theirs == [], "another client's read is served 300 ms behind"


async def test_polling_is_shared_by_every_watch_of_a_run_and_backs_off(
    upstash_server: UpstashRestServer,
) -> None:
    await asyncio.to_thread(upstash_server.set_refuse_config, True)
    reader = KVStore(upstash_server.url, upstash_server.token, ttl_seconds=7200)
    reader.push.timings = PushTimings(poll_max=0.25)
    writer = KVStore(upstash_server.url, upstash_server.token, ttl_seconds=7200)
    record = make_record()
    await writer.create_run(record)
    watches = [reader.watch(record.run_id) for _ in range(50)]
    try:
        for watch in watches:
            await watch.__aenter__()
        assert await asyncio.gather(*(collect(w, 1) for w in watches)) == [[0]] * 50
        assert all(w.delivery is Delivery.POLL for w in watches)
        await asyncio.gather(*(w.next_events(0, timeout=1.0) for w in watches))  # backed off
        await asyncio.to_thread(upstash_server.reset_stats)
        await asyncio.gather(*(w.next_events(0, timeout=1.0) for w in watches))
        idle = await stats_of(upstash_server, "command", "commands")
        await writer.append_event(record.run_id, activity("polled"))
        got = await asyncio.gather(*(w.next_events(0, timeout=5) for w in watches))
    finally:
        for watch in watches:
            await watch.aclose()
        await reader.aclose()
        await writer.aclose()
    assert [[e.id for e in batch] for batch in got] == [[1]] * 50
    # One poll of two LRANGEs per 0.25 s for the run, whatever the number of its watches.
    assert idle <= 2 * (1.0 / 0.25 + 1), idle


async def test_a_refused_config_set_is_asked_again_after_a_few_minutes(
    upstash_server: UpstashRestServer,
) -> None:
    now = [1000.0]
    await asyncio.to_thread(upstash_server.set_refuse_config, True)
    reader = KVStore(upstash_server.url, upstash_server.token, ttl_seconds=7200)
    reader.push.timings = PushTimings(poll_max=0.1, clock=lambda: now[0])
    record = make_record()
    await reader.create_run(record)
    try:
        async with reader.watch(record.run_id) as watch:
            assert await collect(watch, 1) == [0]
            assert watch.delivery is Delivery.POLL
            await asyncio.to_thread(upstash_server.set_refuse_config, False)
            polled = await stats_of(upstash_server, "command")

            async def polled_again() -> bool:
                return await stats_of(upstash_server, "command") >= polled + 4

            await eventually(polled_again, "the run is polled meanwhile")
            assert watch.delivery is Delivery.POLL, "the refusal is remembered until rechecked"
            now[0] += reader.push.timings.refusal_recheck_seconds
            await eventually(lambda: watch.delivery is Delivery.PUSH, "asked again, subscribed")
    finally:
        await reader.aclose()
