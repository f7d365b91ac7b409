"""What a quote source is: one paid attempt at one insurer's quote, which the caller may hand off
(cancel the awaiting coroutine) and resume later with the same attempt, and the typed errors that
attempt can end in. Depends on nothing below it."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import datetime
from typing import ClassVar, Protocol

from lib.models import ProviderErrorCode, ProviderId, Quote, QuoteRequest, QuoteSourceName, utc_now


@dataclass(frozen=True, slots=True)
class AgentAttempt:
    """One paid attempt at one provider of one run, as the run's stored provider state has it."""

    number: int  # 1, 2, 3 … attempts started for this provider of this run
    started_at: datetime  # when this attempt began (UTC)
    deadline: datetime  # this attempt must be over by then (provider budget / run deadline)
    agent_run_id: str | None = None  # the agent run of this attempt, once the agent API said

    def remaining_seconds(self, now: datetime | None = None) -> float:
        """Seconds left before `deadline` (negative once it has passed)."""
        return (self.deadline - (now or utc_now())).total_seconds()

    def whole_seconds_left(self, now: datetime | None = None) -> int:
        """The time left, floored to whole seconds (what an agent's duration cap can hold)."""
        return math.floor(self.remaining_seconds(now))

    def with_agent_run(self, agent_run_id: str) -> AgentAttempt:
        return replace(self, agent_run_id=agent_run_id)


class AttemptListener(Protocol):
    """Where a source reports while it works. Exceptions raised here belong to the caller and
    propagate out of `QuoteSource.quote` unchanged (after the source's own cleanup)."""

    async def activity(self, message: str) -> None:
        """What the agent is doing now (free of the driver's personal data)."""
        ...

    async def agent_run_started(self, agent_run_id: str) -> None:
        """The attempt's agent run now exists; store it durably before returning, so a resumed
        attempt reattaches to it instead of starting (and paying for) another."""
        ...

    def agent_steps(self, steps: int) -> None:
        """The attempt's agent run has taken `steps` steps so far, as far as this call can tell
        (the steps it saw from the run's start, or the agent API's own count when it reads the
        run back). Steps are what the agent API bills; the listener keeps the highest count."""
        ...


class ProviderError(Exception):
    """A provider failed to quote.

    - `retryable`: asking this insurer again later (another run) could succeed (shown in the API).
    - `transient`: worth another attempt within this run's budget (a blip, not a verdict).
    - `retry_after`: seconds the far side asked us to wait before trying again, if it said.
    - `agent_run_id`: the agent run this attempt had started, if any, and `agent_run_finished`:
      whether the agent API reported that run over. A run not known to be over may still be going
      (and billing) on the agent's side — after a failed poll, a timeout: whoever gives up on the
      attempt cancels it (`QuoteSource.cancel` is idempotent).
    """

    code: ClassVar[ProviderErrorCode]
    retryable: ClassVar[bool]
    transient: ClassVar[bool] = False

    def __init__(
        self, message: str, *, retry_after: float | None = None, agent_run_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.agent_run_id = agent_run_id
        self.agent_run_finished = False
        # The attempt's agent run may exist though its id was never learnt (the create call died
        # before STARTED and the lookup by reference did not settle it): the next try must be the
        # same attempt (same reference, looked up again before any create), never a new one.
        self.same_attempt = False


class ProviderTimeout(ProviderError):
    code = "provider_timeout"
    retryable = True


class ProviderBlocked(ProviderError):
    code = "provider_blocked"
    retryable = True


class ProviderDeclined(ProviderError):
    code = "provider_declined"
    retryable = False


class ProviderBadOutput(ProviderError):
    code = "provider_bad_output"
    retryable = True
    transient = True


class ProviderUnavailable(ProviderError):
    code = "provider_unavailable"
    retryable = True
    transient = True


class ProviderBusy(ProviderUnavailable):
    """No room for an agent run now (the agent API's 429, or the deployment's agent budget is
    full): wait `retry_after` seconds and try again. Waiting costs time, not an attempt."""


class ProviderRequestRejected(ProviderUnavailable):
    """The agent API refused the request itself (HTTP 400, 404, 422…): our integration is at
    fault, so the same request will fail the same way. Reported as provider_unavailable."""

    retryable = False
    transient = False


class ProviderAgentFailed(ProviderUnavailable):
    """The agent itself gave up (TinyFish AGENT_FAILURE: the task as given cannot be done). The
    same attempt would fail the same way, so it is not retried; the message says why."""

    retryable = False
    transient = False


class ProviderRunCancelled(ProviderUnavailable):
    """The agent run was cancelled on the agent's side (by this system or by its operator):
    someone decided it should stop, so it is not retried within this run."""

    transient = False


class ProviderAuth(ProviderError):
    code = "provider_auth"
    retryable = False


class QuoteSource(Protocol):
    name: QuoteSourceName

    async def quote(
        self,
        request: QuoteRequest,
        provider: ProviderId,
        attempt: AgentAttempt,
        listener: AttemptListener,
    ) -> Quote:
        """Run `attempt` to its end: start its agent run when `attempt.agent_run_id` is None,
        else reattach to that run (never start a second one). Returns the quote or raises a
        ProviderError; past `attempt.deadline` it raises ProviderTimeout. Cancelling the awaiting
        coroutine is a hand-off: the agent run goes on, and a later call with the same attempt
        (carrying the id reported to `listener.agent_run_started`) picks it up."""
        ...

    async def read_back(
        self,
        request: QuoteRequest,
        provider: ProviderId,
        attempt: AgentAttempt,
        listener: AttemptListener,
    ) -> Quote | None:
        """Read `attempt`'s agent run (`attempt.agent_run_id`) once, whatever its deadline: the
        quote when the agent API finished it with one, else None (still going, failed, or not
        readable now). Starts, waits on and cancels nothing, never raises: it is the last look
        at a paid run before its provider is declared out of time."""
        ...

    async def cancel(self, agent_run_id: str) -> None:
        """Stop an agent run nobody needs any more. Idempotent; never raises (a run already over,
        or unknown, is fine; a failure to reach the agent API is logged)."""
        ...

    async def agent_steps(self, agent_run_id: str) -> int | None:
        """The steps the agent run has taken (what the agent API bills), as the API reads it
        back now; None when unknown or unpaid. Never raises."""
        ...

    async def aclose(self) -> None: ...
