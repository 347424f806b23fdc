"""Scripted faults: what tests (and fault_rate draws) play instead of the normal answer.

Each fault is a small type that plays itself through the handler's narrow interface, ``Exchange``:

    server.script(Respond(503), Respond(200, body=b"{not json"), Drop(), Hang(), Passthrough(delay=0.4))

``RecordedRequest.fault`` says which fault answered a request: the status for ``Respond`` ("503"),
"code-1" for ``GenerationFailed``, otherwise the fault's kind ("drop", "drop_before_read",
"truncate", "hang", "stream", "passthrough", "raw").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from .bodies import body_bytes, error_payload

# The faults a fault_rate draw picks from: retryable statuses or a failed generation.
FAULT_KINDS = ("429", "500", "502", "503", "504", "code-1")

Body = bytes | str | dict | list | None  # dict or list -> JSON; None -> the default body for the status


class Exchange(Protocol):
    """What a fault acts through: one request on the stand-in's handler."""

    def read_request(self) -> None:
        """Read the body (up to 64 MiB) and record the request."""

    def record(self) -> None:
        """Record the request without reading its body."""

    def wait(self, seconds: float) -> None:
        """Sleep; the connection is dropped if the server stops meanwhile."""

    def wait_until_stopped(self) -> None:
        """Block until the server begins to stop."""

    def send(
        self,
        status: int,
        body: bytes,
        content_type: str,
        headers: dict[str, str] | None = None,
        *,
        announced_length: int | None = None,
    ) -> None:
        """Write one answer (the caller's headers win)."""

    def stream(self, status: int, headers: dict[str, str], chunks: Iterable[bytes]) -> None:
        """Write an answer whose body comes in chunks, then close."""

    def drop(self) -> None:
        """Close the connection without an answer."""

    def send_raw(self, data: bytes) -> None:
        """Write ``data`` as the whole answer, byte for byte (status lines, headers), then close."""

    def answer_normally(self, delay: float = 0.0, headers: dict[str, str] | None = None) -> None:
        """Answer as the stand-in normally does, `delay` later, with `headers` added."""


class Fault:
    """One scripted answer, used for the next request instead of the normal behaviour.

    A subclass names its kind (``class Hang(Fault, kind="hang")``), what RecordedRequest.fault says.
    """

    kind: ClassVar[str] = ""

    def __init__(self, *args: object, **kwargs: object) -> None:
        # Only the types below are played (each dataclass has its own __init__); the old Fault(...) is gone.
        raise TypeError(
            "Fault is the base of the fault types: script Respond(503), Drop(), Hang(), ... instead."
        )

    def __init_subclass__(cls, kind: str = "", **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if kind:
            cls.kind = kind

    def __post_init__(self) -> None:
        # The dataclasses below call this: a status and a delay, where a fault has them, are checked once
        # here.
        status, delay = getattr(self, "status", 200), getattr(self, "delay", 0.0)
        if not 100 <= int(status) <= 599:
            raise ValueError(f"A fault's status must be an HTTP status 100..599; got {status!r}.")
        if delay < 0 or not math.isfinite(delay):
            raise ValueError(f"A fault's delay must be a finite number of seconds >= 0; got {delay!r}.")

    @property
    def label(self) -> str:
        """What RecordedRequest.fault says for this fault."""
        return self.kind

    def play(self, exchange: Exchange) -> None:
        """Answer the request (or not) through `exchange`."""
        raise NotImplementedError


@dataclass(frozen=True)
class Respond(Fault):
    """Answer `status` with `body` (the status's default body when None) and `headers`, `delay` s later."""

    status: int
    body: Body = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0

    @property
    def label(self) -> str:
        return str(self.status)

    def play(self, exchange: Exchange) -> None:
        exchange.read_request()
        exchange.wait(self.delay)
        body, content_type = body_bytes(self.body, self.status)
        exchange.send(self.status, body, content_type, self.headers)


@dataclass(frozen=True)
class GenerationFailed(Respond):
    """HTTP 200 with the service's ``code: -1`` "Generation failed" body (a fault_rate draw's "code-1")."""

    status: int = 200
    body: Body = field(
        default_factory=lambda: error_payload(
            "Generation failed, please try again.",
            "generation_failed",
            ["the generation did not produce an image"],
        )
    )

    @property
    def label(self) -> str:
        return "code-1"


@dataclass(frozen=True)
class Truncate(Fault, kind="truncate"):
    """Announce the whole body's Content-Length, send half of it, close."""

    status: int = 200
    body: Body = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0

    def play(self, exchange: Exchange) -> None:
        exchange.read_request()
        exchange.wait(self.delay)
        body, content_type = body_bytes(self.body, self.status)
        exchange.send(
            self.status, body[: len(body) // 2], content_type, self.headers, announced_length=len(body)
        )
        exchange.drop()


@dataclass(frozen=True)
class Stream(Fault, kind="stream"):
    """Send ``chunks()`` as they come: chunked, or raw under a Content-Length given in `headers`."""

    chunks: Callable[[], Iterable[bytes]]
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0

    def play(self, exchange: Exchange) -> None:
        exchange.read_request()
        exchange.wait(self.delay)
        exchange.stream(self.status, self.headers, self.chunks())


@dataclass(frozen=True)
class Raw(Fault, kind="raw"):
    """Answer with ``data`` written as it is: status lines, headers, body, however odd (a 103, then a 200)."""

    data: bytes
    delay: float = 0.0

    def play(self, exchange: Exchange) -> None:
        exchange.read_request()
        exchange.wait(self.delay)
        exchange.send_raw(self.data)


@dataclass(frozen=True)
class Drop(Fault, kind="drop"):
    """Read the request, then close the connection `delay` s later without an answer."""

    delay: float = 0.0

    def play(self, exchange: Exchange) -> None:
        exchange.read_request()
        exchange.wait(self.delay)
        exchange.drop()


@dataclass(frozen=True)
class DropBeforeRead(Fault, kind="drop_before_read"):
    """Close the connection before reading the request's body."""

    def play(self, exchange: Exchange) -> None:
        exchange.record()
        exchange.drop()


@dataclass(frozen=True)
class Hang(Fault, kind="hang"):
    """Read the request, then never answer until the server stops."""

    def play(self, exchange: Exchange) -> None:
        exchange.read_request()
        exchange.wait_until_stopped()
        exchange.drop()


@dataclass(frozen=True)
class Passthrough(Fault, kind="passthrough"):
    """Answer normally (generate the image, charge it), but `delay` s later and with `headers` added."""

    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)

    def play(self, exchange: Exchange) -> None:
        exchange.answer_normally(self.delay, self.headers)


def random_fault(kind: str) -> Fault:
    """Return the fault a fault_rate draw of `kind` (one of FAULT_KINDS) plays."""
    if kind == "code-1":
        return GenerationFailed()
    if kind == "429":
        return Respond(429, headers={"Retry-After": "0"})
    return Respond(int(kind))
