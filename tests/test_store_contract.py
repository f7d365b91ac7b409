"""The Store contract (lib/store/base.py), run unchanged against both backends: the SQLite file,
and KV through the tests-only Upstash REST endpoint in front of a real redis-server.

Several writers share a run (one worker per provider, on different instances): each test that
races them builds one store per writer from `store_factory`, as separate instances would."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, closing
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from lib.models import (
    PROVIDER_IDS,
    ErrorEvent,
    ErrorInfo,
    ProviderId,
    ProviderWork,
    utc_now,
)
from lib.store import (
    IdempotencyClaim,
    LeaseLost,
    ProviderClaim,
    RunFinalized,
    RunNotFound,
    Store,
)
from lib.store.base import RELEASED
from lib.store.sqlite import SQLiteStore
from lib.store.sqlite_file import open_wal_database
from tests.conftest import eventually, make_record
from tests.store_steps import (
    LEASE,
    activity,
    claim,
    completed,
    events_of,
    failed,
    instances,
    lost,
    new_run,
    quoted,
)

ROOT = Path(__file__).resolve().parent.parent


# --- helpers -----------------------------------------------------------------------------------


async def types_of(store: Store, run_id: str) -> list[str]:
    return [e.type for e in await store.read_events(run_id, after=-1)]


# --- creating and reading a run ----------------------------------------------------------------


async def test_a_created_run_reads_back_with_its_started_event_as_id_0(store: Store) -> None:
    record = make_record()
    outcome = await store.create_run(record)
    state = await store.get_run(record.run_id, events_after=-1)
    assert outcome.created and outcome.run_id == record.run_id
    assert state is not None
    assert state.record == record
    assert state.last_event_id == 0
    assert not state.finalized
    assert [e.id for e in state.events] == [0]
    started = state.events[0].as_dict()
    assert started["type"] == "started"
    assert started["providers"] == list(PROVIDER_IDS)
    assert started["total"] == len(PROVIDER_IDS)
    assert state.events[0].data.startswith('{"id":0,"type":"started",')


async def test_an_unknown_run_reads_as_none(store: Store) -> None:
    assert await store.get_run(make_record().run_id) is None
    assert await store.read_events(make_record().run_id, after=-1) == []


async def test_get_run_reads_the_events_after_a_cursor_up_to_a_limit(store: Store) -> None:
    run_id = await new_run(store)
    await store.append_events(run_id, [activity(f"step {i}") for i in range(1, 41)])
    # Cursors both before and inside the last events a snapshot reads for its activity.
    early = await store.get_run(run_id, events_after=2, limit=5)
    late = await store.get_run(run_id, events_after=36, limit=3)
    caught_up = await store.get_run(run_id, events_after=40)
    unasked = await store.get_run(run_id)
    assert early is not None and late is not None and caught_up is not None
    assert unasked is not None
    assert [e.id for e in early.events] == [3, 4, 5, 6, 7]
    assert [e.as_dict()["message"] for e in early.events] == [f"step {i}" for i in range(3, 8)]
    assert [e.id for e in late.events] == [37, 38, 39]
    assert caught_up.events == [] and unasked.events == []
    assert {s.last_event_id for s in (early, late, caught_up, unasked)} == {40}


async def test_read_events_reads_from_a_cursor_in_order_up_to_a_limit(store: Store) -> None:
    run_id = await new_run(store)
    await store.append_events(run_id, [activity(f"step {i}") for i in range(1, 6)])
    after_two = await store.read_events(run_id, after=2)
    limited = await store.read_events(run_id, after=-1, limit=2)
    assert [e.id for e in after_two] == [3, 4, 5]
    assert after_two[0].data.startswith('{"id":3,"type":"activity",')
    assert after_two[0].as_dict()["message"] == "step 3"
    assert [e.id for e in limited] == [0, 1]
    assert await store.read_events(run_id, after=5) == []


async def test_the_snapshot_shows_each_providers_latest_activity_from_the_runs_last_events(
    store: Store,
) -> None:
    run_id = await new_run(store)
    await store.append_events(
        run_id,
        [
            activity("Opening the quote form"),
            activity("Filling in the vehicle", provider="progressive"),
            activity("Submitting"),
        ],
    )
    last = activity("Reading the premium", provider="progressive")
    await store.append_events(run_id, [last])
    state = await store.get_run(run_id)
    assert state is not None
    assert state.record.provider("geico").last_activity == "Submitting"
    assert state.record.provider("progressive").last_activity == "Reading the premium"
    assert state.record.provider("allstate").last_activity is None
    assert state.record.updated_at == last.ts


async def test_without_a_tail_the_snapshot_falls_back_to_the_activity_in_the_work_state(
    store: Store,
) -> None:
    run_id = await new_run(store)
    now = utc_now()
    assert (await claim(store, run_id, "w1", now=now)).result == "claimed"
    work = ProviderWork(attempt=1, attempt_started_at=now, last_activity="Saved with the work")
    await store.save_provider_work(run_id, "geico", "w1", work)
    await store.append_events(run_id, [activity("Newer, in the events")])
    from_tail = await store.get_run(run_id)
    status_only = await store.get_run(run_id, tail=0)
    assert from_tail is not None and status_only is not None
    assert from_tail.record.provider("geico").last_activity == "Newer, in the events"
    assert status_only.record.provider("geico").last_activity == "Saved with the work"
    assert status_only.record.provider("geico").status == "running"


# --- idempotency keys --------------------------------------------------------------------------


def new_claim(body: str = '{"vin":"X"}') -> IdempotencyClaim:
    return IdempotencyClaim.for_request(f"key-{uuid.uuid4()}", body, b"secret")


async def test_an_idempotency_key_maps_to_the_first_run(store: Store) -> None:
    claim_ = new_claim()
    first, second = make_record(), make_record()
    created = await store.create_run(first, claim_)
    repeated = await store.create_run(second, claim_)
    assert created.created
    assert not repeated.created
    assert repeated.run_id == first.run_id
    assert repeated.body_hash == claim_.body_hash
    assert await store.get_run(second.run_id) is None
    assert await store.get_run(first.run_id) is not None


async def test_a_create_repeated_with_its_own_run_and_key_is_its_retry_on_both_backends(
    store: Store,
) -> None:
    """Once differed: KV answered a create that found its own run under the key "created",
    SQLite "replayed"; a lookup is a replay on both."""
    claim_ = new_claim()
    record = make_record()
    first = await store.create_run(record, claim_)
    again = await store.create_run(record, claim_)
    found = await store.find_idempotent_run(claim_)
    state = await store.get_run(record.run_id, events_after=-1)
    assert first.created and again.created and again.run_id == record.run_id
    assert found is not None and not found.created and found.run_id == record.run_id
    assert found.body_hash == claim_.body_hash
    assert state is not None and [e.type for e in state.events] == ["started"]


async def test_concurrent_creates_with_one_idempotency_key_create_one_run(store_factory) -> None:
    claim_ = new_claim()
    records = [make_record() for _ in range(10)]
    async with instances(store_factory, 10) as stores:
        outcomes = await asyncio.gather(
            *(s.create_run(r, claim_) for s, r in zip(stores, records, strict=True))
        )
        exist = [await stores[0].get_run(r.run_id) is not None for r in records]
    assert sum(o.created for o in outcomes) == 1
    winner = next(o.run_id for o in outcomes if o.created)
    assert {o.run_id for o in outcomes} == {winner}
    assert sum(exist) == 1


async def test_releasing_an_idempotency_key_forgets_only_its_mapping_to_that_run(
    store: Store,
) -> None:
    claim_ = new_claim()
    first, second, third = make_record(), make_record(), make_record()
    await store.create_run(first, claim_)
    await store.release_idempotency(claim_, second.run_id)  # not the run the key maps to
    still = await store.create_run(second, claim_)
    await store.release_idempotency(claim_, first.run_id)
    afresh = await store.create_run(third, claim_)
    assert not still.created and still.run_id == first.run_id
    assert afresh.created and afresh.run_id == third.run_id
    assert await store.get_run(first.run_id) is not None, "only the mapping is forgotten"


async def test_an_idempotency_claim_is_stable_and_its_body_hash_keyed_by_the_secret() -> None:
    body = '{"driver":{"firstName":"Ana"}}'
    one = IdempotencyClaim.for_request("k", body, b"secret-1")
    again = IdempotencyClaim.for_request("k", body, b"secret-1")
    other_secret = IdempotencyClaim.for_request("k", body, b"secret-2")
    other_body = IdempotencyClaim.for_request("k", body + " ", b"secret-1")
    assert one == again
    assert one.key_hash == other_secret.key_hash
    assert one.body_hash != other_secret.body_hash
    assert one.body_hash != other_body.body_hash


# --- appending events --------------------------------------------------------------------------


async def test_appends_get_consecutive_ids_and_one_append_keeps_its_order(store: Store) -> None:
    run_id = await new_run(store)
    single = [await store.append_events(run_id, [activity(f"one {i}")]) for i in range(3)]
    batch_first = await store.append_events(run_id, [activity(f"batch {i}") for i in range(4)])
    after = await store.append_events(run_id, [activity("after")])
    events = await events_of(store, run_id)
    assert single == [1, 2, 3]
    assert batch_first == 4
    assert after == 8
    assert [e["id"] for e in events] == list(range(9))
    assert [e.get("message") for e in events[4:8]] == [f"batch {i}" for i in range(4)]


@pytest.mark.timeout(600)  # 5,000 appends through the in-process endpoint: slow when busy
async def test_fifty_concurrent_writers_lose_and_duplicate_nothing(store_factory) -> None:
    # A KV client timeout would put an append on the unknown-fate path, which has its own
    # tests (tests/test_kv_faults.py); this one is about concurrent writers alone.
    async with instances(store_factory, 5, timeout=60.0) as stores:
        run_id = await new_run(stores[0])

        async def writer(w: int) -> list[int]:
            store = stores[w % len(stores)]
            return [await store.append_events(run_id, [activity(f"{w}:{i}")]) for i in range(100)]

        returned = await asyncio.gather(*(writer(w) for w in range(50)))
        events = await events_of(stores[0], run_id)
    assert sorted(i for ids in returned for i in ids) == list(range(1, 5001))
    assert [e["id"] for e in events] == list(range(5001))
    messages = [str(e["message"]) for e in events[1:]]
    assert len(set(messages)) == 5000
    for w in range(50):
        mine = [m for m in messages if m.startswith(f"{w}:")]
        assert mine == [f"{w}:{i}" for i in range(100)], "a writer's events were reordered"


async def test_appending_to_an_unknown_run_is_refused(store: Store) -> None:
    with pytest.raises(RunNotFound):
        await store.append_events(make_record().run_id, [activity("orphan")])


# --- claiming a provider -----------------------------------------------------------------------


async def test_the_first_claim_wins_and_others_see_it_held_until_its_lease_ends(
    store: Store,
) -> None:
    run_id = await new_run(store)
    now = utc_now()
    first = await claim(store, run_id, "w1", now=now)
    second = await claim(store, run_id, "w2", now=now + timedelta(seconds=1))
    just_before = await claim(store, run_id, "w2", now=now + LEASE - timedelta(milliseconds=1))
    state = await store.get_run(run_id)
    assert first.result == "claimed"
    assert first.deliveries == 1
    assert first.work == ProviderWork()
    assert second.result == "held" and just_before.result == "held"
    assert second.busy_until == now + LEASE
    assert state is not None
    assert state.record.leases["geico"].owner == "w1"
    assert state.record.leases["geico"].until == now + LEASE
    assert state.record.provider("geico").status == "running"
    assert state.record.provider("progressive").status == "pending"


async def test_after_the_lease_ends_its_holder_keeps_the_provider_while_it_writes_events(
    store: Store,
) -> None:
    run_id = await new_run(store)
    start = utc_now()
    await claim(store, run_id, "w1", now=start)
    wrote_at = start + timedelta(seconds=30)
    await store.append_events(run_id, [activity("still working", ts=wrote_at)])
    # Another provider's event says nothing about geico's worker.
    await store.append_events(
        run_id, [activity("other", provider="progressive", ts=start + timedelta(seconds=50))]
    )
    later = start + LEASE + timedelta(seconds=15)  # w1's lease has ended
    alive = await claim(
        store, run_id, "w2", now=later, alive_since=wrote_at - timedelta(milliseconds=1)
    )
    at_the_event = await claim(store, run_id, "w2", now=later, alive_since=wrote_at)
    state = await store.get_run(run_id)
    assert alive.result == "held"
    assert alive.busy_until == wrote_at + LEASE
    assert at_the_event.result == "claimed", "only an event strictly after alive_since counts"
    assert at_the_event.deliveries == 2
    assert state is not None and state.record.leases["geico"].owner == "w2"


async def test_a_claim_refused_by_a_holders_recent_event_leaves_the_holder_its_renewals(
    store: Store,
) -> None:
    run_id = await new_run(store)
    start = utc_now()
    await claim(store, run_id, "w1", now=start)
    wrote_at = start + timedelta(seconds=30)
    await store.append_events(run_id, [activity("still working", ts=wrote_at)])
    later = start + LEASE + timedelta(seconds=5)  # w1's lease has ended; its event has not aged
    refused = await claim(store, run_id, "w2", now=later)
    # w1, still alive, renews: the refused claim took nothing from it.
    await store.renew_lease(run_id, "geico", "w1", later + LEASE)
    state = await store.get_run(run_id)
    assert refused.result == "held"
    assert state is not None and state.record.leases["geico"].owner == "w1"
    assert state.record.leases["geico"].until == later + LEASE


async def test_a_holders_event_counts_however_many_events_other_providers_wrote_since(
    store: Store,
) -> None:
    """Busy providers do not push a live holder's sign of life out of sight: the rule looks at
    the provider's latest event in the whole run, on both backends."""
    run_id = await new_run(store)
    start = utc_now()
    await claim(store, run_id, "w1", now=start)
    wrote_at = start + timedelta(seconds=30)
    await store.append_events(run_id, [activity("still working", ts=wrote_at)])
    others = ("progressive", "state_farm", "allstate", "liberty_mutual")
    busy = [
        activity(f"step {i}", provider=others[i % 4], ts=wrote_at + timedelta(milliseconds=i))
        for i in range(100)
    ]
    await store.append_events(run_id, busy)
    later = start + LEASE + timedelta(seconds=15)  # w1's lease has ended
    alive = await claim(store, run_id, "w2", now=later, alive_since=wrote_at - timedelta(seconds=1))
    assert alive.result == "held"
    assert alive.busy_until == wrote_at + LEASE


