"""Hosting functions in OS processes with Vercel's runtime, and keeping them alive.

Each instance is one `vercel_runtime.dev` server (what `vercel dev` runs) on its own loopback
port, started in its own session so that it, and anything it spawns, can be stopped as a group.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from tools.devhost.routes import FunctionSpec

# What `vercel dev` runs is a generated shim: it sets the VERCEL_DEV_* variables, imports
# `vercel_runtime.dev` (which imports the function's module at import time) and calls its
# `main()`. `main()` always serves through uvicorn's file-watching reloader: the app runs in a
# second process that the reloader does not replace if it dies, and every .py change under the
# project restarts it. So by default the same runtime app (`vercel_runtime.dev.asgi_app` or
# `wsgi_app`: deadline header, internal-header stripping, wait_until) is served without the
# reloader, one process per instance; `--reload` (DEVHOST_RELOAD=1) calls `main()` unchanged.
# A watchdog thread takes the instance's process group down if the host goes away.
_INSTANCE_MAIN = """\
# devhost instance (sys.argv[1] names it)
import os, signal, threading, time

def _watch_host(host_pid=os.getppid()):
    while os.getppid() == host_pid:
        time.sleep(0.5)
    os.killpg(0, signal.SIGKILL)

threading.Thread(target=_watch_host, daemon=True).start()

from vercel_runtime import dev

port = int(os.environ["PORT"])
if os.environ.get("DEVHOST_RELOAD") == "1":
    dev.main()
elif dev._wsgi_user_app is not None:
    os.close(int(os.environ["DEVHOST_LISTEN_FD"]))  # werkzeug binds the port itself
    from vercel_runtime._vendor.werkzeug.serving import run_simple
    run_simple("127.0.0.1", port, dev.wsgi_app, threaded=True)
else:
    # The socket the host bound for this instance (bound, not yet listening: connections are
    # refused until uvicorn serves on it), so no other process can take the port meanwhile.
    import socket, sys
    from vercel_runtime._vendor import uvicorn
    listener = socket.socket(fileno=int(os.environ["DEVHOST_LISTEN_FD"]))
    server = uvicorn.Server(uvicorn.Config(dev.asgi_app, host="127.0.0.1", port=port,
                                           use_colors=False, timeout_graceful_shutdown=2))
    server.run(sockets=[listener])
    if not server.started:
        sys.exit(3)
"""

Log = Callable[[str], None]


class StartupError(RuntimeError):
    pass


_UVICORN_STARTUP = re.compile(
    r"INFO:\s+(Started server process|Waiting for application startup|"
    r"Application startup complete|Uvicorn running on)"
)


class _InstanceOutput(asyncio.SubprocessProtocol):
    """Relays an instance's output line by line, prefixed, and notes when its process exits.

    Exit is taken from the process itself, not from its pipes closing: processes it spawned
    (the reloader's worker) may hold the pipes open after it died.
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._transport: asyncio.SubprocessTransport | None = None
        self._partial = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.SubprocessTransport)
        self._transport = transport

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            self._write(line)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if self._partial:
            self._write(self._partial)
            self._partial = b""

    def process_exited(self) -> None:
        assert self._transport is not None
        if not self.exited.done():
            self.exited.set_result(self._transport.get_returncode() or 0)

    def _write(self, line: bytes) -> None:
        text = line.decode(errors="replace").rstrip()
        if _UVICORN_STARTUP.match(text):
            return  # the host announces readiness itself; four lines per instance are noise
        sys.stderr.write(f"[{self.label}] {text}\n")
        sys.stderr.flush()


class Instance:
    """One process hosting one function."""

    def __init__(self, spec: FunctionSpec, index: int) -> None:
        self.spec = spec
        self.index = index
        self.port = 0
        self.pid: int | None = None
        self.output: _InstanceOutput | None = None
        self.transport: asyncio.SubprocessTransport | None = None
        self.ready = False

    @property
    def label(self) -> str:
        return f"{self.spec.file}#{self.index}"

    @property
    def alive(self) -> bool:
        return self.output is not None and not self.output.exited.done()

    def kill_group(self, sig: signal.Signals) -> None:
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)


class Pool:
    """A function's instances; `pick` goes round-robin over the ready ones."""

    def __init__(self, instances: list[Instance]) -> None:
        self.instances = instances
        self._next = 0

    def pick(self, exclude: set[int] | frozenset[int] = frozenset()) -> Instance | None:
        count = len(self.instances)
        for offset in range(count):
            instance = self.instances[(self._next + offset) % count]
            if instance.ready and instance.alive and instance.index not in exclude:
                self._next = (instance.index + 1) % count
                return instance
        return None


