"""The transport under StructureClient: one session, the upload body, connection tracking, the body read.

This is the one place where transport exceptions (requests, urllib3, socket) become the library's
errors. It knows HTTP, not the service's answers: those are read in ``answers.py``.
"""

from __future__ import annotations

import http.client
import io
import logging
import math
import socket
import sys
import threading
import uuid
import weakref
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection

from ._constants import DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT, MAX_RESPONSE_BYTES, MIN_BODY_RATE
from ._version import __version__
from .config import APIKey
from .errors import (
    APIConnectionError,
    APITimeoutError,
    CancelledError,
    ConfigurationError,
    MalformedResponseError,
    ResultMayBeBilledError,
    TransportError,
)
from .request import StructureRequest

log = logging.getLogger("structure_api")

_READ_BYTES = 256 * 1024
_MAX_INFORMATIONAL_HEADERS = 100
_MAX_HEADER_LINE = 65536


@dataclass(frozen=True)
class TransportLimits:
    """How long the transport waits and how much it reads; the timeouts are checked when it is made."""

    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    read_timeout: float = DEFAULT_READ_TIMEOUT
    max_response_bytes: int = MAX_RESPONSE_BYTES
    min_body_rate: float = MIN_BODY_RATE

    def __post_init__(self) -> None:
        # Checked here: urllib3 would refuse a zero, negative or NaN timeout only mid-request, with its own
        # error.
        for what, seconds in (("connect", self.connect_timeout), ("read", self.read_timeout)):
            if (
                isinstance(seconds, bool)
                or not isinstance(seconds, (int, float))
                or not math.isfinite(seconds)
                or seconds <= 0
            ):
                raise ConfigurationError(
                    f"The {what} timeout must be a positive number of seconds; got {seconds!r}."
                )


# --- the upload ----------------------------------------------------------------------


class UploadBody:
    """The multipart body as a readable stream that knows when the last byte went out.

    Knowing it is what makes retries safe: a failure before the last byte left cannot
    have produced (or billed) a result; a failure after it may have. It is also what a cancel
    that keeps paid work needs: :meth:`stop` stops an upload only while its last byte is still here.
    """

    def __init__(self, parts: list[bytes | memoryview], on_sent: Callable[[], None] | None = None) -> None:
        self._parts = parts
        self._on_sent = on_sent
        self._length = sum(len(p) for p in parts)
        self._index = 0
        self._offset = 0
        self.bytes_read = 0
        self._lock = threading.Lock()
        self._stopped = False

    @property
    def stopped(self) -> bool:
        """True once :meth:`stop` stopped this upload before its last byte went out."""
        return self._stopped

    def stop(self) -> bool:
        """Hand out no more bytes, unless the last one is already out; True when stopped.

        An upload whose last byte was handed to the socket may be complete at the service, which
        then makes (and charges for) the image: that one is not stopped.
        """
        with self._lock:
            if self.bytes_read >= self._length:
                return False
            self._stopped = True
            return True

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[bytes]:
        while True:
            chunk = self.read(_READ_BYTES)
            if not chunk:
                return
            yield chunk

    @property
    def fully_read(self) -> bool:
        return self.bytes_read >= self._length

    def read(self, size: int = -1) -> bytes:
        with self._lock:
            if self._stopped:
                raise CancelledError("The upload was stopped before its last byte; nothing was charged.")
            chunk = self._read(size)
            on_sent = None
            if not chunk:
                on_sent, self._on_sent = self._on_sent, None
        if on_sent is not None:
            on_sent()  # outside the lock: it reaches the caller's progress display
        return chunk

    def _read(self, size: int) -> bytes:
        if size is None or size < 0:
            size = self._length
        out = []
        while size > 0 and self._index < len(self._parts):
            part = self._parts[self._index]
            piece = part[self._offset : self._offset + size]
            out.append(bytes(piece))
            self._offset += len(piece)
            size -= len(piece)
            if self._offset >= len(part):
                self._index += 1
                self._offset = 0
        chunk = b"".join(out)
        self.bytes_read += len(chunk)
        return chunk


def _multipart_parts(request: StructureRequest, boundary: str) -> list[bytes | memoryview]:
    """Frame the form fields, then the image (not copied: a view of its bytes), with ``boundary``."""
    head = bytearray()
    for name, value in request.form_fields():
        head += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        head += value.encode("utf-8") + b"\r\n"
    head += (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
        f'filename="{request.image.filename}"\r\nContent-Type: {request.image.mime_type}\r\n\r\n'
    ).encode()
    return [bytes(head), memoryview(request.image.data), f"\r\n--{boundary}--\r\n".encode()]


