"""A tests-only Vercel KV: the Upstash Redis REST protocol served over a real redis-server.

Wire formats (from https://upstash.com/docs/redis/features/restapi, the @upstash/redis JS SDK's
``pkg/http.ts`` + ``pkg/commands/subscribe.ts``, and upstash-redis 1.8.0's ``http.py``):

- ``POST /`` with ``["SET","k","v"]`` -> ``200 {"result": ...}``; a Redis error -> ``400 {"error":
  "<the Redis error, verbatim>"}``. The command may also sit in the path: ``GET|POST /set/k/v``
  (a POST body is appended as the last argument, query parameters as ``NAME value``).
- ``POST /pipeline`` and ``POST /multi-exec`` with ``[[...], ...]`` -> ``200 [{"result": ...} |
  {"error": ...}, ...]``; a transaction Redis discards as a whole -> ``400 {"error":
  "EXECABORT ..."}``.
- Auth: ``Authorization: Bearer <token>`` or ``?_token=<token>``; otherwise ``401 {"error":
  "Unauthorized"}``.
- ``Upstash-Encoding: base64``: every string in a result is base64, except a top-level ``"OK"``;
  integers and nulls stay raw; errors are never encoded. Without it strings are UTF-8 text
  (invalid bytes become U+FFFD).
- ``GET|POST /subscribe/<channel>`` (``/psubscribe/<pattern>``) -> ``text/event-stream`` whose
  events are Redis' pub/sub replies joined by commas, never base64: ``data: subscribe,<channel>,1``,
  ``data: message,<channel>,<payload>``, ``data: pmessage,<pattern>,<channel>,<payload>``.

- Scripts (``EVAL``, ``EVALSHA``, ``SCRIPT LOAD``) may open with ``#!lua flags=allow-key-locking``,
  Upstash's flag for a script that locks only its keys instead of the whole database: every key it
  touches must be in ``KEYS``. Redis 7 does not know the flag, so the endpoint drops it, runs the
  script with ``redis.call``/``redis.pcall`` checking each key argument against ``KEYS`` (a script
  touching an undeclared key fails), and keeps answering to the script's own SHA1.

Test-only extras (same bearer token): ``GET /_stats``, ``POST /_stats/reset`` and
``POST /_control/subscriptions`` with ``{"mode": "normal" | "silent" | "drop",
"fail_subscribe": bool, "refuse_config": bool, "replica_lag_ms": int}``.

A read region, when ``replica_lag_ms`` > 0 (Upstash's global databases; its docs and the SDKs'
``readYourWrites``): every write is served by the primary and applied again to a replica (the
next Redis database number) ``replica_lag_ms`` later, in order, so it is also counted again, as
Upstash bills each read region; a request whose every command only reads is served by the
replica. Each response carries ``upstash-sync-token`` (the primary's write count after a write,
the replica's applied count after a read); a read sent with a token waits until the replica has
applied that much, so a client reads its own writes and no one else's sooner. The replica starts
empty when the lag is turned on. ``refuse_config`` answers every ``CONFIG`` with an error, as a
database that does not let keyspace notifications be turned on.

Run it standalone with ``python -m tests.upstash_rest --port 0 --token T --redis-url URL``: it
prints ``READY http://127.0.0.1:<port>`` once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict, dataclass
from typing import Any, Literal, Self
from urllib.parse import unquote

import httpx
import pytest
import redis
import uvicorn
from redis._parsers import _AsyncRESP2Parser
from redis.asyncio import BlockingConnectionPool, ConnectionPool
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisError, ResponseError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
Kind = Literal["command", "pipeline", "multi-exec", "subscribe"]
KINDS: tuple[Kind, ...] = ("command", "pipeline", "multi-exec", "subscribe")
Arg = str | int | float
# Commands that would wedge a pooled connection or that a stateless REST call cannot honour.
_UNAVAILABLE = {"SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "UNSUBSCRIBE", "PUNSUBSCRIBE"}
_UNAVAILABLE |= {"SUNSUBSCRIBE", "MONITOR", "MULTI", "EXEC", "DISCARD", "WATCH", "UNWATCH"}
_UNAVAILABLE |= {"SELECT", "SWAPDB", "AUTH", "HELLO", "RESET", "QUIT", "SYNC", "PSYNC"}
# What a read region serves: commands that only read keys.
_READS = {"GET", "MGET", "EXISTS", "TYPE", "TTL", "PTTL", "STRLEN", "GETRANGE", "KEYS", "SCAN"}
_READS |= {"LRANGE", "LLEN", "LINDEX", "HGET", "HMGET", "HGETALL", "HEXISTS", "HLEN", "HKEYS"}
_READS |= {"HVALS", "SMEMBERS", "SISMEMBER", "SCARD", "ZRANGE", "ZCARD", "ZSCORE", "DBSIZE"}
# Not applied again to the replica: server-wide, or nothing to apply.
_PRIMARY_ONLY = {"CONFIG", "PUBLISH", "PING", "ECHO", "INFO", "SCRIPT", "TIME", "FLUSHALL"}
SYNC_TOKEN = "upstash-sync-token"


class _VerbatimErrorParser(_AsyncRESP2Parser):
    """redis-py strips error codes ("NOSCRIPT ...") from messages; Upstash returns them as-is."""

    @classmethod
    def parse_error(cls, response: str) -> ResponseError:
        return ResponseError(response)


class _BadRequest(Exception):
    pass


KEY_LOCKING_FLAG = "allow-key-locking"
_SCRIPT_VERBS = {"EVAL", "EVAL_RO", "EVALSHA", "EVALSHA_RO"}

# Runs before the script's own first line: `redis` is shadowed by a table whose call/pcall refuse
# a key argument (at the positions COMMAND reports) that is not in KEYS, as Upstash does.
_KEY_CHECK = """local __declared = {}
for _, key in ipairs(KEYS) do __declared[key] = true end
local __key_positions = POSITIONS
local __redis = redis
local function __checked(call)
  return function(command, ...)
    local spec = __key_positions[string.lower(command)]
    if spec then
      local args = {...}
      local last = spec[2]
      if last < 0 then last = #args + 1 + last end
      for i = spec[1], last, spec[3] do
        if args[i] ~= nil and not __declared[args[i]] then
          return __redis.error_reply('ERR script with allow-key-locking accessed key '
            .. tostring(args[i]) .. ' not declared in KEYS')
        end
      end
    end
    return call(command, ...)
  end
