"""Scripted faults (what tests and fault_rate play instead of the normal answer)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Union

from .answers import body_bytes, error_payload


# The faults a fault_rate draw picks from: retryable statuses or a failed generation.
FAULT_KINDS = ("429", "500", "502", "503", "504", "code-1")

_ACTIONS = ("respond", "drop", "drop_before_read", "truncate", "hang", "stream")


@dataclass
class Fault:
    """One scripted answer, used for the next request instead of the normal behaviour."""

    status: int = 200
    body: Union[bytes, str, dict, None] = None  # dict -> JSON; None -> default body for the status
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering (after reading the request)
    # "respond" | "drop" (close after reading the request, no answer) | "drop_before_read" (close
    # before reading the body) | "truncate" (announce the full Content-Length, send half, close)
    # | "hang" (read the request, never answer until the server stops) | "stream" (send
    # body_chunks() chunked, or raw under a Content-Length given in headers)
    action: str = "respond"
    body_chunks: Optional[Callable[[], Iterable[bytes]]] = None  # for action="stream"
    passthrough: bool = False  # answer normally (generate the image), but after `delay`

    def __post_init__(self) -> None:
        if self.action not in _ACTIONS:
            raise ValueError(f"Fault action must be one of {', '.join(_ACTIONS)}; got {self.action!r}.")
        if not 100 <= int(self.status) <= 599:
            raise ValueError(f"Fault status must be an HTTP status 100..599; got {self.status!r}.")
        if self.delay < 0 or not math.isfinite(self.delay):
            raise ValueError(f"Fault delay must be a finite number of seconds >= 0; got {self.delay!r}.")

    @property
    def label(self) -> str:
        """What RecordedRequest.fault says for this fault."""
        if self.passthrough:
            return "passthrough"
        return str(self.status) if self.action == "respond" else self.action

    def play(self, exchange) -> None:
        """Answer through the handler (``handler.StandInHandler``) as this fault says."""
        if self.passthrough:
            exchange.answer_normally(self.delay, self.headers)
            return
        if self.action == "drop_before_read":
            exchange.record()
            exchange.drop()
            return
        exchange.read_request()
        if self.action == "hang":
            exchange.wait_until_stopped()
            exchange.drop()
            return
        exchange.wait(self.delay)
        if self.action == "drop":
            exchange.drop()
            return
        if self.action == "stream":
            if self.body_chunks is not None:
                chunks = self.body_chunks()
            elif self.body is None or isinstance(self.body, (bytes, str, dict)):
                chunks = [body_bytes(self.body, self.status)[0]]
            else:
                chunks = self.body
            exchange.stream(self.status, self.headers, chunks)
            return
        body, content_type = body_bytes(self.body, self.status)
        if self.action == "truncate":
            exchange.send(self.status, body[: len(body) // 2], content_type, self.headers, announced_length=len(body))
            exchange.drop()
            return
        exchange.send(self.status, body, content_type, self.headers)


def random_fault(kind: str) -> Fault:
    """The fault a fault_rate draw of `kind` (one of FAULT_KINDS) plays."""
    if kind == "429":
        return _Labelled(status=429, headers={"Retry-After": "0"}, label_text=kind)
    if kind == "code-1":
        return _Labelled(status=200, body=error_payload(
            "Generation failed, please try again.", "generation_failed",
            ["the generation did not produce an image"]), label_text=kind)
    return _Labelled(status=int(kind), label_text=kind)


@dataclass
class _Labelled(Fault):
    """A fault drawn by fault_rate; records its kind ("503", "code-1") as the label."""

    label_text: str = ""

    @property
    def label(self) -> str:
        return self.label_text