class RawKeyAuth(requests.auth.AuthBase):
    """Puts the raw key in the `authorization` header; passing auth also stops .netrc from overriding it."""

    def __init__(self, key: APIKey) -> None:
        self._key = key

    def __call__(self, prepared: requests.PreparedRequest) -> requests.PreparedRequest:
        prepared.headers["authorization"] = self._key.reveal()
        return prepared

    def __repr__(self) -> str:
        return "RawKeyAuth('****')"


# --- connections -----------------------------------------------------------------------


def _shutdown_socket(connection: HTTPConnection) -> None:
    """Break a connection's socket, so that whoever waits on it (a read, a send) fails now."""
    sock = getattr(connection, "sock", None)
    # TLS inside a TLS proxy's tunnel (urllib3's SSLTransport) cannot shut down: break the socket it wraps.
    while sock is not None and not hasattr(sock, "shutdown"):
        sock = getattr(sock, "socket", None)
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    if sys.platform == "win32" and isinstance(sock, socket.socket):
        # A shutdown leaves a read in another thread waiting there; closing the handle cancels it
        # (closesocket). detach() first, so that no later close() of the socket object (the owner's)
        # closes that number again once a new socket may have it. POSIX wakes the reader on shutdown
        # and keeps the descriptor, which the owner closes.
        try:
            socket.close(sock.detach())
        except OSError:
            pass


class _FinalResponse(http.client.HTTPResponse):
    """http.client's response, skipping every informational answer (102, 103, ...) before the final one.

    http.client skips only a 100; a 103 Early Hints would otherwise stand for the answer, and the
    paid 200 behind it would be left unread on the socket.
    """

    def _read_status(self):  # type: ignore[no-untyped-def]
        while True:
            version, status, reason = super()._read_status()
            if not 100 < status < 200 or status == 101:
                return version, status, reason
            for _ in range(_MAX_INFORMATIONAL_HEADERS):
                if self.fp.readline(_MAX_HEADER_LINE) in (b"\r\n", b"\n", b""):
                    break
            else:
                raise http.client.HTTPException(f"an informational {status} answer with too many headers")


class _TrackedConnection:
    """Mixed into urllib3's HTTP and HTTPS connections: each registers itself when it connects, so a
    cancel can close it mid-wait, and its status line and headers must arrive within the header deadline.

    The socket's own timeout only bounds each wait for a byte: headers sent a byte at a time would
    never end. A timer shuts the socket when the whole header deadline passes; the failure is
    then a read timeout, like any other answer that did not come in time.
    """

    # Set by _tracking_adapter on the classes it makes: where connections register, and the deadline.
    _registry: weakref.WeakSet[HTTPConnection]
    _header_deadline: float

    # The upload this connection sends or last sent, held weakly: a cancel stops only unfinished uploads,
    # and a pooled connection must not keep a sent upload's bytes (~6 MB at 2048²) alive until reused.
    _upload: weakref.ref[UploadBody] | None = None

    @property
    def upload(self) -> UploadBody | None:
        """Return the upload this connection sends or last sent, while anything else still holds it."""
        return self._upload() if self._upload is not None else None

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        self._registry.add(self)

    def request(self, method, url, body=None, *args, **kwargs):  # type: ignore[no-untyped-def]
        self._upload = weakref.ref(body) if isinstance(body, UploadBody) else None
        return super().request(method, url, body, *args, **kwargs)  # type: ignore[misc]

    def getresponse(self):  # type: ignore[no-untyped-def]
        timed_out = threading.Event()

        def deadline_passed() -> None:
            timed_out.set()
            _shutdown_socket(self)  # type: ignore[arg-type]

        timer = threading.Timer(self._header_deadline, deadline_passed)
        timer.daemon = True
        timer.start()
        try:
            return super().getresponse()  # type: ignore[misc]
        except Exception:
            if timed_out.is_set():
                # urllib3 turns a socket timeout into its ReadTimeoutError, requests into ReadTimeout.
                raise TimeoutError("no status line and headers within the read timeout") from None
            raise
        finally:
            timer.cancel()


