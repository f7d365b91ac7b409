"""The run store's interface and its value types; it depends on nothing below it.

A run is written by several workers at once (one per provider, on different instances) and read
by any instance. Every write is one atomic store operation that touches only what it owns: an
event append, one provider's lease or work state, one provider's outcome (with the run's
progress), or the run's end (with its terminal event, which fences every later append).

Events are stored as `{"n":"<nonce>",...}` (the nonce makes a retried append land once) and read
as the wire JSON with `"id"` first, ready to send; an event's id is its position in the run. Ids
increase by one, except where a retried write's first attempt reached storage after the retry had
appended the same events: that later copy is never read (`first_copies`) and its id is skipped.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Literal, NamedTuple, Self

from lib.terms import TERMINAL_EVENT_TYPES, format_time

if TYPE_CHECKING:
    from lib.models import (
        CancelledEvent,
        CompleteEvent,
        ErrorEvent,
        ProviderErrorEvent,
        ProviderId,
        ProviderLease,
        ProviderOutcome,
        ProviderWork,
        QuoteEvent,
        RunEnd,
        RunEvent,
        RunMeta,
        RunRecord,
        StartedEvent,
    )

# Every event's wire JSON starts with its id and type (see wire_event and the event models).
_TYPE_FIELD = re.compile(r'\{"id":\d+,"type":"([a-z_]+)"')
NONCE_CHARS = 8
_NONCE_PREFIX = len('{"n":"",') + NONCE_CHARS
# A lease given back on purpose (not merely expired): see renew_lease for the rule.
RELEASED = datetime.fromtimestamp(0, UTC)


def is_released(lease_end: datetime) -> bool:
    """Whether a lease ending at `lease_end` was given back (the release rule: renew_lease)."""
    return lease_end <= RELEASED


# The events a snapshot reads from the end of the run, for each provider's latest activity.
TAIL_EVENTS = 24


def new_nonce() -> str:
    return secrets.token_urlsafe(6)  # 8 URL-safe characters


def stored_event_json(event: RunEvent, nonce: str) -> str:
    """The stored form of an event: its JSON with the append's nonce in place of the id."""
    return f'{{"n":"{nonce}",{event.model_dump_json()[1:]}'


def wire_event(event_id: int, stored: str) -> str:
    """Replace a stored event's nonce with its id: {"id":N,...}."""
    return f'{{"id":{event_id},{stored[_NONCE_PREFIX:]}'


# A late first attempt lands within this many events of its retry's copy: the window in which the
# retry looked for it, and in which readers look for an earlier copy of what they read.
REPEAT_WINDOW = 64


def stored_nonce(stored: str) -> str:
    return stored[len('{"n":"') : len('{"n":"') + NONCE_CHARS]


def first_copies(
    first_id: int, stored: Sequence[str], earlier_nonces: Sequence[str]
) -> list[StoredEvent]:
    """Stored events `first_id`, `first_id` + 1, … as read, less every repeat: an event whose
    nonce is among the REPEAT_WINDOW stored before it (`earlier_nonces`: those before
    `first_id`, oldest first, up to the window). Every reader applies this one rule, so none
    sees an event twice, however it reads."""
    window = deque(earlier_nonces[-REPEAT_WINDOW:], maxlen=REPEAT_WINDOW)
    events = []
    for offset, item in enumerate(stored):
        nonce = stored_nonce(item)
        if nonce not in window:
            events.append(StoredEvent(first_id + offset, wire_event(first_id + offset, item)))
        window.append(nonce)
    return events


class StoredItem(NamedTuple):
    json: str  # stored_event_json(event, nonce)
    nonce: str
    event: RunEvent


def stored_items(events: Sequence[RunEvent], first_nonce: str | None = None) -> list[StoredItem]:
    """One write's events in their stored form, each with its own nonce; the first nonce is
    `first_nonce` when given (a retry of the write looks for it)."""
    nonces = [first_nonce or new_nonce(), *(new_nonce() for _ in range(len(events) - 1))]
    # strict=False: a write of no events still has its (unused) first nonce.
    return [StoredItem(stored_event_json(e, n), n, e) for e, n in zip(events, nonces, strict=False)]


class StoredEvent(NamedTuple):
    id: int
    data: str

    @property
    def type(self) -> str:
        match = _TYPE_FIELD.match(self.data)
        return match.group(1) if match else ""

    @property
    def is_terminal(self) -> bool:
        return self.type in TERMINAL_EVENT_TYPES

    def as_dict(self) -> dict[str, object]:
        value: dict[str, object] = json.loads(self.data)
        return value


