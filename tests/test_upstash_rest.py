"""The tests-only Upstash REST endpoint behaves like Vercel KV / Upstash for the real SDKs.

upstash-redis 1.8.0 quirks these tests pin down (production code must live with them):
- A pipeline or transaction answered with a single ``{"error": ...}`` object (401, or a
  transaction Redis discarded with EXECABORT) makes the SDK iterate the dict's keys and raise
  ``AttributeError: 'str' object has no attribute 'get'`` instead of an ``UpstashError``.
- A pipeline whose entries include an ``{"error": ...}`` raises ``UpstashError`` for the first
  one: the results of the commands that did succeed are lost to the caller.
- In base64 mode the SDK keeps ``"OK"`` as is and base64-decodes every other string.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Literal

import httpx
import pytest
import redis
from httpx_sse import aconnect_sse
from upstash_redis import Redis
from upstash_redis.asyncio import Redis as AsyncRedis
from upstash_redis.errors import UpstashError

from lib.store.upstash import LuaScript, UpstashRest
from lib.store.upstash import UpstashError as ProjectUpstashError
from tests.conftest import eventually
from tests.upstash_rest import UpstashRestServer, kv_redis_url

pytest_plugins = ["tests.upstash_rest"]

Encoding = Literal["base64"] | None
each_encoding = pytest.mark.parametrize("encoding", ["base64", None], ids=["base64", "utf8"])
INCR_BY = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


@pytest.fixture
def key() -> Iterator[str]:
    """A fresh key prefix; everything under it is deleted afterwards."""
    prefix = f"upstash-rest-test:{uuid.uuid4().hex}"
    yield prefix
    with redis.Redis.from_url(kv_redis_url()) as direct:
        if keys := list(direct.scan_iter(f"{prefix}*")):
            direct.delete(*keys)


def sdk(server: UpstashRestServer, encoding: Encoding = "base64", token: str = "") -> Redis:
    return Redis(
        server.url,
        token or server.token,
        rest_encoding=encoding,
        rest_retries=0,
        allow_telemetry=False,
    )


def async_sdk(server: UpstashRestServer, encoding: Encoding = "base64") -> AsyncRedis:
    return AsyncRedis(
        server.url, server.token, rest_encoding=encoding, rest_retries=0, allow_telemetry=False
    )


def post(server: UpstashRestServer, path: str, body: object, **headers: str) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers={**server.headers, **headers})


# -- commands ---------------------------------------------------------------------------------


@each_encoding
def test_sync_sdk_round_trips_strings_counters_lists_and_hashes(
    upstash_server: UpstashRestServer, key: str, encoding: Encoding
) -> None:
    kv = sdk(upstash_server, encoding)
    assert kv.set(f"{key}:s", "héllo ✓, world")
    assert kv.get(f"{key}:s") == "héllo ✓, world"
    kv.set(f"{key}:ok", "OK")
    assert kv.get(f"{key}:ok") == "OK"
    assert kv.get(f"{key}:missing") is None
    assert [kv.incr(f"{key}:n"), kv.incr(f"{key}:n")] == [1, 2]
    assert kv.rpush(f"{key}:l", "a", "b", "ç") == 3
    assert kv.lrange(f"{key}:l", 0, -1) == ["a", "b", "ç"]
    kv.hset(f"{key}:h", values={"f": "v", "n": "1"})
    assert kv.hgetall(f"{key}:h") == {"f": "v", "n": "1"}


@each_encoding
async def test_async_sdk_round_trips_strings_counters_and_lists(
    upstash_server: UpstashRestServer, key: str, encoding: Encoding
) -> None:
    async with async_sdk(upstash_server, encoding) as kv:
        assert await kv.set(f"{key}:s", '{"json": "ü"}')
        assert await kv.get(f"{key}:s") == '{"json": "ü"}'
        assert await kv.incrby(f"{key}:n", 5) == 5
        assert await kv.rpush(f"{key}:l", "x", "y") == 2
        assert await kv.lrange(f"{key}:l", 0, -1) == ["x", "y"]
        assert await kv.expire(f"{key}:s", 60) is True


def test_base64_encoding_follows_the_upstash_wire_format(
    upstash_server: UpstashRestServer, key: str
) -> None:
    b64 = {"Upstash-Encoding": "base64"}
    assert post(upstash_server, "/", ["SET", key, "bar"], **b64).json() == {"result": "OK"}
    assert post(upstash_server, "/", ["GET", key], **b64).json() == {"result": "YmFy"}
    assert post(upstash_server, "/", ["GET", key]).json() == {"result": "bar"}
    assert post(upstash_server, "/", ["INCR", f"{key}:n"], **b64).json() == {"result": 1}
    assert post(upstash_server, "/", ["GET", f"{key}:none"], **b64).json() == {"result": None}
    post(upstash_server, "/", ["RPUSH", f"{key}:l", "OK", "é"])
    listed = post(upstash_server, "/", ["LRANGE", f"{key}:l", 0, -1], **b64).json()
    ok, e_acute = (base64.b64encode(s.encode()).decode() for s in ("OK", "é"))
    assert listed == {"result": [ok, e_acute]}  # only a top-level "OK" stays unencoded
    error = post(upstash_server, "/", ["INCR", key], **b64)
    assert (error.status_code, error.json()) == (
        400,
        {"error": "ERR value is not an integer or out of range"},
    )


def test_invalid_utf8_is_replaced_without_base64(
    upstash_server: UpstashRestServer, key: str
) -> None:
    with redis.Redis.from_url(kv_redis_url()) as direct:
        direct.set(key, b"\xff-raw")
    assert post(upstash_server, "/", ["GET", key]).json() == {"result": "\ufffd-raw"}
    encoded = post(upstash_server, "/", ["GET", key], **{"Upstash-Encoding": "base64"}).json()
    assert base64.b64decode(encoded["result"]) == b"\xff-raw"


def test_commands_can_be_given_in_the_path(upstash_server: UpstashRestServer, key: str) -> None:
    auth = upstash_server.headers
    assert httpx.get(f"{upstash_server.url}/set/{key}/v1", headers=auth).json() == {"result": "OK"}
    assert httpx.get(f"{upstash_server.url}/get/{key}", headers=auth).json() == {"result": "v1"}
    posted = httpx.post(f"{upstash_server.url}/set/{key}?EX=100", content=b"a/b c", headers=auth)
    assert posted.json() == {"result": "OK"}
    assert httpx.get(f"{upstash_server.url}/get/{key}", headers=auth).json() == {"result": "a/b c"}
    ttl = httpx.get(f"{upstash_server.url}/ttl/{key}", headers=auth).json()["result"]
    assert 0 < ttl <= 100


@each_encoding
def test_evalsha_falls_back_to_eval_on_noscript(
    upstash_server: UpstashRestServer, key: str, encoding: Encoding
) -> None:
    kv = sdk(upstash_server, encoding)
    sha = kv.script_load(INCR_BY)
    assert sha == hashlib.sha1(INCR_BY.encode()).hexdigest()
    assert kv.evalsha(sha, keys=[key], args=["2"]) == 2

    unknown = f"{INCR_BY} -- {uuid.uuid4().hex}"
    unknown_sha = hashlib.sha1(unknown.encode()).hexdigest()
    with pytest.raises(UpstashError, match=r"^NOSCRIPT No matching script"):
        kv.evalsha(unknown_sha, keys=[key], args=["3"])
    assert kv.eval(unknown, keys=[key], args=["3"]) == 5  # the usual fallback
    assert kv.evalsha(unknown_sha, keys=[key], args=["1"]) == 6  # EVAL cached it


KEY_LOCKED_INCR_BY = f"#!lua flags=allow-key-locking\n{INCR_BY}"


@each_encoding
def test_a_key_locking_script_runs_and_answers_to_its_own_sha(
    upstash_server: UpstashRestServer, key: str, encoding: Encoding
) -> None:
    kv = sdk(upstash_server, encoding)
    sha = hashlib.sha1(KEY_LOCKED_INCR_BY.encode()).hexdigest()
    upstash_server.reset_stats()
    assert kv.eval(KEY_LOCKED_INCR_BY, keys=[key], args=["2"]) == 2
    assert kv.evalsha(sha, keys=[key], args=["3"]) == 5
    assert kv.script_load(KEY_LOCKED_INCR_BY) == sha
    assert upstash_server.stats()["global_lock_scripts"] == 0


def test_a_key_locking_script_that_touches_an_undeclared_key_fails(
    upstash_server: UpstashRestServer, key: str
) -> None:
    kv = sdk(upstash_server)
    sneaky = "#!lua flags=allow-key-locking\nreturn redis.call('INCR', ARGV[1])"
    with pytest.raises(UpstashError, match="not declared in KEYS"):
        kv.eval(sneaky, keys=[f"{key}:declared"], args=[f"{key}:undeclared"])
    guarded = (
        "#!lua flags=allow-key-locking\n"
        "local reply = redis.pcall('MGET', KEYS[1], ARGV[1])\n"
        "if type(reply) == 'table' and reply.err then return 'refused' end\nreturn 'read'"
    )
    assert kv.eval(guarded, keys=[f"{key}:declared"], args=[f"{key}:undeclared"]) == "refused"
    with redis.Redis.from_url(kv_redis_url()) as direct:
        assert direct.get(f"{key}:undeclared") is None


def test_a_script_without_the_flag_still_runs_under_the_global_lock(
    upstash_server: UpstashRestServer, key: str
) -> None:
    upstash_server.reset_stats()
    assert sdk(upstash_server).eval("return redis.call('INCR', ARGV[1])", args=[key]) == 1
    assert upstash_server.stats()["global_lock_scripts"] == 1


def test_pipeline_returns_one_entry_per_command_with_errors_inline(
    upstash_server: UpstashRestServer, key: str
) -> None:
    batch = [["SET", key, "x"], ["INCR", key], ["GET", key]]
    response = post(upstash_server, "/pipeline", batch)
    assert response.status_code == 200
    assert response.json() == [
        {"result": "OK"},
        {"error": "ERR value is not an integer or out of range"},
        {"result": "x"},
    ]

    pipe = sdk(upstash_server).pipeline()
    pipe.set(f"{key}:n", 1)
    pipe.incr(f"{key}:n")
    pipe.get(f"{key}:n")
    assert pipe.exec() == [True, 2, "2"]

    pipe = sdk(upstash_server).pipeline()
    pipe.incr(key)  # fails inside the pipeline...
    pipe.set(f"{key}:after", "y")
    with pytest.raises(UpstashError, match="not an integer"):
        pipe.exec()  # ...and the SDK raises, dropping the other results
    assert sdk(upstash_server).get(f"{key}:after") == "y"  # not atomic: it still ran


async def test_multi_exec_is_atomic_and_reports_runtime_errors_inline(
    upstash_server: UpstashRestServer, key: str
) -> None:
    async with async_sdk(upstash_server) as kv:
        tx = kv.multi()
        tx.set(f"{key}:a", "1")
        tx.incrby(f"{key}:a", 4)
        tx.lrange(f"{key}:missing", 0, -1)
        assert await tx.exec() == [True, 5, []]

    runtime_error = post(upstash_server, "/multi-exec", [["SET", key, "x"], ["INCR", key]])
    assert runtime_error.status_code == 200
    assert runtime_error.json() == [
        {"result": "OK"},
        {"error": "ERR value is not an integer or out of range"},
    ]

    discarded = post(upstash_server, "/multi-exec", [["SET", f"{key}:b", "x"], ["GET"]])
    assert discarded.status_code == 400
    assert discarded.json() == {
        "error": "EXECABORT Transaction discarded because of previous errors."
    }
    assert post(upstash_server, "/", ["EXISTS", f"{key}:b"]).json() == {"result": 0}

    discarded_tx = sdk(upstash_server).multi()
    discarded_tx.set(f"{key}:b", "x")
    discarded_tx.execute(["GET"])
    with pytest.raises(AttributeError, match="'str' object has no attribute 'get'"):
        discarded_tx.exec()  # upstash-redis 1.8.0 cannot read a whole-request error body


def test_a_bad_token_gets_401_unauthorized(upstash_server: UpstashRestServer) -> None:
    response = httpx.post(upstash_server.url, json=["PING"], headers={"Authorization": "Bearer no"})
    assert (response.status_code, response.json()) == (401, {"error": "Unauthorized"})
    assert httpx.post(upstash_server.url, json=["PING"]).status_code == 401
    assert httpx.get(f"{upstash_server.url}/_stats").status_code == 401

    with pytest.raises(UpstashError, match=r"^Unauthorized$"):
        sdk(upstash_server, token="wrong").get("k")
    pipe = sdk(upstash_server, token="wrong").pipeline()
    pipe.get("k")
    with pytest.raises(AttributeError):
        pipe.exec()

    with_query_token = httpx.post(
        f"{upstash_server.url}/?_token={upstash_server.token}", json=["PING"]
    )
    assert with_query_token.json() == {"result": "PONG"}


def test_the_cli_serves_in_its_own_process_and_announces_its_url(
    upstash_server: UpstashRestServer,
) -> None:
    command = [sys.executable, "-m", "tests.upstash_rest", "--port", "0", "--token", "cli-token"]
    command += ["--redis-url", upstash_server.redis_url]
    root = Path(__file__).resolve().parents[1]
    with subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            ready, url = process.stdout.readline().split()
            assert ready == "READY"
            assert url.startswith("http://127.0.0.1:")
            auth = {"Authorization": "Bearer cli-token"}
            assert httpx.post(url, json=["PING"], headers=auth).json() == {"result": "PONG"}
        finally:
            process.terminate()
        assert process.wait(timeout=15) == 0


def test_upstash_env_points_kv_variables_at_the_server(
    upstash_env: UpstashRestServer, key: str
) -> None:
    kv = Redis(os.environ["KV_REST_API_URL"], os.environ["KV_REST_API_TOKEN"])
    assert os.environ["KV_REST_API_URL"] == upstash_env.url
    kv.set(key, "v")
    assert kv.get(key) == "v"


# -- subscriptions ----------------------------------------------------------------------------


class SseLines:
    """The non-empty lines of an SSE response, read in the background."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for line in self.response.aiter_lines():
            if line:
                self.queue.put_nowait(line)

    async def next(self, within: float = 5) -> str:
        return await asyncio.wait_for(self.queue.get(), within)

    async def expect_silence(self, seconds: float = 0.4) -> None:
        with pytest.raises(TimeoutError):
            await self.next(seconds)

    async def until_closed(self, within: float = 5) -> None:
        await asyncio.wait_for(asyncio.shield(self.reader), within)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=20)
    async with httpx.AsyncClient(timeout=10, limits=limits) as client:
        yield client


