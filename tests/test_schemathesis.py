"""Schemathesis against the running functions: every operation in openapi.json, on the `make dev`
host, with generated valid and invalid requests (examples, coverage and fuzzing phases), and the
run operations again on a finished run. Every response is checked for server errors, its schema,
undocumented status codes, content types and headers, invalid data accepted, methods and
required headers. Seeded and bounded."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tools.devhost import RunningDevHost, start_devhost_process

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
# One check is left out: a QuoteRequest that fits its schema may still be refused (422), since a
# VIN's check digit and the driver's age today are rules JSON Schema cannot state.
EXCLUDED_CHECKS = [positive_data_acceptance]
# Unknown query parameters are ignored, not refused: Vercel itself adds `runId` to the query of
# a [runId] function, and clients add cache-busters. So they are not invalid data here.
CONFIG = SchemathesisConfig.from_dict({"generation": {"allow-extra-parameters": False}})
# The committed document (schemathesis' lazy fixture loader does not work under pytest 9); the
# first test checks that the host serves exactly this file.
schema = schemathesis.openapi.from_path(ROOT / "openapi.json", config=CONFIG)
# The cancel token of each run the tests started (POST gives it only to the run's starter).
CANCEL_TOKENS: dict[str, str] = {}
bounded = settings(
    max_examples=40,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.fixture(scope="module", params=["sqlite", "kv"])
def host(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningDevHost]:
    """The `make dev` host on each store. Being parametrized also gives every generated test a
    node id of its own (`…[POST /api/quotes][kv]`): schemathesis' items otherwise share their
    function's id under pytest 9, and pytest-xdist, which schedules by id, would run one."""
    env = {
        "QUOTES_DB_PATH": str(tmp_path_factory.mktemp("schemathesis") / "quotes.sqlite3"),
        "KV_REST_API_URL": "",
        "KV_REST_API_TOKEN": "",
        "TINYFISH_API_KEY": "",
        "SIMULATED_DELAY_SCALE": "0",
        "QUOTE_RATE_LIMIT_PER_MINUTE": "0",
        # A stream of a run still going closes within 2 s, so no case waits on a long stream.
        "STREAM_MAX_SECONDS": "2",
    }
    if request.param == "kv":
        server = request.getfixturevalue("upstash_server")
        env.update(KV_REST_API_URL=server.url, KV_REST_API_TOKEN=server.token)
    with start_devhost_process(ROOT, instances=1, env=env) as running:
        yield running


def test_the_host_serves_the_committed_document(host: RunningDevHost) -> None:
    response = httpx.get(f"{host.url}/api/openapi.json", timeout=10)
    assert response.status_code == 200
    assert response.content == (ROOT / "openapi.json").read_bytes()


@schema.parametrize()
@bounded
def test_every_operation_keeps_to_the_document(case: Any, host: RunningDevHost) -> None:
    case.call_and_validate(base_url=host.url, excluded_checks=EXCLUDED_CHECKS, timeout=15)


@pytest.fixture(scope="module")
def finished_run_id(host: RunningDevHost) -> str:
    """A run that has ended, so its stream replays and closes (or is a 204) instead of waiting."""
    document = json.loads((ROOT / "openapi.json").read_text(encoding="utf-8"))
    example = document["components"]["schemas"]["QuoteRequest"]["examples"][0]
    with httpx.Client(base_url=host.url, timeout=30) as client:
        started = client.post("/api/quotes", json=example)
        assert started.status_code == 202, started.text
        with client.stream("GET", started.json()["streamUrl"]) as stream:
            data = [line for line in stream.iter_lines() if line.startswith("data:")]
        assert json.loads(data[-1].removeprefix("data:"))["type"] == "complete"
        CANCEL_TOKENS[started.json()["runId"]] = started.json()["cancelToken"]
        return str(started.json()["runId"])


@pytest.fixture(scope="module")
def cancelled_run_id(host: RunningDevHost) -> str:
    """A run cancelled while its providers work (a simulated run ends within moments, so a
    cancel that came too late is tried again on a new run)."""
    document = json.loads((ROOT / "openapi.json").read_text(encoding="utf-8"))
    example = document["components"]["schemas"]["QuoteRequest"]["examples"][0]
    with httpx.Client(base_url=host.url, timeout=30) as client:
        for _ in range(10):
            started = client.post("/api/quotes", json=example).json()
            token = started["cancelToken"]
            cancelled = client.delete(
                started["statusUrl"], headers={"Authorization": f"Bearer {token}"}
            )
            if cancelled.status_code == 200:
                CANCEL_TOKENS[started["runId"]] = token
                return str(started["runId"])
            assert cancelled.status_code == 409, cancelled.text
    raise AssertionError("every run ended before its cancel")


def with_cancel_token(case: Any, run_id: str) -> None:
    """A DELETE whose headers were not generated invalid carries the run's cancel token."""
    if case.method.upper() == "DELETE" and not (
        case.meta and case.meta.is_negative_at(ParameterLocation.HEADER)
    ):
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {CANCEL_TOKENS[run_id]}"}


@schema.include(path_regex=r"\{runId\}").parametrize()
@bounded
def test_operations_on_a_finished_run_keep_to_the_document(
    case: Any, host: RunningDevHost, finished_run_id: str
) -> None:
    # Scenarios that follow the document's links (schemathesis' state machine) would reach real
    # runs too, but which rules Hypothesis may draw then depends on the server's answers (a run
    # still going or over), which it reports as flaky; a finished run answers the same each time.
    if not (case.meta and case.meta.is_negative_at(ParameterLocation.PATH)):
        case.path_parameters = {**case.path_parameters, "runId": finished_run_id}
        with_cancel_token(case, finished_run_id)  # a 409: the run completed
    # A case whose run id was generated invalid keeps it: its answer is a 404.
    case.call_and_validate(base_url=host.url, excluded_checks=EXCLUDED_CHECKS, timeout=15)


@schema.include(path_regex=r"\{runId\}").parametrize()
@bounded
def test_operations_on_a_cancelled_run_keep_to_the_document(
    case: Any, host: RunningDevHost, cancelled_run_id: str
) -> None:
    if not (case.meta and case.meta.is_negative_at(ParameterLocation.PATH)):
        case.path_parameters = {**case.path_parameters, "runId": cancelled_run_id}
        with_cancel_token(case, cancelled_run_id)  # a 200, the same each time
    case.call_and_validate(base_url=host.url, excluded_checks=EXCLUDED_CHECKS, timeout=15)
