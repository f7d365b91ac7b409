"""`make bench` (`python -m bench`): measure, print one table, write bench/last-results.md."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

from bench import functions, report, scenarios
from bench.infra import (
    ROOT,
    BenchError,
    FunctionHost,
    Machine,
    RedisServer,
    UpstashEndpoint,
    log_directory,
    raise_fd_limit,
    redis_url,
    redis_version,
)
from bench.report import DeliveryKey
from bench.scenarios import Delivery, Setup
from tools.devhost.routes import discover_functions

T = TypeVar("T")

RESULTS_PATH = Path(__file__).resolve().parent / "last-results.md"
CLIENTS = (1, 10)
SHORT_RUN_SECONDS = 20.0
# The benchmark's runs stay alive by a lease longer than any scenario (its writers do not
# heartbeat): opening 500 streams on a busy machine took longer than the default 45 s, and a
# stream's stale check then finalized the run worker_lost under the benchmark's feet.
RUN_LEASE_SECONDS = 600
# What `--only` can pick (all of them by default).
GROUPS = ("delivery", "functions", "streams", "writers", "replica", "polling", "imports")


def progress(message: str) -> None:
    print(f"  … {message}", file=sys.stderr, flush=True)


class Scenarios:
    """Runs each scenario on its own: one that fails is reported FAIL with its reason, and the
    rest still run."""

    def __init__(self) -> None:
        self.failures: dict[str, str] = {}
        self.notes: list[str] = []  # what a scenario adds below the table

    async def attempt(self, name: str, scenario: Awaitable[T]) -> T | None:
        progress(name)
        try:
            return await scenario
        except Exception as error:  # reported in the table; the benchmark goes on
            reason = f"{type(error).__name__}: {error}".replace("\n", " ")
            progress(f"  FAILED: {reason}")
            self.failures[name] = reason
            return None


async def measure(
    setup: Setup,
    scenarios_run: Scenarios,
    streams_target: int,
    base: float,
    only: frozenset[str] = frozenset(GROUPS),
    cost_only: bool = False,
    functions_seconds: float = report.FOUR_MINUTES,
) -> tuple[list[report.Section], dict[DeliveryKey, Delivery]]:
    long = 2 * base
    runs: dict[DeliveryKey, Delivery] = {}
    # Untimed: loads the store's Lua scripts into the fresh redis-server's script cache (as a
    # deployed KV's is warm), so no measured append pays a NOSCRIPT round trip.
    await scenarios_run.attempt(
        "warm-up run (not reported)", scenarios.project_delivery(setup, 1, 2.0)
    )
    scenarios_run.failures.pop("warm-up run (not reported)", None)
    plan = [(n, base) for n in CLIENTS] + [(CLIENTS[0], long), (CLIENTS[0], SHORT_RUN_SECONDS)]
    plan.append((1, report.FOUR_MINUTES))
    if cost_only:
        plan = [(1, base), (1, report.FOUR_MINUTES)]
    if "delivery" not in only:
        plan = []
    for clients, duration in plan:
        for design, run in (
            ("this", scenarios.project_delivery),
            ("seed", scenarios.seed_delivery),
        ):
            name = f"delivery, {clients} client(s), {duration:.0f} s run: {design}"
            result = await scenarios_run.attempt(name, run(setup, clients, duration))
            if result is not None:
                runs[design, clients, duration] = result
    sections = []
    if "delivery" in only:
        sections.append(report.cost_section(runs, base))
        sections.append(report.delivery_section(runs, CLIENTS, base, long, SHORT_RUN_SECONDS))
    if cost_only:
        return sections, runs
    if "functions" in only:
        through = await scenarios_run.attempt(
            f"a {functions_seconds:.0f} s run through the functions (make dev host), 1 viewer, "
            "and the same run in the seed's design",
            functions.functions_run(setup, functions_seconds),
        )
        if through is not None:
            sections.append(report.functions_section(through))
            scenarios_run.notes.append(report.functions_note(through))
    streams = None
    if "streams" in only:
        # Before the reconnecting readers: streams they drop can outlive them (see that row).
        streams = await scenarios_run.attempt(
            f"{streams_target} concurrent streams on a fresh stream-function instance",
            scenarios.concurrent_streams(setup, streams_target),
        )
        if streams is not None:
            for failure, times in streams.failures.items():
                progress(f"  a stream was not held ({times}×): {failure}")
    if "writers" in only:
        writers_this = await scenarios_run.attempt(
            "50 concurrent writers: this design", scenarios.project_writers(setup)
        )
        writers_seed = await scenarios_run.attempt(
            "50 concurrent writers: seed", scenarios.seed_writers(setup)
        )
        writers_readers = await scenarios_run.attempt(
            "50 concurrent writers with 4 reconnecting readers: this design",
            scenarios.project_writers(setup, readers=4),
        )
        if writers_this is not None and writers_seed is not None and writers_readers is not None:
            sections.append(report.writers_section(writers_this, writers_seed, writers_readers))
    if streams is not None:
        sections.append(report.streams_section(streams))
    replica = polling = None
    if "replica" in only:
        replica = await scenarios_run.attempt(
            f"delivery, 1 client, {SHORT_RUN_SECONDS:.0f} s run, reads from a replica "
            f"{scenarios.REPLICA_LAG_MS} ms behind",
            scenarios.replica_delivery(setup, SHORT_RUN_SECONDS),
        )
    if "polling" in only:
        polling = await scenarios_run.attempt(
            "200 viewers of one run with push refused, on a fresh stream-function instance",
            scenarios.shared_polling(setup),
        )
    if replica is not None or polling is not None:
        sections.append(report.push_fallback_section(replica, polling))
    return sections, runs


def notes(runs: dict[DeliveryKey, Delivery], base: float, redis_note: str) -> list[str]:
    lines = [
        "this/seed: this design's figure divided by the seed's (import rows: divided by the bare "
        "Starlette app, S).",
        "Billed KV commands: the delta of `INFO commandstats` on " + redis_note + " between the "
        "scenario's start and end, which counts every command a Lua script runs as well as the "
        "EVAL/EVALSHA itself, as Upstash bills. The tests' Upstash REST endpoint issues nothing "
        "of its own to Redis but connection set-up; INFO, HELLO, SELECT and CLIENT commands (no "
        "REST request carries them) are left out; CONFIG is counted (each cold instance's "
        "CONFIG GET). SUBSCRIBE and UNSUBSCRIBE count 1 each per subscription; "
        "messages pushed to a subscriber are not counted. A read region bills every write "
        "command again (bench/scenarios.py WRITE_COMMANDS). Upstash: $0.20 per 100K commands, "
        "500K a month free, 10,000 commands a second per database.",
        "Lease renewals: each provider's writer renews its 45 s lease once it has written "
        "nothing for 30 s (two thirds of it), as lib/worker/ does; the writers are the "
        "benchmark's, not the worker function.",
        "Run: bench/workload.py, written as lib/worker/ writes it (started with create_run; five "
        "provider workers at once: each claims its provider, the claim storing its first "
        "attempt with an activity (claim_provider), saves its agent run's id with an activity "
        "(save_provider_work), agent activity "
        "with append_events, each outcome and the progress in one record_outcome; complete with "
        "get_run and finish_run), every stream's own reads and subscription included. "
        "Streams of one run on one instance share one subscription (and one read per "
        "notice), so 10 clients on the one stream instance hold one.",
        "Seed = shared-storage-fix.md: one JSON blob per run, append = GET + SET of the blob, each "
        "client's loop GETs the blob every 500 ms; its replies are plain JSON (as ours) and its "
        "events skip the HTTP hop ours take, so its figures are a lower bound.",
        "Latency: time.time() before the append request → the moment the client parsed the event; "
        "REST requests and bytes: what the Upstash REST endpoint served between a reset and the "
        "end of the scenario (writers + every reader, subscriptions included).",
        f"The benchmark's runs are kept alive by RUN_LEASE_SECONDS={RUN_LEASE_SECONDS} in the "
        "stream function (its writers do not heartbeat), so no stale check finalizes them.",
        "Budgets: ARCHITECTURE.md 'Budgets' and issue #10; 'a few per connection' is read as "
        "≤ 5 KV requests.",
        "Issue 22's rows: the replica row is the 1-client 20 s delivery with the endpoint's read "
        "region on (tests/upstash_rest.py: every read-only request served by a replica that "
        f"applies each write {scenarios.REPLICA_LAG_MS} ms after the primary, with Upstash's "
        "sync token for a client's own writes; its writes are applied, and counted, twice). "
        "The 200-viewer row refuses CONFIG and /subscribe on a fresh stream-function instance "
        "and counts billed commands over 20 s with nothing appended, after the poll has backed "
        "off; the seed's figure is its design's 200 × one GET every 500 ms, not measured.",
    ]
    one = runs.get(("this", 1, base))
    if one is not None:
        lines.append(
            f"Billed commands of this design's 1-client {base:.0f} s run by name: "
            + report.billed_breakdown(one)
            + "."
        )
    seed = runs.get(("seed", 1, base))
    if seed is not None:
        lines.append(f"... and of the seed's: {report.billed_breakdown(seed)}.")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--streams", type=int, default=500, help="concurrent streams to hold")
    parser.add_argument("--import-repeats", type=int, default=7)
    parser.add_argument(
        "--duration", type=float, default=30.0, help="the base run's length in seconds"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=GROUPS,
        help="run only these scenario groups (repeatable; default: all)",
    )
    parser.add_argument(
        "--cost-only",
        action="store_true",
        help="only the cost rows: the base and the 4-minute 1-client runs, this design and seed "
        "(the benchmark's writers; `--only functions` is the 4-minute run through the functions)",
    )
    parser.add_argument(
        "--functions-seconds",
        type=float,
        default=report.FOUR_MINUTES,
        help="how long the run through the functions lasts (its budget is a 4-minute run's)",
    )
    args = parser.parse_args(argv)
    only = frozenset({"delivery"} if args.cost_only else (args.only or GROUPS))
    began = time.monotonic()
    logs = log_directory()
    fd_limit = raise_fd_limit()
    progress(f"processes' output goes to {logs}; file descriptor limit {fd_limit}")
    scenarios_run = Scenarios()
    sections: list[report.Section] = []
    runs: dict[DeliveryKey, Delivery] = {}
    with contextlib.ExitStack() as stack:
        try:
            if RedisServer.available():
                url = stack.enter_context(RedisServer(logs)).url
                redis_note = "a redis-server the benchmark starts for itself"
            else:
                url = redis_url()
                redis_note = (
                    f"the shared redis-server at {url} (no redis-server binary to start one: "
                    "other clients' commands would be counted too)"
                )
            machine = Machine.describe(redis_version(url))
            endpoint = stack.enter_context(UpstashEndpoint(url, logs))
            env = {
                "KV_REST_API_URL": endpoint.url,
                "KV_REST_API_TOKEN": UpstashEndpoint.TOKEN,
                "STREAM_MAX_SECONDS": "600",
                "RUN_LEASE_SECONDS": str(RUN_LEASE_SECONDS),
                "VERCEL_ENV": "development",
            }
            stream = stack.enter_context(FunctionHost(scenarios.STREAM_FUNCTION, env, logs))
        except BenchError as error:
            print(f"make bench: {error}", file=sys.stderr)
            print(f"(the hosted processes' output is in {logs})", file=sys.stderr)
            return 2
        setup = Setup(endpoint, stream, env, logs, url)
        sections, runs = asyncio.run(
            measure(
                setup,
                scenarios_run,
                args.streams,
                args.duration,
                only,
                args.cost_only,
                args.functions_seconds,
            )
        )
    functions = [spec.file for spec in discover_functions(ROOT)]
    if "imports" in only:
        imports = asyncio.run(
            scenarios_run.attempt(
                "cold imports",
                asyncio.to_thread(scenarios.cold_imports, functions, args.import_repeats),
            )
        )
        if imports is not None:
            sections.append(report.imports_section(imports))
    if scenarios_run.failures:
        sections.append(report.failures_section(scenarios_run.failures))
    header = [
        "make bench: this project's KV design vs the seed's, measured in the same run",
        *machine.lines(),
        f"Everything on loopback; took {time.monotonic() - began:.0f} s.",
    ]
    notes_lines = notes(runs, args.duration, redis_note) + scenarios_run.notes
    print(report.render_text(sections, header, notes_lines))
    if only == frozenset(GROUPS):  # a partial run does not replace the last full one
        report.write_markdown(RESULTS_PATH, report.render_markdown(sections, header, notes_lines))
        print(f"(also written to {RESULTS_PATH.relative_to(ROOT)})")
    if scenarios_run.failures:
        print(f"(the hosted processes' output is in {logs})", file=sys.stderr)
    return 1 if scenarios_run.failures else 0


if __name__ == "__main__":
    sys.exit(main())
