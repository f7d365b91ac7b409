"""Cancelling a run (DELETE /api/quotes/{runId}): the token, the store's fenced `cancelled` write
on both backends, and what the workers, the deadline and the readers do after it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest

from lib.cancel_tokens import bearer_token, cancel_token, is_cancel_token
from lib.config import get_settings
from lib.models import CancelledEvent, ProviderWork, RunEnd, utc_now
from lib.queue.messages import RunDeadlineMessage
from lib.store import OutcomesChanged, RunFinalized, Store, open_store
from lib.store.base import new_nonce, stored_event_json
from lib.store.kv import CANCEL, KVStore
from lib.worker import ProviderTask, enforce_deadline
from lib.workflow import agent_slot_holder, cancel_run, cancelled_event, stop_agent_runs
from tests.conftest import make_quote, make_record, run_end
from tests.fake_tinyfish import FakeTinyFishServer
from tests.http_helpers import VALID, problem, sse_events
from tests.kv_meter import CommandMeter, billed
from tests.store_steps import (
    LEASE,
    activity,
    claim,
    events_of,
    failed,
    instances,
    lost,
    new_run,
    quoted,
)
from tests.stored_data import stored_bytes
from tests.tinyfish_attempts import API_KEY, REQUEST, Listener, attempt, source_for
from tests.worker_inputs import delivery, message, settings, simulated
from tests.worker_inputs import new_run as worker_run

SECRET = b"a deployment secret"


# --- the token ---------------------------------------------------------------------------------


def test_a_cancel_token_is_256_bits_of_hmac_fixed_per_run_and_secret() -> None:
    token = cancel_token(SECRET, "k3Jx9aaaaaaaaaaaaaaaaa")
    assert len(token) == 43  # 32 bytes, unpadded base64url
    assert token == cancel_token(SECRET, "k3Jx9aaaaaaaaaaaaaaaaa")
    assert token != cancel_token(SECRET, "k3Jx9aaaaaaaaaaaaaaaab")
    assert token != cancel_token(b"another secret", "k3Jx9aaaaaaaaaaaaaaaaa")


def test_only_the_runs_own_token_is_accepted() -> None:
    run_id = "k3Jx9aaaaaaaaaaaaaaaaa"
    token = cancel_token(SECRET, run_id)
    assert is_cancel_token(SECRET, run_id, token)
    assert not is_cancel_token(SECRET, "k3Jx9aaaaaaaaaaaaaaaab", token)
    assert not is_cancel_token(SECRET, run_id, token[:-1])
    assert not is_cancel_token(SECRET, run_id, "é" * 43)


@pytest.mark.parametrize(
    ("header", "credential"),
    [
        (None, None),
        ("Bearer abc", "abc"),
        ("bearer  abc ", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
    ],
)
def test_the_bearer_credential_is_read_from_the_authorization_header(
    header: str | None, credential: str | None
) -> None:
    assert bearer_token(header) == credential


# --- the store's cancelled write, on both backends ---------------------------------------------


async def quote_and_fail(store: Store, run_id: str) -> None:
    """geico quoted at 150, progressive at 90, state_farm failed; the other two still going."""
    for provider, monthly in (("geico", 150.0), ("progressive", 90.0)):
        outcome, event = quoted(provider)  # type: ignore[arg-type]
        quote = make_quote(provider, monthly)  # type: ignore[arg-type]
        outcome = outcome.model_copy(update={"quote": quote})
        event = event.model_copy(update={"quote": quote})
        await store.record_outcome(run_id, provider, outcome, event, total=5)  # type: ignore[arg-type]
    await store.record_outcome(run_id, "state_farm", *failed("state_farm"), total=5)


async def test_a_cancel_ends_the_run_with_the_quotes_so_far_and_the_stopped_providers(
    store: Store,
) -> None:
    run_id = await new_run(store)
    await quote_and_fail(store, run_id)
    await claim(store, run_id, "worker-a", now=utc_now(), provider="allstate")

    cancelled = await cancel_run(store, run_id)

    assert cancelled is not None and cancelled.ended is not None
    last = (await events_of(store, run_id))[-1]
    assert last["type"] == "cancelled"
    assert [q["provider"] for q in last["quotes"]] == ["progressive", "geico"]
    assert last["best"] == "progressive"
    assert last["failed"] == ["state_farm"]
    assert last["stopped"] == ["allstate", "liberty_mutual"]
    record = cancelled.state.record
    assert cancelled.state.finalized and record.status == "cancelled"
    assert cancelled.state.last_event_id == last["id"]
    statuses = {p.provider: p.status for p in record.providers}
    assert statuses == {
        "geico": "quoted",
        "progressive": "quoted",
        "state_farm": "failed",
        "allstate": "cancelled",
        "liberty_mutual": "cancelled",
    }
    assert record.error is None and record.ended_at is not None
    assert [p.status for p in cancelled.ended.providers] == list(statuses.values())


async def test_a_cancelled_run_fences_every_later_write(store: Store) -> None:
    run_id = await new_run(store)
    await claim(store, run_id, "worker-a", now=utc_now())
    await cancel_run(store, run_id)
    count = len(await events_of(store, run_id))

    with pytest.raises(RunFinalized):
        await store.append_events(run_id, [activity("still going")])
    with pytest.raises(RunFinalized):
        await store.record_outcome(run_id, "geico", *quoted("geico"), total=5)
    with pytest.raises(RunFinalized):
        await store.finish_run(run_id, *lost())
    with pytest.raises(RunFinalized):
        await store.renew_lease(run_id, "geico", "worker-a", utc_now() + LEASE)
    assert (await claim(store, run_id, "worker-b", now=utc_now(), provider="allstate")).result == (
        "ended"
    )
    assert len(await events_of(store, run_id)) == count


async def test_a_cancel_built_on_a_stale_read_is_not_written(store: Store) -> None:
    run_id = await new_run(store)
    state = await store.get_run(run_id, tail=0)
    assert state is not None
    await store.record_outcome(run_id, "geico", *quoted("geico"), total=5)
    event = cancelled_event(state.record)
    with pytest.raises(OutcomesChanged):
        await store.cancel_run(
            run_id, event, RunEnd(status="cancelled", ended_at=event.ts), completed=0
        )
    after = await store.get_run(run_id, tail=0)
    assert after is not None and not after.finalized
    assert [e["type"] for e in await events_of(store, run_id)][-1] == "progress"


async def test_cancelling_again_changes_nothing_and_an_ended_run_stays_as_it_ended(
    store: Store,
) -> None:
    run_id = await new_run(store)
    first = await cancel_run(store, run_id)
    again = await cancel_run(store, run_id)
    assert first is not None and first.ended is not None
    assert again is not None and again.ended is None
    assert again.state.record.status == "cancelled"
    assert again.state.last_event_id == first.state.last_event_id

    failed_run = await new_run(store)
    await store.finish_run(failed_run, *lost())
    refused = await cancel_run(store, failed_run)
    assert refused is not None and refused.ended is None
    assert refused.state.record.status == "failed"
    assert (await cancel_run(store, make_record().run_id)) is None


async def test_concurrent_cancels_on_many_instances_write_one_cancelled_event(
    store_factory: Any,
) -> None:
    async with instances(store_factory, 1) as (first,):
        run_id = await new_run(first)
    async with instances(store_factory, 6) as stores:
        results = await asyncio.gather(*(cancel_run(s, run_id) for s in stores))
        types = [e["type"] for e in await events_of(stores[0], run_id)]
    assert types.count("cancelled") == 1 and types[-1] == "cancelled"
    assert sum(r is not None and r.ended is not None for r in results) == 1
    assert all(r is not None and r.state.record.status == "cancelled" for r in results)


async def test_a_cancel_racing_outcomes_lists_exactly_the_quotes_that_landed_before_it(
    store_factory: Any,
) -> None:
    async with instances(store_factory, 1) as (first,):
        run_id = await new_run(first)
    providers = ("geico", "progressive", "state_farm", "allstate", "liberty_mutual")
    async with instances(store_factory, 6) as stores:

        async def outcome(store: Store, provider: Any) -> None:
            with contextlib.suppress(RunFinalized):
                await store.record_outcome(run_id, provider, *quoted(provider), total=5)

        await asyncio.gather(
            cancel_run(stores[0], run_id),
            *(outcome(s, p) for s, p in zip(stores[1:], providers, strict=True)),
        )
        events = await events_of(stores[0], run_id)
        state = await stores[0].get_run(run_id)
    assert state is not None and state.record.status == "cancelled"
    terminal = CancelledEvent.model_validate({k: v for k, v in events[-1].items() if k != "id"})
    landed = {e["provider"] for e in events if e["type"] == "quote"}
    assert {q.provider for q in terminal.quotes} == landed
    assert set(terminal.stopped) == set(providers) - landed
    assert {p.provider for p in state.record.providers if p.status == "cancelled"} == set(
        terminal.stopped
    )


async def test_a_watching_reader_gets_the_cancelled_event_as_the_last(store_factory: Any) -> None:
    async with instances(store_factory, 2) as (writer, reader):
        run_id = await new_run(writer)
        async with reader.watch(run_id) as watch:
            assert [e.type for e in await watch.next_events(-1, 1.0)] == ["started"]
            await cancel_run(writer, run_id)
            seen = await watch.next_events(0, 5.0)
    assert [e.type for e in seen] == ["cancelled"]
    assert seen[0].is_terminal


# --- what stops after a cancel: agent runs, the summary line ------------------------------------


class RecordingSource:
    """A quote source that only records the agent runs it was asked to cancel."""

    def __init__(self, failing: frozenset[str] = frozenset()) -> None:
        self.cancelled: list[str] = []
        self.failing = failing

    async def cancel(self, agent_run_id: str) -> None:
        if agent_run_id in self.failing:
            raise RuntimeError("the agent API did not answer")
        self.cancelled.append(agent_run_id)

    async def agent_steps(self, agent_run_id: str) -> int | None:
        return {"ar-2": 9}.get(agent_run_id)  # the API counts more than the worker stored


async def test_after_a_cancel_every_agent_run_still_going_is_cancelled_and_summarised(
    store: Store, json_logs: Any
) -> None:
    run_id = await new_run(store)
    await store.record_outcome(run_id, "geico", *quoted("geico"), total=5)
    now = utc_now()
    for provider, work in (
        (
            "progressive",
            ProviderWork(
                attempt=2,
                agent_run_id="ar-2",
                agent_run_ids=["ar-1", "ar-2"],
                cancelled_agent_run_ids=["ar-1"],
                agent_steps={"ar-1": 4, "ar-2": 7},
            ),
        ),
        ("allstate", ProviderWork(attempt=1, agent_run_id="ar-3", agent_run_ids=["ar-3"])),
    ):
        await claim(store, run_id, f"worker-{provider}", now=now, provider=provider)  # type: ignore[arg-type]
        await store.save_provider_work(run_id, provider, f"worker-{provider}", work)  # type: ignore[arg-type]
    cancelled = await cancel_run(store, run_id)
    assert cancelled is not None and cancelled.ended is not None
    source = RecordingSource(failing=frozenset({"ar-3"}))

    await stop_agent_runs(source, cancelled.ended)  # type: ignore[arg-type]

    assert source.cancelled == ["ar-2"]
    (summary,) = json_logs.matching(kind="run_summary")
    assert summary["outcome"] == "cancelled" and summary["level"] == "info"
    assert summary["message"].startswith("run cancelled in ")
    providers = summary["providers"]
    assert providers["geico"]["outcome"] == "quoted"
    assert providers["progressive"]["outcome"] == "cancelled"
    assert providers["progressive"]["agentSteps"] == 4 + 9
    assert providers["progressive"]["cancelledAgentRunIds"] == ["ar-1", "ar-2"]
    assert providers["allstate"]["outcome"] == "cancelled"
    assert "cancelledAgentRunIds" not in providers["allstate"]  # its cancel failed, and says so
    assert json_logs.matching(message=f"run {run_id} allstate: cancelling agent run failed")


# --- DELETE /api/quotes/{runId}, in process ----------------------------------------------------


@pytest.fixture
async def run_store(configure: Any) -> AsyncIterator[Store]:
    """The store the functions use, for runs that stay open (no worker works on them)."""
    built = open_store(get_settings())
    yield built
    await built.aclose()


def bearer(run_id: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {cancel_token(get_settings().secret, run_id)}"}


async def open_run(store: Store) -> str:
    """A run with a quote from geico and progressive's worker mid-agent."""
    run_id = await new_run(store)
    await store.record_outcome(run_id, "geico", *quoted("geico"), total=5)
    await claim(store, run_id, "worker-a", now=utc_now(), provider="progressive")
    await store.append_events(run_id, [activity("Entering vehicle details", "progressive")])
    return run_id


