"""GET /dashboard in a real headless Chromium (Debian's chromium and
chromium-driver, driven by selenium) against the built binary under load."""

import json
import os
import struct
import threading
import urllib.request
import zlib
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

from conftest import ROOT

CHROMIUM = os.environ.get("CHROMIUM_BIN", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER_BIN", "/usr/bin/chromedriver")
ARTIFACTS = Path(os.environ.get("ARTIFACTS_DIR", ROOT / ".build-artifacts"))

WORKERS = 4
CAPACITY = 8
REQUESTERS = 12  # concurrent sleep jobs: at most this many pending in all


@pytest.fixture
def browser():
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            pytest.fail(f"{path} is missing: apt-get install chromium chromium-driver")
    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1120"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


class Load:
    """Requesters in a closed loop, each posting 300 ms sleep jobs until stopped."""

    def __init__(self, url, requesters):
        self.url = url
        self.stopped = threading.Event()
        self.answers = []
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(requesters)]
        for thread in self.threads:
            thread.start()

    def run(self):
        body = json.dumps({"op": "sleep", "ms": 300}).encode()
        while not self.stopped.is_set():
            request = urllib.request.Request(self.url, data=body, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    self.answers.append(response.status)
            except Exception as error:  # recorded, and the test fails on it
                self.answers.append(repr(error))

    def stop(self):
        self.stopped.set()
        for thread in self.threads:
            thread.join(timeout=30)


BARS_AND_SNAPSHOT = """
return {
  stats: window.lastStats,
  renders: window.renderCount,
  bars: [...document.querySelectorAll('.bar[data-pool="jobs"]')].map((bar) => ({
    id: Number(bar.dataset.workerId),
    pending: Number(bar.dataset.pending),
    capacity: Number(bar.dataset.capacity),
    shown: bar.querySelector(".value").textContent,
    height: bar.querySelector(".fill").style.height,
  })),
};
"""


def test_dashboard_bars_match_stats_under_load(balancer_factory, browser):
    server = balancer_factory("--workers", str(WORKERS), "--capacity", str(CAPACITY))
    load = Load(server.url("/jobs"), REQUESTERS)
    try:
        browser.get(server.url("/dashboard"))
        # A render of a snapshot taken under load, after the first one (so
        # throughput has two snapshots to compare).
        WebDriverWait(browser, 20, poll_frequency=0.1).until(
            lambda driver: driver.execute_script(
                "return window.renderCount >= 2 && window.lastStats.totals.in_flight > 0"
            )
        )
        # One script run: the bars and window.lastStats of the same render.
        page = browser.execute_script(BARS_AND_SNAPSHOT)
        independent = server.stats()
        screenshot = ARTIFACTS / "dashboard.png"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(screenshot))
        print(f"dashboard screenshot: {screenshot}")
    finally:
        load.stop()

    stats = page["stats"]
    assert len(page["bars"]) == len(stats["workers"]) == WORKERS
    for bar, worker in zip(page["bars"], stats["workers"]):
        assert bar["id"] == worker["id"]
        assert bar["pending"] == worker["pending"]
        assert bar["shown"] == str(worker["pending"])
        assert bar["capacity"] == stats["capacity"] == CAPACITY
        assert bar["height"] == f"{min(1, worker['pending'] / CAPACITY) * 100:.1f}%"
    rendered_pending = sum(bar["pending"] for bar in page["bars"])
    assert 0 < rendered_pending <= REQUESTERS

    # The page's snapshot and an independent /stats fetch describe the same
    # pool; pendings moved between them, but only within what the requesters
    # can have in flight.
    assert [w["id"] for w in independent["workers"]] == [bar["id"] for bar in page["bars"]]
    for worker in independent["workers"]:
        assert 0 <= worker["pending"] <= min(CAPACITY, REQUESTERS)
    assert sum(w["pending"] for w in independent["workers"]) <= REQUESTERS
    assert independent["totals"]["submitted"] >= stats["totals"]["submitted"]
    assert independent["totals"]["failed"] == 0
    assert set(load.answers) <= {200}

    width, height, distinct = png_summary(screenshot.read_bytes())
    assert width >= 800 and height >= 600
    assert distinct >= 16, "the screenshot is (nearly) one colour"


def test_dashboard_shows_each_upstream_pool(balancer_factory, browser):
    backend = balancer_factory("--workers", "2")
    proxy = balancer_factory("--upstream", backend.url(""), "--connections-per-upstream", "3")
    browser.get(proxy.url("/dashboard"))
    WebDriverWait(browser, 20, poll_frequency=0.1).until(
        lambda driver: driver.execute_script("return window.renderCount >= 1")
    )
    page = browser.execute_script(
        """return {
          stats: window.lastStats,
          panels: [...document.querySelectorAll('#pools .panel')].map((panel) => panel.dataset.pool),
          bars: [...document.querySelectorAll('.bar[data-pool="upstream"]')].map((bar) => Number(bar.dataset.workerId)),
        };"""
    )
    pools = page["stats"]["pools"]
    assert page["panels"] == [pool["name"] for pool in pools] == ["upstream"]
    assert page["bars"] == [w["id"] for w in pools[0]["workers"]]
    assert len(page["bars"]) == 3


def png_summary(data):
    """(width, height, distinct byte values in the filtered pixel rows) of a PNG,
    checking its signature, every chunk's CRC and the pixel data's size."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    offset, chunks = 8, {}
    idat = b""
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        body = data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind!r}"
        chunks.setdefault(kind, body)
        if kind == b"IDAT":
            idat += body
        offset += 12 + length
        if kind == b"IEND":
            break
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    pixels = zlib.decompress(idat)
    assert depth == 8
    assert len(pixels) == height * (1 + width * channels), "pixel data does not match the header"
    return width, height, len(set(pixels))
