"""The page at `/` (public/) in a real browser, on the `make dev` host with the simulated source.

Debian's headless Chromium, driven by Playwright, clicks the prefilled form and follows the run
while every stream closes after 1 s (`STREAM_MAX_SECONDS=1`), so the page lives on the browser's
own reconnects. What each insurer's card shows is compared with the run's events as the API
stores them: nothing repeated, nothing lost, even across a reload. axe-core checks the form and a
finished run; screenshots at 1280 and 375 px go to `.artifacts/`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tools.devhost import RunningDevHost, start_devhost_process

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
AXE = ROOT / "node_modules" / "axe-core" / "axe.min.js"
ARTIFACTS = ROOT / ".artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
RUN_TIMEOUT_MS = 60_000
PROVIDERS = ["geico", "progressive", "state_farm", "allstate", "liberty_mutual"]

if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
    pytest.skip(
        f"{CHROMIUM} is missing: browser tests need Debian's `chromium` package "
        "(apt-get install -y chromium)",
        allow_module_level=True,
    )

from playwright.sync_api import Browser, Page, Request, expect, sync_playwright  # noqa: E402

# Records what the page's live region says, each time it says it.
RECORD_ANNOUNCEMENTS = """
window.announced = [];
document.addEventListener("DOMContentLoaded", () => {
  const region = document.getElementById("announcer");
  new MutationObserver(() => window.announced.push(region.textContent))
    .observe(region, {childList: true, characterData: true, subtree: true});
});
"""


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDevHost]:
    env = {
        "QUOTES_DB_PATH": str(tmp_path_factory.mktemp("page") / "quotes.sqlite3"),
        "KV_REST_API_URL": "",
        "KV_REST_API_TOKEN": "",
        "TINYFISH_API_KEY": "",
        # A run takes about 4 s: long enough to reload in the middle of one.
        "SIMULATED_DELAY_SCALE": "0.4",
        "STREAM_MAX_SECONDS": "1",
        "QUOTE_RATE_LIMIT_PER_MINUTE": "0",
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("CORS_ALLOW_ORIGINS", raising=False)
        with start_devhost_process(ROOT, instances=2, env=env) as running:
            yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.add_init_script(RECORD_ANNOUNCEMENTS)
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    yield opened
    context.close()
    assert not errors, f"the page threw: {errors}"


def stream_requests(page: Page) -> list[Request]:
    """Every request the page makes for a run's event stream, as it makes them."""
    seen: list[Request] = []
    page.on(
        "request", lambda r: seen.append(r) if r.url.split("?")[0].endswith("/stream") else None
    )
    return seen


def run_id_of(page: Page) -> str:
    return parse_qs(urlsplit(page.url).query)["run"][0]


def wait_finished(page: Page) -> None:
    page.wait_for_selector("#run[data-state=completed]", timeout=RUN_TIMEOUT_MS)


