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

import json
import logging
import math
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ._constants import PROBE_GRACE_SECONDS
from .contract import LOCKOUT_SECONDS, RATE_LIMIT_REQUESTS, RATE_LIMIT_SECONDS
from .errors import ConfigurationError, RateLimitError

log = logging.getLogger("structure_api")

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


def parse_rate_limit(text: str, *, source: str = ENV_RATE_LIMIT) -> RateLimit | None:
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
            f"{source} must be a number of requests per seconds such as {DEFAULT_RATE_LIMIT} (150 requests "
            f"in any 10 s, at least 1 request, at most 3600 s) or off; the value set ({len(text)} "
            "characters) is not one."
        )
    return RateLimit(requests=requests, seconds=seconds)


def rate_limit_from_env(environ: Mapping[str, str] | None = None) -> RateLimit | None:
    """AITHRIVING_RATE_LIMIT as a RateLimit (default 150/10), or None when set to off."""
    env = os.environ if environ is None else environ
    value = env.get(ENV_RATE_LIMIT, "")
    if not value.strip():
        return DEFAULT_RATE_LIMIT
    return parse_rate_limit(value)


def _default_margin(limit: RateLimit, shared: bool = False) -> float:
    """Seconds added to the window: 2 % of it, at least a tenth of a second (10.2 s for 150/10); 5 %,
    at least a quarter second, while other processes draw from the same budget (10.5 s).

    Small, because slots already count from when each upload went out; the margin covers the
    time from there to when the service counts the request. Processes sharing a budget send in
    bursts the service takes longer to read: measured with three processes on two busy cores,
    the stand-in counted some requests more than 0.2 s after their upload was out, and 2 % led to
    a lock-out that 5 % did not (docs/architecture.md).
    """
    if shared:
        return max(0.25, 0.05 * limit.seconds)
    return max(0.1, 0.02 * limit.seconds)


class PacerSlot:
    """One request's place in the window; ``sent()`` when its upload went out, ``finish()`` when done."""

    __slots__ = ("_pacer", "token", "started", "finished")

    def __init__(self, pacer: Pacer, token: str, started: float) -> None:
        self._pacer = pacer
        self.token = token
        self.started = started
        self.finished = False

    def sent(self) -> None:
        """Count this request in the window from now (its upload is out)."""
        self._pacer._slot_sent(self)

    def finish(self, *, rate_limited: bool) -> None:
        """End the attempt; ``rate_limited`` when its answer was a 429. Idempotent."""
        self._pacer._slot_finished(self, rate_limited)


@dataclass(frozen=True)
class PacerDecision:
    """What ``Pacer.next_start`` decided: a slot, or how long to wait and why."""

    slot: PacerSlot | None
    wait: float | None  # seconds; None: until something happens (a slot's upload, a probe's answer)
    reason: str  # "" with a slot; else "window" | "paused" | "probe"


# A slot whose upload never went out and never finished is forgotten after this long: its process
# died mid-upload (an upload that goes on this long has long failed its own timeouts).
UNSENT_LEASE_SECONDS = 600.0


