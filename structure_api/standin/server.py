"""The stand-in's server: its life cycle (bind, start, stop), its connections, and the normal answer."""

from __future__ import annotations

import base64
import hmac
import ipaddress
import logging
import math
import secrets
import socket
import socketserver
import sys
import threading
import time
from http.server import ThreadingHTTPServer

from ..contract import ENDPOINT_PATH, LOCKOUT_SECONDS, MAX_REQUEST_BYTES, MAX_SEED
from ..ratelimit import RateLimit
from .bodies import error_payload, success_payload
from .faults import Fault
from .handler import StandInHandler, Stopped
from .multipart import Form, InvalidUpload
from .records import Books, RecordedRequest
from .render import render_structure
from .upstream_limit import UpstreamRateLimit
from .validation import form_to_job

log = logging.getLogger("structure_api.standin")

# How long stop() waits for handler threads; hung and delayed handlers wake at once on stop.
_JOIN_TIMEOUT = 2.0

_WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


class _HTTPServer(ThreadingHTTPServer):
    """One thread per connection, each tracked (with its socket) so stop() can end and join them."""

    daemon_threads = True
    block_on_close = False  # threads are tracked and joined by StandInServer.stop instead
    request_queue_size = 128
    # POSIX: SO_REUSEADDR only lets a restart bind past old connections in TIME_WAIT. On Windows it would
    # let a second server bind a port already in use; there SO_EXCLUSIVEADDRUSE makes such a bind fail.
    allow_reuse_address = sys.platform != "win32"

    def __init__(self, address: tuple, standin: StandInServer, family: int) -> None:
        self.address_family = family
        self.standin = standin
        self.lock = threading.Lock()
        self.threads: set[threading.Thread] = set()
        self.connections: set[socket.socket] = set()
        super().__init__(address, StandInHandler)

    def server_bind(self) -> None:
        if sys.platform == "win32" and hasattr(socket, "SO_EXCLUSIVEADDRUSE"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn), which can stall for seconds.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[0], self.server_address[1]

    def process_request(self, request: socket.socket, client_address: tuple) -> None:
        with self.lock:
            if self.standin.stopping:
                self.shutdown_request(request)
                return
            thread = threading.Thread(
                target=self._serve_connection,
                args=(request, client_address),
                name=f"standin-{self.server_port}-conn",
                daemon=True,
            )
            self.threads.add(thread)
            self.connections.add(request)
        thread.start()

    def _serve_connection(self, request: socket.socket, client_address: tuple) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            with self.lock:
                # Removed before closing, so stop() never shuts down a closed (reused) descriptor.
                self.connections.discard(request)
            self.shutdown_request(request)
            with self.lock:
                self.threads.discard(threading.current_thread())

    def handle_error(self, request: object, client_address: object) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError, Stopped)) or self.standin.stopping:
            log.debug("connection from %s ended: %r", client_address, error)
        else:
            log.exception("stand-in handler failed for %s", client_address)

    def drop_connections(self) -> list[threading.Thread]:
        """Shut down every open connection; the handler threads still running, to join."""
        with self.lock:
            for connection in list(self.connections):
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                    if sys.platform == "win32":
                        # Windows (and Wine) do not wake a thread blocked reading a socket that was shut
                        # down; closing the handle does (close() alone would wait for the handler's file
                        # objects to let go of it). The handler's own close then finds it closed.
                        connection._real_close()
                except OSError:
                    pass
            return list(self.threads)


