"""The quotes API over HTTP as the in-process tests speak it: a valid request body, a
problem+json answer checked, an SSE body's events, and a client address of its own."""

from __future__ import annotations

import copy
import ipaddress
import json
import uuid
from typing import Any

import httpx

from lib.models import EXAMPLE_QUOTE_REQUEST

# The documented example request (openapi.json's), a copy of its own for the tests to vary.
VALID: dict[str, Any] = copy.deepcopy(EXAMPLE_QUOTE_REQUEST)


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["title"] and body["detail"] and body["type"]
    return body


def sse_events(text: str) -> list[dict[str, Any]]:
    return [
        json.loads(line.removeprefix("data: "))
        for line in text.splitlines()
        if line.startswith("data: ")
    ]


def random_ipv6() -> str:
    return str(ipaddress.IPv6Address(b"\x20\x01\x0d\xb8" + uuid.uuid4().bytes[:12]))
