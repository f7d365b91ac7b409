"""The local dev host (`python -m tools.devhost`) against a small project of its own.

Real processes and sockets: routing, round-robin across instances, streaming both ways, the
deadline header and maxDuration, .env files, instance replacement and clean shutdown.
"""

from __future__ import annotations

import json
import os
import re
import signal
import textwrap
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from tools.devhost import RunningDevHost, start_devhost_process
from tools.devhost.routes import Router, discover_functions, discover_rewrites

pytestmark = pytest.mark.e2e

HELLO = """\
import json, os
from vercel_runtime import get_deadline

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    deadline = get_deadline()
    names = ("ONLY_DOTENV", "SHARED", "REAL_WINS", "VERCEL_ENV", "VERCEL")
    payload = {
        "pid": os.getpid(),
        "path": scope["path"],
        "query": scope["query_string"].decode(),
        "deadline": deadline.isoformat() if deadline else None,
        "headers": {k.decode(): v.decode() for k, v in scope["headers"]},
        "env": {name: os.environ.get(name) for name in names},
        "body": body.decode(),
    }
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(payload).encode()})
"""

STATIC = """\
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

async def new(request):
    return JSONResponse({"static": True})

app = Starlette(routes=[Route("/api/items/new", new)])
"""

EVENTS = """\
import asyncio, time
from pathlib import Path
from starlette.applications import Starlette
from starlette.responses import StreamingResponse
from starlette.routing import Route

async def events(request):
    forever = "forever" in request.query_params
    marker = request.query_params.get("marker")

    async def chunks():
        try:
            i = 0
            while forever or i < 5:
                yield f"data: {i} {time.time()}\\n\\n"
                i += 1
                await asyncio.sleep(0.3)
        finally:
            if marker:
                Path(marker).write_text("closed")

    return StreamingResponse(chunks(), media_type="text/event-stream")

app = Starlette(routes=[Route("/api/items/{itemId}/events", events)])
"""

SLOW = """\
import asyncio

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await asyncio.sleep(4)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"too late"})
"""

VERCEL_JSON = {
    "functions": {
        "api/items/[itemId]/events.py": {"maxDuration": 3},
        "api/slo*.py": {"maxDuration": 1},
    },
    "rewrites": [
        {"source": "/api/hello.json", "destination": "/api/hello"},
        {"source": "/api/items/new", "destination": "/api/hello"},
        {"source": "/api/old/:rest*", "destination": "/api/hello"},
    ],
}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("project")
    files = {
        "api/hello.py": HELLO,
        "api/items/[itemId].py": HELLO,
        "api/items/new.py": STATIC,
        "api/items/[itemId]/events.py": EVENTS,
        "api/slow.py": SLOW,
        "api/_shared.py": "raise RuntimeError('not a function')\n",
        "vercel.json": json.dumps(VERCEL_JSON),
        ".env": "ONLY_DOTENV=dotenv\nSHARED=dotenv\n",
        ".env.local": "SHARED=local\nREAL_WINS=file\n",
        "public/index.html": "<!doctype html><title>home</title>\n",
        "public/app.js": "export const page = 1;\n",
        "public/docs/index.html": "<!doctype html><title>docs</title>\n",
        "public/.env": "SECRET=1\n",
        "outside.txt": "not public\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    return root


@pytest.fixture(scope="module")
def host(project: Path) -> Iterator[RunningDevHost]:
    with start_devhost_process(project, instances=2, env={"REAL_WINS": "real"}) as running:
        yield running


@pytest.fixture
def client(host: RunningDevHost) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=host.url, timeout=10) as c:
        yield c


def test_routes_follow_vercel_filesystem_routing(project: Path) -> None:
    router = Router(discover_functions(project))
    order = [route.spec.file for route in router.routes]
    assert order.index("api/items/new.py") < order.index("api/items/[itemId].py")
    assert router.resolve("/api/items/new") is not None
    resolved = router.resolve("/api/items/abc/events")
    assert resolved is not None
    assert resolved[0].file == "api/items/[itemId]/events.py"
    assert resolved[1] == {"itemId": "abc"}
    assert resolved[0].max_duration == 3
    assert router.resolve("/api/_shared") is None
    assert router.resolve("/api/items") is None


