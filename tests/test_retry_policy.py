"""The worker's retry policy (lib/worker/policy.py): one value, and a pure `next_step` that says
what follows a failed attempt, in milliseconds."""

from __future__ import annotations

import pytest

from lib.providers.base import (
    ProviderAgentFailed,
    ProviderBadOutput,
    ProviderBusy,
    ProviderDeclined,
    ProviderUnavailable,
)
from lib.worker.policy import (
    RETRY_POLICY,
    Failure,
    GiveUp,
    NextStep,
    Retry,
    RetryPolicy,
    WaitForAgent,
    next_step,
)

BLIP = Failure(transient=True)
VERDICT = Failure(transient=False)
BUSY = Failure(transient=True, busy=True)
UNSEEN_RUN = Failure(transient=True, same_attempt=True)
MINUTE = 60_000


@pytest.mark.parametrize(
    ("failure", "attempt", "ms_left", "jitter", "expected"),
    [
        (BLIP, 1, MINUTE, 0.5, Retry(1_000)),
        (BLIP, 2, MINUTE, 0.5, Retry(2_000)),
        (BLIP, 2, MINUTE, 0.0, Retry(1_500)),  # spread −25 %
        (BLIP, 2, MINUTE, 0.999, Retry(2_499)),  # spread +25 %
        (BLIP, 3, MINUTE, 0.5, GiveUp("attempts spent")),
        (BLIP, 1, 10_900, 0.5, GiveUp("no time for another attempt")),
        (BLIP, 1, 11_000, 0.5, Retry(1_000)),
        (Failure(transient=True, retry_after_ms=20_000), 1, MINUTE, 0.5, Retry(20_000)),
        (Failure(transient=True, retry_after_ms=90_000), 1, 5 * MINUTE, 0.5, Retry(30_000)),
        (VERDICT, 1, MINUTE, 0.5, GiveUp("not transient")),
        (UNSEEN_RUN, 3, MINUTE, 0.5, Retry(4_000, same_attempt=True)),  # not a new attempt
        (UNSEEN_RUN, 1, 10_500, 0.5, GiveUp("no time for another attempt")),
        (BUSY, 3, MINUTE, 0.5, WaitForAgent(10_000)),  # waiting spends time, not attempts
        (
            Failure(transient=True, busy=True, retry_after_ms=3_000),
            1,
            MINUTE,
            0.5,
            WaitForAgent(3_000),
        ),
        (
            Failure(transient=True, busy=True, retry_after_ms=600_000),
            1,
            5 * MINUTE,
            0.5,
            WaitForAgent(30_000),
        ),
        (BUSY, 1, 19_000, 0.5, GiveUp("no agent was free in time")),
    ],
)
def test_next_step(
    failure: Failure, attempt: int, ms_left: int, jitter: float, expected: NextStep
) -> None:
    assert (
        next_step(RETRY_POLICY, failure, attempt=attempt, ms_left=ms_left, jitter=jitter)
        == expected
    )


def test_backoff_doubles_to_its_cap() -> None:
    assert [RETRY_POLICY.backoff_ms(n, 0.5) for n in range(1, 6)] == [
        1_000,
        2_000,
        4_000,
        8_000,
        8_000,
    ]


def test_a_policy_is_one_value_that_can_be_varied() -> None:
    patient = RetryPolicy(max_attempts=5)
    assert next_step(patient, BLIP, attempt=3, ms_left=MINUTE, jitter=0.5) == Retry(4_000)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (ProviderUnavailable("blip"), BLIP),
        (ProviderBadOutput("garbled"), BLIP),
        (ProviderDeclined("no"), VERDICT),
        (ProviderAgentFailed("cannot"), VERDICT),
        (ProviderBusy("429", retry_after=2.5), Failure(True, busy=True, retry_after_ms=2_500)),
    ],
)
def test_a_failure_is_read_off_the_providers_error(
    error: ProviderUnavailable, expected: Failure
) -> None:
    assert Failure.of(error) == expected


def test_an_attempt_whose_run_may_exist_unseen_is_read_as_the_same_attempt() -> None:
    error = ProviderUnavailable("dropped before STARTED")
    error.same_attempt = True
    assert Failure.of(error) == UNSEEN_RUN
