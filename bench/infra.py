"""The processes a benchmark needs, and facts about the machine it ran on.

- `UpstashEndpoint`: `python -m tests.upstash_rest` in its own process (so its CPU does not
  distort ours), with its request/command/byte counters read over `/_stats`.
- `FunctionHost`: one instance of one `api/` function, started exactly as `make dev` starts one
  (`tools.devhost.supervisor._INSTANCE_MAIN`: `vercel_runtime.dev`'s ASGI app under uvicorn), its
  output kept in a log file rather than mixed into the table.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

import httpx
import redis

from tools.devhost.routes import FunctionSpec, discover_functions
from tools.devhost.supervisor import _INSTANCE_MAIN, instance_environment, instance_socket

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
LOOPBACK = "127.0.0.1"


class BenchError(RuntimeError):
    """The benchmark cannot run (or a scenario could not be measured); the message says why."""


def free_port() -> int:
    """A loopback port free now (for redis-server, which binds its own)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def redis_url() -> str:
    return os.environ.get("TEST_REDIS_URL", DEFAULT_REDIS_URL)


def redis_version(url: str) -> str:
    """The server's version, or BenchError when nothing answers at `url`."""
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=1.0) as client:
            info: dict[str, Any] = client.info("server")
    except redis.RedisError as error:
        raise BenchError(
            f"redis-server is not reachable at {url} ({error}). `make bench` measures the KV "
            "backend against a real Redis: install redis-server and start it "
            "(`redis-server --daemonize yes`), or set TEST_REDIS_URL."
        ) from None
    return str(info.get("redis_version", "?"))


# Commands the measuring itself (INFO) or a client's connection set-up issue: no REST request
# carries them, so they are not billed. CONFIG is billed (each cold instance's CONFIG GET).
_BOOKKEEPING = ("info", "hello", "select", "client|")


def command_calls(url: str) -> Counter[str]:
    """`INFO commandstats`: calls per command, counting each command a script runs as well as
    the EVAL/EVALSHA itself (what Upstash bills), less the bookkeeping no REST request carries."""
    with redis.Redis.from_url(url, socket_connect_timeout=2.0) as client:
        stats: dict[str, Any] = client.info("commandstats")
    calls: Counter[str] = Counter()
    for name, figures in stats.items():
        command = name.removeprefix("cmdstat_")
        if not command.startswith(_BOOKKEEPING):
            calls[command] = int(figures["calls"])
    return calls


class RedisServer:
    """A redis-server of the benchmark's own (no persistence, a free loopback port), so that
    `INFO commandstats` counts nothing but the benchmark's traffic: the shared server on :6379
    also serves every test suite running on this machine."""

    def __init__(self, log_dir: Path, name: str = "redis-server") -> None:
        self.log_path = log_dir / f"{name}.log"
        self.url = ""
        self._process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None

    def start(self, within: float = 10.0) -> Self:
        port = free_port()
        command = ["redis-server", "--port", str(port), "--bind", LOOPBACK, "--save", ""]
        command += ["--appendonly", "no", "--maxclients", "20000"]
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.url = f"redis://{LOOPBACK}:{port}/0"
        deadline = time.monotonic() + within
        while True:
            try:
                redis_version(self.url)
                return self
            except BenchError:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(
                        "could not start a redis-server:\n" + _log_tail(self.log_path)
                    ) from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self._process is not None:
            _stop_group(self._process)
            self._process = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def raise_fd_limit() -> int:
    """Lift this process's soft RLIMIT_NOFILE to its hard limit (children inherit it): 500
    streams need ~1000 descriptors in the function and ~500 each here and in the endpoint."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass(frozen=True)
class Machine:
    cpu: str
    cores: int
    python: str
    redis: str
    kernel: str
    date: str

    @classmethod
    def describe(cls, redis_version: str) -> Machine:
        cpu = platform.processor() or "unknown CPU"
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        return cls(
            cpu=cpu,
            cores=len(os.sched_getaffinity(0)),
            python=platform.python_version(),
            redis=redis_version,
            kernel=f"{platform.system()} {platform.release()}",
            date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        )

    def lines(self) -> list[str]:
        return [
            f"Machine: {self.cpu}, {self.cores} cores available; {self.kernel}",
            f"Python {self.python}, redis-server {self.redis}; run on {self.date}",
        ]


def _log_tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def _stop_group(process: subprocess.Popen[bytes], grace: float = 3.0) -> None:
    """SIGTERM the process group we started, SIGKILL it after `grace` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if process.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # anything it left behind


