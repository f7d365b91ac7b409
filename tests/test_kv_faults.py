"""Storage faults on the KV backend: whatever the REST API or the network does, callers see a
typed StoreUnavailable (never a crash), and a retried append never duplicates an event."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import respx

from lib.models import ActivityEvent
from lib.store import StoreUnavailable
from lib.store.kv import KVStore
from tests.conftest import make_record

KV_URL = "https://kv.invalid"


@pytest.fixture
def faulty_kv() -> KVStore:
    return KVStore(KV_URL, "token", ttl_seconds=7200, timeout=0.5)


def activity(message: str = "step") -> ActivityEvent:
    return ActivityEvent(provider="geico", message=message)


@pytest.mark.parametrize(
    "reply",
    [
        httpx.Response(500, text="<html>Internal Server Error</html>"),
        httpx.Response(502, text="Bad Gateway"),
        httpx.Response(503, json={"error": "ERR service unavailable"}),
        httpx.Response(200, text="not json"),
        httpx.ReadTimeout("timed out"),
        httpx.ConnectTimeout("timed out"),
        httpx.ConnectError("connection refused"),
        httpx.RemoteProtocolError("peer closed connection without sending complete message"),
    ],
    ids=[
        "500-html",
        "502-text",
        "503-json",
        "200-garbage",
        "read-timeout",
        "connect-timeout",
        "refused",
        "dropped",
    ],
)
async def test_a_storage_fault_is_a_typed_store_unavailable(faulty_kv, reply) -> None:
    with respx.mock(assert_all_called=True) as mock:
        route = mock.post(KV_URL).mock(side_effect=[reply] * 10)
        with pytest.raises(StoreUnavailable) as raised:
            await faulty_kv.append_event("run", activity())
        with pytest.raises(StoreUnavailable):
            await faulty_kv.get_run("run")
    assert route.call_count == 6, "each operation is tried three times before giving up"
    assert raised.value.retry_after == 2
    await faulty_kv.aclose()


async def test_refused_credentials_are_not_retried(faulty_kv) -> None:
    with respx.mock() as mock:
        route = mock.post(KV_URL).mock(
            return_value=httpx.Response(401, json={"error": "Unauthorized"})
        )
        with pytest.raises(StoreUnavailable) as raised:
            await faulty_kv.create_run(make_record())
    assert route.call_count == 1
    assert raised.value.retry_after is None
    await faulty_kv.aclose()


async def test_a_transient_fault_is_retried_and_then_succeeds(faulty_kv) -> None:
    with respx.mock() as mock:
        mock.post(KV_URL).mock(
            side_effect=[httpx.ReadTimeout("slow"), httpx.Response(200, json={"result": 7})]
        )
        assert await faulty_kv.append_event("run", activity()) == 7
    await faulty_kv.aclose()


class LoseFirstResponses(httpx.AsyncBaseTransport):
    """Forwards every request to the real server, but loses the response of the first `n`
    append scripts after they were applied: the case where a naive retry duplicates."""

    def __init__(self, n: int) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self._to_lose = n
        self.applied_then_lost = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        is_append = b"RPUSH" in request.content or b"EVALSHA" in request.content
        if self._to_lose and is_append and b'"step' in request.content:
            await response.aread()
            self._to_lose -= 1
            self.applied_then_lost += 1
            raise httpx.ReadTimeout("the response was lost after the server applied it")
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


async def test_an_append_whose_response_was_lost_is_retried_without_duplicating(
    upstash_server,
) -> None:
    store = KVStore(upstash_server.url, upstash_server.token, ttl_seconds=7200)
    record = make_record()
    await store.create_run(record)
    losing = LoseFirstResponses(2)
    store._redis._http._client = httpx.AsyncClient(transport=losing, timeout=5)
    ids = [await store.append_event(record.run_id, activity(f"step {i}")) for i in range(3)]
    events = await store.read_events(record.run_id, after=-1)
    await store.aclose()
    assert losing.applied_then_lost == 2
    assert ids == [0, 1, 2]
    assert [e.as_dict()["message"] for e in events] == ["step 0", "step 1", "step 2"]


async def test_a_watch_whose_subscription_is_refused_polls_instead(upstash_server) -> None:
    store = KVStore(upstash_server.url, upstash_server.token, ttl_seconds=7200)
    record = make_record()
    await store.create_run(record)
    upstash_server.set_fail_subscribe(True)
    try:
        async with store.watch(record.run_id) as watch:

            async def write_later() -> None:
                await asyncio.sleep(0.2)
                await store.append_event(record.run_id, activity("late"))

            writer = asyncio.create_task(write_later())
            events = await watch.next_events(-1, timeout=5)
            await writer
    finally:
        upstash_server.set_fail_subscribe(False)
        await store.aclose()
    assert [e.id for e in events] == [0]


@pytest.mark.parametrize("framing", ["\n\n", "\n", "\r\n"], ids=["blank-line", "line-only", "crlf"])
async def test_pushed_events_are_read_line_by_line_however_the_stream_is_framed(
    faulty_kv, framing
) -> None:
    channel = "quote:" + "r" * 22 + ":events"
    lines = [
        f"data: subscribe,{channel},1",
        f'data: message,{channel},{{"id":0,"type":"activity","message":"a,b"}}',
        f'data: message,{channel},{{"lastId":0}}',
        f'data: message,{channel},{{"id":1,"type":"activity","message":"c"}}',
    ]
    body = framing.join(lines) + framing
    with respx.mock(assert_all_called=False) as mock:
        subscribe = mock.post(f"{KV_URL}/subscribe/{channel}").mock(
            return_value=httpx.Response(
                200, text=body, headers={"content-type": "text/event-stream"}
            )
        )
        reads = mock.post(KV_URL).mock(return_value=httpx.Response(200, json={"result": []}))
        async with faulty_kv.watch("r" * 22) as watch:
            events = await watch.next_events(-1, timeout=2)
    await faulty_kv.aclose()
    assert subscribe.called
    assert [e.data for e in events] == [
        '{"id":0,"type":"activity","message":"a,b"}',
        '{"id":1,"type":"activity","message":"c"}',
    ]
    assert reads.call_count <= 1, "pushed events need no reads beyond the backlog's"