class RunState(NamedTuple):
    """A run as read in one round trip: its record, its last event id, whether it has ended,
    and the events after the reader's cursor when asked for."""

    record: RunRecord
    last_event_id: int
    finalized: bool
    events: list[StoredEvent]


class IdempotencyClaim(NamedTuple):
    """An Idempotency-Key, hashed, and a keyed hash of the normalised request body."""

    key_hash: str
    body_hash: str

    @classmethod
    def for_request(cls, key: str, normalised_body: str, secret: bytes) -> IdempotencyClaim:
        return cls(
            key_hash=hashlib.sha256(key.encode()).hexdigest(),
            body_hash=hmac.new(secret, normalised_body.encode(), hashlib.sha256).hexdigest(),
        )


class CreateOutcome(NamedTuple):
    """`created` False: the idempotency key already maps to `run_id` (with `body_hash`)."""

    created: bool
    run_id: str
    body_hash: str | None = None


def idempotency_value(run_id: str, body_hash: str) -> str:
    return json.dumps({"runId": run_id, "bodyHash": body_hash}, separators=(",", ":"))


def parse_idempotency_value(raw: str) -> tuple[str, str]:
    value = json.loads(raw)
    return str(value["runId"]), str(value["bodyHash"])


def mapped_run(stored: str, creating: str | None = None) -> CreateOutcome:
    """The one answer both backends give when an Idempotency-Key already maps to a run: a
    replay of that run, unless it is the run being created (`creating`): then the create is
    its own retry, and created."""
    run_id, body_hash = parse_idempotency_value(stored)
    if run_id == creating:
        return CreateOutcome(created=True, run_id=run_id)
    return CreateOutcome(created=False, run_id=run_id, body_hash=body_hash)


ClaimResult = Literal["claimed", "held", "finished", "ended", "missing"]


class ProviderClaim(NamedTuple):
    """What claiming a provider found. `claimed`: this owner holds the lease now, `work` is where
    the provider got to and `deliveries` how many deliveries claimed it so far. `held`: another
    worker is alive on it until `busy_until`. `finished`: it has its outcome. `ended`: the run
    has ended. `missing`: no such run."""

    result: ClaimResult
    work: ProviderWork | None = None
    deliveries: int = 0
    busy_until: datetime | None = None


class OutcomeWritten(NamedTuple):
    """`first_id` None: the provider already had its outcome and nothing was written."""

    first_id: int | None
    completed: int


def progress_event_parts(nonce: str, ts: datetime) -> tuple[str, str]:
    """The stored progress event around its counts, which the store fills in atomically:
    prefix + "<completed>,\"total\":T,\"percent\":P" + suffix (ProgressEvent's field order)."""
    return f'{{"n":"{nonce}","type":"progress","completed":', f',"ts":"{format_time(ts)}"}}'


def assemble_record(
    meta: RunMeta,
    end: RunEnd | None,
    outcomes: dict[ProviderId, ProviderOutcome],
    work: dict[ProviderId, ProviderWork],
    leases: dict[ProviderId, ProviderLease],
    tail: Sequence[StoredEvent],
) -> RunRecord:
    """A run's record from its stored parts; each provider's latest activity comes from the
    run's last events where they show one, else from its stored work state."""
    from lib.models import ProviderState, RunRecord

    last_activity: dict[str, str] = {}
    updated_at = meta.created_at
    for event in tail:
        data = event.as_dict()
        if data.get("type") == "activity":
            last_activity[str(data["provider"])] = str(data["message"])
    if tail:
        updated_at = datetime.fromisoformat(str(tail[-1].as_dict()["ts"]))
    providers = []
    for provider in meta.providers:
        outcome = outcomes.get(provider)
        state = work.get(provider)
        activity = last_activity.get(provider) or (state.last_activity if state else None)
        if outcome is not None:
            providers.append(
                ProviderState(
                    provider=provider,
                    status=outcome.status,
                    quote=outcome.quote,
                    error=outcome.error,
                    last_activity=activity,
                )
            )
        elif end is not None and end.status == "failed" and end.error is not None:
            providers.append(
                ProviderState(
                    provider=provider, status="failed", error=end.error, last_activity=activity
                )
            )
        elif end is not None and end.status == "cancelled":
            providers.append(
                ProviderState(provider=provider, status="cancelled", last_activity=activity)
            )
        else:
            started = (state is not None and state.attempt > 0) or provider in leases
            providers.append(
                ProviderState(
                    provider=provider,
                    status="running" if started else "pending",
                    last_activity=activity,
                )
            )
    return RunRecord(
        run_id=meta.run_id,
        status=end.status if end is not None else "processing",
        created_at=meta.created_at,
        updated_at=max(updated_at, end.ended_at) if end is not None else updated_at,
        deadline=meta.deadline,
        coverage=meta.coverage,
        providers=providers,
        error=end.error if end is not None else None,
        ended_at=end.ended_at if end is not None else None,
        priced=meta.priced,
        work=work,
        leases=leases,
        finished_at={provider: outcome.finished_at for provider, outcome in outcomes.items()},
        agent_steps=_agent_steps(outcomes, work),
    )


