"""The Vercel KV (Upstash Redis REST) backend; its push (`KVPush`, which the store owns) is in
lib/store/kv_watch.py.

Layout (keys get the TTL when the run is created and again with its terminal event, the run's
last write; QUOTE_RUN_TTL_SECONDS is at least RUN_MAX_SECONDS, so nothing expires mid-run):
  quote:{id}          hash    run (RunMeta JSON), st (RunStatus), end (RunEnd),
                              done (providers finished), and per provider p: s:p (ProviderWork),
                              l:p (lease "owner|until-ms|deliveries"), o:p (ProviderOutcome, once),
                              r:p:owner (until-ms: the holder's renewals, one HSET each; the
                              claim writes it, a takeover and the run's end delete it)
  quote:{id}:events   list    the events while the run is open; an event's id is its index
  quote:{id}:log      list    the same list once the run has ended: the terminal write renames it,
                              so a plain RPUSHX to :events is refused from then on (the fence)
  quote:idem:{sha256} string  Idempotency-Key -> {"runId", "bodyHash"}

Billed commands (Upstash counts each command a script runs, plus the EVALSHA): an event append is
one RPUSHX (one REST request, one command); readers learn of it from the list's keyspace
notification (no PUBLISH) and read it once per instance (LRANGE). A provider's outcome with the
run's progress is one script of four commands for two events; a lease renewal is one HSET.
Every script locks only the keys it declares (lib/store/upstash.py). Retried writes whose first
reply was lost go through a script that finds the first attempt by its nonce, so they land once;
a first attempt still in transit when its retry ran lands after it, and readers skip that copy
(lib/store/base.py, first_copies).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn, TypeVar

import httpx

from lib.models import (
    CancelledEvent,
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
    REPEAT_WINDOW,
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
    first_copies,
    idempotency_value,
    is_released,
    mapped_run,
    new_nonce,
    progress_event_parts,
    started_event,
    stored_event_json,
    stored_items,
    stored_nonce,
)
from lib.store.errors import (
    LeaseLost,
    OutcomesChanged,
    RunFinalized,
    RunNotFound,
    StoreUnavailable,
)
from lib.store.kv_watch import KVPush, PushTimings
from lib.store.kv_watch import keyspace_channel as keyspace_channel
from lib.store.upstash import LuaScript, UpstashError, UpstashRest

log = logging.getLogger(__name__)
T = TypeVar("T")

CREATE = LuaScript(
    "create",
    keys=("run_key", "events_key", "idem_key"),
    args=("ttl", "meta", "started_item", "idem_value"),
    returns="{'created'}; {'exists'}: the run was there already (its own create, retried); "
    "{'replay', value}: the idempotency key already maps to a run (value may be this one's)",
    body="""
if idem_key then
  local existing = redis.call('GET', idem_key)
  if existing then return {'replay', existing} end
  redis.call('SET', idem_key, idem_value, 'EX', ttl)
elseif redis.call('HSETNX', run_key, 'run', meta) == 0 then
  return {'exists'}
end
redis.call('HSET', run_key, 'run', meta, 'st', 'processing', 'done', 0)
redis.call('EXPIRE', run_key, ttl)
redis.call('RPUSH', events_key, started_item)
redis.call('EXPIRE', events_key, ttl)
return {'created'}
""",
)

READ = LuaScript(
    "read",
    keys=("run_key", "events_key", "log_key"),
    args=("first", "last", "tail", "window"),
    returns="false: no such run; else {event count, the hash's fields (flat), the tail (the "
    "last `tail` events), the page (events first..last when wanted, first = -1: none, and not "
    "all in the tail)}, each read as {index of its first event, its items, the nonces of up "
    "to `window` events before it}",
    body="""
local fields = redis.call('HGETALL', run_key)
local known, status = false, nil
for i = 1, #fields, 2 do
  if fields[i] == 'run' then known = true elseif fields[i] == 'st' then status = fields[i + 1] end
