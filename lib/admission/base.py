"""The admission interface: may this caller start a run now? One atomic check-and-count per run.

What it counts (every key is an HMAC of what it names, keyed by QUOTES_SECRET, so storage never
holds a client's address, a key or a token id in the clear):

- runs per client address in a sliding minute: two fixed-window counters, the previous one
  weighted by how much of it still overlaps the last 60 s (the sliding-window counter
  upstash-ratelimit uses, rounded up), so no burst at a window's edge gets twice the limit
  through;
- runs per caller (API key or token subject) and in total per UTC day, the spend ceiling;
- start tokens: a token's id is recorded, with a TTL to its expiry, when it starts a run.

A run that then turns out to be an idempotent replay, or whose creation fails, is released:
its counts are given back and its token record removed.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from abc import ABC, abstractmethod
from typing import Literal, NamedTuple

from lib.admission.errors import AdmissionRefused, DailyLimitReached, RateLimited, StartTokenUsed

RATE_WINDOW_SECONDS = 60
DAY_SECONDS = 86_400
# Day counters outlive their day by this much, for clocks slightly behind.
DAY_MARGIN_SECONDS = 3_600
# A token's record outlives its exp by the skew tokens are accepted with (lib/start_tokens.py).
TOKEN_MARGIN_SECONDS = 30

Verdict = Literal["admit", "replay", "token_used", "rate", "caller_day", "total_day"]


class Limits(NamedTuple):
    """0 turns a limit off."""

    per_minute: int
    per_day: int
    per_day_total: int


class AdmissionRequest(NamedTuple):
    """`subject` is the caller's ceiling bucket (None: anonymous, only the total applies);
    `replay_tag` the caller-scoped Idempotency-Key hash ("" without a key), which lets a start
    token through again for an idempotent replay of the run it started."""

    address: str
    subject: str | None = None
    token_id: str | None = None
    token_expires_at: float | None = None
    replay_tag: str = ""


class AdmissionPass(NamedTuple):
    """What an admission counted, so `release` can give it back. `replay`: the start token
    already started this very run (same Idempotency-Key); nothing was counted."""

    counted: tuple[str, ...] = ()
    token_key: str | None = None
    replay: bool = False


class AdmissionKeys(NamedTuple):
    """The storage keys one admission reads and writes, and the timing it needs."""

    rate_current: str
    rate_previous: str
    caller_day: str | None
    total_day: str
    token: str | None
    token_value: str
    window_elapsed_ms: int  # how far into the current rate window `now` is
    rate_ttl_ms: int
    day_ttl_seconds: int
    token_ttl_ms: int
    seconds_to_midnight: int


class Counts(NamedTuple):
    rate_current: int = 0
    rate_previous: int = 0
    caller_day: int = 0
    total_day: int = 0
    token_value: str | None = None


def admission_keys(request: AdmissionRequest, secret: bytes, now: float) -> AdmissionKeys:
    def named(kind: str, text: str) -> str:
        digest = hmac.new(secret, f"{kind}\0{text}".encode(), hashlib.sha256).hexdigest()[:32]
        return f"quote:admit:{kind}:{digest}"

    window, into = divmod(now, RATE_WINDOW_SECONDS)
    day = int(now // DAY_SECONDS)
    to_midnight = (day + 1) * DAY_SECONDS - now
    token_ttl = 0.0
    if request.token_id is not None:
        expires_at = request.token_expires_at or now
        token_ttl = max(expires_at - now + TOKEN_MARGIN_SECONDS, 1.0)
    rate_key = named("rate", request.address)
    return AdmissionKeys(
        rate_current=f"{rate_key}:{int(window)}",
        rate_previous=f"{rate_key}:{int(window) - 1}",
        caller_day=f"{named('day', request.subject)}:{day}" if request.subject else None,
        total_day=f"{named('day', '*')}:{day}",
        token=named("token", request.token_id) if request.token_id is not None else None,
        token_value=f"t:{request.replay_tag}",
        window_elapsed_ms=int(into * 1000),
        rate_ttl_ms=(2 * RATE_WINDOW_SECONDS + 1) * 1000,
        day_ttl_seconds=math.ceil(to_midnight) + DAY_MARGIN_SECONDS,
        token_ttl_ms=math.ceil(token_ttl * 1000),
        seconds_to_midnight=max(math.ceil(to_midnight), 1),
    )


WINDOW_MS = RATE_WINDOW_SECONDS * 1000


def sliding_count(previous: int, current: int, elapsed_ms: int) -> int:
    """Runs in the last minute, estimated: the previous window's share still inside it, rounded
    up (integers only, so the KV script computes exactly the same)."""
    return (previous * (WINDOW_MS - elapsed_ms) + WINDOW_MS - 1) // WINDOW_MS + current


def judge(counts: Counts, keys: AdmissionKeys, limits: Limits, replay_tag: str) -> Verdict:
    """The decision both backends make, atomically with the counting (the KV backend in Lua)."""
    if keys.token is not None and counts.token_value is not None:
        return "replay" if replay_tag and counts.token_value == keys.token_value else "token_used"
    if limits.per_minute > 0:
        recent = sliding_count(counts.rate_previous, counts.rate_current, keys.window_elapsed_ms)
        if recent >= limits.per_minute:
            return "rate"
    if keys.caller_day is not None and 0 < limits.per_day <= counts.caller_day:
        return "caller_day"
    if 0 < limits.per_day_total <= counts.total_day:
        return "total_day"
    return "admit"


def counted_keys(keys: AdmissionKeys, limits: Limits) -> tuple[str, ...]:
    counted = []
    if limits.per_minute > 0:
        counted.append(keys.rate_current)
    if keys.caller_day is not None and limits.per_day > 0:
        counted.append(keys.caller_day)
    if limits.per_day_total > 0:
        counted.append(keys.total_day)
    return tuple(counted)


def rate_retry_after(counts: Counts, keys: AdmissionKeys, limit: int) -> int:
    """Whole seconds until the sliding count drops below the limit, if nobody else starts runs."""
    for wait in range(1, 2 * RATE_WINDOW_SECONDS + 1):
        later = keys.window_elapsed_ms + wait * 1000
        if later < WINDOW_MS:
            recent = sliding_count(counts.rate_previous, counts.rate_current, later)
        elif later < 2 * WINDOW_MS:
            recent = sliding_count(counts.rate_current, 0, later - WINDOW_MS)
        else:
            recent = 0
        if recent < limit:
            return wait
    return 2 * RATE_WINDOW_SECONDS


def refusal(verdict: Verdict, counts: Counts, keys: AdmissionKeys, limits: Limits) -> Exception:
    match verdict:
        case "token_used":
            return StartTokenUsed("this start token already started a run")
        case "rate":
            return RateLimited(
                f"At most {limits.per_minute} quote runs a minute may be started from one address.",
                retry_after=rate_retry_after(counts, keys, limits.per_minute),
            )
        case "caller_day":
            return DailyLimitReached(
                f"This caller's {limits.per_day} quote runs for today (UTC) are spent.",
                retry_after=keys.seconds_to_midnight,
            )
        case "total_day":
            return DailyLimitReached(
                f"This deployment's {limits.per_day_total} quote runs for today (UTC) are spent.",
                retry_after=keys.seconds_to_midnight,
            )
    return AdmissionRefused(f"not admitted: {verdict}")


class Admission(ABC):
    """Request admission for starting runs. Backends implement `_check_and_count` atomically."""

    name: str

    def __init__(self, limits: Limits, secret: bytes) -> None:
        self.limits = limits
        self._secret = secret

    async def admit(self, request: AdmissionRequest, now: float) -> AdmissionPass:
        """Count one run for `request`, or raise AdmissionRefused (RateLimited,
        DailyLimitReached, StartTokenUsed); storage faults raise StoreUnavailable."""
        limits = self.limits
        if request.token_id is None and not (
            limits.per_minute or limits.per_day_total or (request.subject and limits.per_day)
        ):
            return AdmissionPass()
        keys = admission_keys(request, self._secret, now)
        verdict, counts = await self._check_and_count(keys, request.replay_tag)
        if verdict == "replay":
            return AdmissionPass(replay=True)
        if verdict != "admit":
            raise refusal(verdict, counts, keys, limits)
        return AdmissionPass(counted=counted_keys(keys, limits), token_key=keys.token)

    async def release(self, admitted: AdmissionPass) -> None:
        """Give back what `admitted` counted: the run was a replay or was never created."""
        if admitted.counted or admitted.token_key is not None:
            await self._release(admitted.counted, admitted.token_key)

    @abstractmethod
    async def _check_and_count(
        self, keys: AdmissionKeys, replay_tag: str
    ) -> tuple[Verdict, Counts]:
        """Read the counts, `judge` them, and on "admit" count the run and record the token,
        all atomically."""

    @abstractmethod
    async def _release(self, counted: tuple[str, ...], token_key: str | None) -> None: ...

    async def aclose(self) -> None:
        return None
