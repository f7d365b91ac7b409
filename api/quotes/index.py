"""POST /api/quotes: validate, admit, create the run, enqueue one message per provider (and one
for the run's deadline) on Vercel Queues, answer 202. No provider work runs here: the
queue-triggered worker (api/work.py) does it, as long as it takes."""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lib.admission import AdmissionPass, AdmissionRequest, DailyLimitReached, RateLimited
from lib.callers import Caller, CredentialsRefused, identify_caller
from lib.cancel_tokens import cancel_token
from lib.config import Settings
from lib.http import FunctionContext, Problem, function_app
from lib.logs import bind_log_context
from lib.store import CreateOutcome, IdempotencyClaim, StoreUnavailable
from lib.terms import ProviderId, new_run_id

MAX_BODY_BYTES = 16 * 1024
_JSON_MEDIA_TYPE = re.compile(r"application/(?:[\w.+-]+\+)?json", re.IGNORECASE)
log = logging.getLogger(__name__)
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
        where = (
            f" (line {error.lineno}, column {error.colno})"
            if isinstance(error, json.JSONDecodeError)
            else ""
        )
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


async def _admit(
    caller: Caller, claim: IdempotencyClaim | None, context: FunctionContext
) -> AdmissionPass:
    token = caller.token
    return await context.admission.admit(
        AdmissionRequest(
            address=caller.address,
            subject=caller.subject,
            token_id=token.jti if token else None,
            token_expires_at=token.expires_at if token else None,
            replay_tag=claim.key_hash if claim else "",
        ),
        time.time(),
    )


async def _give_back(admitted: AdmissionPass, context: FunctionContext) -> None:
    """Release what admission counted for a run that was not created; best effort."""
    try:
        await context.admission.release(admitted)
    except StoreUnavailable as error:
        log.warning("could not release an admission: %s", error)


def _allowed_providers(caller: Caller, settings: Settings) -> tuple[ProviderId, ...] | None:
    """The providers a start token limits its run to (None: no limit beyond the configured)."""
    if caller.token is None or caller.token.providers is None:
        return None
    allowed = tuple(p for p in settings.providers if p in caller.token.providers)
    if not allowed:
        raise CredentialsRefused("the start token allows none of the providers offered here")
    return allowed


def _accepted(run_id: str, settings: Settings, status_code: int) -> Response:
    """The run's 202 (or a replay's 200): where to follow it, and the token that cancels it."""
    from lib.models import RunAccepted

    accepted = RunAccepted.for_run(run_id, cancel_token(settings.secret, run_id))
    headers = {"Location": accepted.status_url, "Cache-Control": "no-store"}
    return JSONResponse(accepted.model_dump(mode="json"), status_code=status_code, headers=headers)


def _replay(outcome: CreateOutcome, claim: IdempotencyClaim | None, settings: Settings) -> Response:
    """The answer to a request whose Idempotency-Key already maps to a run."""
    if claim is not None and outcome.body_hash != claim.body_hash:
        raise Problem(
            422,
            "idempotency-key-reused",
            "Idempotency-Key reused",
            "This Idempotency-Key was already used with a different request body.",
        )
    return _accepted(outcome.run_id, settings, 200)


async def start_quote_run(request: Request, context: FunctionContext) -> Response:
    # Imported with the first request, not at cold start: the models (pydantic), their
    # validation and the workflow cost more to import than Starlette itself.
    from pydantic import ValidationError

    from lib.models import QuoteRequest, utc_now
    from lib.queue import QueueNotConfigured, QueueUnavailable, require_queue
    from lib.queue.dispatch import dispatch_run
    from lib.validation import validation_problem
    from lib.workflow import fail_run, new_run_record, run_deadline

    settings = context.settings
    caller = identify_caller(request, settings)
    allowed = _allowed_providers(caller, settings)
    _check_content_type(request)
    payload = _parse_json(await _read_body(request))
    key = _idempotency_key(request)
    try:
        quote_request = QuoteRequest.model_validate(
            payload, context={"providers": settings.providers, "allowed": allowed}
        )
    except ValidationError as error:
        raise validation_problem(error) from None

    claim = None
    if key is not None:
        # The caller's scope is part of the key: one caller's keys never reach another's runs.
        scoped_key = f"{caller.idempotency_scope}\0{key}"
        claim = IdempotencyClaim.for_request(
            scoped_key, quote_request.model_dump_json(), settings.secret
        )
    store = context.store
    try:
        admitted = await _admit(caller, claim, context)
    except (RateLimited, DailyLimitReached):
        # No new run may start now, but a replay of one that exists needs none.
        earlier = await store.find_idempotent_run(claim) if claim is not None else None
        if earlier is None:
            raise
        return _replay(earlier, claim, settings)
    run_id = new_run_id()
    providers = quote_request.selected_providers(allowed or settings.providers)
    now = utc_now()  # the run's creation, from which its deadline counts exactly
    record = new_run_record(run_id, quote_request, providers, run_deadline(settings, now), now=now)
    try:
        require_queue(settings)
        outcome = await store.create_run(record, claim)
    except BaseException:
        await _give_back(admitted, context)
        raise
    if not outcome.created:
        # A replay starts nothing: it does not count against any limit.
        await _give_back(admitted, context)
        return _replay(outcome, claim, settings)

    try:
        await dispatch_run(settings, run_id, providers, quote_request, record.deadline)
    except (QueueNotConfigured, QueueUnavailable):
        # No run may stay processing with no work behind it, count against a limit, or keep
        # its Idempotency-Key: a retry starts afresh.
        await fail_run(store, run_id, "internal")
        if claim is not None:
            await store.release_idempotency(claim, run_id)
        await _give_back(admitted, context)
        raise
    bind_log_context(runId=run_id)
    log.info(
        "run started: %d providers on %s",
        len(providers),
        settings.quote_source,
        extra={
            "kind": "run_started",
            "providers": list(providers),
            "source": settings.quote_source,
            "deadline": record.deadline.isoformat(),
        },
    )
    return _accepted(outcome.run_id, settings, 202)


app = function_app(start_quote_run, methods=("POST",))
