"""The TinyFish adapter against the local TinyFish-compatible server, over real sockets: one agent
run per attempt whatever happens to the stream or the calling coroutine, reattach by id, cancel,
the caps and the 403 fallback as the server sees them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest

from lib.models import Quote, utc_now
from lib.providers.base import (
    AgentAttempt,
    ProviderAgentFailed,
    ProviderAuth,
    ProviderBusy,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
)
from lib.providers.tinyfish import INSURER_START_URLS
from tests.conftest import eventually
from tests.fake_tinyfish import FakeTinyFishServer
from tests.tinyfish_attempts import API_KEY, REQUEST, Listener, attempt, source_for


@pytest.fixture
def fake() -> Iterator[FakeTinyFishServer]:
    scenarios = {
        "geico": "quote",
        "progressive": "drop",
        "state_farm": "quote,duration=1.2",
        "allstate": "agent_failure",
        "liberty_mutual": "quote,duration=1,pending=0.5",
    }
    with FakeTinyFishServer(api_key=API_KEY, scenarios=scenarios, delay_scale=0.01) as server:
        yield server


def runs_for(fake: FakeTinyFishServer, insurer: str) -> list[dict[str, Any]]:
    return [run for run in fake.run_records() if run["insurer"] == insurer]


async def test_a_dropped_stream_is_read_back_by_id_with_exactly_one_agent_run(
    fake: FakeTinyFishServer,
) -> None:
    source, listener = source_for(fake), Listener()
    try:
        quote = await source.quote(REQUEST, "progressive", attempt(), listener)
    finally:
        await source.aclose()
    assert quote.source == "tinyfish"
    [run] = runs_for(fake, "progressive")
    assert listener.agent_runs == [run["run_id"]]
    assert run["status"] == "COMPLETED"
    assert run["get_calls"] >= 1
    assert run["cancel_calls"] == 0


async def test_a_cancelled_call_leaves_the_run_going_and_the_next_call_reattaches(
    fake: FakeTinyFishServer,
) -> None:
    source, first = source_for(fake), Listener()
    this_attempt = attempt()
    task = asyncio.create_task(source.quote(REQUEST, "state_farm", this_attempt, first))
    await first.progressed.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    [run] = runs_for(fake, "state_farm")
    assert run["status"] == "RUNNING"
    assert listener_run(first) == run["run_id"]

    second = Listener()
    try:
        quote = await source.quote(
            REQUEST, "state_farm", this_attempt.with_agent_run(run["run_id"]), second
        )
    finally:
        await source.aclose()
    assert isinstance(quote, Quote)
    [run] = runs_for(fake, "state_farm")
    assert (run["status"], run["cancel_calls"]) == ("COMPLETED", 0)
    assert run["get_calls"] >= 1
    assert second.agent_runs == []
    assert len(fake.requests) == 1


def listener_run(listener: Listener) -> str:
    [agent_run_id] = listener.agent_runs
    return agent_run_id


async def test_a_worker_that_died_is_replaced_by_one_reading_the_same_run(
    fake: FakeTinyFishServer,
) -> None:
    """The first source's process is gone (its client closed mid-stream); another resumes."""
    dying, first = source_for(fake), Listener()
    task = asyncio.create_task(dying.quote(REQUEST, "state_farm", attempt(), first))
    await first.progressed.wait()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await dying.aclose()

    replacement = source_for(fake)
    try:
        quote = await replacement.quote(
            REQUEST, "state_farm", attempt(agent_run_id=listener_run(first)), Listener()
        )
    finally:
        await replacement.aclose()
    assert quote.provider == "state_farm"
    assert len(runs_for(fake, "state_farm")) == 1