def _agent_steps(
    outcomes: dict[ProviderId, ProviderOutcome], work: dict[ProviderId, ProviderWork]
) -> dict[ProviderId, int]:
    """Each provider's agent steps: as its outcome recorded them, else as its work state has
    them so far (a provider the run's deadline or failure cut short)."""
    steps: dict[ProviderId, int] = {}
    for provider in {*outcomes, *work}:
        outcome, state = outcomes.get(provider), work.get(provider)
        if outcome is not None and outcome.agent_steps is not None:
            steps[provider] = outcome.agent_steps
        elif state is not None and state.agent_steps:
            steps[provider] = state.total_agent_steps
    return steps


class EventWatch(ABC):
    """A reader's live view of one run's events (push where the backend has it, else polling).
    Use as an async context manager; `next_events` waits up to `timeout` for events after
    `after` and returns them in order, or [] when none came."""

    @abstractmethod
    async def next_events(self, after: int, timeout: float) -> list[StoredEvent]: ...

    @property
    @abstractmethod
    def last_heard(self) -> float | None:
        """time.time() when the watch last saw a sign of a writer (an event)."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        return None


class Store(ABC):
    """Runs and their events. Every method is one atomic operation against shared storage."""

    name: str
    ttl_seconds: int

    @abstractmethod
    async def create_run(
        self, record: RunRecord, idempotency: IdempotencyClaim | None = None
    ) -> CreateOutcome:
        """Store a new run with its `started` event (id 0); with a claim, atomically map the
        key to it unless the key is already mapped (then nothing is written)."""

    @abstractmethod
    async def release_idempotency(self, claim: IdempotencyClaim, run_id: str) -> None:
        """Forget the key's mapping to `run_id` (a run that could not be started), so a retry
        with the same key starts afresh."""

    @abstractmethod
    async def find_idempotent_run(self, idempotency: IdempotencyClaim) -> CreateOutcome | None:
        """The run a claim's key already maps to (`created` False, with its body hash), or None.
        Lets a replay be answered when no new run could be admitted."""

    @abstractmethod
    async def get_run(
        self,
        run_id: str,
        *,
        events_after: int | None = None,
        limit: int = 100,
        tail: int = TAIL_EVENTS,
    ) -> RunState | None:
        """The run's record and last event id (and events after a cursor), or None if absent.
        `tail`: how many of the last events to read for each provider's latest activity (0
        when the caller needs only the run's status)."""

    @abstractmethod
    async def append_events(
        self,
        run_id: str,
        events: Sequence[RunEvent],
        *,
        nonce: str | None = None,
        again: bool = False,
    ) -> int:
        """Append non-terminal events atomically, in order; returns the first one's id. A retry
        after a lost reply lands once: the store's own, and a caller's that passes the same
        `nonce` with `again` (the append is then looked for before it is made).
        Raises RunFinalized (the run has ended), RunNotFound."""

    @abstractmethod
    async def claim_provider(
        self,
        run_id: str,
        provider: ProviderId,
        owner: str,
        *,
        now: datetime,
        lease_until: datetime,
        alive_since: datetime,
        first_work: ProviderWork | None = None,
        first_events: Sequence[RunEvent] = (),
    ) -> ProviderClaim:
        """Take the provider's lease for `owner` unless it is finished, the run has ended, or
        another owner is alive on it: its lease runs past `now`, or its lease ended without
        being released and the provider's latest event in the whole run (not a window of its
        last events) is strictly after `alive_since`; it is then busy until that event + the
        lease's length. Counts the delivery (not again for the same owner). Both backends
        state this rule in one transaction (SQLite) or script (KV, the CLAIM script), and the
        contract suite pins where a shortcut would make them differ.

        A claim that finds no work state stored yet (the provider's start) stores `first_work`
        and appends `first_events` with it, in the same atomic write, and answers with that
        work; a repeated claim by the same owner finds the work there and appends nothing."""

    @abstractmethod
    async def renew_lease(
        self, run_id: str, provider: ProviderId, owner: str, until: datetime
    ) -> None:
        """Extend `owner`'s lease (or release it: `until` = RELEASED lets the next claim in
        at once, without waiting for the holder's recent events to age).

        The release rule, on both backends: a lease whose end is RELEASED is free. The next
        claim takes it whatever the holder's latest event or renewals say, and the holder can
        no longer renew it: renewing a released lease raises LeaseLost, whether or not
        another owner has claimed it since (its holder handed the message back; it must not
        take the provider again behind the next delivery's back).
        Raises LeaseLost, RunFinalized, RunNotFound."""

    @abstractmethod
    async def save_provider_work(
        self,
        run_id: str,
        provider: ProviderId,
        owner: str,
        work: ProviderWork,
        events: Sequence[RunEvent] = (),
        *,
        lease_until: datetime | None = None,
        nonce: str | None = None,
        again: bool = False,
    ) -> None:
        """Store the provider's work state (and append `events`, and move the lease) if `owner`
        still holds its lease; `nonce` and `again` as for append_events.
        Raises LeaseLost, RunFinalized, RunNotFound."""

    @abstractmethod
    async def record_outcome(
        self,
        run_id: str,
        provider: ProviderId,
        outcome: ProviderOutcome,
        event: QuoteEvent | ProviderErrorEvent,
        *,
        total: int,
    ) -> OutcomeWritten:
        """The provider's outcome, once: stores it and appends `event` and the run's progress
        event (its count taken atomically, so concurrent outcomes count 1, 2, … of `total`).
        Raises RunFinalized, RunNotFound."""

    @abstractmethod
    async def finish_run(self, run_id: str, event: CompleteEvent | ErrorEvent, end: RunEnd) -> int:
        """Append the terminal event with the run's end, exactly once: every later append and
        provider write is refused. Raises RunFinalized (already ended), RunNotFound."""

    @abstractmethod
    async def cancel_run(
        self, run_id: str, event: CancelledEvent, end: RunEnd, *, completed: int
    ) -> int:
        """The run's end by cancel: as finish_run, and only while exactly `completed` providers
        have their outcome (the ones `event` lists), so no outcome lands between the read the
        event was built from and this write. Raises OutcomesChanged (read again and retry),
        RunFinalized (already ended), RunNotFound."""

    @abstractmethod
    async def read_events(
        self, run_id: str, after: int, limit: int | None = None
    ) -> list[StoredEvent]:
        """Events with id > after, in order (at most `limit`)."""

    @abstractmethod
    def watch(self, run_id: str) -> EventWatch:
        """A live view of the run's events for a streaming reader."""

    @abstractmethod
    async def take_agent_slot(
        self, holder: str, *, limit: int, now: datetime, until: datetime
    ) -> bool:
        """Hold one of the deployment's `limit` agent slots for `holder` until `until`: True when
        `holder` held one already (renewed) or a slot was free. A slot whose holder stopped
        renewing it frees itself at its `until`; False when all `limit` are held past `now`."""

    @abstractmethod
    async def release_agent_slot(self, holder: str) -> None:
        """Free `holder`'s agent slot (nothing when it holds none)."""

    @abstractmethod
    async def ping(self) -> None:
        """One cheap round trip to storage (the health check); raises StoreUnavailable."""

    async def append_event(self, run_id: str, event: RunEvent) -> int:
        """One event; a terminal one ends the run (completed or failed, as the event says)."""
        from lib.models import CompleteEvent, ErrorEvent, ErrorInfo, RunEnd

        if isinstance(event, CompleteEvent | ErrorEvent):
            error = None
            if isinstance(event, ErrorEvent):
                error = ErrorInfo(code=event.code, message=event.message)
            end = RunEnd(
                status="completed" if error is None else "failed",
                ended_at=event.ts,
                error=error,
            )
            return await self.finish_run(run_id, event, end)
        return await self.append_events(run_id, [event])

    async def wait_for_events(self, run_id: str, after: int, timeout: float) -> list[StoredEvent]:
        async with self.watch(run_id) as watch:
            return await watch.next_events(after, timeout)

    async def aclose(self) -> None:
        return None


def started_event(record: RunRecord) -> StartedEvent:
    from lib.models import StartedEvent

    providers = [p.provider for p in record.providers]
    return StartedEvent(providers=providers, total=len(providers), ts=record.created_at)
