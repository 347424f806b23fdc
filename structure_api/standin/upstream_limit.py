"""The stand-in's model of the upstream's rate limit: past N requests in T seconds, a lock-out of 429s."""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable

from ..contract import LOCKOUT_SECONDS
from ..ratelimit import RateLimit, parse_rate_limit

DEFAULT_LOCKOUT_SECONDS = LOCKOUT_SECONDS


class UpstreamRateLimit:
    """Admits at most ``limit.requests`` requests in any ``limit.seconds``; the one past that starts a
    lock-out.

    During a lock-out every request is refused (the stand-in answers 429 without Retry-After, as
    the upstream does, and charges nothing); requests refused do not extend it. When it ends the
    window starts empty.
    """

    def __init__(
        self,
        limit: RateLimit | str,
        lockout: float = DEFAULT_LOCKOUT_SECONDS,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(limit, str):
            parsed = parse_rate_limit(limit, source="rate_limit")
            if parsed is None:
                raise ValueError("rate_limit must be a limit such as 150/10 here; pass None for no limit.")
            limit = parsed
        if (
            isinstance(lockout, bool)
            or not isinstance(lockout, (int, float))
            or not math.isfinite(lockout)
            or lockout < 0
        ):
            raise ValueError(f"lockout must be a finite number of seconds >= 0; got {lockout!r}.")
        self.limit = limit
        self.lockout = float(lockout)
        self._clock = clock
        self._lock = threading.Lock()
        self._arrivals: collections.deque[float] = collections.deque()
        self._locked_until = -math.inf
        self.admitted = 0
        self.refused = 0
        self.lockouts = 0

    def __repr__(self) -> str:
        return f"UpstreamRateLimit({self.limit}, lockout={self.lockout:g})"

    def admit(self, now: float | None = None) -> bool:
        """Count one request arriving at ``now``; False when it must be refused with a 429."""
        with self._lock:
            now = self._clock() if now is None else now
            if now < self._locked_until:
                self.refused += 1
                return False
            horizon = now - self.limit.seconds
            while self._arrivals and self._arrivals[0] <= horizon:
                self._arrivals.popleft()
            if len(self._arrivals) >= self.limit.requests:
                self._locked_until = now + self.lockout
                self._arrivals.clear()
                self.lockouts += 1
                self.refused += 1
                return False
            self._arrivals.append(now)
            self.admitted += 1
            return True

    @property
    def locked(self) -> bool:
        """True while a lock-out is on."""
        with self._lock:
            return self._clock() < self._locked_until
