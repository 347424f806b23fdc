"""The free offline mode: an in-process stand-in on loopback, started on first use, and the client a run uses.

The stand-in answers like the service with images drawn from the input's edges; it needs no key and
charges nothing (its answers carry the stand-in mark, so every figure the client reports is 0 credits).
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from .client import StructureClient
from .config import load_api_key, resolve_base_url
from .errors import ConfigurationError
from .settings import offline_mode
from .standin import StandInServer
from .store import ResultStore

# The stand-in checks no key; the client still wants one to put in the header.
STANDIN_KEY = "stand-in"
STANDIN_LABEL = "stand-in · free"


class InProcessStandIn:
    """One stand-in for the process, started when a run first needs it, stopped when idle and not wanted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._server: StandInServer | None = None
        self._users = 0
        self._wanted = True

    @property
    def running(self) -> bool:
        """Whether the stand-in is listening now."""
        with self._lock:
            return self._server is not None

    @contextlib.contextmanager
    def use(self) -> Iterator[str]:
        """Yield the stand-in's URL, keeping it running for the duration of the block."""
        with self._lock:
            self._wanted = True
            if self._server is None:
                # No records: nobody reads them here, and each would hold an upload of up to
                # MAX_REQUEST_BYTES.
                self._server = StandInServer(host="127.0.0.1", port=0, max_records=0, free=True).start()
            self._users += 1
            url = self._server.url
        try:
            yield url
        finally:
            with self._lock:
                self._users -= 1
                to_stop = self._take_if_idle()
            if to_stop is not None:
                to_stop.stop()

    def release(self) -> None:
        """Stop it now if no run uses it, else when the last one ends (offline mode was switched off)."""
        with self._lock:
            self._wanted = False
            to_stop = self._take_if_idle()
        if to_stop is not None:
            to_stop.stop()

    def _take_if_idle(self) -> StandInServer | None:
        if self._wanted or self._users or self._server is None:
            return None
        server, self._server = self._server, None
        return server


_process_standin: InProcessStandIn | None = None
_process_standin_lock = threading.Lock()


def process_standin() -> InProcessStandIn:
    """Return the one InProcessStandIn of this process (nothing starts until a run uses it)."""
    global _process_standin
    with _process_standin_lock:
        if _process_standin is None:
            _process_standin = InProcessStandIn()
        return _process_standin


def request_destination(environ: Mapping[str, str] | None = None) -> str:
    """Say where a run's requests go now: the stand-in (offline mode) or the service's address (no key)."""
    if offline_mode(environ):
        return "offline: the stand-in"
    try:
        return resolve_base_url(environ)
    except ConfigurationError:
        return "an unusable AITHRIVING_BASE_URL"  # the run itself says what is wrong with it


def destination_fingerprint(environ: Mapping[str, str] | None = None) -> str:
    """Digest request_destination(): ComfyUI writes a fingerprint into every saved PNG's metadata,
    so it names neither the mode nor the address."""
    return hashlib.sha256(request_destination(environ).encode("utf-8")).hexdigest()[:16]


@dataclass
class RunSetup:
    """What one node run talks to: the client, the result store (memory-only in offline mode), the mode."""

    client: StructureClient
    store: ResultStore
    offline: bool


@contextlib.contextmanager
def client_for_run(standin: InProcessStandIn, environ: Mapping[str, str] | None = None) -> Iterator[RunSetup]:
    """Yield the paid service as configured, or the in-process stand-in in offline mode; close it afterwards.

    Configuration errors (no key, bad base URL) surface here, before any image is encoded.
    The stand-in's results skip the configured store: they are free to make again and must never mix with paid
    ones.
    """
    if offline_mode(environ):
        with standin.use() as url:
            client = StructureClient(api_key=STANDIN_KEY, base_url=url)
            try:
                yield RunSetup(client=client, store=ResultStore(None), offline=True)
            finally:
                client.close()
        return
    store = ResultStore.from_env(environ)
    client = StructureClient(api_key=load_api_key(environ), base_url=resolve_base_url(environ))
    try:
        yield RunSetup(client=client, store=store, offline=False)
    finally:
        client.close()