end
local __call, __pcall = __checked(__redis.call), __checked(__redis.pcall)
local redis = setmetatable({
  call = function(...)
    local reply = __call(...)
    if type(reply) == 'table' and reply.err then error(reply) end
    return reply
  end,
  pcall = __pcall,
}, {__index = __redis})
"""


class _Scripts:
    """Upstash's script flags on a Redis that does not know them: a flagged script is stored
    translated, under the SHA1 of what the client sent."""

    def __init__(self) -> None:
        self.key_check = ""
        self.redis_sha: dict[str, str] = {}  # the client's SHA1 -> the translated script's
        self.global_lock = 0  # scripts run without allow-key-locking (the database-wide lock)

    def learn_key_positions(self, commands: list[Any]) -> None:
        """COMMAND's reply: each command's first key, last key and step (RESP2 arrays)."""
        entries = []
        for info in commands:
            name, first, last, step = info[0], info[3], info[4], info[5]
            if isinstance(name, bytes):
                name = name.decode()
            if int(first) > 0 and int(step) > 0:
                entries.append(f"[{json.dumps(name.lower())}]={{{first},{last},{step}}}")
        self.key_check = _KEY_CHECK.replace("POSITIONS", "{" + ",".join(entries) + "}")

    def translate(self, source: str) -> str:
        first, newline, body = source.partition("\n")
        if not first.startswith("#!"):
            self.global_lock += 1
            return source
        engine, *options = first[2:].split()
        flags: list[str] = []
        for option in options:
            if option.startswith("flags="):
                flags = [f for f in option[len("flags=") :].split(",") if f]
        if KEY_LOCKING_FLAG not in flags:
            self.global_lock += 1
            return source
        kept = [f for f in flags if f != KEY_LOCKING_FLAG]
        shebang = f"#!{engine}" + (f" flags={','.join(kept)}" if kept else "")
        return shebang + newline + self.key_check + body

    def command(self, args: list[Arg]) -> list[Arg]:
        """The command as the real Redis must receive it."""
        name = str(args[0]).upper()
        if name in {"EVAL", "EVAL_RO"} and len(args) > 1:
            source = str(args[1])
            translated = self.translate(source)
            if translated != source:
                self.redis_sha[_sha1(source)] = _sha1(translated)
            return [args[0], translated, *args[2:]]
        if name in {"EVALSHA", "EVALSHA_RO"} and len(args) > 1:
            return [args[0], self.redis_sha.get(str(args[1]).lower(), args[1]), *args[2:]]
        if name == "SCRIPT" and len(args) > 2 and str(args[1]).upper() == "LOAD":
            source = str(args[2])
            translated = self.translate(source)
            if translated != source:
                self.redis_sha[_sha1(source)] = _sha1(translated)
            return [args[0], args[1], translated]
        return args

    def reply(self, args: list[Arg], reply: Any) -> Any:
        """SCRIPT LOAD answers with the SHA1 the client computed, not the translation's."""
        if (
            str(args[0]).upper() == "SCRIPT"
            and len(args) > 2
            and not isinstance(reply, ResponseError)
        ):
            return _sha1(str(args[2])).encode()
        return reply