async def test_a_queued_run_shows_as_activity(fake: FakeTinyFishServer) -> None:
    source, listener = source_for(fake), Listener()
    start = source.run_body(REQUEST, "liberty_mutual", max_duration_seconds=60)
    async with httpx.AsyncClient() as client:
        answer = await client.post(
            f"{fake.url}/v1/automation/run-async", json=start, headers={"X-API-Key": API_KEY}
        )
    agent_run_id = answer.json()["run_id"]
    try:
        await source.quote(REQUEST, "liberty_mutual", attempt(agent_run_id=agent_run_id), listener)
    finally:
        await source.aclose()
    assert listener.messages[0] == "Waiting for TinyFish to start the web agent (queued)"
    assert listener.messages.count(listener.messages[0]) == 1


async def test_an_agent_failure_says_why_and_is_not_transient(fake: FakeTinyFishServer) -> None:
    source = source_for(fake)
    try:
        with pytest.raises(ProviderAgentFailed) as caught:
            await source.quote(REQUEST, "allstate", attempt(), Listener())
    finally:
        await source.aclose()
    assert "Could not find an online quote form" in caught.value.message
    assert not caught.value.transient
    assert caught.value.agent_run_finished


@pytest.mark.parametrize(
    ("scenario", "kind", "transient"),
    [
        ("system_failure", ProviderUnavailable, True),
        ("billing_failure", ProviderAuth, False),
        ("captcha", ProviderError, False),
    ],
)
async def test_each_category_from_the_server(scenario: str, kind: type, transient: bool) -> None:
    with FakeTinyFishServer(api_key=API_KEY, default_scenario=scenario, delay_scale=0) as fake:
        source = source_for(fake)
        try:
            with pytest.raises(kind) as caught:
                await source.quote(REQUEST, "geico", attempt(), Listener())
        finally:
            await source.aclose()
    assert caught.value.transient is transient
    if scenario == "captcha":
        assert caught.value.code == "provider_blocked"


async def test_the_caps_reach_the_server_and_bound_the_run() -> None:
    with FakeTinyFishServer(api_key=API_KEY, delay_scale=0.001) as fake:
        source = source_for(fake, max_steps=3)
        try:
            with pytest.raises(ProviderAgentFailed, match="max_steps"):
                await source.quote(REQUEST, "geico", attempt(seconds=90.5), Listener())
        finally:
            await source.aclose()
        [run] = fake.run_records()
    assert run["agent_config"] == {"max_duration_seconds": 90, "max_steps": 3}
    assert run["steps"] == 3


async def test_the_run_ends_by_its_own_duration_cap_as_a_timeout() -> None:
    with FakeTinyFishServer(
        api_key=API_KEY, default_scenario="quote,duration=60", delay_scale=0
    ) as fake:
        source = source_for(fake, min_agent_seconds=1)
        try:
            with pytest.raises(ProviderTimeout, match="ran out of time"):
                await source.quote(REQUEST, "geico", attempt(seconds=1.9), Listener())
        finally:
            await source.aclose()
        [run] = fake.run_records()
    assert run["agent_config"] == {"max_duration_seconds": 1}
    assert (run["status"], run["cancel_calls"]) == ("FAILED", 0)


async def test_the_deadline_cancels_the_agent_run_and_the_server_sees_it() -> None:
    # A second in TinyFish's queue (not counted by its duration cap): our deadline comes first.
    with FakeTinyFishServer(
        api_key=API_KEY, default_scenario="quote,duration=60,pending=1", delay_scale=0
    ) as fake:
        source = source_for(fake, min_agent_seconds=1)
        try:
            with pytest.raises(ProviderTimeout) as caught:
                await source.quote(REQUEST, "geico", attempt(seconds=2.5), Listener())
        finally:
            await source.aclose()
        [run] = fake.run_records()
    assert (run["status"], run["cancel_calls"], run["cancelled"]) == ("CANCELLED", 1, True)
    assert run["agent_config"] == {"max_duration_seconds": 2}
    assert caught.value.agent_run_id == run["run_id"]
    assert caught.value.agent_run_finished


