"""GET /api/openapi.json (a vercel.json rewrite to this function): the API's OpenAPI 3.1
description, the committed openapi.json that `make openapi` generates from the models.
Read once per instance; served with the API's CORS and method handling."""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response

from lib.http import FunctionContext, function_app

DOCUMENT = (Path(__file__).resolve().parent.parent / "openapi.json").read_bytes()


async def describe_api(request: Request, context: FunctionContext) -> Response:
    return Response(
        DOCUMENT,
        media_type="application/json",
        headers={"Cache-Control": "public, max-age=300"},
    )


app = function_app(describe_api, methods=("GET",))