def _sha1(source: str) -> str:
    return hashlib.sha1(source.encode()).hexdigest()


@dataclass
class Counters:
    requests: int = 0
    commands: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


def _dumps(payload: object) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def _encode(reply: Any, b64: bool, *, top: bool = True) -> Any:
    """A RESP2 reply as Upstash puts it in JSON."""
    if isinstance(reply, bytes):
        if not b64:
            return reply.decode("utf-8", "replace")
        return "OK" if top and reply == b"OK" else base64.b64encode(reply).decode("ascii")
    if isinstance(reply, list):
        return [_encode(item, b64, top=False) for item in reply]
    if isinstance(reply, ResponseError):  # an error nested in an array, e.g. from Lua
        return str(reply)
    return reply  # int or None


def _entry(reply: Any, b64: bool) -> dict[str, Any]:
    if isinstance(reply, ResponseError):
        return {"error": str(reply)}
    return {"result": _encode(reply, b64)}


def _command(raw: object) -> list[Arg]:
    if not isinstance(raw, list) or not raw:
        raise _BadRequest("ERR a command must be a non-empty JSON array")
    args: list[Arg] = [
        a if isinstance(a, str | int | float) and not isinstance(a, bool) else json.dumps(a)
        for a in raw
    ]
    name = str(args[0]).upper()
    if name in _UNAVAILABLE:
        raise _BadRequest(f"ERR Command is not available: '{name}'")
    return args


def _json_body(body: bytes) -> object:
    try:
        return json.loads(body)
    except ValueError as exc:
        raise _BadRequest("ERR failed to parse the request body as JSON") from exc


def _path_args(request: Request) -> list[str]:
    """The raw path split on "/" and percent-decoded (so an escaped "/" survives)."""
    raw = request.scope.get("raw_path") or request.url.path.encode()
    return [unquote(part) for part in raw.decode().split("?")[0].strip("/").split("/") if part]


async def _read(conn: AbstractConnection) -> Any:
    try:
        return await conn.read_response()
    except ResponseError as exc:
        return exc


async def _roundtrip(pool: BlockingConnectionPool, commands: list[list[Arg]]) -> list[Any]:
    conn = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        await conn.send_packed_command(conn.pack_commands(commands))
        return [await _read(conn) for _ in commands]
    except BaseException:
        await conn.disconnect()  # never hand back a connection with unread replies
        raise
    finally:
        await pool.release(conn)


