"""The price gate in-process, on both stores: API keys, start tokens (signed, short-lived, single
use), the refusal to run a paid deployment open, the daily ceiling, the client address a limit
keys on, and Idempotency-Keys scoped to their caller. (Hostile names: tests/test_models.py.)"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from tests.http_helpers import VALID, problem, random_ipv6

KEYS = ("key-one-" + "a" * 24, "key-two-" + "b" * 24)


def new_secret() -> str:
    # Fresh per test: it also keys the admission counters, so no test sees another's counts.
    return f"test-secret-{uuid.uuid4().hex}"


def mint(secret: str, *, lifetime: float = 300, **claims: Any) -> str:
    """A start token as the README shows an operator's backend minting one."""
    payload = {"aud": "quotes", "exp": int(time.time() + lifetime), "jti": uuid.uuid4().hex}
    payload.update(claims)
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, secret, "HS256")


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


@pytest.fixture
def keyed(configure, fresh_instance) -> httpx.AsyncClient:
    configure(QUOTES_API_KEYS=",".join(KEYS))
    return fresh_instance()


# --- API keys ----------------------------------------------------------------------------------


async def test_with_api_keys_a_post_without_credentials_is_401_with_www_authenticate(
    keyed,
) -> None:
    response = await keyed.post("/api/quotes", json=VALID)
    assert problem(response, 401)["type"].endswith("/credentials-required")
    assert response.headers["www-authenticate"] == 'Bearer realm="quotes"'


@pytest.mark.parametrize(
    "authorization",
    [f"Bearer {KEYS[0]}x", f"Bearer {KEYS[0][:-1]}", f"Basic {KEYS[0]}", "Bearer ", KEYS[0]],
    ids=["longer", "shorter", "basic", "empty", "no-scheme"],
)
async def test_a_refused_credential_is_401_invalid_token(keyed, authorization) -> None:
    response = await keyed.post("/api/quotes", json=VALID, headers={"Authorization": authorization})
    assert problem(response, 401)["type"].endswith("/credentials-refused")
    assert 'error="invalid_token"' in response.headers["www-authenticate"]
    assert KEYS[0] not in response.text


async def test_every_configured_key_starts_runs_and_reading_a_run_stays_open(keyed) -> None:
    for key in KEYS:
        response = await keyed.post("/api/quotes", json=VALID, headers=bearer(key))
        assert response.status_code == 202, response.text
    run_id = response.json()["runId"]
    assert (await keyed.get(f"/api/quotes/{run_id}")).status_code == 200
    assert (await keyed.get(f"/api/quotes/{run_id}/stream")).status_code == 200


async def test_credentials_are_checked_after_the_method_and_before_the_body(keyed) -> None:
    assert (await keyed.put("/api/quotes", content=b"x")).status_code == 405
    unsent = await keyed.post("/api/quotes", content=b"x" * 20000, headers={"content-type": "x/y"})
    assert unsent.status_code == 401
    sent = await keyed.post(
        "/api/quotes", content=b"x", headers={"content-type": "x/y", **bearer(KEYS[1])}
    )
    assert sent.status_code == 415


# --- start tokens ------------------------------------------------------------------------------


@pytest.fixture
def tokens(configure, fresh_instance) -> tuple[httpx.AsyncClient, str]:
    secret = new_secret()
    configure(QUOTES_API_KEYS=KEYS[0], QUOTES_SECRET=secret)
    return fresh_instance(), secret


async def test_a_start_token_starts_exactly_one_run(tokens) -> None:
    api, secret = tokens
    token = mint(secret, sub="visitor-1")
    first = await api.post("/api/quotes", json=VALID, headers=bearer(token))
    assert first.status_code == 202, first.text
    second = await api.post("/api/quotes", json=VALID, headers=bearer(token))
    assert problem(second, 401)["type"].endswith("/start-token-used")
    assert 'error="invalid_token"' in second.headers["www-authenticate"]
    assert (await api.post("/api/quotes", json=VALID, headers=bearer(mint(secret)))).is_success


async def test_a_start_tokens_idempotent_replay_returns_its_run(tokens) -> None:
    api, secret = tokens
    token = mint(secret)
    headers = {**bearer(token), "Idempotency-Key": f"order-{uuid.uuid4()}"}
    first = await api.post("/api/quotes", json=VALID, headers=headers)
    replay = await api.post("/api/quotes", json=VALID, headers=headers)
    assert (first.status_code, replay.status_code) == (202, 200)
    assert replay.json() == first.json()
    changed = await api.post("/api/quotes", json={**VALID, "zip": "10001"}, headers=headers)
    assert problem(changed, 422)["type"].endswith("/idempotency-key-reused")
    other_key = {**headers, "Idempotency-Key": f"order-{uuid.uuid4()}"}
    problem(await api.post("/api/quotes", json=VALID, headers=other_key), 401)


