"""StructureClient against the stand-in over real HTTP on loopback: requests, errors, retries."""

from __future__ import annotations

import email.utils
import re
import socket
import time

import numpy as np
import pytest

from structure_api import ConfigurationError, StructureClient, StructureRequest
from structure_api.errors import (
    APIConnectionError,
    AuthenticationError,
    ContentModerationError,
    GenerationFailedError,
    InputError,
    InsufficientCreditsError,
    InvalidRequestError,
    MalformedResponseError,
    RateLimitError,
    RequestTooLargeError,
    ResultMayBeBilledError,
    ServiceError,
    StructureError,
    UnexpectedRedirectError,
)
from structure_api.images import encode_upload
from structure_api.retry import RetryPolicy
from structure_api.standin import Drop, Hang, Passthrough, Respond, Stream
from support import TEST_KEY, photo_like


@pytest.fixture(scope="module")
def small_image():
    return encode_upload(photo_like(96, 64))


def make_request(image, **overrides) -> StructureRequest:
    fields = dict(
        image=image, prompt="a red house at dusk", control_strength=0.6, seed=42, output_format="png"
    )
    fields.update(overrides)
    return StructureRequest(**fields)


def assert_clean(error: StructureError) -> None:
    """One line, no key, no raw body in the text a person reads."""
    text = str(error)
    assert "\n" not in text and text.strip() == text
    assert TEST_KEY not in text and TEST_KEY not in repr(error)


# --- the happy path ---------------------------------------------------------------------


def test_generate_returns_decoded_image_seed_and_format(make_client, standin, small_image):
    result = make_client().generate(make_request(small_image))
    assert result.pixels.shape == (64, 96, 3) and result.pixels.dtype == np.uint8
    assert result.seed == 42 and result.format == "png" and result.attempts == 1
    assert result.data[:8] == b"\x89PNG\r\n\x1a\n"
    [recorded] = standin.requests
    assert recorded.method == "POST" and recorded.path == "/api/control/structure"
    assert recorded.headers["authorization"] == TEST_KEY  # the raw key, no "Bearer"
    assert recorded.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert recorded.fields == {
        "prompt": "a red house at dusk",
        "control_strength": "0.6",
        "seed": "42",
        "output_format": "png",
    }
    assert recorded.image_bytes == small_image.data
    assert recorded.image_content_type == "image/png"


@pytest.mark.parametrize("fmt", ["jpeg", "webp", "png"])
def test_each_output_format(make_client, small_image, fmt):
    result = make_client().generate(make_request(small_image, output_format=fmt))
    assert result.format == fmt and result.pixels.shape == (64, 96, 3)


def test_optional_fields_left_out_when_empty(make_client, standin, small_image):
    result = make_client().generate(make_request(small_image, seed=0, negative_prompt="   "))
    fields = standin.requests[0].fields
    assert "seed" not in fields and "negative_prompt" not in fields
    assert 1 <= result.seed <= 4294967294  # the service picked one


def test_unicode_prompt_travels_intact(make_client, standin, small_image):
    prompt = "Ein Haus 🏠 au crépuscule — 夕暮れの家\nsecond line"
    make_client().generate(make_request(small_image, prompt=prompt, negative_prompt="blur ✗"))
    assert standin.requests[0].fields["prompt"] == prompt
    assert standin.requests[0].fields["negative_prompt"] == "blur ✗"


def test_one_session_reuses_its_connection(make_client, standin, small_image):
    client = make_client()
    for _ in range(3):
        client.generate(make_request(small_image))
    assert len(standin.requests) == 3
    assert len(client.connections) == 1


