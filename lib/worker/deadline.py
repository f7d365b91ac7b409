"""The run's own deadline: a delayed queue message that ends the run even with no worker alive."""

from __future__ import annotations

import contextlib
import logging

from lib.providers.base import QuoteSource
from lib.queue.messages import RunDeadlineMessage
from lib.store import Store, StoreUnavailable
from lib.worker.clock import SYSTEM_CLOCK, Clock
from lib.worker.delivery import HandBack
from lib.workflow import agent_runs_to_cancel, complete_if_done, fail_run, free_agent_slots

log = logging.getLogger(__name__)

STORE_RETRY_SECONDS = 5.0


async def enforce_deadline(
    store: Store,
    source: QuoteSource,
    message: RunDeadlineMessage,
    *,
    agent_limit: int | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> None:
    """At the run's deadline: cancel every agent run still going, end the run, and give back
    its agent slots (`agent_limit`: TINYFISH_MAX_CONCURRENCY). Raises HandBack when the
    deadline has not come yet or storage is down."""
    remaining = (message.deadline - clock.now()).total_seconds()
    if remaining > 0:
        raise HandBack(remaining + 0.5, "the run's deadline has not come yet")
    try:
        state = await store.get_run(message.run_id, tail=0)
    except StoreUnavailable as error:
        raise HandBack(STORE_RETRY_SECONDS, f"storage unavailable: {error}") from None
    if state is None or state.finalized:
        return
    if await complete_if_done(store, message.run_id):
        return
    record = state.record
    for provider, agent_run_id in agent_runs_to_cancel(record):
        with contextlib.suppress(Exception):
            await source.cancel(agent_run_id)
            log.info(
                "run %s %s: cancelled agent run %s at the run's deadline",
                message.run_id,
                provider,
                agent_run_id,
            )
    if await fail_run(store, message.run_id, "deadline_exceeded"):
        log.error("run %s ended at its deadline", message.run_id)
    await free_agent_slots(store, record, agent_limit)