async def test_a_run_still_queued_at_the_deadline_is_found_by_reference_and_cancelled() -> None:
    """Its STARTED never came, so its id is unknown: the deadline still leaves no run going."""
    with FakeTinyFishServer(
        api_key=API_KEY, default_scenario="quote,pending=30", delay_scale=0
    ) as fake:
        source = source_for(fake, min_agent_seconds=1, started_patience=30)
        try:
            with pytest.raises(ProviderTimeout) as caught:
                await source.quote(REQUEST, "geico", attempt(seconds=1.5), Listener())
        finally:
            await source.aclose()
        [run] = fake.run_records()
    assert (run["status"], run["cancel_calls"]) == ("CANCELLED", 1)
    assert fake.list_calls == 1
    assert caught.value.agent_run_id is None
    assert caught.value.agent_run_finished


async def test_cancel_is_idempotent_on_the_server(fake: FakeTinyFishServer) -> None:
    source, listener = source_for(fake), Listener()
    task = asyncio.create_task(source.quote(REQUEST, "state_farm", attempt(), listener))
    await listener.progressed.wait()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    agent_run_id = listener_run(listener)
    try:
        await source.cancel(agent_run_id)
        await source.cancel(agent_run_id)
        await source.cancel("no-such-run")
        with pytest.raises(ProviderError) as caught:
            await source.quote(
                REQUEST, "state_farm", attempt(agent_run_id=agent_run_id), Listener()
            )
    finally:
        await source.aclose()
    [run] = runs_for(fake, "state_farm")
    assert (run["status"], run["cancel_calls"]) == ("CANCELLED", 2)
    assert caught.value.code == "provider_unavailable"
    assert not caught.value.transient


async def test_the_403_fallback_drops_what_the_account_lacks() -> None:
    with FakeTinyFishServer(
        api_key=API_KEY, structured_output=False, beta_agent_config=False, delay_scale=0
    ) as fake:
        source = source_for(fake, max_steps=50)
        try:
            first = await source.quote(REQUEST, "geico", attempt(), Listener())
            second = await source.quote(REQUEST, "allstate", attempt(), Listener())
        finally:
            await source.aclose()
        shapes = [
            ("output_schema" in body, "max_steps" in body["agent_config"]) for body in fake.requests
        ]
        runs = fake.run_records()
    # The server names the field it refuses: each is dropped once, then never sent again...
    assert shapes == [(True, True), (False, True), (False, False), (False, False)]
    # ...and the duration cap, which TinyFish does not gate, stays on every request.
    assert all(body["agent_config"]["max_duration_seconds"] >= 119 for body in fake.requests)
    assert len(runs) == 2
    assert (first.provider, second.provider) == ("geico", "allstate")


async def test_the_inspection_endpoint_lists_every_run(fake: FakeTinyFishServer) -> None:
    source = source_for(fake)
    try:
        await source.quote(REQUEST, "geico", attempt(), Listener())
    finally:
        await source.aclose()
    async with httpx.AsyncClient() as client:
        listed = (await client.get(f"{fake.url}/_fake/runs")).json()["runs"]
        unknown = await client.get(f"{fake.url}/v1/runs/nope", headers={"X-API-Key": API_KEY})
        no_key = await client.get(f"{fake.url}/v1/runs/{listed[0]['run_id']}")
    assert [(r["insurer"], r["status"], r["stream_clients"]) for r in listed] == [
        ("geico", "COMPLETED", 1)
    ]
    assert json.loads(unknown.text)["error"]["code"] == "NOT_FOUND"
    assert no_key.status_code == 401


class Died(Exception):
    """The worker's instance dying between TinyFish's STARTED and storing the run id."""


class DyingListener(Listener):
    async def agent_run_started(self, agent_run_id: str) -> None:
        raise Died(agent_run_id)


def begun_a_while_ago(seconds: float = 120) -> AgentAttempt:
    now = utc_now()
    return AgentAttempt(
        number=2, started_at=now - timedelta(seconds=10), deadline=now + timedelta(seconds=seconds)
    )