async def test_delete_cancels_the_run_and_answers_its_snapshot_seen_by_get_and_stream(
    api: httpx.AsyncClient, run_store: Store
) -> None:
    run_id = await open_run(run_store)

    response = await api.delete(f"/api/quotes/{run_id}", headers=bearer(run_id))

    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["status"] == "cancelled" and "error" not in body
    statuses = {p["provider"]: p["status"] for p in body["providers"]}
    assert statuses == {
        "geico": "quoted",
        "progressive": "cancelled",
        "state_farm": "cancelled",
        "allstate": "cancelled",
        "liberty_mutual": "cancelled",
    }
    assert [q["provider"] for q in body["quotes"]] == ["geico"]
    assert body["progress"] == {"completed": 1, "total": 5, "percent": 20}
    assert (await api.get(f"/api/quotes/{run_id}")).json() == body
    stream = await api.get(f"/api/quotes/{run_id}/stream")
    events = sse_events(stream.text)
    assert events[-1]["type"] == "cancelled" and events[-1]["id"] == body["lastEventId"]
    assert events[-1]["best"] == "geico" and events[-1]["failed"] == []
    assert events[-1]["stopped"] == ["progressive", "state_farm", "allstate", "liberty_mutual"]
    after = await api.get(
        f"/api/quotes/{run_id}/stream", headers={"Last-Event-ID": str(body["lastEventId"])}
    )
    assert after.status_code == 204