def _tracking_adapter(registry: weakref.WeakSet[HTTPConnection], header_timeout: float) -> HTTPAdapter:
    """Build an adapter whose connections register in ``registry`` and whose status line and headers must
    arrive within ``header_timeout`` s of the upload's end (see ``_TrackedConnection``); connections
    through a proxy (HTTP_PROXY, HTTPS_PROXY, SOCKS) too."""
    tracking = {"_registry": registry, "_header_deadline": header_timeout, "response_class": _FinalResponse}
    return _TrackingAdapter(tracking, pool_connections=4, pool_maxsize=32, max_retries=0)


class _TrackingAdapter(HTTPAdapter):
    """An HTTPAdapter whose pool managers, the direct one and each proxy's, make tracked connections."""

    def __init__(self, tracking: dict, **kwargs) -> None:
        self._tracking = tracking  # set first: HTTPAdapter.__init__ makes the direct pool manager
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _tracked_pools(
            self.poolmanager.pool_classes_by_scheme, self._tracking
        )

    def proxy_manager_for(self, proxy, **proxy_kwargs):  # type: ignore[no-untyped-def]
        made = proxy not in self.proxy_manager
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if made:
            # The proxy's own pool classes (a SOCKS proxy has its own), with tracked connections.
            manager.pool_classes_by_scheme = _tracked_pools(manager.pool_classes_by_scheme, self._tracking)
        return manager


def _tracked_pools(pools: dict, tracking: dict) -> dict:
    """Build the same pool classes per scheme, making connections with ``_TrackedConnection`` mixed in."""
    tracked = {}
    for scheme, pool_cls in pools.items():
        connection_cls = pool_cls.ConnectionCls
        connection = type(f"Tracked{connection_cls.__name__}", (_TrackedConnection, connection_cls), tracking)
        tracked[scheme] = type(f"Tracked{pool_cls.__name__}", (pool_cls,), {"ConnectionCls": connection})
    return tracked


# --- the transport -----------------------------------------------------------------------


