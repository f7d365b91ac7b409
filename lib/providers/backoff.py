"""The backoff of the quote sources' calls and the worker's store writes: waits that grow by a
factor up to a cap, with an optional spread so that callers failing together do not retry in
lockstep. (A provider's attempts follow lib/worker/policy.py.)"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    first: float  # seconds before the second try
    cap: float  # no wait is longer
    factor: float = 2.0
    spread: float = 0.0  # each wait is spread ±spread (0.25 = ±25 %) by `jitter`

    def wait(self, tries: int, jitter: Callable[[], float] | None = None) -> float:
        """Seconds to wait after `tries` failed tries (1-based); `jitter` returns [0, 1)."""
        nominal = min(self.cap, self.first * self.factor ** (tries - 1))
        if jitter is None or not self.spread:
            return nominal
        return nominal * (1 - self.spread + 2 * self.spread * jitter())


# A store write that storage could not take (lib.worker.journal), retried for a while before
# the work is handed back to the queue.
STORE_WRITES = Backoff(first=0.5, cap=5.0, spread=0.25)
# Reading an agent run until it is over (GET /v1/runs/{id}).
POLLING = Backoff(first=1.0, cap=5.0, factor=1.5)
# Asking the agent API to cancel a run (a handful of quick tries).
CANCELLING = Backoff(first=0.5, cap=2.0)
