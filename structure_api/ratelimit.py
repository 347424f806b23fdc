"""The pacer: requests start within the service's rate limit, and a 429 pauses every worker of the process.

The upstream serves at most 150 requests in any 10 s and answers 429 for 60 s to a caller that
goes past that. One ``Pacer`` per endpoint and process (``shared_pacer``) is shared by every
client of that endpoint, so the node, the CLI and any number of threads count together:

- A request takes a slot before it starts; when the window is full it waits for one (a wait,
  not a retry: nothing was sent). A slot counts from the moment its upload was sent, plus a
  small margin, so the service, which sees each request somewhat after it starts, never counts
  more than the limit in its own window.
- A 429 pauses every request of the process, not just the one that got it. When the pause is
  over, one request goes first (the probe); the others follow once it got an answer that is not
  a 429, or once it has gone unanswered for a moment (a 429 comes back at once). A lock-out is so
  probed by one request at a time, never by every worker at once.
- Every wait ends at once on cancel: the caller's ``wait`` raises, and waits for an event are
  cut into short slices that check ``check_cancel``.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

from ._constants import PROBE_GRACE_SECONDS
from .contract import LOCKOUT_SECONDS, RATE_LIMIT_REQUESTS, RATE_LIMIT_SECONDS
from .errors import ConfigurationError, RateLimitError

ENV_RATE_LIMIT = "AITHRIVING_RATE_LIMIT"
# The upstream's limit (see the API contract): beyond it, a lock-out.
UPSTREAM_LOCKOUT_SECONDS = LOCKOUT_SECONDS
WAITING_FOR_SLOT = "waiting for a free slot under the service's rate limit"
# Once the service has been given up on (429s for longer than the retry policy waits), requests
# of this process are refused without being sent for this long, instead of each probing again.
REFUSE_AFTER_GIVING_UP_SECONDS = UPSTREAM_LOCKOUT_SECONDS
# Waits for an event (a slot's upload to finish, a probe's answer) are cut into slices this
# long, so a cancel is seen within one of them.
_EVENT_SLICE_SECONDS = 0.1


@dataclass(frozen=True)
class RateLimit:
    """At most ``requests`` requests starting in any ``seconds`` seconds."""

    requests: int
    seconds: float

    def __str__(self) -> str:
        return f"{self.requests}/{self.seconds:g}"

    @property
    def per_second(self) -> float:
        """The sustained rate the limit allows."""
        return self.requests / self.seconds


DEFAULT_RATE_LIMIT = RateLimit(requests=RATE_LIMIT_REQUESTS, seconds=RATE_LIMIT_SECONDS)
_RATE_LIMIT_TEXT = re.compile(r"([0-9]{1,7})\s*/\s*([0-9]{1,5}(?:\.[0-9]+)?)\s*s?")
_OFF = ("off", "none", "unlimited")


def parse_rate_limit(text: str, *, source: str = ENV_RATE_LIMIT) -> Optional[RateLimit]:
    """``"150/10"`` (requests per seconds) as a RateLimit; ``"off"`` as None (no pacing)."""
    value = text.strip().lower()
    if value in _OFF:
        return None
    match = _RATE_LIMIT_TEXT.fullmatch(value)
    requests = int(match.group(1)) if match else 0
    seconds = float(match.group(2)) if match else 0.0
    if not match or requests < 1 or not 0 < seconds <= 3600:
        # The value is not repeated: a key pasted into the wrong variable would be printed back.
        raise ConfigurationError(
            f"{source} must be a number of requests per seconds such as {DEFAULT_RATE_LIMIT} (150 requests in "
            f"any 10 s, at least 1 request, at most 3600 s) or off; the value set ({len(text)} characters) "
            "is not one.")
    return RateLimit(requests=requests, seconds=seconds)


def rate_limit_from_env(environ: Optional[Mapping[str, str]] = None) -> Optional[RateLimit]:
    """AITHRIVING_RATE_LIMIT as a RateLimit (default 150/10), or None when set to off."""
    env = os.environ if environ is None else environ
    value = env.get(ENV_RATE_LIMIT, "")
    if not value.strip():
        return DEFAULT_RATE_LIMIT
    return parse_rate_limit(value)


def default_margin(limit: RateLimit) -> float:
    """Seconds added to the window: 2 % of it, at least a tenth of a second (10.2 s for 150/10).

    Small, because slots already count from when each upload went out, which is after the
    service saw the request arrive; the margin covers clocks and jitter, not the network.
    """
    return max(0.1, 0.02 * limit.seconds)


class PacerSlot:
    """One request's place in the window; ``sent()`` when its upload went out, ``finish()`` when done."""

    __slots__ = ("_pacer", "started", "sent_at", "finished")

    def __init__(self, pacer: "Pacer", started: float) -> None:
        self._pacer = pacer
        self.started = started
        self.sent_at: Optional[float] = None  # None: still uploading, counts as "now"
        self.finished = False

    def sent(self) -> None:
        """The upload is out: the window counts this request from now."""
        self._pacer._slot_sent(self)

    def finish(self, *, rate_limited: bool) -> None:
        """The attempt ended; ``rate_limited`` when its answer was a 429. Idempotent."""
        self._pacer._slot_finished(self, rate_limited)


