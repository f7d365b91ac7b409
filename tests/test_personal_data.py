"""No personal data in any log line or stored record: the driver's names and birth date go to
the quote source's goal and nowhere else."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from lib.models import QuoteRequest
from tests.conftest import eventually, run_end
from tests.fake_tinyfish import FakeTinyFishServer
from tests.hosts import LEASE_SECONDS, ROOT, assert_gap_free, function_lines, visit_stream
from tests.stored_data import stored_bytes, stored_kv_bytes, stored_sqlite_bytes
from tools.devhost import RunningDevHost, start_devhost_process

FIRST_NAME, LAST_NAME, BIRTH_DATE = "Zephyrine", "Quillfeather", "1987-03-19"
PERSONAL = (FIRST_NAME, LAST_NAME, BIRTH_DATE)
REQUEST: dict[str, Any] = {
    "vin": "2C3CDZAG2GH967639",
    "zip": "94107",
    "driver": {"firstName": FIRST_NAME, "lastName": LAST_NAME, "dateOfBirth": BIRTH_DATE},
}


def personal_data_in(text: str) -> list[str]:
    return [value for value in PERSONAL if value in text]


def test_a_requests_repr_leaves_the_driver_out() -> None:
    request = QuoteRequest.model_validate(REQUEST, context={"providers": ("geico",)})
    assert request.driver.first_name == FIRST_NAME
    assert personal_data_in(repr(request)) == []
    assert personal_data_in(str(request)) == []
    assert personal_data_in(f"{request.driver!r} {request.driver}") == []


@pytest.mark.parametrize(
    "driver",
    [
        {"firstName": FIRST_NAME, "lastName": LAST_NAME, "dateOfBirth": "1887-03-19"},
        {"firstName": FIRST_NAME, "lastName": LAST_NAME, "dateOfBirth": 19870319},
        {"firstName": FIRST_NAME, "lastName": LAST_NAME, "dateOfBirth": BIRTH_DATE, "x": LAST_NAME},
        f"{FIRST_NAME} {LAST_NAME} {BIRTH_DATE}",
    ],
)
def test_a_validation_errors_text_never_quotes_the_input(driver: object) -> None:
    with pytest.raises(ValidationError) as raised:
        QuoteRequest.model_validate({**REQUEST, "driver": driver}, context={"providers": ()})
    assert personal_data_in(str(raised.value)) == []
    assert personal_data_in(repr(raised.value)) == []


# --- whole runs, end to end: every line every function process wrote, every stored byte --------


async def read_to_the_end(
    client: httpx.AsyncClient, run_id: str, events: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """The run's events up to its terminal one, reconnecting as a browser would."""
    events = list(events or [])
    while not events or events[-1]["type"] not in ("complete", "error"):
        visit = await visit_stream(client, run_id, events[-1]["id"] if events else None)
        assert visit.status == 200
        events.extend(visit.events)
    return events


@pytest.fixture(scope="module", params=["sqlite", "kv"])
def recorded_host(
    request: pytest.FixtureRequest, tmp_path_factory
) -> Iterator[tuple[RunningDevHost, FakeTinyFishServer, Path]]:
    """The `make dev` host with every function in its own processes, against the local
    TinyFish-compatible server playing a failure for most insurers, keeping all its output."""
    scenarios = {
        "allstate": "declined",
        "state_farm": "blocked",
        "progressive": "billing_failure",
        "liberty_mutual": "system_failure",
    }
    db_path = tmp_path_factory.mktemp(f"pii-{request.param}") / "quotes.sqlite3"
    with FakeTinyFishServer(delay_scale=0.2, scenarios=scenarios) as tinyfish:
        env = {
            "QUOTES_DB_PATH": str(db_path),
            "KV_REST_API_URL": "",
            "KV_REST_API_TOKEN": "",
            "TINYFISH_API_KEY": tinyfish.api_key,
            "TINYFISH_API_URL": tinyfish.url,
            "RUN_LEASE_SECONDS": str(LEASE_SECONDS),
            "QUOTE_RATE_LIMIT_PER_MINUTE": "0",
            "QUOTE_RUNS_PER_DAY": "0",  # KV counters outlive a test session
        }
        if request.param == "kv":
            server = request.getfixturevalue("upstash_server")
            env.update(KV_REST_API_URL=server.url, KV_REST_API_TOKEN=server.token)
        with start_devhost_process(ROOT, instances=2, env=env, keep_lines=None) as host:
            host.store_kind = request.param  # type: ignore[attr-defined]
            yield host, tinyfish, db_path


