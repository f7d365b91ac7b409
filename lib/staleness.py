"""A reader's last resort, for runs whose queued work is gone: an open run past its deadline by
more than its deadline message could take is ended `worker_lost`, and one whose providers all
have their outcomes is completed — once, by whichever reader sees it first. The stream and
snapshot functions call this on every request, so it imports no models until a run must end."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from lib.terms import utc_now

if TYPE_CHECKING:
    from lib.store import RunState, Store

log = logging.getLogger(__name__)

# A run still open this long after its deadline lost its deadline message too: readers end it.
LOST_AFTER_DEADLINE_SECONDS = 60.0


def is_lost(state: RunState, now: datetime) -> bool:
    """An open run past its deadline by more than the deadline message could take."""
    return not state.finalized and now - state.record.deadline > timedelta(
        seconds=LOST_AFTER_DEADLINE_SECONDS
    )


def next_lost_check(state: RunState) -> float:
    """time.time() from which a reader would judge the run's work lost."""
    return state.record.deadline.timestamp() + LOST_AFTER_DEADLINE_SECONDS + 0.05


async def finalize_if_lost(store: Store, state: RunState) -> bool:
    """Returns True when the run has (now) ended."""
    if state.finalized:
        return True
    done = state.record.completed == len(state.record.providers)
    if not done and not is_lost(state, utc_now()):
        return False
    from lib.workflow import complete_if_done, fail_run

    if done:
        return await complete_if_done(store, state.record.run_id)
    if await fail_run(store, state.record.run_id, "worker_lost"):
        log.error("run %s: its work was lost; a reader ended it", state.record.run_id)
    return True
