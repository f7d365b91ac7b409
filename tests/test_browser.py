"""A real browser against the real functions: headless Chromium's own `EventSource`, on a page
served from another origin, does exactly what the README tells front-end developers to do
(POST /api/quotes, then `new EventSource(api + streamUrl)`), while every stream closes itself
after 1 s (`STREAM_MAX_SECONDS=1`) so the browser must reconnect on its own with `Last-Event-ID`
onto the other instances. The page reports what it saw by POSTing it to a collector the test
runs, which also serves the page. No WebDriver: Chromium is started with the page's URL and
killed afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from tools.devhost import RunningDevHost, start_devhost_process

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
REPORT_TIMEOUT_SECONDS = 60.0
REQUEST = {
    "vin": "2C3CDZAG2GH967639",
    "zip": "94107",
    "driver": {"firstName": "Ana", "lastName": "Lee", "dateOfBirth": "1990-04-12"},
}

if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
    pytest.skip(
        f"{CHROMIUM} is missing: browser tests need Debian's `chromium` package "
        "(apt-get install -y chromium)",
        allow_module_level=True,
    )

# The page does what the README tells front-end developers to do. It reads its settings from its
# own query string and reports to `/report/<token>` on its own origin (the API is another origin).
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>quote run</title></head><body>
<script>
const params = new URLSearchParams(location.search);
const api = params.get("api");
const token = params.get("token");
let reported = false;
function report(body) {
  if (reported) return;
  reported = true;
  fetch("/report/" + token, {
    method: "POST",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify(body),
  });
}
window.onerror = (message) => report({failure: "page error: " + message});

async function followARun() {
  const started = await fetch(api + "/api/quotes", {
    method: "POST",
    headers: {"Content-Type": "application/json"},
    body: params.get("body"),
  });
  if (started.status !== 202) {
    report({failure: "POST /api/quotes answered " + started.status, body: await started.text()});
    return;
  }
  const run = await started.json();
  const location = started.headers.get("Location");
  const events = [];
  const errors = [];
  let opens = 0;
  const source = new EventSource(api + run.streamUrl);
  source.onopen = () => { opens += 1; };
  source.onerror = () => {
    errors.push(source.readyState);
    if (source.readyState === EventSource.CLOSED) {
      report({failure: "the browser gave up on the stream", runId: run.runId, events, opens,
              errors});
    }
  };
  source.onmessage = (event) => {
    const data = JSON.parse(event.data);
    events.push({lastEventId: event.lastEventId, id: data.id, type: data.type});
    if (data.type === "complete" || data.type === "error") {
      source.close();
      report({runId: run.runId, location, events, opens, errors});
    }
  };
}

function reopenAfterTheEnd() {
  const url = api + params.get("streamUrl") + "?lastEventId=" + params.get("lastEventId");
  const source = new EventSource(url);
  const errors = [];
  let opens = 0;
  let messages = 0;
  const settle = () => {
    // A CORS failure also closes an EventSource: a cross-origin fetch of the same URL tells a
    // readable 204 apart from a blocked response (which makes fetch throw).
    const seen = fetch(url).then((r) => r.status, (error) => "fetch failed: " + error);
    // Give a (wrong) reconnect or late message time to show itself before reporting.
    const pause = new Promise((resolve) => setTimeout(resolve, 1000));
    Promise.all([seen, pause]).then(([fetchStatus]) =>
      report({readyState: source.readyState, opens, messages, errors, fetchStatus}));
  };
  source.onopen = () => { opens += 1; };
  source.onmessage = () => { messages += 1; };
  source.onerror = () => {
    errors.push(source.readyState);
    if (source.readyState === EventSource.CLOSED) settle();
  };
  // If the browser never stops (a 200 that waits, or reconnects), report what it did anyway.
  setTimeout(() => {
    report({readyState: source.readyState, opens, messages, errors, timedOut: true});
    source.close();
  }, 8000);
}

if (params.get("mode") === "after") {
  reopenAfterTheEnd();
} else {
  followARun().catch((error) => report({failure: "page threw: " + error}));
}
</script>
</body></html>
"""


