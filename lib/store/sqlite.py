"""The embedded backend for local development: one SQLite file in WAL mode, shared by every
process on the machine exactly as function instances share KV. Same semantics as the KV store:
atomic fenced writes (each one transaction), appends idempotent per nonce, provider leases and
set-once outcomes, TTL enforced on read and purged lazily. Live delivery polls with a short
backoff (an indexed range query)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import TypeVar

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
)
from lib.store.base import (
    TAIL_EVENTS,
    CreateOutcome,
    EventWatch,
    IdempotencyClaim,
    OutcomeWritten,
    ProviderClaim,
    RunState,
    Store,
    StoredEvent,
    assemble_record,
    idempotency_value,
    is_released,
    mapped_run,
    new_nonce,
    progress_event_parts,
    started_event,
    stored_event_json,
    stored_items,
    wire_event,
)
from lib.store.errors import (
    LeaseLost,
    OutcomesChanged,
    RunFinalized,
    RunNotFound,
    StoreUnavailable,
)
from lib.store.sqlite_file import open_wal_database

T = TypeVar("T")

# Bumped when the tables change: a local file of another version is recreated (it holds only
# runs that live two hours).
SCHEMA_VERSION = 3
_SCHEMA = """
DROP TABLE IF EXISTS runs;
DROP TABLE IF EXISTS events;
DROP TABLE IF EXISTS providers;
DROP TABLE IF EXISTS idempotency;
DROP TABLE IF EXISTS agent_slots;
CREATE TABLE runs (
    run_id      TEXT PRIMARY KEY,
    meta        TEXT NOT NULL,
    status      TEXT NOT NULL,
    run_end     TEXT,
    event_count INTEGER NOT NULL DEFAULT 0,
    done        INTEGER NOT NULL DEFAULT 0,
    expires_at  REAL NOT NULL
);
CREATE TABLE providers (
    run_id      TEXT NOT NULL,
    provider    TEXT NOT NULL,
    work        TEXT,
    lease_owner TEXT,
    lease_until REAL,
    deliveries  INTEGER NOT NULL DEFAULT 0,
    outcome     TEXT,
    PRIMARY KEY (run_id, provider)
) WITHOUT ROWID;
CREATE TABLE events (
    run_id   TEXT NOT NULL,
    id       INTEGER NOT NULL,
    body     TEXT NOT NULL,
    nonce    TEXT NOT NULL,
    provider TEXT,
    ts       TEXT NOT NULL,
    PRIMARY KEY (run_id, id)
) WITHOUT ROWID;
CREATE UNIQUE INDEX events_by_nonce ON events (run_id, nonce);
CREATE TABLE idempotency (
    key_hash   TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE agent_slots (
    holder TEXT PRIMARY KEY,
    until  REAL NOT NULL
);
"""
_PURGE_EVERY_SECONDS = 60.0


def _epoch(moment: datetime) -> float:
    return moment.timestamp()


def _from_epoch(seconds: float | None) -> datetime:
    """A stored lease end (None: no lease, as good as released)."""
    return datetime.fromtimestamp(seconds or 0, UTC)


class SQLiteStore(Store):
    name = "sqlite"

    def __init__(self, path: str, *, ttl_seconds: int, poll_max_seconds: float = 0.2) -> None:
        self.path = path
        self.ttl_seconds = ttl_seconds
        self.poll_max_seconds = poll_max_seconds
        # One connection, used from one thread: calls are short and serialised.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        self._db: sqlite3.Connection | None = None
        self._last_purge = 0.0

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            db = open_wal_database(self.path)
            db.execute("BEGIN IMMEDIATE")
            try:
                if db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            db.execute(statement)
                    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self._db = db
        return self._db

    async def _run(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            try:
                return operation(self._connect())
            except (sqlite3.Error, OSError) as error:  # OSError: its folder cannot be made
                raise StoreUnavailable(f"the local store failed: {error}", retry_after=1) from None

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def _transaction(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        """One write transaction: all of `operation` or none of it."""

        def write(db: sqlite3.Connection) -> T:
            db.execute("BEGIN IMMEDIATE")
            try:
                result = operation(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result

        return await self._run(write)

    @staticmethod
    def _open_run(db: sqlite3.Connection, run_id: str) -> tuple[str, int]:
        """(status, event count) of a live run; raises RunNotFound."""
        row = db.execute(
            "SELECT status, event_count FROM runs WHERE run_id = ? AND expires_at > ?",
            (run_id, time.time()),
        ).fetchone()
        if row is None:
            raise RunNotFound(f"run {run_id} does not exist")
        return str(row[0]), int(row[1])

    def _require_open(self, db: sqlite3.Connection, run_id: str) -> int:
        status, count = self._open_run(db, run_id)
        if status != "processing":
            raise RunFinalized(f"run {run_id} has ended")
        return count

    @staticmethod
    def _insert_events(
        db: sqlite3.Connection, run_id: str, first: int, items: Sequence[tuple[str, str, RunEvent]]
    ) -> None:
        db.executemany(
            "INSERT INTO events (run_id, id, body, nonce, provider, ts) VALUES (?, ?, ?, ?, ?, ?)",
            [
                (
                    run_id,
                    first + i,
                    body,
                    nonce,
                    getattr(event, "provider", None),
                    event.ts.isoformat(),
                )
                for i, (body, nonce, event) in enumerate(items)
            ],
        )
        db.execute(
            "UPDATE runs SET event_count = event_count + ? WHERE run_id = ?", (len(items), run_id)
        )

    def _purge_expired(self, db: sqlite3.Connection) -> None:
        now = time.time()
        if now - self._last_purge < _PURGE_EVERY_SECONDS:
            return
        self._last_purge = now
        for table in ("events", "providers"):
            db.execute(
                f"DELETE FROM {table} WHERE run_id IN"
                " (SELECT run_id FROM runs WHERE expires_at <= ?)",
                (now,),
            )
        db.execute("DELETE FROM runs WHERE expires_at <= ?", (now,))
        db.execute("DELETE FROM idempotency WHERE expires_at <= ?", (now,))

    # --- the Store interface -------------------------------------------------------------------

    async def create_run(
        self, record: RunRecord, idempotency: IdempotencyClaim | None = None
    ) -> CreateOutcome:
        def create(db: sqlite3.Connection) -> CreateOutcome:
            expires = time.time() + self.ttl_seconds
            self._purge_expired(db)
            if idempotency is not None:
                row = db.execute(
                    "SELECT value FROM idempotency WHERE key_hash = ? AND expires_at > ?",
                    (idempotency.key_hash, time.time()),
                ).fetchone()
                if row:
                    return mapped_run(row[0], record.run_id)
                db.execute(
                    "INSERT OR REPLACE INTO idempotency VALUES (?, ?, ?)",
                    (
                        idempotency.key_hash,
                        idempotency_value(record.run_id, idempotency.body_hash),
                        expires,
                    ),
                )
            if db.execute("SELECT 1 FROM runs WHERE run_id = ?", (record.run_id,)).fetchone():
                return CreateOutcome(created=True, run_id=record.run_id)
            db.execute(
                "INSERT INTO runs (run_id, meta, status, expires_at) VALUES (?, ?, ?, ?)",
                (record.run_id, record.meta.model_dump_json(), "processing", expires),
            )
            started = started_event(record)
            nonce = new_nonce()
            self._insert_events(
                db, record.run_id, 0, [(stored_event_json(started, nonce), nonce, started)]
            )
            return CreateOutcome(created=True, run_id=record.run_id)

        return await self._transaction(create)

    async def release_idempotency(self, claim: IdempotencyClaim, run_id: str) -> None:
        value = idempotency_value(run_id, claim.body_hash)

        def forget(db: sqlite3.Connection) -> None:
            db.execute(
                "DELETE FROM idempotency WHERE key_hash = ? AND value = ?", (claim.key_hash, value)
            )

        await self._run(forget)

    async def find_idempotent_run(self, idempotency: IdempotencyClaim) -> CreateOutcome | None:
        def find(db: sqlite3.Connection) -> CreateOutcome | None:
            row = db.execute(
                "SELECT value FROM idempotency WHERE key_hash = ? AND expires_at > ?",
                (idempotency.key_hash, time.time()),
            ).fetchone()
            return None if row is None else mapped_run(row[0])

        return await self._run(find)

    async def get_run(
        self,
        run_id: str,
        *,
        events_after: int | None = None,
        limit: int = 100,
        tail: int = TAIL_EVENTS,
    ) -> RunState | None:
        def get(db: sqlite3.Connection) -> RunState | None:
            row = db.execute(
                "SELECT meta, run_end, event_count FROM runs WHERE run_id = ? AND expires_at > ?",
                (run_id, time.time()),
            ).fetchone()
            if row is None:
                return None
            meta = RunMeta.model_validate_json(row[0])
            end = RunEnd.model_validate_json(row[1]) if row[1] else None
            count = int(row[2])
            outcomes, work, leases = {}, {}, {}
            for provider, work_json, owner, until, deliveries, outcome in db.execute(
                "SELECT provider, work, lease_owner, lease_until, deliveries, outcome"
                " FROM providers WHERE run_id = ?",
                (run_id,),
            ):
                if outcome:
                    outcomes[provider] = ProviderOutcome.model_validate_json(outcome)
                if work_json:
                    work[provider] = ProviderWork.model_validate_json(work_json)
                if owner:
                    leases[provider] = ProviderLease(
                        owner=owner,
                        until=datetime.fromtimestamp(until, UTC),
                        deliveries=deliveries,
                    )
            recent = self._events(db, run_id, max(count - tail, 0) - 1, tail) if tail else []
            record = assemble_record(meta, end, outcomes, work, leases, recent)
            events = (
                self._events(db, run_id, events_after, limit) if events_after is not None else []
            )
            return RunState(
                record=record,
                last_event_id=count - 1,
                finalized=end is not None,
                events=events,
            )

        return await self._run(get)

    @staticmethod
    def _events(
        db: sqlite3.Connection, run_id: str, after: int, limit: int | None
    ) -> list[StoredEvent]:
        rows = db.execute(
            "SELECT id, body FROM events WHERE run_id = ? AND id > ? ORDER BY id LIMIT ?",
            (run_id, after, -1 if limit is None else limit),
        ).fetchall()
        return [StoredEvent(event_id, wire_event(event_id, body)) for event_id, body in rows]

    async def append_events(
        self,
        run_id: str,
        events: Sequence[RunEvent],
        *,
        nonce: str | None = None,
        again: bool = False,
    ) -> int:
        # Every append looks for its nonce first (one indexed lookup), so `again` changes nothing.
        items = stored_items(events, nonce)

        def append(db: sqlite3.Connection) -> int:
            prior = db.execute(
                "SELECT id FROM events WHERE run_id = ? AND nonce = ?", (run_id, items[0].nonce)
            ).fetchone()
            if prior:
                return int(prior[0])
            first = self._require_open(db, run_id)
            self._insert_events(db, run_id, first, items)
            return first

        return await self._transaction(append)

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
        items = stored_items(first_events)

        def claim(db: sqlite3.Connection) -> ProviderClaim:
            try:
                status, count = self._open_run(db, run_id)
            except RunNotFound:
                return ProviderClaim("missing")
            if status != "processing":
                return ProviderClaim("ended")
            row = db.execute(
                "SELECT work, lease_owner, lease_until, deliveries, outcome FROM providers"
                " WHERE run_id = ? AND provider = ?",
                (run_id, provider),
            ).fetchone()
            work_json, holder, until, deliveries, outcome = row or (None, None, None, 0, None)
            if outcome:
                return ProviderClaim("finished")
            if holder is not None and holder != owner:
                if until is not None and until > _epoch(now):
                    return ProviderClaim("held", busy_until=datetime.fromtimestamp(until, UTC))
                last = (
                    not is_released(_from_epoch(until))
                    and db.execute(
                        "SELECT ts FROM events WHERE run_id = ? AND provider = ?"
                        " ORDER BY id DESC LIMIT 1",
                        (run_id, provider),
                    ).fetchone()
                )
                if last and datetime.fromisoformat(last[0]) > alive_since:
                    active_until = datetime.fromisoformat(last[0]) + (lease_until - now)
                    return ProviderClaim("held", busy_until=active_until)
            if holder != owner:
                deliveries += 1
            db.execute(
                "INSERT INTO providers (run_id, provider, lease_owner, lease_until, deliveries)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (run_id, provider) DO UPDATE SET"
                " lease_owner = excluded.lease_owner, lease_until = excluded.lease_until,"
                " deliveries = excluded.deliveries",
                (run_id, provider, owner, _epoch(lease_until), deliveries),
            )
            if work_json or first_work is None:
                work = ProviderWork.model_validate_json(work_json) if work_json else ProviderWork()
                return ProviderClaim("claimed", work=work, deliveries=deliveries)
            db.execute(
                "UPDATE providers SET work = ? WHERE run_id = ? AND provider = ?",
                (first_work.model_dump_json(), run_id, provider),
            )
            if items:
                self._insert_events(db, run_id, count, items)
            return ProviderClaim("claimed", work=first_work, deliveries=deliveries)

        return await self._transaction(claim)

    def _require_lease(
        self, db: sqlite3.Connection, run_id: str, provider: ProviderId, owner: str
    ) -> int:
        count = self._require_open(db, run_id)
        row = db.execute(
            "SELECT lease_owner FROM providers WHERE run_id = ? AND provider = ?",
            (run_id, provider),
        ).fetchone()
        if row is None or row[0] != owner:
            raise LeaseLost(f"{provider} of run {run_id} is no longer {owner}'s")
        return count

    async def renew_lease(
        self, run_id: str, provider: ProviderId, owner: str, until: datetime
    ) -> None:
        def renew(db: sqlite3.Connection) -> None:
            self._require_lease(db, run_id, provider, owner)
            (current,) = db.execute(
                "SELECT lease_until FROM providers WHERE run_id = ? AND provider = ?",
                (run_id, provider),
            ).fetchone()
            if not is_released(until) and is_released(_from_epoch(current)):
                raise LeaseLost(f"{provider} of run {run_id} was released by {owner}")
            db.execute(
                "UPDATE providers SET lease_until = ? WHERE run_id = ? AND provider = ?",
                (_epoch(until), run_id, provider),
            )

        await self._transaction(renew)

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
        items = stored_items(events, nonce)

        def save(db: sqlite3.Connection) -> None:
            count = self._require_lease(db, run_id, provider, owner)
            if (
                items
                and db.execute(
                    "SELECT 1 FROM events WHERE run_id = ? AND nonce = ?", (run_id, items[0].nonce)
                ).fetchone()
            ):
                items.clear()  # a retry of a save that landed: its events are there
            db.execute(
                "UPDATE providers SET work = ?, lease_until = COALESCE(?, lease_until)"
                " WHERE run_id = ? AND provider = ?",
                (
                    work.model_dump_json(),
                    _epoch(lease_until) if lease_until is not None else None,
                    run_id,
                    provider,
                ),
            )
            if items:
                self._insert_events(db, run_id, count, items)

        await self._transaction(save)

    async def record_outcome(
        self,
        run_id: str,
        provider: ProviderId,
        outcome: ProviderOutcome,
        event: QuoteEvent | ProviderErrorEvent,
        *,
        total: int,
    ) -> OutcomeWritten:
        def record(db: sqlite3.Connection) -> OutcomeWritten:
            count = self._require_open(db, run_id)
            row = db.execute(
                "SELECT outcome FROM providers WHERE run_id = ? AND provider = ?",
                (run_id, provider),
            ).fetchone()
            if row and row[0]:
                done = db.execute("SELECT done FROM runs WHERE run_id = ?", (run_id,)).fetchone()
                return OutcomeWritten(first_id=None, completed=int(done[0]))
            db.execute(
                "INSERT INTO providers (run_id, provider, outcome) VALUES (?, ?, ?)"
                " ON CONFLICT (run_id, provider) DO UPDATE SET outcome = excluded.outcome",
                (run_id, provider, outcome.model_dump_json()),
            )
            done = int(
                db.execute(
                    "UPDATE runs SET done = done + 1 WHERE run_id = ? RETURNING done", (run_id,)
                ).fetchone()[0]
            )
            progress_nonce = new_nonce()
            prefix, suffix = progress_event_parts(progress_nonce, event.ts)
            progress = f'{prefix}{done},"total":{total},"percent":{done * 100 // total}{suffix}'
            nonce = new_nonce()
            db.executemany(
                "INSERT INTO events (run_id, id, body, nonce, provider, ts)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (
                        run_id,
                        count,
                        stored_event_json(event, nonce),
                        nonce,
                        provider,
                        event.ts.isoformat(),
                    ),
                    (run_id, count + 1, progress, progress_nonce, None, event.ts.isoformat()),
                ],
            )
            db.execute("UPDATE runs SET event_count = event_count + 2 WHERE run_id = ?", (run_id,))
            return OutcomeWritten(first_id=count, completed=done)

        return await self._transaction(record)

    async def finish_run(self, run_id: str, event: CompleteEvent | ErrorEvent, end: RunEnd) -> int:
        nonce = new_nonce()

        def finish(db: sqlite3.Connection) -> int:
            count = self._require_open(db, run_id)
            self._seal(db, run_id, count, event, nonce, end)
            return count

        return await self._transaction(finish)

    async def cancel_run(
        self, run_id: str, event: CancelledEvent, end: RunEnd, *, completed: int
    ) -> int:
        nonce = new_nonce()

        def cancel(db: sqlite3.Connection) -> int:
            count = self._require_open(db, run_id)
            (done,) = db.execute("SELECT done FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if int(done) != completed:
                raise OutcomesChanged(f"a provider of run {run_id} finished meanwhile")
            self._seal(db, run_id, count, event, nonce, end)
            return count

        return await self._transaction(cancel)

    def _seal(
        self,
        db: sqlite3.Connection,
        run_id: str,
        count: int,
        event: RunEvent,
        nonce: str,
        end: RunEnd,
    ) -> None:
        """The terminal event and the run's end, in the caller's transaction (the fence)."""
        self._insert_events(db, run_id, count, [(stored_event_json(event, nonce), nonce, event)])
        db.execute(
            "UPDATE runs SET status = ?, run_end = ?, expires_at = ? WHERE run_id = ?",
            (end.status, end.model_dump_json(), time.time() + self.ttl_seconds, run_id),
        )

    async def read_events(
        self, run_id: str, after: int, limit: int | None = None
    ) -> list[StoredEvent]:
        def read(db: sqlite3.Connection) -> list[StoredEvent]:
            # One indexed query per poll: the events of a run that has not expired.
            rows = db.execute(
                "SELECT e.id, e.body FROM events e JOIN runs r ON r.run_id = e.run_id"
                " WHERE e.run_id = ? AND r.expires_at > ? AND e.id > ? ORDER BY e.id LIMIT ?",
                (run_id, time.time(), after, -1 if limit is None else limit),
            ).fetchall()
            return [StoredEvent(event_id, wire_event(event_id, body)) for event_id, body in rows]

        return await self._run(read)

    async def ping(self) -> None:
        await self._run(lambda db: db.execute("SELECT 1").fetchone())

    def watch(self, run_id: str) -> EventWatch:
        return SQLiteEventWatch(self, run_id)

    async def aclose(self) -> None:
        def close(_db: sqlite3.Connection) -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        if self._db is not None:
            await self._run(close)
        self._executor.shutdown(wait=False)

    async def take_agent_slot(
        self, holder: str, *, limit: int, now: datetime, until: datetime
    ) -> bool:
        def take(db: sqlite3.Connection) -> bool:
            db.execute("DELETE FROM agent_slots WHERE until <= ?", (_epoch(now),))
            held = db.execute("SELECT 1 FROM agent_slots WHERE holder = ?", (holder,)).fetchone()
            (in_use,) = db.execute("SELECT COUNT(*) FROM agent_slots").fetchone()
            if held is None and in_use >= limit:
                return False
            db.execute(
                "INSERT INTO agent_slots (holder, until) VALUES (?, ?) "
                "ON CONFLICT (holder) DO UPDATE SET until = excluded.until",
                (holder, _epoch(until)),
            )
            return True

        return await self._transaction(take)

    async def release_agent_slot(self, holder: str) -> None:
        def release(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM agent_slots WHERE holder = ?", (holder,))

        await self._transaction(release)


class SQLiteEventWatch(EventWatch):
    """Polls from the cursor: every 20 ms right after an event, backing off to `poll_max`."""

    _POLL_MIN = 0.02

    def __init__(self, store: SQLiteStore, run_id: str) -> None:
        self._store = store
        self._run_id = run_id
        self._delay = self._POLL_MIN
        self._last_heard: float | None = None

    @property
    def last_heard(self) -> float | None:
        return self._last_heard

    async def next_events(self, after: int, timeout: float) -> list[StoredEvent]:
        end = time.monotonic() + timeout
        while True:
            events = await self._store.read_events(self._run_id, after)
            if events:
                self._delay = self._POLL_MIN
                self._last_heard = time.time()
                return events
            remaining = end - time.monotonic()
            if remaining <= 0:
                return []
            await asyncio.sleep(min(self._delay, remaining))
            self._delay = min(self._delay * 2, self._store.poll_max_seconds)
