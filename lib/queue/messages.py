"""What a queue message holds: one provider of one run (with the request, which the store never
holds), or a run's deadline."""

from __future__ import annotations

import logging
from functools import cache
from typing import Annotated, Literal

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