end
if not known then return false end
local list = events_key
if status ~= 'processing' then list = log_key end
local count = redis.call('LLEN', list)
local span = tonumber(window)
-- One LRANGE from `window` events before `from`: the earlier ones' nonces, then the items.
local function read(from, to)
  local start = math.max(from - span, 0)
  local got = redis.call('LRANGE', list, start, to)
  local nonces, items = {}, {}
  for i, item in ipairs(got) do
    if start + i - 1 < from then
      nonces[#nonces + 1] = string.sub(item, NONCE_FROM, NONCE_TO)
    else
      items[#items + 1] = item
    end
  end
  return {from, items, nonces}
end
local tail_from = math.max(count - tonumber(tail), 0)
local recent = {tail_from, {}, {}}
if tonumber(tail) > 0 and count > 0 then recent = read(tail_from, -1) end
local from = tonumber(first)
local page = {from, {}, {}}
if from >= 0 and (#recent[2] == 0 or from < tail_from) then page = read(from, last) end
return {count, fields, recent, page}
""".replace("NONCE_FROM", str(len('{"n":"') + 1)).replace(
        "NONCE_TO", str(len('{"n":"') + NONCE_CHARS)
    ),
)

APPEND_AGAIN = LuaScript(
    "append again",
    keys=("events_key",),
    args=("nonce",),
    more_args="items",
    returns="{'found', first id}: the first attempt is there; {'appended', first id}; "
    "{'refused'}: no open event list (the run has ended or does not exist)",
    body="""
local count = redis.call('LLEN', events_key)
if count == 0 then return {'refused'} end
local tail = redis.call('LRANGE', events_key, -64, -1)
local needle = '{"n":"' .. nonce .. '"'
for i, item in ipairs(tail) do
  if string.sub(item, 1, #needle) == needle then return {'found', count - #tail + i - 1} end
end
return {'appended', redis.call('RPUSHX', events_key, unpack(items)) - #items}
""",
)

# The rule both backends state (lib/store/base.py, claim_provider): another owner is alive on the
# provider while its lease runs, or, its lease ended but not released, while the provider's
# latest event (of the whole run, not a window of it) is newer than alive_since. Times are
# compared as format_time strings: fixed-width UTC, so their order is the order in time.
CLAIM = LuaScript(
    "claim",
    keys=("run_key", "events_key"),
    args=("provider", "owner", "now_ms", "lease_until_ms", "alive_since", "first_work"),
    more_args="first_items",
    returns="{'claimed', work JSON or '', deliveries}; {'held', lease (or renewal) end ms}; "
    "{'writing', the holder's latest event time}; {'finished'}; {'ended'}; {'missing'}",
    body="""
local v = redis.call('HMGET', run_key, 'st', 'o:' .. provider, 'l:' .. provider,
  's:' .. provider)
if not v[1] then return {'missing'} end
if v[1] ~= 'processing' then return {'ended'} end
if v[2] then return {'finished'} end
local deliveries = 0
if v[3] then
  local holder, lease_end, count = string.match(v[3], '^(.*)|(%d+)|(%d+)$')
  deliveries = tonumber(count)
  if holder == owner then
    deliveries = deliveries - 1
  elseif tonumber(lease_end) > tonumber(now_ms) then
    return {'held', lease_end}
  elseif tonumber(lease_end) > 0 then
    -- Not released: the holder's own renewals (one HSET each) may have moved its lease on.
    local renewed = redis.call('HGET', run_key, 'r:' .. provider .. ':' .. holder)
    if renewed and tonumber(renewed) > tonumber(now_ms) then return {'held', renewed} end
    local needle = '"provider":"' .. provider .. '"'
    local events = redis.call('LRANGE', events_key, 0, -1)
    for i = #events, 1, -1 do
      if string.find(events[i], needle, 1, true) then
        local ts = string.match(events[i], '"ts":"([^"]+)"}$')
        if ts and ts > alive_since then return {'writing', ts} end
        break
      end
    end
    -- Taken over: the holder's renewals must find their field gone (LeaseLost).
    redis.call('HDEL', run_key, 'r:' .. provider .. ':' .. holder)
  end
end
deliveries = deliveries + 1
local lease = owner .. '|' .. lease_until_ms .. '|' .. deliveries
local renewal = 'r:' .. provider .. ':' .. owner
if v[4] or first_work == '' then
  redis.call('HSET', run_key, 'l:' .. provider, lease, renewal, lease_until_ms)
  return {'claimed', v[4] or '', tostring(deliveries)}
end
redis.call('HSET', run_key, 'l:' .. provider, lease, renewal, lease_until_ms, 's:' .. provider,
  first_work)
if #first_items > 0 then redis.call('RPUSHX', events_key, unpack(first_items)) end
return {'claimed', first_work, tostring(deliveries)}
""",
)

SAVE_WORK = LuaScript(
    "provider write",
    keys=("run_key", "events_key"),
    args=("provider", "owner", "work", "lease_until_ms", "retry"),
    more_args="items",
    returns="{'saved'}; {'lease_lost'}: owner does not hold the lease; {'ended'}; {'missing'}",
    body="""
local v = redis.call('HMGET', run_key, 'st', 'l:' .. provider)
if not v[1] then return {'missing'} end
if v[1] ~= 'processing' then return {'ended'} end
local holder, lease_end, count = string.match(v[2] or '', '^(.*)|(%d+)|(%d+)$')
if holder ~= owner then return {'lease_lost'} end
local fields = {}
if work ~= '' then fields[#fields + 1] = 's:' .. provider; fields[#fields + 1] = work end
if lease_until_ms ~= '' then
  fields[#fields + 1] = 'l:' .. provider
  fields[#fields + 1] = holder .. '|' .. lease_until_ms .. '|' .. count
  if lease_until_ms ~= '0' then
    fields[#fields + 1] = 'r:' .. provider .. ':' .. holder
    fields[#fields + 1] = lease_until_ms
  end
end
if #fields > 0 then redis.call('HSET', run_key, unpack(fields)) end
-- Released: the holder's renewals must find their field gone (the release rule: LeaseLost).
if lease_until_ms == '0' then redis.call('HDEL', run_key, 'r:' .. provider .. ':' .. holder) end
if #items > 0 then
  if retry == '1' then
    local needle = string.sub(items[1], 1, NEEDLE_LENGTH)
    for _, item in ipairs(redis.call('LRANGE', events_key, -64, -1)) do
      if string.sub(item, 1, #needle) == needle then return {'saved'} end
    end
  end
  redis.call('RPUSHX', events_key, unpack(items))
end
return {'saved'}
""".replace("NEEDLE_LENGTH", str(len('{"n":"') + NONCE_CHARS + 1)),
)

OUTCOME = LuaScript(
    "outcome",
    keys=("run_key", "events_key"),
    args=("provider", "outcome", "event_item", "progress_prefix", "progress_suffix", "total"),
    returns="{'recorded', the event's id, providers done}; {'already', providers done}: an "
    "outcome was stored before; {'ended'}; {'missing'}",
    body="""
if redis.call('HSETNX', run_key, 'o:' .. provider, outcome) == 0 then
  local v = redis.call('HMGET', run_key, 'st', 'done')
  if v[1] ~= 'processing' then return {'ended'} end
  return {'already', tonumber(v[2] or 0)}
end
local done = redis.call('HINCRBY', run_key, 'done', 1)
local of = tonumber(total)
local progress = progress_prefix .. done .. ',"total":' .. of .. ',"percent":'
  .. math.floor(done * 100 / of) .. progress_suffix
local count = redis.call('RPUSHX', events_key, event_item, progress)
if count == 0 then
  if redis.call('HEXISTS', run_key, 'run') == 0 then
    redis.call('DEL', run_key)
    return {'missing'}
  end
  redis.call('HDEL', run_key, 'o:' .. provider)
  redis.call('HINCRBY', run_key, 'done', -1)
  return {'ended'}
end
return {'recorded', count - 2, done}
""",
)

# The fence, once a run's terminal item is pushed (FINISH's and CANCEL's): the open list becomes
# the ended one, so every later RPUSHX to it is refused; the holders' renewal fields go, so a
# renewal after the end finds nothing to renew (RunFinalized); the end and both TTLs are set.
_SEAL = """
redis.call('RENAME', events_key, log_key)
local renewals = {}
for _, name in ipairs(redis.call('HKEYS', run_key)) do
  if string.sub(name, 1, 2) == 'r:' then renewals[#renewals + 1] = name end
end
if #renewals > 0 then redis.call('HDEL', run_key, unpack(renewals)) end
redis.call('HSET', run_key, 'st', status, 'end', run_end)
redis.call('EXPIRE', run_key, ttl)
redis.call('EXPIRE', log_key, ttl)
"""

FINISH = LuaScript(
    "finish",
    keys=("run_key", "events_key", "log_key"),
    args=("status", "run_end", "terminal_item", "ttl"),
    returns="{'finished', the terminal event's id}; {'ended'}: already; {'missing'}",
    body="""
local count = redis.call('RPUSHX', events_key, terminal_item)
if count == 0 then
  if redis.call('EXISTS', log_key) == 1 then return {'ended'} end
  return {'missing'}
end
"""
    + _SEAL
    + """
return {'finished', count - 1}
""",
)

# The run's end by cancel: FINISH's fence, made only while `done` (providers with their outcome)
# is what the caller read, so the cancelled event lists every quote received. A retry whose first
# reply was lost finds its own terminal item (by its nonce) and answers as the first would have.
CANCEL = LuaScript(
    "cancel",
    keys=("run_key", "events_key", "log_key"),
    args=("run_end", "terminal_item", "ttl", "completed"),
    returns=(
        "{'cancelled', the terminal event's id} (also to a retry that finds its own); "
        "{'outcomes_changed'}: a provider finished since the caller read; {'ended'}; {'missing'}"
    ),
    body="""
local v = redis.call('HMGET', run_key, 'st', 'done')
if not v[1] then return {'missing'} end
if v[1] ~= 'processing' then
  local last = redis.call('LINDEX', log_key, -1) or ''
  local mine = string.sub(terminal_item, 1, NEEDLE_LENGTH)
  if v[1] == 'cancelled' and string.sub(last, 1, NEEDLE_LENGTH) == mine then
    return {'cancelled', redis.call('LLEN', log_key) - 1}
  end
  return {'ended'}
end
if tonumber(v[2] or 0) ~= tonumber(completed) then return {'outcomes_changed'} end
local count = redis.call('RPUSHX', events_key, terminal_item)
if count == 0 then return {'missing'} end
local status = 'cancelled'
""".replace("NEEDLE_LENGTH", str(len('{"n":"') + NONCE_CHARS + 1))
    + _SEAL
    + """
return {'cancelled', count - 1}
""",
)

# A renewal (one HSET of the owner's renewal field) that created its field: the owner was not
# holding the lease, or the run has ended or is gone. Takes the field back out (a hash left with
# no field is deleted, so a renewal of an expired run leaves nothing) and says why.
RENEWAL_REFUSED = LuaScript(
    "renewal refused",
    keys=("run_key",),
    args=("renewal_field",),
    returns="{'missing'}; {'ended'}; {'lease_lost'}",
    body="""
redis.call('HDEL', run_key, renewal_field)
local v = redis.call('HMGET', run_key, 'run', 'st')
if not v[1] then return {'missing'} end
if v[2] ~= 'processing' then return {'ended'} end
return {'lease_lost'}
""",
)

FORGET = LuaScript(
    "forget",
    keys=("idem_key",),
    args=("idem_value",),
    returns="{'forgotten'}; {'kept'}: the key maps to another run (or to none)",
    body="""
if redis.call('GET', idem_key) ~= idem_value then return {'kept'} end
redis.call('DEL', idem_key)
return {'forgotten'}
""",
)

# Upstash runs a script on the primary: what a read region has not applied yet is read here.
READ_ON_PRIMARY = LuaScript(
    "read on primary",
    keys=("events_key", "log_key"),
    args=("start", "stop"),
    returns="the open list's items from start to stop, else the ended list's",
    body="""
local items = redis.call('LRANGE', events_key, start, stop)
if #items == 0 then items = redis.call('LRANGE', log_key, start, stop) end
return items
""",
)

# The deployment's agent runs in flight: holder ("{runId}:{provider}") scored by its lease's end.
AGENT_SLOTS_KEY = "quote:agent-slots"
AGENT_SLOT = LuaScript(
    "agent slot",
    keys=("slots_key",),
    args=("holder", "limit", "now_ms", "until_ms"),
    returns="{'taken'}: the holder has its slot (renewed or newly taken); {'full'}: all are held",
    body="""
redis.call('ZREMRANGEBYSCORE', slots_key, '-inf', tonumber(now_ms))
local held = redis.call('ZSCORE', slots_key, holder)
if not held and redis.call('ZCARD', slots_key) >= tonumber(limit) then
  return {'full'}
end
redis.call('ZADD', slots_key, tonumber(until_ms), holder)
local last = redis.call('ZRANGE', slots_key, -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', slots_key, last[2])
return {'taken'}
""",
)

SCRIPTS = (
    CREATE,
    READ,
    READ_ON_PRIMARY,
    APPEND_AGAIN,
    CLAIM,
    SAVE_WORK,
    OUTCOME,
    FINISH,
    CANCEL,
    RENEWAL_REFUSED,
    FORGET,
    AGENT_SLOT,
)

# Runs whose last read an instance remembers (a few per open stream).
_RUNS_REMEMBERED = 512


def _keys(run_id: str) -> list[str]:
    base = f"quote:{run_id}"
    return [base, f"{base}:events", f"{base}:log"]


def _ms(moment: datetime) -> str:
    return str(int(moment.timestamp() * 1000))


def _from_ms(raw: str | bytes) -> datetime:
    return datetime.fromtimestamp(int(raw) / 1000, UTC)


def _renewal_field(provider: str, owner: str) -> str:
    return f"r:{provider}:{owner}"


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
            renewed = fields.get(_renewal_field(provider, lease.owner), "")
            if renewed.isdigit() and not is_released(lease.until):
                lease = lease.model_copy(update={"until": max(lease.until, _from_ms(renewed))})
            leases[provider] = lease
    return assemble_record(meta, end, outcomes, work, leases, tail)


def _refuse(status: str, run_id: str, lease_lost: str = "") -> NoReturn:
    """The one place a script's refusal becomes the store's error."""
    if status == "ended":
        raise RunFinalized(f"run {run_id} has ended")
    if status == "missing":
        raise RunNotFound(f"run {run_id} does not exist")
    if status == "lease_lost" and lease_lost:
        raise LeaseLost(lease_lost)
    raise StoreUnavailable(f"KV answered run {run_id}'s write with {status!r}")


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
        transport: httpx.AsyncBaseTransport | None = None,
        push_timings: PushTimings | None = None,
    ) -> None:
        """`transport`: httpx's, for the REST client (tests pass one that loses replies)."""
        self.url = url.rstrip("/")
        self.ttl_seconds = ttl_seconds
        self._attempts = attempts
        self._rest = UpstashRest(url, token, transport=transport, timeout=timeout)
        # run id -> (the last event id read, the nonces of the REPEAT_WINDOW events up to it)
        self._read_through: OrderedDict[str, tuple[int, list[str]]] = OrderedDict()
        self.push = KVPush(
            self.url,
            token,
            read_events=self.read_events,
            read_on_primary=lambda run_id, after: self.read_events(run_id, after, on_primary=True),
            command=lambda command: self._call(
                command[0].lower(), lambda: self._rest.command(*command)
            ),
            timings=push_timings or PushTimings(silence_seconds=silence_seconds),
        )

    @property
    def rest(self) -> UpstashRest:
        """This store's REST client, for another component of the instance to share (the store
        closes it)."""
        return self._rest

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
                if error.unauthorized:
                    raise StoreUnavailable(
                        f"KV refused the credentials during {label}", retry_after=None
                    ) from None
                problem = f"KV answered {label} with an error"
                log.warning("KV error during %s: %s", label, str(error)[:200])
            except (httpx.TimeoutException, httpx.TransportError):
                problem = f"KV did not answer {label} in time"
            except ValueError:
                # A non-JSON body (a proxy's 5xx page): the request's fate is unknown.
                problem = f"KV sent an unreadable reply to {label}"
            if attempt < attempts:
                await asyncio.sleep(delay * (1 + random.random()))
                delay *= 4
        log.warning("%s after %d attempts", problem, attempts)
        raise StoreUnavailable(problem)

    async def _script(
        self,
        script: LuaScript,
        keys: Mapping[str, str | None],
        args: Mapping[str, str | None],
        *,
        more_args: Sequence[str] = (),
        attempts: int | None = None,
    ) -> Any:
        key_list, arg_list = script.bind(keys, args, more_args=more_args)
        return await self._call(
            script.name, lambda: self._rest.run(script, key_list, arg_list), attempts=attempts
        )

    # --- the Store interface -------------------------------------------------------------------

    async def create_run(
        self, record: RunRecord, idempotency: IdempotencyClaim | None = None
    ) -> CreateOutcome:
        run_key, events_key, _ = _keys(record.run_id)
        idem_key = value = None
        if idempotency is not None:
            idem_key = f"quote:idem:{idempotency.key_hash}"
            value = idempotency_value(record.run_id, idempotency.body_hash)
        started = stored_event_json(started_event(record), new_nonce())
        reply = await self._script(
            CREATE,
            {"run_key": run_key, "events_key": events_key, "idem_key": idem_key},
            {
                "ttl": str(self.ttl_seconds),
                "meta": record.meta.model_dump_json(),
                "started_item": started,
                "idem_value": value,
            },
        )
        if reply[0] == "replay":
            return mapped_run(str(reply[1]), record.run_id)
        # 'exists': run ids are fresh, so the run found is this create's own first attempt.
        return CreateOutcome(created=True, run_id=record.run_id)

    async def find_idempotent_run(self, idempotency: IdempotencyClaim) -> CreateOutcome | None:
        key = f"quote:idem:{idempotency.key_hash}"
        stored = await self._call("idempotency lookup", lambda: self._rest.command("GET", key))
        return None if stored is None else mapped_run(str(stored))

    async def release_idempotency(self, claim: IdempotencyClaim, run_id: str) -> None:
        value = idempotency_value(run_id, claim.body_hash)
        await self._script(
            FORGET, {"idem_key": f"quote:idem:{claim.key_hash}"}, {"idem_value": value}
        )

    async def get_run(
        self,
        run_id: str,
        *,
        events_after: int | None = None,
        limit: int = 100,
        tail: int = TAIL_EVENTS,
    ) -> RunState | None:
        first, last = (-1, -1) if events_after is None else (events_after + 1, events_after + limit)
        run_key, events_key, log_key = _keys(run_id)
        reply = await self._script(
            READ,
            {"run_key": run_key, "events_key": events_key, "log_key": log_key},
            {
                "first": str(first),
                "last": str(last),
                "tail": str(tail),
                "window": str(REPEAT_WINDOW),
            },
        )
        if not reply:
            return None
        count, flat, (tail_from, tail_items, before_tail), (page_from, page_items, before_page) = (
            reply
        )
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        recent = first_copies(int(tail_from), tail_items, before_tail)
        record = _record_from_fields(fields, recent)
        events: list[StoredEvent] = []
        if events_after is not None:
            if page_items:
                events = first_copies(int(page_from), page_items, before_page)
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
                "append", lambda: self._rest.command("RPUSHX", events_key, *items), attempts=1
            )
            if int(count) > 0:
                return int(count) - len(items)
        except StoreUnavailable:
            # The first request's fate is unknown: this one finds it by its nonce, or appends.
            reply = await self._script(
                APPEND_AGAIN,
                {"events_key": events_key},
                {"nonce": batch[0].nonce},
                more_args=items,
            )
            if reply[0] != "refused":
                return int(reply[1])
        await self._raise_refused(run_id, log_key)
        raise AssertionError("unreachable")

    async def _raise_refused(self, run_id: str, log_key: str) -> None:
        if await self._call("read", lambda: self._rest.command("EXISTS", log_key)):
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
        run_key, events_key, _ = _keys(run_id)
        first_items = (
            [item.json for item in stored_items(first_events)] if first_work is not None else []
        )
        reply = await self._script(
            CLAIM,
            {"run_key": run_key, "events_key": events_key},
            {
                "provider": provider,
                "owner": owner,
                "now_ms": _ms(now),
                "lease_until_ms": _ms(lease_until),
                # In the events' own format, so the script's comparison is one of times.
                "alive_since": format_time(alive_since),
                "first_work": first_work.model_dump_json() if first_work is not None else "",
            },
            more_args=first_items,
        )
        match [str(part) for part in reply]:
            case ["claimed", work, deliveries]:
                found = ProviderWork.model_validate_json(work) if work else ProviderWork()
                return ProviderClaim("claimed", work=found, deliveries=int(deliveries))
            case ["held", lease_end]:
                return ProviderClaim("held", busy_until=_from_ms(lease_end))
            case ["writing", last_event_at]:
                last = datetime.fromisoformat(last_event_at)
                return ProviderClaim("held", busy_until=last + (lease_until - now))
            case ["finished" | "ended" | "missing" as result]:
                return ProviderClaim(result)
        raise StoreUnavailable(f"KV answered claim with {reply!r}")

    async def renew_lease(
        self, run_id: str, provider: ProviderId, owner: str, until: datetime
    ) -> None:
        if is_released(until):
            await self._save_work(run_id, provider, owner, "", _ms(until), [])
            return
        # One HSET of the owner's own renewal field, which its claim created and a takeover or
        # the run's end deletes: 0 (the field was there) means the lease is still the owner's.
        run_key = _keys(run_id)[0]
        field = _renewal_field(provider, owner)
        try:
            created = await self._call(
                "renewal",
                lambda: self._rest.command("HSET", run_key, field, _ms(until)),
                attempts=1,
            )
        except StoreUnavailable:
            # Its fate is unknown: the script decides exactly, and moves the lease itself.
            await self._save_work(run_id, provider, owner, "", _ms(until), [])
            return
        if int(created):
            reply = await self._script(
                RENEWAL_REFUSED, {"run_key": run_key}, {"renewal_field": field}
            )
            _refuse(str(reply[0]), run_id, f"{provider} of run {run_id} is no longer {owner}'s")

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
        run_key, events_key, _ = _keys(run_id)

        async def write(retry: bool, attempts: int) -> Any:
            return await self._script(
                SAVE_WORK,
                {"run_key": run_key, "events_key": events_key},
                {
                    "provider": provider,
                    "owner": owner,
                    "work": work_json,
                    "lease_until_ms": until,
                    "retry": "1" if retry else "0",
                },
                more_args=items,
                attempts=attempts,
            )

        try:
            reply = await write(again, 1)
        except StoreUnavailable:
            # Its fate is unknown: the retry appends the events only if they are not there.
            reply = await write(True, max(self._attempts - 1, 1))
        if reply[0] != "saved":
            _refuse(str(reply[0]), run_id, f"{provider} of run {run_id} is no longer {owner}'s")

    async def record_outcome(
        self,
        run_id: str,
        provider: ProviderId,
        outcome: ProviderOutcome,
        event: QuoteEvent | ProviderErrorEvent,
        *,
        total: int,
    ) -> OutcomeWritten:
        run_key, events_key, _ = _keys(run_id)
        prefix, suffix = progress_event_parts(new_nonce(), event.ts)
        reply = await self._script(
            OUTCOME,
            {"run_key": run_key, "events_key": events_key},
            {
                "provider": provider,
                "outcome": outcome.model_dump_json(),
                "event_item": stored_event_json(event, new_nonce()),
                "progress_prefix": prefix,
                "progress_suffix": suffix,
                "total": str(total),
            },
        )
        match reply:
            case ["recorded", first_id, done]:
                return OutcomeWritten(first_id=int(first_id), completed=int(done))
            case ["already", done]:
                return OutcomeWritten(first_id=None, completed=int(done))
        _refuse(str(reply[0]), run_id)

    async def finish_run(self, run_id: str, event: CompleteEvent | ErrorEvent, end: RunEnd) -> int:
        run_key, events_key, log_key = _keys(run_id)
        reply = await self._script(
            FINISH,
            {"run_key": run_key, "events_key": events_key, "log_key": log_key},
            {
                "status": end.status,
                "run_end": end.model_dump_json(),
                "terminal_item": stored_event_json(event, new_nonce()),
                "ttl": str(self.ttl_seconds),
            },
        )
        if reply[0] == "finished":
            return int(reply[1])
        _refuse(str(reply[0]), run_id)

    async def cancel_run(
        self, run_id: str, event: CancelledEvent, end: RunEnd, *, completed: int
    ) -> int:
        run_key, events_key, log_key = _keys(run_id)
        reply = await self._script(
            CANCEL,
            {"run_key": run_key, "events_key": events_key, "log_key": log_key},
            {
                "run_end": end.model_dump_json(),
                "terminal_item": stored_event_json(event, new_nonce()),
                "ttl": str(self.ttl_seconds),
                "completed": str(completed),
            },
        )
        if reply[0] == "cancelled":
            return int(reply[1])
        if reply[0] == "outcomes_changed":
            raise OutcomesChanged(f"a provider of run {run_id} finished meanwhile")
        _refuse(str(reply[0]), run_id)

    async def read_events(
        self, run_id: str, after: int, limit: int | None = None, *, on_primary: bool = False
    ) -> list[StoredEvent]:
        # What this instance read last of the run spares re-reading the window before `after`.
        known = self._read_through.get(run_id)
        remembered = known[1] if known is not None and known[0] == after else None
        lookback = 0 if remembered is not None else min(REPEAT_WINDOW, after + 1)
        start = after + 1 - lookback
        stop = after + limit if limit is not None else -1
        _, events_key, log_key = _keys(run_id)
        if on_primary:
            items = await self._script(
                READ_ON_PRIMARY,
                {"events_key": events_key, "log_key": log_key},
                {"start": str(start), "stop": str(stop)},
            )
        else:
            items = await self._call(
                "read", lambda: self._rest.command("LRANGE", events_key, start, stop)
            )
        if not items and not on_primary:
            # An open run's list, or the ended run's: one of the two is there.
            items = await self._call(
                "read", lambda: self._rest.command("LRANGE", log_key, start, stop)
            )
        items = [str(item) for item in items]
        earlier = remembered or [stored_nonce(item) for item in items[:lookback]]
        fresh = items[lookback:]
        window = [*earlier, *(stored_nonce(item) for item in fresh)][-REPEAT_WINDOW:]
        self._read_through[run_id] = (after + len(fresh), window)
        self._read_through.move_to_end(run_id)
        while len(self._read_through) > _RUNS_REMEMBERED:
            self._read_through.popitem(last=False)
        return first_copies(after + 1, fresh, earlier)

    async def ping(self) -> None:
        # One attempt: a health check reports what it finds now, within its short maxDuration.
        await self._call("ping", lambda: self._rest.command("PING"), attempts=1)

    def watch(self, run_id: str) -> EventWatch:
        return self.push.watch(run_id)

    async def aclose(self) -> None:
        await self.push.aclose()
        await self._rest.aclose()

    # --- the deployment's agent slots ----------------------------------------------------------

    async def take_agent_slot(
        self, holder: str, *, limit: int, now: datetime, until: datetime
    ) -> bool:
        reply = await self._script(
            AGENT_SLOT,
            {"slots_key": AGENT_SLOTS_KEY},
            {"holder": holder, "limit": str(limit), "now_ms": _ms(now), "until_ms": _ms(until)},
        )
        return bool(reply[0] == "taken")

    async def release_agent_slot(self, holder: str) -> None:
        await self._call("agent-slot", lambda: self._rest.command("ZREM", AGENT_SLOTS_KEY, holder))