@dataclass
class PacerState:
    """What every user of one budget agrees on: the recent starts, the pause after a 429, the probe.

    Times are on the clock of the book that holds the state (see ``ratebudget.py``). It is plain
    data so that a budget shared between processes can keep it as one JSON value.
    """

    slots: dict = field(default_factory=dict)  # token -> [started, sent_at or None (uploading), owner]
    paused_until: float = -math.inf
    probe_pending: bool = False
    probe: str | None = None  # the token of the request that probes after a pause

    def to_json(self) -> bytes:
        """Write the state as compact JSON (no infinities: a pause never set is null)."""
        paused = self.paused_until if math.isfinite(self.paused_until) else None
        return json.dumps(
            {"s": self.slots, "p": paused, "q": self.probe_pending, "r": self.probe}, separators=(",", ":")
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes | None) -> PacerState:
        """Read the state ``to_json`` wrote; an empty state for nothing or anything unreadable."""
        try:
            data = json.loads(raw) if raw else {}
            slots = {
                str(k): [float(v[0]), None if v[1] is None else float(v[1]), str(v[2]) if v[2:] else ""]
                for k, v in data.get("s", {}).items()
            }
            paused = data.get("p")
            return cls(
                slots,
                -math.inf if paused is None else float(paused),
                bool(data.get("q")),
                None if data.get("r") is None else str(data["r"]),
            )
        except (ValueError, TypeError, AttributeError, IndexError, KeyError):
            return cls()

    def decide(
        self,
        now: float,
        limit: RateLimit | None,
        window_seconds: float,
        probe_grace: float,
        token: str,
        owner: str = "",
        shared_window: float | None = None,
    ) -> tuple[bool, float | None, str]:
        """Take a slot for ``token`` (of pacer ``owner``) at ``now`` if a request may start: (taken, wait,
        reason). ``shared_window`` is the window while the budget holds slots of other pacers."""
        if now < self.paused_until:
            return False, self.paused_until - now, "paused"
        becomes_probe = False
        if self.probe_pending:
            probe = self.slots.get(self.probe) if self.probe is not None else None
            if probe is None:  # nobody probes yet (or the probe's process died): this one does
                becomes_probe = True
            elif probe[1] is not None and now >= probe[1] + probe_grace:
                self.probe_pending = False  # unanswered for a while: not refused
                self.probe = None
            else:
                return False, (None if probe[1] is None else probe[1] + probe_grace - now), "probe"
        if shared_window is not None and any(slot[2] != owner for slot in self.slots.values()):
            window_seconds = shared_window
        self._forget_old(now, window_seconds if limit is not None else 0.0)
        if limit is not None:
            in_window = list(self.slots.values())
            if len(in_window) >= limit.requests:
                counted = sorted(slot[1] for slot in in_window if slot[1] is not None)
                # Enough slots leave the window when the oldest of those that must go has left it.
                surplus = len(in_window) - limit.requests + 1
                if len(counted) < surplus:
                    return False, None, "window"  # waits for uploads in progress
                return False, max(0.0, counted[surplus - 1] - (now - window_seconds)), "window"
        if limit is not None or becomes_probe:
            self.slots[token] = [now, None, owner]
        if becomes_probe:
            self.probe = token
        return True, None, ""

    def _forget_old(self, now: float, window_seconds: float) -> None:
        horizon = now - window_seconds
        for tok, (started, sent_at, _) in list(self.slots.items()):
            if sent_at is None:
                gone = started <= now - UNSENT_LEASE_SECONDS
            else:
                gone = sent_at <= horizon and tok != self.probe
            if gone:
                del self.slots[tok]

    def sent(self, token: str, now: float) -> None:
        """``token``'s upload went out at ``now``."""
        slot = self.slots.get(token)
        if slot is not None and slot[1] is None:
            slot[1] = now

    def finished(self, token: str, rate_limited: bool, now: float) -> None:
        """``token``'s attempt ended; a probe answered by anything but a 429 lets everyone go."""
        self.sent(token, now)  # it may have reached the service before it failed: count it from now
        if token == self.probe:
            self.probe = None
            if not rate_limited:
                self.probe_pending = False

    def pause(self, seconds: float, now: float) -> None:
        """No request starts for ``seconds``; then one probes first."""
        if math.isfinite(seconds) and seconds > 0:
            self.paused_until = max(self.paused_until, now + seconds)
        self.probe_pending = True


T = TypeVar("T")
_THIS_PROCESS = "counted in this process only"


class MemoryBook:
    """A budget of this process only: the state in memory, on the pacer's clock."""

    shared = False

    def __init__(self, where: str = "") -> None:
        self.state = PacerState()
        self.where = where or _THIS_PROCESS

    def update(self, change: Callable[[PacerState, float], T], now: float) -> T:
        """Apply ``change`` to the state at ``now`` (the caller holds the pacer's lock)."""
        return change(self.state, now)


