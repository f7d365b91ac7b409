"""HTTP caching of a finished run's snapshot: it never changes until the run expires, so it
carries a strong ETag and lets Vercel's CDN keep it (`s-maxage`, which the CDN consumes and
browsers never see) until then; `If-None-Match` answers 304. A running run stays no-store."""

from __future__ import annotations

import hashlib
from datetime import datetime

from starlette.requests import Request
from starlette.responses import Response

NO_STORE = {"Cache-Control": "no-store"}
# Vercel's CDN keeps a response from 1 s to a year.
_MAX_SHARED_SECONDS = 31_536_000


def strong_etag(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def finished_headers(body: bytes, expires_at: datetime, now: datetime) -> dict[str, str]:
    """A finished run's cache headers: shared caches until the run expires, browsers
    revalidating each time (with the ETag, a 304)."""
    seconds = min(int((expires_at - now).total_seconds()), _MAX_SHARED_SECONDS)
    if seconds < 1:
        return dict(NO_STORE)  # about to expire: a cached copy would outlive the run
    return {
        "Cache-Control": f"public, max-age=0, s-maxage={seconds}",
        "ETag": strong_etag(body),
    }


def matches(request: Request, etag: str) -> bool:
    """Whether If-None-Match names `etag` (the weak comparison RFC 9110 asks of it)."""
    header = request.headers.get("if-none-match")
    if header is None:
        return False
    tags = {tag.strip().removeprefix("W/") for tag in header.split(",")}
    return "*" in tags or etag in tags


def not_modified(headers: dict[str, str]) -> Response:
    return Response(status_code=304, headers=headers)
