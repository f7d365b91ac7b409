"""Opening the embedded SQLite file, shared by the run store and admission.

Several processes (the `make dev` host's function instances) open one file at once. Switching a
fresh file to WAL needs an exclusive lock, and two connections that both hold a shared lock
while asking for it deadlock; SQLite sees that and answers "database is locked" at once, without
calling the busy handler that `timeout` installs. So the switch is retried here, within the
same time budget, and skipped when the file is already in WAL mode (reading the mode needs no
write lock).
"""

from __future__ import annotations

import os
import random
import sqlite3
import time

BUSY_TIMEOUT_SECONDS = 10.0


def open_wal_database(
    path: str, *, busy_timeout: float = BUSY_TIMEOUT_SECONDS
) -> sqlite3.Connection:
    """An autocommit connection to the file at `path` (its folder made if missing), in WAL mode."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    db = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    try:
        _switch_to_wal(db, time.monotonic() + busy_timeout)
        db.execute("PRAGMA synchronous=NORMAL")
    except BaseException:
        db.close()
        raise
    return db


def _switch_to_wal(db: sqlite3.Connection, deadline: float) -> None:
    delay = 0.002
    while True:
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if not is_busy(error) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay * (1 + random.random()))  # jittered: the racers must not retry in step
        delay = min(delay * 2, 0.1)


def is_busy(error: sqlite3.Error) -> bool:
    """Whether `error` is lock contention (worth waiting out) rather than a broken file."""
    primary = getattr(error, "sqlite_errorcode", 0) & 0xFF  # extended codes keep it in the low byte
    return primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