async def test_a_holder_is_judged_by_its_latest_event_not_its_first(store: Store) -> None:
    run_id = await new_run(store)
    start = utc_now()
    await claim(store, run_id, "w1", now=start)
    early, late = start + timedelta(seconds=1), start + timedelta(seconds=40)
    await store.append_events(run_id, [activity("first", ts=early)])
    await store.append_events(run_id, [activity("other", provider="allstate", ts=late)])
    later = start + LEASE + timedelta(seconds=15)
    taken = await claim(store, run_id, "w2", now=later, alive_since=early)
    assert taken.result == "claimed", "geico's own latest event is not after alive_since"


async def test_after_the_lease_ends_a_silent_holder_loses_the_provider(store: Store) -> None:
    run_id = await new_run(store)
    start = utc_now()
    await claim(store, run_id, "w1", now=start)
    later = start + LEASE + timedelta(seconds=1)
    taken = await claim(store, run_id, "w2", now=later)
    with pytest.raises(LeaseLost):
        await store.renew_lease(run_id, "geico", "w1", later + LEASE)
    assert taken.result == "claimed"
    assert taken.deliveries == 2


async def test_a_released_lease_lets_the_next_claim_in_at_once(store: Store) -> None:
    run_id = await new_run(store)
    now = utc_now()
    await claim(store, run_id, "w1", now=now)
    work = ProviderWork(attempt=1, attempt_started_at=now, agent_run_id="agent-1")
    await store.save_provider_work(
        run_id, "geico", "w1", work, [activity("handing back")], lease_until=RELEASED
    )
    resumed = await claim(store, run_id, "w2", now=now + timedelta(seconds=1))
    assert resumed.result == "claimed"
    assert resumed.work == work
    assert resumed.deliveries == 2


