"""Storage faults on the KV backend: whatever the REST API or the network does, callers see a
typed StoreUnavailable (never a crash); a write whose reply was lost after the server applied it
is retried without landing twice; a watch that cannot subscribe polls instead."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
import respx

from lib.models import ActivityEvent, ProviderWork, utc_now
from lib.store import RunFinalized, RunNotFound, StoreUnavailable
from lib.store.kv import (
    APPEND_AGAIN,
    CLAIM,
    FINISH,
    OUTCOME,
    SAVE_WORK,
    KVStore,
    keyspace_channel,
)
from lib.store.upstash import LuaScript
from tests.conftest import make_record
from tests.store_steps import LEASE, claim, completed, lost, quoted
from tests.upstash_rest import UpstashRestServer

KV_URL = "https://kv.invalid"


@pytest.fixture
async def faulty_kv() -> AsyncIterator[KVStore]:
    store = KVStore(KV_URL, "token", ttl_seconds=7200, timeout=0.5)
    yield store
    await store.aclose()


def activity(message: str = "step") -> ActivityEvent:
    return ActivityEvent(provider="geico", message=message)


FAULTS = {
    "500-html": httpx.Response(500, text="<html>Internal Server Error</html>"),
    "502-text": httpx.Response(502, text="Bad Gateway"),
    "503-json": httpx.Response(503, json={"error": "ERR service unavailable"}),
    "200-garbage": httpx.Response(200, text="not json"),
    "read-timeout": httpx.ReadTimeout("timed out"),
    "connect-timeout": httpx.ConnectTimeout("timed out"),
    "refused": httpx.ConnectError("connection refused"),
    "dropped": httpx.RemoteProtocolError("peer closed connection without sending complete message"),
}


@pytest.mark.parametrize("reply", list(FAULTS.values()), ids=list(FAULTS))
async def test_a_storage_fault_is_a_typed_store_unavailable(faulty_kv, reply) -> None:
    with respx.mock(assert_all_called=True) as mock:
        route = mock.post(KV_URL).mock(side_effect=[reply] * 20)
        with pytest.raises(StoreUnavailable) as on_append:
            await faulty_kv.append_events("run", [activity()])
        appended = route.call_count
        with pytest.raises(StoreUnavailable):
            await faulty_kv.get_run("run")
    # An append is one plain RPUSHX; its fate unknown, the nonce-checking script is tried 3 times.
    assert appended == 1 + 3
    assert route.call_count - appended == 3, "a read is tried three times before giving up"
    assert on_append.value.retry_after == 2


WRITES: dict[str, Callable[[KVStore], Any]] = {
    "create_run": lambda kv: kv.create_run(make_record()),
    "claim_provider": lambda kv: claim(kv, "run", "w1", now=utc_now()),
    "save_provider_work": lambda kv: kv.save_provider_work("run", "geico", "w1", ProviderWork()),
    "renew_lease": lambda kv: kv.renew_lease("run", "geico", "w1", utc_now() + LEASE),
    "record_outcome": lambda kv: kv.record_outcome("run", "geico", *quoted("geico"), total=5),
    "finish_run": lambda kv: kv.finish_run("run", *completed()),
    "read_events": lambda kv: kv.read_events("run", after=-1),
}


@pytest.mark.parametrize("operation", list(WRITES.values()), ids=list(WRITES))
async def test_every_operation_turns_a_fault_into_store_unavailable(faulty_kv, operation) -> None:
    with respx.mock() as mock:
        mock.post(KV_URL).mock(return_value=httpx.Response(502, text="Bad Gateway"))
        with pytest.raises(StoreUnavailable):
            await operation(faulty_kv)


async def test_refused_credentials_are_not_retried(faulty_kv) -> None:
    with respx.mock() as mock:
        route = mock.post(KV_URL).mock(
            return_value=httpx.Response(401, json={"error": "Unauthorized"})
        )
        with pytest.raises(StoreUnavailable) as raised:
            await faulty_kv.create_run(make_record())
    assert route.call_count == 1
    assert raised.value.retry_after is None


async def test_an_append_whose_first_request_failed_answers_with_the_retrys_id(faulty_kv) -> None:
    with respx.mock() as mock:
        route = mock.post(KV_URL).mock(
            side_effect=[
                httpx.ReadTimeout("slow"),
                httpx.Response(200, json={"result": ["appended", 7]}),
            ]
        )
        assert await faulty_kv.append_events("run", [activity()]) == 7
    assert b"EVALSHA" in route.calls[1].request.content, "the retry goes through the script"


# --- replies lost after the server applied the write (real server) ----------------------------


class LoseReplies(httpx.AsyncBaseTransport):
    """Forwards every request to the real server, but loses the reply of the first `count`
    requests that `matches` after the server applied them: where a naive retry duplicates."""

    def __init__(self, matches: Callable[[bytes], bool], count: int = 1) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self._matches = matches
        self._to_lose = count
        self.lost = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        if self._to_lose and self._matches(request.content):
            await response.aread()  # the server has answered: the write is applied
            if b"NOSCRIPT" in response.content:
                return response  # nothing was applied (a fresh server): the EVAL will be
            self._to_lose -= 1
            self.lost += 1
            raise httpx.ReadTimeout("the reply was lost after the server applied the write")
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


def sends(*needles: str) -> Callable[[bytes], bool]:
    return lambda content: any(needle.encode() in content for needle in needles)


def runs(script: LuaScript) -> Callable[[bytes], bool]:
    """A request that runs the script: by its SHA1 (EVALSHA) or its source (EVAL)."""
    return sends(script.sha, json.dumps(script.source)[1:-1])


async def losing_store(
    upstash_server: UpstashRestServer, matches: Callable[[bytes], bool], count: int = 1
) -> tuple[KVStore, LoseReplies]:
    losing = LoseReplies(matches, count)
    store = KVStore(upstash_server.url, upstash_server.token, ttl_seconds=7200, transport=losing)
    return store, losing


async def messages(store: KVStore, run_id: str) -> list[str]:
    return [str(e.as_dict().get("message", e.type)) for e in await store.read_events(run_id, -1)]


async def test_an_append_whose_replies_were_lost_lands_once(upstash_server) -> None:
    # The plain RPUSHX's reply is lost, then the retry script's: the next retry finds the first.
    store, losing = await losing_store(
        upstash_server, lambda c: sends('"RPUSHX"')(c) or runs(APPEND_AGAIN)(c), count=2
    )
    record = make_record()
    try:
        await store.create_run(record)
        ids = [
            await store.append_events(record.run_id, [activity("a0"), activity("a1")]),
            await store.append_events(record.run_id, [activity("b")]),
        ]
        logged = await messages(store, record.run_id)
    finally:
        await store.aclose()
    assert losing.lost == 2
    assert ids == [1, 3]
    assert logged == ["started", "a0", "a1", "b"]


async def test_a_lost_append_to_an_unknown_run_is_still_refused(upstash_server) -> None:
    store, losing = await losing_store(upstash_server, sends('"RPUSHX"'))
    try:
        with pytest.raises(RunNotFound):
            await store.append_events(make_record().run_id, [activity("orphan")])
    finally:
        await store.aclose()
    assert losing.lost == 1


async def test_saved_work_whose_reply_was_lost_does_not_append_its_events_twice(
    upstash_server,
) -> None:
    store, losing = await losing_store(upstash_server, runs(SAVE_WORK))
    record = make_record()
    work = ProviderWork(attempt=1, agent_run_id="agent-1")
    try:
        await store.create_run(record)
        await claim(store, record.run_id, "w1", now=utc_now())
        await store.save_provider_work(
            record.run_id, "geico", "w1", work, [activity("Agent run agent-1 started")]
        )
        state = await store.get_run(record.run_id)
        logged = await messages(store, record.run_id)
    finally:
        await store.aclose()
    assert losing.lost == 1
    assert logged == ["started", "Agent run agent-1 started"]
    assert state is not None and state.record.work["geico"] == work


async def test_an_outcome_whose_reply_was_lost_counts_once(upstash_server) -> None:
    store, losing = await losing_store(upstash_server, runs(OUTCOME))
    record = make_record()
    try:
        await store.create_run(record)
        written = await store.record_outcome(record.run_id, "geico", *quoted("geico"), total=5)
        events = await store.read_events(record.run_id, -1)
    finally:
        await store.aclose()
    assert losing.lost == 1
    # The retry finds the outcome already stored: it reports it recorded and the count it made.
    assert written.first_id is None and written.completed == 1
    assert [e.type for e in events] == ["started", "quote", "progress"]


async def test_a_finish_whose_reply_was_lost_writes_one_terminal_event(upstash_server) -> None:
    store, losing = await losing_store(upstash_server, runs(FINISH))
    record = make_record()
    try:
        await store.create_run(record)
        # The retry meets the fence its own first attempt set: the caller is told the run has
        # ended, as it would be by another finisher (callers treat both alike).
        with pytest.raises(RunFinalized):
            await store.finish_run(record.run_id, *lost())
        state = await store.get_run(record.run_id, events_after=-1)
    finally:
        await store.aclose()
    assert losing.lost == 1
    assert state is not None and state.record.status == "failed"
    assert [e.type for e in state.events] == ["started", "error"]


class ApplyLate(httpx.AsyncBaseTransport):
    """The first request that `matches` gets no reply in time, yet reaches the server only
    after the next request was answered: a request delayed in transit, not a reply lost."""

    def __init__(self, matches: Callable[[bytes], bool]) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self._matches = matches
        self._armed = True
        self._held: httpx.Request | None = None
        self.applied_late = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._armed and self._matches(request.content):
            self._armed = False
            self._held = request
            raise httpx.ReadTimeout("no reply in time; the request is still on its way")
        response = await self._inner.handle_async_request(request)
        await response.aread()
        if self._held is not None and b"NOSCRIPT" not in response.content:
            held, self._held = self._held, None
            await (await self._inner.handle_async_request(held)).aread()
            self.applied_late += 1
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


async def test_an_append_that_reaches_redis_after_its_retry_lands_once(upstash_server) -> None:
    """The retry cannot see a first attempt still in transit, so both copies are stored; every
    reader shows the first copy only, and the late copy's id is skipped (a gap, not a repeat)."""
    late = ApplyLate(sends('"RPUSHX"'))
    store = KVStore(upstash_server.url, upstash_server.token, ttl_seconds=7200, transport=late)
    other = KVStore(upstash_server.url, upstash_server.token, ttl_seconds=7200)
    record = make_record()
    run_id = record.run_id
    try:
        await store.create_run(record)
        first = await store.append_events(run_id, [activity("once")])
        after = await store.append_events(run_id, [activity("after")])
        logged = await messages(store, run_id)
        polled = [e.id for e in await other.read_events(run_id, 0)]  # a reader resuming at 0
        resumed = [e.id for e in await other.read_events(run_id, 2)]  # …and past the copy
        state = await other.get_run(run_id, events_after=-1)
        page = await other.get_run(run_id, events_after=0, tail=0)
        async with other.watch(run_id) as watch:
            streamed = [e.id for e in await watch.next_events(-1, timeout=10)]
    finally:
        await store.aclose()
        await other.aclose()
    assert late.applied_late == 1
    assert (first, after) == (1, 3)
    assert logged == ["started", "once", "after"]
    assert polled == [1, 3] and resumed == [3]
    assert state is not None and [e.id for e in state.events] == [0, 1, 3]
    assert page is not None and [e.id for e in page.events] == [1, 3]
    assert streamed == [0, 1, 3]