class Transport:
    """One ``requests.Session`` with the raw-key auth and tracked connections, within ``limits``."""

    def __init__(self, key: APIKey, limits: TransportLimits, clock: Callable[[], float]) -> None:
        self.limits = limits
        self._clock = clock
        # Every connection opened, while it lives: close() and abort() reach them all.
        self.connections: weakref.WeakSet[HTTPConnection] = weakref.WeakSet()
        # Every upload being sent: stop_uploads() reaches those not yet on a connection too.
        self._uploads: weakref.WeakSet[UploadBody] = weakref.WeakSet()
        self.session = requests.Session()
        adapter = _tracking_adapter(self.connections, limits.read_timeout)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers.update(
            {
                "user-agent": f"comfyui-aithriving-structure/{__version__}",
                "accept": "application/json",
                # The codings _ContentDecoder undoes; never br or zstd.
                "accept-encoding": ACCEPT_ENCODING,
            }
        )
        self.session.auth = RawKeyAuth(key)

    def close(self) -> None:
        """Release the session and close every connection it opened."""
        self.session.close()
        # urllib3 2 leaves closing pooled connections to the garbage collector, which never runs
        # for them while the caller keeps an error (a batch report does) whose traceback holds a
        # response and so the pool: close every connection this transport opened, now.
        for connection in list(self.connections):
            connection.close()

    def abort(self) -> None:
        """Break every open connection, so that calls waiting on one end now."""
        for connection in list(self.connections):
            _shutdown_socket(connection)

    def stop_uploads(self) -> None:
        """Stop every upload whose last byte has not gone out (the service charges nothing for those).

        Requests whose upload is complete carry on: the service is already making their images.
        """
        for body in list(self._uploads):
            body.stop()
        for connection in list(self.connections):
            upload = getattr(connection, "upload", None)
            if isinstance(upload, UploadBody) and upload.stopped:
                _shutdown_socket(connection)

    def post(
        self, url: str, request: StructureRequest, attempt: int, on_sent: Callable[[], None]
    ) -> requests.Response:
        """Upload ``request`` and return the answer with its headers read and its body still to read."""
        boundary = uuid.uuid4().hex
        body = UploadBody(_multipart_parts(request, boundary), on_sent=on_sent)
        self._uploads.add(body)
        sent_at = self._clock()
        log.info("POST %s, attempt %d, %d bytes", url, attempt, len(body))
        try:
            response = self.session.post(
                url,
                data=body,
                headers={"content-type": f"multipart/form-data; boundary={boundary}"},
                timeout=(self.limits.connect_timeout, self.limits.read_timeout),
                allow_redirects=False,
                stream=True,
            )
        except requests.exceptions.RequestException as exc:
            error = transport_error(exc, body.fully_read, urlsplit(url).hostname, self.limits)
            log.info("attempt %d: no answer after %.2f s: %s", attempt, self._clock() - sent_at, error)
            raise error from None
        # The headers only: no key is ever in them, and the body may be an image.
        log.info(
            "attempt %d: HTTP %d after %.2f s, request id %s",
            attempt,
            response.status_code,
            self._clock() - sent_at,
            response.headers.get("x-request-id") or "-",
        )
        return response

    def read_body(self, response: requests.Response) -> bytes:
        """Read the whole body while it keeps arriving at ``min_body_rate``; bounded in size.

        A big answer on a slow link completes; one trickling below the rate ends within about
        twice the read timeout (one window of ``read_timeout`` s, plus the wait for a last byte).
        """
        status = response.status_code
        limit = self.limits.max_response_bytes
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise MalformedResponseError(
                f"The service's answer is {int(declared) / 2**20:.0f} MiB, far larger than any image it "
                f"returns (limit {limit / 2**20:.0f} MiB); it was not read{_charged(status)}.",
                http_status=status,
            )
        coding = response.headers.get("content-encoding")
        # A coded body's Content-Length counts coded bytes: no use for sizing the decoded one.
        presize = int(declared) if declared and declared.isdigit() and not coding else 0
        buffer = _BodyBuffer(presize)
        pace = _RateWindow(self._clock, self.limits.read_timeout, self.limits.min_body_rate)
        try:
            decoder = _ContentDecoder(coding, limit)
            while True:
                # What one socket read brings: the rate is checked as bytes come in, not only
                # after a 256 KiB read that a trickle would take days to fill.
                coded = read_some(response.raw, _READ_BYTES)
                for chunk in decoder.decode(coded) if coded else decoder.finish():
                    if buffer.size + len(chunk) > limit:
                        raise MalformedResponseError(
                            f"The service's answer passed {limit / 2**20:.0f} MiB, far larger than any "
                            f"image it returns; reading stopped{_charged(status)}.",
                            http_status=status,
                        )
                    buffer.add(chunk)
                pace.count(len(coded))
                if not coded:
                    break
        except _UndecodableBody as exc:
            if 200 <= status < 300:
                raise ResultMayBeBilledError(
                    f"{exc} The service may have charged for it (HTTP {status}), so the request was not sent "
                    "again.",
                    http_status=status,
                ) from None
            # An error status is the answer whatever its body (as below).
        except (
            _BodyTooSlow,
            urllib3.exceptions.HTTPError,
            requests.exceptions.RequestException,
            OSError,
            http.client.HTTPException,
        ) as exc:
            if 200 <= status < 300:
                raise ResultMayBeBilledError(
                    _broken_answer_message(
                        exc, buffer.size, None if coding else declared, self.limits.min_body_rate
                    ),
                    http_status=status,
                ) from None
            # An error status is the answer whatever its body: what arrived is enough to map it
            # (and a 5xx cut short is as unbilled, and as retryable, as a whole one).
        return buffer.value(keep_mutable=200 <= status < 300)


def _charged(status: int) -> str:
    """Say what a success status adds to a sentence about its answer: it may have been billed."""
    if 200 <= status < 300:
        return f"; the service may have charged for it (HTTP {status}), so the request was not sent again"
    return ""


def read_some(raw: urllib3.response.HTTPResponse, size: int) -> bytes:
    """Up to ``size`` bytes of the body as sent (still content-coded), from one read of the socket."""
    read1 = getattr(raw, "read1", None)
    if read1 is not None:
        return read1(size, decode_content=False)
    # urllib3 before 2.2 has no read1; the http.client response under it has (chunked framing undone).
    # The connection is then closed with the response, not pooled again.
    fp = getattr(raw, "_fp", None)
    if fp is None or fp.closed:
        return b""
    data = fp.read1(size)
    if not data and getattr(fp, "length", None):
        # http.client's read1 ends a body cut short quietly; its read would raise this.
        raise http.client.IncompleteRead(b"", fp.length)
    return data


class _UndecodableBody(Exception):
    """The body's content coding is not one the client undoes, or undoing it breaks a bound."""


