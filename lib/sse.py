"""Server-Sent Events: the wire format, and a streaming response that stops the moment its
client goes away (the stream and a disconnect listener run side by side; whichever ends first
ends both, so a closed tab releases its storage subscription at once)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from lib.store import StoredEvent

RETRY_MILLISECONDS = 2000
RETRY = f"retry: {RETRY_MILLISECONDS}\n\n".encode()
KEEP_ALIVE = b": keep-alive\n\n"
HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",
}


@functools.lru_cache(maxsize=256)
def sse_frame(event: StoredEvent) -> bytes:
    # Stored JSON is compact and escapes newlines, so one data line always suffices. Cached:
    # an event fanned out to an instance's 500 streams is framed once.
    return f"id: {event.id}\ndata: {event.data}\n\n".encode()


class EventStreamResponse(Response):
    """A response streaming `chunks` as text/event-stream."""

    def __init__(self, chunks: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> None:
        self._chunks = chunks
        self.status_code = 200
        self.background = None
        self.init_headers({**HEADERS, **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        stream = asyncio.ensure_future(self._stream(send))
        listener = asyncio.ensure_future(_until_disconnect(receive))
        try:
            await asyncio.wait({stream, listener}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stream, listener):
                task.cancel()
            for task in (stream, listener):
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await task
            aclose = getattr(self._chunks, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    async def _stream(self, send: Send) -> None:
        async for chunk in self._chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