class Supervisor:
    def __init__(
        self,
        root: Path,
        specs: list[FunctionSpec],
        *,
        instances: int,
        env: Mapping[str, str],
        reload: bool,
        log: Log,
    ) -> None:
        self.root = root
        self.env = dict(env)
        self.reload = reload
        self.log = log
        self.pools = {
            spec.file: Pool([Instance(spec, i) for i in range(instances)]) for spec in specs
        }
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def instances(self) -> list[Instance]:
        return [i for pool in self.pools.values() for i in pool.instances]

    def has_ready_instance(self, file: str) -> bool:
        return any(i.ready and i.alive for i in self.pools[file].instances)

    async def start(self, within: float) -> None:
        """Start every instance and wait until each accepts connections."""
        first_start: dict[str, asyncio.Future[None]] = {}
        loop = asyncio.get_running_loop()
        for instance in self.instances:
            first_start[instance.label] = loop.create_future()
            self._tasks.append(
                asyncio.create_task(self._keep(instance, first_start[instance.label]))
            )
        try:
            async with asyncio.timeout(within):
                await asyncio.gather(*first_start.values())
        except TimeoutError:
            waiting = [label for label, f in first_start.items() if not f.done()]
            raise StartupError(f"not ready after {within:g} s: {', '.join(waiting)}") from None

    async def stop(self, grace: float = 3.0) -> None:
        """Stop every process started: SIGTERM to each group, SIGKILL after `grace` seconds."""
        self._stopping = True
        for instance in self.instances:
            instance.kill_group(signal.SIGTERM)
        running = [i.output.exited for i in self.instances if i.alive and i.output]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await asyncio.gather(*running)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for instance in self.instances:
            instance.kill_group(signal.SIGKILL)  # stragglers, and anything they spawned
            if instance.output is not None:
                await instance.output.exited
            if instance.transport is not None:
                instance.transport.close()

    async def _keep(self, instance: Instance, first_start: asyncio.Future[None]) -> None:
        """Run an instance; replace it whenever it exits, until the host stops."""
        backoff = 0.5
        loop = asyncio.get_running_loop()
        while not self._stopping:
            began = loop.time()
            exited = await self._spawn(instance)
            try:
                if await self._wait_listening(instance):
                    instance.ready = True
                    if not first_start.done():
                        first_start.set_result(None)
                code = await exited
            finally:
                instance.ready = False
                instance.kill_group(signal.SIGKILL)  # anything it left behind
            if self._stopping:
                return
            if not first_start.done():  # never came up: fail the host's start
                first_start.set_exception(
                    StartupError(
                        f"instance {instance.label} exited with code {code} before it "
                        "was ready (its output is above)"
                    )
                )
                return
            self.log(
                f"instance {instance.label} (pid {instance.pid}) exited with code "
                f"{_describe_code(code)}; restarting"
            )
            if instance.transport is not None:
                instance.transport.close()
            quick_crash = loop.time() - began < 5
            backoff = min(backoff * 2, 10.0) if quick_crash else 0.5
            if quick_crash:
                await asyncio.sleep(backoff)

    async def _spawn(self, instance: Instance) -> asyncio.Future[int]:
        # The instance's port is bound here and the socket handed to it: a port merely found
        # free could be taken (by any process's outgoing connection) before the instance binds
        # it, which under load failed an instance with "address already in use". The reloader
        # (vercel_runtime.dev.main) binds its own port.
        with instance_socket() as listener:
            instance.port = listener.getsockname()[1]
            env = {**self.env, **instance_environment(instance.spec, listener, self.reload)}
            if self.reload:
                listener.close()  # the reloader binds the port itself
            if not sys.stderr.isatty():
                env.setdefault("NO_COLOR", "1")  # their output is relayed, prefixed, to ours
            output = _InstanceOutput(instance.label)
            transport, _ = await asyncio.get_running_loop().subprocess_exec(
                lambda: output,
                sys.executable,
                "-u",
                "-c",
                _INSTANCE_MAIN,
                instance.label,  # only so that `ps` shows which instance this is
                cwd=self.root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                pass_fds=() if self.reload else (listener.fileno(),),
            )
        instance.transport, instance.output, instance.pid = transport, output, transport.get_pid()
        return output.exited

    async def _wait_listening(self, instance: Instance) -> bool:
        """True once the instance accepts connections; False if it exits first."""
        while instance.alive:
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", instance.port), timeout=1
                )
            except (OSError, TimeoutError):
                await asyncio.sleep(0.05)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return instance.alive
        return False


def instance_socket() -> socket.socket:
    """A socket bound to a free loopback port for one instance, not yet listening (connections
    are refused until the instance serves on it); pass it with `pass_fds` and close it here."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    return listener


def instance_environment(
    spec: FunctionSpec, listener: socket.socket, reload: bool = False
) -> dict[str, str]:
    """What `_INSTANCE_MAIN` (vercel_runtime.dev) reads to serve one function file on the port of
    `listener` (an `instance_socket()`, handed to it with `pass_fds`; the reloader, which binds
    the port itself, is given only its number)."""
    return {
        "PORT": str(listener.getsockname()[1]),
        "DEVHOST_LISTEN_FD": "" if reload else str(listener.fileno()),
        "VERCEL_DEV_MODULE_NAME": spec.module,
        "VERCEL_DEV_ENTRY_ABS": str(spec.entry),
        # `vercel_runtime.dev` only distinguishes "django"; any other non-empty value serves
        # the file's ASGI/WSGI app as is. "python" is the generic framework id.
        "VERCEL_DEV_FRAMEWORK": "python",
        "VERCEL_DEV_VARIABLE_NAME": spec.variable,
        "__VC_HANDLER_ENTRYPOINT_ABS": str(spec.entry),
        "DEVHOST_RELOAD": "1" if reload else "0",
    }


def _describe_code(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"{code} ({signal.Signals(-code).name})"
    return str(code)
