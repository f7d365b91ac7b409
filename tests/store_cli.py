"""Drives a store from a separate OS process, as another function instance would.

python -m tests.store_cli (kv URL TOKEN | sqlite PATH) COMMAND RUN_ID...
  append   append one activity event to the run; prints {"id": N}
  finish   end each run (failed, worker_lost) in the order given; prints {"results": [...]},
           per run its terminal event's id or "finalized" when the store refused it

Before it acts, the process opens the store, reads the first run (so its connection is warm),
prints "ready" and waits for one line on stdin: the test releases racing processes at once.
"""

from __future__ import annotations

import asyncio
import json
import sys

from lib.models import ActivityEvent, ErrorEvent, ErrorInfo, RunEnd, utc_now
from lib.store import RunFinalized, Store
from lib.store.kv import KVStore
from lib.store.sqlite import SQLiteStore


def build(args: list[str]) -> tuple[Store, list[str]]:
    if args[0] == "kv":
        return KVStore(args[1], args[2], ttl_seconds=7200), args[3:]
    return SQLiteStore(args[1], ttl_seconds=7200), args[2:]


async def finish(store: Store, run_id: str) -> int | str:
    event = ErrorEvent(code="worker_lost", message="from another process")
    end = RunEnd(
        status="failed", ended_at=utc_now(), error=ErrorInfo(code=event.code, message=event.message)
    )
    try:
        return await store.finish_run(run_id, event, end)
    except RunFinalized:
        return "finalized"


async def main(argv: list[str]) -> None:
    store, (command, *run_ids) = build(argv)
    try:
        await store.get_run(run_ids[0], tail=0)
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        if command == "append":
            event = ActivityEvent(provider="geico", message="from another process")
            print(json.dumps({"id": await store.append_events(run_ids[0], [event])}))
        elif command == "finish":
            print(json.dumps({"results": [await finish(store, run_id) for run_id in run_ids]}))
        else:
            raise SystemExit(f"unknown command {command!r}")
    finally:
        await store.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