async def test_a_run_started_by_a_call_that_died_before_storing_its_id_is_found_again(
    fake: FakeTinyFishServer,
) -> None:
    this_attempt = begun_a_while_ago()
    source = source_for(fake)
    try:
        with pytest.raises(Died):
            await source.quote(REQUEST, "state_farm", this_attempt, DyingListener())
        resumed = Listener()
        quote = await source.quote(REQUEST, "state_farm", this_attempt, resumed)
    finally:
        await source.aclose()
    [run] = runs_for(fake, "state_farm")
    assert resumed.agent_runs == [run["run_id"]]
    assert quote.provider == "state_farm"
    assert fake.list_calls == 2  # the first call looked too, and found nothing
    assert len(fake.requests) == 1


async def test_another_attempt_does_not_take_an_earlier_attempts_run(
    fake: FakeTinyFishServer,
) -> None:
    source = source_for(fake)
    first, second = begun_a_while_ago(), begun_a_while_ago()
    second = AgentAttempt(
        number=3, started_at=second.started_at, deadline=second.deadline, agent_run_id=None
    )
    try:
        with pytest.raises(Died):
            await source.quote(REQUEST, "geico", first, DyingListener())
        listener = Listener()
        await source.quote(REQUEST, "geico", second, listener)
    finally:
        await source.aclose()
    runs = runs_for(fake, "geico")
    assert len(runs) == 2
    assert listener.agent_runs == [runs[1]["run_id"]]


async def test_a_fresh_attempt_does_not_look_for_earlier_runs(fake: FakeTinyFishServer) -> None:
    source = source_for(fake)
    try:
        await source.quote(REQUEST, "geico", attempt(), Listener())
    finally:
        await source.aclose()
    assert fake.list_calls == 0


# --- a run request whose fate is unknown, against the server -------------------------------------


async def test_a_connection_dropped_before_started_adopts_the_run_it_created() -> None:
    with FakeTinyFishServer(api_key=API_KEY, drop_before_started=True, delay_scale=0.01) as fake:
        source, listener = source_for(fake), Listener()
        try:
            quote = await source.quote(REQUEST, "geico", attempt(), listener)
        finally:
            await source.aclose()
        [run] = fake.run_records()
    assert fake.dropped_connections == 1
    assert quote.provider == "geico"
    assert listener.agent_runs == [run["run_id"]]
    assert run["status"] == "COMPLETED"
    assert len(fake.requests) == 1
    assert fake.list_calls == 1
    assert len(listener.messages) == 7  # every step of the adopted run relayed


async def test_a_run_queued_past_the_patience_is_followed_by_id_and_shown_waiting() -> None:
    scenarios = {"geico": "quote,duration=1.5", "allstate": "quote,duration=0.2"}
    with FakeTinyFishServer(
        api_key=API_KEY, scenarios=scenarios, concurrency=1, delay_scale=0.01
    ) as fake:
        source = source_for(fake, started_patience=0.3)
        first, second = Listener(), Listener()
        try:
            running = asyncio.create_task(source.quote(REQUEST, "geico", attempt(), first))
            await first.progressed.wait()
            queued = await source.quote(REQUEST, "allstate", attempt(), second)
            await running
        finally:
            await source.aclose()
        runs = {run["insurer"]: run for run in fake.run_records()}
    assert queued.provider == "allstate"
    assert second.messages[0] == "Waiting for TinyFish to start the web agent (queued)"
    assert second.agent_runs == [runs["allstate"]["run_id"]]
    assert {run["status"] for run in runs.values()} == {"COMPLETED"}
    assert len(fake.requests) == 2
    assert runs["allstate"]["get_calls"] >= 2


async def test_a_busy_account_is_provider_busy_and_creates_nothing() -> None:
    with FakeTinyFishServer(api_key=API_KEY, busy_first=1, busy_retry_after=3) as fake:
        source = source_for(fake)
        try:
            with pytest.raises(ProviderBusy) as caught:
                await source.quote(REQUEST, "geico", attempt(), Listener())
        finally:
            await source.aclose()
        assert fake.run_records() == []
    assert caught.value.retry_after == 3
    assert fake.list_calls == 0


