"""`vercel build` (the Vercel CLI pinned in tools/vercel-cli/, with uv) builds this project, offline
of any Vercel account: one function per api/ file at the URLs the other tools serve, and the worker
as a queue-triggered function.

Skipped, saying why, when the CLI or uv is missing (`make vercel-cli` installs both; CI runs it).
The build runs on a copy of the checkout's tracked files, so nothing it writes (.vercel/,
uv.lock) lands in the working tree.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.functions import FUNCTION_FILES
from tests.vercel_cli import cli_environment, requires_vercel_cli, tracked_copy, vercel_cli

pytestmark = [pytest.mark.e2e, requires_vercel_cli, pytest.mark.timeout(900)]


def test_vercel_build_outputs_the_worker_as_a_queue_triggered_function(tmp_path: Path) -> None:
    project = tracked_copy(tmp_path / "project")
    (project / ".vercel").mkdir()
    (project / ".vercel" / "project.json").write_text(
        json.dumps(
            {"projectId": "prj_local", "orgId": "team_local", "settings": {"framework": None}}
        )
    )
    build = subprocess.run(
        [str(vercel_cli()), "build", "--yes", "--global-config", str(tmp_path / "global-config")],
        cwd=project,
        env=cli_environment(),
        capture_output=True,
        text=True,
        timeout=840,
    )
    assert build.returncode == 0, build.stdout + build.stderr

    functions = project / ".vercel" / "output" / "functions"
    config = json.loads((functions / "api" / "work.func" / ".vc-config.json").read_text())
    assert config["maxDuration"] == 300
    assert config["experimentalTriggers"] == [
        {
            "type": "queue/v2beta",
            "topic": "quote-provider-work",
            "retryAfterSeconds": 10,
            "maxDeliveries": 10,
            "consumer": "api_Swork_Dpy",  # what each push names as ce-vqsconsumergroup
        }
    ]
    # The SDK is installed from pyproject.toml into the worker's bundle.
    assert "_vendor/vercel/queue/__init__.py" in config["filePathMap"]
    # One function per api/ file, named by its path: the ones make dev and the tests route to.
    built = sorted(str(p.relative_to(functions)) for p in functions.rglob("*.func"))
    assert built == sorted(f.removesuffix(".py") + ".func" for f in FUNCTION_FILES.values())
    for other in ("quotes/index.func", "quotes/[runId]/index.func", "quotes/[runId]/stream.func"):
        other_config = json.loads((functions / "api" / other / ".vc-config.json").read_text())
        assert "experimentalTriggers" not in other_config, other
    # The URLs stay /api/quotes/{runId} and /api/quotes/{runId}/stream, the segment as runId.
    routes = json.loads((project / ".vercel" / "output" / "config.json").read_text())["routes"]
    dynamic = {r["dest"].split("?")[0]: r["src"] for r in routes if "runId" in r.get("dest", "")}
    assert dynamic.keys() == {"/api/quotes/[runId]/index", "/api/quotes/[runId]/stream"}
    assert re.match(dynamic["/api/quotes/[runId]/index"], "/api/quotes/qr_1")
    assert re.match(dynamic["/api/quotes/[runId]/stream"], "/api/quotes/qr_1/stream")