async def test_a_released_lease_is_no_longer_its_holders_to_renew(store: Store) -> None:
    """The release rule (Store.renew_lease), one answer on both backends: after a release the
    holder's renewal raises LeaseLost, before the next claim as after it, even when the holder
    had renewed (KV keeps renewals in a field of their own) and wrote an event just now."""
    for takeover in (False, True):
        run_id = await new_run(store)
        now = utc_now()
        await claim(store, run_id, "w1", now=now)
        await store.renew_lease(run_id, "geico", "w1", now + 3 * LEASE)
        work = ProviderWork(attempt=1, attempt_started_at=now)
        await store.save_provider_work(
            run_id, "geico", "w1", work, [activity("handing back")], lease_until=RELEASED
        )
        await store.save_provider_work(run_id, "geico", "w1", work, lease_until=RELEASED)
        if takeover:
            taken = await claim(store, run_id, "w2", now=now + timedelta(seconds=1))
            assert taken.result == "claimed"
        with pytest.raises(LeaseLost):
            await store.renew_lease(run_id, "geico", "w1", now + LEASE)
        if not takeover:
            taken = await claim(store, run_id, "w2", now=now + timedelta(seconds=1))
            assert taken.result == "claimed", "a refused renewal leaves the lease free"
        await store.renew_lease(run_id, "geico", "w2", now + LEASE)  # the new holder's own


