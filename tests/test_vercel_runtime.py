"""The functions under `vercel_runtime.vc_init`, the module Vercel runs in production.

Each function file is hosted the way the platform hosts it: a process that runs the builder's
trampoline (`from vercel_runtime.vc_init import vc_handler`) with the `__VC_HANDLER_*` variables
set, talking to a Unix socket at `VERCEL_IPC_PATH`, which this module serves in the platform's
place. vc_init announces its HTTP port there (`server-started`) and reports each request's
`handler-started` and `end`; the platform treats an invocation as finished at `end`. Requests
carry the `x-vercel-internal-*` headers the platform adds, including the invocation's deadline.

What this proves: POST answers 202 at once and its workflow runs after the response, inside the
same invocation (the run is finalized before `end` is sent); the run's deadline and the stream's
self-close both follow the invocation deadline read through `get_deadline()`; a production
deployment without KV refuses with a 503 rather than falling back to a per-instance store.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from lib.models import PROVIDER_IDS, QuoteRequest, new_run_id
from lib.store import RunState
from lib.store.sqlite import SQLiteStore
from lib.workflow import new_run_record

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
REQUEST = {
    "vin": "2C3CDZAG2GH967639",
    "zip": "94107",
    "driver": {"firstName": "Ana", "lastName": "Lee", "dateOfBirth": "1990-04-12"},
}
# The last line of the trampoline @vercel/python writes for every function: with
# VERCEL_IPC_PATH set, importing vc_init serves requests and never returns.
TRAMPOLINE = "from vercel_runtime.vc_init import vc_handler"
STARTUP_SECONDS = 20.0


# --- the platform's side of the IPC socket -----------------------------------------------------


@dataclass
class IpcMessage:
    received_at: float  # time.time() when the platform side read it
    message: dict[str, Any]

    @property
    def type(self) -> str:
        return str(self.message.get("type"))

    @property
    def invocation_id(self) -> str | None:
        context = self.message.get("payload", {}).get("context", {})
        return context.get("invocationId")


@dataclass
class IpcServer:
    """Accepts vc_init's connection and reads its NUL-terminated JSON messages in a thread.

    It keeps reading for the life of the process, as the platform does: vc_init writes with a
    blocking `sendall` from the event loop, so a peer that stopped reading would stall it.
    `on_message` runs in the reader thread before a message is recorded, so what it observes
    is the state of the world when that message arrived."""

    path: str
    on_message: Callable[[IpcMessage], None] | None = None
    messages: list[IpcMessage] = field(default_factory=list)
    errors: list[Exception] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(1)
        self._listener.settimeout(0.2)
        self._thread = threading.Thread(target=self._serve, name="ipc-server", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn = None
        while conn is None and not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                conn, _ = self._listener.accept()
        if conn is None:
            return
        conn.settimeout(0.2)
        buffer = b""
        with conn:
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not chunk:
                    break
                buffer += chunk
                *complete, buffer = buffer.split(b"\0")
                for raw in complete:
                    received = IpcMessage(time.time(), json.loads(raw))
                    if self.on_message is not None:
                        try:
                            self.on_message(received)
                        except Exception as error:  # keep reading; the test reports it
                            self.errors.append(error)
                    with self._changed:
                        self.messages.append(received)
                        self._changed.notify_all()

    def wait_for(
        self,
        predicate: Callable[[IpcMessage], bool],
        timeout: float,
        alive: Callable[[], bool] = lambda: True,
    ) -> IpcMessage:
        """The first message (received so far or later) that satisfies `predicate`."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for received in self.messages:
                    if predicate(received):
                        return received
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not alive():
                    kinds = [m.type for m in self.messages]
                    raise AssertionError(f"no matching IPC message; received {kinds}")
                self._changed.wait(min(remaining, 0.1))

    def find(self, kind: str, invocation_id: str) -> IpcMessage | None:
        with self._changed:
            return next(
                (m for m in self.messages if m.type == kind and m.invocation_id == invocation_id),
                None,
            )

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._listener.close()


# --- a function hosted by vc_init ----------------------------------------------------------------


@dataclass
class HostedFunction:
    process: subprocess.Popen[bytes]
    ipc: IpcServer
    port: int
    server_started: dict[str, Any]
    output_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        """What the process wrote outside IPC (only what happens before logging is routed)."""
        return self.output_path.read_text(errors="replace")

    def logs(self, invocation_id: str) -> list[str]:
        return [
            base64.b64decode(m.message["payload"]["message"]).decode(errors="replace")
            for m in self.ipc.messages
            if m.type == "log" and m.invocation_id == invocation_id
        ]


