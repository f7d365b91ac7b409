"""The run store's interface and its value types; it depends on nothing below it.

Events are stored as JSON without their id (the id is the event's position); readers get
`StoredEvent.data`, the wire JSON with `"id"` first, ready to send.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Self

from lib.store.errors import RunChanged, RunFinalized, RunNotFound
from lib.terms import TERMINAL_EVENT_TYPES

if TYPE_CHECKING:
    from lib.models import ErrorEvent, RunEvent, RunRecord

# Every event's JSON starts with its id and type (see wire_event and the event models).
_TYPE_FIELD = re.compile(r'\{"id":\d+,"type":"([a-z_]+)"')


def stored_event_json(event: RunEvent) -> str:
    """The stored form of an event: its JSON without the id."""
    return event.model_dump_json()


def wire_event(event_id: int, stored: str) -> str:
    """Splice the id in front of a stored event's fields: {"id":N,...}."""
    return f'{{"id":{event_id},{stored[1:]}'


@dataclass(frozen=True, slots=True)
class StoredEvent:
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


@dataclass(frozen=True, slots=True)
class RunState:
    """A run as read in one round trip: its record, how many events it has, and whether it is
    fenced; `raw` is the record exactly as stored, for compare-and-set finalization."""

    record: RunRecord
    raw: str
    last_event_id: int
    finalized: bool
    events: list[StoredEvent] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class IdempotencyClaim:
    """An Idempotency-Key, hashed, and a keyed hash of the normalised request body."""

    key_hash: str
    body_hash: str

    @classmethod
    def for_request(cls, key: str, normalised_body: str, secret: bytes) -> IdempotencyClaim:
        return cls(
            key_hash=hashlib.sha256(key.encode()).hexdigest(),
            body_hash=hmac.new(secret, normalised_body.encode(), hashlib.sha256).hexdigest(),
        )


@dataclass(frozen=True, slots=True)
class CreateOutcome:
    """`created` False: the idempotency key already maps to `run_id` (with `body_hash`)."""

    created: bool
    run_id: str
    body_hash: str | None = None


def idempotency_value(run_id: str, body_hash: str) -> str:
    return json.dumps({"runId": run_id, "bodyHash": body_hash}, separators=(",", ":"))


def parse_idempotency_value(raw: str) -> tuple[str, str]:
    value = json.loads(raw)
    return str(value["runId"]), str(value["bodyHash"])


class EventWatch(ABC):
    """A reader's live view of one run's events (push where the backend has it, else polling).
    Use as an async context manager; `next_events` waits up to `timeout` for events after
    `after` and returns them in order, or [] when none came."""

    @abstractmethod
    async def next_events(self, after: int, timeout: float) -> list[StoredEvent]: ...

    @property
    @abstractmethod
    def last_heard(self) -> float | None:
        """time.time() when the watch last saw a sign of the worker (an event or heartbeat)."""

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
    name: str

    @abstractmethod
    async def create_run(
        self, record: RunRecord, idempotency: IdempotencyClaim | None = None
    ) -> CreateOutcome:
        """Store a new run; with a claim, atomically map the key to it unless already mapped."""

    @abstractmethod
    async def find_idempotent_run(self, idempotency: IdempotencyClaim) -> CreateOutcome | None:
        """The run a claim's key already maps to (`created` False, with its body hash), or None.
        Lets a replay be answered when no new run could be admitted."""

    @abstractmethod
    async def get_run(
        self, run_id: str, *, events_after: int | None = None, limit: int = 100
    ) -> RunState | None:
        """The run's record and event count (and events after a cursor), or None if absent."""

    @abstractmethod
    async def update_run(self, record: RunRecord) -> None:
        """Replace the run's record (a heartbeat). Raises RunFinalized, RunNotFound."""

    @abstractmethod
    async def append_event(
        self,
        run_id: str,
        event: RunEvent,
        *,
        record: RunRecord | None = None,
        nonce: str | None = None,
    ) -> int:
        """Append atomically (with the record, when given) and return the event's id. A terminal
        event sets the fence. Idempotent per nonce: a retried append returns the first id.
        Raises RunFinalized (fenced), RunNotFound."""

    @abstractmethod
    async def read_events(
        self, run_id: str, after: int, limit: int | None = None
    ) -> list[StoredEvent]:
        """Events with id > after, in order (at most `limit`)."""

    @abstractmethod
    def watch(self, run_id: str) -> EventWatch:
        """A live view of the run's events for a streaming reader."""

    async def finalize_stale_run(
        self, observed: RunState, event: ErrorEvent, record: RunRecord
    ) -> int | None:
        """Append the terminal `event` with `record` only if the run is unfenced and its record
        is still exactly `observed.raw` (the worker showed no sign of life since). Returns the
        event id, or None when another writer got there first. Exactly once across instances."""
        try:
            return await self._append_if_unchanged(record.run_id, event, record, observed.raw)
        except (RunFinalized, RunChanged, RunNotFound):
            return None

    @abstractmethod
    async def _append_if_unchanged(
        self, run_id: str, event: RunEvent, record: RunRecord, expected_raw: str
    ) -> int:
        """Append with `record` only while the stored record is exactly `expected_raw`.
        Raises RunChanged, RunFinalized, RunNotFound."""

    @abstractmethod
    async def ping(self) -> None:
        """One cheap round trip to storage (the health check); raises StoreUnavailable."""

    async def wait_for_events(self, run_id: str, after: int, timeout: float) -> list[StoredEvent]:
        async with self.watch(run_id) as watch:
            return await watch.next_events(after, timeout)

    async def aclose(self) -> None:
        return None
