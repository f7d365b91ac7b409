"""What only the KV backend promises, checked on Redis itself: every key it writes expires within
the TTL, readers are woken by the event list's keyspace notifications (no polling, no PUBLISH),
and what each store operation costs in the unit Upstash bills: commands, counted by
redis-server's own `INFO commandstats` (which counts the commands a script runs, plus the
EVALSHA). The cost tests run on a private redis-server, so no other test's traffic is counted."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from datetime import timedelta

import pytest
import redis
import redis.asyncio as redis_asyncio

from lib.admission import AdmissionRequest, Limits
from lib.admission import kv as kv_admission
from lib.admission.kv import KVAdmission
from lib.models import ActivityEvent, ProviderWork, utc_now
from lib.store import IdempotencyClaim, LeaseLost, RunNotFound
from lib.store import kv as kv_backend
from lib.store.base import REPEAT_WINDOW, first_copies, stored_event_json
from lib.store.kv import KVStore
from lib.store.upstash import KEY_LOCKING
from tests.conftest import eventually, make_record
from tests.kv_meter import CommandMeter, billed
from tests.store_steps import LEASE, activity, claim, completed, lost, quoted
from tests.upstash_rest import UpstashRestServer, kv_redis_url

# --- expiry ------------------------------------------------------------------------------------


async def test_every_key_the_kv_store_writes_expires_within_the_ttl(upstash_server) -> None:
    ttl = 600
    kv = KVStore(upstash_server.url, upstash_server.token, ttl_seconds=ttl)
    direct = redis_asyncio.Redis.from_url(kv_redis_url())
    record = make_record()
    run_id = record.run_id
    idem = IdempotencyClaim.for_request(f"key-{uuid.uuid4()}", "{}", b"secret")
    missing = make_record().run_id
    try:
        await kv.create_run(record, idem)
        now = utc_now()
        await claim(kv, run_id, "w1", now=now)
        await kv.save_provider_work(
            run_id, "geico", "w1", ProviderWork(attempt=1), [activity("saved")]
        )
        await kv.renew_lease(run_id, "geico", "w1", now + LEASE)
        await kv.append_events(run_id, [activity("appended")])
        await kv.record_outcome(run_id, "geico", *quoted("geico"), total=5)
        # Writes refused for a run that does not exist leave no key behind.
        with pytest.raises(RunNotFound):
            await kv.record_outcome(missing, "geico", *quoted("geico"), total=5)
        await claim(kv, missing, "w1", now=now)

        run_keys = {k.decode() async for k in direct.scan_iter(f"quote:{run_id}*")}
        others = [f"quote:idem:{idem.key_hash}"]
        assert run_keys == {f"quote:{run_id}", f"quote:{run_id}:events"}
        for key in [*run_keys, *others]:
            assert 0 < await direct.ttl(key) <= ttl, key
        assert not [k async for k in direct.scan_iter(f"quote:{missing}*")]

        # The run's end is its last write: it renews the run's keys to the full TTL.
        for key in run_keys:
            await direct.expire(key, 100)
        await kv.finish_run(run_id, *completed())
        ended_keys = {k.decode() async for k in direct.scan_iter(f"quote:{run_id}*")}
        assert ended_keys == {f"quote:{run_id}", f"quote:{run_id}:log"}
        for key in ended_keys:
            assert ttl - 5 <= await direct.ttl(key) <= ttl, key
    finally:
        await kv.aclose()
        await direct.aclose()


# --- push: keyspace notifications over /subscribe ----------------------------------------------


def command_requests(server: UpstashRestServer) -> int:
    return int(server.stats()["by_kind"]["command"]["requests"])


async def test_a_watch_is_woken_by_the_lists_notification_and_reads_once(upstash_server) -> None:
    # A silence of an hour: within this test nothing but a notification can make the watch read.
    reader = KVStore(
        upstash_server.url, upstash_server.token, ttl_seconds=7200, silence_seconds=3600
    )
    writer = KVStore(upstash_server.url, upstash_server.token, ttl_seconds=7200)
    record = make_record()
    try:
        await writer.create_run(record)
        async with reader.watch(record.run_id) as watch:
            assert [e.id for e in await watch.next_events(-1, timeout=5)] == [0]
            upstash_server.reset_stats()
            # Longer than redis-py 8's default socket timeout, which once ended idle streams.
            assert await watch.next_events(0, timeout=6) == []
            idle = command_requests(upstash_server)
            await writer.append_events(record.run_id, [activity("pushed")])
            events = await watch.next_events(0, timeout=30)
            delivered = command_requests(upstash_server)
    finally:
        await reader.aclose()
        await writer.aclose()
    assert idle == 0, "a subscribed watch does not poll"
    assert [e.id for e in events] == [1]
    assert delivered == 2, "the append's RPUSHX and the reader's one LRANGE"


async def test_the_runs_end_reaches_a_watching_reader_by_push(upstash_server) -> None:
    reader = KVStore(
        upstash_server.url, upstash_server.token, ttl_seconds=7200, silence_seconds=3600
    )
    writer = KVStore(upstash_server.url, upstash_server.token, ttl_seconds=7200)
    record = make_record()
    try:
        await writer.create_run(record)
        async with reader.watch(record.run_id) as watch:
            assert [e.id for e in await watch.next_events(-1, timeout=5)] == [0]
            await writer.finish_run(record.run_id, *lost())
            events = await watch.next_events(0, timeout=30)
    finally:
        await reader.aclose()
        await writer.aclose()
    assert [(e.id, e.type) for e in events] == [(1, "error")]


async def test_closing_a_watch_releases_its_subscription(upstash_server) -> None:
    kv = KVStore(upstash_server.url, upstash_server.token, ttl_seconds=7200)
    record = make_record()

    def open_subscriptions() -> int:
        return int(upstash_server.stats()["open_subscriptions"])

    try:
        await kv.create_run(record)
        before = open_subscriptions()
        async with kv.watch(record.run_id) as watch:
            await watch.next_events(-1, timeout=1)
            during = open_subscriptions()
        await eventually(lambda: open_subscriptions() == before)
    finally:
        await kv.aclose()
    assert during == before + 1


# --- a private redis-server: its configuration and its command counts are ours alone ------------


def notify_flags(url: str) -> str:
    with redis.Redis.from_url(url, decode_responses=True) as direct:
        return str(direct.config_get("notify-keyspace-events")["notify-keyspace-events"])


def set_notify_flags(url: str, flags: str) -> None:
    with redis.Redis.from_url(url) as direct:
        direct.config_set("notify-keyspace-events", flags)


async def test_the_first_watch_turns_on_keyspace_notifications_keeping_other_flags(
    quiet_kv,
) -> None:
    set_notify_flags(quiet_kv.redis_url, "Ex")  # someone else's expiry notices
    reader = KVStore(quiet_kv.url, quiet_kv.token, ttl_seconds=7200, silence_seconds=3600)
    writer = KVStore(quiet_kv.url, quiet_kv.token, ttl_seconds=7200)
    record = make_record()
    try:
        await writer.create_run(record)
        async with reader.watch(record.run_id) as watch:
            assert [e.id for e in await watch.next_events(-1, timeout=5)] == [0]
            quiet_kv.reset_stats()
            assert await watch.next_events(0, timeout=0.3) == []
            idle = command_requests(quiet_kv)
            await writer.append_events(record.run_id, [activity("pushed")])
            events = await watch.next_events(0, timeout=30)
        flags = notify_flags(quiet_kv.redis_url)
    finally:
        await reader.aclose()
        await writer.aclose()
    assert idle == 0, "a subscribed watch does not poll"
    assert [e.id for e in events] == [1]
    # Keyspace notices (K) of list commands (l: RPUSHX) and generic ones (g: RENAME).
    assert set("Klg") | set("Ex") <= set(flags), flags


async def test_each_store_operation_bills_the_commands_its_design_promises(quiet_kv) -> None:
    set_notify_flags(quiet_kv.redis_url, "")
    kv = KVStore(quiet_kv.url, quiet_kv.token, ttl_seconds=7200)
    reader = KVStore(quiet_kv.url, quiet_kv.token, ttl_seconds=7200, silence_seconds=3600)
    meter = CommandMeter(quiet_kv.redis_url)
    try:
        # One whole run first: the scripts get loaded and the endpoint's connection opened, so
        # what follows is each operation's steady cost.
        warm = make_record()
        await kv.create_run(warm)
        await claim(kv, warm.run_id, "w1", now=utc_now())
        await kv.save_provider_work(warm.run_id, "geico", "w1", ProviderWork(), [activity("x")])
        await kv.renew_lease(warm.run_id, "geico", "w1", utc_now() + LEASE)
        await kv.append_events(warm.run_id, [activity("x")])
        await kv.record_outcome(warm.run_id, "geico", *quoted("geico"), total=5)
        await kv.get_run(warm.run_id)
        await kv.finish_run(warm.run_id, *completed())
        assert await meter.of(asyncio.sleep(0)) == Counter(), "the meter measures only itself"

        record = make_record()
        run_id = record.run_id
        now = utc_now()
        later = now + LEASE + timedelta(seconds=1)
        costs = {
            "create_run": await meter.of(kv.create_run(record)),
            "claim_provider (claimed)": await meter.of(claim(kv, run_id, "w1", now=now)),
            "claim_provider (held)": await meter.of(claim(kv, run_id, "w2", now=now)),
            "claim_provider (first, with the provider's start)": await meter.of(
                kv.claim_provider(
                    run_id,
                    "allstate",
                    "w1",
                    now=now,
                    lease_until=now + LEASE,
                    alive_since=now - LEASE,
                    first_work=ProviderWork(attempt=1, first_started_at=now),
                    first_events=[ActivityEvent(provider="allstate", message="Starting")],
                )
            ),
            "append_events (1 activity)": await meter.of(
                kv.append_events(run_id, [ActivityEvent(provider="geico", message="Step 1")])
            ),
            "claim_provider (lease ended, holder checked)": await meter.of(
                claim(kv, run_id, "w2", now=later)
            ),
            "save_provider_work (+1 event)": await meter.of(
                kv.save_provider_work(run_id, "geico", "w2", ProviderWork(), [activity("s")])
            ),
            "renew_lease": await meter.of(kv.renew_lease(run_id, "geico", "w2", later + LEASE)),
            "record_outcome (2 events)": await meter.of(
                kv.record_outcome(run_id, "geico", *quoted("geico"), total=5)
            ),
            "get_run (snapshot)": await meter.of(kv.get_run(run_id)),
        }
        async with reader.watch(run_id) as watch:
            await watch.next_events(-1, timeout=5)  # the backlog

            async def one_event_delivered() -> None:
                first = await kv.append_events(run_id, [activity("pushed")])
                assert [e.id for e in await watch.next_events(first - 1, timeout=30)] == [first]

            costs["append + its delivery to a watching reader"] = await meter.of(
                one_event_delivered()
            )
        costs["finish_run"] = await meter.of(kv.finish_run(run_id, *completed()))
    finally:
        meter.close()
        await kv.aclose()
        await reader.aclose()

    for name, counts in costs.items():
        print(f"{name}: {billed(counts)} billed {dict(sorted(counts.items()))}")
    assert costs["append_events (1 activity)"] == Counter(rpushx=1)
    assert costs["append + its delivery to a watching reader"] == Counter(rpushx=1, lrange=1)
    assert costs["record_outcome (2 events)"] == Counter(evalsha=1, hsetnx=1, hincrby=1, rpushx=1)
    assert costs["finish_run"] == Counter(
        evalsha=1, rpushx=1, rename=1, hkeys=1, hdel=1, hset=1, expire=2
    ), "the terminal event, the fence (rename), the renewals gone, the run's end and two TTLs"
    assert costs["claim_provider (claimed)"] == Counter(evalsha=1, hmget=1, hset=1)
    assert costs["claim_provider (held)"] == Counter(evalsha=1, hmget=1)
    assert costs["claim_provider (first, with the provider's start)"] == Counter(
        evalsha=1, hmget=1, hset=1, rpushx=1
    ), "the start's work state and event ride on the claim: one more command, not a save"
    assert costs["claim_provider (lease ended, holder checked)"] == Counter(
        evalsha=1, hmget=1, hget=1, lrange=1, hset=1, hdel=1
    ), "the holder's renewal and latest event looked at, its renewal field taken away"
    assert costs["save_provider_work (+1 event)"] == Counter(evalsha=1, hmget=1, hset=1, rpushx=1)
    assert costs["renew_lease"] == Counter(hset=1), "the owner's own renewal field"
    assert billed(costs["create_run"]) <= 6
    assert costs["get_run (snapshot)"] == Counter(evalsha=1, hgetall=1, llen=1, lrange=1)


# --- no database-wide lock -------------------------------------------------------------------


def test_every_script_locks_only_its_keys_and_names_them_at_its_top() -> None:
    for script in (*kv_backend.SCRIPTS, *kv_admission.SCRIPTS):
        first, *lines = script.source.splitlines()
        assert first == KEY_LOCKING, script.name
        named = [line for line in lines if line.startswith("local ") and "KEYS[" in line]
        assert [line.split()[1] for line in named] == list(script.keys), script.name
        assert "KEYS[" not in script.body and "ARGV[" not in script.body, script.name


async def test_a_whole_run_and_its_admission_take_no_global_lock(upstash_server) -> None:
    """The endpoint checks each flagged script's keys against KEYS, as Upstash does, and counts
    the scripts that would have locked the whole database."""
    kv = KVStore(upstash_server.url, upstash_server.token, ttl_seconds=7200)
    admission = KVAdmission(kv.rest, limits=Limits(5, 10, 100), secret=b"s" * 32)
    record = make_record()
    upstash_server.reset_stats()
    try:
        request = AdmissionRequest(
            address="203.0.113.7", subject="c1", token_id="t1", token_expires_at=time.time() + 60
        )
        passed = await admission.admit(request, time.time())
        idem = IdempotencyClaim(key_hash="k" * 64, body_hash="b" * 64)
        await kv.create_run(record, idem)
        await claim(kv, record.run_id, "w1", now=utc_now())
        await kv.save_provider_work(record.run_id, "geico", "w1", ProviderWork(), [activity("x")])
        await kv.renew_lease(record.run_id, "geico", "w1", utc_now() + LEASE)
        await kv.append_events(record.run_id, [activity("y")], nonce="n" * 8, again=True)
        await kv.record_outcome(record.run_id, "geico", *quoted("geico"), total=5)
        await kv.get_run(record.run_id, events_after=-1)
        await kv.finish_run(record.run_id, *completed())
        await kv.release_idempotency(idem, record.run_id)
        await admission.release(passed)
        stats = upstash_server.stats()
    finally:
        await kv.aclose()
    assert stats["commands"] > 10
    assert stats["global_lock_scripts"] == 0


# --- exactly once ----------------------------------------------------------------------------


def test_a_reader_skips_a_late_copy_within_the_window_wherever_its_read_begins() -> None:
    def item(nonce: str) -> str:
        return stored_event_json(activity(nonce), nonce.ljust(8, "x"))

    stored = [item("a"), item("b"), item("c"), item("b"), item("d")]
    nonces = [s[6:14] for s in stored]
    whole = first_copies(0, stored, [])
    assert [e.id for e in whole] == [0, 1, 2, 4]
    for start in range(1, len(stored)):
        read = first_copies(start, stored[start:], nonces[:start])
        assert [e.id for e in read] == [e.id for e in whole if e.id >= start]
    far = [item("b"), *(item(f"f{i}") for i in range(REPEAT_WINDOW)), item("b")]
    assert len(first_copies(0, far, [])) == len(far), "a copy beyond the window is an event"


async def test_a_refused_renewal_leaves_no_field_and_no_key_behind(upstash_server) -> None:
    kv = KVStore(upstash_server.url, upstash_server.token, ttl_seconds=7200)
    direct = redis_asyncio.Redis.from_url(kv_redis_url(), decode_responses=True)
    record = make_record()
    run_id = record.run_id
    try:
        unknown = make_record().run_id
        with pytest.raises(RunNotFound):
            await kv.renew_lease(unknown, "geico", "w1", utc_now() + LEASE)
        assert not await direct.exists(f"quote:{unknown}"), "no hash without a TTL"
        await kv.create_run(record)
        start = utc_now()
        await claim(kv, run_id, "w1", now=start)
        await kv.renew_lease(run_id, "geico", "w1", start + 2 * LEASE)
        renewed = await claim(kv, run_id, "w2", now=start + LEASE + timedelta(seconds=1))
        taken = await claim(kv, run_id, "w2", now=start + 2 * LEASE + timedelta(seconds=1))
        with pytest.raises(LeaseLost):
            await kv.renew_lease(run_id, "geico", "w1", start + 3 * LEASE)
        fields = sorted(await direct.hkeys(f"quote:{run_id}"))
    finally:
        await kv.aclose()
        await direct.aclose()
    assert renewed.result == "held", "the renewal moved the lease on"
    assert renewed.busy_until is not None and renewed.busy_until >= start + 2 * LEASE
    assert taken.result == "claimed" and taken.deliveries == 2
    assert [f for f in fields if f.startswith("r:")] == ["r:geico:w2"]


async def test_the_rare_paths_bill_what_their_scripts_promise(quiet_kv) -> None:
    kv = KVStore(quiet_kv.url, quiet_kv.token, ttl_seconds=7200)
    meter = CommandMeter(quiet_kv.redis_url)
    record = make_record()
    run_id = record.run_id
    idem = IdempotencyClaim(key_hash="r" * 64, body_hash="b" * 64)
    try:
        await kv.create_run(record, idem)
        await claim(kv, run_id, "w1", now=utc_now())
        # Warm the script cache, so each figure is the script's own steady cost.
        await kv.append_events(run_id, [activity("warm")], again=True)
        await kv.release_idempotency(IdempotencyClaim("w" * 64, "b" * 64), run_id)
        with pytest.raises(LeaseLost):
            await kv.renew_lease(run_id, "geico", "w9", utc_now() + LEASE)
        costs = {
            "append retried, first attempt not found": await meter.of(
                kv.append_events(run_id, [activity("again")], again=True)
            ),
            "release_idempotency": await meter.of(kv.release_idempotency(idem, run_id)),
        }
        before = meter.snapshot()
        with pytest.raises(LeaseLost):
            await kv.renew_lease(run_id, "geico", "w2", utc_now() + LEASE)
        costs["renewal refused"] = meter.delta(before)
    finally:
        meter.close()
        await kv.aclose()
    assert costs["append retried, first attempt not found"] == Counter(
        evalsha=1, llen=1, lrange=1, rpushx=1
    )
    assert costs["release_idempotency"] == Counter({"evalsha": 1, "get": 1, "del": 1})
    assert costs["renewal refused"] == Counter(hset=1, evalsha=1, hdel=1, hmget=1), (
        "the renewal's HSET, then the script that takes its field back out and says why"
    )
