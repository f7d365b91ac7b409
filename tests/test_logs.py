"""Log lines: one JSON object each, carrying the context of their request or delivery."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response

import lib.logs
from lib.http import FunctionContext, function_app
from lib.logs import (
    JsonLineFormatter,
    bind_log_context,
    configure_logging,
    current_log_context,
    log_context,
)
from lib.terms import new_run_id

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("tests.logs")


def record(message: str = "hello %s", *args: object, **attributes: object) -> logging.LogRecord:
    made = logging.LogRecord("lib.example", logging.WARNING, __file__, 1, message, args, None)
    made.__dict__.update(attributes)
    return made


def test_a_line_is_one_json_object_with_ts_level_logger_and_message() -> None:
    line = JsonLineFormatter().format(record("run %s\nstarted", "r1"))
    assert "\n" not in line
    fields = json.loads(line)
    assert fields["level"] == "warning"
    assert fields["logger"] == "lib.example"
    assert fields["message"] == "run r1\nstarted"
    assert fields["ts"].endswith("Z") and "T" in fields["ts"]


def test_extra_fields_are_fields_and_the_context_is_added() -> None:
    with log_context(runId="r1", provider="geico"):
        fields = json.loads(JsonLineFormatter().format(record(attempts=2, outcome="quoted")))
    assert fields["runId"] == "r1"
    assert fields["provider"] == "geico"
    assert fields["attempts"] == 2
    assert fields["outcome"] == "quoted"
    assert "taskName" not in fields and "args" not in fields


def test_an_exception_is_its_type_and_traceback_as_string_fields() -> None:
    def fail() -> None:
        raise KeyError("geico")

    try:
        fail()
    except KeyError:
        made = record("unexpected", exc_info=sys.exc_info())
    line = JsonLineFormatter().format(made)
    assert "\n" not in line
    fields = json.loads(line)
    assert fields["error"] == "KeyError"
    assert fields["traceback"].startswith("Traceback (most recent call last):")
    assert "in fail" in fields["traceback"]
    assert fields["traceback"].endswith("KeyError: 'geico'")


def test_a_call_whose_arguments_do_not_fit_still_gives_a_line() -> None:
    fields = json.loads(JsonLineFormatter().format(record("%d of %d", "x")))
    assert fields["message"].startswith("%d of %d")


def test_values_json_cannot_encode_are_written_as_text() -> None:
    fields = json.loads(JsonLineFormatter().format(record(path=Path("/tmp/x"))))
    assert fields["path"] == "/tmp/x"


async def test_the_context_is_per_task_and_log_context_restores_it() -> None:
    async def provider_task(provider: str) -> dict[str, str]:
        bind_log_context(provider=provider)
        await asyncio.sleep(0)
        return dict(current_log_context())

    with log_context(runId="r1"):
        seen = await asyncio.gather(provider_task("geico"), provider_task("allstate"))
        assert dict(current_log_context()) == {"runId": "r1"}
    assert seen == [{"runId": "r1", "provider": "geico"}, {"runId": "r1", "provider": "allstate"}]
    assert dict(current_log_context()) == {}


def test_none_leaves_a_field_out() -> None:
    with log_context(runId=None, provider="geico"):
        assert dict(current_log_context()) == {"provider": "geico"}
        with log_context(provider=None, runId="r1"):
            assert dict(current_log_context()) == {"runId": "r1"}
        assert dict(current_log_context()) == {"provider": "geico"}


async def test_request_lines_carry_the_run_id_of_the_path_and_vercels_request_id(
    json_logs,
) -> None:
    async def endpoint(request: Request, context: FunctionContext) -> Response:
        log.info("looked at the run")
        raise RuntimeError("boom")

    app = function_app(endpoint, methods=("GET",))
    run_id = new_run_id()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://fn") as client:
        response = await client.get(
            f"/api/quotes/{run_id}/stream", headers={"x-vercel-id": "fra1::iad1::abc-123"}
        )
    assert response.status_code == 500
    looked, failed = json_logs.matching(runId=run_id)
    assert looked["message"] == "looked at the run"
    assert looked["vercelId"] == failed["vercelId"] == "fra1::iad1::abc-123"
    assert failed["level"] == "error"
    assert failed["error"] == "RuntimeError"
    assert "boom" in failed["traceback"]
    assert dict(current_log_context()) == {}


async def test_a_path_that_is_not_a_run_id_is_not_logged_as_one(json_logs) -> None:
    async def endpoint(request: Request, context: FunctionContext) -> Response:
        log.info("here")
        return Response(status_code=204)

    app = function_app(endpoint, methods=("GET",))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://fn") as client:
        await client.get("/api/quotes/%3Cscript%3E/stream")
    (line,) = json_logs.matching(message="here")
    assert "runId" not in line


class VCLogHandler(logging.Handler):
    """Shaped as vercel_runtime's handler: it sends getMessage() and a raw traceback, no format."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[str, int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + "".join(logging.Formatter().formatException(record.exc_info))
        self.sent.append((message, record.levelno))


