"""The contract's plain terms: provider and run ids, the status and error-code vocabularies, the
timestamp format, and which events end a run. No pydantic here, so a function that only reads
runs imports these without paying for the models (lib/models.py re-exports every name)."""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime
from typing import Literal

ProviderId = Literal["geico", "progressive", "state_farm", "allstate", "liberty_mutual"]
PROVIDER_IDS: tuple[ProviderId, ...] = (
    "geico",
    "progressive",
    "state_farm",
    "allstate",
    "liberty_mutual",
)
PROVIDER_NAMES: dict[ProviderId, str] = {
    "geico": "GEICO",
    "progressive": "Progressive",
    "state_farm": "State Farm",
    "allstate": "Allstate",
    "liberty_mutual": "Liberty Mutual",
}
Coverage = Literal["minimum", "standard", "full"]
RunStatus = Literal["processing", "completed", "failed", "cancelled"]
ProviderStatus = Literal["pending", "running", "quoted", "failed", "cancelled"]
QuoteSourceName = Literal["tinyfish", "simulated"]
ProviderErrorCode = Literal[
    "provider_timeout",
    "provider_blocked",
    "provider_declined",
    "provider_bad_output",
    "provider_unavailable",
    "provider_auth",
]
RunErrorCode = Literal["worker_lost", "deadline_exceeded", "internal"]
TERMINAL_EVENT_TYPES = frozenset({"complete", "error", "cancelled"})

RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{22}")


def new_run_id() -> str:
    return secrets.token_urlsafe(16)


def is_run_id(value: str) -> bool:
    return RUN_ID_PATTERN.fullmatch(value) is not None


def utc_now() -> datetime:
    """Now, to the millisecond: the precision every timestamp is stored and sent with."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def format_time(value: datetime) -> str:
    """RFC 3339 UTC with milliseconds: 2026-11-28T14:03:07.412Z."""
    value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def percent(completed: int, total: int) -> int:
    return completed * 100 // total if total else 100
