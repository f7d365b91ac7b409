"""POST /api/work: the queue-triggered worker; each delivery is one provider of one run, or a
run's deadline (lib/worker/ does the work). Vercel Queues pushes each message of the
`quote-provider-work` topic here (vercel.json `experimentalTriggers`); the `vercel-queue` SDK
accepts the delivery, runs the subscriber, and acknowledges the message when it returns. A
subscriber that raises leaves the message unacknowledged (the queue redelivers it after the
trigger's retryAfterSeconds); one that raises `RetryAfter(n)` has it redelivered after n s.

The route is public, and the SDK runs the subscriber on the pushed body before it talks to the
queue service: so every payload carries an HMAC by this deployment's secret (lib/queue/messages.py
seals what lib/queue/dispatch.py sends), checked before anything is read or started. A delivery
without a valid seal is answered 401 and nothing else happens.

`vercel.queue` costs about 0.3 s to import: the subscriber is declared with the first delivery,
not at cold start (the trigger itself is declared in vercel.json).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from functools import cache
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from lib.config import Settings
from lib.http import FunctionContext, Problem, function_app, invocation_deadline
from lib.logs import bind_log_context, log_context
from lib.queue import TOPIC

if TYPE_CHECKING:
    from vercel.queue import Message, QueueSubscriber

CLOUD_EVENT_TYPE = "com.vercel.queue.v2beta"  # what every Vercel Queues push carries as ce-type
log = logging.getLogger(__name__)
HOLD_TIMEOUT_SECONDS = 5.0


class SubscriberFailed(Exception):
    """The work itself failed (a 500): kept apart from what the SDK raises on a bad push (400)."""


@cache
def subscriber() -> QueueSubscriber[..., Any]:
    """The function's queue subscriber, declared once per instance with its first delivery."""
    from vercel.queue import Message, subscribe

    # The SDK reads the handler's annotation to pick its transport; `Message` is imported here.
    work.__annotations__["message"] = Message[Any]
    # A push names its consumer group by this function's path (Vercel sanitizes "api/work.py"
    # to "api_Swork_Dpy"; the SDK sanitizes this value the same way, so the two match).
    return subscribe(topic=TOPIC, consumer_group="api/work.py")(work)


async def work(message: Message[Any]) -> None:
    from pydantic import ValidationError
    from vercel.queue import RetryAfter

    from lib.queue.messages import ProviderWorkMessage, unseal
    from lib.worker import Delivery, HandBack, ProviderTask, enforce_deadline

    meta = message.metadata
    context = app.context
    # Every line of this delivery carries its message, and once read, its run and provider.
    with log_context(messageId=str(meta.message_id), delivery=str(meta.delivery_count)):
        try:
            # Raises UnsealedMessage (a 401, in `deliver`) before any store access.
            payload = unseal(message.payload, context.settings.secret)
        except ValidationError as error:
            # Redelivering a message that can never be read would only burn deliveries.
            log.error("queue message %s is not provider work: %s", meta.message_id, error)
            return
        provider = payload.provider if isinstance(payload, ProviderWorkMessage) else None
        bind_log_context(runId=payload.run_id, provider=provider)
        delivery = Delivery(
            message_id=str(meta.message_id),
            count=meta.delivery_count,
            invocation_deadline=invocation_deadline(),
        )
        lease = queue_lease_seconds(context.settings)
        await hold(message, lease)  # before any work: a death from here on costs one lease
        visible = asyncio.ensure_future(keep_held(message, lease))
        try:
            if isinstance(payload, ProviderWorkMessage):
                task = ProviderTask(
                    context.store, context.source, context.settings, payload, delivery
                )
                await task.run()
            else:
                await enforce_deadline(
                    context.store,
                    context.source,
                    payload,
                    agent_limit=context.settings.tinyfish_max_concurrency,
                )
        except HandBack as directive:
            raise RetryAfter(directive.delay) from None
        except Exception as error:
            # Logged here, with the run and provider; the queue redelivers the message.
            log.exception("delivery %d failed unexpectedly", meta.delivery_count)
            raise SubscriberFailed(type(error).__name__) from error
        finally:
            # Stopped before the SDK acknowledges or applies RetryAfter's visibility.
            visible.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await visible


async def hold(message: Message[Any], seconds: int) -> None:
    """Hold the message for `seconds` from now (best effort: the SDK's own renewal still runs).
    The SDK renews only near the push's visibility deadline (up to maxDuration away): held this
    way, a delivery whose instance died is visible again within a lease even where the platform
    honours visibility alone."""
    if message.metadata.receipt_handle is None:
        return
    from vercel.queue import QueueClient

    try:
        # Bounded: the SDK retries a failing call, and the work must not wait on the hold.
        async with asyncio.timeout(HOLD_TIMEOUT_SECONDS):
            await QueueClient().extend_lease(message, seconds)
    except Exception as error:
        log.info("holding the message for %d s failed: %s", seconds, type(error).__name__)


async def keep_held(message: Message[Any], seconds: int) -> None:
    """Renew the hold every third of it while the work runs."""
    while True:
        await asyncio.sleep(seconds / 3)
        await hold(message, seconds)


async def deliver(request: Request, context: FunctionContext) -> Response:
    if request.headers.get("ce-type") != CLOUD_EVENT_TYPE:
        raise _not_a_delivery(f"ce-type must be {CLOUD_EVENT_TYPE!r}.")
    from vercel.queue import ProtocolError, QueueError, accept_and_handle

    from lib.queue.messages import UnsealedMessage

    subscriber()
    body = await request.body()
    try:
        await accept_and_handle(
            body, dict(request.headers), lease_duration=queue_lease_seconds(context.settings)
        )
    except UnsealedMessage as error:
        log.warning(
            "refused a delivery the queue did not send (%s): message %s from %s",
            error,
            request.headers.get("ce-vqsmessageid", "?"),
            request.client.host if request.client else "?",
        )
        raise Problem(
            401, "unsealed-delivery", "Not from this deployment's queue", str(error)
        ) from None
    except ProtocolError as error:  # a ce-vqs* header is missing
        raise _not_a_delivery(str(error)) from None
    except (ValueError, TypeError) as error:
        # What the SDK raises on a push it cannot parse (a bad header value, an unreadable body):
        # a malformed request, as Vercel's own queue adapter answers it, not a server fault.
        raise _not_a_delivery(str(error)) from None
    except QueueError as error:
        if error.status_code is None:
            raise
        raise Problem(error.status_code, "queue-error", "Queue error", str(error)) from None
    return Response(status_code=204)


def queue_lease_seconds(settings: Settings) -> int:
    """How long the queue hides a message this worker holds (the SDK renews it while the
    subscriber runs): about a run lease, so a delivery whose instance died comes back soon."""
    return max(1, math.ceil(settings.run_lease_seconds))


def _not_a_delivery(detail: str) -> Problem:
    return Problem(400, "not-a-queue-delivery", "Not a queue delivery", detail)


app = function_app(deliver, methods=("POST",))
