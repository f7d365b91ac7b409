"""The run store: one interface in the language of runs and events, two backends.

- `KVStore` (lib/store/kv.py): Vercel KV / Upstash Redis over its REST API, push delivery
  (its watch in lib/store/kv_watch.py).
- `SQLiteStore` (lib/store/sqlite.py): one WAL-mode file shared by local processes, polled.

`open_store(settings)` picks one from the configuration; each backend is imported only when it
is chosen. There is deliberately no in-process store: per-instance memory is the bug this
project exists to avoid.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lib.store.base import (
    CreateOutcome,
    EventWatch,
    IdempotencyClaim,
    OutcomeWritten,
    ProviderClaim,
    RunState,
    Store,
    StoredEvent,
)
from lib.store.errors import (
    LeaseLost,
    OutcomesChanged,
    RunFinalized,
    RunNotFound,
    StoreError,
    StoreNotConfigured,
    StoreUnavailable,
)

if TYPE_CHECKING:
    from lib.config import Settings

__all__ = [
    "CreateOutcome",
    "EventWatch",
    "IdempotencyClaim",
    "LeaseLost",
    "OutcomeWritten",
    "OutcomesChanged",
    "ProviderClaim",
    "RunFinalized",
    "RunNotFound",
    "RunState",
    "Store",
    "StoreError",
    "StoreNotConfigured",
    "StoreUnavailable",
    "StoredEvent",
    "open_store",
]


def open_store(settings: Settings) -> Store:
    """The configured backend: KV when credentials are set; the embedded SQLite file locally;
    never a per-instance fallback on a Vercel deployment."""
    if settings.kv is not None:
        from lib.store.kv import KVStore

        return KVStore(
            settings.kv.url,
            settings.kv.token,
            ttl_seconds=settings.run_ttl_seconds,
            silence_seconds=settings.run_lease_seconds / 3 + 1,
        )
    if settings.on_vercel_deployment:
        raise StoreNotConfigured(
            "No KV store is linked to this deployment. Link a Vercel KV (Upstash Redis) store "
            "to the project so KV_REST_API_URL and KV_REST_API_TOKEN are set, then redeploy."
        )
    from lib.store.sqlite import SQLiteStore

    return SQLiteStore(settings.db_path, ttl_seconds=settings.run_ttl_seconds)
