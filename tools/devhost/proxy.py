"""The front door: route a request to a function instance and stream the exchange both ways.

A raw ASGI app. Per request it picks the function by path (see `routes`), an instance
round-robin (see `supervisor.Pool`), adds the platform's ``x-vercel-internal-deadline`` header
and a request id in ``x-vercel-id`` (to the function and back to the client, as Vercel does),
and relays request and response bodies chunk by chunk. When the client goes away the upstream
connection is closed; when the function's maxDuration passes the response is cut. A GET for a
file under ``public/`` is answered with that file first, as Vercel does (see `static`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, urlencode

import httpx

from tools.devhost.routes import FunctionSpec, Router
from tools.devhost.static import PublicFiles
from tools.devhost.supervisor import Instance, Pool

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

INSTANCE_HEADER = b"x-devhost-instance"
DEADLINE_HEADER = b"x-vercel-internal-deadline"
REQUEST_ID_HEADER = b"x-vercel-id"
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


def new_upstream_client() -> httpx.AsyncClient:
    """One shared client: no read/write timeout (streams stay open), no pool cap, no defaults."""
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(None, connect=5.0),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=50),
        follow_redirects=False,
    )
    client.headers.clear()  # forward the client's headers, not httpx's defaults
    return client


class DevProxy:
    def __init__(
        self,
        router: Router,
        pools: dict[str, Pool],
        client: httpx.AsyncClient,
        public: PublicFiles | None = None,
    ) -> None:
        self.router = router
        self.pools = pools
        self.client = client
        self.public = public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # websockets are not routed (lifespan is off)
        if self.public and (file := self.public.find(scope["method"], scope["path"])):
            await self.public.serve(file, scope, receive, send)
            return
        resolved = self.router.resolve(scope["path"])
        if resolved is None:
            await send_problem(send, 404, "NOT_FOUND", f"No function serves {scope['path']}.")
            return
        spec, params = resolved
        exchange = _Exchange(self.client, self.pools[spec.file], spec, params, scope, send)
        await exchange.run(receive)


class _Exchange:
    """One request: forwarded to an instance, bounded by the function's maxDuration."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        pool: Pool,
        spec: FunctionSpec,
        params: dict[str, str],
        scope: Scope,
        send: Send,
    ) -> None:
        self.client = client
        self.pool = pool
        self.spec = spec
        self.params = params
        self.scope = scope
        self.send = send
        self.instance: Instance | None = None
        self.status: int | None = None  # set once the response has started
        self.body = _RequestBody(_has_body(scope))
        self.began = time.monotonic()
        # Shaped as Vercel's: region::random-milliseconds-random.
        self.request_id = (
            f"dev1::{secrets.token_hex(3)[:5]}-{int(time.time() * 1000)}-{secrets.token_hex(6)}"
        )

    async def run(self, receive: Receive) -> None:
        pump = asyncio.create_task(self.body.pump(receive))
        forward = asyncio.create_task(self._forward())
        gone = asyncio.create_task(self.body.disconnected.wait())
        try:
            done, _ = await asyncio.wait(
                {forward, gone},
                timeout=self.spec.max_duration,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if forward in done:
                if (error := forward.exception()) is not None and self.status is None:
                    await send_problem(self.send, 502, "NO_RESPONSE_FROM_FUNCTION", f"{error!r}")
            elif gone in done:
                await _cancel(forward)  # closes the upstream connection
                self._log("client disconnected")
            else:
                await _cancel(forward)
                await self._timed_out()
        finally:
            for task in (forward, gone, pump):
                await _cancel(task)

    async def _forward(self) -> None:
        tried: set[int] = set()
        while True:
            instance = self.pool.pick(exclude=tried)
            if instance is None:
                await send_problem(
                    self.send,
                    503,
                    "NO_RESPONSE_FROM_FUNCTION",
                    f"No instance of {self.spec.file} is running.",
                )
                return
            self.instance = instance
            request = self.client.build_request(
                self.scope["method"],
                self._upstream_url(instance),
                headers=self._upstream_headers(),
                content=self.body.stream() if self.body.expected else None,
            )
            try:
                response = await self.client.send(request, stream=True)
            except httpx.ConnectError:
                tried.add(instance.index)
                if self.body.consumed:
                    raise
                continue  # the instance just died: the next one takes the request
            except httpx.TransportError as exc:
                await send_problem(
                    self.send,
                    502,
                    "NO_RESPONSE_FROM_FUNCTION",
                    f"{instance.label} closed the connection without a response ({exc!r}).",
                    extra_headers=[(INSTANCE_HEADER, self._instance_tag().encode())],
                )
                return
            try:
                await self._relay(response)
            finally:
                await response.aclose()
            return

    async def _relay(self, response: httpx.Response) -> None:
        assert self.instance is not None
        headers = [(k, v) for k, v in response.headers.raw if k.lower() not in _HOP_BY_HOP]
        headers.append((INSTANCE_HEADER, self._instance_tag().encode()))
        headers.append((REQUEST_ID_HEADER, self.request_id.encode()))
        await self.send(
            {"type": "http.response.start", "status": response.status_code, "headers": headers}
        )
        self.status = response.status_code
        try:
            async for chunk in response.aiter_raw():
                await self.send({"type": "http.response.body", "body": chunk, "more_body": True})
        except httpx.TransportError:
            # The instance went away mid-response: end the client's connection abruptly too.
            self._log("upstream connection lost mid-response; closing the client connection")
            return
        await self.send({"type": "http.response.body", "body": b"", "more_body": False})
        self._log()

    async def _timed_out(self) -> None:
        seconds = f"{self.spec.max_duration:g}"
        if self.status is None:
            await send_problem(
                self.send,
                504,
                "FUNCTION_INVOCATION_TIMEOUT",
                f"{self.spec.file} did not respond within its maxDuration of {seconds} s.",
                extra_headers=[(INSTANCE_HEADER, self._instance_tag().encode())]
                if self.instance
                else [],
            )
            self._log(f"maxDuration {seconds} s reached; 504")
        else:
            await self.send({"type": "http.response.body", "body": b"", "more_body": False})
            self._log(f"maxDuration {seconds} s reached; response cut")

    def _upstream_url(self, instance: Instance) -> str:
        raw_path: bytes | None = self.scope.get("raw_path")
        path = raw_path.decode("latin-1") if raw_path else quote(self.scope["path"])
        query = self.scope.get("query_string", b"").decode("latin-1")
        if self.params:
            query = "&".join(q for q in (query, urlencode(self.params)) if q)
        return f"http://127.0.0.1:{instance.port}{path}" + (f"?{query}" if query else "")

    def _upstream_headers(self) -> list[tuple[bytes, bytes]]:
        raw: list[tuple[bytes, bytes]] = self.scope["headers"]
        named_in_connection = {
            token.strip().lower()
            for name, value in raw
            if name.lower() == b"connection"
            for token in value.split(b",")
        }
        headers = [
            (name, value)
            for name, value in raw
            if name.lower() not in _HOP_BY_HOP
            and name.lower() not in named_in_connection
            and not name.lower().startswith(b"x-vercel-internal-")
            and not name.lower().startswith(b"x-forwarded-")
            and name.lower() not in (b"x-real-ip", b"x-vercel-forwarded-for", REQUEST_ID_HEADER)
        ]
        client_ip = (self.scope.get("client") or ("127.0.0.1", 0))[0]
        host = next((v for n, v in raw if n.lower() == b"host"), b"127.0.0.1")
        deadline = datetime.now(UTC) + timedelta(seconds=self.spec.max_duration)
        headers += [
            (b"x-forwarded-for", client_ip.encode()),
            (b"x-forwarded-host", host),
            (b"x-forwarded-proto", self.scope.get("scheme", "http").encode()),
            (b"x-real-ip", client_ip.encode()),
            (b"x-vercel-forwarded-for", client_ip.encode()),
            (DEADLINE_HEADER, rfc3339(deadline).encode()),
            (REQUEST_ID_HEADER, self.request_id.encode()),
        ]
        return headers

    def _instance_tag(self) -> str:
        assert self.instance is not None
        return f"{self.instance.label} pid={self.instance.pid}"

    def _log(self, note: str = "") -> None:
        label = self.instance.label if self.instance else self.spec.file
        ms = (time.monotonic() - self.began) * 1000
        status = self.status if self.status is not None else "-"
        line = f"{self.scope['method']} {self.scope['path']} -> {label} {status} {ms:.0f} ms"
        sys.stderr.write(f"{line}{'; ' + note if note else ''}\n")
        sys.stderr.flush()


class _RequestBody:
    """The client's request body as a stream, read from ASGI `receive` by one pump task.

    The pump keeps reading after the body ends, so a client disconnect is seen at any time.
    """

    def __init__(self, expected: bool) -> None:
        self.chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.disconnected = asyncio.Event()
        self.expected = expected
        self.consumed = False

    async def pump(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnected.set()
                self.chunks.put_nowait(None)
                return
            if message.get("body"):
                self.chunks.put_nowait(message["body"])
            if not message.get("more_body", False):
                self.chunks.put_nowait(None)

    async def stream(self) -> AsyncIterator[bytes]:
        self.consumed = True
        while (chunk := await self.chunks.get()) is not None:
            yield chunk


async def send_problem(
    send: Send,
    status: int,
    code: str,
    detail: str,
    *,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """An RFC 9457 problem response, named with Vercel's error code (also in x-vercel-error)."""
    body = json.dumps(
        {
            "type": f"https://vercel.com/docs/errors/{code}",
            "title": code,
            "status": status,
            "detail": detail,
        }
    ).encode()
    headers = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-vercel-error", code.encode()),
        *(extra_headers or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _has_body(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name.lower() == b"transfer-encoding" or (
            name.lower() == b"content-length" and value.strip() not in (b"", b"0")
        ):
            return True
    return False


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def _cancel(task: asyncio.Future[Any]) -> None:
    if not task.done():
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
