"""Admission on Vercel KV (Upstash Redis REST): one Lua script per run, so one REST request.

Billed commands per admission (Upstash counts the EVALSHA and every command inside it): the
EVALSHA, one MGET of every counter and the token record, and one SET per thing counted — the
address's minute window, the caller's day, the total day, and the start token. A refused run
costs 2 (EVALSHA + MGET).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import httpx
from upstash_redis.asyncio import Redis
from upstash_redis.errors import UpstashError

from lib.admission.base import WINDOW_MS, Admission, AdmissionKeys, Counts, Limits, Verdict
from lib.store.errors import StoreUnavailable

log = logging.getLogger(__name__)

_ABSENT = "quote:admit:absent"

_CHECK_AND_COUNT = """
local v = redis.call('MGET', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
local cur, prev = tonumber(v[1]) or 0, tonumber(v[2]) or 0
local caller, total = tonumber(v[3]) or 0, tonumber(v[4]) or 0
local per_minute, per_day, per_total = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local token_ttl = tonumber(ARGV[7])
local function reply(verdict) return {verdict, cur, prev, caller, total, v[5] or ''} end
if token_ttl > 0 and v[5] then
  if ARGV[9] ~= '' and v[5] == ARGV[8] then return reply('replay') end
  return reply('token_used')
end
local window = WINDOW_MS
local weighted = math.floor((prev * (window - tonumber(ARGV[4])) + window - 1) / window)
if per_minute > 0 and weighted + cur >= per_minute then
  return reply('rate')
end
if per_day > 0 and caller >= per_day then return reply('caller_day') end
if per_total > 0 and total >= per_total then return reply('total_day') end
if per_minute > 0 then redis.call('SET', KEYS[1], cur + 1, 'PX', ARGV[5]) end
if per_day > 0 then redis.call('SET', KEYS[3], caller + 1, 'EX', ARGV[6]) end
if per_total > 0 then redis.call('SET', KEYS[4], total + 1, 'EX', ARGV[6]) end
if token_ttl > 0 then redis.call('SET', KEYS[5], ARGV[8], 'PX', token_ttl) end
return reply('admit')
""".replace("WINDOW_MS", str(WINDOW_MS))

_RELEASE = """
local n = #KEYS
if ARGV[1] == '1' then
  redis.call('DEL', KEYS[n])
  n = n - 1
end
for i = 1, n do
  local count = tonumber(redis.call('GET', KEYS[i]))
  if count and count > 0 then redis.call('DECR', KEYS[i]) end
end
return n
"""


class _Script:
    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


_CHECK_AND_COUNT_SCRIPT = _Script(_CHECK_AND_COUNT)
_RELEASE_SCRIPT = _Script(_RELEASE)


class KVAdmission(Admission):
    name = "kv"

    def __init__(self, rest: Redis, *, limits: Limits, secret: bytes, owned: bool = False) -> None:
        """`rest`: the instance's Upstash REST client (lib.store.kv.rest_client), normally the
        run store's; closed by `aclose` only when `owned`."""
        super().__init__(limits, secret)
        self._redis = rest
        self._owned = owned

    async def _script(self, label: str, script: _Script, keys: list[str], args: list[str]) -> Any:
        """One script, sent once: counting is not idempotent, so a request whose fate is unknown
        is not repeated (only a connection that never opened is retried)."""
        for attempt in (1, 2):
            try:
                try:
                    return await self._redis.evalsha(script.sha, keys=keys, args=args)
                except UpstashError as error:
                    if "NOSCRIPT" not in str(error):
                        raise
                    return await self._redis.eval(script.source, keys=keys, args=args)
            except httpx.ConnectError:
                if attempt == 2:
                    raise StoreUnavailable(f"KV could not be reached for {label}") from None
            except (httpx.TimeoutException, httpx.TransportError):
                raise StoreUnavailable(f"KV did not answer {label} in time") from None
            except UpstashError as error:
                log.warning("KV error during %s: %s", label, str(error)[:200])
                raise StoreUnavailable(f"KV answered {label} with an error") from None
            except (ValueError, AttributeError, TypeError, KeyError):
                raise StoreUnavailable(f"KV sent an unreadable reply to {label}") from None
        raise AssertionError("unreachable")

    async def _check_and_count(
        self, keys: AdmissionKeys, replay_tag: str
    ) -> tuple[Verdict, Counts]:
        limits = self.limits
        reply = await self._script(
            "admission",
            _CHECK_AND_COUNT_SCRIPT,
            [
                keys.rate_current,
                keys.rate_previous,
                keys.caller_day or _ABSENT,
                keys.total_day,
                keys.token or _ABSENT,
            ],
            [
                str(limits.per_minute),
                str(limits.per_day if keys.caller_day else 0),
                str(limits.per_day_total),
                str(keys.window_elapsed_ms),
                str(keys.rate_ttl_ms),
                str(keys.day_ttl_seconds),
                str(keys.token_ttl_ms if keys.token else 0),
                keys.token_value,
                replay_tag,
            ],
        )
        verdict, current, previous, caller, total, token_value = reply
        counts = Counts(int(current), int(previous), int(caller), int(total), token_value or None)
        return verdict, counts

    async def _release(self, counted: tuple[str, ...], token_key: str | None) -> None:
        keys = [*counted, *([token_key] if token_key else [])]
        await self._script("admission release", _RELEASE_SCRIPT, keys, ["1" if token_key else "0"])

    async def aclose(self) -> None:
        if self._owned:
            await self._redis.close()
