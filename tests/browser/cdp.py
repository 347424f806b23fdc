"""Drive the system's headless Chromium over the DevTools protocol (CDP), with nothing but websocket-client.

No browser is downloaded: ``find_chromium()`` looks for Debian's ``chromium`` (or ``$CHROMIUM_BIN``).
``Chromium`` starts it on a fresh profile with a DevTools port on 127.0.0.1 and opens pages;
``Page`` sends commands, collects events (console messages, uncaught exceptions) and has the few
helpers the browser tests need: evaluate JavaScript, wait for a condition, click, screenshot.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import websocket

# The flags that work here (2 cores, no GPU, no network but loopback): no sandbox (root in a container),
# no GPU process, nothing that phones home, and a fresh profile every time.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-breakpad",
    "--disable-crash-reporter",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--mute-audio",
    "--hide-scrollbars",
    "--remote-allow-origins=*",
)
_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
_PROXY_VARIABLES = frozenset({"http_proxy", "https_proxy", "all_proxy", "no_proxy"})
_DEVTOOLS_LINE = re.compile(r"DevTools listening on (ws://\S+)")


class BrowserError(RuntimeError):
    """The browser did not start, a command failed, or a wait timed out."""


class JavaScriptError(BrowserError):
    """A script run in the page threw."""


def find_chromium() -> str | None:
    """Path of the system Chromium: $CHROMIUM_BIN if set, else the first of the usual names on PATH."""
    configured = os.environ.get("CHROMIUM_BIN")
    if configured:
        return configured if Path(configured).is_file() else None
    for name in _CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _die_with_parent() -> None:
    """In the child before exec: Linux sends SIGTERM to the browser if the test process dies."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