@pytest.fixture
def fresh_root(monkeypatch):
    """A root logger with no handlers, and configure_logging not yet run."""
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", logging.WARNING)
    monkeypatch.setattr(lib.logs, "_configured", False)
    return root


def test_vercels_runtime_handler_is_sent_the_json_line_with_the_level_kept(fresh_root) -> None:
    platform = VCLogHandler()
    fresh_root.addHandler(platform)
    configure_logging()
    try:
        raise ValueError("bad")
    except ValueError:
        logging.getLogger("lib.example").exception("failed")
    ((message, level),) = platform.sent
    assert level == logging.ERROR
    fields = json.loads(message)
    assert fields["message"] == "failed"
    assert fields["error"] == "ValueError"
    assert fresh_root.level == logging.INFO


def test_the_dev_runtimes_stream_handlers_get_the_json_format_and_others_are_left(
    fresh_root, monkeypatch
) -> None:
    stdout, captured, access = io.StringIO(), io.StringIO(), io.StringIO()
    dev_handler = logging.StreamHandler(stdout)
    server_log = logging.getLogger("tests.server.access")  # as uvicorn's, which does not propagate
    monkeypatch.setattr(server_log, "handlers", [logging.StreamHandler(access)])
    monkeypatch.setattr(server_log, "propagate", False)

    class CaptureHandler(logging.StreamHandler):  # type: ignore[type-arg]
        pass

    other = CaptureHandler(captured)
    fresh_root.addHandler(dev_handler)
    fresh_root.addHandler(other)
    configure_logging()
    configure_logging()
    logging.getLogger("lib.example").info("once")
    server_log.info("GET %s", "/api/health")
    assert json.loads(stdout.getvalue())["message"] == "once"
    assert captured.getvalue() == "once\n"
    assert json.loads(access.getvalue())["message"] == "GET /api/health"


def test_a_process_with_no_handlers_logs_json_to_stderr() -> None:
    script = (
        "import logging; from lib.logs import configure_logging, log_context\n"
        "configure_logging()\n"
        "with log_context(runId='r1'): logging.getLogger('lib.x').warning('provider failed')\n"
        "logging.getLogger('lib.x').debug('not at info')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    (line,) = done.stderr.splitlines()
    assert json.loads(line) | {"ts": None} == {
        "ts": None,
        "level": "warning",
        "logger": "lib.x",
        "message": "provider failed",
        "runId": "r1",
    }


def test_where_pytests_capture_owns_the_root_nothing_is_changed(fresh_root, monkeypatch) -> None:
    class CaptureHandler(logging.StreamHandler):  # type: ignore[type-arg]
        pass

    captured, access = io.StringIO(), io.StringIO()
    fresh_root.addHandler(CaptureHandler(captured))
    server_log = logging.getLogger("tests.server.access")
    server_handler = logging.StreamHandler(access)
    monkeypatch.setattr(server_log, "handlers", [server_handler])
    monkeypatch.setattr(server_log, "propagate", False)
    configure_logging()
    assert fresh_root.level == logging.WARNING
    assert server_handler.formatter is None
