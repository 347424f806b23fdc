"""The retry policy as pure functions: exact schedules with an injected clock and jitter."""

from __future__ import annotations

import email.utils

import pytest

from structure_api.errors import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    InvalidRequestError,
    RateLimitError,
    ResultMayBeBilledError,
    ServiceError,
)
from structure_api.retry import (
    MAX_RETRY_AFTER_SECONDS,
    RetryPolicy,
    backoff_delay,
    is_retryable,
    next_delay,
    parse_retry_after,
    rate_limited_delay,
)

NOW = 1_800_000_000.0  # a fixed Unix time for HTTP-date arithmetic


def service_error(status: int) -> ServiceError:
    return ServiceError("x", http_status=status)


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_listed_5xx_are_retried(status):
    assert is_retryable(service_error(status))


def test_other_5xx_and_4xx_are_not_retried():
    assert not is_retryable(service_error(501))
    assert not is_retryable(InvalidRequestError("x", http_status=400))
    assert not is_retryable(AuthenticationError("x", http_status=401))


def test_transport_errors_retry_only_when_nothing_was_delivered():
    assert is_retryable(APIConnectionError("x", request_delivered=False))
    assert is_retryable(APITimeoutError("x", request_delivered=False))
    assert not is_retryable(APIConnectionError("x", request_delivered=True))
    # Even if flagged undelivered by mistake, a possibly billed answer is never re-sent.
    assert not is_retryable(ResultMayBeBilledError("x", request_delivered=False))


def test_backoff_doubles_then_caps_and_jitter_spans_half_to_full():
    policy = RetryPolicy(base_delay=1.0, max_delay=8.0)
    assert [backoff_delay(policy, n, lambda: 1.0) for n in range(1, 7)] == [1, 2, 4, 8, 8, 8]
    assert [backoff_delay(policy, n, lambda: 0.0) for n in range(1, 5)] == [0.5, 1, 2, 4]


def test_schedule_for_repeated_503_stops_at_max_attempts():
    policy = RetryPolicy(max_attempts=4, base_delay=1.0, max_delay=30.0, max_total_seconds=1000)
    delays = [
        next_delay(policy, service_error(503), attempt, 0.0, now=NOW, jitter=lambda: 1.0)
        for attempt in range(1, 5)
    ]
    assert delays == [1.0, 2.0, 4.0, None]


def test_total_time_cap_stops_retrying():
    policy = RetryPolicy(max_attempts=10, base_delay=10.0, max_delay=10.0, max_total_seconds=25.0)
    assert next_delay(policy, service_error(500), 1, 10.0, now=NOW, jitter=lambda: 1.0) == 10.0
    assert next_delay(policy, service_error(500), 2, 20.0, now=NOW, jitter=lambda: 1.0) is None


def test_retry_after_seconds_replaces_backoff():
    error = RateLimitError("x", http_status=429, headers={"retry-after": "7"})
    assert next_delay(RetryPolicy(), error, 1, 0.0, now=NOW, jitter=lambda: 0.0) == 7.0


def test_retry_after_is_jittered_by_up_to_a_fifth_between_half_and_five_seconds():
    policy = RetryPolicy(retry_after_jitter=0.2)
    assert rate_limited_delay(policy, 7.0, 1, lambda: 1.0) == pytest.approx(7.0 + 1.4)
    assert rate_limited_delay(policy, 7.0, 1, lambda: 0.5) == pytest.approx(7.0 + 0.7)
    assert rate_limited_delay(policy, 0.0, 1, lambda: 1.0) == 0.5  # even "now" is spread a little
    assert rate_limited_delay(policy, 60.0, 1, lambda: 1.0) == 65.0  # at most 5 s later
    # Workers told the same Retry-After come back at different instants.
    draws = iter([0.1, 0.9])
    assert len({rate_limited_delay(policy, 7.0, 1, lambda: next(draws)) for _ in range(2)}) == 2


def test_retry_after_http_date():
    when = email.utils.formatdate(NOW + 12, usegmt=True)
    error = RateLimitError("x", http_status=429, headers={"retry-after": when})
    assert next_delay(RetryPolicy(), error, 1, 0.0, now=NOW, jitter=lambda: 0.0) == pytest.approx(12.0)


def test_retry_after_in_the_past_means_now():
    when = email.utils.formatdate(NOW - 30, usegmt=True)
    assert parse_retry_after(when, NOW) == 0.0


def test_retry_after_longer_than_the_cap_is_waited_for_the_cap():
    error = RateLimitError("x", http_status=429, headers={"retry-after": "3600"})
    assert next_delay(RetryPolicy(max_retry_after=90), error, 1, 0.0, now=NOW, jitter=lambda: 0.0) == 90.0
    # ... and a second one in a row, 90 s later, passes the 150 s of 429s the policy waits out.
    assert (
        next_delay(
            RetryPolicy(max_retry_after=90),
            error,
            2,
            90.0,
            now=NOW,
            jitter=lambda: 0.0,
            rate_limit_streak=2,
            rate_limited_for=90.0,
        )
        is None
    )


