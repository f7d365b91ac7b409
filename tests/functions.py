"""Loads the Vercel functions (api/*.py, whose names are not importable) and routes
requests to them the way Vercel's filesystem routing does, for in-process tests."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from starlette.types import Receive, Scope, Send

ROOT = Path(__file__).resolve().parent.parent
FUNCTION_FILES = {
    "quotes": "api/quotes/index.py",
    "run": "api/quotes/[runId]/index.py",
    "stream": "api/quotes/[runId]/stream.py",
    "work": "api/work.py",
    "openapi": "api/openapi.py",
    "health": "api/health.py",
}
ROUTED = ("quotes", "run", "stream", "openapi", "health")  # the worker is reached through the queue
# vercel.json's rewrites.
REWRITES = {"/api/openapi.json": "/api/openapi"}


def load_function(relative_path: str) -> ModuleType:
    """A fresh import of one function file, as a new instance would import it."""
    if relative_path == FUNCTION_FILES["work"]:
        # A new instance starts with no queue subscribers; this process may have some already.
        from vercel.queue.testing import clear_subscriptions

        clear_subscriptions()
    name = "fn_" + re.sub(r"\W", "_", relative_path)
    spec = importlib.util.spec_from_file_location(name, ROOT / relative_path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class VercelRouter:
    """Dispatches to the function that owns a path, adding `runId` as Vercel does for [runId]."""

    def __init__(self) -> None:
        self.modules = {key: load_function(FUNCTION_FILES[key]) for key in ROUTED}
        self.functions: dict[str, Any] = {key: m.app for key, m in self.modules.items()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = REWRITES.get(scope["path"], scope["path"])
        if path in ("/api/openapi", "/api/health"):
            app = self.functions[path.removeprefix("/api/")]
        elif path == "/api/quotes":
            app = self.functions["quotes"]
        elif match := re.fullmatch(r"/api/quotes/([^/]+)(/stream)?", path):
            app = self.functions["stream" if match.group(2) else "run"]
            query = scope.get("query_string", b"").decode()
            added = f"runId={match.group(1)}"
            scope = {**scope, "query_string": (f"{query}&{added}" if query else added).encode()}
        else:
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await app(scope, receive, send)