class _ContentDecoder:
    """Undoes at most one content coding (gzip or deflate), never producing more than ``limit`` bytes.

    urllib3 undoes any chain of codings, without a bound on what one coded byte may become (a
    354-byte answer coded ``gzip, gzip, gzip`` grows to a gigabyte): the client undoes them itself.
    """

    def __init__(self, header: str | None, limit: int) -> None:
        codings = [c.strip().lower() for c in (header or "").split(",")]
        codings = [c for c in codings if c and c != "identity"]
        if len(codings) > MAX_CONTENT_CODINGS:
            raise _UndecodableBody(
                f"The service's answer is compressed {len(codings)} times over (Content-Encoding: "
                f"{', '.join(codings)[:80]}); the client undoes one compression at most, so it was not read."
            )
        if codings and codings[0] not in _DECODERS:
            raise _UndecodableBody(
                f"The service's answer is compressed as {codings[0][:40]!r}, which the client did not ask "
                "for and cannot undo, so it was not read."
            )
        self._coding = codings[0] if codings else ""
        self._limit = limit
        self._produced = 0
        self._inflater = _DECODERS[self._coding]() if codings else None
        self._first = True

    def decode(self, data: bytes) -> Iterator[bytes]:
        """Decode the bytes ``data`` brings, piece by piece; _UndecodableBody past the limit or if broken."""
        if self._inflater is None:
            yield data
            return
        while data:
            # Pieces of _READ_BYTES at most: a bomb never lands in memory as one block beside the buffer.
            room = min(self._limit - self._produced + 1, _READ_BYTES)
            try:
                piece = self._inflater.decompress(data, room)
            except zlib.error:
                if self._first and self._coding == "deflate":
                    # Some servers send raw deflate (no zlib header) for "deflate".
                    self._inflater, self._first = zlib.decompressobj(-zlib.MAX_WBITS), False
                    continue
                raise _UndecodableBody(
                    f"The service's answer is not valid {self._coding} data, so it could not be read."
                ) from None
            self._first = False
            self._produced += len(piece)
            if self._produced > self._limit:
                raise _UndecodableBody(
                    f"The service's answer grows past {self._limit / 2**20:.0f} MiB when decompressed, far "
                    "larger than any image it returns; reading stopped."
                )
            yield piece
            data = self._inflater.unconsumed_tail
            if self._inflater.eof:
                # A further gzip member (concatenated gzip is one body) counts against the same limit.
                data = self._inflater.unused_data
                if data and self._coding in ("gzip", "x-gzip"):
                    self._inflater = _DECODERS[self._coding]()
                    continue
                return

    def finish(self) -> Iterator[bytes]:
        """Nothing more: the body ended; _UndecodableBody when its compressed data stopped short."""
        if self._inflater is not None and not self._inflater.eof and not self._first:
            raise _UndecodableBody(
                f"The service's answer ends before its {self._coding} data does, so it could not be read."
            )
        return iter(())


ACCEPT_ENCODING = "gzip, deflate"
MAX_CONTENT_CODINGS = 1
_DECODERS: dict[str, Callable[[], zlib._Decompress]] = {
    "gzip": lambda: zlib.decompressobj(16 + zlib.MAX_WBITS),
    "x-gzip": lambda: zlib.decompressobj(16 + zlib.MAX_WBITS),
    "deflate": lambda: zlib.decompressobj(),
}


class _BodyBuffer:
    """One buffer, sized from Content-Length when there is one: a body costs its size once, in one
    allocation (a growing buffer is copied as it grows, and leaves freed pieces behind). Without a
    length, BytesIO grows in place and getvalue() hands its buffer over uncopied."""

    def __init__(self, expected: int) -> None:
        self._expected = expected
        self._presized: bytearray | None = bytearray(expected) if expected else None
        self._growing = io.BytesIO()
        self.size = 0

    def add(self, chunk: bytes) -> None:
        start, self.size = self.size, self.size + len(chunk)
        if self._presized is not None and self.size <= self._expected:
            self._presized[start : self.size] = chunk
            return
        if self._presized is not None:  # more than announced: carry on in the growing buffer
            self._growing.write(self._presized[:start])
            self._presized = None
        self._growing.write(chunk)

    def value(self, keep_mutable: bool) -> bytes:
        """Return what arrived; ``keep_mutable`` hands a presized buffer over as it is (no copy)."""
        if self._presized is None:
            return self._growing.getvalue()
        if self.size < self._expected:
            del self._presized[self.size :]  # an error status cut short: what arrived
        return self._presized if keep_mutable else bytes(self._presized)  # type: ignore[return-value]


