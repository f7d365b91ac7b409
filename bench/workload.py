"""How the system writes one run, as `make bench` replays it: THE place to change when the write
path changes (which writer appends what, with which record, when).

A run of five insurers, as the queue workers write it: POST's `started`, then five provider
workers appending at once, each its own agent's activity (no record: an activity append is an
event and its announcement), then its outcome (`quote`, or `provider_error`, with the record that
outcome implies) and the run's `progress`; the worker that records the last outcome writes
`complete` with the final record. 100 events in all, spread over the run's duration with the same
pseudo-random times for both designs; the seed's design replays the same events in time order
(its read-modify-write cannot take concurrent writers without losing events).
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from datetime import timedelta

from lib.models import (
    PROVIDER_IDS,
    PROVIDER_NAMES,
    ActivityEvent,
    CompleteEvent,
    ErrorInfo,
    ProgressEvent,
    ProviderErrorEvent,
    ProviderId,
    ProviderState,
    Quote,
    QuoteEvent,
    QuoteRequest,
    RunEvent,
    RunRecord,
    StartedEvent,
    cheapest_first,
    percent,
    utc_now,
)
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


def completed_record(record: RunRecord) -> RunRecord:
    return record.model_copy(update={"status": "completed", "updated_at": utc_now()})


@dataclass(frozen=True)
class Write:
    """One `Store.append_event(run_id, event, record=record, nonce=nonce)` at `at` seconds."""

    at: float
    event: RunEvent
    record: RunRecord | None
    nonce: str


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


def _with_provider(record: RunRecord, state: ProviderState) -> RunRecord:
    providers = [state if p.provider == state.provider else p for p in record.providers]
    now = utc_now()
    return record.model_copy(update={"providers": providers, "updated_at": now})


def plan_run(record: RunRecord, duration: float, seed: int = 20261128) -> RunPlan:
    rng = random.Random(seed)
    nonce = lambda: uuid.uuid4().hex  # noqa: E731 - every write carries one, as a worker's does
    providers = list(PROVIDER_IDS)
    activity_total = EVENTS_PER_RUN - 2 - 2 * len(providers)
    per_provider = [activity_total // len(providers)] * len(providers)
    for i in range(activity_total % len(providers)):
        per_provider[i] += 1
    opening = [Write(0.0, StartedEvent(providers=providers, total=len(providers)), None, nonce())]
    # Outcomes in the order they land, so each outcome's record holds the earlier ones.
    current, quotes = record, []
    workers: dict[ProviderId, list[Write]] = {}
    by_finish = sorted(enumerate(providers), key=lambda ip: FINISH_AT[ip[1]])
    for completed, (index, provider) in enumerate(by_finish, start=1):
        finish = FINISH_AT[provider] * duration
        count = per_provider[index]
        times = sorted(rng.uniform(0.02 * duration, finish * 0.98) for _ in range(count))
        writes = []
        for step, at in enumerate(times):
            text = _STEPS[step * len(_STEPS) // len(times)].format(name=PROVIDER_NAMES[provider])
            writes.append(Write(at, ActivityEvent(provider=provider, message=text), None, nonce()))
        outcome: RunEvent
        if provider in DECLINES:
            message = "The insurer declined to quote."
            info = ErrorInfo(code="provider_declined", message=message)
            state = ProviderState(provider=provider, status="failed", error=info)
            outcome = ProviderErrorEvent(
                provider=provider, code="provider_declined", message=message, retryable=False
            )
        else:
            quote = _quote(provider, index)
            quotes.append(quote)
            state = ProviderState(provider=provider, status="quoted", quote=quote)
            outcome = QuoteEvent(provider=provider, quote=quote)
        current = _with_provider(current, state)
        writes.append(Write(finish, outcome, current, nonce()))
        total = len(providers)
        progress = ProgressEvent(
            completed=completed, total=total, percent=percent(completed, total)
        )
        writes.append(Write(finish, progress, None, nonce()))
        workers[provider] = writes
    last = max(providers, key=lambda p: FINISH_AT[p])
    ranked = cheapest_first(quotes)
    complete = CompleteEvent(
        quotes=ranked, best=ranked[0].provider if ranked else None, failed=sorted(DECLINES)
    )
    workers[last].append(Write(duration, complete, completed_record(current), nonce()))
    plan = RunPlan(opening, [workers[p] for p in providers])
    assert plan.events == EVENTS_PER_RUN, plan.events
    return plan
