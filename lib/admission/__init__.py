"""Request admission: whether a caller may start a run now — the per-address rate limit (a
sliding minute), the daily spend ceiling (per caller and in total) and start tokens' single use.
Not part of the run `Store`: it guards run creation and shares only the storage.

- `KVAdmission` (lib/admission/kv.py): one Lua script per admission on Vercel KV.
- `SQLiteAdmission` (lib/admission/sqlite.py): the same decision in one transaction, on the
  embedded store's file.

`open_admission(settings, store)` picks the one beside the configured store; on KV it shares the
store's REST client (one connection pool per instance).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lib.admission.base import Admission, AdmissionPass, AdmissionRequest, Limits
from lib.admission.errors import AdmissionRefused, DailyLimitReached, RateLimited, StartTokenUsed
from lib.store.errors import StoreNotConfigured

if TYPE_CHECKING:
    from lib.config import Settings
    from lib.store import Store

__all__ = [
    "Admission",
    "AdmissionPass",
    "AdmissionRefused",
    "AdmissionRequest",
    "DailyLimitReached",
    "Limits",
    "RateLimited",
    "StartTokenUsed",
    "open_admission",
]


def open_admission(settings: Settings, store: Store | None = None) -> Admission:
    limits = Limits(
        per_minute=settings.rate_limit_per_minute,
        per_day=settings.runs_per_day,
        per_day_total=settings.runs_per_day_total,
    )
    if settings.kv is not None:
        from lib.admission.kv import KVAdmission
        from lib.store.kv import KVStore
        from lib.store.upstash import UpstashRest

        if isinstance(store, KVStore):
            return KVAdmission(store.rest, limits=limits, secret=settings.secret)
        rest = UpstashRest(settings.kv.url, settings.kv.token)
        return KVAdmission(rest, limits=limits, secret=settings.secret, owned=True)
    if settings.on_vercel_deployment:
        raise StoreNotConfigured(
            "No KV store is linked to this deployment. Link a Vercel KV (Upstash Redis) store "
            "to the project so KV_REST_API_URL and KV_REST_API_TOKEN are set, then redeploy."
        )
    from lib.admission.sqlite import SQLiteAdmission

    return SQLiteAdmission(settings.db_path, limits=limits, secret=settings.secret)