class _RateWindow:
    """Counts bytes per window of ``seconds`` and raises _BodyTooSlow when one came below ``min_rate``."""

    def __init__(self, clock: Callable[[], float], seconds: float, min_rate: float) -> None:
        self._clock = clock
        self._seconds = seconds
        self._min_rate = min_rate
        self._start = clock()
        self._bytes = 0

    def count(self, received: int) -> None:
        self._bytes += received
        now = self._clock()
        if now - self._start >= self._seconds:
            if self._bytes < self._min_rate * (now - self._start):
                raise _BodyTooSlow(self._bytes / (now - self._start))
            self._start, self._bytes = now, 0


# --- transport failures as our errors ------------------------------------------------------


def transport_error(
    exc: Exception, delivered: bool, host: str | None, limits: TransportLimits
) -> TransportError:
    """Build our error for a request that got no answer; ``delivered``: the upload's last byte went out."""
    cause = type(_root_cause(exc)).__name__
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return APITimeoutError(
            f"Could not connect to {host} within {limits.connect_timeout:g} s; check your network "
            "or AITHRIVING_BASE_URL.",
            request_delivered=False,
        )
    if delivered and isinstance(exc, (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError)):
        if isinstance(exc, requests.exceptions.ReadTimeout):
            return ResultMayBeBilledError(
                f"No answer came within {limits.read_timeout:g} s after the upload finished; the service may "
                "have generated and charged for the image, so the request was not sent again."
            )
        return ResultMayBeBilledError(
            f"The connection to {host} broke after the upload finished and before the answer ({cause}); "
            "the service may have charged for a result, so the request was not sent again."
        )
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return APITimeoutError(
            f"{host} stopped accepting the upload for {limits.read_timeout:g} s; nothing was charged.",
            request_delivered=False,
        )
    if isinstance(exc, requests.exceptions.SSLError):
        return APIConnectionError(
            f"The secure connection to {host} failed ({cause}); check the system clock and certificates.",
            request_delivered=False,
        )
    if isinstance(exc, requests.exceptions.ProxyError):
        return APIConnectionError(
            f"The proxy refused the connection to {host}; check HTTPS_PROXY/HTTP_PROXY.",
            request_delivered=False,
        )
    return APIConnectionError(
        f"Could not reach {host} ({cause}); check your network or AITHRIVING_BASE_URL.",
        request_delivered=False,
    )


class _BodyTooSlow(Exception):
    """The answer's body arrived slower than the client's minimum rate."""

    def __init__(self, rate: float) -> None:
        super().__init__(rate)
        self.rate = rate


def _broken_answer_message(exc: BaseException, size: int, declared: str | None, min_rate: float) -> str:
    """One sentence for an answer (HTTP 200) whose body could not be read whole: it may have been charged."""
    tail = "the service may have charged for the image, so the request was not sent again."
    if isinstance(exc, _BodyTooSlow):
        return (
            f"The service's answer arrived at {exc.rate / 1024:.1f} KiB/s, below the {min_rate / 1024:.0f} "
            f"KiB/s the client waits for, and reading stopped after {size:,} bytes; {tail}"
        )
    root = _root_cause(exc)
    if isinstance(root, (socket.timeout, urllib3.exceptions.ReadTimeoutError)) or "timed out" in str(root):
        return f"The service's answer stopped arriving after {size:,} bytes (read timeout); {tail}"
    if declared and declared.isdigit() and size < int(declared):
        return (
            f"The service's answer broke off after {size:,} of the {int(declared):,} bytes it announced "
            f"({type(root).__name__}); {tail}"
        )
    return f"The service's answer broke off before it was complete ({type(root).__name__}); {tail}"


def _root_cause(exc: BaseException) -> BaseException:
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = exc.__cause__ or exc.__context__
        if inner is None and exc.args and isinstance(exc.args[0], BaseException):
            inner = exc.args[0]
        if inner is None:
            # urllib3 keeps the socket error in .reason
            inner = (
                getattr(exc, "reason", None)
                if isinstance(getattr(exc, "reason", None), BaseException)
                else None
            )
        if inner is None:
            return exc
        exc = inner
    return exc