def test_429_without_retry_after_backs_off():
    error = RateLimitError("x", http_status=429)
    assert next_delay(RetryPolicy(base_delay=2.0), error, 2, 0.0, now=NOW, jitter=lambda: 1.0) == 4.0


@pytest.mark.parametrize("jitter", [0.0, 0.5, 1.0])
def test_429s_without_retry_after_are_waited_out_past_the_60_s_lock_out(jitter):
    """The whole schedule of a streak of 429s until it is given up: it outlasts the upstream's lock-out."""
    policy = RetryPolicy()
    error = RateLimitError("x", http_status=429)
    waited, streak, waits = 0.0, 0, []
    while True:
        streak += 1
        delay = next_delay(
            policy,
            error,
            streak,
            waited,
            now=NOW,
            jitter=lambda: jitter,
            rate_limit_streak=streak,
            rate_limited_for=waited,
        )
        if delay is None:
            break
        waits.append(delay)
        waited += delay
    assert waited > 60.0 + max(waits)  # the lock-out is over before the last try, with a try to spare
    assert waited <= policy.max_rate_limited_seconds <= policy.max_total_seconds
    assert max(waits) <= policy.max_delay
    assert len(waits) <= 20  # a handful of tries, not a hammering
    assert streak - 1 == len(waits)


def test_429s_do_not_count_against_max_attempts_but_do_against_total_time():
    error = RateLimitError("x", http_status=429)
    policy = RetryPolicy(max_attempts=3, max_total_seconds=100)
    assert next_delay(policy, error, 5, 10.0, now=NOW, jitter=lambda: 0.0, rate_limit_streak=5) == 8.0
    assert next_delay(policy, error, 5, 95.0, now=NOW, jitter=lambda: 0.0, rate_limit_streak=5) is None
    assert (
        next_delay(RetryPolicy(max_rate_limited_attempts=4), error, 4, 0.0, now=NOW, jitter=lambda: 0.0)
        is None
    )


def test_the_process_wide_streak_decides_not_the_requests_own_attempts():
    error = RateLimitError("x", http_status=429)
    # Attempt 1 of this request, but the 6th 429 in a row of the process: backoff of the 6th.
    assert next_delay(RetryPolicy(), error, 1, 0.0, now=NOW, jitter=lambda: 0.0, rate_limit_streak=6) == 15.0


HOSTILE_RETRY_AFTER = [
    "inf",
    "-inf",
    "Infinity",
    "nan",
    "1e999",
    "1e5",
    "99999999999999999999999999999",
    "-5",
    "-0",
    "garbage",
    "²",
    "١٢",
    "12abc",
    "0x10",
    "9" * 5000,
    " 7 ",
    "7, 8",
    "Fri, 31 Dec 9999 23:59:59 GMT",
    "Mon, 01 Jan 0001 00:00:00 GMT",
    "Wed, 32 Foo 2020 25:61:61 GMT",
    "Tue, 01 Dec 2026 00:00:00 +9999",
]


@pytest.mark.parametrize("value", HOSTILE_RETRY_AFTER)
def test_hostile_retry_after_is_capped_or_ignored_never_raises(value):
    parsed = parse_retry_after(value, NOW)
    assert parsed is None or 0.0 <= parsed <= MAX_RETRY_AFTER_SECONDS
    error = RateLimitError("x", http_status=429, headers={"retry-after": value})
    policy = RetryPolicy()
    delay = next_delay(policy, error, 1, 0.0, now=NOW, jitter=lambda: 1.0)
    assert delay is not None and 0.0 <= delay <= policy.max_retry_after + 5.0


def test_hostile_retry_after_values_read_as():
    assert parse_retry_after("1e999", NOW) is None  # not delay-seconds: ignored, as garbage is
    assert parse_retry_after("99999999999999999999999999999", NOW) == MAX_RETRY_AFTER_SECONDS
    assert parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", NOW) == MAX_RETRY_AFTER_SECONDS
    assert parse_retry_after(" 7 ", NOW) == 7.0
    assert parse_retry_after("١٢", NOW) is None


@pytest.mark.parametrize("value", [None, "", "soon", "Mon, 99 Foo 2020", "nan"])
def test_unparseable_retry_after_is_ignored(value):
    assert parse_retry_after(value, NOW) is None


def test_fractional_and_negative_seconds():
    assert parse_retry_after("1.5", NOW) == 1.5
    assert parse_retry_after("-3", NOW) == 0.0
