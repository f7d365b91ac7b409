"""Every log line this process writes, formatted as the functions format it, for tests."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from lib.logs import JsonLineFormatter


class JsonLogCapture(logging.Handler):
    """Formats each record when it is logged (in the context of its request or delivery)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonLineFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def objects(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines]

    def matching(self, **fields: object) -> list[dict[str, Any]]:
        return [o for o in self.objects() if all(o.get(k) == v for k, v in fields.items())]


@pytest.fixture
def json_logs() -> Iterator[JsonLogCapture]:
    """Captures every record at any level from any logger, as JSON lines."""
    capture = JsonLogCapture()
    root = logging.getLogger()
    level = root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    try:
        yield capture
    finally:
        root.removeHandler(capture)
        root.setLevel(level)
