"""The Vercel KV (Upstash Redis REST) backend; its push watch is in lib/store/kv_watch.py.

Layout (every key expires `ttl` seconds after its last write):
  quote:{id}          string  the run record (JSON)
  quote:{id}:events   list    the events; an event's id is its index
  quote:{id}:appends  hash    append nonce -> event id, so a retried append is not applied twice
  quote:{id}:final    string  the fence: the terminal event's id, set with it, atomically
  quote:idem:{sha256} string  Idempotency-Key -> {"runId", "bodyHash"}
  channel quote:{id}:events   each appended event ({"id":N,...}) and heartbeat ({"lastId":N})

Every write is one Lua script, so one REST request, atomic, fenced.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
from upstash_redis.asyncio import Redis
from upstash_redis.errors import UpstashError

from lib.models import RunEvent, RunRecord, is_terminal
from lib.store.base import (
    CreateOutcome,
    EventWatch,
    IdempotencyClaim,
    RunState,
    Store,
    StoredEvent,
    idempotency_value,
    parse_idempotency_value,
    stored_event_json,
    wire_event,
)
from lib.store.errors import RunChanged, RunFinalized, RunNotFound, StoreUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

_APPEND = """
local prior = redis.call('HGET', KEYS[4], ARGV[2])
if prior then return tonumber(prior) end
if redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
local current = redis.call('GET', KEYS[1])
if not current then return -2 end
if ARGV[7] ~= '' and current ~= ARGV[7] then return -3 end
local ttl = tonumber(ARGV[5])
local id = redis.call('RPUSH', KEYS[2], ARGV[1]) - 1
redis.call('HSET', KEYS[4], ARGV[2], id)
if ARGV[3] ~= '' then
  redis.call('SET', KEYS[1], ARGV[3], 'EX', ttl)
else
  redis.call('EXPIRE', KEYS[1], ttl)
