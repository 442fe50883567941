"""A minimal headless-Chromium driver over the DevTools protocol on a pipe (stdlib only).

Used by the browser test of the HTML report and by ``python tests/views/chromium_cdp.py REPORT
PNG`` (the README screenshot). Chromium is started with ``--remote-debugging-pipe``: it reads protocol
commands from fd 3 and writes replies and events to fd 4, each a JSON object ended by a NUL
byte — no websocket client, no port, nothing but the stdlib. The page's console errors,
uncaught exceptions, log errors (CSP violations, failed loads), JavaScript dialogs and every
network request are recorded while it loads.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
         "--remote-debugging-pipe")
INSTALL = "apt-get install -y chromium (make test does this)"


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None)
        if path:
            return path
    return None


@dataclass
class PageReport:
    """What happened while a page loaded."""

    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)


def _high(fd: int) -> int:
    """Move ``fd`` above 9 (close-on-exec) so dup2 onto 3 and 4 cannot clobber it."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


class Chromium:
    """One headless Chromium process; use as a context manager."""

    def __init__(self, executable: str, *, timeout_s: float = 30.0) -> None:
        self.timeout_s, self.next_id, self.pending = timeout_s, 0, []  # type: list[dict[str, Any]]
        self.profile = tempfile.mkdtemp(prefix="autopar-chromium-")
        to_chrome_r, self.to_chrome = map(_high, os.pipe())
        self.from_chrome, from_chrome_w = map(_high, os.pipe())
        self.log = Path(self.profile) / "chromium.log"
        actions = [(os.POSIX_SPAWN_DUP2, to_chrome_r, 3), (os.POSIX_SPAWN_DUP2, from_chrome_w, 4),
                   (os.POSIX_SPAWN_OPEN, 1, str(self.log), os.O_WRONLY | os.O_CREAT, 0o644),
                   (os.POSIX_SPAWN_DUP2, 1, 2), (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)]
        argv = [executable, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"]
        self.pid = os.posix_spawn(executable, argv, os.environ, file_actions=actions, setsid=True)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.buffer = b""

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (OSError, TimeoutError, RuntimeError):
            pass
        deadline, exited = time.monotonic() + 5, False
        while not exited and time.monotonic() < deadline:
            exited = os.waitpid(self.pid, os.WNOHANG) != (0, 0)
            time.sleep(0 if exited else 0.05)
        try:
            os.killpg(self.pid, signal.SIGKILL)  # its own session: leftover renderers and zygote
        except ProcessLookupError:
            pass
        if not exited:
            os.waitpid(self.pid, 0)
        for fd in (self.to_chrome, self.from_chrome):
            os.close(fd)
        shutil.rmtree(self.profile, ignore_errors=True)

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.from_chrome], [], [], left)[0]:
                log = self.log.read_text()[-500:]
                raise TimeoutError(f"Chromium sent nothing for {self.timeout_s} s; log: {log}")
            chunk = os.read(self.from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium closed the pipe; log: {self.log.read_text()[-500:]}")
            self.buffer += chunk
        message, _, self.buffer = self.buffer.partition(b"\0")
        return json.loads(message)

    def send(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        """Send one command and return its result; events that arrive meanwhile are kept."""
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self.to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout_s
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.pending.append(reply)

    def wait_for(self, method: str, session: str | None = None) -> dict[str, Any]:
        """The next ``method`` event; JavaScript dialogs are recorded and dismissed meanwhile
        (an open ``alert`` would block the page's load forever)."""
        deadline = time.monotonic() + self.timeout_s
        for index, event in enumerate(self.pending):
            if event.get("method") == method:
                return self.pending.pop(index)
        while True:
            event = self._read(deadline)
            self.pending.append(event)
            if event.get("method") == "Page.javascriptDialogOpening":
                self.send("Page.handleJavaScriptDialog", session, accept=True)
            if event.get("method") == method:
                return self.pending.pop()

    def open(self, url: str, *, width: int = 1280, height: int = 900) -> tuple[str, PageReport]:
        """Load ``url`` in a new tab; return the tab's session and what happened while loading."""
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session)
        self.send("Emulation.setDeviceMetricsOverride", session, width=width, height=height,
                  deviceScaleFactor=1, mobile=False)
        self.pending.clear()
        self.send("Page.navigate", session, url=url)
        self.wait_for("Page.loadEventFired", session)
        self.evaluate(session, "new Promise(r => requestAnimationFrame(() => setTimeout(r, 50)))")
        return session, self._report()

    def _report(self) -> PageReport:
        report = PageReport()
        for event in self.pending:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert", "warning"):
                report.errors.append("console: " + " ".join(str(a.get("value", a.get("description")))
                                                            for a in params.get("args", [])))
            elif method == "Runtime.exceptionThrown":
                report.errors.append("exception: " + json.dumps(params.get("exceptionDetails", {}))[:500])
            elif method == "Log.entryAdded" and params["entry"].get("level") in ("error", "warning"):
                report.errors.append(f"log: {params['entry'].get('text')}")
            elif method == "Network.requestWillBeSent":
                report.requests.append(params["request"]["url"])
            elif method == "Page.javascriptDialogOpening":
                report.dialogs.append(params.get("message", ""))
        return report

    def evaluate(self, session: str, expression: str) -> Any:
        result = self.send("Runtime.evaluate", session, expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"evaluating {expression[:80]!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, session: str, path: Path, *, max_height: int = 4000) -> tuple[int, int]:
        """A PNG of the page's full width and up to ``max_height`` CSS pixels of its height."""
        size = self.send("Page.getLayoutMetrics", session)["cssContentSize"]
        width, height = int(size["width"]), min(int(size["height"]), max_height)
        data = self.send("Page.captureScreenshot", session, format="png", captureBeyondViewport=True,
                         clip={"x": 0, "y": 0, "width": width, "height": height, "scale": 1})["data"]
        path.write_bytes(base64.b64decode(data))
        return width, height


def ensure_installed() -> str | None:
    """Chromium's path, installing Debian's package when running as root and it is missing."""
    found = find_chromium()
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    for command in (["apt-get", "install", "-y", "-q", "chromium"], ["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "chromium"]):
        subprocess.run(command, capture_output=True, timeout=900, check=False)
        if find_chromium():
            break
    return find_chromium()


def main(argv: list[str]) -> int:
    """``python tests/views/chromium_cdp.py REPORT.html OUT.png [MAX_HEIGHT]``: a screenshot."""
    executable = ensure_installed()
    if executable is None:
        print(f"no chromium; {INSTALL}", file=sys.stderr)
        return 2
    with Chromium(executable) as browser:
        session, report = browser.open(Path(argv[0]).resolve().as_uri())
        limit = int(argv[2]) if argv[2:] else 4000
        width, height = browser.screenshot(session, Path(argv[1]), max_height=limit)
    print(f"{argv[1]}: {width}×{height}; errors {report.errors}; requests {report.requests}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