def readme_snippet() -> str:
    """The README's browser example, exactly as a front-end developer would copy it."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### In the browser") :]
    return section[section.index("```js\n") + 6 : section.index("```\n", section.index("```js"))]


def readme_page() -> str:
    """The README's snippet as a module script, its show… callbacks recording what it shows."""
    snippet = readme_snippet()
    assert 'const api = "http://127.0.0.1:3000";' in snippet
    snippet = snippet.replace(
        'const api = "http://127.0.0.1:3000";', 'const api = params.get("api");'
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>README example</title></head><body>
<script>
const params = new URLSearchParams(location.search);
const shown = [];
function report(body) {{
  fetch("/report/" + params.get("token"), {{method: "POST", body: JSON.stringify(body)}});
}}
window.onerror = (message) => report({{failure: "page error: " + message}});
function showActivity(provider, message) {{ shown.push(["activity", provider]); }}
function showQuote(quote) {{ shown.push(["quote", quote.provider]); }}
function showProviderError(provider, code) {{ shown.push(["provider_error", provider, code]); }}
function showProgress(percent) {{ shown.push(["progress", percent]); }}
function showResult(quotes, best) {{ report({{shown, quotes, best}}); }}
function showFailure(code, message) {{ report({{failure: "run failed: " + code}}); }}
</script>
<script type="module">
{snippet}
</script>
</body></html>
"""


class Collector:
    """Serves the page and receives reports, on 127.0.0.1 (another origin than the API)."""

    def __init__(self) -> None:
        self._reports: dict[str, queue.Queue[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                pages = {"/page": PAGE, "/readme": readme_page()}
                page = pages.get(self.path.split("?", 1)[0])
                if page is None:
                    self.send_error(404)
                    return
                body = page.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                token = self.path.removeprefix("/report/")
                length = int(self.headers.get("Content-Length", "0"))
                payload = json.loads(self.rfile.read(length) or b"{}")
                collector._queue(token).put(payload)
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _queue(self, token: str) -> queue.Queue[dict[str, Any]]:
        with self._lock:
            return self._reports.setdefault(token, queue.Queue())

    def page_url(self, token: str, page: str = "page", **params: str) -> str:
        return f"{self.url}/{page}?{urlencode({'token': token, **params})}"

    def wait_report(self, token: str, timeout: float) -> dict[str, Any] | None:
        try:
            return self._queue(token).get(timeout=timeout)
        except queue.Empty:
            return None

    def __enter__(self) -> Collector:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class Browser:
    """Headless Chromium showing one URL, in its own process group and a fresh profile."""

    def __init__(self, url: str) -> None:
        self._profile = tempfile.mkdtemp(prefix="chromium-profile-")
        self._log_path = Path(self._profile) / "chromium.log"
        self._log = self._log_path.open("wb")
        self.process = subprocess.Popen(
            [
                str(CHROMIUM),
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--enable-logging=stderr",
                f"--user-data-dir={self._profile}",
                url,
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.log = ""

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(5)
        # Chromium's helpers share its process group: make sure none outlives it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.wait(5)
        self._log.close()
        # Without a system bus Chromium logs many D-Bus errors: they are noise here.
        lines = self._log_path.read_text(errors="replace").splitlines()
        self.log = "\n".join(line for line in lines if "dbus" not in line.lower())[-4000:]
        shutil.rmtree(self._profile, ignore_errors=True)


def run_page(collector: Collector, api: Api, page: str = "page", **params: str) -> dict[str, Any]:
    """Open the page in a fresh browser; return its report (fails with the logs if none comes)."""
    token = os.urandom(8).hex()
    browser = Browser(collector.page_url(token, page, api=api.url, **params))
    try:
        report = collector.wait_report(token, REPORT_TIMEOUT_SECONDS)
        exited = browser.process.poll()
    finally:
        browser.close()
    assert report is not None, (
        f"no report from the page within {REPORT_TIMEOUT_SECONDS:g} s "
        f"(chromium exit code {exited}); chromium's log:\n{browser.log}\n"
        f"the API's output:\n{api.host.output()[-4000:]}"
    )
    assert "failure" not in report, f"{report}\nchromium's log:\n{browser.log}"
    return report


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    with Collector() as running:
        yield running


@dataclass
class Api:
    host: RunningDevHost
    early_run: dict[str, Any]  # started with the host, so it has finished when a test needs it

    @property
    def url(self) -> str:
        return self.host.url


@pytest.fixture(scope="module", params=["sqlite", "kv"])
def api(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[Api]:
    env = {
        "QUOTES_DB_PATH": str(tmp_path_factory.mktemp(request.param) / "quotes.sqlite3"),
        "KV_REST_API_URL": "",
        "KV_REST_API_TOKEN": "",
        "TINYFISH_API_KEY": "",
        "SIMULATED_DELAY_SCALE": "0.5",
        "STREAM_MAX_SECONDS": "1",
        "QUOTE_RATE_LIMIT_PER_MINUTE": "0",
        "QUOTE_RUNS_PER_DAY": "0",  # KV counters outlive a test session
        "RUN_LEASE_SECONDS": "3",
    }
    if request.param == "kv":
        server = request.getfixturevalue("upstash_server")
        env.update(KV_REST_API_URL=server.url, KV_REST_API_TOKEN=server.token)
    with pytest.MonkeyPatch.context() as patch:
        # Unset, not empty: the API's default (`*`) is what a browser on another origin meets.
        patch.delenv("CORS_ALLOW_ORIGINS", raising=False)
        with start_devhost_process(ROOT, instances=2, env=env) as running:
            started = httpx.post(f"{running.url}/api/quotes", json=REQUEST, timeout=10)
            assert started.status_code == 202, started.text
            yield Api(running, started.json())


def test_a_browser_eventsource_gets_every_event_once_across_reconnects(
    collector: Collector, api: Api
) -> None:
    report = run_page(collector, api, body=json.dumps(REQUEST))

    events = report["events"]
    ids = [e["id"] for e in events]
    assert ids == list(range(len(events))), f"gaps or repeats in {ids}"
    assert events[0]["type"] == "started"
    assert events[-1]["type"] == "complete"
    assert [e["type"] for e in events].count("complete") == 1
    mismatched = [e for e in events if e["lastEventId"] != str(e["id"])]
    assert not mismatched, f"event.lastEventId must equal data.id: {mismatched}"
    assert report["opens"] > 1, "streams close after 1 s, so the browser must have reconnected"
    # Every reconnect was the browser's own (onerror while CONNECTING), none gave up.
    assert set(report["errors"]) == {0}
    assert len(report["errors"]) == report["opens"] - 1
    assert report["location"] == f"/api/quotes/{report['runId']}", "Location must be exposed"

    with httpx.Client(base_url=api.url, timeout=10) as client:
        snapshot = client.get(f"/api/quotes/{report['runId']}").json()
    assert snapshot["status"] == "completed"
    assert snapshot["lastEventId"] == ids[-1]


def test_a_browser_reopening_a_finished_run_gets_204_and_stops(
    collector: Collector, api: Api
) -> None:
    run = api.early_run
    with httpx.Client(base_url=api.url, timeout=10) as client:
        deadline = time.monotonic() + 30
        while (snapshot := client.get(run["statusUrl"]).json())["status"] == "processing":
            assert time.monotonic() < deadline, "the run did not finish within 30 s"
            time.sleep(0.2)
        assert snapshot["status"] == "completed"
        last = snapshot["lastEventId"]
        after_end = client.get(
            run["streamUrl"], params={"lastEventId": last}, headers={"Origin": collector.url}
        )
        assert after_end.status_code == 204
        assert after_end.headers.get("access-control-allow-origin") == "*"

    report = run_page(
        collector, api, mode="after", streamUrl=run["streamUrl"], lastEventId=str(last)
    )

    assert report == {
        "readyState": 2,
        "opens": 0,
        "messages": 0,
        "errors": [2],
        "fetchStatus": 204,
    }


def test_the_readme_browser_example_runs_as_written(collector: Collector, api: Api) -> None:
    report = run_page(collector, api, page="readme")
    shown = report["shown"]
    percents = [entry[1] for entry in shown if entry[0] == "progress"]
    assert percents == sorted(percents)
    assert percents[-1] == 100
    quoted = [entry[1] for entry in shown if entry[0] == "quote"]
    assert len(quoted) == len(report["quotes"]) >= 1
    assert report["best"] == report["quotes"][0]["provider"]
    assert sum(entry[0] == "activity" for entry in shown) >= 5