def runtime_env(entrypoint: str, workdir: Path, **extra: str) -> dict[str, str]:
    """A clean environment: no KV or Vercel variables leak in from the one running the tests."""
    module_name = entrypoint.removesuffix(".py").replace("/", ".")
    env = {
        name: os.environ[name] for name in ("PATH", "HOME", "LANG", "TMPDIR") if name in os.environ
    }
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "PYTHONDONTWRITEBYTECODE": "1",
            "__VC_HANDLER_ENTRYPOINT": entrypoint,
            "__VC_HANDLER_ENTRYPOINT_ABS": str(ROOT / entrypoint),
            "__VC_HANDLER_MODULE_NAME": module_name,
            "__VC_HANDLER_VARIABLE_NAME": "app",
            "VERCEL_IPC_PATH": str(workdir / "ipc.sock"),
            "QUOTES_DB_PATH": str(workdir / "quotes.sqlite3"),
            "SIMULATED_DELAY_SCALE": "0.3",
            "QUOTE_RATE_LIMIT_PER_MINUTE": "0",
            "QUOTE_RUNS_PER_DAY": "0",  # KV counters outlive a test session
            "VERCEL": "1",
            "VERCEL_ENV": "development",
        }
    )
    env.update(extra)
    return env


def stop_process_group(process: subprocess.Popen[bytes]) -> None:
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if process.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=wait)