async def _first_of(*aws: Awaitable[object]) -> None:
    """Run all until one finishes (or fails), then cancel the rest."""
    tasks = [asyncio.ensure_future(aw) for aw in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _Api:
    def __init__(self, redis_url: str, token: str) -> None:
        self.redis_url = redis_url
        self.token = token
        self.counters = {kind: Counters() for kind in KINDS}
        self.mode: Literal["normal", "silent"] = "normal"
        self.fail_subscribe = False
        self.refuse_config = False
        self.open_streams: set[_SubscriptionStream] = set()
        self.scripts = _Scripts()
        self._commands: BlockingConnectionPool | None = None
        self._pubsub: ConnectionPool | None = None
        self.region = _ReadRegion(redis_url)

    # -- lifecycle -------------------------------------------------------------------------------
    @asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        # RESP2, like Upstash: hashes come back as flat arrays, pub/sub messages as arrays.
        options: dict[str, Any] = {"protocol": 2, "parser_class": _VerbatimErrorParser}
        self._commands = BlockingConnectionPool.from_url(
            self.redis_url, max_connections=256, timeout=30, **options
        )
        # No read timeout: a subscription may be silent for minutes (redis-py 8 defaults to 5 s,
        # which ended every idle stream, unlike Upstash's).
        self._pubsub = ConnectionPool.from_url(
            self.redis_url, max_connections=10_000, socket_timeout=None, **options
        )
        self.scripts.learn_key_positions((await self.roundtrip([["COMMAND"]]))[0])
        try:
            yield
        finally:
            await self._commands.aclose()
            await self._pubsub.aclose()
            await self.region.stop()

    @property
    def pubsub_pool(self) -> ConnectionPool:
        assert self._pubsub is not None, "the app's lifespan has not started"
        return self._pubsub

    async def execute(
        self, request: Request, commands: list[list[Arg]], *, multi: bool = False
    ) -> tuple[list[Any], dict[str, str]]:
        """Run one request's commands where Upstash would: on the primary, or (every command a
        read, a read region on) on the replica; the headers carry the sync token."""
        if self.refuse_config and any(str(c[0]).upper() == "CONFIG" for c in commands):
            error = ResponseError("ERR CONFIG is not allowed on this database (injected)")
            return [error] * len(commands), {}
        batch = [["MULTI"], *commands, ["EXEC"]] if multi else commands
        region = self.region
        if not region.on:
            return await self.roundtrip(batch), {}
        if all(str(c[0]).upper() in _READS for c in commands):
            applied = await region.caught_up(request.headers.get(SYNC_TOKEN, ""))
            return await self.roundtrip(batch, region.pool), {SYNC_TOKEN: str(applied)}
        replies = await self.roundtrip(batch)
        return replies, {SYNC_TOKEN: str(region.written(batch))}

    async def roundtrip(
        self, commands: list[list[Arg]], pool: BlockingConnectionPool | None = None
    ) -> list[Any]:
        """Send commands on one connection and read one reply each (errors as ResponseError)."""
        pool = pool or self._commands
        assert pool is not None, "the app's lifespan has not started"
        return await _roundtrip(pool, commands)

    # -- helpers -------------------------------------------------------------------------------
    def authorized(self, request: Request) -> bool:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            given = request.query_params.get("_token", "")
        return given == self.token

    def respond(
        self,
        status: int,
        payload: object,
        kind: Kind | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        content = _dumps(payload)
        if kind is not None:
            self.counters[kind].bytes_out += len(content)
        return Response(content, status, headers=headers, media_type="application/json")

    def stats(self) -> dict[str, Any]:
        by_kind = {kind: asdict(c) for kind, c in self.counters.items()}
        totals = {f: sum(c[f] for c in by_kind.values()) for f in asdict(Counters())}
        return {
            **totals,
            "by_kind": by_kind,
            "open_subscriptions": len(self.open_streams),
            "global_lock_scripts": self.scripts.global_lock,
        }

    # -- data endpoints --------------------------------------------------------------------------
    async def serve(self, request: Request, kind: Kind) -> Response:
        body = await request.body()
        counters = self.counters[kind]
        counters.requests += 1
        counters.bytes_in += len(body)
        if not self.authorized(request):
            return self.respond(401, {"error": "Unauthorized"}, kind)
        b64 = request.headers.get("upstash-encoding", "").lower() == "base64"
        try:
            if kind == "command":
                commands = [self.command_of(request, body)]
            else:
                batch = _json_body(body)
                if not isinstance(batch, list) or not batch:
                    raise _BadRequest("ERR the body must be a non-empty JSON array of commands")
                commands = [_command(raw) for raw in batch]
            counters.commands += len(commands)
            sent = [self.scripts.command(command) for command in commands]
            if kind == "multi-exec":
                replies, sync = await self.execute(request, sent, multi=True)
                replies = replies[-1]
                if not isinstance(replies, list):  # EXECABORT: discarded as a whole
                    return self.respond(400, {"error": str(replies)}, kind, sync)
            else:
                replies, sync = await self.execute(request, sent)
            replies = [self.scripts.reply(c, r) for c, r in zip(commands, replies, strict=True)]
        except _BadRequest as exc:
            return self.respond(400, {"error": str(exc)}, kind)
        except RedisError as exc:
            return self.respond(500, {"error": f"ERR {exc}"}, kind)
        if kind != "command":
            return self.respond(200, [_entry(reply, b64) for reply in replies], kind, sync)
        entry = _entry(replies[0], b64)
        return self.respond(400 if "error" in entry else 200, entry, kind, sync)

    def command_of(self, request: Request, body: bytes) -> list[Arg]:
        if request.url.path == "/":
            return _command(_json_body(body))
        args: list[Arg] = list(_path_args(request))
        if request.method == "POST" and body:
            args.append(body.decode("utf-8", "replace"))
        for name, value in request.query_params.multi_items():
            if name != "_token":
                args.extend([name, value] if value else [name])
        return _command(args)

    async def subscribe(self, request: Request) -> Response | _SubscriptionStream:
        counters = self.counters["subscribe"]
        counters.requests += 1
        counters.bytes_in += len(await request.body())
        if not self.authorized(request):
            return self.respond(401, {"error": "Unauthorized"}, "subscribe")
        if self.fail_subscribe:
            return self.respond(500, {"error": "ERR subscribe failed (injected)"}, "subscribe")
        verb, *channels = _path_args(request)
        if not channels:
            return self.respond(400, {"error": "ERR no channel given"}, "subscribe")
        counters.commands += 1
        return _SubscriptionStream(self, verb.upper(), channels)

    # -- test controls -------------------------------------------------------------------------
    async def control(self, request: Request) -> Response:
        if not self.authorized(request):
            return self.respond(401, {"error": "Unauthorized"})
        try:
            settings = _json_body(await request.body())
            if not isinstance(settings, dict):
                raise _BadRequest("ERR expected a JSON object")
            mode = settings.get("mode")
            if mode not in (None, "normal", "silent", "drop"):
                raise _BadRequest(f"ERR unknown mode {mode!r}")
        except _BadRequest as exc:
            return self.respond(400, {"error": str(exc)})
        if "fail_subscribe" in settings:
            self.fail_subscribe = bool(settings["fail_subscribe"])
        if "refuse_config" in settings:
            self.refuse_config = bool(settings["refuse_config"])
        if "replica_lag_ms" in settings:
            await self.region.set_lag(float(settings["replica_lag_ms"]) / 1000)
        if mode == "drop":
            self.mode = "normal"
            await self.drop_streams()
        elif mode is not None:
            self.mode = mode
        return self.respond(
            200,
            {
                "mode": self.mode,
                "fail_subscribe": self.fail_subscribe,
                "refuse_config": self.refuse_config,
                "replica_lag_ms": self.region.lag * 1000,
            },
        )

    async def drop_streams(self) -> None:
        doomed = list(self.open_streams)
        for stream in doomed:
            stream.dropped.set()
        with suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(s.closed.wait() for s in doomed)), 5)

    async def get_stats(self, request: Request) -> Response:
        if not self.authorized(request):
            return self.respond(401, {"error": "Unauthorized"})
        return self.respond(200, self.stats())

    async def reset_stats(self, request: Request) -> Response:
        if not self.authorized(request):
            return self.respond(401, {"error": "Unauthorized"})
        self.counters = {kind: Counters() for kind in KINDS}
        self.scripts.global_lock = 0
        return self.respond(200, self.stats())


