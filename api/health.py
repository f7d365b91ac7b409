"""GET /api/health: can this deployment run quotes? One cheap storage command, whether a queue
is configured, and which quote source is active; 200, or a 503 problem naming what is missing.
Never a secret: store and queue are named by kind, not by URL or token."""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lib.http import FunctionContext, Problem, function_app
from lib.store import StoreNotConfigured, StoreUnavailable

log = logging.getLogger(__name__)


async def report_health(request: Request, context: FunctionContext) -> Response:
    settings = context.settings
    missing: list[str] = []
    retry_after: int | None = None
    store_name = None
    try:
        store = context.store
        store_name = store.name
        await store.ping()
    except StoreNotConfigured as error:
        missing.append(str(error))
    except StoreUnavailable as error:
        missing.append(f"Storage ({store_name}) does not answer: {error}.")
        retry_after = error.retry_after
    if settings.queue_backend is None:
        missing.append(
            "No queue is configured: deploy on Vercel (Vercel Queues), or set "
            "VERCEL_QUEUE_BASE_URL to a local queue."
        )
    if missing:
        log.warning("not ready to run quotes: %s", " ".join(missing))
        raise Problem(
            503,
            "not-ready",
            "Not ready to run quotes",
            " ".join(missing),
            headers={"Retry-After": str(retry_after)} if retry_after else None,
        )
    # Imported on first use: the models (pydantic) cost more to import than Starlette itself.
    from lib.models import HealthReport

    report = HealthReport.model_validate(
        {"store": store_name, "queue": settings.queue_backend, "source": settings.quote_source}
    )
    return JSONResponse(report.model_dump(mode="json"), headers={"Cache-Control": "no-store"})


app = function_app(report_health, methods=("GET",))