@contextlib.contextmanager
def host_function(
    entrypoint: str,
    workdir: Path,
    on_message: Callable[[IpcMessage], None] | None = None,
    **extra_env: str,
) -> Iterator[HostedFunction]:
    env = runtime_env(entrypoint, workdir, **extra_env)
    ipc = IpcServer(env["VERCEL_IPC_PATH"], on_message=on_message)
    output_path = workdir / f"{Path(entrypoint).stem}.out"
    process: subprocess.Popen[bytes] | None = None
    try:
        with output_path.open("wb") as output:
            process = subprocess.Popen(
                [sys.executable, "-c", TRAMPOLINE],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        running = process
        try:
            started = ipc.wait_for(
                lambda m: m.type in ("server-started", "unrecoverable-error"),
                STARTUP_SECONDS,
                alive=lambda: running.poll() is None,
            )
        except AssertionError as error:
            raise AssertionError(f"{error}\n{output_path.read_text(errors='replace')}") from None
        assert started.type == "server-started", started.message
        port = started.message["payload"]["httpPort"]
        yield HostedFunction(process, ipc, port, started.message, output_path)
    finally:
        if process is not None:
            stop_process_group(process)
        ipc.close()


# --- helpers ---------------------------------------------------------------------------------


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def internal_headers(deadline: datetime) -> tuple[str, dict[str, str]]:
    invocation_id = uuid.uuid4().hex
    return invocation_id, {
        "x-vercel-internal-invocation-id": invocation_id,
        "x-vercel-internal-request-id": "1",
        "x-vercel-internal-deadline": rfc3339(deadline),
    }


def read_run(db_path: Path, run_id: str) -> RunState | None:
    async def read() -> RunState | None:
        store = SQLiteStore(str(db_path), ttl_seconds=7200)
        try:
            return await store.get_run(run_id)
        finally:
            await store.aclose()

    return asyncio.run(read())


def create_endless_run(db_path: Path) -> str:
    """A run whose worker is alive (fresh heartbeat) but never writes again."""
    run_id = new_run_id()
    request = QuoteRequest.model_validate(REQUEST, context={"providers": PROVIDER_IDS})
    deadline = datetime.now(UTC) + timedelta(seconds=290)
    record = new_run_record(run_id, request, list(PROVIDER_IDS), deadline)

    async def create() -> None:
        store = SQLiteStore(str(db_path), ttl_seconds=7200)
        try:
            await store.create_run(record)
        finally:
            await store.aclose()

    asyncio.run(create())
    return run_id


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short and under /tmp: a Unix socket path must fit in 108 bytes.
    with tempfile.TemporaryDirectory(prefix="vcrt-") as directory:
        yield Path(directory)


# --- tests -----------------------------------------------------------------------------------


def test_post_ends_its_invocation_with_the_202_and_leaves_the_work_to_the_queue(
    workdir: Path, queue_env: Any
) -> None:
    db_path = workdir / "quotes.sqlite3"
    queued_before = len(queue_env.state.messages)
    with host_function(
        "api/quotes/index.py",
        workdir,
        VERCEL_QUEUE_BASE_URL=queue_env.base_url,
        VERCEL_QUEUE_TOKEN="vc-dev-token",
        VERCEL_REGION="dev1",
    ) as fn:
        payload = fn.server_started["payload"]
        assert isinstance(payload["httpPort"], int)
        assert payload["initDuration"] >= payload["userInitDuration"] >= 0

        invocation_id, headers = internal_headers(datetime.now(UTC) + timedelta(seconds=300))
        began = time.time()
        with httpx.Client(base_url=fn.url, timeout=10) as client:
            response = client.post("/api/quotes", json=REQUEST, headers=headers)
        answered_at = time.time()
        assert response.status_code == 202, f"{response.text}\n{fn.output()}"
        run_id = response.json()["runId"]
        assert response.headers["location"] == f"/api/quotes/{run_id}"

        started = fn.ipc.find("handler-started", invocation_id)
        assert started is not None
        assert started.message["payload"]["context"]["requestId"] == 1
        end = fn.ipc.wait_for(
            lambda m: m.type == "end" and m.invocation_id == invocation_id,
            10,
            alive=lambda: fn.process.poll() is None,
        )
        assert not fn.ipc.errors, fn.ipc.errors
        # The invocation was over with its response: no provider work ran in it.
        assert end.received_at - answered_at < 2.0
        state = read_run(db_path, run_id)
        assert state is not None and state.record.status == "processing"
        assert state.last_event_id == 0  # only `started`: nobody worked on it here
        # The run's deadline is its own (RUN_MAX_SECONDS), not this invocation's.
        assert state.record.deadline - state.record.created_at == timedelta(seconds=900)
        # Five provider messages and the run's deadline message wait in the queue.
        assert len(queue_env.state.messages) - queued_before == 6
        ends = [m for m in fn.ipc.messages if m.type == "end"]
        assert [m.invocation_id for m in ends] == [invocation_id]
        print(f"202 after {answered_at - began:.3f}s; end after {end.received_at - began:.3f}s")


def test_production_without_kv_refuses_with_a_503(workdir: Path) -> None:
    db_path = workdir / "quotes.sqlite3"
    with host_function("api/quotes/index.py", workdir, VERCEL_ENV="production") as fn:
        invocation_id, headers = internal_headers(datetime.now(UTC) + timedelta(seconds=300))
        with httpx.Client(base_url=fn.url, timeout=10) as client:
            response = client.post("/api/quotes", json=REQUEST, headers=headers)
        assert response.status_code == 503, response.text
        assert response.headers["content-type"] == "application/problem+json"
        problem = response.json()
        assert problem["status"] == 503
        assert problem["type"].endswith("/storage-not-configured")
        assert "Link a Vercel KV" in problem["detail"]
        fn.ipc.wait_for(
            lambda m: m.type == "end" and m.invocation_id == invocation_id,
            5,
            alive=lambda: fn.process.poll() is None,
        )
        # The warning is logged through the runtime, attributed to this invocation.
        assert any("No KV store is linked" in line for line in fn.logs(invocation_id))
    assert not db_path.exists(), "no per-instance store may be opened on a deployment"


def test_stream_closes_five_seconds_before_the_invocation_deadline(workdir: Path) -> None:
    db_path = workdir / "quotes.sqlite3"
    run_id = create_endless_run(db_path)

    async def stream(
        client: httpx.AsyncClient, seconds_left: float
    ) -> tuple[float, float, str, str]:
        invocation_id, headers = internal_headers(
            datetime.now(UTC) + timedelta(seconds=seconds_left)
        )
        began = time.time()
        path = f"/api/quotes/{run_id}/stream"
        # After `started` (id 0), the run writes nothing more.
        headers["Last-Event-ID"] = "0"
        async with client.stream("GET", path, params={"runId": run_id}, headers=headers) as r:
            assert r.status_code == 200, await r.aread()
            assert r.headers["content-type"].startswith("text/event-stream")
            body = b"".join([chunk async for chunk in r.aiter_bytes()])
        return began, time.time(), body.decode(), invocation_id

    async def both(url: str) -> list[tuple[float, float, str, str]]:
        async with httpx.AsyncClient(base_url=url, timeout=15) as client:
            async with asyncio.timeout(15):
                # Two invocations at once, with different deadlines: each reads its own.
                return await asyncio.gather(stream(client, 7), stream(client, 9))

    with host_function("api/quotes/[runId]/stream.py", workdir, RUN_LEASE_SECONDS="60") as fn:
        results = asyncio.run(both(fn.url))
        ends = [
            fn.ipc.wait_for(
                lambda m, i=invocation_id: m.type == "end" and m.invocation_id == i,
                5,
                alive=lambda: fn.process.poll() is None,
            )
            for _, _, _, invocation_id in results
        ]

    (began, short_closed, short_body, _), (began_longer, longer_closed, _, _) = results
    short, longer = short_closed - began, longer_closed - began_longer
    print(f"streams closed after {short:.3f}s (deadline 7 s) and {longer:.3f}s (deadline 9 s)")
    assert 1.5 < short < 3.0
    assert 3.5 < longer < 5.0
    assert short_body.startswith("retry: ")
    assert "data:" not in short_body  # the run never wrote another event
    # Each invocation ended when its stream did, not before.
    for (_, closed, _, _), end in zip(results, ends, strict=True):
        assert closed - 0.5 < end.received_at < closed + 1.0
    state = read_run(db_path, run_id)
    assert state is not None
    assert not state.finalized  # it was alive: closing was the deadline's doing, not staleness
