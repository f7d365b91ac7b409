"""Static files: a project's ``public/`` folder served at ``/``, as Vercel serves it.

A GET or HEAD for a path outside ``/api`` is answered with the file under ``public/`` at that
path when there is one (a folder by its ``index.html``); anything else goes on to the functions.
Hidden files and paths that leave the folder are never served.
"""

from __future__ import annotations

from pathlib import Path

from starlette.responses import FileResponse
from starlette.types import Receive, Scope, Send

# What Vercel sends for a static file without a cache setting: cached, but checked every time.
CACHE_CONTROL = "public, max-age=0, must-revalidate"


class PublicFiles:
    def __init__(self, directory: Path) -> None:
        self.directory = directory.resolve()

    def find(self, method: str, path: str) -> Path | None:
        """The file that answers this request, or None when the functions should."""
        if method not in ("GET", "HEAD") or path == "/api" or path.startswith("/api/"):
            return None
        parts = [part for part in path.split("/") if part]
        if any(part.startswith(".") or "\\" in part or "\0" in part for part in parts):
            return None
        candidate = self.directory.joinpath(*parts)
        if candidate.is_dir():
            candidate = candidate / "index.html"
        try:
            resolved = candidate.resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        if not resolved.is_file() or not resolved.is_relative_to(self.directory):
            return None
        return resolved

    async def serve(self, file: Path, scope: Scope, receive: Receive, send: Send) -> None:
        response = FileResponse(file, headers={"cache-control": CACHE_CONTROL})
        await response(scope, receive, send)