# --- validation before any request ------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"prompt": ""}, "prompt is empty"),
        ({"prompt": " \n\t "}, "prompt is empty"),
        ({"prompt": "x" * 10001}, "10001 characters"),
        ({"prompt": "ok\x00bad"}, r"U\+0000"),
        ({"negative_prompt": "a\x1bb"}, r"U\+001B"),
        ({"control_strength": 1.01}, "between 0 and 1"),
        ({"control_strength": -0.01}, "between 0 and 1"),
        ({"control_strength": float("nan")}, "control_strength"),
        ({"control_strength": True}, "control_strength"),
        ({"seed": -1}, "seed"),
        ({"seed": 4294967295}, "seed"),
        ({"seed": 3.0}, "seed"),
        ({"output_format": "gif"}, "output_format"),
    ],
)
def test_bad_parameters_fail_before_any_request(make_client, standin, small_image, overrides, words):
    with pytest.raises(InputError, match=words) as info:
        make_client().generate(make_request(small_image, **overrides))
    assert_clean(info.value)
    assert standin.requests == []


def test_prompt_of_exactly_10000_characters_is_sent(make_client, standin, small_image):
    make_client().generate(make_request(small_image, prompt="y" * 10000))
    assert len(standin.requests[0].fields["prompt"]) == 10000


@pytest.mark.parametrize("width, height, words", [(63, 100, "at least 64"), (200, 64, "aspect ratio")])
def test_image_outside_limits_fails_before_any_request(make_client, standin, width, height, words):
    with pytest.raises(InputError, match=words):
        make_client().generate(make_request(encode_upload(photo_like(width, height))))
    assert standin.requests == []


@pytest.mark.parametrize(
    "timeouts",
    [
        {"connect_timeout": 0},
        {"read_timeout": -1},
        {"read_timeout": float("nan")},
        {"connect_timeout": True},
        {"read_timeout": "5"},
    ],
)
def test_a_bad_timeout_is_refused_when_the_client_is_made(standin, timeouts):
    [(what, value)] = timeouts.items()
    with pytest.raises(
        ConfigurationError, match=f"The {what.split('_')[0]} timeout must be a positive number"
    ) as info:
        StructureClient(api_key=TEST_KEY, base_url=standin.url, **timeouts)
    assert_clean(info.value)
    assert repr(value) in str(info.value)


def test_limits_hold_what_the_client_was_given(make_client):
    limits = make_client(connect_timeout=2, read_timeout=5).limits
    assert (limits.connect_timeout, limits.read_timeout) == (2, 5)


# --- each error class ----------------------------------------------------------------------

UPSTREAM = {"id": "req-123", "name": "bad_request", "errors": ["prompt: cannot be blank"]}


@pytest.mark.parametrize(
    "status, body, error_class, words",
    [
        (401, {"code": -1, "message": "Invalid API key"}, AuthenticationError, "rejected the API key"),
        (
            403,
            {"id": "a", "name": "forbidden", "errors": ["key revoked"]},
            AuthenticationError,
            "key revoked",
        ),
        (
            403,
            {"id": "a", "name": "content_moderation", "errors": ["flagged"]},
            ContentModerationError,
            "moderation",
        ),
        (402, {"code": -1, "message": "Insufficient credits"}, InsufficientCreditsError, "out of credits"),
        (400, UPSTREAM, InvalidRequestError, "prompt: cannot be blank"),
        (422, {"code": -1, "message": "unsupported image"}, InvalidRequestError, "unsupported image"),
        (413, {"code": -1, "message": "too big"}, RequestTooLargeError, "10 MiB"),
        (501, {"code": -1, "message": "nope"}, ServiceError, "HTTP 501"),
        (418, {"code": -1, "message": "teapot"}, StructureError, "HTTP 418"),
    ],
)
def test_error_statuses_map_to_classes(make_client, standin, small_image, status, body, error_class, words):
    standin.script(Respond(status, body=body, headers={"x-request-id": "rid-9"}))
    with pytest.raises(error_class, match=words) as info:
        make_client().generate(make_request(small_image))
    error = info.value
    assert_clean(error)
    assert error.http_status == status and error.request_id == "rid-9" and error.body
    assert len(standin.requests) == 1  # never retried


