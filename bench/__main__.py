"""`make bench` (`python -m bench`): measure, print one table, write bench/last-results.md."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from bench import report, scenarios
from bench.infra import (
    ROOT,
    BenchError,
    FunctionHost,
    Machine,
    UpstashEndpoint,
    log_directory,
    raise_fd_limit,
    redis_url,
    redis_version,
)
from bench.scenarios import Delivery, Setup
from tools.devhost.routes import discover_functions

RESULTS_PATH = Path(__file__).resolve().parent / "last-results.md"
CLIENTS = (1, 10)


def progress(message: str) -> None:
    print(f"  … {message}", file=sys.stderr, flush=True)


async def measure(setup: Setup, streams_target: int) -> list[report.Section]:
    runs: dict[tuple[str, int], Delivery] = {}
    for clients in CLIENTS:
        progress(f"delivery, {clients} client(s): this design")
        runs["this", clients] = await scenarios.project_delivery(setup, clients)
        progress(f"delivery, {clients} client(s): seed")
        runs["seed", clients] = await scenarios.seed_delivery(setup, clients)
    progress("delivery, 1 client, events 2× slower: both designs")
    slow = {
        "this": await scenarios.project_delivery(setup, 1, gap_scale=2.0),
        "seed": await scenarios.seed_delivery(setup, 1, gap_scale=2.0),
    }
    # Before the reconnecting readers: streams they drop can outlive them (see that row).
    progress(f"{streams_target} concurrent streams on a fresh stream-function instance")
    streams = await scenarios.concurrent_streams(setup, streams_target)
    for failure, times in streams.failures.items():
        progress(f"  a stream was not held ({times}×): {failure}")
    progress("50 concurrent writers: both designs, then this design with reconnecting readers")
    writers_this = await scenarios.project_writers(setup)
    writers_seed = await scenarios.seed_writers(setup)
    writers_readers = await scenarios.project_writers(setup, readers=4)
    return [
        report.delivery_section(runs, slow, CLIENTS),
        report.writers_section(writers_this, writers_seed, writers_readers),
        report.streams_section(streams),
    ]


NOTES = [
    "this/seed: this design's figure divided by the seed's (import rows: divided by the bare "
    "Starlette app, S).",
    "Seed = shared-storage-fix.md: one JSON blob per run, append = GET + SET of the blob, each "
    "client's loop GETs the blob every 500 ms; its replies are plain JSON (as ours) and its "
    "events skip the HTTP hop ours take, so its figures are a lower bound.",
    "Latency: time.time() before the append request → the moment the client parsed the event; "
    "KV figures: what the Upstash REST endpoint served between a reset and the end of the "
    "scenario (worker + every reader, subscriptions included).",
    "Budgets: ARCHITECTURE.md 'Budgets'; 'a few per connection' is read as ≤ 5 KV requests.",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--streams", type=int, default=500, help="concurrent streams to hold")
    parser.add_argument("--import-repeats", type=int, default=7)
    args = parser.parse_args(argv)
    began = time.monotonic()
    try:
        url = redis_url()
        machine = Machine.describe(redis_version(url))
    except BenchError as error:
        print(f"make bench: {error}", file=sys.stderr)
        return 2
    fd_limit = raise_fd_limit()
    logs = log_directory()
    progress(f"processes' output goes to {logs}; file descriptor limit {fd_limit}")
    try:
        with UpstashEndpoint(url, logs) as endpoint:
            env = {
                "KV_REST_API_URL": endpoint.url,
                "KV_REST_API_TOKEN": UpstashEndpoint.TOKEN,
                "STREAM_MAX_SECONDS": "600",
                "VERCEL_ENV": "development",
            }
            with FunctionHost(scenarios.STREAM_FUNCTION, env, logs) as stream:
                setup = Setup(endpoint, stream, env, logs)
                sections = asyncio.run(measure(setup, args.streams))
        progress("cold imports")
        functions = [spec.file for spec in discover_functions(ROOT)]
        sections.append(
            report.imports_section(scenarios.cold_imports(functions, args.import_repeats))
        )
    except (BenchError, TimeoutError, AssertionError) as error:
        print(f"make bench failed: {type(error).__name__}: {error}", file=sys.stderr)
        print(f"(the hosted processes' output is in {logs})", file=sys.stderr)
        return 1
    header = [
        "make bench: this project's KV design vs the seed's, measured in the same run",
        *machine.lines(),
        f"Everything on loopback; took {time.monotonic() - began:.0f} s.",
    ]
    print(report.render_text(sections, header, NOTES))
    report.write_markdown(RESULTS_PATH, report.render_markdown(sections, header, NOTES))
    print(f"(also written to {RESULTS_PATH.relative_to(ROOT)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