def check_listen_address(host: str) -> int:
    """Choose the socket family to listen on ``host`` with; ValueError (one sentence) for all interfaces.

    Every spelling of "all interfaces" is refused, not only the usual ones: "0", "0.0.0.0", "::",
    "::ffff:0.0.0.0" and names that resolve to such an address all open the stand-in to the network.
    """
    bare = host.strip().strip("[]")
    refusal = (
        f"The stand-in does not listen on all interfaces ({host!r}); give one address, such as "
        "127.0.0.1 (the default, this machine only)."
    )
    if bare in _WILDCARD_HOSTS:
        raise ValueError(refusal)
    try:
        found = socket.getaddrinfo(bare, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        found = []  # not resolvable now: bind says so, in its own words
    for _family, _, _, _, address in found:
        ip = ipaddress.ip_address(address[0].split("%", 1)[0])
        mapped = getattr(ip, "ipv4_mapped", None)
        if ip.is_unspecified or (mapped is not None and mapped.is_unspecified):
            raise ValueError(refusal)
    try:
        return socket.AF_INET6 if ipaddress.ip_address(bare).version == 6 else socket.AF_INET
    except ValueError:
        return socket.AF_INET  # a host name such as "localhost"


class StandInServer:
    """The stand-in on a background thread: ``with StandInServer() as server: ... server.url``."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        latency: float = 0.0,
        fault_rate: float = 0.0,
        fault_seed: int = 0,
        max_records: int | None = None,
        free: bool = False,
        rate_limit: RateLimit | str | UpstreamRateLimit | None = None,
        lockout: float = LOCKOUT_SECONDS,
    ) -> None:
        """Bind to host:port at once (port 0 picks a free one); start() begins answering.

        free marks every answer as free of charge (STANDIN_HEADER), as `serve`, `--offline` and the
        node's offline mode want; without it the stand-in plays the paid service, as billing tests want.

        max_records keeps only the newest N recorded requests (each holds its upload, up to
        MAX_REQUEST_BYTES); None keeps all, as tests want, 0 keeps none, as a long-running `serve` wants.
        rate_limit (such as "150/10") and lockout model the upstream's limit: past it, 429s
        without Retry-After for ``lockout`` seconds, never charged (``rate_limit.refused`` counts them).
        """
        if latency < 0 or not math.isfinite(latency):
            raise ValueError(f"latency must be a finite number of seconds >= 0; got {latency!r}.")
        self.books = Books(fault_rate=fault_rate, fault_seed=fault_seed, max_records=max_records)
        if api_key is not None and not api_key:
            raise ValueError("api_key must be a non-empty string, or None for no key check.")
        family = check_listen_address(host)
        self._api_key = api_key.encode("utf-8") if api_key is not None else None
        self.free = bool(free)
        self.latency = float(latency)
        if rate_limit is None or isinstance(rate_limit, UpstreamRateLimit):
            self.rate_limit = rate_limit
        else:
            self.rate_limit = UpstreamRateLimit(rate_limit, lockout)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._serve_thread: threading.Thread | None = None
        self._stopped = False
        # Bound here, so url and port are known before start(); start() begins answering.
        self._httpd = _HTTPServer((host.strip("[]"), port), self, family)
        self.port: int = self._httpd.server_address[1]
        bound = self._httpd.server_address[0]
        self.host: str = bound
        self.url: str = (
            f"http://[{bound}]:{self.port}" if family == socket.AF_INET6 else f"http://{bound}:{self.port}"
        )

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else ("running" if self._serve_thread else "bound")
        return f"StandInServer(url={self.url!r}, {state}, key={'required' if self._api_key else 'none'})"

    @property
    def endpoint(self) -> str:
        """The full URL of the Structure endpoint on this server."""
        return self.url + ENDPOINT_PATH

    @property
    def fault_rate(self) -> float:
        """The share of endpoint calls answered with a drawn fault (FAULT_KINDS)."""
        return self.books.fault_rate

    # --- life cycle ------------------------------------------------------------------------

    def start(self) -> StandInServer:
        """Serve in a background daemon thread; returns self."""
        with self._lock:
            if self._stopped:
                raise RuntimeError("This stand-in was stopped; create a new StandInServer.")
            if self._serve_thread is None:
                self._serve_thread = threading.Thread(
                    target=self._httpd.serve_forever,
                    kwargs={"poll_interval": 0.05},
                    name=f"standin-{self.port}-accept",
                    daemon=True,
                )
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
        threads = self._httpd.drop_connections()
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

    def wait_until_stopping(self, timeout: float | None = None) -> bool:
        """Block until stop() begins or ``timeout`` seconds pass; True when it has begun."""
        return self._stopping.wait(timeout)

    def __enter__(self) -> StandInServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- what tests script and read ------------------------------------------------------

    def script(self, *faults: Fault) -> None:
        """Queue faults: the next requests answer with them in order, then normal behaviour resumes."""
        self.books.script(faults)

    @property
    def pending_faults(self) -> int:
        """How many scripted faults have not been used yet."""
        return self.books.pending_faults

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request so far (health checks included), in arrival order; see max_records."""
        return self.books.requests

    def clear(self) -> None:
        """Forget recorded requests and queued faults (credits_spent is kept)."""
        self.books.clear()

    @property
    def credits_spent(self) -> int:
        """What the real service would have charged: CREDITS_PER_IMAGE per successful generation."""
        return self.books.credits_spent

    # --- the normal behaviour --------------------------------------------------------------

    def answer(
        self,
        method: str,
        route: str,
        headers: dict[str, str],
        body: bytes | None,
        form: Form | InvalidUpload | None,
    ) -> tuple[int, dict, dict[str, str]]:
        """Answer one request as the service does: (status, JSON payload, extra headers)."""
        if route != ENDPOINT_PATH:
            return 404, error_payload("Not found.", "not_found", [f"{route}: no such endpoint"]), {}
        if method != "POST":
            return (
                405,
                error_payload(
                    "Method not allowed.", "method_not_allowed", [f"{method}: only POST is accepted"]
                ),
                {"Allow": "POST"},
            )
        if self._api_key is not None:
            # http.server decodes header bytes as latin-1; encoding back gives the bytes as sent.
            given = headers.get("authorization", "").encode("latin-1", "replace")
            if not hmac.compare_digest(given, self._api_key):
                return (
                    401,
                    error_payload(
                        "Invalid or missing API key.",
                        "unauthorized",
                        ["authorization header is missing or invalid"],
                    ),
                    {},
                )
        if body is None or len(body) > MAX_REQUEST_BYTES:
            return (
                413,
                error_payload(
                    f"Request body is larger than {MAX_REQUEST_BYTES // 2**20} MiB.",
                    "payload_too_large",
                    [f"body: must be at most {MAX_REQUEST_BYTES} bytes"],
                ),
                {},
            )
        try:
            if form is None:
                raise InvalidUpload("content-type: must be multipart/form-data")
            if isinstance(form, InvalidUpload):
                raise form
            job = form_to_job(form)
        except InvalidUpload as problem:
            reason = str(problem)
            return 400, error_payload(reason, "bad_request", [reason]), {}
        seed = job.form.seed or secrets.randbelow(MAX_SEED) + 1
        image = render_structure(job.pixels, **{**job.form.form_values(), "seed": seed})
        encoded = base64.b64encode(image).decode("ascii")
        return 200, success_payload(encoded, seed), {}