def test_literal_rewrites_apply_after_the_filesystem(project: Path) -> None:
    router = Router(discover_functions(project), discover_rewrites(project))
    rewritten = router.resolve("/api/hello.json")
    assert rewritten is not None
    assert rewritten[0].file == "api/hello.py"
    filesystem_first = router.resolve("/api/items/new")
    assert filesystem_first is not None
    assert filesystem_first[0].file == "api/items/new.py"
    assert router.resolve("/api/old/thing") is None  # patterns are not supported


def test_rewritten_request_keeps_the_path_the_client_asked_for(client: httpx.Client) -> None:
    response = client.get("/api/hello.json")
    assert response.status_code == 200
    assert response.json()["path"] == "/api/hello.json"


def test_dynamic_segment_becomes_a_query_parameter(client: httpx.Client) -> None:
    response = client.get("/api/items/abc", params={"x": "1"})
    assert response.status_code == 200
    body = response.json()
    assert body["path"] == "/api/items/abc"
    assert body["query"] == "x=1&itemId=abc"
    assert body["headers"]["x-forwarded-host"] == client.base_url.netloc.decode()
    assert "x-vercel-internal-deadline" not in body["headers"]  # consumed by the runtime


def test_each_request_gets_its_own_request_id_shown_to_function_and_client(
    client: httpx.Client,
) -> None:
    first = client.get("/api/items/abc", headers={"x-vercel-id": "forged"})
    second = client.get("/api/items/abc")
    seen = [r.json()["headers"]["x-vercel-id"] for r in (first, second)]
    assert seen == [first.headers["x-vercel-id"], second.headers["x-vercel-id"]]
    assert seen[0] != seen[1]
    assert all(re.fullmatch(r"dev1::[0-9a-f]{5}-[0-9]{13}-[0-9a-f]{12}", s) for s in seen)


def test_static_path_wins_over_dynamic(client: httpx.Client) -> None:
    assert client.get("/api/items/new").json() == {"static": True}


def test_unknown_path_is_a_404_problem(client: httpx.Client) -> None:
    response = client.get("/api/nope")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == 404
    assert {"type", "title", "detail"} <= problem.keys()


def test_public_files_are_served_at_the_root_as_vercel_does(client: httpx.Client) -> None:
    home = client.get("/")
    assert home.status_code == 200
    assert home.text == "<!doctype html><title>home</title>\n"
    assert home.headers["content-type"] == "text/html; charset=utf-8"
    assert home.headers["cache-control"] == "public, max-age=0, must-revalidate"
    assert "x-devhost-instance" not in home.headers  # no function was involved
    script = client.get("/app.js")
    assert script.headers["content-type"].startswith("text/javascript")
    assert script.text == "export const page = 1;\n"
    assert (
        client.get("/docs/").text == client.get("/docs").text == client.get("/docs/index.html").text
    )
    head = client.head("/")
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == str(len(home.content))


def test_paths_without_a_public_file_go_to_the_functions(client: httpx.Client) -> None:
    assert client.get("/api/hello").json()["path"] == "/api/hello"
    for path in (
        "/missing.html",
        "/.env",
        "/%2e%2e/outside.txt",
        "/docs/%2e%2e/%2e%2e/outside.txt",
    ):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.headers["content-type"] == "application/problem+json", path
    # Only GET and HEAD read files; a POST to a page's path is not a file's to answer.
    assert client.post("/", content=b"x").status_code == 404


def test_requests_spread_round_robin_over_instances(client: httpx.Client) -> None:
    tags = [client.get("/api/hello").headers["x-devhost-instance"] for _ in range(4)]
    labels = [tag.split()[0] for tag in tags]
    assert {labels[0], labels[1]} == {"api/hello.py#0", "api/hello.py#1"}
    assert labels[2:] == labels[:2]
    assert len({tag.split("pid=")[1] for tag in tags}) == 2


