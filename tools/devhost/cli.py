"""`python -m tools.devhost`: serve a project's `api/` functions the way Vercel does."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Generator, Sequence
from pathlib import Path

import uvicorn
from dotenv import dotenv_values

from tools.devhost import project
from tools.devhost.proxy import DevProxy, new_upstream_client
from tools.devhost.queues import QueueConfigError, QueueService, discover_triggers
from tools.devhost.routes import Router, discover_functions, discover_rewrites
from tools.devhost.static import PublicFiles
from tools.devhost.supervisor import StartupError, Supervisor


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.devhost",
        description="Serve api/**/*.py as Vercel functions, each in its own processes.",
    )
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="project root (cwd)")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (127.0.0.1)")
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("PORT") or 3000),
        help="listen port; 0 picks a free one (env PORT, else 3000)",
    )
    parser.add_argument("--instances", type=int, default=2, help="processes per function (2)")
    parser.add_argument(
        "--reload",
        action="store_true",
        help="run vercel_runtime.dev.main() unchanged: restart an instance on file changes",
    )
    parser.add_argument(
        "--queue-visibility-only",
        action="store_true",
        help="a failed push comes back when its visibility ends, not after retryAfterSeconds",
    )
    parser.add_argument(
        "--startup-timeout", type=float, default=60.0, help="seconds to wait for instances"
    )
    args = parser.parse_args(argv)
    if args.instances < 1:
        parser.error("--instances must be at least 1")
    return args


def function_environment(root: Path) -> dict[str, str]:
    """The functions' environment: ours, then .env.local, then .env (earlier wins)."""
    env: dict[str, str] = {}
    for name in (".env", ".env.local"):  # later files override earlier ones
        env.update({k: v for k, v in dotenv_values(root / name).items() if v is not None})
    env.update(os.environ)
    env.update(
        {
            "VERCEL_ENV": "development",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p
            ),
        }
    )
    return env


def say(line: str = "") -> None:
    print(line, flush=True)


async def serve(args: argparse.Namespace) -> int:
    root: Path = args.root.resolve()
    specs = discover_functions(root)
    if not specs:
        say(f"devhost: no functions under {root / 'api'}")
        return 1
    try:
        queue = QueueService(
            discover_triggers(root, specs),
            log=say,
            visibility_only=args.queue_visibility_only,
        )
    except QueueConfigError as exc:
        say(f"devhost: {exc}")
        return 1
    env = {**function_environment(root), **queue.environment()}
    listener = socket.create_server((args.host, args.port))
    port = listener.getsockname()[1]
    base_url = f"http://{args.host}:{port}"
    local_host = "127.0.0.1" if args.host in ("", "0.0.0.0", "::") else args.host

    say(f"devhost: serving {root} at {base_url}")
    for spec in specs:
        say(f"  {spec.file}  maxDuration {spec.max_duration:g} s")
    say(f"queue:         {queue.url} (Vercel Queues: vercel-queue's embedded service)")
    for trigger in queue.triggers:
        say(f"  {trigger.describe()}")
    for line in project.describe(env):
        say(line)
    say(f"instances:     {args.instances} per function (vercel_runtime.dev, own processes)")
    for line in project.example(base_url):
        say(line)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    supervisor = Supervisor(
        root, specs, instances=args.instances, env=env, reload=args.reload, log=say
    )
    client = new_upstream_client()
    server = _Server(
        uvicorn.Config(
            DevProxy(
                Router(specs, discover_rewrites(root)),
                supervisor.pools,
                client,
                PublicFiles(root / "public"),
            ),
            lifespan="off",
            access_log=False,
            log_level="warning",
            server_header=False,
            date_header=False,
            timeout_graceful_shutdown=2,
        )
    )
    server_task: asyncio.Task[None] | None = None
    try:
        await queue.start()
        starting = asyncio.create_task(supervisor.start(args.startup_timeout))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not starting.done():
            starting.cancel()
            return 130
        try:
            starting.result()
        except StartupError as exc:
            say(f"devhost: {exc}")
            return 1
        server_task = asyncio.create_task(server.serve(sockets=[listener]))
        listening = asyncio.create_task(server.listening.wait())
        await asyncio.wait({server_task, listening}, return_when=asyncio.FIRST_COMPLETED)
        listening.cancel()
        if server_task.done():
            return 1
        queue.start_delivery(f"http://{local_host}:{port}", supervisor.has_ready_instance)
        say(f"READY {base_url}")
        stop_wait = asyncio.create_task(stop.wait())
        await asyncio.wait({server_task, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        say("devhost: stopping")
        return 0
    finally:
        server.should_exit = True
        await asyncio.gather(
            supervisor.stop(),
            queue.stop(),
            *([server_task] if server_task else []),
            return_exceptions=True,
        )
        await client.aclose()
        listener.close()


class _Server(uvicorn.Server):
    """uvicorn, minus its own signal handling (the host handles SIGINT/SIGTERM)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.listening.set()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None]:
        yield


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(serve(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