@pytest.mark.parametrize(
    ("claims", "detail"),
    [
        ({"lifetime": -120}, "expired"),
        ({"aud": "elsewhere"}, "aud"),
        ({"lifetime": 11 * 60}, "lives too long"),
        ({"jti": None}, "jti"),
        ({"aud": None}, "aud"),
        ({"providers": ["geico", "acme"]}, "unknown provider"),
        ({"providers": []}, "non-empty"),
        ({"sub": 7}, "malformed"),
    ],
    ids=["expired", "wrong-aud", "too-long", "no-jti", "no-aud", "bad-providers", "none", "sub"],
)
async def test_a_start_token_that_does_not_check_out_is_401(tokens, claims, detail) -> None:
    api, secret = tokens
    claims = dict(claims)  # the parameter is shared by both store kinds
    lifetime = claims.pop("lifetime", 300)
    response = await api.post(
        "/api/quotes", json=VALID, headers=bearer(mint(secret, lifetime=lifetime, **claims))
    )
    body = problem(response, 401)
    assert detail in body["detail"]


async def test_a_token_signed_otherwise_is_refused(tokens) -> None:
    api, secret = tokens
    forged = mint(new_secret())
    unsigned = jwt.encode({"aud": "quotes", "exp": int(time.time()) + 60, "jti": "x"}, None, "none")
    other_alg = jwt.encode(
        {"aud": "quotes", "exp": int(time.time()) + 60, "jti": "y"}, secret * 2, "HS512"
    )
    for token in (forged, unsigned, other_alg):
        response = await api.post("/api/quotes", json=VALID, headers=bearer(token))
        assert "signature is wrong" in problem(response, 401)["detail"], token


async def test_a_token_limited_to_providers_runs_only_those(tokens) -> None:
    api, secret = tokens
    limited = mint(secret, providers=["progressive", "geico"])
    body = {**VALID, "providers": None}
    response = await api.post("/api/quotes", json=body, headers=bearer(limited))
    assert response.status_code == 202, response.text
    snapshot = (await api.get(response.headers["location"])).json()
    assert [p["provider"] for p in snapshot["providers"]] == ["geico", "progressive"]

    naming_others = {**VALID, "providers": ["geico", "allstate"]}
    response = await api.post(
        "/api/quotes", json=naming_others, headers=bearer(mint(secret, providers=["geico"]))
    )
    assert response.status_code == 422
    errors = {e["field"]: e["message"] for e in response.json()["errors"]}
    assert "not allowed by this start token" in errors["providers.1"]


async def test_start_tokens_are_refused_unless_quotes_secret_is_set(
    configure, fresh_instance
) -> None:
    configure(QUOTES_API_KEYS=KEYS[0])
    api = fresh_instance()
    # Without QUOTES_SECRET the secret is derived, and no backend could have minted with it.
    response = await api.post("/api/quotes", json=VALID, headers=bearer(mint(new_secret())))
    assert "not an API key" in problem(response, 401)["detail"]


async def test_without_api_keys_tokens_are_single_use_and_other_credentials_ignored(
    configure, fresh_instance
) -> None:
    secret = new_secret()
    configure(QUOTES_SECRET=secret)
    api = fresh_instance()
    assert (await api.post("/api/quotes", json=VALID)).status_code == 202
    token = mint(secret)
    assert (await api.post("/api/quotes", json=VALID, headers=bearer(token))).status_code == 202
    problem(await api.post("/api/quotes", json=VALID, headers=bearer(token)), 401)
    # Open, a credential it cannot use changes nothing: a page may send a key meant elsewhere.
    for unusable in ("some-api-key", mint(new_secret()), mint(secret, lifetime=-300)):
        response = await api.post("/api/quotes", json=VALID, headers=bearer(unusable))
        assert response.status_code == 202, response.text
    basic = await api.post("/api/quotes", json=VALID, headers={"Authorization": "Basic eDp5"})
    assert basic.status_code == 202


# --- no open wallet ----------------------------------------------------------------------------

INVALID = {**VALID, "zip": "nope"}


