"""How TinyFish's failures map to our typed ProviderErrors: a finished run's
`error = {code, message, category, retry_after}`, and the HTTP status of a refused request.

- `category` decides: BILLING_FAILURE → provider_auth; AGENT_FAILURE → not retried, the message
  says why (a CAPTCHA in it → provider_blocked; the run's own max_duration or a timeout in it →
  provider_timeout); SYSTEM_FAILURE and UNKNOWN (and no category) → transient
  provider_unavailable, `retry_after` carried on the error.
- HTTP 401/403 → provider_auth; 402 → provider_auth (no credit); 429 → ProviderBusy (no room
  for a run now: wait TinyFish's Retry-After, header or body, whole seconds rounded up, else
  DEFAULT_BUSY_SECONDS); 408/5xx → transient provider_unavailable with Retry-After; any other
  4xx → provider_unavailable, not retried (the request itself is wrong).
- Free text from TinyFish is masked (`redact`) and clipped before it enters a message; of an
  HTTP error body only the machine-readable `error.code` is kept (free text may echo our goal).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from lib.models import PROVIDER_NAMES, ProviderId, utc_now
from lib.providers.base import (
    ProviderAgentFailed,
    ProviderAuth,
    ProviderBlocked,
    ProviderBusy,
    ProviderError,
    ProviderRequestRejected,
    ProviderRunCancelled,
    ProviderTimeout,
    ProviderUnavailable,
)
from lib.providers.tinyfish.result import BLOCKED_WORDS, MAX_REASON_CHARS, clip

_BILLING_WORDS = re.compile(
    r"insufficient (?:credit|funds|balance)|out of credit|no credits|credit limit|billing|quota",
    re.IGNORECASE,
)
_OUT_OF_TIME_WORDS = re.compile(
    r"max[_ ]duration|timed? ?out|time limit|took too long", re.IGNORECASE
)
_ERROR_CODE = re.compile(r"[A-Za-z0-9_.-]{1,48}")
# How long a 429 that names no wait is waited out.
DEFAULT_BUSY_SECONDS = 5


def error_from_failed_run(
    status: str, error: Any, provider: ProviderId, redact: Callable[[str], str]
) -> ProviderError:
    """The ProviderError for a run that ended FAILED or CANCELLED."""
    name = PROVIDER_NAMES[provider]
    if isinstance(error, dict):
        message = str(error.get("message") or "")
        raw_code = error.get("code")
        category = str(error.get("category") or "").upper()
        retry_after = error.get("retry_after")
    else:
        message = "" if error is None else str(error)
        raw_code, category, retry_after = None, "", None
    code = raw_code if isinstance(raw_code, str) and _ERROR_CODE.fullmatch(raw_code) else None
    detail = clip(redact(message), MAX_REASON_CHARS) if message else (code or "")
    suffix = f": {detail}" if detail else ""
    wait = (
        float(retry_after)
        if isinstance(retry_after, int | float)
        and not isinstance(retry_after, bool)
        and retry_after > 0
        else None
    )
    words = f"{message} {code or ''}"
    if category == "BILLING_FAILURE" or (
        category not in ("SYSTEM_FAILURE", "AGENT_FAILURE") and _BILLING_WORDS.search(words)
    ):
        return ProviderAuth(f"TinyFish refused the run for billing reasons{suffix}")
    if BLOCKED_WORDS.search(words):
        return ProviderBlocked(f"{name}'s site blocked the web agent{suffix}", retry_after=wait)
    if status != "CANCELLED" and _OUT_OF_TIME_WORDS.search(words):
        return ProviderTimeout(f"{name}'s web agent ran out of time{suffix}")
    if status == "CANCELLED":
        return ProviderRunCancelled(f"TinyFish's run for {name} was cancelled{suffix}")
    if category == "AGENT_FAILURE":
        why = suffix or ": TinyFish gave no reason"
        return ProviderAgentFailed(
            f"{name}'s web agent could not finish the quote{why}", retry_after=wait
        )
    return ProviderUnavailable(f"TinyFish's run for {name} failed{suffix}", retry_after=wait)


def retry_after_seconds(value: str | None) -> float | None:
    """An HTTP Retry-After header (seconds or a date) as seconds from now."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - utc_now()).total_seconds())


def busy_seconds(response: httpx.Response) -> int:
    """How long a 429 asks us to wait, in whole seconds rounded up (at least 1): Retry-After,
    else the body's `error.retry_after` (or `error.details.retry_after`), else the default."""
    wait = retry_after_seconds(response.headers.get("retry-after"))
    if wait is None:
        try:
            error = response.json().get("error")
        except (ValueError, AttributeError):
            error = None
        details = error.get("details") if isinstance(error, dict) else None
        for where in (error, details):
            value = where.get("retry_after") if isinstance(where, dict) else None
            if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
                wait = float(value)
                break
    return max(1, math.ceil(wait)) if wait is not None else DEFAULT_BUSY_SECONDS


def api_error_code(response: httpx.Response) -> str | None:
    """TinyFish's machine-readable `error.code` (free text is not kept: it may echo our input)."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) and _ERROR_CODE.fullmatch(code) else None


def error_from_response(
    response: httpx.Response, *, action: str = "the run request"
) -> ProviderError:
    """The ProviderError for a non-2xx answer from the agent API."""
    status = response.status_code
    code = api_error_code(response)
    what = f"HTTP {status}" + (f" {code}" if code else "")
    if status in (401, 403):
        return ProviderAuth(f"TinyFish refused our API key ({what})")
    if status == 402:
        return ProviderAuth(f"TinyFish account is out of credit ({what})")
    if status == 429:
        return ProviderBusy(
            f"TinyFish has no room for a run now ({what})", retry_after=busy_seconds(response)
        )
    if status == 408 or status >= 500:
        return ProviderUnavailable(
            f"TinyFish returned {what}",
            retry_after=retry_after_seconds(response.headers.get("retry-after")),
        )
    return ProviderRequestRejected(f"TinyFish rejected {action} ({what})")
