"""The queue worker's unit of work, in-process on both stores: one delivery of one provider
(claim, resume, relay, outcome), hand-offs before an invocation's deadline, replays, deaths,
retries across paid attempts, and the run's own deadline. The queue itself is exercised end to
end (tests/test_e2e.py); here deliveries are made by hand, as the SDK would make them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from lib.models import (
    ProviderId,
    ProviderWork,
    Quote,
    QuoteRequest,
    utc_now,
)
from lib.providers.base import (
    AgentAttempt,
    AttemptListener,
    ProviderAgentFailed,
    ProviderBusy,
    ProviderError,
    ProviderUnavailable,
)
from lib.providers.simulated import (
    simulated_agent_run_id,
    simulated_timeline,
)
from lib.queue import MAX_DELIVERIES
from lib.queue.messages import ProviderWorkMessage, RunDeadlineMessage
from lib.store import Store
from lib.worker import HandBack, ProviderTask, enforce_deadline
from lib.workflow import agent_slot_holder, run_deadline
from tests.clock import ClockedStore, VirtualClock
from tests.conftest import make_quote
from tests.worker_inputs import (
    REQUEST,
    RecordingSource,
    delivery,
    message,
    new_run,
    settings,
    simulated,
)

MINUTE = timedelta(seconds=60)


@pytest.fixture
def clock() -> VirtualClock:
    """The worker's and the simulated agents' time, moved on by the test, not the wall."""
    return VirtualClock()


@pytest.fixture
def timed_store(store: Store, clock: VirtualClock) -> Store:
    """The store, its calls taking no time on `clock`."""
    return ClockedStore(store, clock)  # type: ignore[return-value]


class ScriptedSource(RecordingSource):
    """A source whose attempts fail as scripted (the real adapters' wire formats are tested in
    tests/test_provider_*.py): each attempt starts an agent run, then raises or quotes."""

    def __init__(self, outcomes: list[Callable[[], ProviderError] | None]) -> None:
        super().__init__(None)
        self.outcomes = outcomes

    async def quote(
        self,
        request: QuoteRequest,
        provider: ProviderId,
        attempt: AgentAttempt,
        listener: AttemptListener,
    ) -> Quote:
        self.attempts.append((provider, attempt))
        agent_run_id = f"agent-{provider}-{attempt.number}"
        if attempt.agent_run_id is None:
            await listener.agent_run_started(agent_run_id)
            self.record_start(agent_run_id)
        outcome = self.outcomes[attempt.number - 1]
        if outcome is not None:
            error = outcome()
            error.agent_run_id = agent_run_id
            raise error
        return make_quote(provider, 99.0)


async def events_of(store: Store, run_id: str) -> list[dict[str, Any]]:
    return [e.as_dict() for e in await store.read_events(run_id, -1)]


async def test_five_workers_at_once_complete_the_run_exactly_once(store: Store) -> None:
    run_id, providers, deadline = await new_run(store)
    source = simulated()
    tasks = [
        ProviderTask(store, source, settings(), message(run_id, p, 5, deadline), delivery())
        for p in providers
    ]
    await asyncio.gather(*(t.run() for t in tasks))
    events = await events_of(store, run_id)
    state = await store.get_run(run_id)
    assert state is not None and state.record.status == "completed"
    assert [e["id"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events].count("complete") == 1
    assert events[-1]["type"] == "complete"
    assert [e["completed"] for e in events if e["type"] == "progress"] == [1, 2, 3, 4, 5]
    premiums = [q["monthlyPremium"] for q in events[-1]["quotes"]]
    assert premiums == sorted(premiums)
    assert len(source.started) == 5  # one agent run per provider


async def test_a_replayed_delivery_of_a_finished_provider_does_no_work(store: Store) -> None:
    run_id, _, deadline = await new_run(store, ["geico", "progressive"])
    source = simulated()
    work = message(run_id, "geico", 2, deadline)
    await ProviderTask(store, source, settings(), work, delivery()).run()
    before = await events_of(store, run_id)
    await ProviderTask(store, source, settings(), work, delivery(2)).run()
    assert await events_of(store, run_id) == before
    assert len(source.attempts) == 1


async def test_a_delivery_that_finds_a_live_lease_hands_back_and_does_nothing(
    timed_store: Store, clock: VirtualClock
) -> None:
    store = timed_store
    run_id, _, deadline = await new_run(store, ["geico"])
    source = simulated(clock, min_seconds=3)
    work = message(run_id, "geico", 1, deadline)
    first = asyncio.create_task(
        ProviderTask(store, source, settings(), work, delivery(), clock=clock).run()
    )
    await source.wait_for_starts()
    with clock.held(), pytest.raises(HandBack) as handed:
        await ProviderTask(store, source, settings(), work, delivery(), clock=clock).run()
    assert 0 < handed.value.delay <= 60
    assert len(source.attempts) == 1
    await first


async def test_work_longer_than_an_invocation_is_handed_back_and_resumed(
    timed_store: Store, clock: VirtualClock
) -> None:
    store = timed_store
    run_id, _, deadline = await new_run(store, ["geico"])
    source = simulated(clock, min_seconds=3)
    work = message(run_id, "geico", 1, deadline)
    deliveries = 0
    delays: list[float] = []
    while True:
        deliveries += 1
        # Each invocation may run 16.5 s: its hand-off comes 15 s before that, after 1.5 s.
        each = delivery(deliveries, deadline_in=16.5, clock=clock)
        task = ProviderTask(store, source, settings(), work, each, clock=clock)
        try:
            await task.run()
            break
        except HandBack as directive:
            delays.append(directive.delay)
            await clock.sleep(directive.delay)  # the queue's redelivery delay
    state = await store.get_run(run_id)
    assert state is not None and state.record.status == "completed"
    assert deliveries >= 2
    assert all(delay <= 5 for delay in delays)
    assert len(source.started) == 1  # every later delivery reattached to the same agent run
    assert {a.agent_run_id for _, a in source.attempts[1:]} == {source.started[0]}
    steps = len(simulated_timeline(work.request, "geico", delay_scale=0.01).steps)
    assert state.record.agent_steps == {"geico": steps}  # the outcome's, across the hand-offs


async def test_a_dead_workers_provider_is_resumed_after_its_lease(
    timed_store: Store, clock: VirtualClock
) -> None:
    store = timed_store
    run_id, _, deadline = await new_run(store, ["geico"])
    source = simulated(clock, min_seconds=4)
    work = message(run_id, "geico", 1, deadline)
    doomed = asyncio.create_task(
        ProviderTask(store, source, settings(), work, delivery(), clock=clock).run()
    )
    await source.wait_for_starts()
    doomed.cancel()  # the instance died: no release, no outcome
    with pytest.raises(asyncio.CancelledError):
        await doomed
    resumed = False
    for count in range(2, MAX_DELIVERIES + 1):
        try:
            await ProviderTask(store, source, settings(), work, delivery(count), clock=clock).run()
            resumed = True
            break
        except HandBack as directive:
            await clock.sleep(min(directive.delay, 0.5))
    state = await store.get_run(run_id)
    assert resumed
    assert state is not None and state.record.status == "completed"
    assert len(source.started) == 1
    assert source.attempts[-1][1].agent_run_id == source.started[0]


async def test_a_blip_is_retried_as_a_new_paid_attempt_after_cancelling_the_old(
    timed_store: Store, clock: VirtualClock
) -> None:
    store = timed_store
    run_id, _, deadline = await new_run(store, ["geico"])
    source = ScriptedSource([lambda: ProviderUnavailable("blip"), None])
    await ProviderTask(
        store, source, settings(), message(run_id, "geico", 1, deadline), delivery(), clock=clock
    ).run()
    state = await store.get_run(run_id)
    assert state is not None and state.record.provider("geico").status == "quoted"
    assert source.started == ["agent-geico-1", "agent-geico-2"]
    assert source.cancelled == ["agent-geico-1"]
    assert state.record.work["geico"].attempt == 2


async def test_an_agent_failure_is_not_retried_and_says_why(store: Store) -> None:
    run_id, _, deadline = await new_run(store, ["geico"])
    source = ScriptedSource([lambda: ProviderAgentFailed("The form needs a phone number")])
    await ProviderTask(
        store, source, settings(), message(run_id, "geico", 1, deadline), delivery()
    ).run()
    events = await events_of(store, run_id)
    failure = next(e for e in events if e["type"] == "provider_error")
    assert failure["code"] == "provider_unavailable"
    assert "phone number" in failure["message"]
    assert failure["retryable"] is False
    assert len(source.started) == 1
    assert events[-1]["type"] == "complete" and events[-1]["failed"] == ["geico"]


async def test_attempts_stop_at_three(timed_store: Store, clock: VirtualClock) -> None:
    store = timed_store
    run_id, _, deadline = await new_run(store, ["geico"])
    source = ScriptedSource([lambda: ProviderUnavailable("blip")] * 3)
    await ProviderTask(
        store, source, settings(), message(run_id, "geico", 1, deadline), delivery(), clock=clock
    ).run()
    assert len(source.started) == 3
    assert set(source.cancelled) == set(source.started)


async def test_the_last_delivery_fails_the_provider_instead_of_handing_back(
    timed_store: Store, clock: VirtualClock
) -> None:
    store = timed_store
    run_id, _, deadline = await new_run(store, ["geico"])
    source = simulated(clock, min_seconds=20)
    task = ProviderTask(
        store,
        source,
        settings(),
        message(run_id, "geico", 1, deadline),
        delivery(MAX_DELIVERIES, deadline_in=16, clock=clock),
        clock=clock,
    )
    await task.run()
    events = await events_of(store, run_id)
    failure = next(e for e in events if e["type"] == "provider_error")
    assert failure["code"] == "provider_unavailable"
    assert "deliveries" in failure["message"]
    assert source.cancelled == source.started


async def test_a_run_that_ended_elsewhere_stops_its_workers_and_cancels_their_agents(
    store: Store,
) -> None:
    run_id, _, deadline = await new_run(store, ["geico"])
    source = simulated(min_seconds=5)
    work = message(run_id, "geico", 1, deadline)
    task = asyncio.create_task(ProviderTask(store, source, settings(), work, delivery()).run())
    await source.wait_for_starts()
    await enforce_deadline(store, source, RunDeadlineMessage(run_id=run_id, deadline=utc_now()))
    await asyncio.wait_for(task, 10)
    events = await events_of(store, run_id)
    assert events[-1]["type"] == "error" and events[-1]["code"] == "deadline_exceeded"
    assert source.started[0] in source.cancelled


async def test_a_run_ended_by_its_deadline_gives_back_its_agent_slots(store: Store) -> None:
    run_id, providers, _ = await new_run(store, ["geico", "progressive"])
    now = utc_now()
    until = now + timedelta(minutes=5)
    # Its two workers held the deployment's two agent slots, then their instances died.
    for provider in providers:
        holder = agent_slot_holder(run_id, provider)
        assert await store.take_agent_slot(holder, limit=2, now=now, until=until)
    assert not await store.take_agent_slot("next-run:geico", limit=2, now=now, until=until)
    source = simulated()

    await enforce_deadline(
        store, source, RunDeadlineMessage(run_id=run_id, deadline=now), agent_limit=2
    )

    assert await store.take_agent_slot("next-run:geico", limit=1, now=now, until=until)
    await store.release_agent_slot("next-run:geico")
    events = await events_of(store, run_id)
    assert events[-1]["type"] == "error" and events[-1]["code"] == "deadline_exceeded"


async def test_the_deadline_cancels_every_agent_run_still_going_and_ends_the_run(
    store: Store,
) -> None:
    run_id, providers, deadline = await new_run(store, ["geico", "progressive", "allstate"])
    source = simulated(min_seconds=30)
    # Three workers start their agents, then their instances die.
    tasks = [
        asyncio.create_task(
            ProviderTask(
                store, source, settings(), message(run_id, p, 3, deadline), delivery()
            ).run()
        )
        for p in providers
    ]
    await source.wait_for_starts(3)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await enforce_deadline(store, source, RunDeadlineMessage(run_id=run_id, deadline=utc_now()))
    state = await store.get_run(run_id)
    assert state is not None and state.record.status == "failed"
    assert state.record.error is not None and state.record.error.code == "deadline_exceeded"
    assert sorted(source.cancelled) == sorted(source.started)
    assert {p.status for p in state.record.providers} == {"failed"}


async def test_an_early_deadline_message_is_handed_back_until_the_deadline(store: Store) -> None:
    run_id, _, deadline = await new_run(store, ["geico"], deadline_in=30)
    with pytest.raises(HandBack) as handed:
        await enforce_deadline(
            store, simulated(), RunDeadlineMessage(run_id=run_id, deadline=deadline)
        )
    assert 25 < handed.value.delay <= 31


async def test_run_deadline_is_the_runs_own(store: Store) -> None:
    moment = run_deadline(settings(RUN_MAX_SECONDS="900", QUOTE_RUN_TTL_SECONDS="7200"))
    assert timedelta(seconds=899) < moment - utc_now() <= timedelta(seconds=900)


async def test_a_bug_in_a_source_is_a_retried_blip_whose_text_never_reaches_the_run(
    timed_store: Store, clock: VirtualClock
) -> None:
    store = timed_store
    run_id, _, deadline = await new_run(store, ["geico"])

    def crash() -> ProviderError:
        raise KeyError("Ana Lee 1990-04-12")

    source = ScriptedSource([crash, None])
    task = ProviderTask(
        store, source, settings(), message(run_id, "geico", 1, deadline), delivery(), clock=clock
    )
    await task.run()
    events = await events_of(store, run_id)
    assert events[-1]["type"] == "complete" and events[-1]["best"] == "geico"
    assert "Ana" not in str(events)
    assert len(source.started) == 2  # the crashed attempt's agent run was given up, then a retry
    assert source.cancelled == ["agent-geico-1"]


async def test_an_agent_run_the_agent_api_reported_over_is_not_cancelled(store: Store) -> None:
    run_id, _, deadline = await new_run(store, ["geico"])

    def finished_failure() -> ProviderError:
        error = ProviderAgentFailed("The agent could not find the quote form")
        error.agent_run_finished = True
        return error

    source = ScriptedSource([finished_failure])
    task = ProviderTask(
        store, source, settings(), message(run_id, "geico", 1, deadline), delivery()
    )
    await task.run()
    assert source.started == ["agent-geico-1"]
    assert source.cancelled == []


# --- the deployment's agent budget, the same attempt again, a paid result read back ------------


class BusyOnceSource(RecordingSource):
    """The agent API answers 429 (ProviderBusy, with Retry-After) to the first call, then
    quotes: no agent run is started by the refused call."""

    def __init__(self, retry_after: float | None) -> None:
        super().__init__(None)
        self.retry_after = retry_after

    async def quote(
        self,
        request: QuoteRequest,
        provider: ProviderId,
        attempt: AgentAttempt,
        listener: AttemptListener,
    ) -> Quote:
        self.attempts.append((provider, attempt))
        if len(self.attempts) == 1:
            raise ProviderBusy("TinyFish is at capacity", retry_after=self.retry_after)
        await listener.agent_run_started(f"agent-{provider}-{attempt.number}")
        self.record_start(f"agent-{provider}-{attempt.number}")
        return make_quote(provider, 99.0)


async def deliver_until_done(
    store: Store, source: Any, work: ProviderWorkMessage, clock: VirtualClock, **env: str
) -> list[int]:
    """Deliveries of one message as the queue makes them; the hand-back delays they asked."""
    delays: list[int] = []
    for count in range(1, MAX_DELIVERIES + 1):
        try:
            task = ProviderTask(store, source, settings(**env), work, delivery(count), clock=clock)
            await task.run()
            return delays
        except HandBack as directive:
            delays.append(directive.delay)
            await clock.sleep(directive.delay)
    raise AssertionError("the deliveries ran out")


async def test_with_every_agent_slot_taken_a_provider_waits_without_spending_an_attempt(
    timed_store: Store, clock: VirtualClock
) -> None:
    store = timed_store
    run_id, _, deadline = await new_run(store, ["geico"])
    now = clock.now()
    assert await store.take_agent_slot("other-run:geico", limit=1, now=now, until=now + MINUTE)
    source = ScriptedSource([None])
    work = message(run_id, "geico", 1, deadline)
    with pytest.raises(HandBack) as handed:
        await ProviderTask(
            store, source, settings(TINYFISH_MAX_CONCURRENCY="1"), work, delivery(), clock=clock
        ).run()
    assert handed.value.delay == 10
    assert source.attempts == []  # no agent run was asked for
    await store.release_agent_slot("other-run:geico")  # the other run's agent finished

    delays = await deliver_until_done(store, source, work, clock, TINYFISH_MAX_CONCURRENCY="1")
    state = await store.get_run(run_id)
    assert delays == [] and state is not None
    assert state.record.provider("geico").status == "quoted"
    assert state.record.work["geico"].attempt == 1
    texts = [e.get("message") for e in await events_of(store, run_id)]
    assert texts.count("Waiting for a free agent") == 1
    # Its agent run over, the provider's slot is free for the next.
    now = clock.now()
    assert await store.take_agent_slot("next:geico", limit=1, now=now, until=now + MINUTE)
    await store.release_agent_slot("next:geico")


async def test_a_429_hands_the_work_back_for_its_retry_after_in_whole_seconds(
    timed_store: Store, clock: VirtualClock
) -> None:
    store = timed_store
    run_id, _, deadline = await new_run(store, ["geico"])
    source = BusyOnceSource(retry_after=2.2)
    delays = await deliver_until_done(store, source, message(run_id, "geico", 1, deadline), clock)
    state = await store.get_run(run_id)
    assert delays == [3]  # 2.2 s rounded up, never down to an immediate redelivery
    assert state is not None and state.record.provider("geico").status == "quoted"
    assert [a.number for _, a in source.attempts] == [1, 1]  # waiting is not an attempt
    texts = [e.get("message") for e in await events_of(store, run_id)]
    assert "Waiting for a free agent" in texts
    assert not any("Retrying" in str(t) for t in texts)


async def test_an_attempt_whose_agent_run_may_exist_unseen_is_tried_again_as_the_same_attempt(
    timed_store: Store, clock: VirtualClock
) -> None:
    store = timed_store
    run_id, _, deadline = await new_run(store, ["geico"])

    def dropped_before_started() -> ProviderError:
        error = ProviderUnavailable("The connection dropped before the run was reported")
        error.same_attempt = True
        return error

    class UnseenThenQuoted(ScriptedSource):
        async def quote(
            self,
            request: QuoteRequest,
            provider: ProviderId,
            attempt: AgentAttempt,
            listener: AttemptListener,
        ) -> Quote:
            self.attempts.append((provider, attempt))
            if len(self.attempts) <= 3:  # more often than MAX_ATTEMPTS: none of them counts
                raise dropped_before_started()
            await listener.agent_run_started("agent-geico-1")
            return make_quote(provider, 99.0)

    source = UnseenThenQuoted([])
    await ProviderTask(
        store, source, settings(), message(run_id, "geico", 1, deadline), delivery(), clock=clock
    ).run()
    state = await store.get_run(run_id)
    assert state is not None and state.record.provider("geico").status == "quoted"
    attempts = [a for _, a in source.attempts]
    assert {(a.number, a.started_at, a.agent_run_id) for a in attempts} == {
        (1, attempts[0].started_at, None)
    }
    assert source.cancelled == []
    assert state.record.work["geico"].attempt == 1


async def resumed_after_the_providers_deadline(
    store: Store, clock: VirtualClock, source: RecordingSource
) -> str:
    """A provider whose agent run was started 70 s ago (its budget is 60 s) by a delivery that
    died; a new delivery comes now."""
    run_id, _, deadline = await new_run(store, ["geico"])
    began = clock.now() - timedelta(seconds=70)
    agent_run_id = simulated_agent_run_id(REQUEST, "geico", began)
    work = ProviderWork(
        attempt=1,
        attempt_started_at=began,
        first_started_at=began,
        agent_run_id=agent_run_id,
        agent_run_ids=[agent_run_id],
    )
    now = clock.now()
    await store.claim_provider(
        run_id, "geico", "dead", now=now, lease_until=now, alive_since=now, first_work=work
    )
    work_message = message(run_id, "geico", 1, deadline)
    await ProviderTask(store, source, settings(), work_message, delivery(2), clock=clock).run()
    return run_id


async def test_an_agent_run_that_finished_after_its_providers_deadline_is_read_back_and_used(
    timed_store: Store, clock: VirtualClock
) -> None:
    store = timed_store
    source = simulated(clock)  # its agent run finished long ago: the result is there, paid for
    run_id = await resumed_after_the_providers_deadline(store, clock, source)
    state = await store.get_run(run_id)
    assert state is not None and state.record.provider("geico").status == "quoted"
    assert len(source.read_backs) == 1
    assert source.cancelled == []
    assert source.attempts == []  # read once, not resumed nor bought again


async def test_an_agent_run_still_going_at_its_providers_deadline_is_cancelled(
    timed_store: Store, clock: VirtualClock
) -> None:
    store = timed_store
    source = simulated(clock, min_seconds=600)
    run_id = await resumed_after_the_providers_deadline(store, clock, source)
    state = await store.get_run(run_id)
    assert state is not None and state.record.provider("geico").status == "failed"
    assert state.record.provider("geico").error.code == "provider_timeout"  # type: ignore[union-attr]
    assert len(source.read_backs) == 1
    assert source.cancelled == [state.record.work["geico"].agent_run_ids[0]]