class Pacer:
    """Pacing of one budget: the window of recent starts, the pause after a 429, the probe.

    The state lives in a book: this process's memory (the default), or one shared with other
    processes (``ratebudget.py``: the result store's folder, or Redis). The 429 streak and the
    refusal after giving up stay with this process.
    """

    def __init__(
        self,
        limit: RateLimit | None = DEFAULT_RATE_LIMIT,
        *,
        clock: Callable[[], float] = time.monotonic,
        margin: float | None = None,
        probe_grace: float = PROBE_GRACE_SECONDS,
        book: Any | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._turn = threading.RLock()
        self._owner = uuid.uuid4().hex[:8]  # this pacer's slots among a shared budget's
        self._head_message = ""  # why the thread whose turn it is waits, for the others' progress
        self._clock = clock
        self._margin = margin
        self._probe_grace = probe_grace
        self._book = book if book is not None else MemoryBook()
        self._streak = 0
        self._streak_started: float | None = None
        self._refused_until = -math.inf
        self._refused_reason = ""
        self.limit = limit
        self.starts = 0  # slots handed out, for tests and reports

    def __repr__(self) -> str:
        return f"Pacer(limit={self.limit or 'off'}, {self.sharing})"

    # -- configuration ---------------------------------------------------------------

    @property
    def limit(self) -> RateLimit | None:
        """The configured limit; None: no pacing (429s still pause everyone)."""
        return self._limit

    @limit.setter
    def limit(self, limit: RateLimit | None) -> None:
        self._limit = limit
        margin = self._margin if self._margin is not None else (_default_margin(limit) if limit else 0.0)
        self.window_seconds = (limit.seconds + margin) if limit else 0.0
        # While other processes draw from a shared budget too, its window has the wider margin.
        shared_margin = (
            self._margin
            if self._margin is not None
            else (_default_margin(limit, shared=True) if limit else 0.0)
        )
        self.shared_window_seconds = (limit.seconds + shared_margin) if limit else 0.0

    @property
    def sharing(self) -> str:
        """Who counts against this budget: 'this process only (why)', or the folder or Redis shared."""
        return self._book.where

    @property
    def shared(self) -> bool:
        """True when other processes draw from the same budget."""
        return bool(self._book.shared)

    def _update(self, change: Callable[[PacerState, float], T], now: float | None = None) -> T:
        """Apply ``change`` to the budget's state (the caller holds the lock); a shared book that
        fails from now on is replaced by this process's own (it says so once)."""
        when = self._clock() if now is None else now
        try:
            return self._book.update(change, when)
        except BudgetUnavailable as error:
            log.warning(
                "The shared rate budget (%s) stopped working (%s); this process paces on its own "
                "from now on.",
                self._book.where,
                error,
            )
            self._book = MemoryBook(
                f"{_THIS_PROCESS}: {getattr(self._book, 'name', self._book.where)} stopped working"
            )
            return self._book.update(change, self._clock() if now is None else now)

    # -- the decision (no waiting): what the unit tests drive with an injected clock ------

    def next_start(self, now: float | None = None) -> PacerDecision:
        """Return a slot if a request may start at ``now``, else how long to wait; raise after giving up."""
        with self._lock:
            return self._decide(now)

    def _decide(self, now: float | None) -> PacerDecision:
        local_now = self._clock() if now is None else now
        if local_now < self._refused_until:
            raise RateLimitError(self._refused_reason)
        token = uuid.uuid4().hex[:16]
        limit, window, grace, owner = self._limit, self.window_seconds, self._probe_grace, self._owner
        shared_window = self.shared_window_seconds if self.shared else None
        taken, wait, reason = self._update(
            lambda state, at: state.decide(at, limit, window, grace, token, owner, shared_window), now
        )
        if not taken:
            return PacerDecision(None, wait, reason)
        self.starts += 1
        return PacerDecision(PacerSlot(self, token, local_now), None, "")

    # -- the blocking call the client makes before each attempt --------------------------

    def acquire(
        self,
        *,
        wait: Callable[[float], None],
        check_cancel: Callable[[], None] = lambda: None,
        on_wait: Callable[[str, float | None], None] | None = None,
    ) -> PacerSlot:
        """Wait until a request may start and return its slot.

        ``wait(seconds)`` waits (and raises on cancel); ``check_cancel()`` raises once cancelled;
        ``on_wait(message, seconds)`` is told each time the reason to wait changes.
        """
        # One thread of the process at a time asks for a slot (the others wait for their turn):
        # whoever waits, waits for the same slot, and a shared book is asked once per wait, not
        # once per thread. Reentrant: a test's injected wait may start another request.
        if not self._turn.acquire(blocking=False):
            told_turn = False
            while not self._turn.acquire(timeout=_EVENT_SLICE_SECONDS):
                check_cancel()
                if on_wait is not None and not told_turn and self._head_message:
                    told_turn = True
                    on_wait(self._head_message, None)
        try:
            return self._acquire_turn(wait, check_cancel, on_wait)
        finally:
            self._head_message = ""
            self._turn.release()

    def _acquire_turn(
        self,
        wait: Callable[[float], None],
        check_cancel: Callable[[], None],
        on_wait: Callable[[str, float | None], None] | None,
    ) -> PacerSlot:
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
                self._head_message = self._message(decision)
                if decision.wait is None and (on_wait is None or decision.reason == told):
                    # Until a slot's upload goes out or the probe is answered: both notify in this
                    # process; another process's are seen at the next slice.
                    self._changed.wait(_EVENT_SLICE_SECONDS)
                    continue
            if on_wait is not None and decision.reason != told:
                told = decision.reason
                on_wait(self._head_message, decision.wait)
            if decision.wait is not None:
                wait(decision.wait)
                virtual_now = now + decision.wait

    # -- what the client reports -----------------------------------------------------------

    def note_rate_limited(self) -> tuple[int, float]:
        """Count a 429: return (429s in a row in this process, seconds since the first of them)."""
        with self._lock:
            now = self._clock()
            self._streak += 1
            if self._streak_started is None:
                self._streak_started = now
            return self._streak, now - self._streak_started

    def pause(self, seconds: float) -> None:
        """After a 429: no request of this budget starts for ``seconds``, then one probes first."""
        with self._lock:
            self._update(lambda state, now: state.pause(seconds, now))
            self._changed.notify_all()

    def give_up(self, seconds_limited: float) -> None:
        """Refuse to send anything for a while, since the service kept answering 429 (nothing is charged)."""
        with self._lock:
            self._refused_until = self._clock() + REFUSE_AFTER_GIVING_UP_SECONDS
            self._refused_reason = (
                f"Not sent: the service answered 429 (rate limited) for {seconds_limited:.0f} s, so this "
                f"process stops sending for {REFUSE_AFTER_GIVING_UP_SECONDS:.0f} s; nothing was charged for "
                f"it, run again later (or set {ENV_RATE_LIMIT} lower if other programs use the same key)."
            )
            self._changed.notify_all()

    @property
    def rate_limit_streak(self) -> int:
        """429s in a row so far (0 after any other answer)."""
        with self._lock:
            return self._streak

    def _slot_sent(self, slot: PacerSlot) -> None:
        with self._lock:
            if not slot.finished:
                self._update(lambda state, now: state.sent(slot.token, now))
                self._changed.notify_all()

    def _slot_finished(self, slot: PacerSlot, rate_limited: bool) -> None:
        with self._lock:
            if slot.finished:
                return
            slot.finished = True
            self._update(lambda state, now: state.finished(slot.token, rate_limited, now))
            if not rate_limited:
                self._streak = 0
                self._streak_started = None
            self._changed.notify_all()

    def _message(self, decision: PacerDecision) -> str:
        text = _message(decision)
        if decision.reason == "window" and not self.shared and self._book.where != _THIS_PROCESS:
            text += f" ({self._book.where})"
        return text


class BudgetUnavailable(Exception):
    """A shared budget's storage failed (the folder, the database, Redis); the pacer falls back."""


def _message(decision: PacerDecision) -> str:
    if decision.reason == "window":
        return WAITING_FOR_SLOT
    if decision.reason == "paused":
        return f"the service is limiting the request rate (429); every request waits {decision.wait:.0f} s"
    return "waiting for the service to accept requests again (one request tries first)"


_shared: dict[tuple[str, str], Pacer] = {}
_shared_lock = threading.Lock()


def shared_pacer(
    endpoint: str, limit: RateLimit | None, budget: str = "", book: Callable[[], Any] | None = None
) -> Pacer:
    """Return the one pacer of this process for ``endpoint`` and ``budget`` (a key's id); the newest limit
    applies.

    ``book`` makes the budget's book (its state, shared or not) the first time it is asked for.
    """
    with _shared_lock:
        pacer = _shared.get((endpoint, budget))
        if pacer is None:
            pacer = _shared[(endpoint, budget)] = Pacer(limit, book=book() if book is not None else None)
        elif pacer.limit != limit:
            pacer.limit = limit
        return pacer
