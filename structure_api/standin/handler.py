"""The stand-in's HTTP handler: reads one request, records it, and answers normally or plays a scripted fault.

The handler is what a fault acts through (``faults.Exchange``): ``read_request``, ``record``, ``wait``,
``wait_until_stopped``, ``send``, ``stream``, ``drop`` and ``answer_normally``.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler
from typing import Protocol
from urllib.parse import urlsplit

from ..contract import ENDPOINT_PATH, STANDIN_HEADER, STANDIN_HEADER_VALUE, AnswerBody
from .bodies import default_body, error_payload, json_bytes
from .multipart import Form, InvalidUpload, parse_multipart
from .records import Books, Entry
from .upstream_limit import UpstreamRateLimit

log = logging.getLogger("structure_api.standin")

HEALTH_PATHS = ("/", "/health")
# An over-limit body up to this size is read and thrown away so the client sees the 413 on a
# healthy connection; beyond it the connection is closed instead of reading the rest.
_DRAIN_LIMIT = 32 * 1024 * 1024
# Scripted faults read bodies up to this size (tests of oversized uploads), then stop reading.
_FAULT_READ_LIMIT = 64 * 1024 * 1024
# Idle keep-alive connections are closed after this long, so `serve` does not pile up threads.
_IDLE_TIMEOUT = 300.0


class Owner(Protocol):
    """What a handler needs of the server that owns it (``server.StandInServer``), without importing it."""

    books: Books
    latency: float
    free: bool
    rate_limit: UpstreamRateLimit | None

    @property
    def stopping(self) -> bool:
        """True once the server has begun to stop."""

    def wait_until_stopping(self, timeout: float | None = None) -> bool:
        """Block until the server begins to stop (True) or ``timeout`` passes (False)."""

    def answer(
        self,
        method: str,
        route: str,
        headers: dict[str, str],
        body: bytes | None,
        form: Form | InvalidUpload | None,
    ) -> tuple[int, dict, dict[str, str]]:
        """Answer one request normally: status, JSON payload, extra headers."""


class Stopped(Exception):
    """The server is stopping while this handler waited; the connection is dropped."""


class StandInHandler(BaseHTTPRequestHandler):
    """One connection's requests; ``server.standin`` is the StandInServer whose books it keeps."""

    protocol_version = "HTTP/1.1"
    server_version = "StructureStandIn/1.0"
    timeout = _IDLE_TIMEOUT
    disable_nagle_algorithm = True  # header and body go out as two writes; no delayed-ACK stalls

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

    @property
    def _standin(self) -> Owner:
        return self.server.standin  # type: ignore[attr-defined]

    # --- one request -------------------------------------------------------------------

    def _exchange(self) -> None:
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        self._entry = Entry(self.command, self.path, headers, time.monotonic())
        self._declared_too_large = False
        self._route = urlsplit(self.path).path
        self._is_health = self.command in ("GET", "HEAD") and self._route in HEALTH_PATHS
        self._is_api_call = self.command == "POST" and self._route == ENDPOINT_PATH
        fault = None if self._is_health else self._standin.books.take_fault(api_call=self._is_api_call)
        self._entry.fault = fault.label if fault is not None else None
        try:
            if fault is None:
                self.answer_normally()
            else:
                fault.play(self)
        except Stopped:
            self.drop()

    def answer_normally(self, delay: float = 0.0, headers: dict[str, str] | None = None) -> None:
        """Do what the service does (health, rate limit, answer), `delay` later, with `headers` added."""
        owner = self._standin
        body, form = self._read(_DRAIN_LIMIT)
        read_at = time.monotonic()
        if self._is_health:
            self.send(200, json_bytes({"status": "ok"}), "application/json")
            return
        if owner.rate_limit is not None and self._is_api_call and not owner.rate_limit.admit():
            # Over the limit or locked out: 429 at once, no Retry-After, nothing charged (as upstream).
            body_bytes, content_type = default_body(429)
            self.send(429, body_bytes, content_type, {"x-request-id": uuid.uuid4().hex})
            return
        try:
            status, payload, extra = owner.answer(self.command, self._route, self._entry.headers, body, form)
        except Exception:
            log.exception("the stand-in failed to answer %s %s", self.command, self._route)
            status, payload, extra = (
                500,
                error_payload(
                    "Internal server error.", "internal_error", ["the stand-in failed; see its log"]
                ),
                {},
            )
        extra.setdefault("x-request-id", uuid.uuid4().hex)
        extra.update(headers or {})
        # Like a remote service: the answer comes `latency` s after the request was read, its rendering
        # (CPU time on this machine) inside that time rather than on top of it.
        self.wait(max(0.0, owner.latency - (time.monotonic() - read_at)) + delay)
        if status == 200 and AnswerBody.from_json(payload).succeeded:
            owner.books.charge()
        self.send(status, json_bytes(payload), "application/json", extra)

    def read_request(self) -> None:
        """Read the body (a fault reads up to 64 MiB, then stops reading) and record the request."""
        self._read(_FAULT_READ_LIMIT)

    def record(self) -> None:
        """Record the request as it stands (a fault that never reads the body)."""
        self._standin.books.record(self._entry)

    def _read(self, limit: int) -> tuple[bytes | None, Form | InvalidUpload | None]:
        """Read the body (None when over `limit`) and its form, if multipart; record the request."""
        body = self._read_body(limit)
        entry = self._entry
        entry.body_size = len(body) if body is not None else 0
        form: Form | InvalidUpload | None = None
        content_type = entry.headers.get("content-type", "")
        if body is not None and content_type.lower().startswith("multipart/"):
            try:
                form = parse_multipart(body, content_type)
            except InvalidUpload as problem:
                form = problem
            if isinstance(form, Form):
                entry.fields = dict(form.fields)
                entry.image_bytes = form.image_bytes
                entry.image_filename = form.image_filename
                entry.image_content_type = form.image_content_type
        self.record()
        return body, form

    def _read_body(self, limit: int) -> bytes | None:
        """Read the whole request body; None (the connection marked for closing) when over `limit`."""
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
            raise Stopped  # the client went away mid-upload; nobody is left to answer
        return data

    def _read_chunked(self, limit: int) -> bytes | None:
        parts: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1024)
            if not line:
                raise Stopped
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

    # --- what an answer is made of -------------------------------------------------------

    def wait(self, seconds: float) -> None:
        """Sleep `seconds`; raise Stopped (the connection is then dropped) if the server stops meanwhile."""
        if seconds > 0 and self._standin.wait_until_stopping(seconds):
            raise Stopped

    def wait_until_stopped(self) -> None:
        """Block until the server begins to stop."""
        self._standin.wait_until_stopping()

    def drop(self) -> None:
        """Close the connection without an answer."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def send_raw(self, data: bytes) -> None:
        """Write ``data`` as the whole answer, byte for byte, then close the connection."""
        self.close_connection = True
        final = data.rsplit(b"\r\nHTTP/", 1)[-1] if b"\r\nHTTP/" in data else data
        status = final.split(b" ", 2)[1:2]
        self._entry.status = int(status[0]) if status and status[0].isdigit() else 0
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            pass  # the client went away

    def send(
        self,
        status: int,
        body: bytes,
        content_type: str,
        headers: dict[str, str] | None = None,
        *,
        announced_length: int | None = None,
    ) -> None:
        """Write one answer: status, merged headers (the caller's win), a Content-Length, the body.

        announced_length announces another length than the body's (a truncated answer): the
        connection is then closed after it.
        """
        if announced_length is not None:
            self.close_connection = True
        merged = {
            "Content-Type": content_type,
            "Content-Length": str(len(body) if announced_length is None else announced_length),
        }
        if self._standin.free:
            merged[STANDIN_HEADER] = STANDIN_HEADER_VALUE
        for name, value in (headers or {}).items():
            for existing in [k for k in merged if k.lower() == name.lower()]:
                del merged[existing]
            merged[name] = value
        length = next((v for k, v in merged.items() if k.lower() == "content-length"), None)
        if length != str(len(body)) or self._declared_too_large:
            self.close_connection = True  # the framing is off on purpose, or the body was not read
        if self.close_connection:
            merged["Connection"] = "close"
        self._entry.status = status
        self._entry.answered_at = time.monotonic()
        self.send_response(status)
        for name, value in merged.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD" and status not in (204, 304):
            self.wfile.write(body)

    def stream(self, status: int, headers: dict[str, str], chunks: Iterable[bytes]) -> None:
        """Send `chunks` as they come: chunked, or raw under a Content-Length in `headers`; then close."""
        names = {name.lower() for name in headers}
        chunked = "content-length" not in names
        self.close_connection = True
        self._entry.status = status
        self._entry.answered_at = time.monotonic()
        self.send_response(status)
        if "content-type" not in names:
            self.send_header("Content-Type", "application/json")
        if self._standin.free and STANDIN_HEADER.lower() not in names:
            self.send_header(STANDIN_HEADER, STANDIN_HEADER_VALUE)
        for name, value in headers.items():
            self.send_header(name, value)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            self._write_chunks(chunks, chunked)
        except OSError:
            pass  # the client stopped reading, as a careful client should
        finally:
            close = getattr(chunks, "close", None)
            if callable(close):
                close()

    def _write_chunks(self, chunks: Iterable[bytes], chunked: bool) -> None:
        for chunk in chunks:
            if self._standin.stopping:
                return
            if not chunk:
                continue
            if chunked:
                self.wfile.write(b"%x\r\n" % len(chunk) + bytes(chunk) + b"\r\n")
            else:
                self.wfile.write(bytes(chunk))
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