def stored_events(host: RunningDevHost, run_id: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{host.url}/api/quotes/{run_id}", params={"since": -1, "limit": 1000})
    assert response.status_code == 200, response.text
    return list(response.json()["events"])


def snapshot(host: RunningDevHost, run_id: str) -> dict[str, Any]:
    response = httpx.get(f"{host.url}/api/quotes/{run_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


def shown_cards(page: Page) -> dict[str, dict[str, Any]]:
    """Each card as shown: its status and every activity line with the event id it came from."""
    return dict(
        page.evaluate(
            """() => Object.fromEntries([...document.querySelectorAll('#cards .card')].map(
                (card) => [card.dataset.provider, {
                  status: card.dataset.status,
                  latest: card.querySelector('.card-activity').textContent,
                  log: [...card.querySelectorAll('.card-log li')].map(
                    (li) => [Number(li.dataset.eventId), li.textContent]),
                  sources: [...card.querySelectorAll('.source')].map((s) => s.textContent),
                }]))"""
        )
    )


def assert_cards_match_the_stored_run(page: Page, host: RunningDevHost, run_id: str) -> None:
    events = stored_events(host, run_id)
    assert events[-1]["type"] == "complete", events[-1]
    cards = shown_cards(page)
    assert list(cards) == events[0]["providers"]
    state = {p["provider"]: p["status"] for p in snapshot(host, run_id)["providers"]}
    for provider, card in cards.items():
        expected = [
            [e["id"], e["message"]]
            for e in events
            if e["type"] == "activity" and e["provider"] == provider
        ]
        assert card["log"] == expected, f"{provider}: shown {card['log']}, stored {expected}"
        assert card["latest"] == expected[-1][1]
        assert card["status"] == state[provider]


def assert_ranked_result(page: Page, host: RunningDevHost, run_id: str) -> None:
    stored = snapshot(host, run_id)
    assert stored["status"] == "completed"
    ranking = page.locator("#ranking > li")
    ranked = [ranking.nth(i).get_attribute("data-provider") for i in range(ranking.count())]
    assert ranked == [q["provider"] for q in stored["quotes"]], "cheapest first, as the API ranks"
    assert len(ranked) >= 1
    assert "best" in (ranking.first.get_attribute("class") or "")
    assert ranking.first.locator(".badge-best").inner_text() == "Best price"
    assert page.locator("#ranking .badge-best").count() == 1
    # `source` is on every price shown, and simulated figures say so on each one.
    prices = page.locator(".price")
    assert prices.count() == 2 * len(ranked)  # the ranking and each quoted card
    assert page.locator(".price .source-simulated").count() == prices.count()
    assert page.locator(".source-simulated").first.inner_text() == "Simulated — not a real price"
    assert page.locator("#simulated-banner").is_visible()
    assert "not real prices" in page.locator("#simulated-banner").inner_text().lower()
    assert page.locator("#run-progress").evaluate("(bar) => bar.value") == 100


def axe_violations(page: Page) -> list[dict[str, Any]]:
    if not AXE.is_file():
        pytest.fail(f"{AXE} is missing: run `npm ci` (make test does)")
    page.add_script_tag(path=str(AXE))
    result = page.evaluate("() => axe.run(document, {resultTypes: ['violations']})")
    return [
        {"id": v["id"], "help": v["help"], "nodes": [n["target"] for n in v["nodes"]]}
        for v in result["violations"]
    ]


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def test_the_form_is_served_at_the_root_prefilled_and_accessible(
    page: Page, host: RunningDevHost
) -> None:
    page.goto(f"{host.url}/")
    assert page.title() == "Compare car insurance quotes live"
    assert page.get_by_label("VIN (vehicle identification number)").input_value() == (
        "2C3CDZAG2GH967639"
    )
    assert page.get_by_label("ZIP code where the car is kept").input_value() == "94107"
    assert page.get_by_label("Date of birth").input_value() == "1990-04-12"
    labels = page.locator("#provider-choices label").all_inner_texts()
    assert [label.strip() for label in labels] == [
        "GEICO",
        "Progressive",
        "State Farm",
        "Allstate",
        "Liberty Mutual",
    ]
    assert page.locator("input[name=providers]:checked").count() == 5
    assert axe_violations(page) == []
    screenshot(page, "form-1280.png")


def test_a_click_runs_to_the_ranked_result_while_streams_close_every_second(
    page: Page, host: RunningDevHost
) -> None:
    streams = stream_requests(page)
    page.goto(f"{host.url}/")
    page.get_by_role("button", name="Compare quotes").click()
    wait_finished(page)

    run_id = run_id_of(page)
    assert_ranked_result(page, host, run_id)
    assert_cards_match_the_stored_run(page, host, run_id)
    # Streams closed every second: the browser reconnected on its own, each time with
    # Last-Event-ID, and the page never had to reopen one or say anything about it.
    assert len(streams) > 1
    assert "last-event-id" not in streams[0].all_headers()
    assert all("last-event-id" in r.all_headers() for r in streams[1:]), [
        r.all_headers() for r in streams
    ]
    assert not any("lastEventId=" in r.url for r in streams)
    assert page.locator("#connection-notice").is_hidden()
    # Announced politely: each quote and the end, never the agents' activity messages.
    expect(page.locator("#announcer")).to_contain_text("Finished: ")
    announced = " ".join(page.evaluate("window.announced"))
    assert "a month" in announced
    activity = {e["message"] for e in stored_events(host, run_id) if e["type"] == "activity"}
    assert not [message for message in activity if message in announced]

    assert axe_violations(page) == []
    screenshot(page, "finished-1280.png")
    page.set_viewport_size({"width": 375, "height": 800})
    assert page.evaluate("document.documentElement.scrollWidth") <= 375, "no sideways scrolling"
    screenshot(page, "finished-375.png")


def test_an_invalid_vin_is_shown_at_its_field(page: Page, host: RunningDevHost) -> None:
    page.goto(f"{host.url}/")
    vin = page.get_by_label("VIN (vehicle identification number)")
    vin.fill("2C3CDZAG2GH967638")  # the check digit (position 9) no longer matches
    page.get_by_role("button", name="Compare quotes").click()

    error = page.locator("#vin-error")
    error.wait_for()
    assert "check digit" in error.inner_text()
    assert vin.get_attribute("aria-invalid") == "true"
    assert "vin-error" in (vin.get_attribute("aria-describedby") or "")
    summary = page.locator("#form-problem")
    assert summary.evaluate("(box) => box === document.activeElement")
    assert summary.locator("a[href='#vin']").inner_text().startswith("VIN")
    assert page.locator("#run").is_hidden()
    assert "run" not in parse_qs(urlsplit(page.url).query)
    assert axe_violations(page) == []
