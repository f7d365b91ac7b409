"""Structured logs: one JSON object per line from every function, each carrying the context of the
request or queue delivery it belongs to (`runId`, `provider`, Vercel's request id).

The context is set once where a request or delivery starts (`bind_log_context`) and is read when
a line is formatted, so nothing passes it by hand. `configure_logging()` runs once per process,
from lib.http's function_app on its first request; lib modules only call `logging.getLogger`, so
their tests (and pytest's caplog) see plain records.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType

_NO_CONTEXT: Mapping[str, str] = MappingProxyType({})
_context: ContextVar[Mapping[str, str]] = ContextVar("log_context", default=_NO_CONTEXT)
# What every LogRecord has; anything else on a record came from `extra=` and is logged as a field.
_RECORD_ATTRIBUTES = frozenset(
    [*vars(logging.LogRecord("", 0, "", 0, "", None, None)), "message", "asctime"]
)


def bind_log_context(**fields: str | None) -> None:
    """Add fields to every line logged from here on in this request, delivery or task (and the
    tasks it starts: they copy the context); a field given as None is left off from here on."""
    if fields:
        current = {k: v for k, v in _context.get().items() if fields.get(k, v) is not None}
        _context.set({**current, **{k: v for k, v in fields.items() if v is not None}})


@contextmanager
def log_context(**fields: str | None) -> Iterator[None]:
    """`bind_log_context` for the duration of a block."""
    token = _context.set(_context.get())
    try:
        bind_log_context(**fields)
        yield
    finally:
        _context.reset(token)


def current_log_context() -> Mapping[str, str]:
    return _context.get()


class JsonLineFormatter(logging.Formatter):
    """A record as one line of JSON: ts, level, logger, message, the context, the record's
    `extra=` fields, and an exception's type and traceback as string fields."""

    def format(self, record: logging.LogRecord) -> str:
        try:
            message = record.getMessage()
        except Exception:  # a call whose arguments do not fit its format: keep what it said
            message = f"{record.msg!s} {record.args!r}"
        line: dict[str, object] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
            **_context.get(),
        }
        for name, value in vars(record).items():
            if name not in _RECORD_ATTRIBUTES and not name.startswith("_"):
                line[name] = value
        if record.exc_info and record.exc_info[0] is not None:
            error_type, error, tb = record.exc_info
            line["error"] = error_type.__qualname__
            line["traceback"] = "".join(traceback.format_exception(error_type, error, tb)).rstrip()
        if record.stack_info:
            line["stack"] = record.stack_info
        try:
            return json.dumps(line, default=str, ensure_ascii=False)
        except ValueError:  # a circular extra= value
            return json.dumps({k: str(v) for k, v in line.items()}, ensure_ascii=False)


def _timestamp(created: float) -> str:
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


class _JsonMessage(logging.Filter):
    """Vercel's runtime handler sends `record.getMessage()` (and a raw multi-line traceback) and
    ignores formatters: it is handed a copy of each record whose message is the JSON line."""

    def __init__(self, formatter: logging.Formatter) -> None:
        super().__init__()
        self.formatter = formatter

    def filter(self, record: logging.LogRecord) -> logging.LogRecord:
        line = self.formatter.format(record)
        fields = {**vars(record), "msg": line, "args": None, "exc_info": None, "exc_text": None}
        return logging.makeLogRecord({**fields, "stack_info": None})


_configured = False


def configure_logging() -> None:
    """Make this process's log lines JSON, once. Where the root logger has the platform's
    handlers (Vercel's runtime handler; the stdout/stderr stream handlers of `vercel_runtime.dev`)
    or none (one JSON handler on stderr is added), they, and the stream handlers of loggers that
    do not propagate to the root (uvicorn's), get the JSON format, and the root logs from INFO.
    Where it has handlers of other kinds (pytest's capture), nothing is changed."""
    global _configured
    if _configured:
        return
    _configured = True
    root = logging.getLogger()
    formatter = JsonLineFormatter()
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr))
    if not _adopt(root.handlers, formatter):
        return
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger) and not logger.propagate:
            _adopt(logger.handlers, formatter)
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)


def _adopt(handlers: list[logging.Handler], formatter: logging.Formatter) -> bool:
    """Give the platform's handlers among `handlers` the JSON format; False if there were none."""
    adopted = False
    for handler in handlers:
        if type(handler).__name__ == "VCLogHandler":
            handler.addFilter(_JsonMessage(formatter))
            adopted = True
        elif type(handler) is logging.StreamHandler:
            handler.setFormatter(formatter)
            adopted = True
    return adopted