@pytest.mark.e2e
async def test_whole_runs_leave_no_personal_data_in_any_line_or_stored_byte(
    recorded_host,
) -> None:
    host, tinyfish, db_path = recorded_host
    async with httpx.AsyncClient(base_url=host.url, timeout=30) as client:
        posted = await client.post("/api/quotes", json=REQUEST)
        assert posted.status_code == 202, posted.text
        run_id = posted.json()["runId"]
        events = await read_to_the_end(client, run_id)
        assert_gap_free(events)
        outcomes = {e["provider"]: e.get("code", "quoted") for e in events if "provider" in e}
        assert outcomes["allstate"] == "provider_declined"
        assert outcomes["progressive"] == "provider_auth"

        # A run whose workers are killed while the agents work on it.
        killed_run = (await client.post("/api/quotes", json=REQUEST)).json()["runId"]
        first = await visit_stream(client, killed_run, None, max_events=4)
        killed = host.instance_pids("api/work.py")
        assert killed
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        assert_gap_free(await read_to_the_end(client, killed_run, first.events))
        snapshot = (await client.get(f"/api/quotes/{killed_run}")).json()
        assert snapshot["status"] in ("completed", "failed")
        await client.get("/api/health")

    # The driver really went out, to the agent and nowhere else.
    goals = [body["goal"] for body in tinyfish.requests]
    assert goals and all(FIRST_NAME in g and LAST_NAME in g and BIRTH_DATE in g for g in goals)

    written = function_lines(host.output_lines())
    assert any(run_id in line for line in written) and any(killed_run in line for line in written)
    not_json = [line for line in written if not _is_json_object(line)]
    assert not_json == [], "every function line is one JSON object"
    objects = [json.loads(line) for line in written]
    (started,) = [o for o in objects if o.get("kind") == "run_started" and o["runId"] == run_id]
    assert started["vercelId"] == posted.headers["x-vercel-id"]
    (summary,) = [o for o in objects if o.get("kind") == "run_summary" and o["runId"] == run_id]
    assert summary["outcome"] == "completed"
    assert summary["providers"]["progressive"]["outcome"] == "provider_auth"
    assert summary["providers"]["liberty_mutual"]["attempts"] >= 2
    (killed_summary,) = [
        o for o in objects if o.get("kind") == "run_summary" and o["runId"] == killed_run
    ]
    # The agent steps each provider cost, as TinyFish counts them, also across the killed workers.
    steps_of = {r["run_id"]: r["steps"] for r in tinyfish.run_records()}
    for line in (summary, killed_summary):
        counted = 0
        for provider, fields in line["providers"].items():
            if fields["agentRunIds"]:
                expected = sum(steps_of[a] for a in fields["agentRunIds"])
                assert fields.get("agentSteps") == expected, (provider, fields)
                counted += expected > 0
        assert counted >= 3, line["providers"]
    leaked = [line for line in host.output_lines() if personal_data_in(line)]
    assert leaked == []
    stored = stored_kv_bytes() if host.store_kind == "kv" else stored_sqlite_bytes(db_path)
    assert run_id.encode() in stored and killed_run.encode() in stored
    assert [v for v in PERSONAL if v.encode() in stored] == []


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


# --- whole runs in-process, through the queue: every log record, every stored byte -------------


