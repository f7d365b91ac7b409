"""GET /api/quotes/{runId}/stream: the run's events as Server-Sent Events. Replays what came
after the client's cursor, then delivers live events until the terminal one, and closes on its
own before the invocation's deadline so the client reconnects, to any instance, with
Last-Event-ID."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Literal

from starlette.requests import Request
from starlette.responses import Response

from lib.config import Settings
from lib.http import (
    FunctionContext,
    Problem,
    function_app,
    invocation_deadline,
    run_id_from,
    run_not_found,
)
from lib.sse import KEEP_ALIVE, RETRY, EventStreamResponse, sse_frame
from lib.staleness import finalize_if_lost, next_lost_check
from lib.store import RunState, Store, StoreUnavailable
from lib.terms import is_run_id

KEEP_ALIVE_SECONDS = 15.0
# A stream ends this long before its invocation would be cut off.
DEADLINE_MARGIN_SECONDS = 5.0
# Where neither the invocation's deadline nor STREAM_MAX_SECONDS is known.
DEFAULT_STREAM_SECONDS = 280.0
# Staleness is checked at most this often, even while the run looks overdue.
MIN_CHECK_INTERVAL = 1.0
_CURSOR = re.compile(r"[0-9]{1,16}")  # ASCII digits only: \d and int() take any script's
CloseReason = Literal["terminal", "deadline", "client_left", "storage_error", "run_expired"]
log = logging.getLogger(__name__)


def _cursor(request: Request) -> int:
    header = request.headers.get("last-event-id", "").strip()
    query = request.query_params.get("lastEventId")
    # Both are checked, though the header wins: a malformed cursor is never silently ignored.
    # An empty header is no cursor (an EventSource whose last id is empty); an empty query
    # parameter is not an integer, as with ?since= on the snapshot.
    if query == "" or not all(_CURSOR.fullmatch(raw) for raw in (header, query) if raw):
        raise Problem(
            400,
            "invalid-last-event-id",
            "Invalid Last-Event-ID",
            "Last-Event-ID (or lastEventId) must be a non-negative integer event id.",
        )
    raw = header or query
    return int(raw) if raw else -1


def stream_close_time(settings: Settings) -> float:
    """time.time() at which the stream closes itself."""
    now = time.time()
    candidates = []
    deadline = invocation_deadline()
    if deadline is not None:
        candidates.append(deadline.timestamp() - DEADLINE_MARGIN_SECONDS)
    if settings.stream_max_seconds is not None:
        candidates.append(now + settings.stream_max_seconds)
    return min(candidates) if candidates else now + DEFAULT_STREAM_SECONDS


async def _run_events(
    store: Store, state: RunState, cursor: int, settings: Settings, close_at: float
) -> AsyncIterator[bytes]:
    run_id = state.record.run_id
    opened = time.monotonic()
    sent = 0
    # Whatever ends the stream without saying why (a cancel, a GeneratorExit) is the client leaving.
    reason: CloseReason = "client_left"
    log.info("stream opened", extra={"lastEventId": cursor})
    try:
        yield RETRY
        last_sent = time.monotonic()
        not_before = time.time() + MIN_CHECK_INTERVAL
        async with store.watch(run_id) as watch:
            while True:
                now = time.time()
                check_at = max(next_lost_check(state), not_before)
                keep_alive_at = last_sent + KEEP_ALIVE_SECONDS - time.monotonic() + now
                wake_at = min(close_at, check_at, keep_alive_at)
                events = await watch.next_events(cursor, timeout=max(0.0, wake_at - now))
                if events:
                    for event in events:
                        yield sse_frame(event)
                        sent += 1
                        cursor = event.id
                        if event.is_terminal:
                            reason = "terminal"
                            return
                    last_sent = time.monotonic()
                    continue
                now = time.time()
                if now >= close_at:
                    reason = "deadline"
                    return
                if time.monotonic() - last_sent >= KEEP_ALIVE_SECONDS:
                    yield KEEP_ALIVE
                    last_sent = time.monotonic()
                if now >= check_at:
                    fresh = await store.get_run(run_id, tail=0)
                    if fresh is None:
                        reason = "run_expired"
                        return
                    state = fresh
                    await finalize_if_lost(store, state)
                    not_before = time.time() + MIN_CHECK_INTERVAL
    except StoreUnavailable as error:
        # End the stream; the client reconnects after `retry` and resumes from its cursor.
        reason = "storage_error"
        log.warning("stream: storage unavailable: %s", error)
        return
    finally:
        log.info(
            "stream closed (%s) after %d events",
            reason,
            sent,
            extra={
                "closeReason": reason,
                "events": sent,
                "lastEventId": cursor,
                "seconds": round(time.monotonic() - opened, 3),
            },
        )


async def stream_quote_run(request: Request, context: FunctionContext) -> Response:
    run_id = run_id_from(request)
    if run_id is None or not is_run_id(run_id):
        raise run_not_found()
    cursor = _cursor(request)
    store = context.store
    state = await store.get_run(run_id, tail=0)
    if state is None:
        raise run_not_found()
    if not state.finalized and await finalize_if_lost(store, state):
        state = await store.get_run(run_id, tail=0) or state
    terminal = state.finalized or state.record.status != "processing"
    if terminal and state.last_event_id <= cursor:
        # Nothing more will come: 204 tells an EventSource to stop reconnecting.
        log.info("stream not opened: the run has ended", extra={"lastEventId": cursor})
        return Response(status_code=204, headers={"Cache-Control": "no-store"})
    close_at = stream_close_time(context.settings)
    return EventStreamResponse(_run_events(store, state, cursor, context.settings, close_at))


app = function_app(stream_quote_run, methods=("GET",))
