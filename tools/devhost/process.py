"""Run the dev host as a subprocess for end-to-end tests: what `make dev` serves is tested."""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

# The directory holding the `tools` package, so the child can import it from any project root.
_TOOLS_PARENT = Path(__file__).resolve().parents[2]


class DevHostError(RuntimeError):
    pass


class RunningDevHost:
    """A started `python -m tools.devhost`; a context manager that stops it on exit."""

    def __init__(self, process: subprocess.Popen[bytes], keep_lines: int | None = 2000) -> None:
        self.process = process
        self.url = ""
        self.queue_url = ""  # the embedded Vercel Queues service (VERCEL_QUEUE_BASE_URL)
        self._lines: collections.deque[str] = collections.deque(maxlen=keep_lines)
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def instance_pids(self, file: str) -> list[int]:
        """The pids of the running instances of one function file, e.g. "api/work.py" (Linux)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            # An instance is `python -u -c <main> <file>#<index>`, a child of the host.
            if ppid == self.pid and any(a.startswith(f"{file}#".encode()) for a in argv[-2:]):
                pids.append(int(entry.name))
        return sorted(pids)

    def output(self) -> str:
        """The host's recent output (its own lines and its instances' logs)."""
        return "\n".join(list(self._lines))

    def output_lines(self) -> list[str]:
        """The host's output so far, a line each: all of it when started with keep_lines=None."""
        return list(self._lines)

    def wait_ready(self, timeout: float) -> None:
        if not self._ready.wait(timeout) or not self.url:
            self.stop()
            reason = (
                f"exited with code {self.process.returncode}"
                if self.process.poll() is not None
                else f"not READY within {timeout:g} s"
            )
            raise DevHostError(f"dev host {reason}; its output:\n{self.output()}")

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM the host (which stops its instances); SIGKILL its group if it lingers."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._reader.join(timeout=2)
        return self.process.returncode

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self._lines.append(line)
            if line.startswith("queue:") and not self.queue_url:
                self.queue_url = line.split()[1]
            if line.startswith("READY ") and not self._ready.is_set():
                self.url = line.removeprefix("READY ").strip()
                self._ready.set()
        self._ready.set()  # the host exited: unblock wait_ready


def start_devhost_process(
    project_root: str | Path,
    *,
    instances: int = 2,
    env: Mapping[str, str] | None = None,
    port: int = 0,
    timeout: float = 60.0,
    reload: bool = False,
    keep_lines: int | None = 2000,
    queue_visibility_only: bool = False,
) -> RunningDevHost:
    """Start the dev host for `project_root` in its own process group; return once it is READY.

    `env` is added to (and overrides) this process's environment for the host and its functions.
    Raises DevHostError, with the host's output, if it exits or is not ready within `timeout`.
    The host keeps its last `keep_lines` lines of output (None: every line).
    """
    child_env = {**os.environ, **(env or {})}
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(_TOOLS_PARENT), child_env.get("PYTHONPATH", "")) if p
    )
    child_env["PYTHONUNBUFFERED"] = "1"
    command = [
        sys.executable,
        "-m",
        "tools.devhost",
        "--root",
        str(Path(project_root).resolve()),
        "--port",
        str(port),
        "--instances",
        str(instances),
        "--startup-timeout",
        str(timeout),
        *(["--reload"] if reload else []),
        *(["--queue-visibility-only"] if queue_visibility_only else []),
    ]
    process = subprocess.Popen(
        command,
        cwd=project_root,
        env=child_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    host = RunningDevHost(process, keep_lines)
    host.wait_ready(timeout + 5)
    return host