async def test_the_server_lists_runs_the_way_tinyfish_documents() -> None:
    with FakeTinyFishServer(api_key=API_KEY, delay_scale=0) as fake:
        source = source_for(fake)
        try:
            await source.quote(REQUEST, "geico", attempt(), Listener())
        finally:
            await source.aclose()
        [run] = fake.run_records()
        reference = run["body"]["goal"].split()[1]
        headers = {"X-API-Key": API_KEY}
        async with httpx.AsyncClient(base_url=fake.url, headers=headers) as client:
            by_goal = (await client.get("/v1/runs", params={"goal": reference.upper()})).json()
            done = await client.get("/v1/runs", params={"status": "COMPLETED", "limit": 100})
            running = await client.get("/v1/runs", params={"status": "RUNNING", "limit": 1})
            later = await client.get("/v1/runs", params={"created_after": "2999-01-01T00:00:00Z"})
            too_many = await client.get("/v1/runs", params={"limit": 101})
            none = await client.get("/v1/runs", params={"limit": 0})
            cancel = await client.post(f"/v1/runs/{run['run_id']}/cancel")
    assert reference.startswith("qr-")
    assert [r["run_id"] for r in by_goal["data"]] == [run["run_id"]]
    assert by_goal["pagination"] == {"total": 1, "has_more": False, "next_cursor": None}
    assert len(done.json()["data"]) == 1
    assert running.json()["data"] == [] and later.json()["data"] == []
    assert (too_many.status_code, none.status_code) == (400, 400)
    assert cancel.status_code == 200
    assert (cancel.json()["status"], cancel.json()["message"]) == (
        "COMPLETED",
        "Run already finished",
    )


async def test_the_server_gates_max_steps_and_mode_but_not_the_duration_cap() -> None:
    with FakeTinyFishServer(api_key=API_KEY, beta_agent_config=False, delay_scale=0) as fake:
        source = source_for(fake)
        body = source.run_body(REQUEST, "geico", max_duration_seconds=60)
        await source.aclose()
        async with httpx.AsyncClient(base_url=fake.url, headers={"X-API-Key": API_KEY}) as client:
            answers = [
                await client.post("/v1/automation/run-async", json=body | {"agent_config": caps})
                for caps in (
                    {"max_duration_seconds": 60, "max_steps": 20},
                    {"max_duration_seconds": 60, "mode": "strict"},
                    {"max_duration_seconds": 60},
                )
            ]
    assert [a.status_code for a in answers] == [403, 403, 200]
    assert "max_steps" in answers[0].json()["error"]["message"]
    assert "mode" in answers[1].json()["error"]["message"]


# --- end to end on the `make dev` host: a busy account that drops first connections ------------


