"""HTTP plumbing every function under api/ shares: RFC 9457 problem responses, the mapping of
typed errors to statuses (in one place), CORS, the per-process context (settings, store, source),
and each request's log context.

`function_app(endpoint, methods=...)` turns one endpoint into the ASGI `app` a Vercel Python
function exports. Any exception the endpoint does not handle becomes a problem response; a
traceback never reaches a client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from lib.admission.errors import AdmissionRefused, DailyLimitReached, RateLimited, StartTokenUsed
from lib.callers import CredentialsRefused, CredentialsRequired, PaidDeploymentOpen
from lib.config import ConfigError, Settings, get_settings
from lib.logs import configure_logging, log_context
from lib.queue.errors import QueueNotConfigured, QueueUnavailable
from lib.store import RunNotFound, Store, StoreNotConfigured, StoreUnavailable, open_store
from lib.terms import is_run_id

if TYPE_CHECKING:
    from lib.admission import Admission
    from lib.models import FieldError, ProblemDetail
    from lib.providers.base import QuoteSource

log = logging.getLogger(__name__)

PROBLEM_BASE = "https://quotes.dev/problems/"


class Problem(Exception):
    """An error answered as an RFC 9457 problem detail."""

    def __init__(
        self,
        status: int,
        slug: str,
        title: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        errors: list[FieldError] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.title = title
        self.detail = detail
        self.headers = headers or {}
        self.errors = errors

    def problem_detail(self) -> ProblemDetail:
        # Imported when a problem is answered: pydantic costs more to import than Starlette.
        from lib.models import ProblemDetail

        return ProblemDetail(
            type=PROBLEM_BASE + self.slug,
            title=self.title,
            status=self.status,
            detail=self.detail,
            errors=self.errors,
        )

    def response(self) -> Response:
        return JSONResponse(
            self.problem_detail().model_dump(mode="json", exclude_none=True),
            status_code=self.status,
            headers={"Cache-Control": "no-store", **self.headers},
            media_type="application/problem+json",
        )


def run_not_found() -> Problem:
    return Problem(404, "run-not-found", "Quote run not found", "No such quote run, or it expired.")


def problem_for(error: Exception) -> Problem:
    """The one place typed errors become HTTP statuses."""
    match error:
        case Problem():
            return error
        case RunNotFound():
            return run_not_found()
        case StoreNotConfigured():
            return Problem(503, "storage-not-configured", "Storage is not configured", str(error))
        case StoreUnavailable():
            headers = {"Retry-After": str(error.retry_after)} if error.retry_after else {}
            return Problem(
                503,
                "storage-unavailable",
                "Storage is unavailable",
                "The run store could not be reached; try again shortly.",
                headers=headers,
            )
        case QueueNotConfigured():
            return Problem(
                503, "queue-not-configured", "The work queue is not configured", str(error)
            )
        case QueueUnavailable():
            return Problem(
                503,
                "queue-unavailable",
                "The work queue is unavailable",
                "The quote run could not be queued; try again shortly.",
                headers={"Retry-After": "5"},
            )
        case CredentialsRequired():
            return Problem(
                401,
                "credentials-required",
                "Credentials required",
                "Starting a quote run here needs Authorization: Bearer <API key or start token>.",
                headers={"WWW-Authenticate": 'Bearer realm="quotes"'},
            )
        case CredentialsRefused():
            return Problem(
                401,
                "credentials-refused",
                "Credentials refused",
                f"The Bearer credential was refused: {error}.",
                headers={"WWW-Authenticate": 'Bearer realm="quotes", error="invalid_token"'},
            )
        case StartTokenUsed():
            return Problem(
                401,
                "start-token-used",
                "Start token already used",
                "This start token already started a run; ask for a new one.",
                headers={"WWW-Authenticate": 'Bearer realm="quotes", error="invalid_token"'},
            )
        case RateLimited() | DailyLimitReached():
            slug = "rate-limited" if isinstance(error, RateLimited) else "daily-limit-reached"
            title = (
                "Too many quote runs" if isinstance(error, RateLimited) else "Runs spent for today"
            )
            headers = {"Retry-After": str(error.retry_after)} if error.retry_after else {}
            return Problem(429, slug, title, str(error), headers=headers)
        case PaidDeploymentOpen():
            return Problem(503, "paid-deployment-open", "Starting runs is not enabled", str(error))
        case ConfigError():
            return Problem(503, "misconfigured", "The service is misconfigured", str(error))
        case _:
            return Problem(
                500, "internal-error", "Internal error", "The server failed to handle the request."
            )


@dataclass(slots=True)
class FunctionContext:
    """What one function instance keeps between invocations: settings, and the store, admission
    and quote source clients (connection pools), bound to the event loop that created them."""

    settings: Settings
    _loop: asyncio.AbstractEventLoop | None = None
    _store: Store | None = None
    _source: QuoteSource | None = None
    _admission: Admission | None = None

    def _same_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop, self._store, self._source, self._admission = loop, None, None, None

    @property
    def store(self) -> Store:
        self._same_loop()
        if self._store is None:
            self._store = open_store(self.settings)
        return self._store

    @property
    def admission(self) -> Admission:
        self._same_loop()
        if self._admission is None:
            # Imported here: only the function that starts runs admits them.
            from lib.admission import open_admission

            self._admission = open_admission(self.settings, self.store)
        return self._admission

    @property
    def source(self) -> QuoteSource:
        self._same_loop()
        if self._source is None:
            # Imported here: only the function that starts runs needs a quote source.
            from lib.providers import build_quote_source

            self._source = build_quote_source(self.settings)
        return self._source


Endpoint = Callable[[Request, FunctionContext], Awaitable[Response]]


def invocation_deadline() -> datetime | None:
    """This invocation's deadline, where Vercel's Python runtime provides one."""
    try:
        from vercel_runtime import get_deadline
    except ImportError:
        return None
    deadline = get_deadline()
    return deadline if isinstance(deadline, datetime) else None


class function_app:
    """The ASGI app of one Vercel function: CORS, method check, errors as problem details."""

    def __init__(
        self, endpoint: Endpoint, *, methods: tuple[str, ...], settings: Settings | None = None
    ) -> None:
        self.endpoint = endpoint
        self.methods = methods
        self._settings = settings
        self._context: FunctionContext | None = None
        self._app: ASGIApp | None = None

    @property
    def context(self) -> FunctionContext:
        if self._context is None:
            self._context = FunctionContext(self._settings or get_settings())
        return self._context

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if self._app is None:
            configure_logging()
            self._app = self._build()
        await self._app(scope, receive, send)

    def _build(self) -> ASGIApp:
        try:
            origins = list(self.context.settings.cors_allow_origins)
        except ConfigError:
            origins = []
        return CORSMiddleware(
            self._handle,
            allow_origins=origins,
            allow_methods=[*self.methods, "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID"],
            expose_headers=["Location", "Retry-After", "WWW-Authenticate"],
            max_age=600,
        )

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        run_id = run_id_from(request)
        with log_context(
            runId=run_id if run_id and is_run_id(run_id) else None,
            vercelId=request.headers.get("x-vercel-id"),
        ):
            await self._respond(request, scope, receive, send)

    async def _respond(self, request: Request, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            if request.method not in self.methods:
                allow = ", ".join((*self.methods, "OPTIONS"))
                raise Problem(
                    405,
                    "method-not-allowed",
                    "Method not allowed",
                    f"{request.method} is not allowed here; use {' or '.join(self.methods)}.",
                    headers={"Allow": allow},
                )
            response = await self.endpoint(request, self.context)
        except Exception as error:
            if not isinstance(
                error,
                Problem | RunNotFound | CredentialsRequired | CredentialsRefused | AdmissionRefused,
            ):
                if isinstance(
                    error,
                    StoreUnavailable
                    | StoreNotConfigured
                    | ConfigError
                    | PaidDeploymentOpen
                    | QueueNotConfigured
                    | QueueUnavailable,
                ):
                    log.warning("%s %s: %s", request.method, request.url.path, error)
                else:
                    log.exception("unhandled error in %s %s", request.method, request.url.path)
            response = problem_for(error).response()
        await response(scope, receive, send)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def run_id_from(request: Request) -> str | None:
    """The run id: the `runId` query parameter Vercel's routing adds for `[runId]`, falling back
    to the path (/api/quotes/{runId} or /api/quotes/{runId}/stream)."""
    run_id = request.query_params.get("runId")
    if run_id:
        return run_id
    parts = [p for p in request.url.path.split("/") if p]
    if len(parts) >= 3 and parts[:2] == ["api", "quotes"]:
        return parts[2]
    return None