@pytest.mark.parametrize("environment", ["production", "preview"])
async def test_a_paid_deployment_left_open_is_503_saying_what_to_set(
    configure, fresh_instance, environment
) -> None:
    configure(VERCEL="1", VERCEL_ENV=environment, TINYFISH_API_KEY="tf-key")
    api = fresh_instance()
    body = problem(await api.post("/api/quotes", json=VALID), 503)
    assert body["type"].endswith("/paid-deployment-open")
    assert "QUOTES_API_KEYS" in body["detail"] and "QUOTES_PUBLIC=1" in body["detail"]
    assert "tf-key" not in body["detail"]


@pytest.mark.parametrize(
    "env",
    [
        {"VERCEL": "1", "VERCEL_ENV": "production", "TINYFISH_API_KEY": "k", "QUOTES_PUBLIC": "1"},
        {
            "VERCEL": "1",
            "VERCEL_ENV": "production",
            "TINYFISH_API_KEY": "k",
            "QUOTES_API_KEYS": "a",
        },
        {"VERCEL": "1", "VERCEL_ENV": "development", "TINYFISH_API_KEY": "k"},
        {"TINYFISH_API_KEY": "k"},
        {"VERCEL": "1", "VERCEL_ENV": "production"},
    ],
    ids=["declared-public", "keys", "vercel-dev", "local", "simulated"],
)
async def test_a_guarded_public_local_or_simulated_deployment_is_not_refused(
    configure, fresh_instance, env
) -> None:
    configure(**env)
    api = fresh_instance()
    # An invalid body shows the request got past the gate without starting a paid run.
    headers = bearer("a") if "QUOTES_API_KEYS" in env else {}
    response = await api.post("/api/quotes", json=INVALID, headers=headers)
    assert response.status_code == 422, response.text


# --- the daily ceiling -------------------------------------------------------------------------


async def test_the_daily_ceiling_is_per_key_and_in_total_with_retry_after(
    configure, fresh_instance
) -> None:
    configure(
        QUOTES_API_KEYS=",".join(KEYS),
        QUOTES_SECRET=new_secret(),
        QUOTE_RUNS_PER_DAY="2",
        QUOTE_RUNS_PER_DAY_TOTAL="3",
    )
    api = fresh_instance()
    one, two = bearer(KEYS[0]), bearer(KEYS[1])
    statuses = [(await api.post("/api/quotes", json=VALID, headers=one)) for _ in range(3)]
    assert [r.status_code for r in statuses] == [202, 202, 429]
    spent = problem(statuses[2], 429)
    assert spent["type"].endswith("/daily-limit-reached")
    now = time.time()
    to_midnight = 86400 - now % 86400
    assert to_midnight - 5 <= int(statuses[2].headers["retry-after"]) <= to_midnight + 5
    assert (await api.post("/api/quotes", json=VALID, headers=two)).status_code == 202
    total = problem(await api.post("/api/quotes", json=VALID, headers=two), 429)
    assert "deployment" in total["detail"]


async def test_a_replay_does_not_count_and_is_answered_when_the_day_is_spent(
    configure, fresh_instance
) -> None:
    configure(QUOTES_API_KEYS=KEYS[0], QUOTES_SECRET=new_secret(), QUOTE_RUNS_PER_DAY="2")
    api = fresh_instance()
    headers = {**bearer(KEYS[0]), "Idempotency-Key": f"order-{uuid.uuid4()}"}
    first = await api.post("/api/quotes", json=VALID, headers=headers)
    replay = await api.post("/api/quotes", json=VALID, headers=headers)
    assert (first.status_code, replay.status_code) == (202, 200)
    second = await api.post("/api/quotes", json=VALID, headers=bearer(KEYS[0]))
    assert second.status_code == 202  # the replay did not use the day's second run
    problem(await api.post("/api/quotes", json=VALID, headers=bearer(KEYS[0])), 429)
    late_replay = await api.post("/api/quotes", json=VALID, headers=headers)
    assert late_replay.status_code == 200 and late_replay.json() == first.json()


async def test_a_run_whose_creation_failed_does_not_use_the_ceiling(
    configure, fresh_instance, monkeypatch
) -> None:
    from lib.store import StoreUnavailable

    configure(QUOTES_SECRET=new_secret(), QUOTE_RUNS_PER_DAY="1")
    api = fresh_instance()

    async def unreachable(*args: object, **kwargs: object) -> None:
        raise StoreUnavailable("KV did not answer create in time")

    with monkeypatch.context() as patch:
        patch.setattr("lib.store.sqlite.SQLiteStore.create_run", unreachable)
        patch.setattr("lib.store.kv.KVStore.create_run", unreachable)
        problem(await api.post("/api/quotes", json=VALID), 503)
    assert (await api.post("/api/quotes", json=VALID)).status_code == 202
    problem(await api.post("/api/quotes", json=VALID), 429)


