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
from structure_api.retry import RetryPolicy, backoff_delay, is_retryable, next_delay, parse_retry_after

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
    delays = [next_delay(policy, service_error(503), attempt, 0.0, now=NOW, jitter=lambda: 1.0)
              for attempt in range(1, 5)]
    assert delays == [1.0, 2.0, 4.0, None]


def test_total_time_cap_stops_retrying():
    policy = RetryPolicy(max_attempts=10, base_delay=10.0, max_delay=10.0, max_total_seconds=25.0)
    assert next_delay(policy, service_error(500), 1, 10.0, now=NOW, jitter=lambda: 1.0) == 10.0
    assert next_delay(policy, service_error(500), 2, 20.0, now=NOW, jitter=lambda: 1.0) is None


def test_retry_after_seconds_replaces_backoff():
    error = RateLimitError("x", http_status=429, headers={"retry-after": "7"})
    assert next_delay(RetryPolicy(), error, 1, 0.0, now=NOW, jitter=lambda: 1.0) == 7.0


def test_retry_after_http_date():
    when = email.utils.formatdate(NOW + 12, usegmt=True)
    error = RateLimitError("x", http_status=429, headers={"retry-after": when})
    assert next_delay(RetryPolicy(), error, 1, 0.0, now=NOW, jitter=lambda: 1.0) == pytest.approx(12.0)


def test_retry_after_in_the_past_means_now():
    when = email.utils.formatdate(NOW - 30, usegmt=True)
    assert parse_retry_after(when, NOW) == 0.0


def test_retry_after_longer_than_the_cap_gives_up_at_once():
    error = RateLimitError("x", http_status=429, headers={"retry-after": "3600"})
    assert next_delay(RetryPolicy(max_retry_after=90), error, 1, 0.0, now=NOW, jitter=lambda: 0.0) is None


def test_429_without_retry_after_backs_off():
    error = RateLimitError("x", http_status=429)
    assert next_delay(RetryPolicy(base_delay=2.0), error, 2, 0.0, now=NOW, jitter=lambda: 1.0) == 4.0


@pytest.mark.parametrize("value", [None, "", "soon", "Mon, 99 Foo 2020", "nan"])
def test_unparseable_retry_after_is_ignored(value):
    assert parse_retry_after(value, NOW) is None


def test_fractional_and_negative_seconds():
    assert parse_retry_after("1.5", NOW) == 1.5
    assert parse_retry_after("-3", NOW) == 0.0
