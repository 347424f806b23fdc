"""The stand-in's HTTP server: recording, the handler, the life cycle (start, stop, scripted faults)."""

from __future__ import annotations

import base64
import collections
import hmac
import ipaddress
import logging
import math
import random
import secrets
import socket
import socketserver
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterable, Optional, Union
from urllib.parse import urlsplit

from ..contract import (
    CREDITS_PER_IMAGE,
    ENDPOINT_PATH,
    MAX_REQUEST_BYTES,
    MAX_SEED,
)
from ..ratelimit import RateLimit
from .ratelimit import UpstreamRateLimit
from .answers import _body_bytes, _json_bytes, default_body, error_payload
from .faults import FAULT_KINDS, Fault, _random_fault
from .multipart import _BadRequest, _Form, parse_multipart
from .render import render_structure
from .validation import validate_form

log = logging.getLogger("structure_api.standin")

HEALTH_PATHS = ("/", "/health")
# A free stand-in marks every answer with this header (config.STANDIN_HEADER, kept in step by a test): the
# client then counts its results as 0 credits, so nothing shown for a free image claims credits were spent.
STANDIN_HEADER = "X-AIThriving-Stand-In"
STANDIN_HEADER_VALUE = "free"
# An over-limit body up to this size is read and thrown away so the client sees the 413 on a
# healthy connection; beyond it the connection is closed instead of reading the rest.
_DRAIN_LIMIT = 32 * 1024 * 1024
# Scripted faults read bodies up to this size (tests of oversized uploads), then stop reading.
_FAULT_READ_LIMIT = 64 * 1024 * 1024
# How long stop() waits for handler threads; hung and delayed handlers wake at once on stop.
_JOIN_TIMEOUT = 2.0
# Idle keep-alive connections are closed after this long, so `serve` does not pile up threads.
_IDLE_TIMEOUT = 300.0

_WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the stand-in saw it, and the status it answered with (0 if it never answered)."""

    method: str
    path: str  # the request target as sent, query string included
    headers: dict[str, str]  # names lower-cased
    fields: dict[str, str]  # text form fields
    image_bytes: Optional[bytes]
    image_filename: Optional[str]
    image_content_type: Optional[str]
    body_size: int  # bytes of body actually read
    received_at: float  # time.monotonic() when the request head had been read
    status: int
    fault: Optional[str] = None  # "503", "code-1", "drop", "passthrough", ... or None for normal behaviour


@dataclass
class _Entry:
    """The mutable record of a request in flight; snapshots turn it into a RecordedRequest."""

    method: str
    path: str
    headers: dict[str, str]
    received_at: float
    fault: Optional[str]
    fields: dict[str, str] = field(default_factory=dict)
    image_bytes: Optional[bytes] = None
    image_filename: Optional[str] = None
    image_content_type: Optional[str] = None
    body_size: int = 0
    status: int = 0

    def freeze(self) -> RecordedRequest:
        return RecordedRequest(
            method=self.method, path=self.path, headers=dict(self.headers), fields=dict(self.fields),
            image_bytes=self.image_bytes, image_filename=self.image_filename,
            image_content_type=self.image_content_type, body_size=self.body_size,
            received_at=self.received_at, status=self.status, fault=self.fault)


# --- the HTTP side -----------------------------------------------------------------------

class _Stopped(Exception):
    """The server is stopping while this handler waited; the connection is dropped."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "StructureStandIn/1.0"
    timeout = _IDLE_TIMEOUT
    disable_nagle_algorithm = True  # header and body go out as two writes; no delayed-ACK stalls
    server: "_HTTPServer"

    # Every method goes through one place; routing and 405s are decided there.
    def do_GET(self) -> None:
        self._exchange()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        # Only the request line and status reach the log, never headers (the key lives there).
        log.debug("%s %s", self.address_string(), format % args)

    def log_request(self, code: object = "-", size: object = "-") -> None:
        log.info("%s %s -> %s", self.command, urlsplit(self.path).path, getattr(code, "value", code))

    # --- one request -------------------------------------------------------------------

    def _exchange(self) -> None:
        owner = self.server.standin
        received_at = time.monotonic()
        self._declared_too_large = False
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        route = urlsplit(self.path).path
        is_health = self.command in ("GET", "HEAD") and route in HEALTH_PATHS
        fault: Optional[Fault] = None
        if not is_health:
            fault = owner._take_fault(api_call=(self.command == "POST" and route == ENDPOINT_PATH))
        entry = _Entry(self.command, self.path, headers, received_at, fault.label if fault else None)

        try:
            if fault is not None and fault.action == "drop_before_read":
                owner._record(entry)
                self._drop()
                return
            limit = _FAULT_READ_LIMIT if fault is not None and not fault.passthrough else _DRAIN_LIMIT
            body = self._read_body(limit)
            entry.body_size = len(body) if body is not None else 0
            form: Union[_Form, _BadRequest, None] = None
            if body is not None and headers.get("content-type", "").lower().startswith("multipart/"):
                try:
                    form = parse_multipart(body, headers["content-type"])
                except _BadRequest as problem:
                    form = problem
                if isinstance(form, _Form):
                    entry.fields = dict(form.fields)
                    entry.image_bytes = form.image_bytes
                    entry.image_filename = form.image_filename
                    entry.image_content_type = form.image_content_type
            owner._record(entry)

            if fault is not None and not fault.passthrough:
                self._play(fault, entry)
                return
            if is_health:
                self._send(entry, 200, _json_bytes({"status": "ok"}), "application/json")
                return
            if owner.rate_limit is not None and self.command == "POST" and route == ENDPOINT_PATH \
                    and not owner.rate_limit.admit():
                # Over the limit or locked out: 429 at once, no Retry-After, nothing charged (as upstream).
                body_bytes, content_type = default_body(429)
                self._send(entry, 429, body_bytes, content_type, {"x-request-id": uuid.uuid4().hex})
                return
            try:
                status, payload, extra = owner._answer(self.command, route, headers, body, form)
            except Exception:
                log.exception("the stand-in failed to answer %s %s", self.command, route)
                status, payload, extra = 500, error_payload(
                    "Internal server error.", "internal_error", ["the stand-in failed; see its log"]), {}
            extra.setdefault("x-request-id", uuid.uuid4().hex)
            if fault is not None:
                extra.update(fault.headers)
            self._wait(owner.latency + (fault.delay if fault is not None else 0.0))
            if status == 200 and payload.get("code") == 0:
                owner._charge()
            self._send(entry, status, _json_bytes(payload), "application/json", extra)
        except _Stopped:
            self._drop()

    def _read_body(self, limit: int) -> Optional[bytes]:
        """The whole request body, or None (and the connection marked for closing) when over `limit`."""
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            return self._read_chunked(limit)
        declared = self.headers.get("content-length")
        if declared is None:
            return b""
        if not declared.strip().isdigit():
            self.close_connection = True
            return b""
        size = int(declared)
        if size > limit:
            self.close_connection = True
            self._declared_too_large = True
            return None
        data = self.rfile.read(size)
        if len(data) < size:
            raise _Stopped  # the client went away mid-upload; nobody is left to answer
        return data

    def _read_chunked(self, limit: int) -> Optional[bytes]:
        parts: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1024)
            if not line:
                raise _Stopped
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                return b"".join(parts)
            if size == 0:
                while self.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            total += size
            if total > limit:
                self.close_connection = True
                self._declared_too_large = True
                return None
            parts.append(self.rfile.read(size))
            self.rfile.readline(8)

    def _wait(self, seconds: float) -> None:
        if seconds > 0 and self.server.standin.wait_until_stopping(seconds):
            raise _Stopped

    def _drop(self) -> None:
        """Close the connection without an answer."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _send(
        self, entry: _Entry, status: int, body: bytes, content_type: str,
        headers: Optional[dict[str, str]] = None, *, announced_length: Optional[int] = None,
    ) -> None:
        """Write one answer: status, merged headers (the caller's win), a correct Content-Length, body."""
        merged = {"Content-Type": content_type, "Content-Length": str(len(body) if announced_length is None
                                                                       else announced_length)}
        if self.server.standin.free:
            merged[STANDIN_HEADER] = STANDIN_HEADER_VALUE
        for name, value in (headers or {}).items():
            for existing in [k for k in merged if k.lower() == name.lower()]:
                del merged[existing]
            merged[name] = value
        length = next((v for k, v in merged.items() if k.lower() == "content-length"), None)
        if length != str(len(body)) or getattr(self, "_declared_too_large", False):
            self.close_connection = True  # the framing is off on purpose, or the body was not read
        if self.close_connection:
            merged["Connection"] = "close"
        entry.status = status
        self.send_response(status)
        for name, value in merged.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD" and status not in (204, 304):
            self.wfile.write(body)

    def _play(self, fault: Fault, entry: _Entry) -> None:
        """Answer with a scripted fault instead of the normal behaviour."""
        if fault.action in ("drop", "hang"):
            if fault.action == "hang":
                self.server.standin.wait_until_stopping()
            else:
                self._wait(fault.delay)
            self._drop()
            return
        self._wait(fault.delay)
        if fault.action == "stream":
            self._stream(fault, entry)
            return
        body, content_type = _body_bytes(fault.body, fault.status)
        if fault.action == "truncate":
            self.close_connection = True
            self._send(entry, fault.status, body[: len(body) // 2], content_type, fault.headers,
                       announced_length=len(body))
            self._drop()
            return
        self._send(entry, fault.status, body, content_type, fault.headers)

    def _stream(self, fault: Fault, entry: _Entry) -> None:
        if fault.body_chunks is not None:
            chunks: Iterable[bytes] = fault.body_chunks()
        elif fault.body is None or isinstance(fault.body, (bytes, str, dict)):
            chunks = [_body_bytes(fault.body, fault.status)[0]]
        else:
            chunks = fault.body
        names = {name.lower() for name in fault.headers}
        chunked = "content-length" not in names
        self.close_connection = True
        entry.status = fault.status
        self.send_response(fault.status)
        if "content-type" not in names:
            self.send_header("Content-Type", "application/json")
        if self.server.standin.free and STANDIN_HEADER.lower() not in names:
            self.send_header(STANDIN_HEADER, STANDIN_HEADER_VALUE)
        for name, value in fault.headers.items():
            self.send_header(name, value)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        owner = self.server.standin
        try:
            for chunk in chunks:
                if owner.stopping:
                    break
                if not chunk:
                    continue
                if chunked:
                    self.wfile.write(b"%x\r\n" % len(chunk) + bytes(chunk) + b"\r\n")
                else:
                    self.wfile.write(bytes(chunk))
            else:
                if chunked:
                    self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass  # the client stopped reading, as a careful client should
        finally:
            close = getattr(chunks, "close", None)
            if callable(close):
                close()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # threads are tracked and joined by StandInServer.stop instead
    request_queue_size = 128
    allow_reuse_address = True

    def __init__(self, address: tuple, standin: "StandInServer", family: int) -> None:
        self.address_family = family
        self.standin = standin
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn), which can stall for seconds.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[0], self.server_address[1]

    def process_request(self, request: socket.socket, client_address: tuple) -> None:
        owner = self.standin
        with owner._lock:
            if owner.stopping:
                self.shutdown_request(request)
                return
            thread = threading.Thread(
                target=self._serve_connection, args=(request, client_address),
                name=f"standin-{self.server_port}-conn", daemon=True)
            owner._threads.add(thread)
            owner._connections.add(request)
        thread.start()

    def _serve_connection(self, request: socket.socket, client_address: tuple) -> None:
        owner = self.standin
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            with owner._lock:
                # Removed before closing, so stop() never shuts down a closed (reused) descriptor.
                owner._connections.discard(request)
            self.shutdown_request(request)
            with owner._lock:
                owner._threads.discard(threading.current_thread())

    def handle_error(self, request: object, client_address: object) -> None:
        import sys

        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError, _Stopped)) or self.standin.stopping:
            log.debug("connection from %s ended: %r", client_address, error)
        else:
            log.exception("stand-in handler failed for %s", client_address)


