"""A cancel end to end, on the `make dev` host (every function in its own processes, two
instances each) against the local TinyFish-compatible server, on both stores: DELETE on the run
function's instance while streams are open on both stream instances and workers are mid-agent on
the worker's."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import eventually
from tests.fake_tinyfish import FakeTinyFishServer
from tests.hosts import (
    LEASE_SECONDS,
    REQUEST,
    ROOT,
    function_lines,
    tinyfish_env,
    visit_stream,
)
from tests.stored_data import stored_kv_bytes, stored_sqlite_bytes
from tools.devhost import RunningDevHost, start_devhost_process

pytestmark = pytest.mark.e2e

TERMINAL = ("complete", "error", "cancelled")
QUOTED, STOPPED = "geico", ("progressive", "state_farm", "allstate")
# A step every 2.5 s: every stopped agent has paid for some and is still working at the cancel.
SCENARIOS = {QUOTED: "quote,duration=1", **dict.fromkeys(STOPPED, "quote,duration=20")}


@pytest.fixture(params=["sqlite", "kv"])
def cancel_host(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[RunningDevHost, FakeTinyFishServer, Path]]:
    with FakeTinyFishServer(delay_scale=0.2, scenarios=SCENARIOS) as tinyfish:
        env = tinyfish_env(tmp_path, tinyfish, RUN_MAX_SECONDS="120", QUOTE_RUNS_PER_DAY="0")
        if request.param == "kv":
            server = request.getfixturevalue("upstash_server")
            env.update(KV_REST_API_URL=server.url, KV_REST_API_TOKEN=server.token)
        with start_devhost_process(ROOT, instances=2, env=env, keep_lines=None) as host:
            host.store_kind = request.param  # type: ignore[attr-defined]
            yield host, tinyfish, tmp_path / "quotes.sqlite3"


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


async def test_a_cancel_on_one_instance_stops_every_agent_run_and_ends_every_stream(
    cancel_host: tuple[RunningDevHost, FakeTinyFishServer, Path],
) -> None:
    host, tinyfish, db_path = cancel_host
    async with httpx.AsyncClient(base_url=host.url, timeout=30) as client:
        posted = await client.post("/api/quotes", json={**REQUEST, "providers": list(SCENARIOS)})
        assert posted.status_code == 202, posted.text
        run_id, token = posted.json()["runId"], posted.json()["cancelToken"]

        async def quoted_and_agents_working() -> bool:
            snapshot = (await client.get(f"/api/quotes/{run_id}")).json()
            running = [r for r in tinyfish.run_records() if r["status"] == "RUNNING" and r["steps"]]
            return [q["provider"] for q in snapshot["quotes"]] == [QUOTED] and len(running) == 3

        await eventually(quoted_and_agents_working, "geico quoted, 3 agents a step in", within=60)
        streams = [asyncio.create_task(visit_stream(client, run_id, None)) for _ in range(2)]
        await asyncio.sleep(1.0)
        assert not any(s.done() for s in streams), "the streams should wait for live events"

        cancelled_at = datetime.now(UTC)
        response = await client.delete(
            f"/api/quotes/{run_id}", headers={"Authorization": f"Bearer {token}"}
        )
        answered = datetime.now(UTC)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"] == "cancelled"
        statuses = {p["provider"]: p["status"] for p in body["providers"]}
        assert statuses == {QUOTED: "quoted", **dict.fromkeys(STOPPED, "cancelled")}

        # Streams on both stream instances send the cancelled event and close.
        visits = await asyncio.wait_for(asyncio.gather(*streams), 10)
        assert len({v.instance for v in visits}) == 2, "one stream on each stream instance"
        for visit in visits:
            assert [e["id"] for e in visit.events] == list(range(len(visit.events)))
            terminal_types = [e["type"] for e in visit.events if e["type"] in TERMINAL]
            assert terminal_types == ["cancelled"] and visit.events[-1]["type"] == "cancelled"
            assert visit.events[-1]["id"] == body["lastEventId"]
        terminal = visits[0].events[-1]
        assert [q["provider"] for q in terminal["quotes"]] == [QUOTED]
        assert terminal["best"] == QUOTED and terminal["failed"] == []
        assert sorted(terminal["stopped"]) == sorted(STOPPED)

        # Within 5 s of the cancel no agent run is left going, and each was cancelled.
        def stopped_runs() -> list[dict[str, Any]]:
            return [r for r in tinyfish.run_records() if r["insurer"] in STOPPED]

        async def all_cancelled() -> bool:
            return all(r["status"] == "CANCELLED" for r in stopped_runs())

        await eventually(all_cancelled, "every stopped agent run cancelled within 5 s", within=5)
        stopped_within = max(parse_time(r["finished_at"]) for r in stopped_runs()) - cancelled_at
        assert all(r["cancel_calls"] >= 1 for r in stopped_runs())

        # None starts after it: give the workers two leases' worth of deliveries to try.
        await asyncio.sleep(2 * LEASE_SECONDS)
        runs = tinyfish.run_records()
        assert sorted(r["insurer"] for r in runs) == sorted(SCENARIOS)
        assert all(parse_time(r["created_at"]) < cancelled_at for r in runs)
        assert all(r["status"] in ("COMPLETED", "CANCELLED") for r in runs)

        reconnect = await visit_stream(client, run_id, body["lastEventId"])
        assert reconnect.status == 204
        assert (await client.get(f"/api/quotes/{run_id}")).json() == body
        again = await client.delete(
            f"/api/quotes/{run_id}", headers={"Authorization": f"Bearer {token}"}
        )
        assert again.status_code == 200 and again.json() == body

    print(
        f"cancel answered in {(answered - cancelled_at).total_seconds():.3f} s; "
        f"last agent run cancelled {stopped_within.total_seconds():.3f} s after the DELETE"
    )
    written = function_lines(host.output_lines())
    objects = [json.loads(line) for line in written]
    (summary,) = [o for o in objects if o.get("kind") == "run_summary" and o["runId"] == run_id]
    assert summary["outcome"] == "cancelled" and summary["level"] == "info"
    steps_of = {r["run_id"]: r["steps"] for r in tinyfish.run_records()}
    for provider in STOPPED:
        fields = summary["providers"][provider]
        assert fields["outcome"] == "cancelled"
        [agent_run_id] = fields["agentRunIds"]
        assert fields["cancelledAgentRunIds"] == [agent_run_id]
        assert fields["agentSteps"] == steps_of[agent_run_id] > 0
    assert summary["providers"][QUOTED]["outcome"] == "quoted"

    # The token went to the one who started the run, and nowhere else.
    assert [line for line in host.output_lines() if token in line] == []
    stored = stored_kv_bytes() if host.store_kind == "kv" else stored_sqlite_bytes(db_path)  # type: ignore[attr-defined]
    assert run_id.encode() in stored and token.encode() not in stored
