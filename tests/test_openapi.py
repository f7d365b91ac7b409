"""The OpenAPI document: generated from the models, committed, valid, served, and true of what
the functions send (here in-process; tests/test_schemathesis.py fuzzes the running host)."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from openapi_spec_validator import validate

from lib.config import get_settings
from tests.conftest import run_end
from tests.functions import VercelRouter
from tools import openapi
from tools.devhost.routes import Router, discover_functions, discover_rewrites

ROOT = Path(__file__).resolve().parent.parent
DOCUMENT: dict[str, Any] = json.loads((ROOT / "openapi.json").read_text(encoding="utf-8"))
REQUEST = {
    "vin": "2C3CDZAG2GH967639",
    "zip": "94107",
    "driver": {"firstName": "Ana", "lastName": "Lee", "dateOfBirth": "1990-04-12"},
    "providers": ["geico", "progressive"],
}


def conforms(instance: object, component: str) -> None:
    """Raises unless `instance` fits the document's schema `component`."""
    schema = {"$ref": f"#/components/schemas/{component}", "components": DOCUMENT["components"]}
    jsonschema.Draft202012Validator(schema).validate(instance)


def test_committed_document_is_what_the_generator_builds() -> None:
    assert (ROOT / "openapi.json").read_text(encoding="utf-8") == openapi.render(), (
        "openapi.json is stale: run `make openapi` and commit it"
    )


def test_generator_check_mode_fails_on_a_stale_document(tmp_path, monkeypatch) -> None:
    stale = tmp_path / "openapi.json"
    stale.write_text("{}\n")
    monkeypatch.setattr(openapi, "DOCUMENT_PATH", stale)
    assert openapi.main(["--check"]) == 1
    assert openapi.main([]) == 0
    assert openapi.main(["--check"]) == 0
    assert stale.read_text() == openapi.render()


def test_document_is_valid_openapi_3_1() -> None:
    assert DOCUMENT["openapi"].startswith("3.1.")
    validate(DOCUMENT)


def test_every_http_function_is_described_and_every_described_path_is_served() -> None:
    router = Router(discover_functions(ROOT), discover_rewrites(ROOT))
    described: dict[str, str] = {}
    for path in DOCUMENT["paths"]:
        resolved = router.resolve(path.replace("{runId}", "k3Jx9aaaaaaaaaaaaaaaaa"))
        assert resolved is not None, f"{path} is described but no function serves it"
        described[resolved[0].file] = path
    served_under_a_rewrite = {"api/openapi.py"}
    config = json.loads((ROOT / "vercel.json").read_text(encoding="utf-8"))["functions"]
    # A queue-triggered function (the worker) is no HTTP route.
    queue_triggered = {
        file for file, options in config.items() if "experimentalTriggers" in options
    }
    functions = {route.spec.file for route in router.routes}
    assert functions - set(described) - served_under_a_rewrite - queue_triggered == set()