async def test_agent_steps_read_back_from_the_outcome_else_from_the_work_so_far(
    store: Store,
) -> None:
    run_id = await new_run(store)
    now = utc_now()
    for provider, steps in (("geico", {"g1": 5}), ("allstate", {"a1": 2, "a2": 4})):
        await claim(store, run_id, "w1", now=now, provider=provider)
        work = ProviderWork(
            attempt=1, agent_run_id="x", agent_run_ids=list(steps), agent_steps=steps
        )
        await store.save_provider_work(run_id, provider, "w1", work)
    outcome, event = quoted("geico")
    outcome = outcome.model_copy(update={"agent_steps": 9})  # the worker's count at the end
    await store.record_outcome(run_id, "geico", outcome, event, total=5)
    state = await store.get_run(run_id)
    assert state is not None
    # geico: its outcome's count; allstate, cut short: the steps its work state has so far.
    assert state.record.agent_steps == {"geico": 9, "allstate": 6}


async def test_the_first_claim_stores_the_providers_start_once_with_the_lease(
    store: Store,
) -> None:
    run_id = await new_run(store)
    now = utc_now()
    start = ProviderWork(attempt=1, attempt_started_at=now, first_started_at=now)

    async def first_claim(owner: str, at: datetime) -> ProviderClaim:
        return await store.claim_provider(
            run_id,
            "geico",
            owner,
            now=at,
            lease_until=at + LEASE,
            alive_since=at - LEASE,
            first_work=start.model_copy(update={"attempt_started_at": at}),
            first_events=[activity("Starting GEICO quote")],
        )

    claimed = await first_claim("w1", now)
    again = await first_claim("w1", now + timedelta(seconds=1))  # a retried claim
    assert claimed.result == again.result == "claimed"
    assert claimed.work == again.work == start
    await store.save_provider_work(run_id, "geico", "w1", start, lease_until=RELEASED)
    resumed = await first_claim("w2", now + timedelta(seconds=2))  # the next delivery
    assert resumed.work == start, "a later claim resumes the stored work, not a new start"
    assert [e["message"] for e in await events_of(store, run_id) if e["type"] == "activity"] == [
        "Starting GEICO quote"
    ]
    state = await store.get_run(run_id)
    assert state is not None and state.record.provider("geico").status == "running"


async def test_the_same_owner_claiming_again_is_idempotent(store: Store) -> None:
    run_id = await new_run(store)
    now = utc_now()
    first = await claim(store, run_id, "w1", now=now)
    again = await claim(store, run_id, "w1", now=now + timedelta(seconds=5))
    state = await store.get_run(run_id)
    assert first.result == again.result == "claimed"
    assert first.deliveries == again.deliveries == 1
    assert state is not None
    assert state.record.leases["geico"].until == now + timedelta(seconds=5) + LEASE


async def test_deliveries_count_every_owner_that_claimed_the_provider(store: Store) -> None:
    run_id = await new_run(store)
    now = utc_now()
    counts = []
    for turn, owner in enumerate(["w1", "w2", "w1", "w3"]):
        result = await claim(store, run_id, owner, now=now + turn * (LEASE + LEASE))
        assert result.result == "claimed"
        counts.append(result.deliveries)
    other = await claim(store, run_id, "w1", now=now, provider="progressive")
    assert counts == [1, 2, 3, 4]
    assert other.deliveries == 1, "deliveries are counted per provider"


async def test_claims_report_a_finished_provider_an_ended_run_and_a_missing_run(
    store: Store,
) -> None:
    run_id = await new_run(store)
    now = utc_now()
    await claim(store, run_id, "w1", now=now)
    await store.record_outcome(run_id, "geico", *quoted("geico"), total=5)
    finished = await claim(store, run_id, "w2", now=now)
    unclaimed = await claim(store, run_id, "w2", now=now, provider="progressive")
    await store.finish_run(run_id, *lost())
    ended = await claim(store, run_id, "w3", now=now, provider="allstate")
    missing = await claim(store, make_record().run_id, "w1", now=now)
    assert finished.result == "finished"
    assert unclaimed.result == "claimed"
    assert ended.result == "ended"
    assert missing.result == "missing"


async def test_concurrent_claims_by_many_owners_give_the_provider_to_exactly_one(
    store_factory,
) -> None:
    async with instances(store_factory, 8) as stores:
        run_id = await new_run(stores[0])
        now = utc_now()
        results = await asyncio.gather(
            *(claim(s, run_id, f"w{i}", now=now) for i, s in enumerate(stores))
        )
        state = await stores[0].get_run(run_id)
    winners = [f"w{i}" for i, r in enumerate(results) if r.result == "claimed"]
    assert len(winners) == 1
    assert sorted(r.result for r in results) == ["claimed"] + ["held"] * 7
    assert state is not None and state.record.leases["geico"].owner == winners[0]


# --- a provider's work and its lease -----------------------------------------------------------


