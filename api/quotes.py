"""POST /api/quotes: validate, create the run, answer 202, then run the workflow to its end
within this same invocation (after the response, bounded by this function's maxDuration)."""

from __future__ import annotations

import json
import re
import time
from typing import Any

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lib.http import FunctionContext, Problem, function_app, invocation_deadline
from lib.store import IdempotencyClaim
from lib.terms import new_run_id

MAX_BODY_BYTES = 16 * 1024
RATE_WINDOW_SECONDS = 60
_JSON_MEDIA_TYPE = re.compile(r"application/(?:[\w.+-]+\+)?json", re.IGNORECASE)
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")


def _check_content_type(request: Request) -> None:
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip()
    if not _JSON_MEDIA_TYPE.fullmatch(media_type):
        raise Problem(
            415,
            "unsupported-media-type",
            "Unsupported media type",
            "Send the quote request as JSON with Content-Type: application/json.",
        )


def _too_large() -> Problem:
    return Problem(
        413,
        "payload-too-large",
        "Request body too large",
        f"The request body must be at most {MAX_BODY_BYTES} bytes.",
    )


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large()
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise _too_large()
    return bytes(body)


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        where = f" (line {error.lineno}, column {error.colno})" if hasattr(error, "lineno") else ""
        raise Problem(
            400, "malformed-json", "Malformed JSON", f"The request body is not valid JSON{where}."
        ) from None
    except RecursionError:
        raise Problem(
            400, "malformed-json", "Malformed JSON", "The request body is nested too deeply."
        ) from None


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not _IDEMPOTENCY_KEY.fullmatch(key):
        raise Problem(
            400,
            "invalid-idempotency-key",
            "Invalid Idempotency-Key",
            "Idempotency-Key must be 1 to 255 visible ASCII characters.",
        )
    return key


def client_key(request: Request) -> str:
    """Who is asking: the first X-Forwarded-For address Vercel's edge sets, else the peer."""
    forwarded = request.headers.get("x-forwarded-for", "").split(",")[0].strip()
    return forwarded or (request.client.host if request.client else "unknown")


async def _enforce_rate_limit(request: Request, context: FunctionContext) -> None:
    limit = context.settings.rate_limit_per_minute
    if limit <= 0:
        return
    count = await context.store.count_request(client_key(request), RATE_WINDOW_SECONDS)
    if count > limit:
        retry_after = RATE_WINDOW_SECONDS - int(time.time()) % RATE_WINDOW_SECONDS
        raise Problem(
            429,
            "rate-limited",
            "Too many quote runs",
            f"At most {limit} quote runs a minute may be started from one address.",
            headers={"Retry-After": str(retry_after)},
        )


async def start_quote_run(request: Request, context: FunctionContext) -> Response:
    # Imported with the first request, not at cold start: the models (pydantic), their
    # validation and the workflow cost more to import than Starlette itself.
    from pydantic import ValidationError

    from lib.models import QuoteRequest, RunAccepted
    from lib.validation import validation_problem
    from lib.workflow import QuoteRun, new_run_record, run_deadline

    _check_content_type(request)
    payload = _parse_json(await _read_body(request))
    key = _idempotency_key(request)
    settings = context.settings
    try:
        quote_request = QuoteRequest.model_validate(
            payload, context={"providers": settings.providers}
        )
    except ValidationError as error:
        raise validation_problem(error) from None

    store = context.store
    await _enforce_rate_limit(request, context)
    run_id = new_run_id()
    providers = quote_request.selected_providers(settings.providers)
    record = new_run_record(
        run_id, quote_request, providers, run_deadline(settings, invocation_deadline())
    )
    claim = None
    if key is not None:
        claim = IdempotencyClaim.for_request(key, quote_request.model_dump_json(), settings.secret)
    outcome = await store.create_run(record, claim)
    accepted = RunAccepted.for_run(outcome.run_id)
    headers = {"Location": accepted.status_url, "Cache-Control": "no-store"}
    if not outcome.created:
        if claim is not None and outcome.body_hash != claim.body_hash:
            raise Problem(
                422,
                "idempotency-key-reused",
                "Idempotency-Key reused",
                "This Idempotency-Key was already used with a different request body.",
            )
        return JSONResponse(accepted.model_dump(mode="json"), status_code=200, headers=headers)

    workflow = QuoteRun(store, context.source, settings, quote_request, record)
    return JSONResponse(
        accepted.model_dump(mode="json"),
        status_code=202,
        headers=headers,
        background=BackgroundTask(workflow.run),
    )


app = function_app(start_quote_run, methods=("POST",))
