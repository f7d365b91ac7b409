"""The price gate end to end on the `make dev` host (two instances per function, requests spread
round-robin, on both stores): keys and start tokens across instances, the per-address limit
keyed on the address the host saw (clients connect from distinct loopback addresses, and the
headers they set themselves are overwritten as Vercel's edge does), and the daily ceiling."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from tests.hosts import REQUEST, host_env
from tools.devhost import RunningDevHost, start_devhost_process

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("e2e-key-one-" + "c" * 20, "e2e-key-two-" + "d" * 20)
PER_MINUTE, PER_DAY = 3, 4


@pytest.fixture(scope="module", params=["sqlite", "kv"])
def gated_host(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[RunningDevHost]:
    env = host_env(request.param, tmp_path_factory.mktemp(request.param), request)
    secret = f"e2e-secret-{uuid.uuid4().hex}"  # fresh: it keys the admission counters too
    env.update(
        SIMULATED_DELAY_SCALE="0",
        VERCEL="1",  # the limit keys on x-vercel-forwarded-for, which the host sets
        QUOTES_API_KEYS=",".join(KEYS),
        QUOTES_SECRET=secret,
        QUOTE_RATE_LIMIT_PER_MINUTE=str(PER_MINUTE),
        QUOTE_RUNS_PER_DAY=str(PER_DAY),
        QUOTE_RUNS_PER_DAY_TOTAL="1000",
    )
    with start_devhost_process(ROOT, instances=2, env=env) as running:
        running.secret = secret  # type: ignore[attr-defined]
        yield running


@asynccontextmanager
async def client_at(host: RunningDevHost, address: str):
    """A client whose connections come from `address` (any 127.0.0.0/8 address is local)."""
    transport = httpx.AsyncHTTPTransport(local_address=address)
    async with httpx.AsyncClient(base_url=host.url, transport=transport, timeout=30) as client:
        yield client


def loopback() -> str:
    return f"127.{uuid.uuid4().int % 200 + 10}.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}"


def mint(host: RunningDevHost, **claims: Any) -> str:
    payload = {"aud": "quotes", "exp": int(time.time()) + 300, "jti": uuid.uuid4().hex, **claims}
    return jwt.encode(payload, host.secret, "HS256")  # type: ignore[attr-defined]


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


async def test_a_key_is_required_to_start_a_run_but_not_to_read_one(gated_host) -> None:
    async with client_at(gated_host, loopback()) as client:
        refused = await client.post("/api/quotes", json=REQUEST)
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith("Bearer")
        started = await client.post("/api/quotes", json=REQUEST, headers=bearer(KEYS[0]))
        assert started.status_code == 202, started.text
        run_id = started.json()["runId"]
        stream = await client.get(f"/api/quotes/{run_id}/stream")
        assert stream.status_code == 200 and '"type":"complete"' in stream.text
        assert (await client.get(f"/api/quotes/{run_id}")).json()["status"] == "completed"


async def test_a_start_token_starts_one_run_whichever_instance_sees_it_again(gated_host) -> None:
    token = mint(gated_host, sub=f"visitor-{uuid.uuid4().hex[:8]}")
    async with client_at(gated_host, loopback()) as client:
        first = await client.post("/api/quotes", json=REQUEST, headers=bearer(token))
        assert first.status_code == 202, first.text
        instances = {first.headers["x-devhost-instance"]}
        for _ in range(2):  # round-robin: the next two land on both instances
            again = await client.post("/api/quotes", json=REQUEST, headers=bearer(token))
            assert again.status_code == 401
            assert again.json()["type"].endswith("/start-token-used")
            instances.add(again.headers["x-devhost-instance"])
        assert len(instances) == 2


async def test_the_limit_keys_on_the_address_the_host_saw_not_on_client_headers(
    gated_host,
) -> None:
    address = loopback()
    async with client_at(gated_host, address) as client:
        statuses = []
        for _ in range(PER_MINUTE + 1):
            spoofed = {"X-Vercel-Forwarded-For": loopback(), "X-Real-IP": loopback()}
            headers = {**bearer(mint(gated_host)), **spoofed}
            response = await client.post("/api/quotes", json=REQUEST, headers=headers)
            statuses.append(response.status_code)
        assert statuses == [202] * PER_MINUTE + [429]
        assert response.json()["type"].endswith("/rate-limited")
        assert 1 <= int(response.headers["retry-after"]) <= 120
    async with client_at(gated_host, loopback()) as elsewhere:
        fine = await elsewhere.post("/api/quotes", json=REQUEST, headers=bearer(mint(gated_host)))
        assert fine.status_code == 202


async def test_a_keys_runs_for_the_day_are_capped(gated_host) -> None:
    statuses = []
    for _ in range(PER_DAY + 1):  # from new addresses, so the per-minute limit is not the cap
        async with client_at(gated_host, loopback()) as client:
            response = await client.post("/api/quotes", json=REQUEST, headers=bearer(KEYS[1]))
            statuses.append(response.status_code)
    assert statuses == [202] * PER_DAY + [429]
    assert response.json()["type"].endswith("/daily-limit-reached")
    assert int(response.headers["retry-after"]) <= 86400


async def test_idempotency_keys_are_scoped_to_their_caller(gated_host) -> None:
    key = {"Idempotency-Key": f"order-{uuid.uuid4()}"}
    subject = f"visitor-{uuid.uuid4().hex[:8]}"
    async with client_at(gated_host, loopback()) as client:
        by_key = await client.post("/api/quotes", json=REQUEST, headers={**bearer(KEYS[0]), **key})
        token = mint(gated_host, sub=subject)
        by_token = await client.post("/api/quotes", json=REQUEST, headers={**bearer(token), **key})
        replay = await client.post("/api/quotes", json=REQUEST, headers={**bearer(token), **key})
    assert [by_key.status_code, by_token.status_code, replay.status_code] == [202, 202, 200]
    assert by_key.json()["runId"] != by_token.json()["runId"]
    assert replay.json() == by_token.json()
