"""The admission contract, unchanged against both backends (KV through the Upstash REST endpoint
over a real redis-server, and SQLite): the sliding minute per address, the daily ceiling per
caller and in total, start tokens' single use, and giving a count back.

Each test keys its counters with a fresh secret, so tests (and earlier runs, whose KV counters
outlive them) never see each other's counts."""

from __future__ import annotations

import asyncio
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
import redis

from lib.admission import (
    Admission,
    AdmissionRequest,
    DailyLimitReached,
    Limits,
    RateLimited,
    StartTokenUsed,
    open_admission,
)
from lib.admission.base import DAY_SECONDS, RATE_WINDOW_SECONDS, admission_keys
from lib.admission.kv import KVAdmission
from lib.admission.sqlite import SQLiteAdmission
from lib.config import settings_from_env
from lib.store import open_store
from lib.store.kv import KVStore
from lib.store.upstash import UpstashRest
from tests.conftest import make_record
from tests.upstash_rest import kv_redis_url

AdmissionFactory = Callable[..., Admission]


@pytest.fixture
async def closing(
    store_kind: str, tmp_path, request: pytest.FixtureRequest
) -> AsyncIterator[AdmissionFactory]:
    """Builds admissions of the parametrised kind sharing one storage and one fresh secret, as
    function instances share them; closes them after the test."""
    secret = uuid.uuid4().bytes
    made: list[Admission] = []

    def build(per_minute: int = 0, per_day: int = 0, per_day_total: int = 0) -> Admission:
        limits = Limits(per_minute, per_day, per_day_total)
        admission: Admission
        if store_kind == "kv":
            server = request.getfixturevalue("upstash_server")
            rest = UpstashRest(server.url, server.token)
            admission = KVAdmission(rest, limits=limits, secret=secret, owned=True)
        else:
            path = str(tmp_path / "quotes.sqlite3")
            admission = SQLiteAdmission(path, limits=limits, secret=secret)
        made.append(admission)
        return admission

    build.secret = secret  # type: ignore[attr-defined]
    yield build
    for admission in made:
        await admission.aclose()


def address() -> str:
    return f"198.51.100.{uuid.uuid4().int % 250}-{uuid.uuid4().hex[:8]}"


def next_window_start() -> float:
    return (math.floor(time.time() / RATE_WINDOW_SECONDS) + 1) * RATE_WINDOW_SECONDS


async def test_runs_per_address_are_limited_and_other_addresses_are_not(closing) -> None:
    admission = closing(per_minute=3)
    client, now = AdmissionRequest(address()), time.time()
    for _ in range(3):
        await admission.admit(client, now)
    with pytest.raises(RateLimited) as refused:
        await admission.admit(client, now)
    assert 1 <= (refused.value.retry_after or 0) <= 2 * RATE_WINDOW_SECONDS
    await admission.admit(AdmissionRequest(address()), now)


async def test_the_window_slides_so_a_burst_at_its_edge_is_not_let_through_twice(closing) -> None:
    admission = closing(per_minute=10)
    client, edge = AdmissionRequest(address()), next_window_start()
    for _ in range(10):
        await admission.admit(client, edge - 0.5)
    # A fixed window would admit 10 more a second later: ceil(10 x 59.5/60) = 10 still count.
    with pytest.raises(RateLimited) as refused:
        await admission.admit(client, edge + 0.5)
    # ceil(10 x (60 - t)/60) < 10 first once t >= 6 s into the window: 6 s after 0.5 s.
    assert refused.value.retry_after == 6
    await admission.admit(client, edge + 6.5)
    halfway = edge + RATE_WINDOW_SECONDS / 2
    admitted_later = 0
    for _ in range(10):
        try:
            await admission.admit(client, halfway)
            admitted_later += 1
        except RateLimited:
            break
    assert admitted_later == 4  # 1 + ceil(10 x 0.5) = 6 count at 30 s: 6, 7, 8, 9 fit under 10
    with pytest.raises(RateLimited):
        await admission.admit(client, halfway)


