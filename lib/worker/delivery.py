"""What the queue said about a delivery, and what the worker says back: done, or hand the
message back to be delivered again (`HandBack`, which api/work.py maps to the SDK's RetryAfter)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from lib.queue import MAX_DELIVERIES

# A delivery hands its provider back this long before its invocation would be cut off.
HANDOFF_MARGIN_SECONDS = 15.0
# Where the invocation's deadline is unknown (tests, other hosts): what Vercel gives at most.
DEFAULT_INVOCATION_SECONDS = 300.0


def whole_seconds(delay: float) -> int:
    """A delay as the queue can hold it: whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(delay))


class HandBack(Exception):
    """Give the message back to the queue, to be delivered again after `delay` whole seconds."""

    def __init__(self, delay: float, reason: str) -> None:
        super().__init__(reason)
        # The queue takes whole seconds and truncates: a fraction rounds up, never down to 0.
        self.delay = whole_seconds(delay)


@dataclass(frozen=True, slots=True)
class Delivery:
    """What the queue said about this delivery."""

    message_id: str
    count: int
    invocation_deadline: datetime | None

    @property
    def last(self) -> bool:
        return self.count >= MAX_DELIVERIES

    def handoff_at(self, now: datetime) -> datetime:
        deadline = self.invocation_deadline or now + timedelta(seconds=DEFAULT_INVOCATION_SECONDS)
        return deadline - timedelta(seconds=HANDOFF_MARGIN_SECONDS)