async def test_a_cancel_gives_back_the_agent_slots_of_its_unfinished_insurers(
    configure: Any, fresh_instance: Any, run_store: Store
) -> None:
    configure(TINYFISH_MAX_CONCURRENCY="2")
    api = fresh_instance()
    run_id = await open_run(run_store)
    now = utc_now()
    until = now + timedelta(minutes=5)
    # Two of its workers hold the deployment's two agent slots, then their instances die.
    for provider in ("progressive", "state_farm"):
        holder = agent_slot_holder(run_id, provider)
        assert await run_store.take_agent_slot(holder, limit=2, now=now, until=until)
    assert not await run_store.take_agent_slot("next-run:geico", limit=2, now=now, until=until)

    response = await api.delete(f"/api/quotes/{run_id}", headers=bearer(run_id))

    assert response.status_code == 200, response.text
    # Both slots are free at once (limit 1: not even one is still held), not when their
    # leases run out.
    assert await run_store.take_agent_slot("next-run:geico", limit=1, now=now, until=until)
    await run_store.release_agent_slot("next-run:geico")


async def test_a_repeated_cancel_answers_200_with_the_same_snapshot(
    api: httpx.AsyncClient, run_store: Store
) -> None:
    run_id = await open_run(run_store)
    first = await api.delete(f"/api/quotes/{run_id}", headers=bearer(run_id))
    again = await api.delete(f"/api/quotes/{run_id}", headers=bearer(run_id))
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()
    types = [e["type"] for e in await events_of(run_store, run_id)]
    assert types.count("cancelled") == 1