async def test_the_daily_ceiling_is_per_caller_and_in_total(closing) -> None:
    admission = closing(per_day=2, per_day_total=3)
    now = time.time()
    alice, bob = (AdmissionRequest(address(), subject=f"key:{uuid.uuid4().hex}") for _ in "ab")
    await admission.admit(alice, now)
    await admission.admit(alice, now)
    with pytest.raises(DailyLimitReached, match="caller") as refused:
        await admission.admit(alice, now)
    to_midnight = (now // DAY_SECONDS + 1) * DAY_SECONDS - now
    assert refused.value.retry_after == max(math.ceil(to_midnight), 1)
    await admission.admit(bob, now)
    with pytest.raises(DailyLimitReached, match="deployment"):
        await admission.admit(bob, now)
    with pytest.raises(DailyLimitReached, match="deployment"):
        await admission.admit(AdmissionRequest(address()), now)  # anonymous: the total only


async def test_a_start_token_admits_one_run(closing) -> None:
    admission = closing(per_day_total=100)
    now = time.time()
    token = AdmissionRequest(address(), subject="token", token_id=uuid.uuid4().hex)
    token = AdmissionRequest(
        token.address, token.subject, token.token_id, token_expires_at=now + 300
    )
    first = await admission.admit(token, now)
    assert first.token_key is not None and not first.replay
    with pytest.raises(StartTokenUsed):
        await admission.admit(token, now)


async def test_a_start_tokens_idempotent_replay_is_let_through_without_counting(closing) -> None:
    admission = closing(per_day_total=2)
    now = time.time()

    def with_tag(tag: str) -> AdmissionRequest:
        return AdmissionRequest(address(), "token", jti, now + 300, replay_tag=tag)

    jti = uuid.uuid4().hex
    await admission.admit(with_tag("key-hash-1"), now)
    replay = await admission.admit(with_tag("key-hash-1"), now)
    assert replay.replay and replay.counted == () and replay.token_key is None
    with pytest.raises(StartTokenUsed):
        await admission.admit(with_tag("another-key-hash"), now)
    # The replay counted nothing: one run of the two is still left today.
    await admission.admit(AdmissionRequest(address()), now)
    with pytest.raises(DailyLimitReached):
        await admission.admit(AdmissionRequest(address()), now)


async def test_release_gives_back_the_count_and_the_token(closing) -> None:
    admission = closing(per_minute=1, per_day=1, per_day_total=1)
    now = time.time()
    client = AdmissionRequest(address(), "sub:x", uuid.uuid4().hex, now + 300)
    admitted = await admission.admit(client, now)
    assert len(admitted.counted) == 3
    with pytest.raises(StartTokenUsed):
        await admission.admit(client, now)
    await admission.release(admitted)
    again = await admission.admit(client, now)  # every count and the token were given back
    assert again.counted == admitted.counted
    await admission.release(again)
    await admission.release(again)  # a second release never counts below zero
    await admission.admit(client, now)
    with pytest.raises(StartTokenUsed):
        await admission.admit(client, now)


async def test_concurrent_admissions_on_two_instances_never_exceed_the_limit(closing) -> None:
    instances = [closing(per_minute=5), closing(per_minute=5)]
    client, now = AdmissionRequest(address()), time.time()

    async def attempt(index: int) -> bool:
        try:
            await instances[index % 2].admit(client, now)
        except RateLimited:
            return False
        return True

    results = await asyncio.gather(*(attempt(i) for i in range(20)))
    assert sum(results) == 5


async def test_without_limits_or_token_nothing_is_stored(closing, store_kind) -> None:
    admission = closing()
    admitted = await admission.admit(AdmissionRequest(address()), time.time())
    assert admitted.counted == () and admitted.token_key is None


async def test_every_admission_key_expires(closing, store_kind, tmp_path) -> None:
    admission = closing(per_minute=5, per_day=5, per_day_total=5)
    now = time.time()
    request = AdmissionRequest(address(), "sub:y", uuid.uuid4().hex, now + 120)
    await admission.admit(request, now)
    keys = admission_keys(request, closing.secret, now)
    if store_kind == "kv":
        client = redis.Redis.from_url(kv_redis_url())
        with client:
            rate_ttl = client.pttl(keys.rate_current)
            day_ttls = [client.ttl(keys.caller_day), client.ttl(keys.total_day)]
            token_ttl = client.pttl(keys.token)
        assert 0 < rate_ttl <= 121_000
        assert all(0 < ttl <= DAY_SECONDS + 3600 for ttl in day_ttls), day_ttls
        assert 120_000 < token_ttl <= 150_000  # its exp plus the tolerated clock skew
    else:
        import sqlite3

        db = sqlite3.connect(tmp_path / "quotes.sqlite3")
        horizon = now + DAY_SECONDS + 3601
        counts = db.execute("SELECT expires_at FROM admission_counts").fetchall()
        tokens = db.execute("SELECT expires_at FROM admission_tokens").fetchall()
        db.close()
        assert len(counts) == 3 and all(row[0] <= horizon for row in counts)
        assert len(tokens) == 1 and tokens[0][0] <= now + 151


class _CommandLog:
    """Every command redis-server executes (MONITOR lists those run inside scripts too)."""

    def __init__(self) -> None:
        self.client = redis.Redis.from_url(kv_redis_url())
        self.lines: list[str] = []
        self._monitor = self.client.monitor().__enter__()
        self._marker = f"admission-test-end-{uuid.uuid4().hex}"
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for command in self._monitor.listen():
            line = str(command["command"])
            self.lines.append(line)
            if self._marker in line:
                return

    def finish(self) -> list[str]:
        self.client.echo(self._marker)
        self._thread.join(timeout=10)
        self._monitor.__exit__(None, None, None)
        self.client.close()
        return self.lines


@pytest.mark.parametrize(
    ("caller", "expected"),
    [
        ("token", ["EVALSHA", "MGET", "SET", "SET", "SET", "SET", "EVALSHA", "MGET"]),
        ("key", ["EVALSHA", "MGET", "SET", "SET", "SET"]),
        ("anonymous", ["EVALSHA", "MGET", "SET", "SET"]),
    ],
)
@pytest.mark.parametrize("store_kind", ["kv"])  # billed commands are Upstash's
async def test_a_kv_admission_costs_one_request_and_few_billed_commands(
    closing, caller, expected
) -> None:
    admission = closing(per_minute=5, per_day=5, per_day_total=5)
    now = time.time()
    request = {
        "token": AdmissionRequest(address(), "sub:z", uuid.uuid4().hex, now + 120),
        "key": AdmissionRequest(address(), "key:0123456789abcdef"),
        "anonymous": AdmissionRequest(address()),
    }[caller]
    keys = admission_keys(request, closing.secret, now)
    await admission.admit(AdmissionRequest(address()), now)  # the script is loaded by now
    log = _CommandLog()
    await admission.admit(request, now)
    if caller == "token":
        with pytest.raises(StartTokenUsed):
            await admission.admit(request, now)
    lines = log.finish()
    mine = [keys.rate_current, keys.rate_previous, keys.caller_day, keys.total_day, keys.token]
    ours = [line for line in lines if any(key and key in line for key in mine)]
    # Admitted: EVALSHA, MGET, one SET per count (minute, caller's day, total day) and the token.
    # Refused: EVALSHA + MGET.
    assert [line.split()[0].upper() for line in ours] == expected, ours


async def test_on_kv_admission_shares_the_run_stores_rest_client(upstash_server) -> None:
    # One connection pool per instance: POST's admission and its run writes reuse connections
    # (on Upstash each new one is a TLS handshake) and closing admission leaves the store's.
    settings = settings_from_env(
        {"KV_REST_API_URL": upstash_server.url, "KV_REST_API_TOKEN": upstash_server.token}
    )
    store = open_store(settings)
    try:
        admission = open_admission(settings, store)
        assert isinstance(store, KVStore) and isinstance(admission, KVAdmission)
        assert admission.rest is store.rest
        await admission.admit(AdmissionRequest(address()), time.time())
        await admission.aclose()
        record = make_record()
        assert (await store.create_run(record)).created  # the shared client is still open
    finally:
        await store.aclose()
