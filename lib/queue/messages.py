"""What a queue message holds: one provider of one run (with the request, which the store never
holds), or a run's deadline; sealed with an HMAC keyed by the deployment's secret, because
/api/work is a public route and only what this deployment enqueued may start (paid) work."""

from __future__ import annotations

import hashlib
import hmac
import logging
from functools import cache
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, TypeAdapter

from lib.models import CamelModel, ProviderId, QuoteRequest, UtcTime

log = logging.getLogger(__name__)


class ProviderWorkMessage(CamelModel):
    """One provider of one run."""

    kind: Literal["provider"] = "provider"
    run_id: str
    provider: ProviderId
    total: int
    deadline: UtcTime
    request: QuoteRequest


class RunDeadlineMessage(CamelModel):
    """Delivered at the run's deadline, so the run ends even with no worker or reader alive."""

    kind: Literal["deadline"] = "deadline"
    run_id: str
    deadline: UtcTime


WorkMessage = Annotated[ProviderWorkMessage | RunDeadlineMessage, Field(discriminator="kind")]


@cache
def work_message() -> TypeAdapter[ProviderWorkMessage | RunDeadlineMessage]:
    """The message parser, built on first use (only the worker reads messages)."""
    # A message that does not fit must not be quoted in the error's text: it holds the driver.
    return TypeAdapter(WorkMessage, config=ConfigDict(hide_input_in_errors=True))


# Keys the MAC to this one use of the deployment secret (it also keys idempotency and tokens).
SEAL_CONTEXT = b"quote-runs queue message\0"


class UnsealedMessage(Exception):
    """A delivery whose payload this deployment did not seal: the queue did not send it."""


def seal(message: ProviderWorkMessage | RunDeadlineMessage, secret: bytes) -> dict[str, str]:
    """The payload to enqueue: the message's JSON text and its MAC over exactly that text (so no
    re-serialisation on the far side can change what is checked)."""
    text = message.model_dump_json()
    return {"message": text, "seal": _mac(secret, text)}


def unseal(payload: Any, secret: bytes) -> ProviderWorkMessage | RunDeadlineMessage:
    """The message inside a sealed payload. Raises UnsealedMessage when the payload carries no
    valid seal, pydantic's ValidationError when a sealed message does not parse."""
    if not isinstance(payload, dict):
        raise UnsealedMessage("the payload is not a sealed message")
    text, mac = payload.get("message"), payload.get("seal")
    if not isinstance(text, str) or not isinstance(mac, str):
        raise UnsealedMessage("the payload carries no seal")
    if not hmac.compare_digest(_mac(secret, text), mac):
        raise UnsealedMessage("the payload's seal does not match")
    return work_message().validate_json(text)


def _mac(secret: bytes, text: str) -> str:
    return hmac.new(secret, SEAL_CONTEXT + text.encode(), hashlib.sha256).hexdigest()