class _ReadRegion:
    """A replica of the primary's database that applies each write `lag` seconds after it,
    in order (see the module's docstring)."""

    def __init__(self, primary_url: str) -> None:
        self._primary_url = primary_url
        self.lag = 0.0
        self.pool: BlockingConnectionPool | None = None
        self._sent = 0  # writes the primary has served
        self._applied = 0  # writes the replica has applied
        self._caught_up = asyncio.Condition()
        self._pending: asyncio.Queue[tuple[float, int, list[list[Arg]]]] = asyncio.Queue()
        self._applier: asyncio.Task[None] | None = None

    @property
    def on(self) -> bool:
        return self.lag > 0 and self.pool is not None

    async def set_lag(self, lag: float) -> None:
        if lag > 0 and self.pool is None:
            scheme, _, rest = self._primary_url.partition("://")
            address, _, db = rest.partition("/")
            replica_db = int(db.split("?")[0] or 0) + 1
            self.pool = BlockingConnectionPool.from_url(
                f"{scheme}://{address}/{replica_db}",
                max_connections=256,
                timeout=30,
                protocol=2,
                parser_class=_VerbatimErrorParser,
            )
            self._applier = asyncio.create_task(self._apply())
        if lag > 0 and self.lag == 0 and self.pool is not None:
            await _roundtrip(self.pool, [["FLUSHDB"]])  # it missed what was written meanwhile
        self.lag = lag

    def written(self, batch: list[list[Arg]]) -> int:
        """Note a write the primary has served; the replica applies it `lag` from now."""
        self._sent += 1
        replay = [c for c in batch if str(c[0]).upper() not in _PRIMARY_ONLY]
        self._pending.put_nowait((time.monotonic() + self.lag, self._sent, replay))
        return self._sent

    async def caught_up(self, token: str) -> int:
        """Wait until the replica has applied the writes a client's sync token names."""
        wanted = int(token) if token.isdigit() else 0
        async with self._caught_up:
            await self._caught_up.wait_for(lambda: self._applied >= min(wanted, self._sent))
        return self._applied

    async def _apply(self) -> None:
        assert self.pool is not None
        while True:
            due, seq, commands = await self._pending.get()
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            if commands:
                await _roundtrip(self.pool, commands)
            async with self._caught_up:
                self._applied = seq
                self._caught_up.notify_all()

    async def stop(self) -> None:
        if self._applier is not None:
            self._applier.cancel()
            with suppress(asyncio.CancelledError):
                await self._applier
        if self.pool is not None:
            await self.pool.aclose()