class UpstashEndpoint:
    """The tests' Upstash REST endpoint over the real redis-server, as its own process."""

    TOKEN = "bench-kv-token"

    def __init__(self, redis: str, log_dir: Path, name: str = "upstash-rest") -> None:
        self.redis = redis
        self.log_path = log_dir / f"{name}.log"
        self.url = ""
        self._process: subprocess.Popen[bytes] | None = None
        self._http = httpx.Client(headers={"Authorization": f"Bearer {self.TOKEN}"}, timeout=10)

    def start(self, within: float = 20.0) -> Self:
        command = [sys.executable, "-u", "-m", "tests.upstash_rest", "--port", "0"]
        command += ["--token", self.TOKEN, "--redis-url", self.redis]
        log = self.log_path.open("wb")
        self._process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        assert self._process.stdout is not None
        deadline = time.monotonic() + within
        os.set_blocking(self._process.stdout.fileno(), False)
        buffered = b""
        while b"\n" not in buffered:
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise BenchError(
                    "the Upstash REST endpoint did not start:\n" + _log_tail(self.log_path)
                )
            buffered += self._process.stdout.read() or b""
            time.sleep(0.02)
        line = buffered.decode().strip().splitlines()[0]
        if not line.startswith("READY "):
            raise BenchError(f"unexpected first line from the Upstash REST endpoint: {line!r}")
        self.url = line.removeprefix("READY ").strip()
        return self

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def stats(self) -> dict[str, Any]:
        response = self._http.get(f"{self.url}/_stats")
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def reset_stats(self) -> None:
        self._http.post(f"{self.url}/_stats/reset").raise_for_status()

    def configure(self, **settings: Any) -> None:
        """The endpoint's fault and region switches (tests/upstash_rest.py): fail_subscribe,
        refuse_config, replica_lag_ms."""
        self._http.post(f"{self.url}/_control/subscriptions", json=settings).raise_for_status()

    def wait_for_subscriptions(self, count: int, within: float) -> int:
        """Poll until exactly `count` subscriptions are open (or `within` passes); the number."""
        deadline = time.monotonic() + within
        while True:
            open_now = int(self.stats()["open_subscriptions"])
            if open_now == count or time.monotonic() > deadline:
                return open_now
            time.sleep(0.02)

    def stop(self) -> None:
        self._http.close()
        if self._process is not None:
            _stop_group(self._process)
            if self._process.stdout is not None:
                self._process.stdout.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def function_spec(relative_path: str) -> FunctionSpec:
    for spec in discover_functions(ROOT):
        if spec.file == relative_path:
            return spec
    raise BenchError(f"no function {relative_path} under {ROOT / 'api'}")


class FunctionHost:
    """One instance of one function in its own process, as `make dev` hosts it."""

    def __init__(self, relative_path: str, env: dict[str, str], log_dir: Path) -> None:
        self.spec = function_spec(relative_path)
        self.env = env
        self.log_path = log_dir / (relative_path.replace("/", "_") + ".log")
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, within: float = 30.0) -> Self:
        spec = self.spec
        with instance_socket() as listener:  # bound here, served there (as make dev does)
            self.port = listener.getsockname()[1]
            env = {**os.environ, **self.env, **instance_environment(spec, listener)}
            self._process = subprocess.Popen(
                [sys.executable, "-u", "-c", _INSTANCE_MAIN, f"bench:{spec.file}"],
                cwd=ROOT,
                env={**env, "NO_COLOR": "1"},
                stdin=subprocess.DEVNULL,
                stdout=self.log_path.open("ab"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
                pass_fds=(listener.fileno(),),
            )
        deadline = time.monotonic() + within
        while True:
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{spec.file} did not start:\n{_log_tail(self.log_path)}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection((LOOPBACK, self.port), timeout=1),
            ):
                return self
            time.sleep(0.05)

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def memory_kib(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak RSS) of the instance's process, in KiB."""
        values: dict[str, int] = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0])
        return values

    def open_fds(self) -> int:
        with contextlib.suppress(OSError):
            return len(os.listdir(f"/proc/{self.pid}/fd"))
        return -1

    def stop(self) -> None:
        if self._process is not None:
            _stop_group(self._process)
            self._process = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def log_directory() -> Path:
    """Where the hosted processes' output goes (printed at the end only if something failed)."""
    return Path(tempfile.mkdtemp(prefix="quote-runs-bench-"))
