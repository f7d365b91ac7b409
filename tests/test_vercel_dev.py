"""`vercel dev` (the real Vercel CLI, pinned in tools/vercel-cli/) serves this project: a run
started through it is worked by its own queue broker's pushes to api/work.py and streams to
`complete`, and the page, health and OpenAPI routes answer as on Vercel.

`vercel dev` needs a linked project and asks Vercel's API four things before it serves; here a
local stand-in (tests/vercel_api_standin.py) answers them, reached with `--api URL --token T`.
The CLI runs on a copy of the checkout's tracked files with the development config that
`make vercel-dev` writes (vercel.json without `maxDuration`, vercel/vercel#17620). Skipped,
saying why, when the CLI or uv is missing (`make vercel-cli` installs both; CI runs it).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from lib.config import default_db_path
from tests.vercel_api_standin import VercelAccount, vercel_api_standin
from tests.vercel_cli import (
    ROOT,
    cli_environment,
    requires_vercel_cli,
    tracked_copy,
    vercel_cli,
)
from tools.vercel_dev import DEVELOPMENT_CONFIG, PRODUCTION_CONFIG, development_config, render

REQUEST = {
    "vin": "2C3CDZAG2GH967639",
    "zip": "94107",
    "driver": {"firstName": "Ana", "lastName": "Lee", "dateOfBirth": "1990-04-12"},
}
READY_SECONDS = 120  # the CLI's first start
BUILD_SECONDS = 300  # every function's first build, side by side (about 2 min on a busy machine)
RUN_SECONDS = 240
SETUP_SECONDS = READY_SECONDS + BUILD_SECONDS


def test_the_development_config_is_vercel_json_without_max_duration() -> None:
    production = json.loads(PRODUCTION_CONFIG.read_text())
    development = development_config(production)
    assert production["functions"]["api/work.py"]["maxDuration"] == 300, "input left as it was"
    assert development.keys() == production.keys()
    assert development["rewrites"] == production["rewrites"]
    assert development["functions"].keys() == production["functions"].keys()
    for path, settings in production["functions"].items():
        assert "maxDuration" in settings, path
        kept = {name: value for name, value in settings.items() if name != "maxDuration"}
        assert development["functions"][path] == kept, path


def test_make_vercel_dev_writes_the_development_config_the_cli_is_given(tmp_path: Path) -> None:
    output = tmp_path / "vercel.dev.json"
    written = subprocess.run(
        [sys.executable, "-m", "tools.vercel_dev", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert written.stdout.strip() == str(output)
    assert output.read_text() == render(json.loads(PRODUCTION_CONFIG.read_text()))
    makefile = (ROOT / "Makefile").read_text()
    assert f"--local-config {DEVELOPMENT_CONFIG.relative_to(ROOT)}" in makefile


@pytest.mark.parametrize("cwd", ["/", "tests"])
def test_the_default_store_file_is_one_absolute_path_wherever_an_instance_runs(
    cwd: str, tmp_path: Path
) -> None:
    """`vercel dev` runs each instance in its own copy of the code, in that copy, without $HOME."""
    copy = tmp_path / "zeit-fun-copy"
    (copy / "lib").mkdir(parents=True)
    for name in ("__init__.py", "config.py", "terms.py"):
        (copy / "lib" / name).write_bytes((ROOT / "lib" / name).read_bytes())
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(copy)}  # as @vercel/fun passes: no HOME
    output = subprocess.run(
        [sys.executable, "-c", _PRINT_DB_PATH],
        cwd=ROOT / cwd,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    resolved, imported_from = output
    assert imported_from == str(copy / "lib" / "config.py"), "the copy's code, not the checkout's"
    assert Path(resolved).is_absolute()
    assert resolved == default_db_path(), "the same file as this process, with its own $HOME"
    assert resolved.endswith(os.path.join("quote-runs", "quotes.sqlite3"))


_PRINT_DB_PATH = "import lib.config as c; print(c.settings_from_env({}).db_path, c.__file__)"


def test_the_api_standin_answers_like_vercel_for_known_and_unknown_ids() -> None:
    account = VercelAccount(env={"SIMULATED_DELAY_SCALE": "0.1"})
    with vercel_api_standin(account) as api, httpx.Client(base_url=api) as client:
        bearer = {"Authorization": f"Bearer {account.token}"}
        team = f"teamId={account.team_id}"
        user = client.get("/v2/user", headers=bearer)
        assert user.status_code == 200 and user.json()["user"]["id"] == account.user_id
        wrong_token = client.get("/v2/user", headers={"Authorization": "Bearer other"})
        assert wrong_token.status_code == 403
        assert wrong_token.json()["error"]["invalidToken"] is True
        assert (
            client.get(f"/teams/{account.team_id}", headers=bearer).json()["id"] == account.team_id
        )
        assert client.get("/teams/team_other", headers=bearer).status_code == 404
        project = client.get(f"/v9/projects/{account.project_id}?{team}", headers=bearer)
        assert project.json()["id"] == account.project_id
        for unknown in (
            f"/v9/projects/prj_other?{team}",
            f"/v9/projects/{account.project_id}?teamId=t",
        ):
            missing = client.get(unknown, headers=bearer)
            assert missing.status_code == 404, unknown
            assert missing.json()["error"]["code"] == "not_found"
        pulled = client.get(
            f"/v3/env/pull/{account.project_id}?source=vercel-cli:dev&{team}", headers=bearer
        )
        assert pulled.json() == {"env": {"SIMULATED_DELAY_SCALE": "0.1"}}
        assert client.get(f"/v3/env/pull/prj_other?{team}", headers=bearer).status_code == 404
        assert client.get("/v13/deployments", headers=bearer).status_code == 404


@dataclass
class RunningVercelDev:
    url: str
    account: VercelAccount
    log: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _build_every_function(url: str) -> None:
    """`vercel dev` builds a function on its first request, each with its own venv (15-50 s):
    asking them all at once builds them side by side instead of one after another."""
    # Both index.py functions share one build folder (.vercel/cache/index_py): not side by side.
    first = [
        ("GET", "/api/health"),
        ("GET", "/api/openapi.json"),
        ("GET", "/api/quotes/warm-up/stream"),
        ("POST", "/api/work"),
        ("GET", "/api/quotes"),
    ]

    def ask(request: tuple[str, str]) -> int:
        with httpx.Client(base_url=url, timeout=BUILD_SECONDS) as client:
            return client.request(*request).status_code

    with ThreadPoolExecutor(len(first)) as pool:
        statuses = dict(zip(first, pool.map(ask, first), strict=True))
    statuses[("GET", "/api/quotes/warm-up")] = ask(("GET", "/api/quotes/warm-up"))
    # A function that failed to build answers 500; anything else means it runs.
    assert all(status < 500 for status in statuses.values()), statuses


def _wait_until_serving(process: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"vercel dev exited with {process.returncode}:\n{log.read_text()}")
        if "Ready!" in log.read_text():
            return
        time.sleep(0.2)
    pytest.fail(f"vercel dev did not say Ready! within {READY_SECONDS} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def vercel_dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningVercelDev]:
    cli = vercel_cli()
    assert cli is not None
    work = tmp_path_factory.mktemp("vercel-dev")
    project = tracked_copy(work / "project")
    account = VercelAccount(
        env={
            # What Vercel's API returns for the development environment: its system variables...
            "VERCEL": "1",
            "VERCEL_ENV": "development",
            "VERCEL_TARGET_ENV": "development",
            "VERCEL_URL": "",
            # ...and the project's own. An absolute file: every instance must open the same one.
            "QUOTES_DB_PATH": str(work / "store" / "quotes.sqlite3"),
            "SIMULATED_DELAY_SCALE": "0.02",
            "STREAM_MAX_SECONDS": "60",
            "QUOTE_RATE_LIMIT_PER_MINUTE": "0",
        }
    )
    (project / ".vercel").mkdir()
    (project / ".vercel" / "project.json").write_text(json.dumps(account.project_link()))
    dev_config = project / DEVELOPMENT_CONFIG.relative_to(ROOT)
    dev_config.write_text(render(json.loads((project / "vercel.json").read_text())))
    port = _free_port()
    log = work / "vercel-dev.log"
    with vercel_api_standin(account) as api, log.open("wb") as output:
        command = [
            cli,
            "dev",
            "--listen",
            f"127.0.0.1:{port}",
            "--local-config",
            str(dev_config.relative_to(project)),
            "--queue-port",
            str(_free_port()),
            "--runtime-cache-port",
            str(_free_port()),
            "--schedules-port",
            str(_free_port()),
            "--api",
            api,
            "--token",
            account.token,
            "--global-config",
            str(work / "global-config"),
            "--yes",
        ]
        process = subprocess.Popen(
            command,
            cwd=project,
            env=cli_environment(NO_COLOR="1", CI="1"),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its function processes are stopped with it
        )
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_until_serving(process, url, log)
            _build_every_function(url)
            yield RunningVercelDev(url, account, log)
        finally:
            process.send_signal(signal.SIGINT)  # the CLI stops its function processes itself
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=20)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # whatever it left behind
            process.wait()


def _events_of(body: str) -> list[dict[str, Any]]:
    """The events of an SSE body (comments and keepalives have no data lines)."""
    events = []
    for block in body.split("\n\n"):
        data = [line[5:].strip() for line in block.splitlines() if line.startswith("data:")]
        if data:
            events.append(json.loads("\n".join(data)))
    return events


@pytest.mark.e2e
@pytest.mark.timeout(SETUP_SECONDS + RUN_SECONDS + 60)
@requires_vercel_cli
def test_a_run_started_through_vercel_dev_streams_to_complete(vercel_dev: RunningVercelDev) -> None:
    with httpx.Client(base_url=vercel_dev.url, timeout=RUN_SECONDS) as client:
        started = client.post("/api/quotes", json=REQUEST)
        assert started.status_code == 202, started.text + vercel_dev.log.read_text()
        run_id = started.json()["runId"]

        events: list[dict[str, Any]] = []
        deadline = time.monotonic() + RUN_SECONDS
        while not events or events[-1]["type"] not in ("complete", "error"):
            assert time.monotonic() < deadline, (events, vercel_dev.log.read_text())
            headers = {"Last-Event-ID": str(events[-1]["id"])} if events else {}
            stream = client.get(f"/api/quotes/{run_id}/stream", headers=headers)
            assert stream.status_code == 200, stream.text + vercel_dev.log.read_text()
            assert stream.headers["content-type"].startswith("text/event-stream")
            events.extend(_events_of(stream.text))
        assert events[-1]["type"] == "complete", events
        assert [e["id"] for e in events] == list(range(len(events))), "each event once, in order"

        snapshot = client.get(f"/api/quotes/{run_id}")
        assert snapshot.status_code == 200, snapshot.text
        assert snapshot.json()["runId"] == run_id
        assert snapshot.json()["status"] == "completed", snapshot.json()
    # The four calls it makes before serving, and no other: the stand-in is all it needs.
    assert set(vercel_dev.account.requests) == {
        "GET /v2/user",
        "GET /teams/team_standin",
        "GET /v9/projects/prj_standin",
        "GET /v3/env/pull/prj_standin",
    }, vercel_dev.account.requests


@pytest.mark.e2e
@pytest.mark.timeout(SETUP_SECONDS + 120)
@requires_vercel_cli
def test_the_page_health_and_openapi_answer_through_vercel_dev(
    vercel_dev: RunningVercelDev,
) -> None:
    with httpx.Client(base_url=vercel_dev.url, timeout=120) as client:
        health = client.get("/api/health")
        assert health.status_code == 200, health.text + vercel_dev.log.read_text()
        # The pulled VERCEL=1 means Vercel Queues; the SDK reaches the CLI's broker through
        # VERCEL_QUEUE_BASE_URL, which vercel dev sets.
        assert health.json() == {
            "status": "ok",
            "store": "sqlite",
            "queue": "vercel",
            "source": "simulated",
        }
        document = client.get("/api/openapi.json")
        assert document.status_code == 200, document.text
        assert document.json() == json.loads((ROOT / "openapi.json").read_text())
        page = client.get("/")
        assert page.status_code == 200
        assert page.text == (ROOT / "public" / "index.html").read_text()
