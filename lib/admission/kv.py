"""Admission on Vercel KV (Upstash Redis REST): one Lua script per run, so one REST request.

Billed commands per admission (Upstash counts the EVALSHA and every command inside it): the
EVALSHA, one MGET of every counter and the token record, and one SET per thing counted — the
address's minute window, the caller's day, the total day, and the start token. A refused run
costs 2 (EVALSHA + MGET).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from lib.admission.base import WINDOW_MS, Admission, AdmissionKeys, Counts, Limits, Verdict
from lib.store.errors import StoreUnavailable
from lib.store.upstash import LuaScript, UpstashError, UpstashRest

log = logging.getLogger(__name__)

_ABSENT = "quote:admit:absent"

CHECK_AND_COUNT = LuaScript(
    "admission",
    keys=("rate_current_key", "rate_previous_key", "caller_day_key", "total_day_key", "token_key"),
    args=(
        "per_minute",
        "per_day",
        "per_day_total",
        "window_elapsed_ms",
        "rate_ttl_ms",
        "day_ttl_seconds",
        "token_ttl_ms",
        "token_value",
        "replay_tag",
    ),
    returns="{verdict, this minute's count, the last minute's, the caller's day, the total day, "
    "the token record or ''}; verdict: admit | replay | token_used | rate | caller_day | total_day",
    body="""
local v = redis.call('MGET', rate_current_key, rate_previous_key, caller_day_key, total_day_key,
  token_key)
local cur, prev = tonumber(v[1]) or 0, tonumber(v[2]) or 0
local caller, total = tonumber(v[3]) or 0, tonumber(v[4]) or 0
local minute_limit, day_limit, total_limit = tonumber(per_minute), tonumber(per_day),
  tonumber(per_day_total)
local token_ms = tonumber(token_ttl_ms)
local function reply(verdict) return {verdict, cur, prev, caller, total, v[5] or ''} end
if token_ms > 0 and v[5] then
  if replay_tag ~= '' and v[5] == token_value then return reply('replay') end
  return reply('token_used')
end
local window = WINDOW_MS
local weighted = math.floor((prev * (window - tonumber(window_elapsed_ms)) + window - 1) / window)
if minute_limit > 0 and weighted + cur >= minute_limit then
  return reply('rate')
end
if day_limit > 0 and caller >= day_limit then return reply('caller_day') end
if total_limit > 0 and total >= total_limit then return reply('total_day') end
if minute_limit > 0 then redis.call('SET', rate_current_key, cur + 1, 'PX', rate_ttl_ms) end
if day_limit > 0 then redis.call('SET', caller_day_key, caller + 1, 'EX', day_ttl_seconds) end
if total_limit > 0 then redis.call('SET', total_day_key, total + 1, 'EX', day_ttl_seconds) end
if token_ms > 0 then redis.call('SET', token_key, token_value, 'PX', token_ms) end
return reply('admit')
""".replace("WINDOW_MS", str(WINDOW_MS)),
)

RELEASE = LuaScript(
    "admission release",
    keys=(),
    args=("with_token",),
    more_keys="counted_keys",
    returns="the number of counters given back (the token record, when with_token is '1', is "
    "the last key and is deleted)",
    body="""
local n = #counted_keys
if with_token == '1' then
  redis.call('DEL', counted_keys[n])
  n = n - 1
end
for i = 1, n do
  local count = tonumber(redis.call('GET', counted_keys[i]))
  if count and count > 0 then redis.call('DECR', counted_keys[i]) end
end
return n
""",
)
SCRIPTS = (CHECK_AND_COUNT, RELEASE)


class KVAdmission(Admission):
    name = "kv"

    def __init__(
        self, rest: UpstashRest, *, limits: Limits, secret: bytes, owned: bool = False
    ) -> None:
        """`rest`: the instance's Upstash REST client, normally the run store's; closed by
        `aclose` only when `owned`."""
        super().__init__(limits, secret)
        self.rest = rest
        self._owned = owned

    async def _script(
        self,
        script: LuaScript,
        keys: Mapping[str, str | None],
        args: Mapping[str, str | None],
        *,
        more_keys: Sequence[str] = (),
    ) -> Any:
        """One script, sent once: counting is not idempotent, so a request whose fate is unknown
        is not repeated (only a connection that never opened is retried)."""
        label = script.name
        key_list, arg_list = script.bind(keys, args, more_keys=more_keys)
        for attempt in (1, 2):
            try:
                return await self.rest.run(script, key_list, arg_list)
            except httpx.ConnectError:
                if attempt == 2:
                    raise StoreUnavailable(f"KV could not be reached for {label}") from None
            except (httpx.TimeoutException, httpx.TransportError):
                raise StoreUnavailable(f"KV did not answer {label} in time") from None
            except UpstashError as error:
                log.warning("KV error during %s: %s", label, str(error)[:200])
                raise StoreUnavailable(f"KV answered {label} with an error") from None
            except ValueError:
                raise StoreUnavailable(f"KV sent an unreadable reply to {label}") from None
        raise AssertionError("unreachable")

    async def _check_and_count(
        self, keys: AdmissionKeys, replay_tag: str
    ) -> tuple[Verdict, Counts]:
        limits = self.limits
        reply = await self._script(
            CHECK_AND_COUNT,
            {
                "rate_current_key": keys.rate_current,
                "rate_previous_key": keys.rate_previous,
                "caller_day_key": keys.caller_day or _ABSENT,
                "total_day_key": keys.total_day,
                "token_key": keys.token or _ABSENT,
            },
            {
                "per_minute": str(limits.per_minute),
                "per_day": str(limits.per_day if keys.caller_day else 0),
                "per_day_total": str(limits.per_day_total),
                "window_elapsed_ms": str(keys.window_elapsed_ms),
                "rate_ttl_ms": str(keys.rate_ttl_ms),
                "day_ttl_seconds": str(keys.day_ttl_seconds),
                "token_ttl_ms": str(keys.token_ttl_ms if keys.token else 0),
                "token_value": keys.token_value,
                "replay_tag": replay_tag,
            },
        )
        verdict, current, previous, caller, total, token_value = reply
        counts = Counts(int(current), int(previous), int(caller), int(total), token_value or None)
        return verdict, counts

    async def _release(self, counted: tuple[str, ...], token_key: str | None) -> None:
        keys = [*counted, *([token_key] if token_key else [])]
        await self._script(RELEASE, {}, {"with_token": "1" if token_key else "0"}, more_keys=keys)

    async def aclose(self) -> None:
        if self._owned:
            await self.rest.aclose()
