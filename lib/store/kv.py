"""The Vercel KV (Upstash Redis REST) backend; its push watch is in lib/store/kv_watch.py.

Layout (keys get the TTL when the run is created and again with its terminal event, the run's
last write; QUOTE_RUN_TTL_SECONDS is at least RUN_MAX_SECONDS, so nothing expires mid-run):
  quote:{id}          hash    run (RunMeta JSON), st (processing|completed|failed), end (RunEnd),
                              done (providers finished), and per provider p: s:p (ProviderWork),
                              l:p (lease "owner|until-ms|deliveries"), o:p (ProviderOutcome, once)
  quote:{id}:events   list    the events while the run is open; an event's id is its index
  quote:{id}:log      list    the same list once the run has ended: the terminal write renames it,
                              so a plain RPUSHX to :events is refused from then on (the fence)
  quote:idem:{sha256} string  Idempotency-Key -> {"runId", "bodyHash"}

Billed commands (Upstash counts each command a script runs, plus the EVALSHA): an event append is
one RPUSHX (one REST request, one command); readers learn of it from the list's keyspace
notification (no PUBLISH) and read it once per instance (LRANGE). A provider's outcome with the
run's progress is one script of four commands for two events. Retried writes whose first reply
was lost go through a script that finds the first attempt by its nonce, so they land once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx
from upstash_redis.asyncio import Redis
from upstash_redis.errors import UpstashError

from lib.models import (
    CompleteEvent,
    ErrorEvent,
    ProviderErrorEvent,
    ProviderId,
    ProviderLease,
    ProviderOutcome,
    ProviderWork,
    QuoteEvent,
    RunEnd,
    RunEvent,
    RunMeta,
    RunRecord,
    format_time,
)
from lib.store.base import (
    NONCE_CHARS,
    TAIL_EVENTS,
    CreateOutcome,
    EventWatch,
    IdempotencyClaim,
    OutcomeWritten,
    ProviderClaim,
    RunState,
    Store,
    StoredEvent,
    assemble_record,
    idempotency_value,
    new_nonce,
    parse_idempotency_value,
    progress_event_parts,
    started_event,
    stored_event_json,
    stored_items,
    wire_event,
)
from lib.store.errors import LeaseLost, RunFinalized, RunNotFound, StoreUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

# KEYS: hash, events[, idem]; ARGV: ttl, meta, started item[, idem value]
_CREATE = """
if KEYS[3] then
  local existing = redis.call('GET', KEYS[3])
  if existing then return existing end
  redis.call('SET', KEYS[3], ARGV[4], 'EX', ARGV[1])
elseif redis.call('HSETNX', KEYS[1], 'run', ARGV[2]) == 0 then
  return ''
