"""What a KV operation costs in the unit Upstash bills, commands: `quiet_kv`, a redis-server of
the tests' own behind the endpoint (no other test's commands in its stats), and a meter of the
commands an operation costs there, as redis-server's own `INFO commandstats` counts them. A pytest
plugin (conftest.py's `pytest_plugins`), so `quiet_kv` is found without an import."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Iterator
from pathlib import Path

import pytest
import redis

from tests.upstash_rest import UpstashRestServer


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def quiet_kv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpstashRestServer]:
    """A redis-server of our own (nobody else's commands in its stats) behind the endpoint."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed: the KV cost tests need a private one")
    port = _free_port()
    workdir: Path = tmp_path_factory.mktemp("redis")
    server = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with redis.Redis.from_url(url, socket_connect_timeout=0.2) as probe:
                    probe.ping()
                break
            except redis.ConnectionError:
                assert server.poll() is None, "the private redis-server exited"
                assert time.monotonic() < deadline, "the private redis-server did not start"
                time.sleep(0.05)
        with UpstashRestServer(url) as endpoint:
            yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=10)


class CommandMeter:
    """Billed commands of one operation: the delta of redis-server's INFO commandstats, less
    what taking the measurement costs, measured at the start rather than assumed (INFO counts
    itself, once per snapshot, after its reply)."""

    def __init__(self, url: str) -> None:
        self._redis = redis.Redis.from_url(url)
        self._redis.ping()  # connect (and its handshake) before anything is measured
        self._own = Counter[str]()
        self._own = self.delta(self.snapshot())

    def snapshot(self) -> Counter[str]:
        stats = self._redis.info("commandstats")
        return Counter(
            {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
        )

    def delta(self, before: Counter[str]) -> Counter[str]:
        spent = self.snapshot()
        spent.subtract(before)
        spent.subtract(self._own)
        return Counter({name: n for name, n in spent.items() if n})

    async def of(self, operation: Awaitable[object]) -> Counter[str]:
        before = self.snapshot()
        await operation
        return self.delta(before)

    def close(self) -> None:
        self._redis.close()


def billed(counts: Counter[str]) -> int:
    return sum(counts.values())
