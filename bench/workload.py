"""How the system writes one run, as `make bench` replays it: THE place to change when the write
path changes (which writer appends what, with which record, when).

A run of five insurers, as the queue workers write it (lib/worker/): `started` with the run
(`create_run`), then five provider workers at once, each claiming its provider (the claim stores
its first attempt with a "Starting" activity in the same write: `claim_provider`), storing its
agent run's id with an "agent started" activity (`save_provider_work`), appending its agent's
activity (`append_events`), then its outcome, `quote` or `provider_error`, with the run's
`progress` in the same write (`record_outcome`); the worker that records the last outcome reads
the run and writes `complete` (`get_run`, `finish_run`). 100 events in all, spread over the
run's duration with the same pseudo-random times for both designs; the seed's design replays
the same events in time order (its read-modify-write cannot take concurrent writers without
losing events).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

from lib.models import (
    PROVIDER_IDS,
    PROVIDER_NAMES,
    ActivityEvent,
    CompleteEvent,
    ErrorInfo,
    ProgressEvent,
    ProviderErrorEvent,
    ProviderId,
    ProviderOutcome,
    ProviderWork,
    Quote,
    QuoteEvent,
    QuoteRequest,
    RunEnd,
    RunEvent,
    RunRecord,
    StartedEvent,
    cheapest_first,
    percent,
    utc_now,
)
from lib.store import Store
from lib.workflow import new_run_record

EVENTS_PER_RUN = 100
# When each insurer's outcome lands, as a fraction of the run's duration; allstate declines.
FINISH_AT: dict[ProviderId, float] = {
    "geico": 0.55,
    "progressive": 0.7,
    "state_farm": 0.8,
    "allstate": 0.9,
    "liberty_mutual": 1.0,
}
DECLINES: frozenset[ProviderId] = frozenset({"allstate"})
# Longer than any scenario: the benchmark's runs must not hit their deadline.
RUN_DEADLINE_SECONDS = 1800

_STEPS = (
    "Opening {name} quote page",
    "Entering ZIP code and starting an auto quote",
    "Entering vehicle details for VIN …7639",
    "Answering driver history questions",
    "Selecting standard coverage",
    "Waiting for the premium to be calculated",
    "Reading the quoted premium",
)

SAMPLE_REQUEST = QuoteRequest.model_validate(
    {
        "vin": "2C3CDZAG2GH967639",
        "zip": "94107",
        "driver": {"firstName": "Ana", "lastName": "Lee", "dateOfBirth": "1990-04-12"},
    }
)


def new_record(run_id: str) -> RunRecord:
    """A processing run of all five insurers, as POST /api/quotes creates it."""
    deadline = utc_now() + timedelta(seconds=RUN_DEADLINE_SECONDS)
    return new_run_record(run_id, SAMPLE_REQUEST, list(PROVIDER_IDS), deadline)


@dataclass(frozen=True)
class Write:
    """One event of the run, due `at` seconds in. `outcome`: a provider's outcome, recorded with
    the run's progress; `with_another`: this design writes the event as part of another write
    (`started` with the run, `progress` with the outcome); the seed appends every event."""

    at: float
    event: RunEvent
    provider: ProviderId | None = None
    outcome: ProviderOutcome | None = None
    with_another: bool = False
    # The worker's own writes of a provider's work state, each with its activity event: its claim
    # of the provider and first attempt ("claim"), and the agent run's id ("agent").
    work: Literal["claim", "agent"] | None = None


async def write(store: Store, run_id: str, w: Write) -> list[int]:
    """This design's write of `w`, as the worker makes it; the ids of the events it stored."""
    if w.with_another:
        return []
    if w.work is not None:
        assert w.provider is not None
        owner, now = f"bench-{w.provider}", utc_now()
        if w.work == "claim":
            lease = timedelta(seconds=LEASE_SECONDS)
            await store.claim_provider(
                run_id,
                w.provider,
                owner,
                now=now,
                lease_until=now + lease,
                alive_since=now - lease,
                first_work=ProviderWork(attempt=1, attempt_started_at=now, first_started_at=now),
                first_events=[w.event],
            )
        else:
            work = ProviderWork(attempt=1, agent_run_id="agent-1", agent_run_ids=["agent-1"])
            await store.save_provider_work(run_id, w.provider, owner, work, [w.event])
        return []  # its id is not returned: these events are delivered, not timed
    if w.outcome is not None:
        assert w.provider is not None and isinstance(w.event, QuoteEvent | ProviderErrorEvent)
        written = await store.record_outcome(
            run_id, w.provider, w.outcome, w.event, total=len(PROVIDER_IDS)
        )
        assert written.first_id is not None, "an outcome was recorded twice"
        return [written.first_id, written.first_id + 1]
    if isinstance(w.event, CompleteEvent):
        await store.get_run(run_id, tail=0)  # complete_if_done reads the outcomes first
        end = RunEnd(status="completed", ended_at=utc_now())
        return [await store.finish_run(run_id, w.event, end)]
    return [await store.append_events(run_id, [w.event])]


