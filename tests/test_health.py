"""GET /api/health in-process, on both stores: 200 with what is active, or a 503 problem that
names what is missing, and never a secret."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from lib.config import get_settings
from tests.functions import load_function

SECRET = "tok-health-secret-0123456789"


@pytest.fixture
def configure(store_kind: str, tmp_path, monkeypatch, request: pytest.FixtureRequest):
    """The function instance's environment: the parametrised store and a local queue."""

    def apply(**env: str) -> None:
        for name in ("KV_REST_API_URL", "KV_REST_API_TOKEN", "VERCEL", "VERCEL_ENV"):
            monkeypatch.delenv(name, raising=False)
        for name in ("TINYFISH_API_KEY", "QUOTE_PROVIDERS"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("QUOTES_DB_PATH", str(tmp_path / "quotes.sqlite3"))
        monkeypatch.setenv("VERCEL_QUEUE_BASE_URL", "http://127.0.0.1:3999")
        if store_kind == "kv":
            server = request.getfixturevalue("upstash_server")
            monkeypatch.setenv("KV_REST_API_URL", server.url)
            monkeypatch.setenv("KV_REST_API_TOKEN", server.token)
        for name, value in env.items():
            if value:
                monkeypatch.setenv(name, value)
            else:
                monkeypatch.delenv(name, raising=False)
        get_settings.cache_clear()

    apply()
    yield apply
    get_settings.cache_clear()


@pytest.fixture
async def health(configure) -> AsyncIterator[Callable[..., Any]]:
    clients: list[httpx.AsyncClient] = []

    async def get(**env: str) -> httpx.Response:
        configure(**env)
        app = load_function("api/health.py").app  # a new instance reads the environment
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
        clients.append(client)
        return await client.get("/api/health")

    yield get
    for client in clients:
        await client.aclose()


def not_ready(response: httpx.Response) -> str:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["cache-control"] == "no-store"
    assert SECRET not in response.text
    body = response.json()
    assert body["status"] == 503
    return str(body["detail"])


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_ok_when_storage_answers_and_a_queue_is_configured(health, store_kind) -> None:
    response = await health()
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    assert response.json() == {
        "status": "ok",
        "store": store_kind,
        "queue": "local",
        "source": "simulated",
    }


async def test_names_the_tinyfish_source_without_its_key(health) -> None:
    response = await health(TINYFISH_API_KEY=SECRET)
    assert response.status_code == 200
    assert response.json()["source"] == "tinyfish"
    assert SECRET not in response.text


@pytest.mark.parametrize("store_kind", ["kv"])
async def test_on_vercel_the_queue_is_vercel_queues(health, store_kind) -> None:
    response = await health(VERCEL="1", VERCEL_ENV="preview", VERCEL_QUEUE_BASE_URL="")
    assert response.status_code == 200, response.text
    assert response.json()["queue"] == "vercel"


async def test_without_a_queue_it_is_503_naming_the_queue(health) -> None:
    detail = not_ready(await health(VERCEL_QUEUE_BASE_URL=""))
    assert "No queue is configured" in detail
    assert "VERCEL_QUEUE_BASE_URL" in detail
    assert "Storage" not in detail


async def test_unreachable_kv_is_503_naming_storage_with_retry_after(health) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    response = await health(KV_REST_API_URL=url, KV_REST_API_TOKEN=SECRET)
    detail = not_ready(response)
    assert "Storage (kv) does not answer" in detail
    assert response.headers["retry-after"] == "2"
    assert url not in detail


@pytest.mark.parametrize("store_kind", ["kv"])
async def test_kv_refusing_the_token_is_503_without_retry_after(health, store_kind) -> None:
    response = await health(KV_REST_API_TOKEN=SECRET)
    assert "refused the credentials" in not_ready(response)
    assert "retry-after" not in response.headers


@pytest.mark.parametrize("store_kind", ["sqlite"])
async def test_a_deployment_without_kv_is_503_naming_kv(health, store_kind) -> None:
    detail = not_ready(await health(VERCEL="1", VERCEL_ENV="production"))
    assert "No KV store is linked" in detail
    assert "queue" not in detail  # Vercel Queues needs no setting


@pytest.mark.parametrize("store_kind", ["sqlite"])
async def test_an_sqlite_file_that_cannot_be_made_is_503(health, store_kind, tmp_path) -> None:
    (tmp_path / "not-a-folder").write_text("")
    detail = not_ready(await health(QUOTES_DB_PATH=str(tmp_path / "not-a-folder" / "q.db")))
    assert "Storage (sqlite) does not answer" in detail


@pytest.mark.parametrize("store_kind", ["kv"])
async def test_everything_missing_is_named_in_one_problem(health, store_kind) -> None:
    response = await health(
        KV_REST_API_URL=f"http://127.0.0.1:{closed_port()}", VERCEL_QUEUE_BASE_URL=""
    )
    detail = not_ready(response)
    assert "Storage (kv) does not answer" in detail
    assert "No queue is configured" in detail


@pytest.mark.parametrize("store_kind", ["kv"])
async def test_not_ready_is_a_warning_line_naming_what_is_missing_without_a_secret(
    health, store_kind, json_logs
) -> None:
    await health(KV_REST_API_TOKEN=SECRET, VERCEL_QUEUE_BASE_URL="")
    (line,) = [o for o in json_logs.objects() if o["message"].startswith("not ready")]
    assert line["level"] == "warning"
    assert "refused the credentials" in line["message"]
    assert "No queue is configured" in line["message"]
    assert SECRET not in json.dumps(json_logs.objects())


async def test_invalid_configuration_is_503_naming_the_setting(health) -> None:
    detail = not_ready(await health(QUOTE_PROVIDERS="geico,acme"))
    assert "QUOTE_PROVIDERS" in detail
