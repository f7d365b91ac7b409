"""Drives a store from a separate OS process, as another function instance would.

python -m tests.store_cli (kv URL TOKEN | sqlite PATH) COMMAND RUN_ID [AT]
  append-at    wait until wall-clock AT, append one activity event, print its id and the start time
  finalize-at  wait until wall-clock AT, read the run, try to finalize it stale, print the result
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from lib.models import ActivityEvent, ErrorEvent, utc_now
from lib.store import Store
from lib.store.kv import KVStore
from lib.store.sqlite import SQLiteStore


def build(args: list[str]) -> tuple[Store, list[str]]:
    if args[0] == "kv":
        return KVStore(args[1], args[2], ttl_seconds=7200), args[3:]
    return SQLiteStore(args[1], ttl_seconds=7200), args[2:]


async def main(argv: list[str]) -> None:
    store, (command, run_id, at) = build(argv)
    await asyncio.sleep(max(0.0, float(at) - time.time()))
    try:
        if command == "append-at":
            # Built before the clock starts (models build their validators on first use): the
            # time measured is the store's.
            event = ActivityEvent(provider="geico", message="from another process")
            event.model_dump_json()
            started = time.time()
            event_id = await store.append_event(run_id, event)
            print(json.dumps({"id": event_id, "started": started}))
        elif command == "finalize-at":
            state = await store.get_run(run_id)
            assert state is not None
            record = state.record.model_copy(update={"status": "failed", "updated_at": utc_now()})
            result = await store.finalize_stale_run(
                state, ErrorEvent(code="worker_lost", message="worker stopped"), record
            )
            print(json.dumps({"id": result}))
    finally:
        await store.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