# --- the public server -----------------------------------------------------------------

def _check_host(host: str) -> int:
    bare = host.strip("[]")
    if host in _WILDCARD_HOSTS:
        raise ValueError(
            f"The stand-in does not listen on all interfaces ({host!r}); give a specific address such as 127.0.0.1.")
    try:
        return socket.AF_INET6 if ipaddress.ip_address(bare).version == 6 else socket.AF_INET
    except ValueError:
        return socket.AF_INET  # a host name such as "localhost"


class StandInServer:
    """The stand-in on a background thread: ``with StandInServer() as server: ... server.url``."""

    def __init__(
        self, *, api_key: Optional[str] = None, host: str = "127.0.0.1", port: int = 0,
        latency: float = 0.0, fault_rate: float = 0.0, fault_seed: int = 0, max_records: Optional[int] = None,
        free: bool = False,
        rate_limit: Union[RateLimit, str, UpstreamRateLimit, None] = None, lockout: float = 60.0,
    ) -> None:
        """Bind to host:port at once (port 0 picks a free one); start() begins answering.

        free marks every answer as free of charge (STANDIN_HEADER), as `serve`, `--local` and the
        node's offline mode want; without it the stand-in plays the paid service, as billing tests want.

        max_records keeps only the newest N recorded requests (each holds its upload, up to
        10 MiB); None keeps all, as tests want, 0 keeps none, as a long-running `serve` wants.
        rate_limit (such as "150/10") and lockout model the upstream's limit: past it, 429s
        without Retry-After for ``lockout`` seconds, never charged (``rate_limit.refused`` counts them).
        """
        if latency < 0 or not math.isfinite(latency):
            raise ValueError(f"latency must be a finite number of seconds >= 0; got {latency!r}.")
        if not 0.0 <= fault_rate <= 1.0:
            raise ValueError(f"fault_rate must be between 0 and 1; got {fault_rate!r}.")
        if api_key is not None and not api_key:
            raise ValueError("api_key must be a non-empty string, or None for no key check.")
        family = _check_host(host)
        self._api_key = api_key.encode("utf-8") if api_key is not None else None
        self.free = bool(free)
        self.latency = float(latency)
        self.fault_rate = float(fault_rate)
        if rate_limit is None or isinstance(rate_limit, UpstreamRateLimit):
            self.rate_limit = rate_limit
        else:
            self.rate_limit = UpstreamRateLimit(rate_limit, lockout)
        self._random = random.Random(fault_seed)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._faults: collections.deque[Fault] = collections.deque()
        if max_records is not None and max_records < 0:
            raise ValueError(f"max_records must be >= 0 or None; got {max_records!r}.")
        self._max_records = max_records
        self._records: collections.deque[_Entry] = collections.deque(maxlen=max_records)
        self._credits = 0
        self._threads: set[threading.Thread] = set()
        self._connections: set[socket.socket] = set()
        self._serve_thread: Optional[threading.Thread] = None
        self._stopped = False
        # Bound here, so url and port are known before start(); start() begins answering.
        self._httpd = _HTTPServer((host.strip("[]"), port), self, family)
        self.port: int = self._httpd.server_address[1]
        bound = self._httpd.server_address[0]
        self.host: str = bound
        self.url: str = f"http://[{bound}]:{self.port}" if family == socket.AF_INET6 else f"http://{bound}:{self.port}"

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else ("running" if self._serve_thread else "bound")
        return f"StandInServer(url={self.url!r}, {state}, key={'required' if self._api_key else 'none'})"

    @property
    def endpoint(self) -> str:
        """The full URL of the Structure endpoint on this server."""
        return self.url + ENDPOINT_PATH

    def start(self) -> "StandInServer":
        """Serve in a background daemon thread; returns self."""
        with self._lock:
            if self._stopped:
                raise RuntimeError("This stand-in was stopped; create a new StandInServer.")
            if self._serve_thread is None:
                self._serve_thread = threading.Thread(
                    target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                    name=f"standin-{self.port}-accept", daemon=True)
                self._serve_thread.start()
        return self

    def stop(self) -> None:
        """Stop answering, drop open connections, wake hung handlers and join every thread; idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._stopping.set()
            serve_thread = self._serve_thread
        if serve_thread is not None:
            self._httpd.shutdown()
            serve_thread.join(_JOIN_TIMEOUT)
        self._httpd.server_close()
        with self._lock:
            for connection in list(self._connections):
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            threads = list(self._threads)
        deadline = time.monotonic() + _JOIN_TIMEOUT
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        leftover = [thread.name for thread in threads if thread.is_alive()]
        if leftover:
            log.warning("stand-in stopped with %d handler thread(s) still running", len(leftover))

    @property
    def stopping(self) -> bool:
        """True from the moment stop() begins."""
        return self._stopping.is_set()

    def wait_until_stopping(self, timeout: Optional[float] = None) -> bool:
        """Block until stop() begins or ``timeout`` seconds pass; True when it has begun."""
        return self._stopping.wait(timeout)

    def __enter__(self) -> "StandInServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def script(self, *faults: Fault) -> None:
        """Queue faults: the next requests answer with them in order, then normal behaviour resumes."""
        for fault in faults:
            if not isinstance(fault, Fault):
                raise TypeError(f"script() takes Fault objects, not {type(fault).__name__}.")
        with self._lock:
            self._faults.extend(faults)

    @property
    def pending_faults(self) -> int:
        """How many scripted faults have not been used yet."""
        with self._lock:
            return len(self._faults)

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request so far (health checks included), in arrival order; see max_records."""
        with self._lock:
            return [entry.freeze() for entry in self._records]

    def clear(self) -> None:
        """Forget recorded requests and queued faults (credits_spent is kept)."""
        with self._lock:
            self._records = collections.deque(maxlen=self._max_records)
            self._faults.clear()

    @property
    def credits_spent(self) -> int:
        """What the real service would have charged: CREDITS_PER_IMAGE per successful generation."""
        with self._lock:
            return self._credits

    # --- used by the handler -------------------------------------------------------------

    def _take_fault(self, *, api_call: bool) -> Optional[Fault]:
        with self._lock:
            if self._faults:
                return self._faults.popleft()
            if not api_call or self.fault_rate <= 0 or self._random.random() >= self.fault_rate:
                return None
            kind = self._random.choice(FAULT_KINDS)
        return _random_fault(kind)

    def _record(self, entry: _Entry) -> None:
        with self._lock:
            self._records.append(entry)

    def _charge(self) -> None:
        with self._lock:
            self._credits += CREDITS_PER_IMAGE

    def _answer(
        self, method: str, route: str, headers: dict[str, str], body: Optional[bytes],
        form: Union[_Form, _BadRequest, None],
    ) -> tuple[int, dict, dict[str, str]]:
        """The normal behaviour: (status, JSON payload, extra headers)."""
        if route != ENDPOINT_PATH:
            return 404, error_payload("Not found.", "not_found", [f"{route}: no such endpoint"]), {}
        if method != "POST":
            return 405, error_payload("Method not allowed.", "method_not_allowed",
                                      [f"{method}: only POST is accepted"]), {"Allow": "POST"}
        if self._api_key is not None:
            # http.server decodes header bytes as latin-1; encoding back gives the bytes as sent.
            given = headers.get("authorization", "").encode("latin-1", "replace")
            if not hmac.compare_digest(given, self._api_key):
                return 401, error_payload("Invalid or missing API key.", "unauthorized",
                                          ["authorization header is missing or invalid"]), {}
        if body is None or len(body) > MAX_REQUEST_BYTES:
            return 413, error_payload(f"Request body is larger than {MAX_REQUEST_BYTES // 2**20} MiB.",
                                      "payload_too_large", [f"body: must be at most {MAX_REQUEST_BYTES} bytes"]), {}
        try:
            if form is None:
                raise _BadRequest("content-type: must be multipart/form-data")
            if isinstance(form, _BadRequest):
                raise form
            job = validate_form(form)
        except _BadRequest as problem:
            reason = str(problem)
            return 400, error_payload(reason, "bad_request", [reason]), {}
        seed = job.seed or secrets.randbelow(MAX_SEED) + 1
        image = render_structure(job.pixels, job.prompt, job.negative_prompt, job.control_strength, seed,
                                 job.output_format)
        encoded = base64.b64encode(image).decode("ascii")
        return 200, {"code": 0, "message": "success", "data": {"image": encoded, "seed": seed}}, {}
