"""A quote run from start to its one terminal event (the finalization of runs whose worker is
gone is in lib/staleness.py).

The workflow runs in the invocation that created the run (after its 202). It is the run's only
writer: it keeps the record in memory, and every append carries the updated record with it, so
record and events never disagree. Anything it writes after the run was finalized elsewhere is
refused by the store's fence, and it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

from lib.config import Settings
from lib.models import (
    PROVIDER_NAMES,
    ActivityEvent,
    CompleteEvent,
    ErrorEvent,
    ErrorInfo,
    ProgressEvent,
    ProviderErrorEvent,
    ProviderId,
    ProviderState,
    QuoteEvent,
    QuoteRequest,
    RunErrorCode,
    RunEvent,
    RunRecord,
    StartedEvent,
    percent,
    utc_now,
)
from lib.providers.base import ProviderError, QuoteSource
from lib.providers.retry import quote_with_retries
from lib.staleness import RUN_ERROR_MESSAGES, failed_record
from lib.store import RunFinalized, RunNotFound, Store, StoreUnavailable

log = logging.getLogger(__name__)

# Insurers quoted at once; all five by default.
MAX_CONCURRENT_PROVIDERS = 5
# Longest a stored write is retried while storage is unavailable.
STORE_RETRY_SECONDS = 30.0
ACTIVITY_MAX_CHARS = 280


def new_run_record(
    run_id: str, request: QuoteRequest, providers: list[ProviderId], deadline: datetime
) -> RunRecord:
    now = utc_now()
    return RunRecord(
        run_id=run_id,
        created_at=now,
        updated_at=now,
        heartbeat_at=now,
        deadline=deadline,
        coverage=request.coverage,
        providers=[ProviderState(provider=p) for p in providers],
    )


def run_deadline(settings: Settings, invocation_deadline: datetime | None) -> datetime:
    """The invocation's deadline less 5 s, or createdAt + RUN_MAX_SECONDS where there is none."""
    if invocation_deadline is not None:
        return invocation_deadline - timedelta(seconds=5)
    return utc_now() + timedelta(seconds=settings.run_max_seconds)