def test_upstream_id_is_kept_as_request_id(make_client, standin, small_image):
    standin.script(Respond(400, body=UPSTREAM))
    with pytest.raises(InvalidRequestError) as info:
        make_client().generate(make_request(small_image))
    assert info.value.request_id == "req-123"
    assert info.value.reason == "prompt: cannot be blank"


def test_code_minus_one_with_http_200(make_client, standin, small_image):
    standin.script(Respond(200, body={"code": -1, "message": "generation failed upstream"}))
    with pytest.raises(GenerationFailedError, match="generation failed upstream") as info:
        make_client().generate(make_request(small_image))
    assert_clean(info.value)


def test_html_error_page_from_a_proxy(make_client, standin, small_image):
    page = "<html><body><h1>502 Bad Gateway</h1><p>nginx</p></body></html>"
    standin.script(*[Respond(502, body=page, headers={"content-type": "text/html"})] * 5)
    with pytest.raises(ServiceError, match="not JSON") as info:
        make_client().generate(make_request(small_image))
    assert "<html>" not in str(info.value)
    assert len(standin.requests) == 5  # max_attempts of the default policy


@pytest.mark.parametrize(
    "body, words",
    [
        (b"", "empty"),
        (b'{"code": 0, "message": "success", "data": {"ima', "not JSON"),
        ({"code": 0, "message": "success"}, "no image"),
        (
            {"code": 0, "message": "success", "data": {"image": "@@@not base64@@@", "seed": 1}},
            "not valid base64",
        ),
        ({"code": 0, "message": "success", "data": {"image": "aGVsbG8gd29ybGQ=", "seed": 1}}, "not an image"),
        ({"code": 0, "message": "success", "data": {"image": "aGVsbG8=", "seed": "x"}}, "not an image"),
        (b"[1, 2, 3]", "not an object"),
        # A short id: pytest puts the test's id in an environment variable, which Windows caps at 32767
        # characters.
        pytest.param(b"[" * 100000 + b"]" * 100000, "not JSON", id="100000-nested-arrays"),
    ],
)
def test_malformed_success_answers(make_client, standin, small_image, body, words):
    standin.script(Respond(200, body=body))
    with pytest.raises(MalformedResponseError, match=words) as info:
        make_client().generate(make_request(small_image))
    assert_clean(info.value)
    assert len(standin.requests) == 1


def test_server_echoing_the_key_is_redacted(make_client, standin, small_image):
    standin.script(Respond(401, body={"code": -1, "message": f"bad key {TEST_KEY}"}))
    with pytest.raises(AuthenticationError) as info:
        make_client().generate(make_request(small_image))
    assert_clean(info.value)
    assert "****" in str(info.value)


# --- retries -------------------------------------------------------------------------------


def test_503_then_success_is_retried_with_backoff(make_client, standin, sleeps, small_image):
    standin.script(Respond(503), Respond(503))
    result = make_client().generate(make_request(small_image))
    assert result.attempts == 3 and len(standin.requests) == 3
    assert sleeps.calls == [0.5, 1.0]  # jitter 0 -> half of 1 s, 2 s


def test_429_honours_retry_after_seconds(make_client, standin, sleeps, small_image):
    standin.script(Respond(429, headers={"Retry-After": "7"}, body={"code": -1, "message": "slow down"}))
    make_client().generate(make_request(small_image))
    # The pause is waited out in the pacer, from when it was set: exact but for the microseconds between.
    assert sleeps.calls == [pytest.approx(7.0, abs=0.01)]


def test_429_honours_retry_after_http_date(make_client, standin, sleeps, small_image):
    now = 1_800_000_000.0
    when = email.utils.formatdate(now + 20, usegmt=True)
    standin.script(Respond(429, headers={"Retry-After": when}))
    make_client(wall_clock=lambda: now).generate(make_request(small_image))
    assert sleeps.calls == [pytest.approx(20.0, abs=0.01)]


