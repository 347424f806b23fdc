"""The retry policy, as pure functions: which failures to retry and how long to wait.

Billing decides the rules: a failed request is free, so 429, the listed 5xx and
connections that never delivered the request are retried; an answer lost after the
upload completed may already have been charged, so that is never sent again.
"""

from __future__ import annotations

import email.utils
from dataclasses import dataclass
from typing import Callable, Optional

from .errors import RateLimitError, ResultMayBeBilledError, ServiceError, StructureError, TransportError

RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """Caps and pacing for retries."""

    max_attempts: int = 5          # first try included
    max_total_seconds: float = 300.0  # give up when the next wait would pass this (from the first try)
    base_delay: float = 1.0
    max_delay: float = 30.0
    # The upstream locks a caller out for 60 s after a burst; a hint longer than this is not waited out.
    max_retry_after: float = 90.0


NO_RETRIES = RetryPolicy(max_attempts=1)


def is_retryable(error: StructureError) -> bool:
    """True when sending the same request again can neither double-charge nor be pointless."""
    if isinstance(error, RateLimitError):
        return True
    if isinstance(error, ServiceError):
        return error.http_status in RETRYABLE_STATUSES
    if isinstance(error, TransportError) and not isinstance(error, ResultMayBeBilledError):
        return not error.request_delivered
    return False


def parse_retry_after(value: Optional[str], now: float) -> Optional[float]:
    """Seconds to wait from a Retry-After header (seconds or HTTP date); ``now`` is Unix time."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        seconds = float(value)
    except ValueError:
        seconds = None
    if seconds is not None:
        return max(0.0, seconds) if seconds == seconds else None  # NaN is not a delay
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:  # HTTP dates are GMT by definition
        import datetime as _dt

        when = when.replace(tzinfo=_dt.timezone.utc)
    return max(0.0, when.timestamp() - now)


def backoff_delay(policy: RetryPolicy, attempt: int, jitter: Callable[[], float]) -> float:
    """Exponential backoff with full jitter for the wait after failed ``attempt`` (1-based)."""
    ceiling = min(policy.max_delay, policy.base_delay * (2 ** (attempt - 1)))
    # Half fixed, half random: spreads out a batch that failed together without waiting nothing.
    return ceiling * (0.5 + 0.5 * jitter())


def next_delay(
    policy: RetryPolicy,
    error: StructureError,
    attempt: int,
    elapsed: float,
    *,
    now: float,
    jitter: Callable[[], float],
) -> Optional[float]:
    """Seconds to wait before the next attempt, or None to give up and raise ``error``.

    ``attempt`` is the number of attempts made so far, ``elapsed`` the seconds since the
    first began, ``now`` the Unix time (for Retry-After dates), ``jitter`` returns 0..1.
    """
    if not is_retryable(error) or attempt >= policy.max_attempts:
        return None
    delay = backoff_delay(policy, attempt, jitter)
    if isinstance(error, RateLimitError):
        hinted = error.retry_after
        if hinted is None:
            hinted = parse_retry_after(error.headers.get("retry-after"), now)
        if hinted is not None:
            if hinted > policy.max_retry_after:
                return None
            delay = max(hinted, 0.0)
    if elapsed + delay > policy.max_total_seconds:
        return None
    return delay
