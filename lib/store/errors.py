"""The store's typed errors; routes map each to an HTTP status in one place (lib/http.py)."""

from __future__ import annotations


class StoreError(Exception):
    """Base of the store's typed errors; routes map each to an HTTP status in one place."""


class StoreUnavailable(StoreError):
    """Storage could not be reached or answered with an error; retrying later can help."""

    def __init__(self, message: str, *, retry_after: int | None = 2) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StoreNotConfigured(StoreError):
    """Deployed on Vercel without a KV store linked: refusing beats a per-instance fallback."""


class RunNotFound(StoreError):
    """The run never existed or has expired."""


class RunFinalized(StoreError):
    """The run already has its terminal event; the write was refused by the fence."""


class OutcomesChanged(StoreError):
    """A provider's outcome landed after the caller read the run; the write was not made."""


class LeaseLost(StoreError):
    """The provider's lease is no longer this worker's: another delivery took it over."""
