"""How a provider's failed attempt is followed up within its run, as one value and one pure
function (in milliseconds): retry as a new paid attempt, retry the same attempt, wait for a free
agent, or give up. Temporal's RetryPolicy is the model."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lib.providers.base import ProviderBusy, ProviderError


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 3  # paid attempts per provider of a run, across every delivery
    first_wait_ms: int = 1_000  # before the second attempt; each later wait doubles …
    max_backoff_ms: int = 8_000  # … up to this
    spread: float = 0.25  # each backoff is spread ±25 % so providers failing together part ways
    longest_wait_ms: int = 30_000  # no wait is longer, not even one the far side asked for
    min_attempt_ms: int = 10_000  # a retry that cannot get this long before the deadline is moot
    busy_wait_ms: int = 10_000  # a provider with no free agent asks again after this, unless told

    def backoff_ms(self, failed_attempts: int, jitter: float) -> int:
        """The wait after `failed_attempts` (1-based) failed; `jitter` is in [0, 1)."""
        nominal = min(self.max_backoff_ms, self.first_wait_ms << (failed_attempts - 1))
        return round(nominal * (1 - self.spread + 2 * self.spread * jitter))


RETRY_POLICY = RetryPolicy()


@dataclass(frozen=True, slots=True)
class Failure:
    """What the policy needs to know of a failed attempt."""

    transient: bool  # a blip, worth another attempt
    busy: bool = False  # no room for an agent run now: waiting costs time, not an attempt
    same_attempt: bool = False  # the attempt's agent run may exist unseen: try the same one again
    retry_after_ms: int | None = None  # what the far side asked us to wait

    @classmethod
    def of(cls, error: ProviderError) -> Failure:
        retry_after = None if error.retry_after is None else math.ceil(error.retry_after * 1000)
        return cls(
            transient=error.transient,
            busy=isinstance(error, ProviderBusy),
            same_attempt=error.same_attempt,
            retry_after_ms=retry_after,
        )


@dataclass(frozen=True, slots=True)
class Retry:
    """Try again after `wait_ms`: the same attempt, or the next paid one."""

    wait_ms: int
    same_attempt: bool = False


@dataclass(frozen=True, slots=True)
class WaitForAgent:
    """Hand the work back to the queue for `wait_ms`: no agent is free now."""

    wait_ms: int


@dataclass(frozen=True, slots=True)
class GiveUp:
    """The failure is the provider's outcome."""

    reason: str


NextStep = Retry | WaitForAgent | GiveUp


def next_step(
    policy: RetryPolicy, failure: Failure, *, attempt: int, ms_left: int, jitter: float
) -> NextStep:
    """What follows `failure` of attempt number `attempt`, with `ms_left` before the provider's
    deadline; `jitter` in [0, 1) spreads the backoff."""
    if failure.busy:
        wait = min(max(failure.retry_after_ms or policy.busy_wait_ms, 1), policy.longest_wait_ms)
        if ms_left - wait < policy.min_attempt_ms:
            return GiveUp("no agent was free in time")
        return WaitForAgent(wait)
    if not failure.transient:
        return GiveUp("not transient")
    if not failure.same_attempt and attempt >= policy.max_attempts:
        return GiveUp("attempts spent")
    wait = min(
        max(failure.retry_after_ms or 0, policy.backoff_ms(attempt, jitter)),
        policy.longest_wait_ms,
    )
    if ms_left - wait < policy.min_attempt_ms:
        return GiveUp("no time for another attempt")
    return Retry(wait, same_attempt=failure.same_attempt)
