"""A headless Chromium driven over the DevTools protocol through a pipe (``--remote-debugging-pipe``):
no WebDriver, no websocket package, no port of its own.

Chromium reads NUL-terminated JSON commands on its fd 3 and writes responses and events on its fd 4.
Every wait here is bounded. Host names resolve to nothing but 127.0.0.1 and background services are off,
so the browser contacts no other address.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

#: Chromium's background traffic off; every host name but 127.0.0.1 unresolvable
FLAGS = [
    "--headless",
    "--no-sandbox",  # tests run as root
    "--disable-gpu",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication",
    "--metrics-recording-only",
    "--no-proxy-server",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    "--hide-scrollbars",
    "--remote-debugging-pipe",
]


def chromium_program() -> str | None:
    """The path of Debian's ``chromium``, or None where it is not installed."""
    return shutil.which("chromium")


class BrowserError(RuntimeError):
    """Chromium died, answered with an error, or did not answer in time."""


class Chromium:
    """One headless Chromium with one page.

    Args:
        profile: an empty directory for the browser's profile.
        size: the window's width and height in CSS pixels.
    """

    def __init__(self, profile: Path, size: tuple[int, int] = (1400, 900)) -> None:
        program = chromium_program()
        if program is None:
            raise BrowserError("chromium is not installed")
        commands_r, self._commands_w = os.pipe()
        self._events_r, events_w = os.pipe()

        def plumbing() -> None:  # in the child: its fd 3 reads commands, its fd 4 writes answers
            os.dup2(commands_r, 3)
            os.dup2(events_w, 4)

        self._process = subprocess.Popen(
            [program, *FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
             "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            # 3 and 4 kept open too: subprocess closes what pass_fds lacks after plumbing() ran
            pass_fds=(3, 4, commands_r, events_w), preexec_fn=plumbing,
        )  # fmt: skip
        os.close(commands_r)
        os.close(events_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self._session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Network", "Runtime"):
            self.page(f"{domain}.enable")
        self.resize(*size)

    def resize(self, width: int, height: int) -> None:
        """Sets the page's viewport to ``width`` x ``height`` CSS pixels (one device pixel each)."""
        self.page("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})  # fmt: skip

    def _read(self, timeout: float) -> dict[str, Any]:
        import select

        deadline = time.monotonic() + timeout
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._events_r], [], [], left)[0]:
                raise BrowserError(f"chromium did not answer within {timeout:.0f} s")
            chunk = os.read(self._events_r, 1 << 20)
            if not chunk:
                raise BrowserError(f"chromium exited (code {self._process.poll()})")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict[str, Any]:  # fmt: skip
        """Sends one DevTools command and returns its result (events that arrive meanwhile are kept)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._commands_w, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            answer = self._read(max(0.1, deadline - time.monotonic()))
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise BrowserError(f"{method}: {answer['error']}")
                return answer.get("result", {})
            self.events.append(answer)

    def page(
        self, method: str, params: dict[str, Any] | None = None, timeout: float = 30.0
    ) -> dict[str, Any]:
        """A command to the page."""
        return self.send(method, params, self._session, timeout)

    def open(self, url: str, timeout: float = 30.0) -> None:
        """Navigates to ``url`` and waits for its load event (through ``about:blank``: a change of the
        fragment alone, ``/#scalars`` to ``/#hparams``, would load nothing)."""
        self.page("Page.navigate", {"url": "about:blank"})
        self.events.clear()
        self.page("Page.navigate", {"url": url})
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            if time.monotonic() > deadline:
                raise BrowserError(f"{url} did not load within {timeout:.0f} s")
            self.events.append(self._read(max(0.1, deadline - time.monotonic())))

    def wait_idle(self, quiet: float = 1.5, timeout: float = 30.0) -> None:
        """Waits until the page has sent no request and received no answer for ``quiet`` seconds."""
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        while time.monotonic() - last < quiet:
            if time.monotonic() > deadline:
                raise BrowserError(f"the page was still loading after {timeout:.0f} s")
            try:
                event = self._read(min(quiet, max(0.1, deadline - time.monotonic())))
            except BrowserError:
                if self._process.poll() is not None:
                    raise
                continue  # nothing within the quiet time: idle
            self.events.append(event)
            if str(event.get("method", "")).startswith("Network."):
                last = time.monotonic()

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.page("Runtime.evaluate",
                           {"expression": expression, "returnByValue": True, "awaitPromise": True})  # fmt: skip
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression[:60]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0) -> Any:
        """Polls a JavaScript expression until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"{expression[:80]} still false after {timeout:.0f} s")
            time.sleep(0.25)

    def screenshot(self, path: Path, full_page: bool = False) -> Path:
        """Saves a PNG of the page (``full_page``: its whole height, not only the window)."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            metrics = self.page("Page.getLayoutMetrics")["cssContentSize"]
            params |= {"captureBeyondViewport": True,
                       "clip": {"x": 0, "y": 0, "width": metrics["width"], "height": metrics["height"], "scale": 1}}  # fmt: skip
        data = self.page("Page.captureScreenshot", params, timeout=60.0)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def requests(self) -> list[str]:
        """The URLs the page requested since the last :meth:`open`."""
        return [
            e["params"]["request"]["url"]
            for e in self.events
            if e.get("method") == "Network.requestWillBeSent"
        ]

    def failed_requests(self) -> list[dict[str, Any]]:
        """``Network.loadingFailed`` events and responses with an HTTP error since the last :meth:`open`."""
        failed = [e["params"] for e in self.events if e.get("method") == "Network.loadingFailed"]
        failed += [
            e["params"]
            for e in self.events
            if e.get("method") == "Network.responseReceived" and e["params"]["response"]["status"] >= 400
        ]
        return failed

    def close(self) -> None:
        """Ends the browser (bounded: killed after 10 s)."""
        try:
            self.send("Browser.close", timeout=5.0)
        except (BrowserError, OSError):
            pass
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)
        for fd in (self._commands_w, self._events_r):
            try:
                os.close(fd)
            except OSError:
                pass