class _SubscriptionStream:
    """An SSE response holding one Redis pub/sub connection; it ends on disconnect or drop."""

    def __init__(self, api: _Api, verb: str, channels: list[str]) -> None:
        self.api, self.verb, self.channels = api, verb, channels
        self.dropped = asyncio.Event()
        self.closed = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pool = self.api.pubsub_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        self.api.open_streams.add(self)
        try:
            await conn.send_command(self.verb, *self.channels)
            headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await _first_of(self.pump(conn, send), _until_disconnect(receive), self.dropped.wait())
            with suppress(OSError):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.api.open_streams.discard(self)
            await conn.disconnect()  # Redis drops the subscription with the connection
            await pool.release(conn)
            self.closed.set()

    async def pump(self, conn: AbstractConnection, send: Send) -> None:
        counters = self.api.counters["subscribe"]
        while True:
            reply = await conn.read_response()  # e.g. [b"message", b"chan", b"payload"]
            if self.api.mode == "silent":
                continue
            fields = [p if isinstance(p, bytes) else str(p).encode() for p in reply]
            chunk = b"data: " + b",".join(fields) + b"\n\n"
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            counters.bytes_out += len(chunk)


def build_app(redis_url: str, token: str) -> Starlette:
    """The Upstash-compatible REST app (its lifespan opens the Redis connection pools)."""
    api = _Api(redis_url, token)

    def data(kind: Kind) -> Any:
        async def endpoint(request: Request) -> Response:
            return await api.serve(request, kind)

        return endpoint

    any_method = ["GET", "POST", "PUT", "HEAD"]
    routes = [
        Route("/_stats", api.get_stats, methods=["GET"]),
        Route("/_stats/reset", api.reset_stats, methods=["POST"]),
        Route("/_control/subscriptions", api.control, methods=["POST"]),
        Route("/pipeline", data("pipeline"), methods=["POST"]),
        Route("/multi-exec", data("multi-exec"), methods=["POST"]),
        Route("/subscribe/{channels:path}", api.subscribe, methods=["GET", "POST"]),
        Route("/psubscribe/{channels:path}", api.subscribe, methods=["GET", "POST"]),
        Route("/{command:path}", data("command"), methods=any_method),
    ]
    app = Starlette(routes=routes, lifespan=api.lifespan)
    app.state.api = api
    return app