async def test_cancelling_a_run_that_ended_otherwise_is_409(
    api: httpx.AsyncClient, run_store: Store
) -> None:
    completed_run = (await api.post("/api/quotes", json=VALID)).json()["runId"]
    await run_end(api, completed_run)
    failed_run = await new_run(run_store)
    await run_store.finish_run(failed_run, *lost())
    for run_id, status in ((completed_run, "completed"), (failed_run, "failed")):
        response = await api.delete(f"/api/quotes/{run_id}", headers=bearer(run_id))
        body = problem(response, 409)
        assert body["type"].endswith("/run-already-ended")
        assert (await api.get(f"/api/quotes/{run_id}")).json()["status"] == status


async def test_without_this_runs_token_a_cancel_is_401_and_changes_nothing(
    api: httpx.AsyncClient, run_store: Store
) -> None:
    run_id = await open_run(run_store)
    other = make_record().run_id
    for headers in (
        {},
        {"Authorization": "Bearer"},
        {"Authorization": f"Basic {cancel_token(get_settings().secret, run_id)}"},
        bearer(other),
        {"Authorization": f"Bearer {cancel_token(b'another deployment', run_id)}"},
        {"Authorization": "Bearer " + cancel_token(get_settings().secret, run_id)[:-2]},
    ):
        response = await api.delete(f"/api/quotes/{run_id}", headers=headers)
        problem(response, 401)
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert (await api.get(f"/api/quotes/{run_id}")).json()["status"] == "processing"