@pytest.mark.e2e
@pytest.mark.parametrize("backend", ["sqlite", "kv"])
async def test_runs_on_a_busy_account_that_drops_connections_buy_each_insurer_once(
    tmp_path, backend: str, request: pytest.FixtureRequest
) -> None:
    """Three runs of five insurers at once against an account capped at four agents (the rest
    wait PENDING, STARTED sent only when they start), every quote's first connection cut after
    its run was created: each insurer of each run is bought exactly once, no agent run is left
    going, and every run request carries its duration cap. On each store."""
    from tests.hosts import ROOT, assert_gap_free, read_run_reconnecting, start_run
    from tools.devhost import start_devhost_process

    zips = ("94107", "10001", "60601")
    with FakeTinyFishServer(
        default_scenario="quote,duration=2", concurrency=4, drop_before_started=True
    ) as tinyfish:
        env = {
            "QUOTES_DB_PATH": str(tmp_path / "quotes.sqlite3"),
            "KV_REST_API_URL": "",
            "KV_REST_API_TOKEN": "",
            "TINYFISH_API_KEY": tinyfish.api_key,
            "TINYFISH_API_URL": tinyfish.url,
            "TINYFISH_MAX_STEPS": "40",
            "RUN_LEASE_SECONDS": "3",
            "QUOTE_RATE_LIMIT_PER_MINUTE": "0",
            "QUOTE_RUNS_PER_DAY": "0",
        }
        if backend == "kv":
            kv = request.getfixturevalue("upstash_server")
            env.update(KV_REST_API_URL=kv.url, KV_REST_API_TOKEN=kv.token)
        with start_devhost_process(ROOT, instances=2, env=env) as host:
            async with httpx.AsyncClient(base_url=host.url, timeout=30) as client:
                run_ids = [(await start_run(client, zip=zip_code))[0] for zip_code in zips]
                runs = await asyncio.gather(
                    *(read_run_reconnecting(client, run_id) for run_id in run_ids)
                )
        ledger = tinyfish.run_records()
        requests = list(tinyfish.requests)
    for events in runs:
        assert_gap_free(events)
        assert events[-1]["type"] == "complete"
        assert len(events[-1]["quotes"]) == 5, events[-1]
    bought: dict[tuple[str, str], int] = {}
    for agent_run in ledger:
        [zip_code] = [z for z in zips if f'"garaging_zip_code": "{z}"' in agent_run["body"]["goal"]]
        key = (agent_run["insurer"], zip_code)
        bought[key] = bought.get(key, 0) + 1
    # Every insurer of every run bought exactly once, though each first connection was cut...
    assert bought == {(insurer, z): 1 for insurer in INSURER_START_URLS for z in zips}
    assert tinyfish.dropped_connections == 15
    # ...no agent run is left going (and billing)...
    assert {r["status"] for r in ledger} <= {"COMPLETED", "FAILED", "CANCELLED"}
    # ...and every run request carried its caps.
    assert all(r["agent_config"]["max_duration_seconds"] >= 1 for r in requests)
    assert all(r["agent_config"]["max_steps"] == 40 for r in requests)
    waited = [
        e
        for events in runs
        for e in events
        if e["type"] == "activity" and e["message"].startswith("Waiting for TinyFish")
    ]
    assert waited, "runs past the account's cap should show as waiting"


async def test_a_call_handed_off_while_its_run_waits_queued_is_resumed_by_reference() -> None:
    """The worker gives up the call before STARTED (its invocation ends); the next delivery has
    no id, only the same attempt: it adopts the queued run instead of buying another."""
    scenarios = {"geico": "quote,duration=1.5", "allstate": "quote,duration=0.2"}
    with FakeTinyFishServer(
        api_key=API_KEY, scenarios=scenarios, concurrency=1, delay_scale=0.01
    ) as fake:
        source = source_for(fake, started_patience=60)
        blocker, first, resumed = Listener(), Listener(), Listener()
        this_attempt = begun_a_while_ago()
        try:
            running = asyncio.create_task(source.quote(REQUEST, "geico", attempt(), blocker))
            await blocker.progressed.wait()
            handed_off = asyncio.create_task(source.quote(REQUEST, "allstate", this_attempt, first))
            await first_run_created(fake, "allstate")
            handed_off.cancel()
            await asyncio.gather(handed_off, return_exceptions=True)
            assert first.agent_runs == []  # STARTED never came: no id was stored
            quote = await source.quote(REQUEST, "allstate", this_attempt, resumed)
            await running
        finally:
            await source.aclose()
    [run] = runs_for(fake, "allstate")
    assert quote.provider == "allstate"
    assert resumed.agent_runs == [run["run_id"]]
    assert run["status"] == "COMPLETED"
    assert sum(1 for body in fake.requests if "allstate" in body["url"]) == 1


async def first_run_created(fake: FakeTinyFishServer, insurer: str) -> None:
    """Waits until the server holds a run for `insurer` (it keeps no event to wait on)."""
    await eventually(lambda: runs_for(fake, insurer), f"a run for {insurer}", within=10)