end
redis.call('HSET', KEYS[1], 'run', ARGV[2], 'st', 'processing', 'done', 0)
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('RPUSH', KEYS[2], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[1])
return ARGV[4] or ''
"""

# KEYS: hash, events, log; ARGV: first event wanted (-1: none), last event wanted, tail length
_READ = """
local v = redis.call('HMGET', KEYS[1], 'run', 'st')
if not v[1] then return false end
local list = KEYS[2]
if v[2] ~= 'processing' then list = KEYS[3] end
local fields = redis.call('HGETALL', KEYS[1])
local count = redis.call('LLEN', list)
local tail_from = math.max(count - tonumber(ARGV[3]), 0)
local tail = {}
if tonumber(ARGV[3]) > 0 and count > 0 then tail = redis.call('LRANGE', list, tail_from, -1) end
local first = tonumber(ARGV[1])
local out = {count, fields, tail_from, #tail}
for _, event in ipairs(tail) do out[#out + 1] = event end
if first >= 0 and (#tail == 0 or first < tail_from) then
  for _, event in ipairs(redis.call('LRANGE', list, first, ARGV[2])) do out[#out + 1] = event end
end
return out
"""

# A retried append: find the first attempt by its nonce, else append now.
# KEYS: events; ARGV: nonce of the first item, items…
_APPEND_AGAIN = """
local count = redis.call('LLEN', KEYS[1])
if count == 0 then return -1 end
local tail = redis.call('LRANGE', KEYS[1], -64, -1)
local needle = '{"n":"' .. ARGV[1] .. '"'
for i, item in ipairs(tail) do
  if string.sub(item, 1, #needle) == needle then return count - #tail + i - 1 end
end
return redis.call('RPUSHX', KEYS[1], unpack(ARGV, 2)) - (#ARGV - 1)
"""

# KEYS: hash, events; ARGV: provider, owner, now-ms, lease-until-ms, alive-since (RFC 3339),
# first work JSON ('' for none), items… (stored and appended with it when no work is stored yet)
_CLAIM = """
local p = ARGV[1]
local v = redis.call('HMGET', KEYS[1], 'st', 'o:' .. p, 'l:' .. p, 's:' .. p)
if not v[1] then return {'missing'} end
if v[1] ~= 'processing' then return {'ended'} end
if v[2] then return {'finished'} end
local deliveries = 0
if v[3] then
  local holder, untl, count = string.match(v[3], '^(.*)|(%d+)|(%d+)$')
  deliveries = tonumber(count)
  if holder == ARGV[2] then
    deliveries = deliveries - 1
  elseif tonumber(untl) > tonumber(ARGV[3]) then
    return {'held', untl}
  elseif tonumber(untl) > 0 then
    -- expired, not released: the holder is alive if it wrote an event after alive-since
    local needle = '"provider":"' .. p .. '"'
    local tail = redis.call('LRANGE', KEYS[2], -32, -1)
    for i = #tail, 1, -1 do
      if string.find(tail[i], needle, 1, true) then
        local ts = string.match(tail[i], '"ts":"([^"]+)"}$')
        if ts and ts > ARGV[5] then return {'active', ts} end
        break
      end
    end
  end
end
deliveries = deliveries + 1
local lease = ARGV[2] .. '|' .. ARGV[4] .. '|' .. deliveries
if v[4] or ARGV[6] == '' then
  redis.call('HSET', KEYS[1], 'l:' .. p, lease)
  return {'claimed', v[4] or '', tostring(deliveries)}
end
redis.call('HSET', KEYS[1], 'l:' .. p, lease, 's:' .. p, ARGV[6])
if #ARGV > 6 then redis.call('RPUSHX', KEYS[2], unpack(ARGV, 7)) end
return {'claimed', ARGV[6], tostring(deliveries)}
"""

# KEYS: hash, events; ARGV: provider, owner, work JSON ('' keeps it), lease-until-ms ('' keeps
# it), retry ('1'), items… (appended with the write; on a retry, not again)
_SAVE_WORK = """
local p = ARGV[1]
local v = redis.call('HMGET', KEYS[1], 'st', 'l:' .. p)
if not v[1] then return -2 end
if v[1] ~= 'processing' then return -1 end
local holder, untl, count = string.match(v[2] or '', '^(.*)|(%d+)|(%d+)$')
if holder ~= ARGV[2] then return -3 end
local fields = {}
if ARGV[3] ~= '' then fields[#fields + 1] = 's:' .. p; fields[#fields + 1] = ARGV[3] end
if ARGV[4] ~= '' then
  fields[#fields + 1] = 'l:' .. p
  fields[#fields + 1] = holder .. '|' .. ARGV[4] .. '|' .. count
end
if #fields > 0 then redis.call('HSET', KEYS[1], unpack(fields)) end
if #ARGV > 5 then
  if ARGV[5] == '1' then
    local needle = string.sub(ARGV[6], 1, NEEDLE_LENGTH)
    for _, item in ipairs(redis.call('LRANGE', KEYS[2], -64, -1)) do
      if string.sub(item, 1, #needle) == needle then return 0 end
    end
  end
  redis.call('RPUSHX', KEYS[2], unpack(ARGV, 6))
end
return 0
""".replace("NEEDLE_LENGTH", str(len('{"n":"') + NONCE_CHARS + 1))

# KEYS: hash, events; ARGV: provider, outcome JSON, event item, progress prefix, progress
# suffix, total
_OUTCOME = """
if redis.call('HSETNX', KEYS[1], 'o:' .. ARGV[1], ARGV[2]) == 0 then
  local v = redis.call('HMGET', KEYS[1], 'st', 'done')
  if v[1] ~= 'processing' then return {-1, 0} end
  return {-4, tonumber(v[2] or 0)}
end
local done = redis.call('HINCRBY', KEYS[1], 'done', 1)
local total = tonumber(ARGV[6])
local progress = ARGV[4] .. done .. ',"total":' .. total .. ',"percent":'
  .. math.floor(done * 100 / total) .. ARGV[5]
local count = redis.call('RPUSHX', KEYS[2], ARGV[3], progress)
if count == 0 then
  if redis.call('HEXISTS', KEYS[1], 'run') == 0 then
    redis.call('DEL', KEYS[1])
    return {-2, 0}
  end
  redis.call('HDEL', KEYS[1], 'o:' .. ARGV[1])
  redis.call('HINCRBY', KEYS[1], 'done', -1)
  return {-1, 0}
end
return {count - 2, done}
"""

# KEYS: hash, events, log; ARGV: status, end JSON, terminal item, ttl
_FINISH = """
local count = redis.call('RPUSHX', KEYS[2], ARGV[3])
if count == 0 then
  if redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
  return -2
end
redis.call('RENAME', KEYS[2], KEYS[3])
redis.call('HSET', KEYS[1], 'st', ARGV[1], 'end', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[3], ARGV[4])
return count - 1
"""

# KEYS: idem; ARGV: the value that maps it to the run being forgotten
_FORGET = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""


_REFUSED, _MISSING, _LEASE_LOST, _ALREADY = -1, -2, -3, -4
# The flags readers need: keyspace events (K) for list (l) and generic (g: RENAME) commands.
NOTIFY_FLAGS = "Klg"


def _keys(run_id: str) -> list[str]:
    base = f"quote:{run_id}"
    return [base, f"{base}:events", f"{base}:log"]


def keyspace_channel(run_id: str) -> str:
    """The channel on which Redis announces every change to the run's open event list."""
    return f"__keyspace@0__:quote:{run_id}:events"


def _ms(moment: datetime) -> str:
    return str(int(moment.timestamp() * 1000))


def _from_ms(raw: str | bytes) -> datetime:
    return datetime.fromtimestamp(int(raw) / 1000, UTC)


def _parse_lease(raw: str) -> ProviderLease | None:
    owner, _, rest = raw.rpartition("|")
    owner, _, until = owner.rpartition("|")
    if not owner or not until.isdigit() or not rest.isdigit():
        return None
    return ProviderLease(owner=owner, until=_from_ms(until), deliveries=int(rest))


def _record_from_fields(fields: dict[str, str], tail: list[StoredEvent]) -> RunRecord:
    meta = RunMeta.model_validate_json(fields["run"])
    end = RunEnd.model_validate_json(fields["end"]) if "end" in fields else None
    outcomes, work, leases = {}, {}, {}
    for provider in meta.providers:
        if raw := fields.get(f"o:{provider}"):
            outcomes[provider] = ProviderOutcome.model_validate_json(raw)
        if raw := fields.get(f"s:{provider}"):
            work[provider] = ProviderWork.model_validate_json(raw)
        if (raw := fields.get(f"l:{provider}")) and (lease := _parse_lease(raw)):
            leases[provider] = lease
    return assemble_record(meta, end, outcomes, work, leases, tail)


class _Script:
    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


_CREATE_SCRIPT = _Script(_CREATE)
_READ_SCRIPT = _Script(_READ)
_APPEND_AGAIN_SCRIPT = _Script(_APPEND_AGAIN)
_CLAIM_SCRIPT = _Script(_CLAIM)
_SAVE_WORK_SCRIPT = _Script(_SAVE_WORK)
_OUTCOME_SCRIPT = _Script(_OUTCOME)
_FINISH_SCRIPT = _Script(_FINISH)
_FORGET_SCRIPT = _Script(_FORGET)


class _FateUnknown(Exception):
    """A write's request failed in a way that leaves unknown whether the server applied it."""


def rest_client(url: str, token: str, *, timeout: float = 5.0) -> Redis:
    """The Upstash REST client of one instance, shared by its store and admission (one pool of
    connections, so one TLS handshake per connection, not one per component).

    The SDK's own retry would re-send a write whose reply was lost; the callers re-send only
    what their scripts make idempotent, so it is off. The SDK's httpx client has no timeout at
    all, and a hung request must not hang an invocation: it is replaced by one that has one."""
    redis = Redis(url, token, rest_encoding=None, rest_retries=0, allow_telemetry=False)
    redis._http._client = httpx.AsyncClient(
        timeout=httpx.Timeout(timeout, connect=min(timeout, 3.0)),
        limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
    )
    return redis


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
        self._redis = rest_client(url, token, timeout=timeout)
        self._stream_client: httpx.AsyncClient | None = None
        self._notifications: asyncio.Task[bool] | None = None

    @property
    def rest(self) -> Redis:
        """This store's REST client, for another component of the instance to share (the store
        closes it)."""
        return self._redis

    # --- plumbing ------------------------------------------------------------------------------

    async def _call(
        self, label: str, operation: Callable[[], Awaitable[T]], *, attempts: int | None = None
    ) -> T:
        """Run one REST request, retrying transport faults; every failure is StoreUnavailable.
        Only idempotent operations are retried here."""
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

    async def _script(
        self,
        label: str,
        script: _Script,
        keys: list[str],
        args: list[str],
        *,
        attempts: int | None = None,
    ) -> Any:
        async def run() -> Any:
            try:
                return await self._redis.evalsha(script.sha, keys=keys, args=args)
            except UpstashError as error:
                if "NOSCRIPT" not in str(error):
                    raise
                return await self._redis.eval(script.source, keys=keys, args=args)

        return await self._call(label, run, attempts=attempts)

    # --- the Store interface -------------------------------------------------------------------

    async def create_run(
        self, record: RunRecord, idempotency: IdempotencyClaim | None = None
    ) -> CreateOutcome:
        hash_key, events_key, _ = _keys(record.run_id)
        keys = [hash_key, events_key]
        value = ""
        if idempotency is not None:
            keys.append(f"quote:idem:{idempotency.key_hash}")
            value = idempotency_value(record.run_id, idempotency.body_hash)
        started = stored_event_json(started_event(record), new_nonce())
        args = [str(self.ttl_seconds), record.meta.model_dump_json(), started]
        if value:
            args.append(value)
        stored = await self._script("create", _CREATE_SCRIPT, keys, args)
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

    async def release_idempotency(self, claim: IdempotencyClaim, run_id: str) -> None:
        value = idempotency_value(run_id, claim.body_hash)
        await self._script("forget", _FORGET_SCRIPT, [f"quote:idem:{claim.key_hash}"], [value])

    async def get_run(
        self,
        run_id: str,
        *,
        events_after: int | None = None,
        limit: int = 100,
        tail: int = TAIL_EVENTS,
    ) -> RunState | None:
        first, last = (-1, -1) if events_after is None else (events_after + 1, events_after + limit)
        reply = await self._script(
            "read", _READ_SCRIPT, _keys(run_id), [str(first), str(last), str(tail)]
        )
        if not reply:
            return None
        count, flat, tail_from, tail_count, *items = reply
        tail_from, tail_count = int(tail_from), int(tail_count)
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        recent = [
            StoredEvent(tail_from + i, wire_event(tail_from + i, item))
            for i, item in enumerate(items[:tail_count])
        ]
        record = _record_from_fields(fields, recent)
        events: list[StoredEvent] = []
        if events_after is not None:
            if len(items) > tail_count:
                start = events_after + 1
                events = [
                    StoredEvent(start + i, wire_event(start + i, item))
                    for i, item in enumerate(items[tail_count:])
                ]
            else:
                events = [e for e in recent if e.id > events_after][:limit]
        return RunState(
            record=record,
            last_event_id=int(count) - 1,
            finalized=record.status != "processing",
            events=events,
        )

    async def append_events(
        self,
        run_id: str,
        events: Sequence[RunEvent],
        *,
        nonce: str | None = None,
        again: bool = False,
    ) -> int:
        batch = stored_items(events, nonce)
        items = [item.json for item in batch]
        _, events_key, log_key = _keys(run_id)
        try:
            if again:
                raise StoreUnavailable("a caller's retry")  # look for the first attempt
            count = await self._call(
                "append", lambda: self._redis.rpushx(events_key, *items), attempts=1
            )
            first = int(count) - len(items)
        except StoreUnavailable:
            # The first request's fate is unknown: this one finds it by its nonce, or appends.
            first = int(
                await self._script(
                    "append", _APPEND_AGAIN_SCRIPT, [events_key], [batch[0].nonce, *items]
                )
            )
        if first < 0:
            await self._raise_refused(run_id, log_key)
        return first

    async def _raise_refused(self, run_id: str, log_key: str) -> None:
        if await self._call("read", lambda: self._redis.exists(log_key)):
            raise RunFinalized(f"run {run_id} has ended")
        raise RunNotFound(f"run {run_id} does not exist")

    async def claim_provider(
        self,
        run_id: str,
        provider: ProviderId,
        owner: str,
        *,
        now: datetime,
        lease_until: datetime,
        alive_since: datetime,
        first_work: ProviderWork | None = None,
        first_events: Sequence[RunEvent] = (),
    ) -> ProviderClaim:
        hash_key, events_key, _ = _keys(run_id)
        # In the events' own format (ms, "Z"), so the script's string comparison is a time's.
        args = [provider, owner, _ms(now), _ms(lease_until), format_time(alive_since)]
        if first_work is not None:
            args.append(first_work.model_dump_json())
            args += [item.json for item in stored_items(first_events)]
        else:
            args.append("")
        reply = await self._script("claim", _CLAIM_SCRIPT, [hash_key, events_key], args)
        result = str(reply[0])
        if result == "claimed":
            work = ProviderWork.model_validate_json(reply[1]) if reply[1] else ProviderWork()
            return ProviderClaim("claimed", work=work, deliveries=int(reply[2]))
        if result == "held":
            return ProviderClaim("held", busy_until=_from_ms(reply[1]))
        if result == "active":
            last = datetime.fromisoformat(str(reply[1]))
            return ProviderClaim("held", busy_until=last + (lease_until - now))
        if result in ("finished", "ended", "missing"):
            return ProviderClaim(result)  # type: ignore[arg-type]
        raise StoreUnavailable(f"KV answered claim with {result!r}")

    async def renew_lease(
        self, run_id: str, provider: ProviderId, owner: str, until: datetime
    ) -> None:
        await self._save_work(run_id, provider, owner, "", _ms(until), [])

    async def save_provider_work(
        self,
        run_id: str,
        provider: ProviderId,
        owner: str,
        work: ProviderWork,
        events: Sequence[RunEvent] = (),
        *,
        lease_until: datetime | None = None,
        nonce: str | None = None,
        again: bool = False,
    ) -> None:
        items = [item.json for item in stored_items(events, nonce)]
        until = _ms(lease_until) if lease_until is not None else ""
        await self._save_work(
            run_id, provider, owner, work.model_dump_json(), until, items, again=again
        )

    async def _save_work(
        self,
        run_id: str,
        provider: ProviderId,
        owner: str,
        work_json: str,
        until: str,
        items: list[str],
        *,
        again: bool = False,
    ) -> None:
        keys = _keys(run_id)[:2]

        def args(retry: bool) -> list[str]:
            return [provider, owner, work_json, until, "1" if retry else "0", *items]

        try:
            result = await self._script(
                "provider write", _SAVE_WORK_SCRIPT, keys, args(again), attempts=1
            )
        except StoreUnavailable:
            # Its fate is unknown: the retry appends the events only if they are not there.
            result = await self._script(
                "provider write",
                _SAVE_WORK_SCRIPT,
                keys,
                args(True),
                attempts=max(self._attempts - 1, 1),
            )
        result = int(result)
        if result == _REFUSED:
            raise RunFinalized(f"run {run_id} has ended")
        if result == _MISSING:
            raise RunNotFound(f"run {run_id} does not exist")
        if result == _LEASE_LOST:
            raise LeaseLost(f"{provider} of run {run_id} is no longer {owner}'s")

    async def record_outcome(
        self,
        run_id: str,
        provider: ProviderId,
        outcome: ProviderOutcome,
        event: QuoteEvent | ProviderErrorEvent,
        *,
        total: int,
    ) -> OutcomeWritten:
        hash_key, events_key, _ = _keys(run_id)
        prefix, suffix = progress_event_parts(new_nonce(), event.ts)
        args = [
            provider,
            outcome.model_dump_json(),
            stored_event_json(event, new_nonce()),
            prefix,
            suffix,
            str(total),
        ]
        first, completed = await self._script(
            "outcome", _OUTCOME_SCRIPT, [hash_key, events_key], args
        )
        if int(first) == _REFUSED:
            raise RunFinalized(f"run {run_id} has ended")
        if int(first) == _MISSING:
            raise RunNotFound(f"run {run_id} does not exist")
        if int(first) == _ALREADY:
            return OutcomeWritten(first_id=None, completed=int(completed))
        return OutcomeWritten(first_id=int(first), completed=int(completed))

    async def finish_run(self, run_id: str, event: CompleteEvent | ErrorEvent, end: RunEnd) -> int:
        item = stored_event_json(event, new_nonce())
        args = [end.status, end.model_dump_json(), item, str(self.ttl_seconds)]
        result = int(await self._script("finish", _FINISH_SCRIPT, _keys(run_id), args))
        if result == _REFUSED:
            raise RunFinalized(f"run {run_id} has already ended")
        if result == _MISSING:
            raise RunNotFound(f"run {run_id} does not exist")
        return result

    async def read_events(
        self, run_id: str, after: int, limit: int | None = None
    ) -> list[StoredEvent]:
        stop = after + limit if limit is not None else -1
        _, events_key, log_key = _keys(run_id)
        items = await self._call("read", lambda: self._redis.lrange(events_key, after + 1, stop))
        if not items:
            # An open run's list, or the ended run's: one of the two is there.
            items = await self._call("read", lambda: self._redis.lrange(log_key, after + 1, stop))
        return [
            StoredEvent(after + 1 + i, wire_event(after + 1 + i, e)) for i, e in enumerate(items)
        ]

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

    async def notifications_enabled(self) -> bool:
        """Make sure Redis announces list changes on keyspace channels (once per instance):
        readers subscribe to them instead of writers publishing every event."""
        if self._notifications is None:
            self._notifications = asyncio.ensure_future(self._enable_notifications())
        try:
            return await asyncio.shield(self._notifications)
        except Exception:
            self._notifications = None
            return False

    async def _enable_notifications(self) -> bool:
        try:
            reply = await self._call(
                "config", lambda: self._redis.execute(["CONFIG", "GET", "notify-keyspace-events"])
            )
            current = str(reply[1]) if isinstance(reply, list) and len(reply) > 1 else ""
            expanded = current.replace("A", "g$lshzxe")
            if all(flag in expanded for flag in NOTIFY_FLAGS):
                return True
            wanted = current + "".join(f for f in NOTIFY_FLAGS if f not in expanded)
            await self._call(
                "config",
                lambda: self._redis.execute(["CONFIG", "SET", "notify-keyspace-events", wanted]),
            )
            log.info("enabled keyspace notifications (%s) for push delivery", wanted)
            return True
        except StoreUnavailable as error:
            log.warning("keyspace notifications unavailable (%s): readers poll", error)
            return False

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
            f"{self.url}/subscribe/{keyspace_channel(run_id)}",
            {"Authorization": f"Bearer {self._token}", "Accept": "text/event-stream"},
        )

    # --- the deployment's agent slots ----------------------------------------------------------

    async def take_agent_slot(
        self, holder: str, *, limit: int, now: datetime, until: datetime
    ) -> bool:
        args = [holder, str(limit), _ms(now), _ms(until)]
        taken = await self._script("agent-slot", _AGENT_SLOT_SCRIPT, [AGENT_SLOTS_KEY], args)
        return int(taken) == 1

    async def release_agent_slot(self, holder: str) -> None:
        await self._call("agent-slot", lambda: self._redis.zrem(AGENT_SLOTS_KEY, holder))


# The deployment's agent runs in flight: holder ("{runId}:{provider}") scored by its lease's end.
AGENT_SLOTS_KEY = "quote:agent-slots"
# Returns 1 when the holder has its slot (renewed or newly taken), 0 when all are held.
_AGENT_SLOT = """
local slots_key = KEYS[1]
local holder = ARGV[1]
local limit = tonumber(ARGV[2])
local now_ms = tonumber(ARGV[3])
local until_ms = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', slots_key, '-inf', now_ms)
local held = redis.call('ZSCORE', slots_key, holder)
if not held and redis.call('ZCARD', slots_key) >= limit then
  return 0
end
redis.call('ZADD', slots_key, until_ms, holder)
local last = redis.call('ZRANGE', slots_key, -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', slots_key, last[2])
return 1
"""
_AGENT_SLOT_SCRIPT = _Script(_AGENT_SLOT)
