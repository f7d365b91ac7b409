"""GET /api/quotes/{runId}: the run's current state, and with ?since=N the events after N, for
clients that poll instead of streaming. Finalizes a run whose worker is gone.

DELETE /api/quotes/{runId}: cancel the run, with the cancel token its POST gave. The run ends
`cancelled` at once (one fenced write, the quotes so far kept); its agent runs still going are
cancelled after the answer, in the same invocation."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import TYPE_CHECKING

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lib.cancel_tokens import bearer_token, is_cancel_token
from lib.http import FunctionContext, Problem, function_app, run_id_from, run_not_found
from lib.replay_cache import NO_STORE, finished_headers, matches, not_modified
from lib.staleness import finalize_if_lost
from lib.store import RunState
from lib.terms import is_run_id, percent

if TYPE_CHECKING:
    from lib.models import RunRecord, RunSnapshot

DEFAULT_LIMIT, MAX_LIMIT = 100, 1000
_INTEGER = re.compile(r"-?[0-9]{1,16}")


def _integer_param(request: Request, name: str, *, minimum: int, maximum: int) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    # ASCII digits only: int() alone would take "1_0", " 7" and other scripts' digits.
    value = int(raw) if _INTEGER.fullmatch(raw) else minimum - 1
    if not minimum <= value <= maximum:
        raise Problem(
            400,
            "invalid-query-parameter",
            "Invalid query parameter",
            f"{name} must be an integer from {minimum} to {maximum}.",
        )
    return value


def snapshot(state: RunState, ttl_seconds: int, *, with_events: bool) -> RunSnapshot:
    # Imported on first use: the models (pydantic) cost more to import than Starlette itself.
    from lib.models import Progress, RunSnapshot

    record = state.record
    total = len(record.providers)
    # Keys get the TTL at creation and again with the terminal event (lib/store/kv.py).
    last_write = record.ended_at or record.created_at
    return RunSnapshot(
        run_id=record.run_id,
        status=record.status,
        created_at=record.created_at,
        updated_at=record.updated_at,
        expires_at=last_write + timedelta(seconds=ttl_seconds),
        progress=Progress(
            completed=record.completed, total=total, percent=percent(record.completed, total)
        ),
        providers=record.providers,
        quotes=record.quotes,
        last_event_id=state.last_event_id,
        stream_url=f"/api/quotes/{record.run_id}/stream",
        priced=record.priced,
        error=record.error,
        events=[e.as_dict() for e in state.events] if with_events else None,
    )


async def get_quote_run(request: Request, context: FunctionContext) -> Response:
    run_id = run_id_from(request)
    if run_id is None or not is_run_id(run_id):
        raise run_not_found()
    since = _integer_param(request, "since", minimum=-1, maximum=2**53)
    limit = _integer_param(request, "limit", minimum=1, maximum=MAX_LIMIT) or DEFAULT_LIMIT
    store = context.store
    state = await store.get_run(run_id, events_after=since, limit=limit)
    if state is None:
        raise run_not_found()
    if not state.finalized and await finalize_if_lost(store, state):
        state = await store.get_run(run_id, events_after=since, limit=limit)
        if state is None:
            raise run_not_found()
    body = snapshot(state, context.settings.run_ttl_seconds, with_events=since is not None)
    response = JSONResponse(body.model_dump(mode="json", exclude_none=True), headers=NO_STORE)
    if state.finalized:
        # Unchanging until it expires: the CDN may serve repeats, a revalidation gets a 304.
        from lib.models import utc_now

        headers = finished_headers(bytes(response.body), body.expires_at, utc_now())
        if "ETag" in headers and matches(request, headers["ETag"]):
            return not_modified(headers)
        response.headers.update(headers)
    return response


def _check_cancel_token(request: Request, run_id: str, secret: bytes) -> None:
    token = bearer_token(request.headers.get("authorization"))
    if token is None:
        raise Problem(
            401,
            "cancel-token-required",
            "Cancel token required",
            "Cancelling a run needs Authorization: Bearer <the cancelToken its POST returned>.",
            headers={"WWW-Authenticate": 'Bearer realm="quotes"'},
        )
    if not is_cancel_token(secret, run_id, token):
        raise Problem(
            401,
            "cancel-token-refused",
            "Cancel token refused",
            "The Bearer credential is not this run's cancel token.",
            headers={"WWW-Authenticate": 'Bearer realm="quotes", error="invalid_token"'},
        )


async def cancel_quote_run(request: Request, context: FunctionContext) -> Response:
    from lib.workflow import cancel_run, free_agent_slots, stop_agent_runs

    run_id = run_id_from(request)
    if run_id is None or not is_run_id(run_id):
        raise run_not_found()
    # Before storage: without the token nobody learns whether the run exists.
    _check_cancel_token(request, run_id, context.settings.secret)
    cancelled = await cancel_run(context.store, run_id)
    if cancelled is None:
        raise run_not_found()
    if cancelled.state.record.status != "cancelled":
        raise Problem(
            409,
            "run-already-ended",
            "Run already ended",
            f"The quote run had already ended ({cancelled.state.record.status}).",
        )
    body = snapshot(cancelled.state, context.settings.run_ttl_seconds, with_events=False)
    ended = cancelled.ended

    async def stop_agents(ended: RunRecord) -> None:
        await stop_agent_runs(context.source, ended)
        await free_agent_slots(context.store, ended, context.settings.tinyfish_max_concurrency)

    # After the answer, in this invocation: the 200 need not wait on the agent API.
    background = BackgroundTask(stop_agents, ended) if ended is not None else None
    return JSONResponse(
        body.model_dump(mode="json", exclude_none=True),
        headers={"Cache-Control": "no-store"},
        background=background,
    )


async def quote_run(request: Request, context: FunctionContext) -> Response:
    if request.method == "DELETE":
        return await cancel_quote_run(request, context)
    return await get_quote_run(request, context)


app = function_app(quote_run, methods=("GET", "DELETE"))
