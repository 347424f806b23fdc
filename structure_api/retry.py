"""The retry policy, as pure functions: which failures to retry and how long to wait.

Billing decides the rules: a failed request is free, so 429, the listed 5xx and
connections that never delivered the request are retried; an answer lost after the
upload completed may already have been charged, so that is never sent again.
"""

from __future__ import annotations

import datetime
import email.utils
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from ._constants import (
    DEFAULT_BASE_DELAY,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_DELAY,
    DEFAULT_MAX_RATE_LIMITED_ATTEMPTS,
    DEFAULT_MAX_RATE_LIMITED_SECONDS,
    DEFAULT_MAX_RETRY_AFTER,
    DEFAULT_MAX_TOTAL_SECONDS,
    DEFAULT_RETRY_AFTER_JITTER,
)
from .errors import RateLimitError, ResultMayBeBilledError, ServiceError, StructureError, TransportError

RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """Caps and pacing for retries."""

    max_attempts: int = DEFAULT_MAX_ATTEMPTS  # first try included
    # Give up when the next wait would pass this (from the first try).
    max_total_seconds: float = DEFAULT_MAX_TOTAL_SECONDS
    base_delay: float = DEFAULT_BASE_DELAY
    max_delay: float = DEFAULT_MAX_DELAY
    # A Retry-After longer than this is waited for this long, then the request is tried again.
    max_retry_after: float = DEFAULT_MAX_RETRY_AFTER
    # A 429 is never billed, so 429s are waited out for longer than other failures: a streak of
    # them (process-wide) is given up only after this long, which outlasts the upstream's
    # lock-out; max_attempts does not apply to them, max_total_seconds does.
    max_rate_limited_seconds: float = DEFAULT_MAX_RATE_LIMITED_SECONDS
    max_rate_limited_attempts: int = DEFAULT_MAX_RATE_LIMITED_ATTEMPTS
    # Retry-After waits are lengthened by up to this fraction (at least 0.5 s, at most 5 s) at
    # random, so clients told the same instant do not all come back at it.
    retry_after_jitter: float = DEFAULT_RETRY_AFTER_JITTER


def is_retryable(error: StructureError) -> bool:
    """Tell whether sending the same request again can neither double-charge nor be pointless."""
    if isinstance(error, RateLimitError):
        return True
    if isinstance(error, ServiceError):
        return error.http_status in RETRYABLE_STATUSES
    if isinstance(error, TransportError) and not isinstance(error, ResultMayBeBilledError):
        return not error.request_delivered
    return False


# Any Retry-After is read as at most a day: enough to say "much later", small enough that nothing
# computed from it (a message's "wait N s", a deadline) can overflow.
MAX_RETRY_AFTER_SECONDS = 86400.0
_DECIMAL = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)")


def parse_retry_after(value: object, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or HTTP date), 0 to a day; None when unusable.

    ``now`` is Unix time. Never raises: a hostile or broken value (inf, NaN, garbage, a date
    out of range) is ignored, a huge one is read as a day, a past or negative one as 0.
    """
    if not isinstance(value, str):
        return None
    value = value.strip()
    if not value or len(value) > 100:
        return None
    if _DECIMAL.fullmatch(
        value
    ):  # ASCII digits only: float() would also take "1e999", "inf", Arabic-Indic digits
        return min(max(0.0, float(value)), MAX_RETRY_AFTER_SECONDS)
    try:
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is None:  # HTTP dates are GMT by definition
            when = when.replace(tzinfo=datetime.timezone.utc)
        seconds = when.timestamp() - now
    except (TypeError, ValueError, IndexError, OverflowError, AttributeError):
        return None
    if not math.isfinite(seconds):
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER_SECONDS)


def backoff_delay(policy: RetryPolicy, attempt: int, jitter: Callable[[], float]) -> float:
    """Exponential backoff with full jitter for the wait after failed ``attempt`` (1-based)."""
    ceiling = min(policy.max_delay, policy.base_delay * (2 ** (attempt - 1)))
    # Half fixed, half random: spreads out a batch that failed together without waiting nothing.
    return ceiling * (0.5 + 0.5 * jitter())


def rate_limited_delay(
    policy: RetryPolicy, retry_after: float | None, streak: int, jitter: Callable[[], float]
) -> float:
    """Return the pause after the ``streak``-th 429 in a row: Retry-After capped and jittered, else backoff.

    Without Retry-After the backoff doubles up to ``max_delay`` per 429 of the streak, so that
    waiting out a lock-out takes a handful of requests, not dozens.
    """
    if retry_after is not None and math.isfinite(retry_after):
        hinted = min(max(retry_after, 0.0), policy.max_retry_after)
        spread = min(5.0, max(0.5, policy.retry_after_jitter * hinted))
        return hinted + spread * jitter()
    return backoff_delay(policy, streak, jitter)


def next_delay(
    policy: RetryPolicy,
    error: StructureError,
    attempt: int,
    elapsed: float,
    *,
    now: float,
    jitter: Callable[[], float],
    rate_limit_streak: int | None = None,
    rate_limited_for: float = 0.0,
) -> float | None:
    """Seconds to wait before the next attempt, or None to give up and raise ``error``.

    ``attempt`` is the number of attempts made so far, ``elapsed`` the seconds since the
    first began, ``now`` the Unix time (for Retry-After dates), ``jitter`` returns 0..1.
    For a 429, ``rate_limit_streak`` counts the 429s in a row (of the whole process, defaults
    to ``attempt``) and ``rate_limited_for`` the seconds since the first of them.
    """
    if not is_retryable(error):
        return None
    if isinstance(error, RateLimitError):
        streak = attempt if rate_limit_streak is None else rate_limit_streak
        if streak >= policy.max_rate_limited_attempts:
            return None
        hinted = error.retry_after
        if hinted is None:
            hinted = parse_retry_after(error.headers.get("retry-after"), now)
        delay = rate_limited_delay(policy, hinted, streak, jitter)
        if rate_limited_for + delay > policy.max_rate_limited_seconds:
            return None
    else:
        if attempt >= policy.max_attempts:
            return None
        delay = backoff_delay(policy, attempt, jitter)
    if elapsed + delay > policy.max_total_seconds:
        return None
    return delay
