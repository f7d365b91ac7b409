"""What this project's host says at start: the only project-specific text in the dev host."""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping

from lib.config import default_db_path

EXAMPLE_QUOTE_REQUEST = {
    "vin": "2C3CDZAG2GH967639",
    "zip": "94107",
    "driver": {"firstName": "Ana", "lastName": "Lee", "dateOfBirth": "1990-04-12"},
}


def describe(env: Mapping[str, str]) -> list[str]:
    """Which store and quote source the functions will use, as read from their environment."""

    def has(*names: str) -> bool:
        return all(env.get(name, "").strip() for name in names)

    if has("KV_REST_API_URL", "KV_REST_API_TOKEN"):
        store = f"Vercel KV at {env['KV_REST_API_URL']}"
    elif has("UPSTASH_REDIS_REST_URL", "UPSTASH_REDIS_REST_TOKEN"):
        store = f"Upstash Redis at {env['UPSTASH_REDIS_REST_URL']}"
    else:
        path = env.get("QUOTES_DB_PATH", "").strip() or default_db_path()
        store = f"embedded SQLite file {path}"
    source = "TinyFish" if has("TINYFISH_API_KEY") else "simulated — not real prices"
    return [f"store:         {store}", f"quote source:  {source}"]


def example(base_url: str) -> list[str]:
    """The page's address, and a ready-to-paste request: start a run, follow its event stream."""
    body = shlex.quote(json.dumps(EXAMPLE_QUOTE_REQUEST, separators=(",", ":")))
    pick_run_id = shlex.quote('import json,sys; print(json.load(sys.stdin)["runId"])')
    return [
        f"page:          {base_url}/",
        "try it:",
        f"  RUN_ID=$(curl -s -X POST {base_url}/api/quotes -H 'content-type: application/json' \\",
        f"    -d {body} | python3 -c {pick_run_id})",
        f"  curl -N {base_url}/api/quotes/$RUN_ID/stream",
    ]
