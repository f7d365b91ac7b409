"""The Vercel CLI and uv for the tests that run them, and a copy of the checkout to run them on.

`make vercel-cli` installs both, pinned, under tools/vercel-cli/ (the CLI from its
package-lock.json, uv from PyPI); CI runs it. A `vercel` and `uv` already on PATH are used
otherwise. Without them the tests that need them are skipped, saying so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools" / "vercel-cli"
PINNED_CLI = TOOLS / "node_modules" / ".bin" / "vercel"
PINNED_UV = TOOLS / "python" / "bin" / "uv"


def tool_path() -> str:
    """PATH with the pinned tools first."""
    return os.pathsep.join([str(PINNED_CLI.parent), str(PINNED_UV.parent), os.environ["PATH"]])


def vercel_cli() -> str | None:
    return shutil.which("vercel", path=tool_path())


def missing_reason() -> str | None:
    """Why the Vercel CLI tests cannot run here, or None when they can."""
    missing = [name for name in ("vercel", "uv") if shutil.which(name, path=tool_path()) is None]
    if not missing:
        return None
    return (
        f"needs {' and '.join(missing)}: run `make vercel-cli` "
        "(installs the pinned Vercel CLI and uv under tools/vercel-cli/)"
    )


requires_vercel_cli = pytest.mark.skipif(
    missing_reason() is not None, reason=missing_reason() or ""
)


def cli_environment(**extra: str) -> dict[str, str]:
    return {**os.environ, "PATH": tool_path(), "VERCEL_TELEMETRY_DISABLED": "1", **extra}


def tracked_copy(destination: Path) -> Path:
    """The checkout's tracked files, copied: nothing the CLI writes lands in the working tree."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True
    ).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination
