"""The fault matrix: the client against a stand-in that misbehaves on cue, every outcome asserted.

Each scenario ends either *recovered* (a result, after the retries the policy allows, with the
waits it asked for) or in a typed error whose one-line message names the problem, within a
bounded time. Waits are injected (recorded, never slept); only the read timeout and the slow
answer take real time.
"""

from __future__ import annotations

import email.utils
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

from structure_api import StructureRequest
from structure_api.errors import (
    APIConnectionError,
    AuthenticationError,
    ContentModerationError,
    GenerationFailedError,
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
from structure_api.standin import (
    Drop,
    DropBeforeRead,
    Fault,
    Hang,
    Passthrough,
    Respond,
    StandInServer,
    Truncate,
)
from structure_api.standin.bodies import body_bytes

from .probes import CANARY_KEY, b64, image_file_bytes, message_problems, photo_like

NOW = 1_800_000_000.0  # the injected wall clock, for Retry-After dates
PNG_96x64 = image_file_bytes(photo_like(96, 64, seed=3), "PNG")
JPEG_96x64 = image_file_bytes(photo_like(96, 64, seed=3), "JPEG", quality=90)
DEFAULT_BOUND = 5.0  # seconds of wall time any scenario without a real timeout may take


def ok_body(image: bytes = PNG_96x64, seed: int = 7) -> dict:
    return {"code": 0, "message": "success", "data": {"image": b64(image), "seed": seed}}


def service_shape(message: str) -> dict:
    return {"code": -1, "message": message}


def upstream_shape(name: str, error: str, request_id: str = "req-up-1") -> dict:
    return {"id": request_id, "name": name, "errors": [error]}


@dataclass
class Scenario:
    """One row of the matrix."""

    name: str
    faults: list[Fault]
    expect: type  # StructureResult for "recovered", else the error class
    words: str = ""  # must appear in str(error)
    requests: int = 1  # requests the stand-in must have seen
    waits: list[float] | None = None  # the retry waits the client must have asked for
    client: dict = field(default_factory=dict)
    bound: float = DEFAULT_BOUND
    check: Callable | None = None  # extra assertions: check(result_or_error, service, caplog)


RECOVERED = object  # marker: the call must return a result

HTML_403 = (
    "<!DOCTYPE html><html><head><title>Attention Required! | Cloudflare</title></head>"
    "<body><h1>Sorry, you have been blocked</h1></body></html>"
)
HTML_200 = "<html><head><title>Hotel Wi-Fi</title></head><body>Please log in to continue</body></html>"


def _same_request_id(expected: str):
    def check(error, service, caplog):
        assert error.request_id == expected

    return check


def _format_is(fmt: str):
    def check(result, service, caplog):
        assert result.format == fmt and result.pixels.shape == (64, 96, 3)
        assert any("returned jpeg" in r.getMessage() for r in caplog.records), "the mismatch must be logged"

    return check


def _retry_after_said(seconds: int):
    def check(error, service, caplog):
        assert error.retry_after == seconds and f"wait {seconds} s" in str(error)

    return check


SCENARIOS = [
    # --- rate limits
    # -------------------------------------------------------------------------------------------
    Scenario(
        "429 with Retry-After: 7 (seconds)",
        [Respond(429, headers={"Retry-After": "7"}, body=service_shape("Too many requests"))],
        RECOVERED,
        requests=2,
        waits=[7.0],
    ),
    Scenario(
        "429 with Retry-After as an HTTP date 20 s ahead",
        [Respond(429, headers={"Retry-After": email.utils.formatdate(NOW + 20, usegmt=True)})],
        RECOVERED,
        requests=2,
        waits=[20.0],
        client={"wall_clock": lambda: NOW},
    ),
    Scenario("429 without Retry-After", [Respond(429)], RECOVERED, requests=2, waits=[0.5]),
    # A 429 is never billed: 429s in a row are waited out for 150 s (past the upstream's 60 s lock-out),
    # backing off to 15 s (jitter 0), and only then given up.
    Scenario(
        "429 without Retry-After on every attempt (waited out past a 60 s lock-out, then given up)",
        [Respond(429)] * 14,
        RateLimitError,
        "limiting the request rate (HTTP 429)",
        requests=14,
        waits=[0.5, 1.0, 2.0, 4.0, 8.0] + [15.0] * 8,
    ),
    Scenario(
        "429 without Retry-After 8 times, then success",
        [Respond(429)] * 8,
        RECOVERED,
        requests=9,
        waits=[0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0],
    ),
    Scenario(
        "429 with Retry-After: 3600, twice (waited the 90 s cap, then given up)",
        [Respond(429, headers={"Retry-After": "3600"})] * 2,
        RateLimitError,
        "wait 3600 s",
        requests=2,
        waits=[90.0],
        check=_retry_after_said(3600),
    ),
    # --- 5xx
    # ---------------------------------------------------------------------------------------------------
    Scenario("500 (JSON), then success", [Respond(500)], RECOVERED, requests=2, waits=[0.5]),
    Scenario("502 (nginx HTML page), then success", [Respond(502)], RECOVERED, requests=2, waits=[0.5]),
    Scenario("503 (JSON), then success", [Respond(503)], RECOVERED, requests=2, waits=[0.5]),
    Scenario("504 (nginx HTML page), then success", [Respond(504)], RECOVERED, requests=2, waits=[0.5]),
    Scenario(
        "500, 502, 503, 504 in a row, then success",
        [Respond(500), Respond(502), Respond(503), Respond(504)],
        RECOVERED,
        requests=5,
        waits=[0.5, 1.0, 2.0, 4.0],
    ),
    Scenario(
        "503 on all 5 attempts",
        [Respond(503)] * 5,
        ServiceError,
        "nothing was charged",
        requests=5,
        waits=[0.5, 1.0, 2.0, 4.0],
    ),
    # --- 4xx, service shape and upstream shape
    # -----------------------------------------------------------------
    Scenario(
        "400, service shape",
        [Respond(400, body=service_shape("prompt: is required"))],
        InvalidRequestError,
        "(HTTP 400); the service said: prompt: is required",
    ),
    Scenario(
        "400, upstream shape",
        [Respond(400, body=upstream_shape("bad_request", "control_strength: must be between 0 and 1"))],
        InvalidRequestError,
        "control_strength: must be between 0 and 1",
        check=_same_request_id("req-up-1"),
    ),
    Scenario(
        "401, service shape",
        [Respond(401, body=service_shape("Invalid or missing API key."))],
        AuthenticationError,
        "rejected the API key (HTTP 401)",
    ),
    Scenario(
        "401, upstream shape",
        [Respond(401, body=upstream_shape("unauthorized", "authorization header is missing or invalid"))],
        AuthenticationError,
        "check AITHRIVING_API_KEY",
    ),
    Scenario(
        "402, service shape",
        [Respond(402, body=service_shape("Insufficient credits."))],
        InsufficientCreditsError,
        "out of credits (HTTP 402)",
    ),
    Scenario(
        "402, upstream shape",
        [Respond(402, body=upstream_shape("payment_required", "your account does not have enough credits"))],
        InsufficientCreditsError,
        "not have enough credits",
    ),
    Scenario(
        "403, service shape (key revoked)",
        [Respond(403, body=service_shape("API key revoked"))],
        AuthenticationError,
        "API key revoked",
    ),
    Scenario(
        "403, upstream shape (content moderation)",
        [Respond(403, body=upstream_shape("content_moderation", "the prompt was flagged"))],
        ContentModerationError,
        "content-moderation grounds (HTTP 403)",
    ),
    Scenario(
        "413, service shape",
        [Respond(413, body=service_shape("Request body is larger than 10 MiB."))],
        RequestTooLargeError,
        "over the service's 10 MiB limit (HTTP 413)",
    ),
    Scenario(
        "413, upstream shape",
        [Respond(413, body=upstream_shape("payload_too_large", "the request must be at most 10 MiB"))],
        RequestTooLargeError,
        "use a smaller image",
    ),
    Scenario(
        "422, service shape",
        [Respond(422, body=service_shape("Unsupported input."))],
        InvalidRequestError,
        "(HTTP 422); the service said: Unsupported input",
    ),
    Scenario(
        "422, upstream shape",
        [Respond(422, body=upstream_shape("invalid_input", "image: unsupported colour space"))],
        InvalidRequestError,
        "image: unsupported colour space",
    ),
    # --- failures inside a 200
    # ---------------------------------------------------------------------------------
    Scenario(
        "code -1 with HTTP 200",
        [Respond(200, body=service_shape("Generation failed, please try again."))],
        GenerationFailedError,
        "could not generate the image: Generation failed",
    ),
    Scenario(
        "HTML error page from a proxy (HTTP 403, Cloudflare)",
        [Respond(403, body=HTML_403, headers={"Content-Type": "text/html"})],
        AuthenticationError,
        "not JSON (an error page from a proxy or gateway?)",
    ),
    Scenario(
        "HTML page with HTTP 200 (captive portal)",
        [Respond(200, body=HTML_200, headers={"Content-Type": "text/html"})],
        MalformedResponseError,
        "was not JSON",
    ),
    Scenario(
        "502 HTML page on all 5 attempts",
        [Respond(502)] * 5,
        ServiceError,
        "not JSON",
        requests=5,
        waits=[0.5, 1.0, 2.0, 4.0],
    ),
    Scenario("empty body with HTTP 200", [Respond(200, body=b"")], MalformedResponseError, "was empty"),
    Scenario(
        "JSON truncated mid-way (complete HTTP message)",
        [Respond(200, body=b'{"code": 0, "message": "success", "data": {"image": "iVBORw0KGgoAAA')],
        MalformedResponseError,
        "was not JSON",
    ),
    Scenario(
        "answer cut off mid-way (Content-Length announces more; connection closed)",
        [Truncate(status=200, body=ok_body())],
        # The size follows the PNG's (15,687 bytes with Linux's zlib; Windows' Pillow compresses differently).
        ResultMayBeBilledError,
        f"of the {len(body_bytes(ok_body(), 200)[0]):,} bytes it announced",
    ),
    Scenario(
        "`data` missing",
        [Respond(200, body={"code": 0, "message": "success"})],
        MalformedResponseError,
        "no image in it (data.image missing)",
    ),
    Scenario(
        "`image` is not base64",
        [
            Respond(
                200, body={"code": 0, "message": "success", "data": {"image": "%%not*base64%%", "seed": 1}}
            )
        ],
        MalformedResponseError,
        "not valid base64",
    ),
    Scenario(
        "base64 of bytes that are not an image",
        [
            Respond(
                200,
                body={
                    "code": 0,
                    "message": "success",
                    "data": {"image": b64(b"GIF89 this is no image at all" * 10), "seed": 1},
                },
            )
        ],
        MalformedResponseError,
        "bytes that are not an image",
    ),
    Scenario(
        "image in another format than asked (JPEG for PNG)",
        [Respond(200, body=ok_body(JPEG_96x64))],
        RECOVERED,
        check=_format_is("jpeg"),
    ),
    # --- transport
    # ---------------------------------------------------------------------------------------------
    Scenario(
        "connection dropped after the upload, before the answer",
        [Drop()],
        ResultMayBeBilledError,
        "broke after the upload finished and before the answer",
    ),
    Scenario(
        "slow but successful answer (0.4 s; read timeout 3 s)",
        [Passthrough(delay=0.4)],
        RECOVERED,
        client={"read_timeout": 3.0},
    ),
]


def _describe(outcome) -> str:
    if isinstance(outcome, StructureError):
        return f"{type(outcome).__name__}: {outcome}"
    return (
        f"recovered: {outcome.format} {outcome.pixels.shape[1]}x{outcome.pixels.shape[0]}, attempt "
        f"{outcome.attempts}"
    )


def _expected(scenario: Scenario) -> str:
    if scenario.expect is RECOVERED:
        text = "recovered"
        if scenario.requests > 1:
            text += f" after {scenario.requests - 1} retr{'y' if scenario.requests == 2 else 'ies'}"
    else:
        text = f'{scenario.expect.__name__} "…{scenario.words}…"'
        text += ", not retried" if scenario.requests == 1 else f" after {scenario.requests} attempts"
    return text


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_fault_matrix(scenario: Scenario, service, new_client, waits, small_upload, ledger, caplog):
    caplog.set_level(logging.DEBUG)
    service.script(*scenario.faults)
    client = new_client(**scenario.client)
    request = StructureRequest(image=small_upload, prompt="a lighthouse in fog", seed=7)
    started = time.monotonic()
    try:
        outcome = client.generate(request)
    except StructureError as error:
        outcome = error
    seconds = time.monotonic() - started
    seen = len(service.requests)
    ledger.row(
        "faults",
        scenario.name,
        _expected(scenario),
        _describe(outcome),
        requests=seen,
        waited=waits.total,
        seconds=seconds,
    )
    ledger.count("faults_survived", sum(1 for r in service.requests if r.fault and r.fault != "passthrough"))

    if scenario.expect is RECOVERED:
        assert not isinstance(outcome, StructureError), _describe(outcome)
        assert outcome.attempts == scenario.requests
        assert outcome.pixels.dtype == np.uint8 and outcome.pixels.ndim == 3
    else:
        assert type(outcome) is scenario.expect, _describe(outcome)
        assert scenario.words in str(outcome), _describe(outcome)
        assert message_problems(str(outcome)) == [], (message_problems(str(outcome)), str(outcome))
        last = scenario.faults[-1]
        if isinstance(last, Respond):  # the raw material stays available on the error
            assert outcome.http_status == last.status
    assert seen == scenario.requests, f"the stand-in saw {seen} requests"
    if scenario.waits is not None:
        assert waits.calls == pytest.approx(scenario.waits, abs=0.01)
    assert waits.total <= client.retry_policy.max_total_seconds
    assert seconds < scenario.bound, f"took {seconds:.2f} s"
    if scenario.check is not None:
        scenario.check(outcome, service, caplog)
    assert all(CANARY_KEY not in record.getMessage() for record in caplog.records)


# --- scenarios that need more than a scripted answer
# -------------------------------------------------------------


def test_connection_refused(waits, small_upload, ledger):
    from structure_api import StructureClient

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = StructureClient(
        api_key=CANARY_KEY, base_url=f"http://127.0.0.1:{port}", sleep=waits, jitter=lambda: 0.0
    )
    started = time.monotonic()
    with pytest.raises(StructureError) as caught:
        client.generate(StructureRequest(image=small_upload, prompt="a lighthouse in fog", seed=7))
    seconds = time.monotonic() - started
    error = caught.value
    ledger.row(
        "faults",
        "connection refused (nothing listens on the port)",
        "APIConnectionError after 5 attempts (a refused connection delivered nothing, so retrying is free)",
        _describe(error),
        requests=0,
        waited=waits.total,
        seconds=seconds,
    )
    ledger.count("faults_survived", 5)
    assert type(error) is APIConnectionError and "Could not reach 127.0.0.1" in str(error)
    assert error.request_delivered is False
    assert message_problems(str(error)) == []
    assert waits.calls == [0.5, 1.0, 2.0, 4.0]
    assert seconds < DEFAULT_BOUND


def test_connection_dropped_while_a_large_upload_is_still_going(service, new_client, waits, ledger):
    """The stand-in closes before reading a 4 MiB body: the request provably never arrived, so it is
    retried."""
    noise = np.random.default_rng(5).integers(0, 256, (1200, 1200, 3), dtype=np.uint8)
    upload = encode_upload(noise)
    assert len(upload.data) > 4 * 2**20
    service.script(DropBeforeRead())
    started = time.monotonic()
    result = new_client().generate(StructureRequest(image=upload, prompt="static", seed=11))
    seconds = time.monotonic() - started
    recorded = service.requests
    ledger.row(
        "faults",
        f"connection dropped while the upload ({len(upload.data) / 2**20:.1f} MiB) is still going",
        "recovered after 1 retry (the upload never completed, so it cannot have been billed)",
        _describe(result),
        requests=len(recorded),
        waited=waits.total,
        seconds=seconds,
    )
    ledger.count("faults_survived")
    assert result.attempts == 2 and result.seed == 11
    assert [(r.fault, r.body_size) for r in recorded][0] == ("drop_before_read", 0)
    assert recorded[1].status == 200 and recorded[1].image_bytes == upload.data
    assert waits.calls == [0.5]
    assert seconds < 10


def test_answer_that_never_finishes_is_not_sent_twice(service, new_client, waits, small_upload, ledger):
    service.script(Hang())
    client = new_client(read_timeout=0.4)
    started = time.monotonic()
    with pytest.raises(StructureError) as caught:
        client.generate(StructureRequest(image=small_upload, prompt="a lighthouse in fog", seed=7))
    seconds = time.monotonic() - started
    time.sleep(0.3)  # real time on purpose: a second request, if one were sent, would have arrived by now
    error = caught.value
    ledger.row(
        "faults",
        "the answer never comes (read timeout 0.4 s)",
        "ResultMayBeBilledError after ~0.4 s; no second request (it may have been billed)",
        _describe(error),
        requests=len(service.requests),
        waited=waits.total,
        seconds=seconds,
    )
    ledger.count("faults_survived")
    assert type(error) is ResultMayBeBilledError and "may have generated and charged" in str(error)
    assert message_problems(str(error)) == []
    assert 0.35 < seconds < 2.0
    assert len(service.requests) == 1 and waits.calls == []


@pytest.mark.parametrize(
    "status, where",
    [(307, "127.0.0.2 (another address)"), (302, "127.0.0.1 on another port (another origin)")],
)
def test_redirect_to_another_host_takes_no_key_there(
    status, where, service, new_client, waits, small_upload, ledger
):
    other_host = "127.0.0.2" if status == 307 else "127.0.0.1"
    with StandInServer(host=other_host) as other:  # would accept anything, and records it
        service.script(Respond(status, headers={"Location": other.endpoint}, body=b""))
        started = time.monotonic()
        with pytest.raises(StructureError) as caught:
            new_client().generate(StructureRequest(image=small_upload, prompt="a lighthouse in fog", seed=7))
        seconds = time.monotonic() - started
        reached = other.requests
    error = caught.value
    ledger.row(
        "faults",
        f"redirect ({status}) to {where}",
        "UnexpectedRedirectError; not followed; the other host receives nothing",
        f"{_describe(error)}; other host saw {len(reached)} requests",
        requests=len(service.requests),
        waited=waits.total,
        seconds=seconds,
    )
    ledger.count("faults_survived")
    assert type(error) is UnexpectedRedirectError and other_host in str(error)
    assert message_problems(str(error)) == []
    assert reached == []
    assert len(service.requests) == 1 and waits.calls == []
