"""The stand-in's books: the requests it saw, the scripted faults still to play, the credits it charged."""

from __future__ import annotations

import collections
import random
import threading
from dataclasses import dataclass, field

from ..contract import CREDITS_PER_IMAGE
from .faults import FAULT_KINDS, Fault, random_fault


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the stand-in saw it, and the status it answered with (0 if it never answered)."""

    method: str
    path: str  # the request target as sent, query string included
    headers: dict[str, str]  # names lower-cased
    fields: dict[str, str]  # text form fields
    image_bytes: bytes | None
    image_filename: str | None
    image_content_type: str | None
    body_size: int  # bytes of body actually read
    received_at: float  # time.monotonic() when the request head had been read
    status: int
    fault: str | None = None  # "503", "code-1", "drop", "passthrough", ... or None for normal behaviour
    answered_at: float | None = None  # time.monotonic() when the answer began (None: not answered)


@dataclass
class Entry:
    """The mutable record of a request in flight; snapshots turn it into a RecordedRequest."""

    method: str
    path: str
    headers: dict[str, str]
    received_at: float
    fault: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    image_bytes: bytes | None = None
    image_filename: str | None = None
    image_content_type: str | None = None
    body_size: int = 0
    status: int = 0
    answered_at: float | None = None

    def freeze(self) -> RecordedRequest:
        """Return a snapshot of the entry as it stands."""
        return RecordedRequest(
            method=self.method,
            path=self.path,
            headers=dict(self.headers),
            fields=dict(self.fields),
            image_bytes=self.image_bytes,
            image_filename=self.image_filename,
            image_content_type=self.image_content_type,
            body_size=self.body_size,
            received_at=self.received_at,
            status=self.status,
            fault=self.fault,
            answered_at=self.answered_at,
        )


class Books:
    """What one stand-in keeps behind one lock: recorded requests, queued faults, fault draws, credits."""

    def __init__(
        self, *, fault_rate: float = 0.0, fault_seed: int = 0, max_records: int | None = None
    ) -> None:
        if not 0.0 <= fault_rate <= 1.0:
            raise ValueError(f"fault_rate must be between 0 and 1; got {fault_rate!r}.")
        if max_records is not None and max_records < 0:
            raise ValueError(f"max_records must be >= 0 or None; got {max_records!r}.")
        self.fault_rate = float(fault_rate)
        self._random = random.Random(fault_seed)
        self._lock = threading.Lock()
        self._faults: collections.deque[Fault] = collections.deque()
        self._max_records = max_records
        self._records: collections.deque[Entry] = collections.deque(maxlen=max_records)
        self._credits = 0

    def script(self, faults: tuple[Fault, ...]) -> None:
        """Queue faults for the next requests, in order."""
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

    def take_fault(self, *, api_call: bool) -> Fault | None:
        """Take the next scripted fault, else (for a call to the endpoint) a fault_rate draw, else None."""
        with self._lock:
            if self._faults:
                return self._faults.popleft()
            if not api_call or self.fault_rate <= 0 or self._random.random() >= self.fault_rate:
                return None
            kind = self._random.choice(FAULT_KINDS)
        return random_fault(kind)

    def record(self, entry: Entry) -> None:
        """Keep a request (still in flight: its status is filled in when it is answered)."""
        with self._lock:
            self._records.append(entry)

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every recorded request, in arrival order."""
        with self._lock:
            return [entry.freeze() for entry in self._records]

    def clear(self) -> None:
        """Forget recorded requests and queued faults (the credits are kept)."""
        with self._lock:
            self._records = collections.deque(maxlen=self._max_records)
            self._faults.clear()

    def charge(self) -> None:
        """Count one successful generation."""
        with self._lock:
            self._credits += CREDITS_PER_IMAGE

    @property
    def credits_spent(self) -> int:
        """CREDITS_PER_IMAGE per successful generation so far."""
        with self._lock:
            return self._credits
