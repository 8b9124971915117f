"""Fixtures for the rendering tests: a report of the tiny run, and headless Debian chromium.

Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: commands
on fd 3, replies and events on fd 4, each a JSON message ended by NUL), so no websocket
client or other package is needed.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import torch

from protoquant.explain.explanation import build_report
from protoquant.explain.gallery import build_gallery
from protoquant.render import write_report

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--no-first-run",
    "--hide-scrollbars",
    "--remote-debugging-pipe",
)
TIMEOUT = 30.0  # seconds for any one DevTools reply
SETTLE = 0.5  # seconds to keep collecting events after the page and its images loaded
REPORT_IMAGES = 2  # test images in the fixture report


@pytest.fixture(scope="session")
def tiny_report(tiny_run):
    """A Report of the tiny run: its gallery and REPORT_IMAGES explained test images."""
    result = tiny_run.result
    gallery = build_gallery(result.model, result.caches.train_plain, top_k=3, dataset=result.splits.train)
    images = [(f"test #{i}", result.splits.test.load_image(i)) for i in range(REPORT_IMAGES)]
    return build_report(result.model, images, gallery, metrics=result.metrics, top_prototypes=4)


def _forbidden(self, *args, **kwargs):
    raise AssertionError(f"{type(self).__name__} ran while rendering")


@pytest.fixture(scope="session")
def report_dir(tiny_report, tmp_path_factory) -> Path:
    """The HTML report of `tiny_report`, written once, while every nn.Module call raises
    (so writing the report provably runs no model: no backbone, head or ProtoQuant forward)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.Module, "__call__", _forbidden)
        return write_report(tiny_report, tmp_path_factory.mktemp("report") / "report").parent


@pytest.fixture
def no_model(monkeypatch):
    """Any nn.Module call (backbone, head, model) fails while the test runs."""
    monkeypatch.setattr(torch.nn.Module, "__call__", _forbidden)


@dataclass(frozen=True)
class PageCheck:
    """What a page did in the browser."""

    url: str
    images: list  # [src, naturalWidth, complete] of every <img>
    requests: list[str]  # every URL the page requested
    errors: list[str]  # console errors, uncaught exceptions, browser log errors
    overflow: int  # document width beyond the viewport, px (0: no horizontal scrolling)
    screenshot: Path


def find_problems(check: PageCheck, root: Path) -> list[str]:
    """Everything wrong with a page: broken images, console errors, requests leaving `root`."""
    found = [f"image did not load: {src}" for src, width, _ in check.images if not width]
    found += [f"console error: {text}" for text in check.errors]
    for url in check.requests:
        parsed = urlparse(url)
        local = parsed.scheme == "file" and Path(unquote(parsed.path)).resolve().is_relative_to(
            root.resolve()
        )
        if not (local or parsed.scheme in ("data", "about")):
            found.append(f"request outside the report: {url}")
    return found


class Chromium:
    """One headless chromium process and its DevTools pipe."""

    def __init__(self, profile: Path):
        to_browser, from_us = os.pipe()  # chromium reads commands on fd 3
        to_us, from_browser = os.pipe()  # and writes replies on fd 4

        def wire() -> None:  # in the child, before exec: our pipe ends become fds 3 and 4
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser, from_browser)]
            os.dup2(high[0], 3)  # dup2 makes 3 and 4 inheritable; every other fd is close-on-exec
            os.dup2(high[1], 4)

        self.process = subprocess.Popen(
            [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=wire,
            close_fds=False,  # keep the fds 3 and 4 `wire` made (Python's own fds are close-on-exec)
        )
        os.close(to_browser)
        os.close(from_browser)
        self.write_fd, self.read_fd = from_us, to_us
        self.events: list[dict] = []
        self._buffer, self._id = b"", 0

    def _message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self.read_fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError("chromium sent nothing in time")
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium closed the DevTools pipe (exit code {self.process.poll()})")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT
        while True:
            reply = self._message(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, session: str) -> dict:
        deadline = time.monotonic() + TIMEOUT
        for event in self.events:
            if event.get("method") == method and event.get("sessionId") == session:
                return event
        while True:
            event = self._message(deadline)
            self.events.append(event)
            if event.get("method") == method and event.get("sessionId") == session:
                return event

    def settle(self, seconds: float) -> None:
        """Keep collecting events for `seconds` (late requests, late console messages)."""
        deadline = time.monotonic() + seconds
        try:
            while True:
                self.events.append(self._message(deadline))
        except TimeoutError:
            return

    def evaluate(self, expression: str, session: str):
        result = self.send(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
            session,
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self.write_fd)
        os.close(self.read_fd)


ALL_IMAGES_SETTLED = """Promise.all(Array.from(document.images).map(img => img.complete ? null :
  new Promise(done => { img.addEventListener('load', done); img.addEventListener('error', done); })))
  .then(() => JSON.stringify({
    images: Array.from(document.images).map(img => [img.getAttribute('src'), img.naturalWidth, img.complete]),
    overflow: Math.max(0, document.documentElement.scrollWidth - window.innerWidth)}))"""


def _errors(events: list[dict], session: str) -> list[str]:
    out = []
    for event in (e for e in events if e.get("sessionId") == session):
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            out.append(
                " ".join(str(arg.get("value", arg.get("description"))) for arg in params.get("args", []))
            )
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            out.append(details.get("exception", {}).get("description") or details.get("text", "exception"))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            out.append(params["entry"].get("text", ""))
    return out


def check_page(
    browser: Chromium, url: str, screenshot: Path, width: int = 1280, height: int = 900
) -> PageCheck:
    """Open `url` in a fresh tab of `width` x `height`, wait for every image, screenshot the full page."""
    target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Page", "Network", "Runtime", "Log"):
        browser.send(f"{domain}.enable", session=session)
    metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600}
    browser.send("Emulation.setDeviceMetricsOverride", metrics, session)
    navigation = browser.send("Page.navigate", {"url": url}, session)
    if navigation.get("errorText"):
        raise RuntimeError(f"{url}: {navigation['errorText']}")
    browser.wait_for("Page.loadEventFired", session)
    state = json.loads(browser.evaluate(ALL_IMAGES_SETTLED, session))
    browser.settle(SETTLE)
    size = browser.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": width, "height": max(height, int(size["height"])), "scale": 1}
    shot = browser.send(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}, session
    )
    screenshot.write_bytes(base64.b64decode(shot["data"]))
    browser.send("Target.closeTarget", {"targetId": target})
    requests = [
        e["params"]["request"]["url"]
        for e in browser.events
        if e.get("method") == "Network.requestWillBeSent" and e.get("sessionId") == session
    ]
    return PageCheck(
        url, state["images"], requests, _errors(browser.events, session), state["overflow"], screenshot
    )


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless chromium for the module; the tests skip where Debian chromium is not installed."""
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not found (CI installs Debian chromium: apt-get install chromium)")
    profile = tmp_path_factory.mktemp("chromium-profile")
    chromium = Chromium(profile)
    try:
        chromium.send("Browser.getVersion")
        yield chromium
    finally:
        chromium.close()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def open_page(browser):
    """`open_page(url, screenshot, width=1280, height=900) -> PageCheck` in the module's chromium."""

    def run(url: str, screenshot: Path, width: int = 1280, height: int = 900) -> PageCheck:
        return check_page(browser, url, screenshot, width, height)

    return run


@pytest.fixture(scope="session")
def problems():
    """`problems(check, root) -> list[str]`: broken images, console errors, requests leaving `root`."""
    return find_problems