class UpstashRestServer:
    """`build_app` served by uvicorn in a background thread, on 127.0.0.1 and a free port."""

    def __init__(
        self,
        redis_url: str | None = None,
        token: str = "test-kv-token",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.redis_url = redis_url or kv_redis_url()
        self.token = token
        self._host, self._port = host, port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def start(self) -> Self:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._host, self._port))
        self.url = f"http://{self._host}:{sock.getsockname()[1]}"
        config = uvicorn.Config(
            build_app(self.redis_url, self.token),
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=3,
            backlog=4096,
        )
        self._server = server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="upstash-rest", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 15
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the Upstash REST test server did not start at {self.url}")
            time.sleep(0.01)
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        if self.alive:
            with suppress(httpx.HTTPError):  # close open streams, or uvicorn waits for them
                self.set_subscription_mode("drop")
        self._server.should_exit = True
        self._thread.join(timeout=15)
        self._server = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        url = self.url + path
        response = httpx.request(method, url, headers=self.headers, timeout=10, **kwargs)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def stats(self) -> dict[str, Any]:
        """Totals (requests, commands, bytes_in, bytes_out), by_kind, open_subscriptions."""
        return self._call("GET", "/_stats")

    def reset_stats(self) -> None:
        self._call("POST", "/_stats/reset")

    def configure_subscriptions(
        self, mode: Literal["normal", "silent", "drop"] | None = None, **settings: Any
    ) -> dict[str, Any]:
        return self._call("POST", "/_control/subscriptions", json={"mode": mode, **settings})

    def set_subscription_mode(self, mode: Literal["normal", "silent", "drop"]) -> None:
        self.configure_subscriptions(mode)

    def set_fail_subscribe(self, fail: bool) -> None:
        self.configure_subscriptions(fail_subscribe=fail)

    def set_replica_lag(self, milliseconds: float) -> None:
        """Serve reads from a replica `milliseconds` behind the primary (0: from the primary)."""
        self.configure_subscriptions(replica_lag_ms=milliseconds)

    def set_refuse_config(self, refuse: bool) -> None:
        self.configure_subscriptions(refuse_config=refuse)


def kv_redis_url() -> str:
    return os.environ.get("TEST_REDIS_URL", DEFAULT_REDIS_URL)


# --- one redis-server per pytest-xdist worker --------------------------------------------------
# `make test` runs the suite on several workers (pytest-xdist). Some keys are deployment-wide
# (the agent slots' sorted set; CONFIG's notify-keyspace-events), and the Upstash endpoint's
# keyspace channels are always database 0's, so workers sharing one Redis would see each other's
# writes. Each worker therefore starts a real redis-server of its own, on a free port, and every
# process the worker starts (the e2e hosts, `tests.upstash_rest`) inherits it as TEST_REDIS_URL.
# A TEST_REDIS_URL given by the caller is used as is, shared.

_worker_redis: subprocess.Popen[bytes] | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _worker_redis
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    server = shutil.which("redis-server")
    if not worker or "TEST_REDIS_URL" in os.environ or server is None:
        return
    # redis-server binds its port itself, so a port found free may be taken by another worker's
    # first: try another before falling back to the shared Redis (or skipping, saying why).
    for _ in range(3):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        settings = {"bind": "127.0.0.1", "port": str(port), "save": "", "appendonly": "no"}
        arguments = [part for name, value in settings.items() for part in (f"--{name}", value)]
        _worker_redis = subprocess.Popen([server, *arguments], stdout=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 10
        while not redis_available(url):
            if _worker_redis.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        else:
            os.environ["TEST_REDIS_URL"] = url
            return
        _worker_redis.kill()
        _worker_redis.wait()
        _worker_redis = None


def pytest_unconfigure(config: pytest.Config) -> None:
    global _worker_redis
    if _worker_redis is not None:
        _worker_redis.terminate()
        with suppress(subprocess.TimeoutExpired):
            _worker_redis.wait(5)
        _worker_redis.kill()
        _worker_redis = None


def redis_available(url: str | None = None) -> bool:
    """A quick PING to the test Redis (``TEST_REDIS_URL``, default 127.0.0.1:6379)."""
    try:
        client = redis.Redis.from_url(url or kv_redis_url(), socket_connect_timeout=0.5)
        with client:
            return bool(client.ping())
    except RedisError:
        return False


@pytest.fixture(scope="session")
def upstash_server() -> Iterator[UpstashRestServer]:
    url = kv_redis_url()
    if not redis_available(url):
        pytest.skip(f"redis-server is not reachable at {url}: KV tests need a real Redis")
    with UpstashRestServer(url) as server:
        yield server


@pytest.fixture
def upstash_env(
    upstash_server: UpstashRestServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[UpstashRestServer]:
    monkeypatch.setenv("KV_REST_API_URL", upstash_server.url)
    monkeypatch.setenv("KV_REST_API_TOKEN", upstash_server.token)
    yield upstash_server
    upstash_server.configure_subscriptions(
        "normal", fail_subscribe=False, refuse_config=False, replica_lag_ms=0
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--token", default="test-kv-token")
    parser.add_argument("--redis-url", default=kv_redis_url())
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with UpstashRestServer(args.redis_url, args.token, host=args.host, port=args.port) as server:
        print(f"READY {server.url}", flush=True)
        with suppress(KeyboardInterrupt):
            while server.alive:
                time.sleep(0.2)


if __name__ == "__main__":
    main()