async def test_saved_work_reads_back_with_its_events_and_moves_the_lease(store: Store) -> None:
    run_id = await new_run(store)
    now = utc_now()
    await claim(store, run_id, "w1", now=now)
    work = ProviderWork(
        attempt=2,
        attempt_started_at=now,
        first_started_at=now - timedelta(minutes=3),
        agent_run_id="agent-2",
        agent_run_ids=["agent-1", "agent-2"],
        cancelled_agent_run_ids=["agent-1"],
        last_activity="Attempt 2 started",
    )
    extended = now + timedelta(minutes=2)
    await store.save_provider_work(
        run_id,
        "geico",
        "w1",
        work,
        [activity("Attempt 2 started"), activity("Agent run agent-2")],
        lease_until=extended,
    )
    state = await store.get_run(run_id, events_after=0)
    assert state is not None
    assert state.record.work["geico"] == work
    assert state.record.leases["geico"].until == extended
    assert [(e.id, e.as_dict()["message"]) for e in state.events] == [
        (1, "Attempt 2 started"),
        (2, "Agent run agent-2"),
    ]
    held = await claim(store, run_id, "w2", now=now + LEASE + timedelta(seconds=1))
    assert held.result == "held" and held.busy_until == extended


async def test_renewing_a_lease_moves_its_end(store: Store) -> None:
    run_id = await new_run(store)
    now = utc_now()
    await claim(store, run_id, "w1", now=now)
    renewed = now + timedelta(minutes=5)
    await store.renew_lease(run_id, "geico", "w1", renewed)
    state = await store.get_run(run_id)
    held = await claim(store, run_id, "w2", now=now + timedelta(minutes=4))
    assert state is not None and state.record.leases["geico"].until == renewed
    assert held.result == "held"


async def test_a_worker_without_the_lease_writes_nothing(store: Store) -> None:
    run_id = await new_run(store)
    now = utc_now()
    work = ProviderWork(attempt=1, attempt_started_at=now)
    with pytest.raises(LeaseLost):  # never claimed
        await store.save_provider_work(run_id, "geico", "w1", work, [activity("not mine")])
    await claim(store, run_id, "w1", now=now)
    with pytest.raises(LeaseLost):
        await store.save_provider_work(run_id, "geico", "w2", work, [activity("not mine")])
    with pytest.raises(LeaseLost):
        await store.renew_lease(run_id, "geico", "w2", now + timedelta(hours=1))
    with pytest.raises(RunNotFound):
        await store.save_provider_work(make_record().run_id, "geico", "w1", work)
    with pytest.raises(RunNotFound):
        await store.renew_lease(make_record().run_id, "geico", "w1", now)
    state = await store.get_run(run_id)
    assert state is not None
    assert "geico" not in state.record.work
    assert state.record.leases["geico"].until == now + LEASE
    assert await types_of(store, run_id) == ["started"]


# --- outcomes ----------------------------------------------------------------------------------


async def test_an_outcome_is_recorded_once_with_its_event_and_the_runs_progress(
    store: Store,
) -> None:
    run_id = await new_run(store)
    outcome, event = quoted("geico")
    written = await store.record_outcome(run_id, "geico", outcome, event, total=5)
    again = await store.record_outcome(run_id, "geico", *failed("geico"), total=5)
    state = await store.get_run(run_id, events_after=0)
    assert written.first_id == 1 and written.completed == 1
    assert again.first_id is None and again.completed == 1
    assert state is not None
    assert [e.as_dict() for e in state.events] == [
        {"id": 1, **json.loads(event.model_dump_json())},
        {
            "id": 2,
            "type": "progress",
            "completed": 1,
            "total": 5,
            "percent": 20,
            "ts": json.loads(event.model_dump_json())["ts"],
        },
    ]
    geico = state.record.provider("geico")
    assert geico.status == "quoted" and geico.quote == outcome.quote
    assert state.record.completed == 1


async def test_a_failed_outcome_shows_as_the_providers_error(store: Store) -> None:
    run_id = await new_run(store)
    outcome, event = failed("allstate")
    await store.record_outcome(run_id, "allstate", outcome, event, total=5)
    state = await store.get_run(run_id)
    assert state is not None
    allstate = state.record.provider("allstate")
    assert allstate.status == "failed"
    assert allstate.error == outcome.error
    assert allstate.quote is None
    assert (await types_of(store, run_id))[1:] == ["provider_error", "progress"]


async def test_five_providers_recording_at_once_count_progress_one_to_five(
    store_factory,
) -> None:
    async with instances(store_factory, 5) as stores:
        run_id = await new_run(stores[0])
        written = await asyncio.gather(
            *(
                s.record_outcome(run_id, p, *quoted(p), total=5)
                for s, p in zip(stores, PROVIDER_IDS, strict=True)
            )
        )
        events = await events_of(stores[0], run_id)
        state = await stores[0].get_run(run_id)
    assert sorted(w.completed for w in written) == [1, 2, 3, 4, 5]
    progress = [e for e in events if e["type"] == "progress"]
    assert [(e["completed"], e["percent"]) for e in progress] == [
        (1, 20),
        (2, 40),
        (3, 60),
        (4, 80),
        (5, 100),
    ]
    for w in written:  # each quote is followed by the progress it made
        assert w.first_id is not None
        assert events[w.first_id]["type"] == "quote"
        assert events[w.first_id + 1]["completed"] == w.completed
    assert len(events) == 11
    assert state is not None and state.record.completed == 5


async def test_an_outcome_for_an_ended_run_is_refused_and_leaves_nothing(store: Store) -> None:
    run_id = await new_run(store)
    await store.finish_run(run_id, *completed())
    with pytest.raises(RunFinalized):
        await store.record_outcome(run_id, "geico", *quoted("geico"), total=5)
    state = await store.get_run(run_id)
    assert state is not None
    assert state.record.provider("geico").quote is None
    assert state.record.completed == 0
    assert await types_of(store, run_id) == ["started", "complete"]