def test_request_body_is_streamed_to_the_function(client: httpx.Client) -> None:
    def parts() -> Iterator[bytes]:
        yield b"hello "
        yield b"world"

    assert client.post("/api/hello", content=parts()).json()["body"] == "hello world"


def test_function_sees_its_deadline(client: httpx.Client) -> None:
    deadline = datetime.fromisoformat(client.get("/api/hello").json()["deadline"])
    assert 295 < (deadline - datetime.now(UTC)).total_seconds() <= 300


def test_env_files_reach_the_function(client: httpx.Client) -> None:
    env = client.get("/api/hello").json()["env"]
    assert env["ONLY_DOTENV"] == "dotenv"
    assert env["SHARED"] == "local"  # .env.local beats .env
    assert env["REAL_WINS"] == "real"  # the real environment beats both
    assert env["VERCEL_ENV"] == "development"
    assert env["VERCEL"] == os.environ.get("VERCEL")  # not set by the host


def test_stream_arrives_chunk_by_chunk(client: httpx.Client) -> None:
    arrivals: list[tuple[float, float]] = []  # (received at, sent at)
    with client.stream("GET", "/api/items/a/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                arrivals.append((time.time(), float(line.split()[2])))
    assert len(arrivals) == 5
    first_received, last_sent = arrivals[0][0], arrivals[-1][1]
    assert first_received < last_sent - 0.8


def test_client_disconnect_reaches_the_function(client: httpx.Client, tmp_path: Path) -> None:
    marker = tmp_path / "closed"
    params = {"forever": "1", "marker": str(marker)}
    with client.stream("GET", "/api/items/a/events", params=params) as response:
        next(response.iter_lines())
    for _ in range(40):
        if marker.exists():
            break
        time.sleep(0.1)
    assert marker.exists()


def test_max_duration_cuts_a_stream(client: httpx.Client) -> None:
    began = time.monotonic()
    with client.stream("GET", "/api/items/a/events", params={"forever": "1"}) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert 2.5 < time.monotonic() - began < 5
    assert len(lines) >= 5


def test_max_duration_without_a_response_is_a_504(client: httpx.Client) -> None:
    began = time.monotonic()
    response = client.get("/api/slow")
    assert time.monotonic() - began < 3
    assert response.status_code == 504
    assert response.json()["title"] == "FUNCTION_INVOCATION_TIMEOUT"
    assert response.headers["x-vercel-error"] == "FUNCTION_INVOCATION_TIMEOUT"


def test_dead_instance_is_replaced_and_traffic_continues(
    host: RunningDevHost, client: httpx.Client
) -> None:
    label, pid_text = client.get("/api/hello").headers["x-devhost-instance"].split(" pid=")
    os.kill(int(pid_text), signal.SIGKILL)
    for _ in range(6):
        assert client.get("/api/hello").status_code == 200
    replaced = False
    for _ in range(100):
        tag = client.get("/api/hello").headers["x-devhost-instance"]
        if tag.startswith(f"{label} ") and tag != f"{label} pid={pid_text}":
            replaced = True
            break
        time.sleep(0.1)
    assert replaced, host.output()
    assert f"instance {label} (pid {pid_text}) exited with code -9" in host.output()


def _descendants(pid: int) -> set[int]:
    children: dict[int, set[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, set()).add(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), set()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _wait_gone(pids: set[int], seconds: float) -> set[int]:
    deadline = time.monotonic() + seconds
    while (alive := {p for p in pids if _running(p)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_stopping_the_host_leaves_no_processes(project: Path) -> None:
    running = start_devhost_process(project, instances=1)
    children = _descendants(running.pid)
    assert len(children) >= 5  # one instance per function
    assert running.stop() == 0
    assert _wait_gone(children, 5) == set()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_instances_follow_a_killed_host(project: Path) -> None:
    running = start_devhost_process(project, instances=1)
    children = _descendants(running.pid)
    os.kill(running.pid, signal.SIGKILL)
    running.stop()
    assert _wait_gone(children, 5) == set()