@asynccontextmanager
async def subscribed(
    http: httpx.AsyncClient, server: UpstashRestServer, path: str
) -> AsyncIterator[SseLines]:
    """POST /subscribe/<channel> the way @upstash/redis does (body ``[]``, SSE accept header)."""
    headers = {**server.headers, "Accept": "text/event-stream"}
    async with http.stream("POST", f"{server.url}/{path}", json=[], headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        lines = SseLines(response)
        try:
            yield lines
        finally:
            lines.reader.cancel()
            with suppress(asyncio.CancelledError, httpx.HTTPError):
                await lines.reader


async def test_subscribe_streams_upstash_sse_lines(
    upstash_env: UpstashRestServer, http: httpx.AsyncClient, key: str
) -> None:
    async with (
        subscribed(http, upstash_env, f"subscribe/{key}") as lines,
        async_sdk(upstash_env) as kv,
    ):
        assert await lines.next() == f"data: subscribe,{key},1"
        assert await kv.publish(key, '{"step": 1, "of": "a,b"}') == 1
        assert await lines.next() == f'data: message,{key},{{"step": 1, "of": "a,b"}}'
        published = await http.post(
            f"{upstash_env.url}/publish/{key}/plain", headers=upstash_env.headers
        )
        assert published.json() == {"result": 1}
        assert await lines.next() == f"data: message,{key},plain"


async def test_subscribe_events_parse_as_separate_sse_events(
    upstash_env: UpstashRestServer, http: httpx.AsyncClient, key: str
) -> None:
    url = f"{upstash_env.url}/subscribe/{key}"
    async with aconnect_sse(http, "GET", url, headers=upstash_env.headers) as source:
        events = source.aiter_sse()
        assert (await anext(events)).data == f"subscribe,{key},1"
        await http.post(upstash_env.url, json=["PUBLISH", key, "hi"], headers=upstash_env.headers)
        assert (await anext(events)).data == f"message,{key},hi"


async def test_psubscribe_delivers_pmessage_lines(
    upstash_env: UpstashRestServer, http: httpx.AsyncClient, key: str
) -> None:
    async with subscribed(http, upstash_env, f"psubscribe/{key}:*") as lines:
        assert await lines.next() == f"data: psubscribe,{key}:*,1"
        post(upstash_env, "/", ["PUBLISH", f"{key}:run-1", "done"])
        assert await lines.next() == f"data: pmessage,{key}:*,{key}:run-1,done"


async def test_closing_the_client_unsubscribes_from_redis(
    upstash_env: UpstashRestServer, http: httpx.AsyncClient, key: str
) -> None:
    async with async_sdk(upstash_env) as kv:

        async def subscribers() -> int:
            reply = await kv.execute(["PUBSUB", "NUMSUB", key])  # [channel, count]
            assert isinstance(reply, list)
            return int(reply[1])

        async with subscribed(http, upstash_env, f"subscribe/{key}") as lines:
            await lines.next()
            assert await subscribers() == 1
            assert upstash_env.stats()["open_subscriptions"] == 1

        async def released() -> bool:
            return await subscribers() == 0 and upstash_env.stats()["open_subscriptions"] == 0

        await eventually(released, "the subscription released", within=5)


async def test_silent_mode_keeps_streams_open_but_delivers_nothing(
    upstash_env: UpstashRestServer, http: httpx.AsyncClient, key: str
) -> None:
    async with subscribed(http, upstash_env, f"subscribe/{key}") as before:
        await before.next()
        upstash_env.set_subscription_mode("silent")
        post(upstash_env, "/", ["PUBLISH", key, "lost"])
        async with subscribed(http, upstash_env, f"subscribe/{key}") as during:
            await before.expect_silence()
            await during.expect_silence()  # not even the subscribe confirmation
            assert not before.reader.done()
            assert not during.reader.done()

            upstash_env.set_subscription_mode("normal")
            post(upstash_env, "/", ["PUBLISH", key, "again"])
            assert await before.next() == f"data: message,{key},again"
            assert await during.next() == f"data: message,{key},again"


async def test_drop_mode_closes_open_streams_and_new_ones_work(
    upstash_env: UpstashRestServer, http: httpx.AsyncClient, key: str
) -> None:
    async with (
        subscribed(http, upstash_env, f"subscribe/{key}") as first,
        subscribed(http, upstash_env, f"subscribe/{key}") as second,
    ):
        await first.next()
        await second.next()
        upstash_env.set_subscription_mode("drop")
        await first.until_closed()
        await second.until_closed()
        assert upstash_env.stats()["open_subscriptions"] == 0

    async with subscribed(http, upstash_env, f"subscribe/{key}") as later:
        assert await later.next() == f"data: subscribe,{key},1"
        post(upstash_env, "/", ["PUBLISH", key, "back"])
        assert await later.next() == f"data: message,{key},back"


async def test_fail_subscribe_answers_500(
    upstash_env: UpstashRestServer, http: httpx.AsyncClient, key: str
) -> None:
    upstash_env.set_fail_subscribe(True)
    failed = await http.post(f"{upstash_env.url}/subscribe/{key}", headers=upstash_env.headers)
    assert failed.status_code == 500
    assert "error" in failed.json()
    upstash_env.set_fail_subscribe(False)
    async with subscribed(http, upstash_env, f"subscribe/{key}") as lines:
        assert await lines.next() == f"data: subscribe,{key},1"


async def test_hundreds_of_subscriptions_and_concurrent_commands(
    upstash_env: UpstashRestServer, http: httpx.AsyncClient, key: str
) -> None:
    async def listen(ready: asyncio.Event) -> str:
        async with subscribed(http, upstash_env, f"subscribe/{key}") as lines:
            await lines.next(within=20)
            ready.set()
            return await lines.next(within=20)

    readies = [asyncio.Event() for _ in range(200)]
    listeners = [asyncio.create_task(listen(ready)) for ready in readies]
    await asyncio.wait_for(asyncio.gather(*(ready.wait() for ready in readies)), 30)

    async with async_sdk(upstash_env) as kv:
        await asyncio.gather(*(kv.incr(f"{key}:n") for _ in range(60)))
        assert await kv.get(f"{key}:n") == "60"
        assert await kv.publish(key, "all") == 200
    assert await asyncio.gather(*listeners) == [f"data: message,{key},all"] * 200

    async def released() -> bool:
        return bool(upstash_env.stats()["open_subscriptions"] == 0)

    await eventually(released, "every subscription released", within=5)


async def test_stats_count_requests_commands_and_bytes(
    upstash_env: UpstashRestServer, http: httpx.AsyncClient, key: str
) -> None:
    upstash_env.reset_stats()
    single = post(upstash_env, "/", ["SET", key, "v"])
    batch = post(upstash_env, "/pipeline", [["GET", key], ["INCR", f"{key}:n"], ["DEL", key]])
    async with subscribed(http, upstash_env, f"subscribe/{key}") as lines:
        await lines.next()
        published = post(upstash_env, "/", ["PUBLISH", key, "hi"])
        await lines.next()
        stats = upstash_env.stats()

    assert stats["by_kind"]["command"] == {
        "requests": 2,
        "commands": 2,
        "bytes_in": len(single.request.content) + len(published.request.content),
        "bytes_out": len(single.content) + len(published.content),
    }
    assert stats["by_kind"]["pipeline"] == {
        "requests": 1,
        "commands": 3,
        "bytes_in": len(batch.request.content),
        "bytes_out": len(batch.content),
    }
    streamed = f"data: subscribe,{key},1\n\ndata: message,{key},hi\n\n"
    assert stats["by_kind"]["subscribe"] == {
        "requests": 1,
        "commands": 1,
        "bytes_in": 2,  # the SDK's "[]" body
        "bytes_out": len(streamed),
    }
    assert stats["by_kind"]["multi-exec"]["requests"] == 0
    assert (stats["requests"], stats["commands"]) == (4, 6)
    assert stats["open_subscriptions"] == 1


# -- the project's own client -------------------------------------------------------------------


async def test_the_projects_client_speaks_the_protocol_and_takes_a_transport(
    upstash_server: UpstashRestServer, key: str
) -> None:
    sent: list[bytes] = []

    class Recording(httpx.AsyncBaseTransport):
        def __init__(self) -> None:
            self._inner = httpx.AsyncHTTPTransport()

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            sent.append(request.content)
            return await self._inner.handle_async_request(request)

    script = LuaScript(
        f"incr {uuid.uuid4().hex}",
        keys=("counter_key",),
        args=("by",),
        body=f"-- {uuid.uuid4().hex}\nreturn redis.call('INCRBY', counter_key, by)",
        returns="the counter",
    )
    rest = UpstashRest(upstash_server.url, upstash_server.token, transport=Recording())
    try:
        assert await rest.command("SET", key, "v") == "OK"
        assert await rest.command("GET", key) == "v"
        with pytest.raises(ProjectUpstashError, match="WRONGTYPE"):
            await rest.command("LPUSH", key, "x")
        # Unknown to the server: EVALSHA answers NOSCRIPT, the client sends the source.
        assert await rest.run(script, [f"{key}:n"], ["2"]) == 2
        assert await rest.run(script, [f"{key}:n"], ["3"]) == 5
        wrong = UpstashRest(upstash_server.url, "not-the-token")
        with pytest.raises(ProjectUpstashError) as refused:
            await wrong.command("PING")
        await wrong.aclose()
    finally:
        await rest.aclose()
    assert refused.value.unauthorized
    verbs = [json.loads(body)[0] for body in sent]
    assert verbs == ["SET", "GET", "LPUSH", "EVALSHA", "EVAL", "EVALSHA"]


# --- a read region, and a database that refuses CONFIG ------------------------------------------


def test_a_read_region_serves_reads_behind_the_primary_and_a_clients_own_writes_at_once(
    upstash_env: UpstashRestServer, key: str
) -> None:
    upstash_env.set_replica_lag(300)
    written = post(upstash_env, "/", ["RPUSH", f"{key}:list", "a"])
    token = written.headers["upstash-sync-token"]
    assert written.json() == {"result": 1}
    # Another client (no token): the replica has not applied the write yet.
    stale = post(upstash_env, "/", ["LRANGE", f"{key}:list", 0, -1])
    assert stale.json() == {"result": []}
    assert int(stale.headers["upstash-sync-token"]) < int(token)
    # The writer, with its token: served once the replica has caught up to its write.
    own = post(upstash_env, "/", ["LRANGE", f"{key}:list", 0, -1], **{"Upstash-Sync-Token": token})
    assert own.json() == {"result": ["a"]}
    # A script is served by the primary, fresh, whoever sends it.
    script = "return redis.call('LRANGE', KEYS[1], 0, -1)"
    post(upstash_env, "/", ["RPUSH", f"{key}:list", "b"])
    fresh = post(upstash_env, "/", ["EVAL", script, 1, f"{key}:list"])
    assert fresh.json() == {"result": ["a", "b"]}
    # Written with the SDK (read-your-writes on by default), read back at once.
    client = sdk(upstash_env, encoding=None)
    client.rpush(f"{key}:sdk", "x")
    assert client.lrange(f"{key}:sdk", 0, -1) == ["x"]


def test_refused_config_answers_every_config_command_with_an_error(
    upstash_env: UpstashRestServer,
) -> None:
    upstash_env.set_refuse_config(True)
    for command in (["CONFIG", "GET", "notify-keyspace-events"], ["CONFIG", "SET", "x", "y"]):
        refused = post(upstash_env, "/", command)
        assert refused.status_code == 400
        assert "CONFIG" in refused.json()["error"]
    upstash_env.set_refuse_config(False)
    assert post(upstash_env, "/", ["CONFIG", "GET", "notify-keyspace-events"]).status_code == 200
