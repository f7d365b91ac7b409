"""The table: each figure for this design and the seed's, their ratio, the budget from
ARCHITECTURE.md "Budgets", and whether it is met. Printed as fixed-width text and written as
Markdown (`bench/last-results.md`) for the README."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from bench.scenarios import Delivery, Imports, Streams, Writers

HEADERS = ("what", "this design", "seed", "this/seed", "budget", "ok?")
LATENCY_BUDGET_MS = 50.0
BASE_REQUESTS = 110
# "a few per connection": taken as at most this many KV requests per streaming connection.
REQUESTS_PER_CONNECTION = 5
BYTES_PER_EVENT_FACTOR = 2.0
STREAMS_BUDGET = 500
RSS_BUDGET_MIB = 256.0
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
        verdict = "" if self.ok is None else ("yes" if self.ok else "NO")
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
    # The worker appends every 20-50 ms, so it is never idle: no heartbeat is due.
    return BASE_REQUESTS + REQUESTS_PER_CONNECTION * clients


def delivery_section(
    runs: dict[tuple[str, int], Delivery], slow: dict[str, Delivery], clients: tuple[int, ...]
) -> Section:
    rows: list[Row] = []
    for n in clients:
        this, seed = runs["this", n], runs["seed", n]
        label = f"{n} client{'s' if n > 1 else ''}"
        rows.append(
            Row(
                f"append → received, p50, {label}",
                ms(this.p50),
                ms(seed.p50),
                ratio(this.p50, seed.p50),
                "(seed polls 500 ms: ~250)",
            )
        )
        rows.append(
            Row(
                f"append → received, p99, {label}",
                ms(this.p99),
                ms(seed.p99),
                ratio(this.p99, seed.p99),
                f"≤ {LATENCY_BUDGET_MS:.0f} ms",
                this.p99 <= LATENCY_BUDGET_MS,
            )
        )
    for n in clients:
        this, seed = runs["this", n], runs["seed", n]
        budget = requests_budget(n)
        rows.append(
            Row(
                f"KV requests per run, {n} client{'s' if n > 1 else ''}",
                count(this.requests),
                count(seed.requests),
                ratio(this.requests, seed.requests),
                f"≤ {budget} (110 + {REQUESTS_PER_CONNECTION}/conn)",
                this.requests <= budget,
            )
        )
        if n == clients[0]:
            a, b = slow["this"], slow["seed"]
            flat = abs(a.requests - this.requests) <= 2
            rows.append(
                Row(
                    f"  same, events 2× slower ({a.seconds:.0f} s vs {this.seconds:.0f} s)",
                    count(a.requests),
                    count(b.requests),
                    ratio(a.requests, b.requests),
                    f"flat: {this.requests} ± 2",
                    flat,
                )
            )
    for n in clients:
        this, seed = runs["this", n], runs["seed", n]
        rows.append(
            Row(
                f"KV commands per run, {n} client{'s' if n > 1 else ''}",
                count(this.commands),
                count(seed.commands),
                ratio(this.commands, seed.commands),
            )
        )
    for n in clients:
        this, seed = runs["this", n], runs["seed", n]
        rows.append(
            Row(
                f"KV bytes read per run, {n} client{'s' if n > 1 else ''}",
                size(this.bytes_out),
                size(seed.bytes_out),
                ratio(this.bytes_out, seed.bytes_out),
            )
        )
    for n in clients:
        this, seed = runs["this", n], runs["seed", n]
        limit = BYTES_PER_EVENT_FACTOR * this.event_bytes
        rows.append(
            Row(
                f"KV bytes read per event delivered, {n} client{'s' if n > 1 else ''}",
                f"{this.bytes_per_event:,.0f} B = {this.bytes_per_event / this.event_bytes:.2f}×ev",
                f"{seed.bytes_per_event:,.0f} B = {seed.bytes_per_event / seed.event_bytes:.1f}×ev",
                ratio(this.bytes_per_event, seed.bytes_per_event),
                f"≤ 2 × event ({limit:,.0f} B)",
                this.bytes_per_event <= limit,
            )
        )
    all_runs = list(runs.values()) + list(slow.values())
    this_bad = sum(r.missing + r.duplicated for r in all_runs if r.design == "this")
    seed_bad = sum(r.missing + r.duplicated for r in all_runs if r.design == "seed")
    receipts = sum(r.events * r.clients for r in all_runs if r.design == "this")
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
    event_bytes = runs["this", clients[0]].event_bytes
    title = f"Delivery: one run of 100 events (mean {event_bytes:.0f} B), worker every 20-50 ms"
    return Section(title, rows)


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
            Row("  live event → all streams, p99", ms(streams.fanout_p99_ms)),
        ],
    )


def imports_section(imports: Imports) -> Section:
    rows = [
        Row(f"cold import, {path}", ms(value), ratio=f"{value / imports.bare_starlette:.1f}× S")
        for path, value in imports.functions.items()
    ]
    rows.append(Row("cold import, bare ASGI app (reference)", ms(imports.bare_asgi)))
    rows.append(Row("cold import, bare Starlette app (reference, S)", ms(imports.bare_starlette)))
    return Section(f"Cold import in a fresh interpreter (median of {imports.repeats})", rows)


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