@pytest.fixture
def tinyfish(monkeypatch) -> Iterator[FakeTinyFishServer]:
    """The local TinyFish-compatible server, its agent echoing the driver as a chatty agent
    might: the source must mask that before it is relayed, stored or logged."""
    import tests.fake_tinyfish as fake

    echo = f"Typing {FIRST_NAME} {LAST_NAME}, born {BIRTH_DATE}, into the driver form"
    monkeypatch.setattr(fake, "PROGRESS_STEPS", (*fake.PROGRESS_STEPS[:3], echo))
    scenarios = {"allstate": "declined", "progressive": "billing_failure", "geico": "agent_failure"}
    with FakeTinyFishServer(delay_scale=0.02, scenarios=scenarios) as server:
        yield server


def assert_nothing_personal(json_logs, run_ids: list[str], stored: bytes) -> None:
    lines = json_logs.lines
    assert lines, "the capture saw no line at all"
    for run_id in run_ids:
        assert any(json.loads(line).get("runId") == run_id for line in lines), run_id
        assert run_id.encode() in stored
    assert [line for line in lines if personal_data_in(line)] == []
    assert [v for v in PERSONAL if v.encode() in stored] == []
    # What a run priced is kept for its page, with the VIN cut to its last six characters.
    assert REQUEST["vin"][-6:].encode() in stored
    assert REQUEST["vin"].encode() not in stored


async def _traceback_logged(json_logs, text: str, within: float = 30) -> dict[str, Any]:
    """The first line logged with an exception whose traceback holds `text`."""
    found: list[dict[str, Any]] = []

    def logged() -> bool:
        found[:] = [line for line in json_logs.objects() if text in line.get("traceback", "")]
        return bool(found)

    await eventually(logged, f"a traceback with {text!r} logged", within=within)
    return found[0]


async def test_simulated_runs_and_a_failure_reaching_log_exception_leave_nothing_personal(
    api, configure, store_kind, tmp_path, json_logs, monkeypatch
) -> None:
    configure(SIMULATED_DELAY_SCALE="0.01")
    quoted = (await api.post("/api/quotes", json=REQUEST)).json()["runId"]
    assert (await run_end(api, quoted))["status"] == "completed"

    # An unexpected exception inside the work, carrying the request as a careless one might.
    from lib.providers.simulated import SimulatedQuoteSource

    async def broken(self: object, request: QuoteRequest, *args: object, **kwargs: object) -> None:
        raise RuntimeError(f"unexpected state for {request!r} / {request.driver}")

    monkeypatch.setattr(SimulatedQuoteSource, "quote", broken)
    failed = (await api.post("/api/quotes", json={**REQUEST, "providers": ["geico"]})).json()
    logged = await _traceback_logged(json_logs, "RuntimeError: unexpected state for QuoteRequest(")
    assert logged["level"] == "error"
    assert logged["runId"] == failed["runId"] and logged["provider"] == "geico"
    assert_nothing_personal(
        json_logs, [quoted, failed["runId"]], stored_bytes(store_kind, tmp_path)
    )


async def test_tinyfish_runs_with_failures_leave_nothing_personal(
    configure, fresh_instance, store_kind, tmp_path, json_logs, tinyfish
) -> None:
    configure(TINYFISH_API_KEY=tinyfish.api_key, TINYFISH_API_URL=tinyfish.url)
    api = fresh_instance()
    run_id = (await api.post("/api/quotes", json=REQUEST)).json()["runId"]
    ended = await run_end(api, run_id)
    codes = {p["provider"]: (p.get("error") or {}).get("code") for p in ended["providers"]}
    assert codes["allstate"] == "provider_declined"
    assert codes["progressive"] == "provider_auth"
    goals = [body["goal"] for body in tinyfish.requests]
    assert goals and all(FIRST_NAME in g and BIRTH_DATE in g for g in goals)
    assert_nothing_personal(json_logs, [run_id], stored_bytes(store_kind, tmp_path))
