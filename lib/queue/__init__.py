"""Provider work on Vercel Queues: one message per provider of a run (idempotency key
`{runId}:{provider}`) and one delayed message for the run's own deadline (`{runId}:deadline`), on
one topic that the worker function (api/work.py) consumes.

- `messages`: what a message holds (pydantic); the request travels inside the provider messages,
  because the store never holds the driver's personal data.
- `dispatch`: handing a new run's work to the queue (POST).

Importing this package is cheap: `vercel.queue` (about 0.4 s) is imported on first send, and the
message models only by the modules that need them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lib.queue.errors import QueueNotConfigured, QueueUnavailable

if TYPE_CHECKING:
    from lib.config import Settings

TOPIC = "quote-provider-work"
# vercel.json's experimentalTriggers for api/work.py say the same (a test keeps them equal).
MAX_DELIVERIES = 10
RETRY_AFTER_SECONDS = 10

__all__ = [
    "MAX_DELIVERIES",
    "RETRY_AFTER_SECONDS",
    "TOPIC",
    "QueueNotConfigured",
    "QueueUnavailable",
    "require_queue",
]


def require_queue(settings: Settings) -> None:
    if settings.queue_backend is None:
        raise QueueNotConfigured(
            "No queue is configured: deploy on Vercel with Queues enabled, or set "
            "VERCEL_QUEUE_BASE_URL to a local queue service (make dev starts one)."
        )