# --- the client address ------------------------------------------------------------------------


async def test_off_vercel_the_limit_keys_on_the_peer_never_on_headers(
    configure, fresh_instance
) -> None:
    configure(QUOTE_RATE_LIMIT_PER_MINUTE="2", QUOTES_SECRET=new_secret())
    api = fresh_instance(client=("203.0.113.7", 5000))
    spoofed = [
        {"X-Forwarded-For": random_ipv6()},
        {"X-Vercel-Forwarded-For": random_ipv6(), "X-Real-IP": random_ipv6()},
        {"X-Forwarded-For": random_ipv6()},
    ]
    statuses = [(await api.post("/api/quotes", json=VALID, headers=h)).status_code for h in spoofed]
    assert statuses == [202, 202, 429]
    api = fresh_instance(client=("203.0.113.8", 5000))
    assert (await api.post("/api/quotes", json=VALID)).status_code == 202


async def test_on_vercel_the_limit_keys_on_its_edge_header_and_an_ipv6_64(
    configure, fresh_instance
) -> None:
    configure(QUOTE_RATE_LIMIT_PER_MINUTE="2", QUOTES_SECRET=new_secret(), VERCEL="1")
    api = fresh_instance()
    network = "2001:db8:" + ":".join(uuid.uuid4().hex[i : i + 4] for i in (0, 4))
    same_64 = [f"{network}:{suffix}" for suffix in ("0:0:0:1", "ffff:1:2:3", "abcd::9")]
    statuses = [
        (
            await api.post("/api/quotes", json=VALID, headers={"X-Vercel-Forwarded-For": address})
        ).status_code
        for address in same_64
    ]
    assert statuses == [202, 202, 429]
    # x-real-ip stands in when Vercel's own header is absent.
    other = {"X-Real-IP": random_ipv6(), "X-Forwarded-For": same_64[0]}
    assert (await api.post("/api/quotes", json=VALID, headers=other)).status_code == 202


# --- idempotency scoped to the caller ----------------------------------------------------------


async def test_one_keys_idempotency_keys_neither_collide_with_nor_reveal_anothers(keyed) -> None:
    one, two = bearer(KEYS[0]), bearer(KEYS[1])
    key = {"Idempotency-Key": f"order-{uuid.uuid4()}"}
    first = await keyed.post("/api/quotes", json=VALID, headers={**one, **key})
    same_key_elsewhere = await keyed.post("/api/quotes", json=VALID, headers={**two, **key})
    replay_elsewhere = await keyed.post("/api/quotes", json=VALID, headers={**two, **key})
    assert [first.status_code, same_key_elsewhere.status_code] == [202, 202]
    assert same_key_elsewhere.json()["runId"] != first.json()["runId"]
    assert replay_elsewhere.status_code == 200
    assert replay_elsewhere.json() == same_key_elsewhere.json()
    # Another body under a key the other caller used is a new run, not a 422 revealing its use.
    probe = {"Idempotency-Key": f"order-{uuid.uuid4()}"}
    assert (await keyed.post("/api/quotes", json=VALID, headers={**one, **probe})).is_success
    other_body = {**VALID, "zip": "10001"}
    response = await keyed.post("/api/quotes", json=other_body, headers={**two, **probe})
    assert response.status_code == 202


async def test_anonymous_callers_idempotency_keys_are_per_address(
    configure, fresh_instance
) -> None:
    idempotency = {"Idempotency-Key": f"order-{uuid.uuid4()}"}
    here, there = random_ipv6(), random_ipv6()
    runs = []
    for address in (here, there, here):
        api = fresh_instance(client=(address, 5000))
        runs.append(await api.post("/api/quotes", json=VALID, headers=idempotency))
    assert [r.status_code for r in runs] == [202, 202, 200]
    assert runs[0].json()["runId"] != runs[1].json()["runId"]
    assert runs[2].json()["runId"] == runs[0].json()["runId"]


def test_pyjwt_is_imported_only_when_a_start_token_is_verified() -> None:
    code = (
        "import sys, time\n"
        "from tests.functions import VercelRouter\n"
        "VercelRouter()\n"
        "print('jwt' in sys.modules)\n"
        "from lib.start_tokens import StartTokenRefused, verify_start_token\n"
        "try:\n"
        "    verify_start_token('a.b.c', b'secret', time.time())\n"
        "except StartTokenRefused:\n"
        "    pass\n"
        "print('jwt' in sys.modules)\n"
    )
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["False", "True"], result.stderr