# The worker's lease (lib/worker/lease.py): 45 s, renewed after 2/3 of it without a write.
LEASE_SECONDS = 45.0
RENEW_AFTER_SECONDS = LEASE_SECONDS * 2 / 3


async def renew_while_quiet(
    store: Store, run_id: str, w: Write, last_write: float, began: float
) -> int:
    """The renewals a provider's worker makes while it waits for its next write `w` (it last
    wrote at `last_write`, monotonic): one each RENEW_AFTER_SECONDS of quiet. Returns how many."""
    assert w.provider is not None
    renewals = 0
    while began + w.at - last_write >= RENEW_AFTER_SECONDS:
        last_write += RENEW_AFTER_SECONDS
        await asyncio.sleep(max(0.0, last_write - time.monotonic()))
        until = utc_now() + timedelta(seconds=LEASE_SECONDS)
        await store.renew_lease(run_id, w.provider, f"bench-{w.provider}", until)
        renewals += 1
    return renewals


@dataclass(frozen=True)
class RunPlan:
    """What each writer appends, in order: `opening` first (POST), then every list of
    `workers` at once (one per provider; the last to finish also writes `complete`)."""

    opening: list[Write]
    workers: list[list[Write]]

    @property
    def in_time_order(self) -> list[Write]:
        return sorted([*self.opening, *(w for ws in self.workers for w in ws)], key=lambda w: w.at)

    @property
    def events(self) -> int:
        return len(self.opening) + sum(len(ws) for ws in self.workers)


def _quote(provider: ProviderId, index: int) -> Quote:
    monthly = 118.0 + 9.5 * index
    return Quote.model_validate(
        {
            "provider": provider,
            "monthlyPremium": monthly,
            "annualPremium": round(monthly * 12, 2),
            "coverage": "standard",
            "deductible": 1000,
            "source": "simulated",
            "quotedAt": utc_now(),
        }
    )


def plan_run(record: RunRecord, duration: float, seed: int = 20261128) -> RunPlan:
    rng = random.Random(seed)
    providers = list(PROVIDER_IDS)
    activity_total = EVENTS_PER_RUN - 2 - 2 * len(providers)
    per_provider = [activity_total // len(providers)] * len(providers)
    for i in range(activity_total % len(providers)):
        per_provider[i] += 1
    started = StartedEvent(providers=providers, total=len(providers))
    opening = [Write(0.0, started, with_another=True)]
    quotes = []
    workers: dict[ProviderId, list[Write]] = {}
    by_finish = sorted(enumerate(providers), key=lambda ip: FINISH_AT[ip[1]])
    for completed, (index, provider) in enumerate(by_finish, start=1):
        finish = FINISH_AT[provider] * duration
        count = per_provider[index]
        times = sorted(rng.uniform(0.02 * duration, finish * 0.98) for _ in range(count))
        name = PROVIDER_NAMES[provider]
        writes = [
            Write(
                times[0],
                ActivityEvent(provider=provider, message=f"Starting {name} quote"),
                provider,
                work="claim",
            ),
            Write(
                times[1],
                ActivityEvent(provider=provider, message=f"{name} agent started"),
                provider,
                work="agent",
            ),
        ]
        for step, at in enumerate(times[2:]):
            text = _STEPS[step * len(_STEPS) // (len(times) - 2)].format(name=name)
            writes.append(Write(at, ActivityEvent(provider=provider, message=text), provider))
        outcome: RunEvent
        if provider in DECLINES:
            message = "The insurer declined to quote."
            info = ErrorInfo(code="provider_declined", message=message)
            outcome_state = ProviderOutcome(status="failed", error=info, finished_at=utc_now())
            outcome = ProviderErrorEvent(
                provider=provider, code="provider_declined", message=message, retryable=False
            )
        else:
            quote = _quote(provider, index)
            quotes.append(quote)
            outcome_state = ProviderOutcome(status="quoted", quote=quote, finished_at=utc_now())
            outcome = QuoteEvent(provider=provider, quote=quote)
        writes.append(Write(finish, outcome, provider, outcome_state))
        total = len(providers)
        progress = ProgressEvent(
            completed=completed, total=total, percent=percent(completed, total)
        )
        writes.append(Write(finish, progress, provider, with_another=True))
        workers[provider] = writes
    last = max(providers, key=lambda p: FINISH_AT[p])
    ranked = cheapest_first(quotes)
    complete = CompleteEvent(
        quotes=ranked, best=ranked[0].provider if ranked else None, failed=sorted(DECLINES)
    )
    workers[last].append(Write(duration, complete, last))
    plan = RunPlan(opening, [workers[p] for p in providers])
    assert plan.events == EVENTS_PER_RUN, plan.events
    return plan
