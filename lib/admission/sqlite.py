"""Admission on the embedded SQLite file (the run store's file, tables of its own): the same
decision as the KV script (`judge`), made and counted inside one IMMEDIATE transaction, so
processes sharing the file admit exactly as KV does."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from lib.admission.base import Admission, AdmissionKeys, Counts, Limits, Verdict, judge
from lib.store.errors import StoreUnavailable
from lib.store.sqlite_file import open_wal_database

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS admission_counts (
    key        TEXT PRIMARY KEY,
    count      INTEGER NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS admission_tokens (
    key        TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    expires_at REAL NOT NULL
);
"""
_PURGE_EVERY_SECONDS = 60.0


class SQLiteAdmission(Admission):
    name = "sqlite"

    def __init__(self, path: str, *, limits: Limits, secret: bytes) -> None:
        super().__init__(limits, secret)
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-admission")
        self._db: sqlite3.Connection | None = None
        self._last_purge = 0.0

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            db = open_wal_database(self.path)
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    async def _run(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            db = self._connect()
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    result = operation(db)
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
                return result
            except sqlite3.Error as error:
                raise StoreUnavailable(f"the local store failed: {error}", retry_after=1) from None

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def _purge_expired(self, db: sqlite3.Connection, now: float) -> None:
        if now - self._last_purge < _PURGE_EVERY_SECONDS:
            return
        self._last_purge = now
        db.execute("DELETE FROM admission_counts WHERE expires_at <= ?", (now,))
        db.execute("DELETE FROM admission_tokens WHERE expires_at <= ?", (now,))

    async def _check_and_count(
        self, keys: AdmissionKeys, replay_tag: str
    ) -> tuple[Verdict, Counts]:
        limits = self.limits

        def check_and_count(db: sqlite3.Connection) -> tuple[Verdict, Counts]:
            now = time.time()
            self._purge_expired(db, now)

            def count(key: str | None) -> int:
                if key is None:
                    return 0
                row = db.execute(
                    "SELECT count FROM admission_counts WHERE key = ? AND expires_at > ?",
                    (key, now),
                ).fetchone()
                return int(row[0]) if row else 0

            token_value = None
            if keys.token is not None:
                row = db.execute(
                    "SELECT value FROM admission_tokens WHERE key = ? AND expires_at > ?",
                    (keys.token, now),
                ).fetchone()
                token_value = str(row[0]) if row else None
            counts = Counts(
                rate_current=count(keys.rate_current),
                rate_previous=count(keys.rate_previous),
                caller_day=count(keys.caller_day),
                total_day=count(keys.total_day),
                token_value=token_value,
            )
            verdict = judge(counts, keys, limits, replay_tag)
            if verdict != "admit":
                return verdict, counts
            writes = []
            if limits.per_minute > 0:
                writes.append((keys.rate_current, counts.rate_current, keys.rate_ttl_ms / 1000))
            if keys.caller_day is not None and limits.per_day > 0:
                writes.append((keys.caller_day, counts.caller_day, keys.day_ttl_seconds))
            if limits.per_day_total > 0:
                writes.append((keys.total_day, counts.total_day, keys.day_ttl_seconds))
            for key, before, ttl in writes:
                db.execute(
                    "INSERT INTO admission_counts VALUES (?, ?, ?) ON CONFLICT (key)"
                    " DO UPDATE SET count = excluded.count, expires_at = excluded.expires_at",
                    (key, before + 1, now + ttl),
                )
            if keys.token is not None:
                db.execute(
                    "INSERT INTO admission_tokens VALUES (?, ?, ?) ON CONFLICT (key)"
                    " DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
                    (keys.token, keys.token_value, now + keys.token_ttl_ms / 1000),
                )
            return verdict, counts

        return await self._run(check_and_count)

    async def _release(self, counted: tuple[str, ...], token_key: str | None) -> None:
        def release(db: sqlite3.Connection) -> None:
            for key in counted:
                db.execute(
                    "UPDATE admission_counts SET count = count - 1 WHERE key = ? AND count > 0",
                    (key,),
                )
            if token_key is not None:
                db.execute("DELETE FROM admission_tokens WHERE key = ?", (token_key,))

        await self._run(release)

    async def aclose(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await asyncio.get_running_loop().run_in_executor(self._executor, db.close)
        self._executor.shutdown(wait=False)