async def test_an_outcome_repeated_after_the_runs_end_is_refused_too(store: Store) -> None:
    run_id = await new_run(store)
    await store.record_outcome(run_id, "geico", *quoted("geico"), total=5)
    await store.finish_run(run_id, *completed())
    with pytest.raises(RunFinalized):
        await store.record_outcome(run_id, "geico", *quoted("geico"), total=5)
    assert await types_of(store, run_id) == ["started", "quote", "progress", "complete"]


async def test_an_outcome_for_an_unknown_run_is_refused(store: Store) -> None:
    missing = make_record().run_id
    with pytest.raises(RunNotFound):
        await store.record_outcome(missing, "geico", *quoted("geico"), total=5)
    assert await store.get_run(missing) is None


# --- the run's end -----------------------------------------------------------------------------


async def test_finishing_a_run_fences_every_later_write(store: Store) -> None:
    run_id = await new_run(store)
    now = utc_now()
    await claim(store, run_id, "w1", now=now)
    terminal = await store.finish_run(run_id, *completed())
    work = ProviderWork(attempt=1)
    with pytest.raises(RunFinalized):
        await store.append_events(run_id, [activity("late")])
    with pytest.raises(RunFinalized):
        await store.finish_run(run_id, *lost())
    with pytest.raises(RunFinalized):
        await store.save_provider_work(run_id, "geico", "w1", work, [activity("late")])
    with pytest.raises(RunFinalized):
        await store.renew_lease(run_id, "geico", "w1", now + LEASE)
    assert terminal == 1
    assert await types_of(store, run_id) == ["started", "complete"]


async def test_finishing_an_unknown_run_is_refused(store: Store) -> None:
    with pytest.raises(RunNotFound):
        await store.finish_run(make_record().run_id, *completed())


async def test_an_ended_run_reads_back_with_its_end_and_all_its_events(store: Store) -> None:
    run_id = await new_run(store)
    await store.append_events(run_id, [activity("working")])
    await store.record_outcome(run_id, "geico", *quoted("geico"), total=5)
    event, end = lost()
    terminal = await store.finish_run(run_id, event, end)
    state = await store.get_run(run_id, events_after=-1)
    read = await store.read_events(run_id, after=2)
    assert terminal == 4
    assert state is not None
    assert state.finalized
    assert state.last_event_id == 4
    assert [e.type for e in state.events] == ["started", "activity", "quote", "progress", "error"]
    assert [e.id for e in read] == [3, 4]
    assert read[-1].is_terminal
    record = state.record
    assert record.status == "failed"
    assert record.error == end.error
    assert record.ended_at == end.ended_at
    assert record.provider("geico").status == "quoted", "an outcome outlives the run's failure"
    assert record.provider("progressive").status == "failed"
    assert record.provider("progressive").error == end.error


async def test_a_completed_run_has_no_error(store: Store) -> None:
    run_id = await new_run(store)
    await store.finish_run(run_id, *completed())
    state = await store.get_run(run_id)
    assert state is not None and state.finalized
    assert state.record.status == "completed"
    assert state.record.error is None


async def test_append_event_with_a_terminal_event_ends_the_run_as_it_says(store: Store) -> None:
    run_id = await new_run(store)
    terminal = await store.append_event(run_id, ErrorEvent(code="deadline_exceeded", message="x"))
    state = await store.get_run(run_id)
    assert terminal == 1
    assert state is not None and state.finalized
    assert state.record.status == "failed"
    assert state.record.error == ErrorInfo(code="deadline_exceeded", message="x")


async def test_concurrent_finishers_write_exactly_one_terminal_event(store_factory) -> None:
    async with instances(store_factory, 10) as stores:
        run_id = await new_run(stores[0])

        async def finish(store: Store) -> int | None:
            try:
                return await store.finish_run(run_id, *lost())
            except RunFinalized:
                return None

        results = await asyncio.gather(*(finish(s) for s in stores))
        types = await types_of(stores[0], run_id)
    assert sorted(results, key=lambda r: r is None) == [1] + [None] * 9
    assert types == ["started", "error"]


async def test_writes_racing_the_end_land_before_it_or_are_refused(store_factory) -> None:
    async with instances(store_factory, 6) as stores:
        run_id = await new_run(stores[0])
        accepted: dict[str, int] = {}
        refused: list[str] = []
        under_way: list[int] = []
        all_writing = asyncio.Event()

        async def writer(store: Store, w: int) -> None:
            i = 0
            while True:
                message = f"{w}:{i}"
                try:
                    accepted[message] = await store.append_events(run_id, [activity(message)])
                except RunFinalized:
                    refused.append(message)
                    return
                i += 1
                if i == 5:
                    under_way.append(w)
                    if len(under_way) == 4:  # every writer is appending when the end comes
                        all_writing.set()

        async def outcome(store: Store, provider: ProviderId) -> int | None:
            await all_writing.wait()
            try:
                return (
                    await store.record_outcome(run_id, provider, *quoted(provider), total=5)
                ).first_id
            except RunFinalized:
                return None

        async def finish(store: Store) -> int:
            await all_writing.wait()
            return await store.finish_run(run_id, *lost())

        writers = [writer(s, w) for w, s in enumerate(stores[:4])]
        outcomes = [outcome(stores[4], p) for p in PROVIDER_IDS]
        *_, recorded, terminal = await asyncio.gather(
            *writers, asyncio.gather(*outcomes), finish(stores[5])
        )
        events = await events_of(stores[0], run_id)
    assert events[-1]["id"] == terminal and events[-1]["type"] == "error"
    assert all(event_id < terminal for event_id in accepted.values())
    logged = {str(e["message"]): e["id"] for e in events if e["type"] == "activity"}
    assert logged == accepted, "every accepted append is there, once, where it was told"
    assert len(refused) == 4 and not set(refused) & set(logged)
    quotes = [e["id"] for e in events if e["type"] == "quote"]
    progress = [e["completed"] for e in events if e["type"] == "progress"]
    assert quotes == sorted(first for first in recorded if first is not None)
    assert progress == list(range(1, len(quotes) + 1))