def test_429_exhausted_raises_rate_limit_error(make_client, standin, sleeps, small_image):
    standin.script(*[Respond(429, headers={"Retry-After": "1"})] * 3)
    with pytest.raises(RateLimitError, match="HTTP 429") as info:
        make_client(retry_policy=RetryPolicy(max_rate_limited_attempts=3)).generate(make_request(small_image))
    assert info.value.retry_after == 1.0
    assert len(standin.requests) == 3 and sleeps.calls == pytest.approx([1.0, 1.0], abs=0.01)


@pytest.mark.parametrize("status", [400, 401, 402, 403, 413, 422])
def test_no_retry_for_other_4xx(make_client, standin, sleeps, small_image, status):
    standin.script(Respond(status))
    with pytest.raises(StructureError):
        make_client().generate(make_request(small_image))
    assert len(standin.requests) == 1 and sleeps.calls == []


def test_read_timeout_after_upload_is_never_resent(make_client, standin, small_image):
    standin.script(Hang())
    started = time.monotonic()
    with pytest.raises(ResultMayBeBilledError, match="may have") as info:
        make_client(read_timeout=0.5).generate(make_request(small_image))
    assert time.monotonic() - started < 5
    assert_clean(info.value)
    assert len(standin.requests) == 1


def test_connection_refused_is_retried_then_reported(sleeps, small_image):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = StructureClient(
        api_key=TEST_KEY,
        base_url=f"http://127.0.0.1:{port}",
        sleep=sleeps,
        jitter=lambda: 0.0,
        retry_policy=RetryPolicy(max_attempts=3),
    )
    with pytest.raises(APIConnectionError, match="Could not reach 127.0.0.1") as info:
        client.generate(make_request(small_image))
    assert_clean(info.value)
    assert len(sleeps.calls) == 2


def test_drop_after_full_upload_is_not_resent(make_client, standin, small_image):
    standin.script(Drop())
    with pytest.raises(ResultMayBeBilledError):
        make_client().generate(make_request(small_image))
    assert len(standin.requests) == 1


def test_redirect_to_another_host_is_not_followed(make_client, standin, small_image):
    standin.script(Respond(307, headers={"Location": "http://evil.example.net/steal"}, body=b""))
    with pytest.raises(UnexpectedRedirectError, match="evil.example.net") as info:
        make_client().generate(make_request(small_image))
    assert_clean(info.value)
    assert len(standin.requests) == 1


def test_slow_but_successful_answer(make_client, standin, small_image):
    standin.script(Passthrough(delay=0.3))
    result = make_client(read_timeout=5).generate(make_request(small_image))
    assert result.pixels.shape == (64, 96, 3)


def test_wrong_key_is_refused_by_the_stand_in(make_client, standin, small_image):
    with pytest.raises(AuthenticationError) as info:
        make_client(api_key="sk-wrong").generate(make_request(small_image))
    assert "sk-wrong" not in str(info.value)


def test_oversized_declared_response_is_not_read(make_client, standin, small_image):
    standin.script(
        Stream(
            status=200,
            headers={"Content-Length": str(500 * 2**20)},
            chunks=lambda: iter([b"x" * 2**20] * 500),
        )
    )
    with pytest.raises(MalformedResponseError, match="MiB"):
        make_client().generate(make_request(small_image))


@pytest.mark.parametrize(
    "url, words",
    [
        ("http://127.0.0.1:70000", "port that is not a number from 1 to 65535"),
        ("http://127.0.0.1:0", "port that is not a number from 1 to 65535"),
        ("ftp://127.0.0.1:8000", "must be an http(s) address"),
        ("http://user:secret@127.0.0.1:8000", "must not contain a user name or password"),
        ("http://[::1", "broken host"),
    ],
)
def test_base_url_is_checked_as_the_environment_variable_is(url, words):
    """At once and with no request: a port out of range is a configuration error, not five retries."""
    started = time.monotonic()
    with pytest.raises(ConfigurationError, match=re.escape(words)) as caught:
        StructureClient(api_key=TEST_KEY, base_url=url)
    assert str(caught.value).startswith("base_url ") and "secret" not in str(caught.value)
    assert time.monotonic() - started < 1
