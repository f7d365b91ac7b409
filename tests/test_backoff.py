"""The one backoff policy: waits that grow by a factor to a cap, spread so callers that fail
together do not retry in lockstep."""

from __future__ import annotations

import pytest

from lib.providers.backoff import CANCELLING, POLLING, STORE_WRITES, Backoff


def test_the_named_policies_grow_to_their_caps() -> None:
    assert [POLLING.wait(n) for n in range(1, 7)] == pytest.approx([1, 1.5, 2.25, 3.375, 5, 5])
    assert [CANCELLING.wait(n) for n in range(1, 4)] == [0.5, 1.0, 2.0]
    assert [STORE_WRITES.wait(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 4.0, 5.0]
    assert Backoff(first=2, cap=3).wait(5, jitter=lambda: 0.0) == 3  # no spread, no jitter


def test_a_spread_wait_stays_within_its_spread() -> None:
    spread = Backoff(first=1.0, cap=8.0, spread=0.25)
    assert spread.wait(3, jitter=lambda: 0.0) == pytest.approx(4 * 0.75)
    assert spread.wait(3, jitter=lambda: 0.999999) == pytest.approx(4 * 1.25, abs=1e-4)
    assert spread.wait(3, jitter=lambda: 0.5) == pytest.approx(4)