class _Connection:
    """One DevTools websocket: numbered commands answered in order of arrival, events kept in a list."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        self._socket = websocket.create_connection(url, timeout=timeout, suppress_origin=True,
                                                   enable_multithread=True)
        # The timeout was for the handshake only: a quiet page must not end the reader thread.
        self._socket.settimeout(None)
        self._ids = itertools.count(1)
        self._answers: dict[int, dict] = {}
        self._lock = threading.Condition()
        self.events: list[dict] = []
        self._listeners: list[Callable[[dict], None]] = []
        self._closed = False
        self._reader = threading.Thread(target=self._read, name="cdp-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                raw = self._socket.recv()
            except (websocket.WebSocketException, OSError):
                break
            if not raw:
                continue
            message = json.loads(raw)
            with self._lock:
                if "id" in message:
                    self._answers[message["id"]] = message
                else:
                    self.events.append(message)
                    for listener in list(self._listeners):
                        listener(message)
                self._lock.notify_all()
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    def add_listener(self, listener: Callable[[dict], None]) -> None:
        with self._lock:
            self._listeners.append(listener)

    def post(self, method: str, params: dict | None = None, *, session_id: str | None = None) -> int:
        """Send a command without waiting for its answer (safe from an event listener)."""
        command_id = next(self._ids)
        message: dict[str, Any] = {"id": command_id, "method": method, "params": params or {}}
        if session_id:
            message["sessionId"] = session_id
        self._socket.send(json.dumps(message))
        return command_id

    def send(self, method: str, params: dict | None = None, *, session_id: str | None = None,
             timeout: float = 30.0) -> dict:
        command_id = self.post(method, params, session_id=session_id)
        deadline = time.monotonic() + timeout
        with self._lock:
            while command_id not in self._answers:
                if self._closed:
                    raise BrowserError(f"the browser closed the connection during {method}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BrowserError(f"no answer to {method} within {timeout:.0f} s")
                self._lock.wait(remaining)
            answer = self._answers.pop(command_id)
        if "error" in answer:
            raise BrowserError(f"{method} failed: {answer['error']}")
        return answer.get("result", {})

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(Exception):
            self._socket.close()


class Page:
    """One tab. Console messages, uncaught exceptions, answered dialogs and the responses it received are
    kept in ``console``, ``exceptions``, ``dialogs`` and ``responses``."""

    def __init__(self, connection: _Connection, session_id: str, target_id: str) -> None:
        self._connection = connection
        self.session_id = session_id
        self.target_id = target_id
        self.console: list[str] = []
        self.exceptions: list[str] = []
        self.dialogs: list[str] = []
        self.responses: list[tuple[str, int]] = []  # (url, HTTP status) of every response the page got
        connection.add_listener(self._on_event)
        for domain in ("Page", "Runtime", "Network"):
            self.send(f"{domain}.enable")

    def _on_event(self, event: dict) -> None:
        if event.get("sessionId") != self.session_id:
            return
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(arg.get("value", arg.get("description", ""))) for arg in params.get("args", []))
            self.console.append(f"[{params.get('type')}] {text}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.exceptions.append(details.get("exception", {}).get("description") or details.get("text", ""))
        elif method == "Network.responseReceived":
            response = params.get("response", {})
            self.responses.append((response.get("url", ""), response.get("status", 0)))
        elif method == "Page.javascriptDialogOpening":
            # alert/confirm/"Leave site?" would block the page (and navigation) until answered.
            self.dialogs.append(f"{params.get('type')}: {params.get('message')}")
            self._connection.post("Page.handleJavaScriptDialog", {"accept": True}, session_id=self.session_id)

    def send(self, method: str, params: dict | None = None, timeout: float = 30.0) -> dict:
        return self._connection.send(method, params, session_id=self.session_id, timeout=timeout)

    # -- navigation and scripts --------------------------------------------------------------

    def add_init_script(self, source: str) -> None:
        """Run this script in every document the page loads, before the page's own scripts."""
        self.send("Page.addScriptToEvaluateOnNewDocument", {"source": source})

    def drop_files(self, x: float, y: float, paths: Sequence[Path | str]) -> None:
        """Drag files from the desktop and drop them at (x, y), as the operating system does."""
        data = {"items": [], "files": [str(Path(p).resolve()) for p in paths], "dragOperationsMask": 1}
        for kind in ("dragEnter", "dragOver", "drop"):
            self.send("Input.dispatchDragEvent", {"type": kind, "x": x, "y": y, "data": data})

    def set_viewport(self, width: int, height: int) -> None:
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def goto(self, url: str) -> None:
        """Navigate; returns once the navigation was committed (wait for the app with wait_for)."""
        answer = self.send("Page.navigate", {"url": url})
        if answer.get("errorText"):
            raise BrowserError(f"navigation to {url} failed: {answer['errorText']}")

    def evaluate(self, expression: str, *, timeout: float = 30.0) -> Any:
        """Run an expression (promises are awaited) and return its JSON value."""
        answer = self.send("Runtime.evaluate", {
            "expression": expression, "awaitPromise": True, "returnByValue": True, "userGesture": True,
        }, timeout=timeout)
        if "exceptionDetails" in answer:
            details = answer["exceptionDetails"]
            description = details.get("exception", {}).get("description") or details.get("text")
            raise JavaScriptError(f"{description}\n--- in ---\n{expression[:400]}")
        return answer.get("result", {}).get("value")

    def wait_for(self, expression: str, *, timeout: float = 30.0, interval: float = 0.1,
                 message: str | None = None) -> Any:
        """Evaluate until the value is truthy; return it. Errors while evaluating count as not yet."""
        deadline = time.monotonic() + timeout
        last_error = None
        while True:
            try:
                value = self.evaluate(expression)
                if value:
                    return value
            except JavaScriptError as error:
                last_error = error
            if time.monotonic() > deadline:
                raise BrowserError(
                    f"{message or 'condition'} not met within {timeout:.0f} s: {expression[:300]}"
                    + (f"\nlast error: {last_error}" if last_error else "")
                )
            time.sleep(interval)

    # -- input --------------------------------------------------------------------------------

    def click_at(self, x: float, y: float) -> None:
        """A real mouse click (press and release of the left button) at viewport coordinates."""
        self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent",
                      {"type": kind, "x": x, "y": y, "button": "left", "buttons": 1, "clickCount": 1})

    def click(self, selector_js: str, *, timeout: float = 10.0, what: str | None = None) -> None:
        """Click the middle of the element an expression returns, once it is visible and has stopped
        moving (dialogs open with an animation; a click during it lands elsewhere)."""
        locate = f"""(() => {{ const el = ({selector_js});
            if (!el) return null;
            el.scrollIntoView({{block: 'nearest', inline: 'nearest'}});
            const r = el.getBoundingClientRect();
            return r.width > 0 && r.height > 0 ? [r.x, r.y, r.width, r.height] : null; }})()"""
        deadline = time.monotonic() + timeout
        previous = None
        while True:
            box = self.wait_for(locate, timeout=max(0.1, deadline - time.monotonic()),
                                message=f"a visible {what or selector_js}")
            if box == previous:
                break
            previous = box
            time.sleep(0.12)
        x, y, width, height = box
        self.click_at(x + width / 2, y + height / 2)

    def drag(self, start: tuple[float, float], end: tuple[float, float], steps: int = 8) -> None:
        """Press the left button at start, move to end in steps, release."""
        (x0, y0), (x1, y1) = start, end
        self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x0, "y": y0})
        self.send("Input.dispatchMouseEvent",
                  {"type": "mousePressed", "x": x0, "y": y0, "button": "left", "buttons": 1, "clickCount": 1})
        for i in range(1, steps + 1):
            x, y = x0 + (x1 - x0) * i / steps, y0 + (y1 - y0) * i / steps
            self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y, "button": "left", "buttons": 1})
        self.send("Input.dispatchMouseEvent",
                  {"type": "mouseReleased", "x": x1, "y": y1, "button": "left", "buttons": 1, "clickCount": 1})

    def press_key(self, key: str, code: str, key_code: int) -> None:
        for kind in ("keyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent",
                      {"type": kind, "key": key, "code": code, "windowsVirtualKeyCode": key_code})

    # -- pictures -----------------------------------------------------------------------------

    def screenshot(self, path: Path, clip: dict | None = None) -> Path:
        """Save a PNG of the viewport, or of clip {x, y, width, height} (CSS pixels)."""
        params: dict[str, Any] = {"format": "png"}
        if clip:
            params["clip"] = {**clip, "scale": 1}
        data = self.send("Page.captureScreenshot", params, timeout=60)["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path


class Chromium:
    """A headless Chromium process on a fresh profile; ``new_page()`` opens tabs. Use as a context manager."""

    def __init__(self, binary: str, *, extra_flags: Sequence[str] = (), start_timeout: float = 30.0) -> None:
        self.binary = binary
        self.extra_flags = tuple(extra_flags)
        self.start_timeout = start_timeout
        self.profile_dir: Path | None = None
        self.log_path: Path | None = None
        self._process: subprocess.Popen | None = None
        self._connection: _Connection | None = None
        self._pages: list[Page] = []

    def __enter__(self) -> Chromium:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> Chromium:
        self.profile_dir = Path(tempfile.mkdtemp(prefix="chromium-profile-"))
        self.log_path = self.profile_dir / "chromium.log"
        cmd = [self.binary, *CHROMIUM_FLAGS, *self.extra_flags, f"--user-data-dir={self.profile_dir}",
               "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "about:blank"]
        # A home of its own: nothing of the developer's profile, caches or crash reports is read or written.
        env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARIABLES}
        env.update(HOME=str(self.profile_dir), XDG_CONFIG_HOME=str(self.profile_dir / "config"),
                   XDG_CACHE_HOME=str(self.profile_dir / "cache"))
        log = open(self.log_path, "wb")
        try:
            self._process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                             start_new_session=True, preexec_fn=_die_with_parent)
        finally:
            log.close()
        url = self._wait_for_devtools_url()
        self._connection = _Connection(url)
        return self

    def _wait_for_devtools_url(self) -> str:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            match = _DEVTOOLS_LINE.search(self.log_text())
            if match:
                return match.group(1)
            if self._process.poll() is not None:
                break
            time.sleep(0.05)
        log = self.log_text()
        self.stop()
        raise BrowserError(f"Chromium ({self.binary}) did not open its DevTools port\n--- its output ---\n{log[-3000:]}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace") if self.log_path else ""
        except FileNotFoundError:
            return ""

    def new_page(self, width: int = 1280, height: int = 800) -> Page:
        target_id = self._connection.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session_id = self._connection.send("Target.attachToTarget",
                                           {"targetId": target_id, "flatten": True})["sessionId"]
        page = Page(self._connection, session_id, target_id)
        page.set_viewport(width, height)
        self._pages.append(page)
        return page

    def stop(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.send("Browser.close", timeout=5)
            self._connection.close()
            self._connection = None
        process, self._process = self._process, None
        if process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
            # The browser's own group (start_new_session): its helpers go with it, even if it hung.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        if self.profile_dir is not None:
            shutil.rmtree(self.profile_dir, ignore_errors=True)
            self.profile_dir = None