def start_cli(store_factory: Any, command: str, *run_ids: str) -> subprocess.Popen[str]:
    """tests/store_cli.py in its own process; it prints "ready" and waits for a line."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.store_cli", *store_factory.cli_args, command, *run_ids],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return process


async def wait_ready(process: subprocess.Popen[str]) -> None:
    assert process.stdout is not None
    line = await asyncio.to_thread(process.stdout.readline)
    assert line.strip() == "ready", process.stderr.read() if process.stderr else line


def release(process: subprocess.Popen[str]) -> None:
    assert process.stdin is not None
    process.stdin.write("go\n")
    process.stdin.flush()


async def result_of(process: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = await asyncio.to_thread(process.communicate, timeout=60)
    assert process.returncode == 0, err
    value: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return value


async def test_two_processes_racing_to_finish_runs_write_one_terminal_event_each(
    store: Store, store_factory
) -> None:
    run_ids = [await new_run(store) for _ in range(20)]
    racers = [start_cli(store_factory, "finish", *run_ids) for _ in range(2)]
    for racer in racers:
        await wait_ready(racer)
    for racer in racers:  # both are waiting: released together
        release(racer)
    results = [(await result_of(r))["results"] for r in racers]
    for index, run_id in enumerate(run_ids):
        outcomes = sorted((results[0][index], results[1][index]), key=str)
        assert outcomes == [1, "finalized"], (run_id, outcomes)
        assert await types_of(store, run_id) == ["started", "error"]


# --- expiry ------------------------------------------------------------------------------------


async def test_runs_expire_after_the_ttl(store_factory) -> None:
    short = store_factory(ttl_seconds=1)
    try:
        run_id = await new_run(short)
        await short.append_events(run_id, [activity("soon gone")])

        async def expired() -> bool:
            return await short.get_run(run_id) is None

        await eventually(expired, "the run expired")
        assert await short.read_events(run_id, after=-1) == []
        assert (await claim(short, run_id, "w1", now=utc_now())).result == "missing"
        with pytest.raises(RunNotFound):
            await short.append_events(run_id, [activity("too late")])
        with pytest.raises(RunNotFound):
            await short.finish_run(run_id, *completed())
    finally:
        await short.aclose()


def expiries(path: str, table: str, run_id: str | None = None) -> list[float]:
    with closing(sqlite3.connect(path)) as db:
        where, args = (" WHERE run_id = ?", (run_id,)) if run_id else ("", ())
        return [row[0] for row in db.execute(f"SELECT expires_at FROM {table}{where}", args)]


def rows_of(path: str, run_id: str) -> dict[str, int]:
    with closing(sqlite3.connect(path)) as db:
        return {
            table: db.execute(
                f"SELECT COUNT(*) FROM {table} WHERE run_id = ?", (run_id,)
            ).fetchone()[0]
            for table in ("runs", "events", "providers")
        }


async def test_every_row_the_sqlite_store_writes_expires_within_the_ttl(tmp_path) -> None:
    ttl = 600
    path = str(tmp_path / "quotes.sqlite3")
    local = SQLiteStore(path, ttl_seconds=ttl)
    record = make_record()
    try:
        await local.create_run(record, new_claim())
        await claim(local, record.run_id, "w1", now=utc_now())
        await local.record_outcome(record.run_id, "geico", *quoted("geico"), total=5)
        horizon = time.time() + ttl
        for table in ("runs", "idempotency"):
            assert expiries(path, table), table
            assert all(at <= horizon for at in expiries(path, table)), table
        # The run's end is its last write: it renews the run's expiry to the full TTL.
        with closing(sqlite3.connect(path)) as db, db:
            db.execute(
                "UPDATE runs SET expires_at = ? WHERE run_id = ?",
                (time.time() + 100, record.run_id),
            )
        before = time.time()
        await local.finish_run(record.run_id, *completed())
        [renewed] = expiries(path, "runs", record.run_id)
        assert before + ttl <= renewed <= time.time() + ttl
    finally:
        await local.aclose()


async def test_the_sqlite_store_purges_the_rows_of_expired_runs(tmp_path) -> None:
    path = str(tmp_path / "quotes.sqlite3")
    short = SQLiteStore(path, ttl_seconds=1)
    idem = new_claim()
    record = make_record()
    try:
        await short.create_run(record, idem)
        await claim(short, record.run_id, "w1", now=utc_now())
        await short.append_events(record.run_id, [activity("soon gone")])
        assert rows_of(path, record.run_id) == {"runs": 1, "events": 2, "providers": 1}

        async def expired() -> bool:
            return await short.get_run(record.run_id) is None

        await eventually(expired, "the run expired")
    finally:
        await short.aclose()
    later = SQLiteStore(path, ttl_seconds=7200)  # a new instance purges on its first create
    try:
        await later.create_run(make_record())
    finally:
        await later.aclose()
    assert rows_of(path, record.run_id) == {"runs": 0, "events": 0, "providers": 0}
    assert expiries(path, "idempotency") == []


# --- watching a run ----------------------------------------------------------------------------


async def test_a_waiting_reader_is_woken_by_an_append_from_another_process(
    store: Store, store_factory
) -> None:
    run_id = await new_run(store)
    writer = start_cli(store_factory, "append", run_id)
    await wait_ready(writer)
    async with store.watch(run_id) as watch:
        assert [e.id for e in await watch.next_events(-1, timeout=5)] == [0]
        assert await watch.next_events(0, timeout=0.05) == []
        release(writer)
        events = await watch.next_events(0, timeout=30)
    sent = await result_of(writer)
    assert sent["id"] == 1
    assert [e.id for e in events] == [1]
    assert events[0].as_dict()["message"] == "from another process"
    assert watch.last_heard is not None


async def test_a_watch_delivers_the_backlog_then_live_events_in_order_exactly_once(
    store: Store,
) -> None:
    run_id = await new_run(store)
    await store.append_events(run_id, [activity(f"step {i}") for i in range(1, 4)])

    async def write_more() -> None:
        for i in range(4, 40):
            await store.append_events(run_id, [activity(f"step {i}")])
            if i % 7 == 0:
                await asyncio.sleep(0.03)
        await store.finish_run(run_id, *completed())

    received: list[int] = []
    async with store.watch(run_id) as watch:
        writer = asyncio.create_task(write_more())
        cursor = -1
        while not received or received[-1] < 40:
            batch = await watch.next_events(cursor, timeout=10)
            assert batch, "the watch stalled"
            received.extend(e.id for e in batch)
            cursor = batch[-1].id
        await writer
        assert await watch.next_events(cursor, timeout=0.1) == []
    assert received == list(range(41))


async def test_wait_for_events_returns_what_arrives_or_nothing_at_the_timeout(
    store: Store,
) -> None:
    run_id = await new_run(store)
    assert await store.wait_for_events(run_id, after=0, timeout=0.2) == []
    waiting = asyncio.create_task(store.wait_for_events(run_id, after=0, timeout=30))
    await asyncio.sleep(0.1)  # let the reader start waiting before the write
    await store.append_events(run_id, [activity("soon")])
    events = await waiting
    assert [e.id for e in events] == [1]


def test_many_instances_opening_a_fresh_sqlite_file_at_once_all_open_it(tmp_path) -> None:
    # Switching a fresh file to WAL from several connections at once deadlocks, and SQLite
    # answers "database is locked" without waiting; the opener must wait it out.
    def open_at_once(path: str, count: int) -> list[str]:
        barrier = threading.Barrier(count)

        def open_one() -> str:
            barrier.wait()
            db = open_wal_database(path)
            try:
                return str(db.execute("PRAGMA journal_mode").fetchone()[0])
            finally:
                db.close()

        with ThreadPoolExecutor(count) as pool:
            return list(pool.map(lambda _: open_one(), range(count)))

    for round_ in range(40):
        modes = open_at_once(str(tmp_path / f"fresh-{round_}.sqlite3"), 12)
        assert modes == ["wal"] * 12


# --- the deployment's agent slots (TINYFISH_MAX_CONCURRENCY) -----------------------------------

# Slot times far ahead of any other test's, so slots other tests left behind have ended by then.
SLOTS_EPOCH = datetime(2999, 1, 1, tzinfo=utc_now().tzinfo)


@asynccontextmanager
async def agent_slots(store: Store, *holders: str) -> AsyncIterator[datetime]:
    """A moment in the slots' own time line, with every earlier test's slots swept out; the
    slots of `holders` are released after the test (slots are deployment-wide)."""
    moment = SLOTS_EPOCH + timedelta(days=time.time() % 100_000 / 10)
    sweep = f"sweep-{uuid.uuid4().hex}"
    assert await store.take_agent_slot(sweep, limit=1 << 30, now=moment, until=moment + LEASE)
    await store.release_agent_slot(sweep)
    try:
        yield moment
    finally:
        for holder in holders:
            await store.release_agent_slot(holder)


async def test_agent_slots_admit_up_to_the_limit_and_a_holder_renews_its_own(store: Store) -> None:
    take = store.take_agent_slot
    async with agent_slots(store, "r1:geico", "r1:progressive", "r2:geico") as now:
        assert await take("r1:geico", limit=2, now=now, until=now + LEASE)
        assert await take("r1:progressive", limit=2, now=now, until=now + LEASE)
        assert not await take("r2:geico", limit=2, now=now, until=now + LEASE)
        assert await take("r1:geico", limit=2, now=now, until=now + LEASE)  # renewed, no third
        await store.release_agent_slot("r1:geico")
        assert await take("r2:geico", limit=2, now=now, until=now + LEASE)
        assert not await take("r1:geico", limit=2, now=now, until=now + LEASE)


async def test_an_agent_slot_nobody_renews_frees_itself_when_its_lease_ends(store: Store) -> None:
    async with agent_slots(store, "dead:geico", "live:geico") as now:
        assert await store.take_agent_slot("dead:geico", limit=1, now=now, until=now + LEASE)
        assert not await store.take_agent_slot(
            "live:geico", limit=1, now=now + LEASE - timedelta(seconds=1), until=now + 2 * LEASE
        )
        later = now + LEASE + timedelta(milliseconds=1)
        assert await store.take_agent_slot("live:geico", limit=1, now=later, until=later + LEASE)


async def test_concurrent_takers_get_exactly_the_limits_worth_of_agent_slots(
    store_factory,
) -> None:
    holders = [f"r{i}:geico" for i in range(8)]
    async with instances(store_factory, 8) as stores, agent_slots(stores[0], *holders) as now:
        taken = await asyncio.gather(
            *(
                s.take_agent_slot(holder, limit=3, now=now, until=now + LEASE)
                for holder, s in zip(holders, stores, strict=True)
            )
        )
    assert sum(taken) == 3
