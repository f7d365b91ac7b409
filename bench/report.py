"""The table: each figure for this design and the seed's, their ratio, the budget from
ARCHITECTURE.md "Budgets", and whether it is met. Printed as fixed-width text and written as
Markdown (`bench/last-results.md`) for the README."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench.functions import FunctionsRun
from bench.scenarios import REPLICA_LAG_MS, Delivery, Imports, Polling, Streams, Writers

HEADERS = ("what", "this design", "seed", "this/seed", "budget", "ok?")
LATENCY_BUDGET_MS = 50.0
BASE_REQUESTS = 110
# "a few per connection": taken as at most this many KV requests per streaming connection.
REQUESTS_PER_CONNECTION = 5
BYTES_PER_EVENT_FACTOR = 2.0
STREAMS_BUDGET = 500
RSS_BUDGET_MIB = 256.0
FANOUT_BUDGET_MS = 100.0
REPLICA_P99_BUDGET_MS = 300.0
IDLE_POLL_BUDGET_PER_SECOND = 1.0
IMPORT_BUDGET = 1.3  # × a bare Starlette app's cold import
COMMANDS_PER_EVENT_BUDGET = 2.5
FOUR_MINUTES = 240.0  # the seed's own example run
FOUR_MINUTE_FACTOR = 0.4
# Per event, per provider (its claim, lease renewals, outcome) and per run, for the 4-minute run.
PER_EVENT, PER_PROVIDER, PER_RUN = 2, 16, 10
PROVIDERS = 5
DOLLARS_PER_COMMAND = 0.20 / 100_000
FREE_COMMANDS_PER_MONTH = 500_000
DATABASE_COMMANDS_PER_SECOND = 10_000
LONG_RUN_SECONDS, LONG_RUN_FACTOR = 60.0, 0.5
SHORT_RUN_SECONDS = 20.0
FLAT_TOLERANCE = 0.03
NOT_MEASURED = "—"


@dataclass(frozen=True)
class Row:
    what: str
    this: str
    seed: str = NOT_MEASURED
    ratio: str = ""
    budget: str = ""
    ok: bool | None = None

    @property
    def cells(self) -> tuple[str, ...]:
        verdict = "" if self.ok is None else ("PASS" if self.ok else "FAIL")
        return (self.what, self.this, self.seed, self.ratio, self.budget, verdict)


@dataclass(frozen=True)
class Section:
    title: str
    rows: list[Row]


def ratio(this: float, seed: float) -> str:
    if seed == 0 or math.isnan(this) or math.isnan(seed):
        return ""
    value = this / seed
    if value >= 10:
        return f"{value:.0f}×"
    if value >= 1:
        return f"{value:.1f}×"
    if value >= 0.01:
        return f"{value:.2f}×"
    return f"{value:.3f}×"


def ms(value: float) -> str:
    return f"{value:.1f} ms"


def count(value: float) -> str:
    return f"{value:,.0f}"


def size(value: float) -> str:
    if value >= 1024 * 1024:
        return f"{value / 1024 / 1024:.1f} MiB"
    if value >= 10 * 1024:
        return f"{value / 1024:.0f} KiB"
    return f"{value:,.0f} B"


def requests_budget(clients: int) -> int:
    # The workers append every few hundred ms, so they are never idle: no heartbeat is due.
    return BASE_REQUESTS + REQUESTS_PER_CONNECTION * clients


DeliveryKey = tuple[str, int, float]  # design, clients, run duration (s)


def _label(clients: int, duration: float) -> str:
    return f"{clients} client{'s' if clients > 1 else ''}, {duration:.0f} s run"


def cost_section(runs: dict[DeliveryKey, Delivery], base: float) -> Section:
    """What Upstash bills for a run, as it bills it, beside the seed's."""
    rows: list[Row] = []
    this, seed = runs.get(("this", 1, base)), runs.get(("seed", 1, base))
    if this is not None and seed is not None:
        label = f"{this.events}-event run, 1 viewer"
        for regions in (0, 1):
            mine = this.billed + regions * this.billed_writes
            theirs = seed.billed + regions * seed.billed_writes
            rows.append(
                Row(
                    f"billed commands, {label}, {regions} read region(s)",
                    f"{count(mine)} (${mine * DOLLARS_PER_COMMAND:.5f})",
                    f"{count(theirs)} (${theirs * DOLLARS_PER_COMMAND:.5f})",
                    ratio(mine, theirs),
                )
            )
        rows.append(
            Row(
                f"  per event, {label}, 0 read regions",
                f"{this.billed_per_event:.2f}",
                f"{seed.billed_per_event:.2f}",
                ratio(this.billed_per_event, seed.billed_per_event),
                f"≤ {COMMANDS_PER_EVENT_BUDGET}",
                this.billed_per_event <= COMMANDS_PER_EVENT_BUDGET,
            )
        )
        rows.append(
            Row(
                f"  runs a month on the free tier ({FREE_COMMANDS_PER_MONTH:,} commands)",
                count(FREE_COMMANDS_PER_MONTH // this.billed),
                count(FREE_COMMANDS_PER_MONTH // seed.billed),
                ratio(seed.billed, this.billed),
            )
        )
        rows.append(
            Row(
                f"  concurrent runs one database carries ({DATABASE_COMMANDS_PER_SECOND:,}/s)",
                count(DATABASE_COMMANDS_PER_SECOND * this.duration / this.billed),
                count(DATABASE_COMMANDS_PER_SECOND * seed.duration / seed.billed),
                ratio(seed.billed / seed.duration, this.billed / this.duration),
            )
        )
    this, seed = runs.get(("this", 1, FOUR_MINUTES)), runs.get(("seed", 1, FOUR_MINUTES))
    if this is not None and seed is not None:
        ceiling = PER_EVENT * this.events + PER_PROVIDER * PROVIDERS + PER_RUN
        renewals = this.billed_by_command["hset"]
        rows.append(
            Row(
                f"billed commands, {FOUR_MINUTES:.0f} s run, 1 viewer, lease renewals included",
                count(this.billed),
                count(seed.billed),
                ratio(this.billed, seed.billed),
                f"≤ {FOUR_MINUTE_FACTOR} × seed",
                this.billed <= FOUR_MINUTE_FACTOR * seed.billed,
            )
        )
        rows.append(
            Row(
                f"  vs {PER_EVENT}/event + {PER_PROVIDER}/provider + {PER_RUN} "
                f"({this.events} events, {PROVIDERS} providers; hset {renewals})",
                count(this.billed),
                budget=f"≤ {ceiling}",
                ok=this.billed <= ceiling,
            )
        )
    return Section("What Upstash bills", rows)


def delivery_section(
    runs: dict[DeliveryKey, Delivery],
    clients: tuple[int, ...],
    base: float,
    long: float,
    short: float,
) -> Section:
    rows: list[Row] = []

    def pair(n: int, duration: float) -> tuple[Delivery, Delivery] | None:
        this, seed = runs.get(("this", n, duration)), runs.get(("seed", n, duration))
        return (this, seed) if this is not None and seed is not None else None

    for n in clients:
        got = pair(n, base)
        if got is None:
            continue
        this, seed = got
        rows.append(
            Row(
                f"append → received, p50, {_label(n, base)}",
                ms(this.p50),
                ms(seed.p50),
                ratio(this.p50, seed.p50),
                "(seed polls 500 ms: ~250)",
            )
        )
        rows.append(
            Row(
                f"append → received, p99, {_label(n, base)}",
                ms(this.p99),
                ms(seed.p99),
                ratio(this.p99, seed.p99),
                f"≤ {LATENCY_BUDGET_MS:.0f} ms",
                this.p99 <= LATENCY_BUDGET_MS,
            )
        )
    for n, duration in [(n, base) for n in clients] + [(clients[0], long), (clients[0], short)]:
        got = pair(n, duration)
        if got is None:
            continue
        this, seed = got
        # The long run's old "½ × seed" row is replaced by the 4-minute run's (cost_section).
        budget, ok = "", None
        if duration <= SHORT_RUN_SECONDS and n == 1:
            budget = f"≤ seed (run ≤ {SHORT_RUN_SECONDS:.0f} s)"
            ok = this.billed <= seed.billed
        rows.append(
            Row(
                f"billed KV commands per run, {_label(n, duration)}",
                count(this.billed),
                count(seed.billed),
                ratio(this.billed, seed.billed),
                budget,
                ok,
            )
        )
    first = runs.get(("this", clients[0], base))
    twice = runs.get(("this", clients[0], long))
    if first is not None and twice is not None:
        # Not flat: a quiet provider's lease renewals grow with the run (1 command each).
        rows.append(
            Row(
                f"  {long:.0f} s run vs {base:.0f} s, 1 client (renewals grow with the run)",
                f"{count(twice.billed)} vs {count(first.billed)}",
            )
        )
    for n in clients:
        got = pair(n, base)
        if got is None:
            continue
        this, seed = got
        # Informational: Upstash bills commands, not requests (the cost rows above).
        rows.append(
            Row(
                f"KV REST requests per run, {_label(n, base)}",
                count(this.requests),
                count(seed.requests),
                ratio(this.requests, seed.requests),
            )
        )
    got = pair(clients[0], base)
    if got is not None:
        this, seed = got
        rows.append(
            Row(
                "  REST requests per event written (the writers')",
                f"{this.requests_per_append:.2f}",
                f"{seed.requests_per_append:.2f}",
                ratio(this.requests_per_append, seed.requests_per_append),
                "1",
                this.writer_requests >= 0 and this.requests_per_append <= 1.0,
            )
        )
        rows.append(
            Row(
                "  commands as the REST requests name them (a script = 1)",
                count(this.commands_top_level),
                count(seed.commands_top_level),
                ratio(this.commands_top_level, seed.commands_top_level),
            )
        )
    for n in clients:
        got = pair(n, base)
        if got is None:
            continue
        this, seed = got
        limit = BYTES_PER_EVENT_FACTOR * this.event_bytes
        rows.append(
            Row(
                f"KV bytes read per event delivered, {_label(n, base)}",
                f"{this.bytes_per_event:,.0f} B = {this.bytes_per_event / this.event_bytes:.2f}×ev",
                f"{seed.bytes_per_event:,.0f} B = {seed.bytes_per_event / seed.event_bytes:.1f}×ev",
                ratio(this.bytes_per_event, seed.bytes_per_event),
                f"(was ≤ 2 × event, {limit:,.0f} B: replaced by the cost rows)",
            )
        )
    this_bad = sum(r.missing + r.duplicated for r in runs.values() if r.design == "this")
    seed_bad = sum(r.missing + r.duplicated for r in runs.values() if r.design == "seed")
    receipts = sum(r.events * r.clients for r in runs.values() if r.design == "this")
    rows.append(
        Row(
            f"events lost + duplicated at clients (of {receipts:,})",
            str(this_bad),
            str(seed_bad),
            "",
            "0",
            this_bad == 0,
        )
    )
    sample = next(iter(runs.values()), None)
    size_note = f" (mean {sample.event_bytes:.0f} B)" if sample else ""
    title = f"Delivery: one run of 100 events{size_note}, five provider workers appending at once"
    return Section(title, rows)


def billed_breakdown(run: Delivery) -> str:
    """The billed commands of one run by name, largest first: evalsha 100, rpush 99, ..."""
    return by_command(run.billed_by_command)


def by_command(calls: Counter[str]) -> str:
    return ", ".join(f"{name} {n}" for name, n in calls.most_common() if n)


def functions_section(run: FunctionsRun) -> Section:
    """Issue 22's 4-minute run, measured end to end through the functions."""
    ceiling = PER_EVENT * run.events + PER_PROVIDER * PROVIDERS + PER_RUN
    ok = run.terminal == "complete" and run.duplicated == 0
    label = f"{run.seconds:.0f} s run through the functions, 1 viewer"
    rows = [
        Row(
            f"run: POST → `{run.terminal or 'nothing'}` at the viewer "
            f"(SIMULATED_DELAY_SCALE={run.delay_scale:.2f})",
            f"{run.seconds:.1f} s, {run.events} events",
            f"{run.seconds:.1f} s, {run.events} events",
            budget="complete, no duplicate",
            ok=ok,
        ),
        Row(
            f"billed commands, {label}",
            f"{count(run.billed)} (${run.billed * DOLLARS_PER_COMMAND:.5f})",
            f"{count(run.seed_billed)} (${run.seed_billed * DOLLARS_PER_COMMAND:.5f})",
            ratio(run.billed, run.seed_billed),
            f"≤ {FOUR_MINUTE_FACTOR} × seed = {FOUR_MINUTE_FACTOR * run.seed_billed:.0f}",
            ok and run.billed <= FOUR_MINUTE_FACTOR * run.seed_billed,
        ),
        Row(
            f"  vs {PER_EVENT}/event + {PER_PROVIDER}/provider + {PER_RUN} "
            f"({run.events} events, {PROVIDERS} providers)",
            count(run.billed),
            budget=f"≤ {ceiling}",
            ok=ok and run.billed <= ceiling,
        ),
        Row(
            "  per event",
            f"{run.billed / max(1, run.events):.2f}",
            f"{run.seed_billed / max(1, run.events):.2f}",
            ratio(run.billed, run.seed_billed),
        ),
        Row(
            "  with 1 read region (writes billed again)",
            count(run.billed + run.billed_writes),
            count(run.seed_billed + run.seed_writes),
            ratio(run.billed + run.billed_writes, run.seed_billed + run.seed_writes),
        ),
    ]
    return Section(
        f"Through the functions: one run, 1 viewer (issue 22's {FOUR_MINUTES / 60:.0f}-minute run)",
        rows,
    )


def functions_note(run: FunctionsRun) -> str:
    return (
        f"Through the functions: `make dev`'s host (tools/devhost, 1 instance per function, its "
        f"embedded Vercel Queues service delivering to api/work.py) on the benchmark's Upstash "
        f"endpoint, the simulated quote source with SIMULATED_DELAY_SCALE={run.delay_scale:.2f} "
        f"(its slowest insurer's timeline stretched to the run's length), default lease (45 s, "
        f"renewed after 30 s quiet), default admission limits, Lua scripts loaded beforehand "
        f"(a deployed KV's cache is warm); POST /api/quotes with all 5 insurers, 1 SSE viewer "
        f"({run.reconnects} reconnection(s)) to `{run.terminal}`. Counted from before the POST "
        f"until no command had run for 3 s after `complete`. Seed: the same run in lockstep on "
        f"its own redis-server (blob created when the POST is answered, each event the viewer "
        f"receives appended by GET + SET, its viewer polling every 500 ms). Billed by command: "
        f"{by_command(run.billed_by_command)}; the seed's: {by_command(run.seed_by_command)}."
    )


def writers_section(this: Writers, seed: Writers, readers: Writers) -> Section:
    lost_ok = this.lost == 0 and this.duplicated == 0 and not this.errors
    reader_bad = (readers.reader_missing or 0) + (readers.reader_duplicated or 0)
    return Section(
        f"{this.writers} concurrent writers × {this.each} appends on one run",
        [
            Row(
                "appends per second",
                count(this.appends_per_second),
                count(seed.appends_per_second),
                ratio(this.appends_per_second, seed.appends_per_second),
            ),
            Row(
                f"events lost (of {this.expected:,})",
                count(this.lost),
                count(seed.lost),
                "",
                "0",
                lost_ok and readers.lost == 0,
            ),
            Row(
                "events duplicated",
                count(this.duplicated),
                count(seed.duplicated),
                "",
                "0",
                this.duplicated == 0 and readers.duplicated == 0,
            ),
            Row(
                "failed appends",
                count(sum(this.errors.values())),
                count(sum(seed.errors.values())),
                "",
                "0",
                not this.errors,
            ),
            Row(
                f"  with 4 reconnecting readers ({readers.reader_reconnects} reconnects):"
                " lost + dup at readers",
                count(reader_bad),
                NOT_MEASURED,
                "",
                "0",
                reader_bad == 0,
            ),
            Row(
                "  KV subscriptions held for dropped streams (beyond 1/reader)",
                count(readers.leaked_subscriptions),
                NOT_MEASURED,
                "",
                "0 (end on disconnect)",
                readers.leaked_subscriptions == 0,
            ),
        ],
    )


def streams_section(streams: Streams) -> Section:
    rss_mib = streams.rss_kib / 1024
    return Section(
        "One stream-function instance (vercel_runtime.dev under uvicorn, one process)",
        [
            Row(
                f"concurrent open streams held (of {streams.target})",
                count(streams.held),
                budget=f"≥ {STREAMS_BUDGET}",
                ok=streams.held >= STREAMS_BUDGET,
            ),
            Row(
                f"resident memory with them open (idle {streams.rss_idle_kib / 1024:.0f} MiB)",
                f"{rss_mib:.0f} MiB",
                budget=f"≤ {RSS_BUDGET_MIB:.0f} MiB",
                ok=rss_mib <= RSS_BUDGET_MIB and streams.held >= STREAMS_BUDGET,
            ),
            Row("  peak resident memory (VmHWM)", f"{streams.hwm_kib / 1024:.0f} MiB"),
            Row(
                "  KV subscriptions the instance held for the run",
                count(streams.subscriptions),
                budget="1 (shared by its streams)",
                ok=streams.subscriptions == 1,
            ),
            Row(
                f"  live event → all {streams.target} streams, p99",
                ms(streams.fanout_p99_ms),
                budget=f"≤ {FANOUT_BUDGET_MS:.0f} ms",
                ok=streams.fanout_p99_ms <= FANOUT_BUDGET_MS and streams.held >= STREAMS_BUDGET,
            ),
        ],
    )


def push_fallback_section(replica: Delivery | None, polling: Polling | None) -> Section:
    """Issue 22's delivery budgets: a lagging read region, and many viewers without push."""
    rows: list[Row] = []
    if replica is not None:
        complete = replica.missing == 0 and replica.duplicated == 0
        rows.append(
            Row(
                f"append → client p99, reads from a replica {REPLICA_LAG_MS} ms behind "
                f"({replica.delivered} events, 1 client)",
                ms(replica.p99),
                budget=f"≤ {REPLICA_P99_BUDGET_MS:.0f} ms, none lost",
                ok=replica.p99 <= REPLICA_P99_BUDGET_MS and complete,
            )
        )
        rows.append(Row("  … p50", ms(replica.p50)))
        rows.append(
            Row(
                "  … events missing / duplicated",
                f"{replica.missing} / {replica.duplicated}",
            )
        )
    if polling is not None:
        idle = polling.idle_per_second
        rows.append(
            Row(
                f"{polling.viewers} viewers of one run on one instance, push refused: billed "
                f"commands/s while idle ({polling.idle_seconds:.0f} s)",
                f"{idle:.2f}",
                seed=f"{polling.seed_idle_per_second:.0f}",
                ratio=ratio(idle, polling.seed_idle_per_second),
                budget=f"≤ {IDLE_POLL_BUDGET_PER_SECOND:.0f} per run",
                ok=idle <= IDLE_POLL_BUDGET_PER_SECOND,
            )
        )
        rows.append(
            Row(
                f"  … of {polling.events} events × {polling.viewers} viewers: missing / duplicated",
                f"{polling.missing} / {polling.duplicated}",
                budget="0 / 0",
                ok=polling.missing == 0 and polling.duplicated == 0,
            )
        )
        spent = ", ".join(f"{name} {n}" for name, n in polling.idle_by_command.most_common())
        rows.append(Row("  … idle commands by name", spent or "none"))
    return Section("Delivery without a fresh primary or without push (issue 22)", rows)


def imports_section(imports: Imports) -> Section:
    rows = [
        Row(
            f"cold import, {path}",
            ms(value),
            ratio=f"{value / imports.bare_starlette:.2f}× S",
            budget=f"≤ {IMPORT_BUDGET} × S",
            ok=value <= IMPORT_BUDGET * imports.bare_starlette,
        )
        for path, value in imports.functions.items()
    ]
    rows.append(Row("cold import, bare ASGI app (reference)", ms(imports.bare_asgi)))
    rows.append(Row("cold import, bare Starlette app (reference, S)", ms(imports.bare_starlette)))
    return Section(
        f"Cold import in a fresh interpreter (fastest of {imports.repeats}, round-robin)", rows
    )


def failures_section(failures: dict[str, str]) -> Section:
    """Scenarios that could not be measured: each a FAIL with its reason (the rest still ran)."""
    rows = [
        Row(name, "not measured", budget=reason[:90], ok=False) for name, reason in failures.items()
    ]
    return Section("Scenarios that failed", rows)


def render_text(sections: list[Section], header: list[str], notes: list[str]) -> str:
    table = [HEADERS] + [r.cells for s in sections for r in s.rows]
    widths = [max(len(cells[i]) for cells in table) for i in range(len(HEADERS))]

    def line(cells: tuple[str, ...]) -> str:
        return " | ".join(
            c.ljust(w) if i in (0, 4, 5) else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "-+-".join("-" * w for w in widths)
    out = [*header, "", line(HEADERS), rule]
    for section in sections:
        out.append(f"{section.title}:")
        out.extend(line(row.cells) for row in section.rows)
    out.append(rule)
    out.extend(notes)
    return "\n".join(out)


def render_markdown(sections: list[Section], header: list[str], notes: list[str]) -> str:
    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    out = ["# `make bench` results", "", *(f"{h}  " for h in header), ""]
    out += [line(HEADERS), "| --- | ---: | ---: | ---: | --- | --- |"]
    for section in sections:
        out.append(line((f"**{section.title}**", "", "", "", "", "")))
        out.extend(line(row.cells) for row in section.rows)
    out += ["", *(f"- {n}" for n in notes), ""]
    return "\n".join(out)


def write_markdown(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