class QuoteRun:
    """Runs the selected providers concurrently and ends the run with exactly one terminal event."""

    # First wait before retrying a write storage refused; it doubles up to 5 s.
    store_retry_delay = 0.5

    def __init__(
        self,
        store: Store,
        source: QuoteSource,
        settings: Settings,
        request: QuoteRequest,
        record: RunRecord,
    ) -> None:
        self._store = store
        self._source = source
        self._settings = settings
        self._request = request
        self._record = record
        self._lock = asyncio.Lock()
        self._last_write = time.monotonic()
        self._fenced = False

    @property
    def run_id(self) -> str:
        return self._record.run_id

    async def run(self) -> None:
        work = asyncio.create_task(self._run_to_end())
        heartbeat = asyncio.create_task(self._heartbeat(work))
        try:
            await work
        except asyncio.CancelledError:
            if not self._fenced:
                raise
            log.info("run %s was finalized elsewhere; this worker stopped", self.run_id)
        except RunFinalized:
            # Finalized elsewhere (a reader judged this worker lost): stop asking providers.
            log.info("run %s was finalized elsewhere; this worker stops", self.run_id)
        except (StoreUnavailable, RunNotFound) as error:
            # Readers finalize the run as worker_lost once its heartbeat is older than the lease.
            log.error("run %s abandoned: %s", self.run_id, error)
        except Exception:
            log.exception("run %s failed unexpectedly", self.run_id)
            with contextlib.suppress(RunFinalized, StoreUnavailable, RunNotFound):
                await self._fail("internal")
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat

    async def _run_to_end(self) -> None:
        providers = [p.provider for p in self._record.providers]
        await self._emit(_unchanged, StartedEvent(providers=providers, total=len(providers)))
        remaining = (self._record.deadline - utc_now()).total_seconds()
        try:
            async with asyncio.timeout(max(remaining, 0)):
                await self._quote_all(providers)
        except TimeoutError:
            await self._fail("deadline_exceeded")
            return
        await self._complete()

    async def _quote_all(self, providers: list[ProviderId]) -> None:
        gate = asyncio.Semaphore(MAX_CONCURRENT_PROVIDERS)
        try:
            async with asyncio.TaskGroup() as group:
                for provider in providers:
                    group.create_task(self._quote_one(provider, gate))
        except ExceptionGroup as failures:
            # One failure is enough to stop the run; the first says why.
            raise failures.exceptions[0] from None

    async def _quote_one(self, provider: ProviderId, gate: asyncio.Semaphore) -> None:
        async with gate:
            name = PROVIDER_NAMES[provider]
            await self._activity(provider, f"Starting {name} quote", status="running")

            async def report(message: str) -> None:
                await self._activity(provider, message)

            try:
                quote = await quote_with_retries(
                    self._source,
                    self._request,
                    provider,
                    report,
                    timeout_seconds=self._settings.provider_timeout_seconds,
                )
            except ProviderError as error:
                info = ErrorInfo(code=error.code, message=error.message)
                await self._emit_outcome(
                    lambda r: _with_provider(r, provider, status="failed", error=info),
                    ProviderErrorEvent(
                        provider=provider,
                        code=error.code,
                        message=error.message,
                        retryable=error.retryable,
                    ),
                )
            else:
                await self._emit_outcome(
                    lambda r: _with_provider(r, provider, status="quoted", quote=quote),
                    QuoteEvent(provider=provider, quote=quote),
                )

    async def _activity(
        self, provider: ProviderId, message: str, *, status: str | None = None
    ) -> None:
        text = " ".join(message.split())[:ACTIVITY_MAX_CHARS] or "Working"
        changes: dict[str, object] = {"last_activity": text}
        if status is not None:
            changes["status"] = status
        await self._emit(
            lambda r: _with_provider(r, provider, **changes),
            ActivityEvent(provider=provider, message=text),
        )

    async def _complete(self) -> None:
        def finish(record: RunRecord) -> RunRecord:
            return record.model_copy(update={"status": "completed"})

        quotes = self._record.quotes
        failed = [p.provider for p in self._record.providers if p.status == "failed"]
        best = quotes[0].provider if quotes else None
        await self._emit(finish, CompleteEvent(quotes=quotes, best=best, failed=failed))

    async def _fail(self, code: RunErrorCode) -> None:
        await self._emit(
            lambda r: failed_record(r, code),
            ErrorEvent(code=code, message=RUN_ERROR_MESSAGES[code]),
        )

    async def _emit(self, change: Callable[[RunRecord], RunRecord], event: RunEvent) -> None:
        async with self._lock:
            await self._append(change, event)

    async def _emit_outcome(
        self, change: Callable[[RunRecord], RunRecord], event: RunEvent
    ) -> None:
        """A provider's quote or error, then the run's progress, with no write in between: two
        providers finishing at once still count 1, 2 and never 2, 2."""
        async with self._lock:
            await self._append(change, event)
            done, total = self._record.completed, len(self._record.providers)
            await self._append(
                _unchanged, ProgressEvent(completed=done, total=total, percent=percent(done, total))
            )

    async def _append(self, change: Callable[[RunRecord], RunRecord], event: RunEvent) -> None:
        """Append one event with the record it implies, as one atomic, fenced store write (the
        caller holds the lock, so ids follow the workflow's order). A write storage could not
        take is retried with the same nonce, so it lands exactly once."""
        now = utc_now()
        record = change(self._record).model_copy(update={"updated_at": now, "heartbeat_at": now})
        nonce = uuid.uuid4().hex
        give_up = time.monotonic() + STORE_RETRY_SECONDS
        delay = self.store_retry_delay
        while True:
            try:
                await self._store.append_event(self.run_id, event, record=record, nonce=nonce)
                break
            except StoreUnavailable:
                if time.monotonic() + delay > give_up:
                    raise
                log.warning("run %s: storage unavailable, retrying an append", self.run_id)
                await asyncio.sleep(delay * (1 + random.random() / 2))
                delay = min(delay * 2, 5.0)
        self._record = record
        self._last_write = time.monotonic()

    async def _heartbeat(self, work: asyncio.Task[None]) -> None:
        """Every append refreshes the heartbeat; when none came for lease/3, write one. A refused
        heartbeat means the run was finalized elsewhere: the work is cancelled."""
        interval = self._settings.run_lease_seconds / 3
        while True:
            await asyncio.sleep(max(0.0, self._last_write + interval - time.monotonic()))
            async with self._lock:
                if time.monotonic() - self._last_write < interval:
                    continue
                record = self._record.model_copy(update={"heartbeat_at": utc_now()})
                try:
                    await self._store.update_run(record)
                except StoreUnavailable:
                    log.warning("run %s: heartbeat failed; retrying soon", self.run_id)
                    self._last_write = time.monotonic() - interval * 0.75
                    continue
                except (RunFinalized, RunNotFound):
                    self._fenced = True
                    work.cancel()
                    return
                self._record = record
                self._last_write = time.monotonic()


def _unchanged(record: RunRecord) -> RunRecord:
    return record


def _with_provider(record: RunRecord, provider: ProviderId, **changes: object) -> RunRecord:
    return record.model_copy(
        update={
            "providers": [
                p.model_copy(update=changes) if p.provider == provider else p
                for p in record.providers
            ]
        }
    )
