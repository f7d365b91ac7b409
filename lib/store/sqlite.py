"""The embedded backend for local development: one SQLite file in WAL mode, shared by every
process on the machine exactly as function instances share KV. Same semantics as the KV store:
atomic fenced appends, idempotent per nonce, TTL enforced on read and purged lazily. Live
delivery polls with a short backoff (an indexed range query)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from lib.models import RunEvent, RunRecord, is_terminal
from lib.store.base import (
    CreateOutcome,
    EventWatch,
    IdempotencyClaim,
    RunState,
    Store,
    StoredEvent,
    idempotency_value,
    parse_idempotency_value,
    stored_event_json,
    wire_event,
)
from lib.store.errors import RunChanged, RunFinalized, RunNotFound, StoreUnavailable

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id      TEXT PRIMARY KEY,
    record      TEXT NOT NULL,
    event_count INTEGER NOT NULL DEFAULT 0,
    final_id    INTEGER,
    expires_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    run_id TEXT NOT NULL,
    id     INTEGER NOT NULL,
    body   TEXT NOT NULL,
    nonce  TEXT NOT NULL,
    PRIMARY KEY (run_id, id)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS events_by_nonce ON events (run_id, nonce);
CREATE TABLE IF NOT EXISTS idempotency (
    key_hash   TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    expires_at REAL NOT NULL
);
"""
_PURGE_EVERY_SECONDS = 60.0


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
            directory = os.path.dirname(self.path)
            if directory:
                os.makedirs(directory, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    async def _run(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            try:
                return operation(self._connect())
            except (sqlite3.Error, OSError) as error:  # OSError: its folder cannot be made
                raise StoreUnavailable(f"the local store failed: {error}", retry_after=1) from None

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    @staticmethod
    def _live_run(db: sqlite3.Connection, run_id: str) -> tuple[str, int, int | None] | None:
        row = db.execute(
            "SELECT record, event_count, final_id FROM runs WHERE run_id = ? AND expires_at > ?",
            (run_id, time.time()),
        ).fetchone()
        return (row[0], row[1], row[2]) if row else None

    def _purge_expired(self, db: sqlite3.Connection) -> None:
        now = time.time()
        if now - self._last_purge < _PURGE_EVERY_SECONDS:
            return
        self._last_purge = now
        db.execute(
            "DELETE FROM events WHERE run_id IN (SELECT run_id FROM runs WHERE expires_at <= ?)",
            (now,),
        )
        db.execute("DELETE FROM runs WHERE expires_at <= ?", (now,))
        db.execute("DELETE FROM idempotency WHERE expires_at <= ?", (now,))

    async def create_run(
        self, record: RunRecord, idempotency: IdempotencyClaim | None = None
    ) -> CreateOutcome:
        def create(db: sqlite3.Connection) -> CreateOutcome:
            expires = time.time() + self.ttl_seconds
            db.execute("BEGIN IMMEDIATE")
            try:
                self._purge_expired(db)
                if idempotency is not None:
                    row = db.execute(
                        "SELECT value FROM idempotency WHERE key_hash = ? AND expires_at > ?",
                        (idempotency.key_hash, time.time()),
                    ).fetchone()
                    if row:
                        db.execute("COMMIT")
                        run_id, body_hash = parse_idempotency_value(row[0])
                        return CreateOutcome(created=False, run_id=run_id, body_hash=body_hash)
                    db.execute(
                        "INSERT OR REPLACE INTO idempotency VALUES (?, ?, ?)",
                        (
                            idempotency.key_hash,
                            idempotency_value(record.run_id, idempotency.body_hash),
                            expires,
                        ),
                    )
                db.execute(
                    "INSERT OR REPLACE INTO runs (run_id, record, event_count, final_id,"
                    " expires_at) VALUES (?, ?, 0, NULL, ?)",
                    (record.run_id, record.model_dump_json(), expires),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return CreateOutcome(created=True, run_id=record.run_id)

        return await self._run(create)

    async def find_idempotent_run(self, idempotency: IdempotencyClaim) -> CreateOutcome | None:
        def find(db: sqlite3.Connection) -> CreateOutcome | None:
            row = db.execute(
                "SELECT value FROM idempotency WHERE key_hash = ? AND expires_at > ?",
                (idempotency.key_hash, time.time()),
            ).fetchone()
            if row is None:
                return None
            run_id, body_hash = parse_idempotency_value(row[0])
            return CreateOutcome(created=False, run_id=run_id, body_hash=body_hash)

        return await self._run(find)

    async def get_run(
        self, run_id: str, *, events_after: int | None = None, limit: int = 100
    ) -> RunState | None:
        def get(db: sqlite3.Connection) -> RunState | None:
            db.execute("BEGIN")
            try:
                run = self._live_run(db, run_id)
                if run is None:
                    return None
                raw, count, final_id = run
                events = (
                    self._events(db, run_id, events_after, limit)
                    if events_after is not None
                    else []
                )
            finally:
                db.execute("COMMIT")
            return RunState(
                record=RunRecord.model_validate_json(raw),
                raw=raw,
                last_event_id=count - 1,
                finalized=final_id is not None,
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

    async def update_run(self, record: RunRecord) -> None:
        def update(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            try:
                run = self._live_run(db, record.run_id)
                if run is None:
                    raise RunNotFound(f"run {record.run_id} does not exist")
                if run[2] is not None:
                    raise RunFinalized(f"run {record.run_id} already has its terminal event")
                db.execute(
                    "UPDATE runs SET record = ?, expires_at = ? WHERE run_id = ?",
                    (record.model_dump_json(), time.time() + self.ttl_seconds, record.run_id),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

        await self._run(update)

    async def append_event(
        self,
        run_id: str,
        event: RunEvent,
        *,
        record: RunRecord | None = None,
        nonce: str | None = None,
    ) -> int:
        return await self._append(run_id, event, record, nonce or uuid.uuid4().hex, expected=None)

    async def _append(
        self,
        run_id: str,
        event: RunEvent,
        record: RunRecord | None,
        nonce: str,
        *,
        expected: str | None,
    ) -> int:
        body = stored_event_json(event)
        record_json = record.model_dump_json() if record is not None else None
        terminal = is_terminal(event)

        def append(db: sqlite3.Connection) -> int:
            db.execute("BEGIN IMMEDIATE")
            try:
                prior = db.execute(
                    "SELECT id FROM events WHERE run_id = ? AND nonce = ?", (run_id, nonce)
                ).fetchone()
                if prior:
                    db.execute("COMMIT")
                    return int(prior[0])
                run = self._live_run(db, run_id)
                if run is None:
                    raise RunNotFound(f"run {run_id} does not exist")
                raw, event_id, final_id = run
                if final_id is not None:
                    raise RunFinalized(f"run {run_id} already has its terminal event")
                if expected is not None and raw != expected:
                    raise RunChanged(f"run {run_id} changed since it was read")
                db.execute(
                    "INSERT INTO events (run_id, id, body, nonce) VALUES (?, ?, ?, ?)",
                    (run_id, event_id, body, nonce),
                )
                db.execute(
                    "UPDATE runs SET event_count = ?, record = COALESCE(?, record),"
                    " final_id = ?, expires_at = ? WHERE run_id = ?",
                    (
                        event_id + 1,
                        record_json,
                        event_id if terminal else None,
                        time.time() + self.ttl_seconds,
                        run_id,
                    ),
                )
                db.execute("COMMIT")
                return int(event_id)
            except BaseException:
                db.execute("ROLLBACK")
                raise

        return await self._run(append)

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

    async def _append_if_unchanged(
        self, run_id: str, event: RunEvent, record: RunRecord, expected_raw: str
    ) -> int:
        return await self._append(run_id, event, record, uuid.uuid4().hex, expected=expected_raw)

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