def test_every_operation_answers_problems_as_problem_details() -> None:
    for path, item in DOCUMENT["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                if int(status) >= 400:
                    content = response["content"]
                    assert list(content) == ["application/problem+json"], (method, path, status)


def test_request_schema_documents_the_contract_constraints() -> None:
    conforms(REQUEST, "QuoteRequest")
    for bad in ({**REQUEST, "zip": "9410"}, {**REQUEST, "vin": "2C3CDZAG2GH96763O"}):
        with pytest.raises(jsonschema.ValidationError):
            conforms(bad, "QuoteRequest")
    with pytest.raises(jsonschema.ValidationError):
        conforms({**REQUEST, "extra": 1}, "QuoteRequest")


@pytest.fixture(params=[""], ids=["open"])
async def api(tmp_path, monkeypatch, request, queue_worker) -> AsyncIterator[httpx.AsyncClient]:
    for name in ("KV_REST_API_URL", "KV_REST_API_TOKEN", "VERCEL", "VERCEL_ENV"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("QUOTES_DB_PATH", str(tmp_path / "quotes.sqlite3"))
    monkeypatch.setenv("SIMULATED_DELAY_SCALE", "0")
    monkeypatch.setenv("QUOTE_RATE_LIMIT_PER_MINUTE", "0")
    monkeypatch.setenv("QUOTE_RUNS_PER_DAY", "0")
    monkeypatch.setenv("CORS_ALLOW_ORIGINS", "https://app.example")
    monkeypatch.setenv("QUOTES_API_KEYS", request.param)
    get_settings.cache_clear()
    transport = httpx.ASGITransport(app=VercelRouter())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client
    get_settings.cache_clear()


def documented_headers(path: str, status: int) -> set[str]:
    response = DOCUMENT["paths"][path]["post"]["responses"][str(status)]
    return {name.lower() for name in response.get("headers", {})}


@pytest.mark.parametrize("api", ["key-one,key-two"], ids=["keyed"], indirect=True)
async def test_a_keyed_deployment_answers_as_documented(api: httpx.AsyncClient) -> None:
    assert DOCUMENT["paths"]["/api/quotes"]["post"]["security"] == [{"bearer": []}, {}]
    for headers in ({}, {"Authorization": "Bearer key-three"}):
        refused = await api.post("/api/quotes", json=REQUEST, headers=headers)
        assert refused.status_code == 401
        assert refused.headers["content-type"] == "application/problem+json"
        conforms(refused.json(), "ProblemDetail")
        assert documented_headers("/api/quotes", 401) <= set(refused.headers)
    key = {"Authorization": "Bearer key-two"}
    started = await api.post("/api/quotes", json=REQUEST, headers=key)
    assert started.status_code == 202, started.text
    conforms(started.json(), "RunAccepted")
    assert documented_headers("/api/quotes", 202) <= set(started.headers)


async def test_document_is_served_as_json_with_the_apis_cors(api: httpx.AsyncClient) -> None:
    response = await api.get("/api/openapi.json", headers={"Origin": "https://app.example"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["access-control-allow-origin"] == "https://app.example"
    assert response.content == (ROOT / "openapi.json").read_bytes()
    refused = await api.get("/api/openapi.json", headers={"Origin": "https://elsewhere.example"})
    assert "access-control-allow-origin" not in refused.headers


async def test_a_bundle_without_the_document_answers_a_503_problem(
    api: httpx.AsyncClient, tmp_path, monkeypatch
) -> None:
    served = await api.get("/api/openapi.json")  # an instance that read it keeps it
    assert served.status_code == 200
    module = sys.modules["fn_api_openapi_py"]  # as tests/functions.py loads the function
    module._document.cache_clear()
    monkeypatch.setattr(module, "DOCUMENT_PATH", tmp_path / "openapi.json")
    try:
        missing = await api.get("/api/openapi.json")
    finally:
        module._document.cache_clear()
    assert missing.status_code == 503
    assert missing.headers["content-type"] == "application/problem+json"
    assert missing.json()["type"].endswith("/openapi-unavailable")
    conforms(missing.json(), "ProblemDetail")


async def test_other_methods_on_the_document_are_a_405_problem(api: httpx.AsyncClient) -> None:
    response = await api.post("/api/openapi.json", content=b"{}")
    assert response.status_code == 405
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["allow"] == "GET, OPTIONS"
    conforms(response.json(), "ProblemDetail")


async def test_a_whole_run_as_sent_fits_the_document(api: httpx.AsyncClient) -> None:
    started = await api.post("/api/quotes", json=REQUEST)
    assert started.status_code == 202
    conforms(started.json(), "RunAccepted")
    await run_end(api, started.json()["runId"])
    snapshot = await api.get(started.json()["statusUrl"], params={"since": -1})
    assert snapshot.status_code == 200
    body = snapshot.json()
    conforms(body, "RunSnapshot")
    assert {e["type"] for e in body["events"]} >= {"started", "quote", "progress", "complete"}
    for event in body["events"]:
        conforms(event, "RunEvent")


async def test_validation_problem_fits_the_document(api: httpx.AsyncClient) -> None:
    response = await api.post("/api/quotes", json={**REQUEST, "zip": "x", "extra": 1})
    assert response.status_code == 422
    body = response.json()
    conforms(body, "ProblemDetail")
    assert {e["field"] for e in body["errors"]} == {"zip", "extra"}
