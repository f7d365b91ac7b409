"""Why a run was not admitted; lib/http.py maps each to its status. (Storage faults are the
store's own StoreUnavailable: the admission counters live in the same storage.)"""

from __future__ import annotations


class AdmissionRefused(Exception):
    """The run may not start now; `retry_after` is the seconds until it may, if known."""

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimited(AdmissionRefused):
    """The client address started too many runs in the last minute (a sliding window)."""


class DailyLimitReached(AdmissionRefused):
    """The caller's, or the deployment's, runs for this UTC day are spent."""


class StartTokenUsed(AdmissionRefused):
    """The start token already started a run (and this is not an idempotent replay of it)."""
