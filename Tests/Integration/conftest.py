"""Shared fixtures: a running `balancer serve` from the built binary."""

import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BALANCER_BIN = os.environ.get("BALANCER_BIN", str(ROOT / ".build" / "debug" / "balancer"))


class Balancer:
    """A `balancer serve` process on 127.0.0.1 and a free port."""

    def __init__(self, *arguments):
        if not os.access(BALANCER_BIN, os.X_OK):
            pytest.fail(f"no balancer binary at {BALANCER_BIN}: run swift build, or set BALANCER_BIN")
        environment = {k: v for k, v in os.environ.items() if not k.startswith("BALANCER_")}
        self.process = subprocess.Popen(
            [BALANCER_BIN, "serve", "--port", "0", *arguments],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
        )
        self.port = None
        deadline = time.monotonic() + 20
        # The server logs `listening address=127.0.0.1:PORT` on stderr once bound.
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line:
                break
            match = re.search(r"address=[^ ]*:(\d+)", line)
            if "listening" in line and match:
                self.port = int(match.group(1))
                break
        if self.port is None:
            self.stop()
            pytest.fail("balancer serve did not start")

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path):
        """(status, headers, body text)"""
        return self.request("GET", path)

    def request(self, method, path, body=None):
        data = body.encode() if isinstance(body, str) else body
        req = urllib.request.Request(self.url(path), data=data, method=method)
        try:
            with urllib.request.urlopen(req, timeout=20) as response:
                return response.status, response.headers, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.headers, error.read().decode()

    def job(self, job):
        status, _, body = self.request("POST", "/jobs", json.dumps(job))
        return status, json.loads(body)

    def stats(self):
        status, _, body = self.get("/stats")
        assert status == 200
        return json.loads(body)

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stderr.close()


@pytest.fixture
def balancer_factory():
    """Starts balancers with the given flags; stops them all after the test."""
    started = []

    def start(*arguments):
        server = Balancer(*arguments)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def eventually(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()