@dataclass(frozen=True)
class PacerDecision:
    """What ``Pacer.next_start`` decided: a slot, or how long to wait and why."""

    slot: Optional[PacerSlot]
    wait: Optional[float]  # seconds; None: until something happens (a slot's upload, a probe's answer)
    reason: str  # "" with a slot; else "window" | "paused" | "probe"


class Pacer:
    """Shared pacing state of one endpoint: the window of recent starts, the pause after a 429, the probe."""

    def __init__(
        self,
        limit: Optional[RateLimit] = DEFAULT_RATE_LIMIT,
        *,
        clock: Callable[[], float] = time.monotonic,
        margin: Optional[float] = None,
        probe_grace: float = PROBE_GRACE_SECONDS,
    ) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._clock = clock
        self._margin = margin
        self._probe_grace = probe_grace
        self._slots: list[PacerSlot] = []
        self._paused_until = -math.inf
        self._probe_pending = False
        self._probe: Optional[PacerSlot] = None
        self._streak = 0
        self._streak_started: Optional[float] = None
        self._refused_until = -math.inf
        self._refused_reason = ""
        self.limit = limit
        self.starts = 0  # slots handed out, for tests and reports

    def __repr__(self) -> str:
        return f"Pacer(limit={self.limit or 'off'})"

    # -- configuration ---------------------------------------------------------------

    @property
    def limit(self) -> Optional[RateLimit]:
        """The configured limit; None: no pacing (429s still pause everyone)."""
        return self._limit

    @limit.setter
    def limit(self, limit: Optional[RateLimit]) -> None:
        self._limit = limit
        margin = self._margin if self._margin is not None else (default_margin(limit) if limit else 0.0)
        self.window_seconds = (limit.seconds + margin) if limit else 0.0

    # -- the decision (no waiting): what the unit tests drive with an injected clock ------

    def next_start(self, now: Optional[float] = None) -> PacerDecision:
        """A slot if a request may start at ``now``, else how long to wait; raises after giving up."""
        with self._lock:
            return self._decide(self._clock() if now is None else now)

    def _decide(self, now: float) -> PacerDecision:
        if now < self._refused_until:
            raise RateLimitError(self._refused_reason)
        if now < self._paused_until:
            return PacerDecision(None, self._paused_until - now, "paused")
        becomes_probe = False
        if self._probe_pending:
            probe = self._probe
            if probe is None:
                becomes_probe = True
            elif probe.sent_at is not None and now >= probe.sent_at + self._probe_grace:
                self._probe_pending = False  # unanswered for a while: not refused
                self._probe = None
            else:
                wait = None if probe.sent_at is None else probe.sent_at + self._probe_grace - now
                return PacerDecision(None, wait, "probe")
        if self._limit is not None:
            horizon = now - self.window_seconds
            self._slots = [s for s in self._slots if s.sent_at is None or s.sent_at > horizon]
            if len(self._slots) >= self._limit.requests:
                counted = [s.sent_at for s in self._slots if s.sent_at is not None]
                # Enough slots leave the window when the oldest of those that must go has left it.
                surplus = len(self._slots) - self._limit.requests + 1
                if len(counted) < surplus:
                    return PacerDecision(None, None, "window")  # waits for uploads in progress
                counted.sort()
                return PacerDecision(None, counted[surplus - 1] - horizon, "window")
        slot = PacerSlot(self, now)
        if self._limit is not None:
            self._slots.append(slot)
        if becomes_probe:
            self._probe = slot
        self.starts += 1
        return PacerDecision(slot, None, "")

    # -- the blocking call the client makes before each attempt --------------------------

    def acquire(
        self,
        *,
        wait: Callable[[float], None],
        check_cancel: Callable[[], None] = lambda: None,
        on_wait: Optional[Callable[[str, Optional[float]], None]] = None,
    ) -> PacerSlot:
        """Wait until a request may start and return its slot.

        ``wait(seconds)`` waits (and raises on cancel); ``check_cancel()`` raises once cancelled;
        ``on_wait(message, seconds)`` is told each time the reason to wait changes.
        """
        # Time passes at least as fast as the waits made: an injected wait that returns at once
        # (tests) still moves this call forward instead of spinning.
        virtual_now = self._clock()
        told = ""
        while True:
            check_cancel()
            with self._lock:
                now = max(self._clock(), virtual_now)
                decision = self._decide(now)
                if decision.slot is not None:
                    return decision.slot
                if decision.wait is None and (on_wait is None or decision.reason == told):
                    # Until a slot's upload goes out or the probe is answered: both notify.
                    self._changed.wait(_EVENT_SLICE_SECONDS)
                    continue
            if on_wait is not None and decision.reason != told:
                told = decision.reason
                on_wait(_message(decision), decision.wait)
            if decision.wait is not None:
                wait(decision.wait)
                virtual_now = now + decision.wait

    # -- what the client reports -----------------------------------------------------------

    def note_rate_limited(self) -> tuple[int, float]:
        """A 429 came back: returns (429s in a row in this process, seconds since the first of them)."""
        with self._lock:
            now = self._clock()
            self._streak += 1
            if self._streak_started is None:
                self._streak_started = now
            return self._streak, now - self._streak_started

    def pause(self, seconds: float) -> None:
        """After a 429: no request of this process starts for ``seconds``, then one probes first."""
        with self._lock:
            if math.isfinite(seconds) and seconds > 0:
                self._paused_until = max(self._paused_until, self._clock() + seconds)
            self._probe_pending = True
            self._changed.notify_all()

    def give_up(self, seconds_limited: float) -> None:
        """The service kept answering 429: refuse to send anything for a while (nothing is charged)."""
        with self._lock:
            self._refused_until = self._clock() + REFUSE_AFTER_GIVING_UP_SECONDS
            self._refused_reason = (
                f"Not sent: the service answered 429 (rate limited) for {seconds_limited:.0f} s, so this process "
                f"stops sending for {REFUSE_AFTER_GIVING_UP_SECONDS:.0f} s; nothing was charged for it, run again "
                f"later (or set {ENV_RATE_LIMIT} lower if other programs use the same key).")
            self._changed.notify_all()

    @property
    def rate_limit_streak(self) -> int:
        """429s in a row so far (0 after any other answer)."""
        with self._lock:
            return self._streak

    def _slot_sent(self, slot: PacerSlot) -> None:
        with self._lock:
            if slot.sent_at is None:
                slot.sent_at = self._clock()
                self._changed.notify_all()

    def _slot_finished(self, slot: PacerSlot, rate_limited: bool) -> None:
        with self._lock:
            if slot.finished:
                return
            slot.finished = True
            if slot.sent_at is None:
                # It may have reached the service before it failed: count it from now.
                slot.sent_at = self._clock()
            if slot is self._probe:
                self._probe = None
                if not rate_limited:
                    self._probe_pending = False
            if not rate_limited:
                self._streak = 0
                self._streak_started = None
            self._changed.notify_all()


def _message(decision: PacerDecision) -> str:
    if decision.reason == "window":
        return WAITING_FOR_SLOT
    if decision.reason == "paused":
        return f"the service is limiting the request rate (429); every request waits {decision.wait:.0f} s"
    return "waiting for the service to accept requests again (one request tries first)"


_shared: dict[str, Pacer] = {}
_shared_lock = threading.Lock()


def shared_pacer(endpoint: str, limit: Optional[RateLimit]) -> Pacer:
    """The one pacer of this process for ``endpoint``; the newest configured limit applies."""
    with _shared_lock:
        pacer = _shared.get(endpoint)
        if pacer is None:
            pacer = _shared[endpoint] = Pacer(limit)
        elif pacer.limit != limit:
            pacer.limit = limit
        return pacer