# --- the watch without push -------------------------------------------------------------------


async def test_a_watch_whose_subscription_is_refused_polls_instead(upstash_server) -> None:
    store = KVStore(upstash_server.url, upstash_server.token, ttl_seconds=7200)
    writer = KVStore(upstash_server.url, upstash_server.token, ttl_seconds=7200)
    record = make_record()
    await writer.create_run(record)
    upstash_server.set_fail_subscribe(True)
    try:
        async with store.watch(record.run_id) as watch:
            assert [e.id for e in await watch.next_events(-1, timeout=5)] == [0]
            upstash_server.reset_stats()
            assert await watch.next_events(0, timeout=0.5) == []
            polled = upstash_server.stats()["by_kind"]["command"]["requests"]
            await writer.append_events(record.run_id, [activity("late")])
            events = await watch.next_events(0, timeout=30)
        refused = upstash_server.stats()["by_kind"]["subscribe"]["requests"]
    finally:
        upstash_server.set_fail_subscribe(False)
        await store.aclose()
        await writer.aclose()
    assert refused >= 1, "it did try to subscribe"
    assert polled >= 2, "without a subscription the watch reads on its own"
    assert [e.id for e in events] == [1]


class Notices:
    """A /subscribe response body the test feeds line by line, framed as a server might."""

    def __init__(self, framing: str) -> None:
        self.framing = framing
        self._lines: asyncio.Queue[str | None] = asyncio.Queue()

    def send(self, line: str) -> None:
        self._lines.put_nowait(line)

    def end(self) -> None:
        self._lines.put_nowait(None)

    async def body(self) -> AsyncIterator[bytes]:
        while (line := await self._lines.get()) is not None:
            yield (line + self.framing).encode()


