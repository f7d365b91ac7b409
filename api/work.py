"""POST /api/work: the queue-triggered worker. Vercel Queues pushes each message of the
`quote-provider-work` topic here (vercel.json `experimentalTriggers`); the `vercel-queue` SDK
accepts the delivery, runs the subscriber, and acknowledges the message when it returns. A
subscriber that raises leaves the message unacknowledged (the queue redelivers it after the
trigger's retryAfterSeconds); one that raises `RetryAfter(n)` has it redelivered after n s.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from vercel.queue import Message, ProtocolError, QueueError, accept_and_handle, subscribe

from lib.http import FunctionContext, Problem, function_app

TOPIC = "quote-provider-work"
CLOUD_EVENT_TYPE = "com.vercel.queue.v2beta"  # what every Vercel Queues push carries as ce-type
log = logging.getLogger(__name__)


# A push names its consumer group by this function's path (Vercel sanitizes "api/work.py" to
# "api_Swork_Dpy"; the SDK sanitizes this value the same way, so the two match).
@subscribe(topic=TOPIC, consumer_group="api/work.py")
async def work(message: Message[Any]) -> None:
    meta = message.metadata
    log.warning(
        "queue message %s (delivery %d): %r", meta.message_id, meta.delivery_count, message.payload
    )


async def deliver(request: Request, context: FunctionContext) -> Response:
    if request.headers.get("ce-type") != CLOUD_EVENT_TYPE:
        raise _not_a_delivery(f"ce-type must be {CLOUD_EVENT_TYPE!r}.")
    body = await request.body()
    try:
        await accept_and_handle(body, dict(request.headers))
    except ProtocolError as error:  # a ce-vqs* header is missing
        raise _not_a_delivery(str(error)) from None
    except QueueError as error:
        if error.status_code is None:
            raise
        raise Problem(error.status_code, "queue-error", "Queue error", str(error)) from None
    return Response(status_code=204)


def _not_a_delivery(detail: str) -> Problem:
    return Problem(400, "not-a-queue-delivery", "Not a queue delivery", detail)


app = function_app(deliver, methods=("POST",))
