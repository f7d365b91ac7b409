"""GET /api/openapi.json (a vercel.json rewrite to this function): the API's OpenAPI 3.1
description, the committed openapi.json that `make openapi` generates from the models (bundled
with this function by its `includeFiles`). Read with the first request and kept per instance;
served with the API's CORS and method handling. A bundle without the file answers a 503
problem that says so, instead of an instance that cannot start."""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response

from lib.http import FunctionContext, Problem, function_app

DOCUMENT_PATH = Path(__file__).resolve().parent.parent / "openapi.json"

log = logging.getLogger(__name__)


@cache
def _document(path: Path) -> bytes:
    return path.read_bytes()


async def describe_api(request: Request, context: FunctionContext) -> Response:
    try:
        document = _document(DOCUMENT_PATH)
    except OSError as error:
        log.error("the OpenAPI document cannot be read: %s", error.strerror or error)
        raise Problem(
            503,
            "openapi-unavailable",
            "API description unavailable",
            "This deployment was built without its openapi.json (see vercel.json includeFiles).",
        ) from None
    return Response(
        document,
        media_type="application/json",
        headers={"Cache-Control": "public, max-age=300"},
    )


app = function_app(describe_api, methods=("GET",))
