"""A local stand-in for the four Vercel REST API calls `vercel dev` makes before it serves.

With `--api URL --token T`, `vercel dev` (CLI 64) asks only: who the token belongs to
(`GET /v2/user`), the linked team (`GET /teams/{orgId}`), the linked project's settings
(`GET /v9/projects/{projectId}?teamId=…`) and its development environment variables
(`GET /v3/env/pull/{projectId}?source=vercel-cli:dev&teamId=…`). This answers those the way
Vercel's API does, including where awkward: 403 with `invalidToken` for a wrong token, and a
404 `not_found` error for an id it does not know (the CLI reads a project 404 as "not linked").
Every other path is a 404, and each request is recorded so a test can see what the CLI asked.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

CREATED_AT = 1_767_225_600_000  # 2026-01-01T00:00:00Z, in milliseconds as the API gives times


@dataclass
class VercelAccount:
    """The one user, team and project the stand-in knows, and the project's development env."""

    token: str = "standintoken"
    user_id: str = "user_standin"
    team_id: str = "team_standin"
    project_id: str = "prj_standin"
    project_name: str = "quote-runs"
    env: Mapping[str, str] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)  # "GET /v2/user", as asked

    def project_link(self) -> dict[str, Any]:
        """What `vercel link` writes to .vercel/project.json for this project."""
        return {
            "projectId": self.project_id,
            "orgId": self.team_id,
            "projectName": self.project_name,
        }

    def answer(self, method: str, target: str, authorization: str | None) -> tuple[int, Any]:
        parts = urlsplit(target)
        query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
        segments = [unquote(s) for s in parts.path.split("/") if s]
        self.requests.append(f"{method} {parts.path}")
        if authorization != f"Bearer {self.token}":
            return 403, _error("forbidden", "Not authorized", invalidToken=True)
        if method != "GET":
            return 404, _error("not_found", "The requested path was not found")
        match segments:
            case ["v2", "user"]:
                return 200, {"user": self._user()}
            case ["teams", team] if team in (self.team_id, "standin"):
                return 200, self._team()
            case ["teams", _]:
                return 404, _error("not_found", "Team not found")
            case ["v9", "projects", project] if self._owns(project, query):
                return 200, self._project()
            case ["v9", "projects", _]:
                return 404, _error("not_found", "Project not found")
            case ["v3", "env", "pull", project] if self._owns(project, query):
                return 200, {"env": dict(self.env)}
            case ["v3", "env", "pull", _]:
                return 404, _error("not_found", "Project not found")
        return 404, _error("not_found", "The requested path was not found")

    def _owns(self, project: str, query: Mapping[str, str]) -> bool:
        # A project is found only by its id or name, within the team that owns it.
        return project in (self.project_id, self.project_name) and (
            query.get("teamId", self.team_id) == self.team_id
        )

    def _user(self) -> dict[str, Any]:
        return {
            "id": self.user_id,
            "uid": self.user_id,
            "email": "developer@example.com",
            "name": "Developer",
            "username": "developer",
            "defaultTeamId": self.team_id,
            "version": "northstar",
            "createdAt": CREATED_AT,
            "softBlock": None,
            "billing": {"plan": "hobby"},
        }

    def _team(self) -> dict[str, Any]:
        return {
            "id": self.team_id,
            "slug": "standin",
            "name": "Stand-in",
            "createdAt": CREATED_AT,
            "creatorId": self.user_id,
            "membership": {"role": "OWNER", "confirmed": True},
            "billing": {"plan": "hobby"},
        }

    def _project(self) -> dict[str, Any]:
        return {
            "id": self.project_id,
            "name": self.project_name,
            "accountId": self.team_id,
            "createdAt": CREATED_AT,
            "updatedAt": CREATED_AT,
            "framework": None,
            "buildCommand": None,
            "devCommand": None,
            "installCommand": None,
            "outputDirectory": None,
            "rootDirectory": None,
            "directoryListing": False,
            "nodeVersion": "22.x",
            "serverlessFunctionRegion": "iad1",
            "env": [],
            "link": None,
            "latestDeployments": [],
            "targets": {},
            "crons": None,
            "live": False,
        }


def _error(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


def _handler_for(account: VercelAccount) -> type[BaseHTTPRequestHandler]:
    class VercelApiHandler(BaseHTTPRequestHandler):
        def _respond(self) -> None:
            status, body = account.answer(
                self.command, self.path, self.headers.get("Authorization")
            )
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PATCH = do_DELETE = _respond

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the account records each request; stderr stays for the test's own output

    return VercelApiHandler


@contextmanager
def vercel_api_standin(account: VercelAccount) -> Iterator[str]:
    """Serves the account on a free loopback port; yields the URL to pass as `--api`."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(account))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