async def test_cancelling_a_malformed_or_unknown_run_is_404_and_401_comes_first(
    api: httpx.AsyncClient,
) -> None:
    unknown = make_record().run_id
    problem(await api.delete(f"/api/quotes/{unknown}", headers=bearer(unknown)), 404)
    problem(await api.delete("/api/quotes/not-a-run", headers=bearer("not-a-run")), 404)
    problem(await api.delete("/api/quotes/not-a-run"), 404)
    # Without the token, whether a well-formed run exists is not told.
    problem(await api.delete(f"/api/quotes/{unknown}"), 401)


async def test_the_run_path_allows_get_delete_and_options_only(api: httpx.AsyncClient) -> None:
    run_id = make_record().run_id
    for method in ("PUT", "PATCH", "POST"):
        response = await api.request(method, f"/api/quotes/{run_id}")
        problem(response, 405)
        assert response.headers["allow"] == "GET, DELETE, OPTIONS"


async def test_a_browser_may_cancel_across_origins(api: httpx.AsyncClient) -> None:
    run_id = make_record().run_id
    response = await api.options(
        f"/api/quotes/{run_id}",
        headers={
            "Origin": "https://shop.example",
            "Access-Control-Request-Method": "DELETE",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert response.status_code == 200
    assert "DELETE" in response.headers["access-control-allow-methods"]
    assert "authorization" in response.headers["access-control-allow-headers"].lower()


async def test_the_token_posts_answer_gives_cancels_that_run_and_a_replay_gives_it_again(
    api: httpx.AsyncClient,
) -> None:
    headers = {"Idempotency-Key": f"cancel-{uuid.uuid4()}"}
    started = await api.post("/api/quotes", json=VALID, headers=headers)
    replayed = await api.post("/api/quotes", json=VALID, headers=headers)
    assert started.status_code == 202 and replayed.status_code == 200
    token = started.json()["cancelToken"]
    assert len(base64.urlsafe_b64decode(token + "=")) * 8 >= 128
    assert replayed.json()["cancelToken"] == token
    run_id = started.json()["runId"]
    assert token == cancel_token(get_settings().secret, run_id)
    await run_end(api, run_id)
    # The simulated run completed within the POST (in-process), so the token meets a 409.
    problem(
        await api.delete(f"/api/quotes/{run_id}", headers={"Authorization": f"Bearer {token}"}),
        409,
    )


# --- the workers and the deadline after a cancel ------------------------------------------------


async def test_a_worker_mid_agent_stops_and_cancels_its_agent_run_when_its_run_is_cancelled(
    store: Store,
) -> None:
    run_id, _, deadline = await worker_run(store, ["geico"])
    source = simulated(min_seconds=30)
    work = message(run_id, "geico", 1, deadline)
    task = asyncio.create_task(ProviderTask(store, source, settings(), work, delivery()).run())
    await source.wait_for_starts()

    await cancel_run(store, run_id)

    # Its next write (an activity, or the lease's renewal a third of a lease on) is refused.
    await asyncio.wait_for(task, 5)
    assert source.cancelled == source.started == [source.started[0]]
    assert len(source.attempts) == 1
    assert (await events_of(store, run_id))[-1]["type"] == "cancelled"


async def test_a_delivery_for_a_cancelled_run_starts_nothing(store: Store) -> None:
    run_id, providers, deadline = await worker_run(store, ["geico", "progressive"])
    await cancel_run(store, run_id)
    before = await events_of(store, run_id)
    source = simulated()
    for provider in providers:
        work = message(run_id, provider, 2, deadline)
        await ProviderTask(store, source, settings(), work, delivery()).run()
    assert source.attempts == [] and source.started == []
    assert await events_of(store, run_id) == before


class StepsUnknown:
    """A source as tests/test_worker.py records it, whose agent runs' steps are unknown."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def cancel(self, agent_run_id: str) -> None:
        await self.inner.cancel(agent_run_id)

    async def agent_steps(self, agent_run_id: str) -> int | None:
        return None


async def test_the_deadline_message_of_a_cancelled_run_does_nothing(store: Store) -> None:
    run_id, _, deadline = await worker_run(store, ["geico"])
    source = simulated(min_seconds=30)
    work = message(run_id, "geico", 1, deadline)
    task = asyncio.create_task(ProviderTask(store, source, settings(), work, delivery()).run())
    await source.wait_for_starts()
    cancelled = await cancel_run(store, run_id)
    assert cancelled is not None and cancelled.ended is not None
    await stop_agent_runs(StepsUnknown(source), cancelled.ended)  # type: ignore[arg-type]
    await asyncio.wait_for(task, 5)
    before, calls = await events_of(store, run_id), list(source.cancelled)

    await enforce_deadline(store, source, RunDeadlineMessage(run_id=run_id, deadline=utc_now()))

    assert await events_of(store, run_id) == before
    assert source.cancelled == calls
    state = await store.get_run(run_id)
    assert state is not None and state.record.status == "cancelled"


async def test_the_tinyfish_source_reads_a_cancelled_agent_runs_steps_back() -> None:
    scenarios = {"geico": "quote,duration=30"}
    with FakeTinyFishServer(api_key=API_KEY, scenarios=scenarios, delay_scale=0.01) as fake:
        source, listener = source_for(fake), Listener()
        try:
            task = asyncio.create_task(source.quote(REQUEST, "geico", attempt(), listener))
            await asyncio.wait_for(listener.progressed.wait(), 10)
            await asyncio.sleep(0.5)
            [agent_run_id] = listener.agent_runs
            await source.cancel(agent_run_id)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 5)
            steps = await source.agent_steps(agent_run_id)
            unknown = await source.agent_steps("not an agent run id")
        finally:
            task.cancel()
            await source.aclose()
        [run] = fake.run_records()
    assert run["status"] == "CANCELLED"
    assert steps == run["steps"] and steps is not None and steps >= 1
    assert unknown is None


async def test_no_cancel_token_reaches_a_log_line_a_stored_byte_an_event_or_a_snapshot(
    api: httpx.AsyncClient, run_store: Store, store_kind: str, tmp_path: Any, json_logs: Any
) -> None:
    headers = {"Idempotency-Key": f"pii-{uuid.uuid4()}"}
    started = (await api.post("/api/quotes", json=VALID, headers=headers)).json()
    replayed = (await api.post("/api/quotes", json=VALID, headers=headers)).json()
    finished = started["runId"]
    await run_end(api, finished)
    problem(await api.delete(f"/api/quotes/{finished}", headers=bearer(finished)), 409)
    open_one = await open_run(run_store)
    problem(await api.delete(f"/api/quotes/{open_one}", headers=bearer(finished)), 401)
    cancelled = await api.delete(f"/api/quotes/{open_one}", headers=bearer(open_one))
    assert cancelled.status_code == 200
    tokens = [started["cancelToken"], cancel_token(get_settings().secret, open_one)]
    assert replayed["cancelToken"] == tokens[0]

    seen: list[str] = [cancelled.text]
    for run_id in (finished, open_one):
        seen.append((await api.get(f"/api/quotes/{run_id}?since=-1&limit=1000")).text)
        seen.append((await api.get(f"/api/quotes/{run_id}/stream")).text)
    stored = stored_bytes(store_kind, tmp_path)
    assert finished.encode() in stored and open_one.encode() in stored
    assert any(json.loads(line).get("runId") == open_one for line in json_logs.lines)
    for token in tokens:
        assert [line for line in json_logs.lines if token in line] == []
        assert token.encode() not in stored
        assert [text for text in seen if token in text] == []


async def test_a_cancel_bills_its_fenced_write_and_two_reads_on_kv(quiet_kv: Any) -> None:
    kv = KVStore(quiet_kv.url, quiet_kv.token, ttl_seconds=7200)
    meter = CommandMeter(quiet_kv.redis_url)
    try:
        warm = await new_run(kv)  # loads the scripts and opens the endpoint's connection
        await cancel_run(kv, warm)
        run_id = await new_run(kv)
        await kv.record_outcome(run_id, "geico", *quoted("geico"), total=5)
        state = await kv.get_run(run_id, tail=0)
        assert state is not None
        event = cancelled_event(state.record)
        end = RunEnd(status="cancelled", ended_at=event.ts)
        write = await meter.of(kv.cancel_run(run_id, event, end, completed=1))
        again = await new_run(kv)
        whole = await meter.of(cancel_run(kv, again))
    finally:
        meter.close()
        await kv.aclose()
    print(f"cancel_run: {billed(write)} billed {dict(sorted(write.items()))}")
    print(f"a whole cancel (read, write, snapshot): {billed(whole)} billed")
    assert write == Counter(evalsha=1, hmget=1, rpushx=1, rename=1, hkeys=1, hset=1, expire=2), (
        "finish_run's fence (its renewal fields looked up; none to delete here), its end and TTLs,"
        " and one HMGET for the state and outcome count"
    )
    assert billed(whole) <= billed(write) + 2 * 5


async def test_a_kv_cancel_retried_after_its_reply_was_lost_answers_as_the_first(
    quiet_kv: Any,
) -> None:
    kv = KVStore(quiet_kv.url, quiet_kv.token, ttl_seconds=7200)
    try:
        run_id = await new_run(kv)
        state = await kv.get_run(run_id, tail=0)
        assert state is not None
        event = cancelled_event(state.record)
        args = [
            RunEnd(status="cancelled", ended_at=event.ts).model_dump_json(),
            stored_event_json(event, new_nonce()),
            "7200",
            "0",
        ]
        keys = [f"quote:{run_id}", f"quote:{run_id}:events", f"quote:{run_id}:log"]
        first = await kv.rest.run(CANCEL, keys, args)
        retried = await kv.rest.run(CANCEL, keys, args)
        another = await kv.rest.run(
            CANCEL, keys, [args[0], stored_event_json(event, new_nonce()), *args[2:]]
        )
        events = await events_of(kv, run_id)
    finally:
        await kv.aclose()
    assert first == retried == ["cancelled", 1] and another == ["ended"]
    assert [e["type"] for e in events] == ["started", "cancelled"]