end
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('EXPIRE', KEYS[4], ttl)
if ARGV[4] == '1' then redis.call('SET', KEYS[3], id, 'EX', ttl) end
redis.call('PUBLISH', ARGV[6], '{"id":' .. id .. ',' .. string.sub(ARGV[1], 2))
return id
"""

_UPDATE = """
if redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
if redis.call('EXISTS', KEYS[1]) == 0 then return -2 end
local ttl = tonumber(ARGV[2])
redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('EXPIRE', KEYS[4], ttl)
local count = redis.call('LLEN', KEYS[2])
redis.call('PUBLISH', ARGV[3], '{"lastId":' .. (count - 1) .. '}')
return count
"""

_CREATE = """
if #KEYS == 2 then
  local existing = redis.call('GET', KEYS[2])
  if existing then return existing end
  redis.call('SET', KEYS[2], ARGV[3], 'EX', tonumber(ARGV[2]))
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))
return ARGV[3]
"""

_READ = """
local record = redis.call('GET', KEYS[1])
if not record then return false end
local out = {record, redis.call('LLEN', KEYS[2]), redis.call('EXISTS', KEYS[3])}
if ARGV[1] ~= '' then
  for _, event in ipairs(redis.call('LRANGE', KEYS[2], ARGV[1], ARGV[2])) do
    out[#out + 1] = event
  end
end
return out
"""


_REFUSED, _MISSING, _CHANGED = -1, -2, -3
_EVENT_ID = re.compile(r'\{"id":(\d+),')
_LAST_ID = re.compile(r'\{"lastId":(-?\d+)\}')


def _keys(run_id: str) -> list[str]:
    base = f"quote:{run_id}"
    return [base, f"{base}:events", f"{base}:final", f"{base}:appends"]


def channel_for(run_id: str) -> str:
    return f"quote:{run_id}:events"


class _Script:
    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


class KVStore(Store):
    name = "kv"

    def __init__(
        self,
        url: str,
        token: str,
        *,
        ttl_seconds: int,
        silence_seconds: float = 16.0,
        timeout: float = 5.0,
        attempts: int = 3,
    ) -> None:
        self.url = url.rstrip("/")
        self._token = token
        self.ttl_seconds = ttl_seconds
        self.silence_seconds = silence_seconds
        self._attempts = attempts
        # The SDK's own retry would re-send a write whose reply was lost; ours resends with the
        # same nonce, which the scripts make idempotent.
        self._redis = Redis(url, token, rest_encoding=None, rest_retries=0, allow_telemetry=False)
        # The SDK's client has no timeout at all; a hung request must not hang an invocation.
        self._redis._http._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 3.0)),
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
        )
        self._stream_client: httpx.AsyncClient | None = None

    # --- plumbing ------------------------------------------------------------------------------

    async def _call(
        self, label: str, operation: Callable[[], Awaitable[T]], *, attempts: int | None = None
    ) -> T:
        """Run one REST request, retrying transport faults; every failure is StoreUnavailable.
        Only idempotent operations come through here (writes carry nonces)."""
        attempts = attempts or self._attempts
        delay = 0.05
        for attempt in range(1, attempts + 1):
            try:
                return await operation()
            except UpstashError as error:
                text = str(error)
                if "NOSCRIPT" in text:
                    raise
                if "unauthorized" in text.lower() or "WRONGPASS" in text:
                    raise StoreUnavailable(
                        f"KV refused the credentials during {label}", retry_after=None
                    ) from None
                problem = f"KV answered {label} with an error"
                log.warning("KV error during %s: %s", label, text[:200])
            except (httpx.TimeoutException, httpx.TransportError):
                problem = f"KV did not answer {label} in time"
            except (ValueError, AttributeError, TypeError, KeyError):
                # A non-JSON body (a proxy's 5xx page) or, in upstash-redis 1.8, an error body
                # on a pipeline: the request's fate is unknown, so it is retried.
                problem = f"KV sent an unreadable reply to {label}"
            if attempt < attempts:
                await asyncio.sleep(delay * (1 + random.random()))
                delay *= 4
        log.warning("%s after %d attempts", problem, attempts)
        raise StoreUnavailable(problem)

    async def _script(self, label: str, script: _Script, keys: list[str], args: list[str]) -> Any:
        async def run() -> Any:
            try:
                return await self._redis.evalsha(script.sha, keys=keys, args=args)
            except UpstashError as error:
                if "NOSCRIPT" not in str(error):
                    raise
                return await self._redis.eval(script.source, keys=keys, args=args)

        return await self._call(label, run)

    # --- the Store interface -------------------------------------------------------------------

    async def create_run(
        self, record: RunRecord, idempotency: IdempotencyClaim | None = None
    ) -> CreateOutcome:
        keys = _keys(record.run_id)[:1]
        value = ""
        if idempotency is not None:
            keys.append(f"quote:idem:{idempotency.key_hash}")
            value = idempotency_value(record.run_id, idempotency.body_hash)
        stored = await self._script(
            "create", _CREATE_SCRIPT, keys, [record.model_dump_json(), str(self.ttl_seconds), value]
        )
        if idempotency is None or stored == value:
            return CreateOutcome(created=True, run_id=record.run_id)
        run_id, body_hash = parse_idempotency_value(str(stored))
        return CreateOutcome(created=False, run_id=run_id, body_hash=body_hash)

    async def find_idempotent_run(self, idempotency: IdempotencyClaim) -> CreateOutcome | None:
        key = f"quote:idem:{idempotency.key_hash}"
        stored = await self._call("idempotency lookup", lambda: self._redis.get(key))
        if stored is None:
            return None
        run_id, body_hash = parse_idempotency_value(str(stored))
        return CreateOutcome(created=False, run_id=run_id, body_hash=body_hash)

    async def get_run(
        self, run_id: str, *, events_after: int | None = None, limit: int = 100
    ) -> RunState | None:
        start, stop = ("", "")
        if events_after is not None:
            start, stop = str(events_after + 1), str(events_after + limit)
        reply = await self._script("read", _READ_SCRIPT, _keys(run_id)[:3], [start, stop])
        if not reply:
            return None
        raw, count, fenced, *events = reply
        return RunState(
            record=RunRecord.model_validate_json(raw),
            raw=raw,
            last_event_id=int(count) - 1,
            finalized=bool(int(fenced)),
            events=[
                StoredEvent(events_after + 1 + i, wire_event(events_after + 1 + i, e))
                for i, e in enumerate(events)
            ]
            if events_after is not None
            else [],
        )

    async def update_run(self, record: RunRecord) -> None:
        result = await self._script(
            "heartbeat",
            _UPDATE_SCRIPT,
            _keys(record.run_id),
            [record.model_dump_json(), str(self.ttl_seconds), channel_for(record.run_id)],
        )
        _raise_for(int(result), record.run_id)

    async def append_event(
        self,
        run_id: str,
        event: RunEvent,
        *,
        record: RunRecord | None = None,
        nonce: str | None = None,
    ) -> int:
        return await self._append(run_id, event, record=record, nonce=nonce, expected="")

    async def _append(
        self,
        run_id: str,
        event: RunEvent,
        *,
        record: RunRecord | None,
        nonce: str | None,
        expected: str,
    ) -> int:
        args = [
            stored_event_json(event),
            nonce or uuid.uuid4().hex,
            record.model_dump_json() if record is not None else "",
            "1" if is_terminal(event) else "0",
            str(self.ttl_seconds),
            channel_for(run_id),
            expected,
        ]
        result = int(await self._script("append", _APPEND_SCRIPT, _keys(run_id), args))
        _raise_for(result, run_id)
        return result

    async def read_events(
        self, run_id: str, after: int, limit: int | None = None
    ) -> list[StoredEvent]:
        stop = after + limit if limit is not None else -1
        key = _keys(run_id)[1]
        items = await self._call("read", lambda: self._redis.lrange(key, after + 1, stop))
        return [
            StoredEvent(after + 1 + i, wire_event(after + 1 + i, e)) for i, e in enumerate(items)
        ]

    async def _append_if_unchanged(
        self, run_id: str, event: RunEvent, record: RunRecord, expected_raw: str
    ) -> int:
        return await self._append(run_id, event, record=record, nonce=None, expected=expected_raw)

    async def ping(self) -> None:
        # One attempt: a health check reports what it finds now, within its short maxDuration.
        await self._call("ping", self._redis.ping, attempts=1)

    def watch(self, run_id: str) -> EventWatch:
        from lib.store.kv_watch import KVEventWatch

        return KVEventWatch(self, run_id)

    async def aclose(self) -> None:
        await self._redis.close()
        if self._stream_client is not None:
            await self._stream_client.aclose()

    # --- push ----------------------------------------------------------------------------------

    @property
    def stream_client(self) -> httpx.AsyncClient:
        if self._stream_client is None:
            # Subscriptions stay open for minutes: no read timeout, but a bounded connect.
            self._stream_client = httpx.AsyncClient(
                timeout=httpx.Timeout(None, connect=3.0),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=20),
            )
        return self._stream_client

    def subscribe_request(self, run_id: str) -> tuple[str, dict[str, str]]:
        return (
            f"{self.url}/subscribe/{channel_for(run_id)}",
            {"Authorization": f"Bearer {self._token}", "Accept": "text/event-stream"},
        )


_APPEND_SCRIPT = _Script(_APPEND)
_UPDATE_SCRIPT = _Script(_UPDATE)
_CREATE_SCRIPT = _Script(_CREATE)
_READ_SCRIPT = _Script(_READ)


def _raise_for(result: int, run_id: str) -> None:
    if result == _REFUSED:
        raise RunFinalized(f"run {run_id} already has its terminal event")
    if result == _MISSING:
        raise RunNotFound(f"run {run_id} does not exist")
    if result == _CHANGED:
        raise RunChanged(f"run {run_id} changed since it was read")
