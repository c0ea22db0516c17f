"""Test helper: open an HTML report in headless Chromium over the DevTools protocol on a pipe, hover, zoom,
read console errors and network requests, take a screenshot.

Why this small client lives in tests/ and not Playwright: the product's ``report --screenshot`` needs no
driver (Chromium's own ``--headless --screenshot``), so only the browser test needs one, and Playwright's
Python package would add a ~40 MB wheel with a bundled Node.js driver, pinned to browser builds it expects,
to drive the system Chromium for two tests.
Why a hand-written client: ``--remote-debugging-pipe`` speaks NUL-delimited JSON on fds 3/4, so the standard
library suffices (no selenium/playwright, no websocket, no port). It records what a person would notice:
console errors, uncaught exceptions and every network request the page makes (a self-contained report
makes none), then evaluates a probe expression and captures a full-page PNG.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf_experts.reporters.screenshot import BrowserError, find_chromium

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
         "--disable-component-update", "--disable-sync", "--disable-default-apps", "--mute-audio",
         "--hide-scrollbars", "--remote-debugging-pipe"]


@dataclass
class PageResult:
    """What the page did: console messages, exceptions, network requests, the probe's value, the PNG."""

    url: str
    rendered: bool = False
    console: list[tuple[str, str]] = field(default_factory=list)  # (level, text)
    exceptions: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)  # every URL requested, the page itself included
    probe: Any = None
    png: bytes | None = None

    @property
    def errors(self) -> list[str]:
        return self.exceptions + [t for lvl, t in self.console if lvl in ("error", "assert")]

    @property
    def foreign_requests(self) -> list[str]:
        """Requests other than the page itself and inline data: what a self-contained page must not make."""
        return [u for u in self.requests if u != self.url and not u.startswith("data:")]


class _Pipe:
    """Request/response over fds 3 (to Chromium) and 4 (from Chromium); events are queued."""

    def __init__(self, write_fd: int, read_fd: int) -> None:
        self.w, self.r = os.fdopen(write_fd, "wb", buffering=0), os.fdopen(read_fd, "rb", buffering=0)
        self.q: queue.Queue[dict | None] = queue.Queue()
        self.events: list[dict] = []
        self.next_id = 0
        self.thread = threading.Thread(target=self._reader, daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Close our ends (after Chromium exited, so the reader has seen EOF)."""
        self.w.close()
        self.thread.join(timeout=5)
        self.r.close()

    def _reader(self) -> None:
        buf = b""
        while True:
            try:
                data = self.r.read(65536)
            except OSError:
                data = b""
            if not data:
                self.q.put(None)
                return
            buf += data
            *msgs, buf = buf.split(b"\0")
            for m in msgs:
                self.q.put(json.loads(m))

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self.w.write(json.dumps(msg).encode() + b"\0")
        end = time.monotonic() + timeout
        while True:
            try:
                m = self.q.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                raise BrowserError(f"chromium did not answer {method} within {timeout:.0f} s") from None
            if m is None:
                raise BrowserError(f"chromium exited while waiting for {method}")
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise BrowserError(f"chromium: {method} failed: {m['error'].get('message')}")
                return m.get("result", {})
            if "method" in m:
                self.events.append(m)

    def drain(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                m = self.q.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                return
            if m is None:
                return
            if "method" in m:
                self.events.append(m)


def render_page(html_path: str | os.PathLike[str], screenshot: bool = True, width: int = 1360,
                height: int = 900, probe: str | None = None, chromium: str | None = None,
                timeout: float = 30.0, full_page: bool = True) -> PageResult:
    """Load the file in a fresh headless Chromium profile, wait for ``body[data-rendered]``, evaluate ``probe``
    (a JS expression returning JSON) and capture a PNG of the page."""
    exe = chromium or find_chromium()
    if not exe:
        raise BrowserError("chromium not found; install it (Debian: apt-get install chromium) or set "
                           "GGUF_EXPERTS_CHROMIUM to its path")
    url = Path(html_path).resolve().as_uri()
    res = PageResult(url=url)
    to_chrome_r, to_chrome_w = os.pipe()
    from_chrome_r, from_chrome_w = os.pipe()
    for name in ("to_chrome_r", "from_chrome_w"):  # move the child's ends above 4 so 3<&X / 4>&Y cannot clash
        fd = locals()[name]
        high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(fd)
        if name == "to_chrome_r":
            to_chrome_r = high
        else:
            from_chrome_w = high

    with tempfile.TemporaryDirectory(prefix="gguf-experts-chromium-") as profile:
        # Chromium reads commands on fd 3 and writes replies on fd 4: bash places the pipe ends there
        # (dash's redirections take one-digit fds only).
        redirect = f'exec "$0" "$@" 3<&{to_chrome_r} {to_chrome_r}<&- 4>&{from_chrome_w} {from_chrome_w}>&-'
        bash = shutil.which("bash") or "/bin/bash"
        proc = subprocess.Popen([bash, "-c", redirect, exe, *FLAGS, f"--user-data-dir={profile}",
                                 f"--window-size={width},{height}", "about:blank"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                pass_fds=(to_chrome_r, from_chrome_w))
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        pipe = _Pipe(to_chrome_w, from_chrome_r)
        try:
            target = pipe.call("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
            sid = pipe.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for m in ("Runtime.enable", "Log.enable", "Network.enable", "Page.enable"):
                pipe.call(m, session=sid)
            pipe.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                             "deviceScaleFactor": 1, "mobile": False}, sid)
            pipe.call("Page.navigate", {"url": url}, sid, timeout=timeout)
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                r = pipe.call("Runtime.evaluate", {"expression": "document.readyState === 'complete' && "
                                                   "document.body && document.body.dataset.rendered === 'ok'",
                                                   "returnByValue": True}, sid)
                if r.get("result", {}).get("value") is True:
                    res.rendered = True
                    break
                pipe.drain(0.1)
            pipe.drain(0.3)
            if probe:
                r = pipe.call("Runtime.evaluate", {"expression": f"JSON.stringify({probe})",
                                                   "returnByValue": True}, sid)
                v = r.get("result", {}).get("value")
                res.probe = json.loads(v) if isinstance(v, str) else None
            if screenshot:
                params: dict[str, Any] = {"format": "png"}
                if full_page:
                    size = pipe.call("Page.getLayoutMetrics", session=sid)["cssContentSize"]
                    params.update(captureBeyondViewport=True, clip={"x": 0, "y": 0, "width": width,
                                                                    "height": int(size["height"]), "scale": 1})
                res.png = base64.b64decode(pipe.call("Page.captureScreenshot", params, sid, timeout=timeout)["data"])
            pipe.drain(0.1)
            try:
                pipe.call("Browser.close", timeout=5)
            except BrowserError:
                pass
        finally:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            pipe.close()
    for ev in pipe.events:
        p, m = ev.get("params", {}), ev.get("method")
        if m == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            res.console.append((p.get("type", ""), text))
        elif m == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            res.exceptions.append(d.get("exception", {}).get("description") or d.get("text", "exception"))
        elif m == "Log.entryAdded":
            e = p.get("entry", {})
            res.console.append((e.get("level", ""), f"{e.get('text', '')} {e.get('url', '')}".strip()))
        elif m == "Network.requestWillBeSent":
            res.requests.append(p.get("request", {}).get("url", ""))
    return res
