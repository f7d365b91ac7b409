"""`python -m tools.vercel_dev` (`make vercel-dev`): vercel.json as `vercel dev` can run it.

Vercel CLI 64 refuses every Python function that has `maxDuration` in vercel.json
(`DEV_BUILDER_RESULT_HAS_MAXDURATION`, vercel/vercel#17620), and production needs those limits.
So this writes a development copy of vercel.json without them, for
`vercel dev --local-config .vercel/vercel.dev.json`; everything else (includeFiles, the queue
trigger, rewrites) is kept as it is. `vercel dev` sets no function time limit of its own.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PRODUCTION_CONFIG = ROOT / "vercel.json"
# In the CLI's own (git-ignored) folder; `vercel dev` still serves the folder it was started in.
DEVELOPMENT_CONFIG = ROOT / ".vercel" / "vercel.dev.json"


def development_config(production: dict[str, Any]) -> dict[str, Any]:
    """`production` without the settings `vercel dev` rejects for Python functions."""
    config = json.loads(json.dumps(production))  # a deep copy; the input stays as it was
    for settings in config.get("functions", {}).values():
        settings.pop("maxDuration", None)
    return config


def render(production: dict[str, Any]) -> str:
    return json.dumps(development_config(production), indent=2) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.vercel_dev", description=__doc__)
    parser.add_argument("--output", type=Path, default=DEVELOPMENT_CONFIG)
    args = parser.parse_args(argv)
    text = render(json.loads(PRODUCTION_CONFIG.read_text()))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if not args.output.exists() or args.output.read_text() != text:
        args.output.write_text(text)
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
