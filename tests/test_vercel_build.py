"""`vercel build` (the Vercel CLI from npm, with `uv` on PATH) builds this project, offline of any
Vercel account, and its output holds the worker as a queue-triggered function.

Skipped unless both `vercel` and `uv` are on PATH (CI does not install the CLI; see the README,
"Running on Vercel", for the commands). The build runs on a copy of the checkout's tracked files,
so nothing it writes (.vercel/, uv.lock) lands in the working tree.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        shutil.which("vercel") is None or shutil.which("uv") is None,
        reason="needs the Vercel CLI and uv on PATH (npm i vercel; pip install uv)",
    ),
    pytest.mark.timeout(900),
]


def _tracked_copy(destination: Path) -> Path:
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True
    ).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


def test_vercel_build_outputs_the_worker_as_a_queue_triggered_function(tmp_path: Path) -> None:
    project = _tracked_copy(tmp_path / "project")
    (project / ".vercel").mkdir()
    (project / ".vercel" / "project.json").write_text(
        json.dumps(
            {"projectId": "prj_local", "orgId": "team_local", "settings": {"framework": None}}
        )
    )
    env = {**os.environ, "VERCEL_TELEMETRY_DISABLED": "1"}
    build = subprocess.run(
        ["vercel", "build", "--yes"],
        cwd=project,
        env=env,
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
    for other in ("quotes.func", "quotes/[runId].func", "quotes/[runId]/stream.func"):
        other_config = json.loads((functions / "api" / other / ".vc-config.json").read_text())
        assert "experimentalTriggers" not in other_config, other