@pytest.mark.parametrize("framing", ["\n\n", "\n", "\r\n"], ids=["blank-line", "line-only", "crlf"])
async def test_notices_are_read_line_by_line_however_the_stream_is_framed(framing) -> None:
    run_id = "r" * 22
    channel = keyspace_channel(run_id)
    stored = ['{"n":"AAAAAAAA","type":"started","providers":["geico"],"total":1,"ts":"x"}']
    notices = Notices(framing)
    reads: list[list[Any]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        command = [str(part) for part in json.loads(request.content)]
        if command[:2] == ["CONFIG", "GET"]:
            return httpx.Response(200, json={"result": ["notify-keyspace-events", "Klg"]})
        assert command[0] == "LRANGE", command
        reads.append(command)
        first = int(command[2])
        return httpx.Response(
            200, json={"result": stored[first:] if "events" in command[1] else []}
        )

    # No silence fallback within the test: only a notice can make the watch read again.
    kv = KVStore(KV_URL, "token", ttl_seconds=7200, silence_seconds=3600)
    try:
        with respx.mock(assert_all_called=True) as mock:
            mock.post(f"{KV_URL}/subscribe/{channel}").mock(
                return_value=httpx.Response(
                    200, content=notices.body(), headers={"content-type": "text/event-stream"}
                )
            )
            mock.post(KV_URL).mock(side_effect=answer)
            notices.send(f"data: subscribe,{channel},1")
            async with kv.watch(run_id) as watch:
                backlog = await watch.next_events(-1, timeout=5)
                reads_after_backlog = len(reads)
                assert await watch.next_events(0, timeout=0.3) == []
                assert len(reads) == reads_after_backlog, "a subscribed watch waits for notices"
                stored.append('{"n":"BBBBBBBB","type":"activity","message":"a,b","ts":"x"}')
                notices.send(f"data: message,{channel},rpushx")
                live = await watch.next_events(0, timeout=10)
                notices.end()
    finally:
        await kv.aclose()
    assert [e.id for e in backlog] == [0]
    assert [(e.id, e.as_dict()["message"]) for e in live] == [(1, "a,b")]


async def test_a_dropped_subscription_is_caught_up_from_the_list(upstash_server) -> None:
    reader = KVStore(upstash_server.url, upstash_server.token, ttl_seconds=7200)
    writer = KVStore(upstash_server.url, upstash_server.token, ttl_seconds=7200)
    record = make_record()
    try:
        await writer.create_run(record)
        async with reader.watch(record.run_id) as watch:
            assert [e.id for e in await watch.next_events(-1, timeout=5)] == [0]
            upstash_server.set_subscription_mode("drop")
            await writer.append_events(record.run_id, [activity("while dropped")])
            events = await watch.next_events(0, timeout=30)
            await writer.append_events(record.run_id, [activity("after")])
            more = await watch.next_events(1, timeout=30)
    finally:
        upstash_server.set_subscription_mode("normal")
        await reader.aclose()
        await writer.aclose()
    assert [e.id for e in events] == [1]
    assert [e.id for e in more] == [2]


async def test_a_claim_whose_reply_was_lost_is_not_counted_twice(upstash_server) -> None:
    """The retry by the same owner finds its own lease: one delivery, still its own."""
    store, losing = await losing_store(upstash_server, runs(CLAIM))
    record = make_record()
    try:
        await store.create_run(record)
        now = utc_now()
        first = await claim(store, record.run_id, "w1", now=now)
        other = await claim(store, record.run_id, "w2", now=now + timedelta(seconds=1))
    finally:
        await store.aclose()
    assert losing.lost == 1
    assert first.result == "claimed" and first.deliveries == 1
    assert other.result == "held"
