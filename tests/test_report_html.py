"""report.html: what it holds, and that a real browser draws it without errors.

The browser tests drive Debian's headless Chromium over the DevTools protocol. Set
LAB_REPORT_SCREENSHOT to a file path to keep the full-page screenshot for a look, and
LAB_REPORT_RUN to a run folder to check that run's report too.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lab.report.baseline import make_baseline
from lab.report.html import REPORT_FILE, render_report, write_report
from lab.report.results import Results, TimelineEvent
from lab.report.runs import load_results
from lab.report.sample import sample_results

PLOTS = {"pool", "refill", "failover", "throughput"}


@pytest.fixture(scope="module")
def run() -> Results:
    return sample_results(42, scale={"failover.kill_busy_recovery_s": 1.6})


@pytest.fixture(scope="module")
def page(run: Results) -> str:
    baseline = make_baseline([sample_results(i) for i in range(5)])
    return render_report(run, baseline=baseline)


def test_every_plot_is_inline_svg(page: str) -> None:
    names = set(re.findall(r'data-plot="([a-z]+)"', page))
    assert names == PLOTS
    assert page.count("<svg") == len(PLOTS)


def test_the_page_loads_nothing_from_anywhere(page: str) -> None:
    assert "<script" not in page
    assert "<link" not in page
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert "@import" not in page
    assert "url(http" not in page


def test_the_page_shows_metadata_gate_and_faults(page: str, run: Results) -> None:
    assert run.meta.run_id in page
    assert run.meta.scenario_hash in page
    assert "Gate: REGRESSION" in page
    assert "failover.kill_busy_recovery_s" in page
    for fault in ("killed READY worker", "killed BUSY worker", "killed the binder"):
        assert fault in page


def test_a_comparison_shows_both_runs(run: Results) -> None:
    reference = sample_results(3)

    html = render_report(run, reference=reference)

    assert f"Compared with run <strong>{reference.meta.run_id}</strong>" in html
    assert "reference" in html
    assert "+" in html and "%" in html
    assert 'data-role="cautions"' not in html


def test_a_comparison_names_what_differs_besides_the_change() -> None:
    reference = sample_results(3, binder="real", scenario_hash="aaaa", engine="kind")

    html = render_report(sample_results(4), reference=reference)

    cautions = re.search(r'<ul data-role="cautions">(.*?)</ul>', html, re.S)
    assert cautions, "no cautions on the page"
    items = re.findall(r"<li>(.*?)</li>", cautions.group(1))
    assert items == [
        "sample-3 ran the real WorkBinder, sample-4 the stand-in",
        "the two runs ran different scenarios (aaaa against 3f9c2e1a7b44)",
        "sample-3 ran on kind, sample-4 on embedded",
    ]


def test_run_data_is_escaped() -> None:
    run = sample_results(1)
    run.timeline.append(TimelineEvent(t=50, kind="fault", detail="<script>alert(1)</script> $x$"))

    html = render_report(run)

    assert "<script>alert" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_a_run_without_pool_or_throughput_still_renders() -> None:
    run = sample_results(2)
    run.pool, run.throughput_levels = [], []
    run.refill = {}

    html = render_report(run)

    assert set(re.findall(r'data-plot="([a-z]+)"', html)) == {"failover"}
    assert "No pool samples were recorded." in html
    assert "This run had no throughput phase." in html


def test_write_report_puts_report_html_in_the_run_folder(tmp_path: Path, run: Results) -> None:
    path = write_report(tmp_path, run)

    assert path == tmp_path / REPORT_FILE
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


# The browser check.

CHROMIUM = next(
    filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None
)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium not installed: `apt-get install chromium` (Debian) to run the browser check",
)

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--remote-debugging-port=0",
    "about:blank",
]

# Per plot: its size on the page and how many of its pixels are drawn (not white).
MEASURE_PLOTS = """
Array.from(document.querySelectorAll('figure[data-plot]')).map(figure => {
  const svg = figure.querySelector('svg');
  const box = svg ? svg.getBoundingClientRect() : {x: 0, y: 0, width: 0, height: 0};
  return {name: figure.dataset.plot, x: box.x + scrollX, y: box.y + scrollY,
          width: box.width, height: box.height,
          marks: svg ? svg.querySelectorAll('path, use').length : 0};
})
"""


@dataclass
class PageCheck:
    """What the browser saw while loading one page."""

    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    plots: list[dict[str, Any]] = field(default_factory=list)
    screenshot: bytes = b""


class DevTools:
    """A minimal DevTools-protocol client over one page's websocket; every wait is bounded."""

    def __init__(self, url: str, timeout: float) -> None:
        websocket = pytest.importorskip(
            "websocket", reason="websocket-client not installed: pip install -e '.[dev]'"
        )
        self.socket = websocket.create_connection(url, timeout=timeout, suppress_origin=True)
        self.timeout_error = websocket.WebSocketTimeoutException
        self.timeout = timeout
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        reply = self.receive(lambda message: message.get("id") == self.next_id, method)
        if "error" in reply:
            raise AssertionError(f"{method} failed: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    def wait_for(self, event: str) -> dict[str, Any]:
        for seen in self.events:
            if seen["method"] == event:
                return seen
        return self.receive(lambda message: message.get("method") == event, event)

    def receive(self, wanted: Any, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                last = self.events[-1]["method"] if self.events else "nothing"
                raise AssertionError(f"no {what} from chromium in {self.timeout} s; last: {last}")
            self.socket.settimeout(left)
            try:
                message: dict[str, Any] = json.loads(self.socket.recv())
            except self.timeout_error:
                continue
            if wanted(message):
                return message
            if "method" in message:
                self.events.append(message)

    def close(self) -> None:
        self.socket.close()


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[str]:
    """A headless Chromium with DevTools on a loopback port; yields its page's websocket."""
    assert CHROMIUM is not None
    profile = Path(tempfile.mkdtemp(prefix="chromium-", dir=tmp_path))
    log = (tmp_path / "chromium.log").open("wb")
    browser = subprocess.Popen(
        [CHROMIUM, *CHROMIUM_FLAGS[:-1], f"--user-data-dir={profile}", CHROMIUM_FLAGS[-1]],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield page_socket(profile, browser, tmp_path / "chromium.log", timeout=30)
    finally:
        browser.terminate()
        try:
            browser.wait(timeout=10)
        except subprocess.TimeoutExpired:
            browser.kill()
            browser.wait(timeout=10)
        log.close()


def page_socket(profile: Path, browser: subprocess.Popen[bytes], log: Path, timeout: float) -> str:
    """The websocket of Chromium's first page, once its DevTools port is announced."""
    announced = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while not announced.is_file() or not announced.read_text().strip():
        if browser.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-2000:]
            raise AssertionError(f"chromium gave no DevTools port in {timeout} s: {tail}")
        time.sleep(0.1)
    port = int(announced.read_text().split()[0])

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout) as answer:
        targets = json.load(answer)
    url: str = next(target for target in targets if target["type"] == "page")[
        "webSocketDebuggerUrl"
    ]
    return url


def check_page(socket_url: str, path: Path) -> PageCheck:
    """Load `path` in the browser; collect errors, requests, plot sizes and a screenshot."""
    tools = DevTools(socket_url, timeout=30)
    try:
        for domain in ("Runtime", "Log", "Network", "Page"):
            tools.call(f"{domain}.enable")
        tools.call(
            "Emulation.setDeviceMetricsOverride",
            width=1200,
            height=900,
            deviceScaleFactor=1,
            mobile=False,
        )
        tools.call("Page.navigate", url=path.resolve().as_uri())
        tools.wait_for("Page.loadEventFired")

        check = PageCheck()
        measured = tools.call("Runtime.evaluate", expression=MEASURE_PLOTS, returnByValue=True)
        check.plots = measured["result"]["value"]
        height = tools.call("Page.getLayoutMetrics")["cssContentSize"]["height"]
        shot = tools.call(
            "Page.captureScreenshot",
            format="png",
            captureBeyondViewport=True,
            clip={"x": 0, "y": 0, "width": 1200, "height": height, "scale": 1},
        )
        check.screenshot = base64.b64decode(shot["data"])
        check.errors, check.requests = problems(tools.events)
        return check
    finally:
        tools.close()


def problems(events: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """Console errors, uncaught exceptions and error log entries; every requested URL."""
    errors, requests = [], []
    for event in events:
        method, params = event["method"], event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            errors.append(f"console.{params['type']}: {params.get('args')}")
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            thrown = details.get("exception", {}).get("description", "")
            errors.append(f"exception: {details.get('text')} {thrown}")
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            errors.append(f"log: {params['entry'].get('text')}")
        elif method == "Network.requestWillBeSent":
            requests.append(params["request"]["url"])
    return errors, requests


def drawn_share(png: bytes, plot: dict[str, Any]) -> float:
    """The share of the plot's pixels in the screenshot that are not white."""
    image_module = pytest.importorskip("PIL.Image")
    with image_module.open(io.BytesIO(png)) as image:
        box = (
            int(plot["x"]),
            int(plot["y"]),
            int(plot["x"] + plot["width"]),
            int(plot["y"] + plot["height"]),
        )
        levels = image.convert("L").crop(box).histogram()
    return sum(levels[:245]) / max(1, sum(levels))


@needs_chromium
def test_chromium_draws_every_plot_without_errors(
    chromium: str, tmp_path: Path, run: Results
) -> None:
    baseline = make_baseline([sample_results(i) for i in range(5)])
    path = write_report(tmp_path / "run", run, baseline=baseline)

    assert_every_plot_drawn(check_page(chromium, path), path)


@needs_chromium
@pytest.mark.skipif(
    not os.environ.get("LAB_REPORT_RUN"),
    reason="set LAB_REPORT_RUN to a run folder to check its report in Chromium",
)
def test_chromium_draws_a_measured_runs_report(chromium: str, tmp_path: Path) -> None:
    # A real run's numbers (WorkBinder's, say) stretch the axes in ways samples do not.
    measured = load_results(Path(os.environ["LAB_REPORT_RUN"]))
    path = write_report(tmp_path / "run", measured)

    assert_every_plot_drawn(check_page(chromium, path), path)


def assert_every_plot_drawn(check: PageCheck, path: Path) -> None:
    if os.environ.get("LAB_REPORT_SCREENSHOT"):
        Path(os.environ["LAB_REPORT_SCREENSHOT"]).write_bytes(check.screenshot)

    assert check.errors == []
    assert check.requests == [path.resolve().as_uri()]
    assert {plot["name"] for plot in check.plots} == PLOTS
    for plot in check.plots:
        assert plot["width"] > 600, plot
        assert plot["height"] > 200, plot
        assert plot["marks"] > 20, plot
        assert drawn_share(check.screenshot, plot) > 0.02, plot


@needs_chromium
def test_the_browser_check_catches_errors_and_outside_requests(
    chromium: str, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.html"
    broken.write_text(
        "<!DOCTYPE html><html><body><figure data-plot='pool'></figure>"
        "<img src='http://127.0.0.1:9/missing.png'>"
        "<script>console.error('boom'); undefinedFunction();</script></body></html>"
    )

    check = check_page(chromium, broken)

    assert any("boom" in error for error in check.errors)
    assert any("undefinedFunction" in error for error in check.errors)
    assert "http://127.0.0.1:9/missing.png" in check.requests
    assert check.plots[0]["width"] == 0
