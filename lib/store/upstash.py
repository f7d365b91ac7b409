"""What the KV store and admission share to talk to Upstash Redis: one REST client
(`UpstashRest`) and Lua scripts declared as named data (`LuaScript`).

The REST protocol (https://upstash.com/docs/redis/features/restapi): `POST /` with the command
as a JSON array, `Authorization: Bearer <token>`; the answer is `{"result": …}` or, for a Redis
error, `{"error": "<the Redis error>"}`.

A script names its KEYS and ARGV at its top, generated from its declaration here, so Python
passes them by name and the two sides cannot disagree on a position. Every script opens with
`#!lua flags=allow-key-locking`: without it Upstash runs a script under the database-wide lock;
with it every key the script touches must be passed in KEYS (and is).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

KEY_LOCKING = "#!lua flags=allow-key-locking"


@dataclass(frozen=True)
class LuaScript:
    """A script with named keys and arguments. `more_keys`/`more_args`: the name of a Lua table
    holding the KEYS/ARGV after the named ones. `returns` says what it answers, in words."""

    name: str
    keys: tuple[str, ...]
    args: tuple[str, ...]
    body: str
    returns: str
    more_keys: str | None = None
    more_args: str | None = None
    source: str = field(init=False, repr=False)
    sha: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        lines = [KEY_LOCKING]
        lines += [f"local {key} = KEYS[{i}]" for i, key in enumerate(self.keys, 1)]
        if self.more_keys:
            lines.append(f"local {self.more_keys} = {{unpack(KEYS, {len(self.keys) + 1})}}")
        lines += [f"local {arg} = ARGV[{i}]" for i, arg in enumerate(self.args, 1)]
        if self.more_args:
            lines.append(f"local {self.more_args} = {{unpack(ARGV, {len(self.args) + 1})}}")
        source = "\n".join(lines) + "\n" + self.body.strip() + "\n"
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "sha", hashlib.sha1(source.encode()).hexdigest())

    def bind(
        self,
        keys: Mapping[str, str | None],
        args: Mapping[str, str | None],
        *,
        more_keys: Sequence[str] = (),
        more_args: Sequence[str] = (),
    ) -> tuple[list[str], list[str]]:
        """KEYS and ARGV in the script's order; a trailing None (an optional key or argument)
        is left out, so the script sees it as nil."""
        if (more_keys and not self.more_keys) or (more_args and not self.more_args):
            raise ValueError(f"script {self.name} takes no further keys or arguments")
        return (
            _positional(self.name, self.keys, keys) + list(more_keys),
            _positional(self.name, self.args, args) + list(more_args),
        )


def _positional(script: str, names: tuple[str, ...], given: Mapping[str, str | None]) -> list[str]:
    if set(given) != set(names):
        raise ValueError(f"script {script} takes {names}, not {tuple(given)}")
    values = [given[name] for name in names]
    while values and values[-1] is None:
        values.pop()
    if None in values:
        raise ValueError(f"script {script}: only trailing keys or arguments may be left out")
    return [value for value in values if value is not None]


SYNC_TOKEN = "upstash-sync-token"


class UpstashError(Exception):
    """Upstash answered with an error: the Redis error's text, verbatim (`NOSCRIPT …`)."""

    @property
    def no_script(self) -> bool:
        return str(self).startswith("NOSCRIPT")

    @property
    def unauthorized(self) -> bool:
        return "unauthorized" in str(self).lower() or "WRONGPASS" in str(self)


Arg = str | int


class UpstashRest:
    """The Upstash Redis REST API of one instance, shared by its store and admission (one pool
    of connections). It never retries: callers re-send only what they know to be idempotent.
    `transport`: as httpx's (tests pass one that loses or delays replies)."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.url = url.rstrip("/")
        # A hung request must not hang an invocation: a timeout, and a shorter one to connect.
        self._client = httpx.AsyncClient(
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(timeout, connect=min(timeout, 3.0)),
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
            transport=transport,
        )
        # Read-your-writes across read regions, as Upstash's SDKs do: each reply names the
        # primary's state, and a request sending it is served by a replica that has applied it.
        self._sync_token = ""

    async def command(self, *args: Arg) -> Any:
        """One command; raises UpstashError for a Redis error, httpx's errors for the network,
        ValueError for a body that is not Upstash's JSON (a proxy's error page)."""
        headers = {SYNC_TOKEN: self._sync_token} if self._sync_token else None
        response = await self._client.post(self.url, json=list(args), headers=headers)
        self._sync_token = response.headers.get(SYNC_TOKEN, self._sync_token)
        try:
            body = response.json()
        except ValueError:
            raise ValueError(f"HTTP {response.status_code}: not a JSON reply") from None
        if not isinstance(body, dict):
            raise ValueError(f"HTTP {response.status_code}: unexpected reply {body!r:.100}")
        if "error" in body:
            raise UpstashError(str(body["error"]))
        if "result" not in body:
            raise ValueError(f"HTTP {response.status_code}: no result in {body!r:.100}")
        return body["result"]

    async def run(self, script: LuaScript, keys: Sequence[str], args: Sequence[str]) -> Any:
        """EVALSHA, and EVAL when the server does not know the script (a restart flushed it)."""
        try:
            return await self.command("EVALSHA", script.sha, len(keys), *keys, *args)
        except UpstashError as error:
            if not error.no_script:
                raise
        return await self.command("EVAL", script.source, len(keys), *keys, *args)

    async def aclose(self) -> None:
        await self._client.aclose()
