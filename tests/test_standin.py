"""The stand-in, over real HTTP on 127.0.0.1: contract, validation, auth, faults, threads."""

from __future__ import annotations

import _thread
import base64
import io
import signal
import struct
import threading
import time
import zlib

import numpy as np
import pytest
import requests
from PIL import Image, ImageFilter

from structure_api.standin import (
    ENDPOINT_PATH,
    FAULT_KINDS,
    Drop,
    DropBeforeRead,
    Fault,
    Hang,
    Passthrough,
    Respond,
    StandInServer,
    Stream,
    Truncate,
    serve,
)

KEY = "sk-standin-test-4d1e0b"
MIB = 1024 * 1024


# --- helpers -------------------------------------------------------------------------------


def shapes_image(width: int = 256, height: int = 192, *, shift: int = 0, seed: int = 0) -> np.ndarray:
    """A soft gradient with a bright disc and a dark bar (hard edges) and mild noise: ``[H, W, 3]`` uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack([0.3 + 0.2 * x / width, 0.3 + 0.2 * y / height, 0.4 + 0 * x], axis=-1)
    disc = (x - width * 0.4 - shift) ** 2 + (y - height * 0.5) ** 2 < (min(width, height) * 0.25) ** 2
    pixels[disc] = (0.95, 0.9, 0.8)
    pixels[int(height * 0.1) : int(height * 0.25), int(width * 0.55) + shift : int(width * 0.9)] = (
        0.05,
        0.05,
        0.1,
    )
    pixels += rng.normal(0, 0.02, pixels.shape).astype(np.float32)
    return (np.clip(pixels, 0, 1) * 255 + 0.5).astype(np.uint8)


def encode(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def blank_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height), 128).save(buffer, format="PNG")
    return buffer.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header announces width x height: a decompression bomb if anyone decoded it."""
    data = bytearray(blank_png(64, 64))
    # IHDR is the first chunk: 8-byte signature, 4-byte length, "IHDR", then width and height.
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def edge_strength(pixels: np.ndarray) -> np.ndarray:
    """Luminance gradient magnitude, box-blurred over 7 px (see test_output_keeps_the_input_edges)."""
    luminance = np.asarray(Image.fromarray(pixels).convert("L"), dtype=np.float32) / 255
    gy, gx = np.gradient(luminance)
    magnitude = np.hypot(gx, gy)
    scaled = Image.fromarray(np.clip(magnitude * 255 * 4, 0, 255).astype(np.uint8))
    return np.asarray(scaled.filter(ImageFilter.BoxBlur(3)), dtype=np.float32)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


IMAGE = encode(shapes_image())


def post(
    session: requests.Session,
    server: StandInServer,
    *,
    image: bytes | None = IMAGE,
    key: str | None = KEY,
    filename: str = "input.png",
    content_type: str = "image/png",
    timeout: float = 10,
    **fields: str,
) -> requests.Response:
    data = {"prompt": "a lighthouse at dusk"}
    data.update(fields)
    data = {name: value for name, value in data.items() if value is not None}
    files = {"image": (filename, image, content_type)} if image is not None else None
    if files is None:
        # requests only builds multipart when there is a file; keep the request multipart anyway.
        files = {"unused": ("", b"", "application/octet-stream")}
    headers = {"authorization": key} if key is not None else {}
    return session.post(server.url + ENDPOINT_PATH, data=data, files=files, headers=headers, timeout=timeout)


def decoded(response: requests.Response) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(response.json()["data"]["image"])))


def conn_threads(server: StandInServer) -> list[threading.Thread]:
    return [
        t
        for t in threading.enumerate()
        if t.name.startswith(f"standin-{server.port}-") and t.name.endswith("-conn")
    ]


def wait_for(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


@pytest.fixture
def session():
    with requests.Session() as http:
        http.trust_env = False  # no proxy or .netrc of the machine gets between the test and loopback
        yield http


@pytest.fixture
def server():
    with StandInServer(api_key=KEY) as running:
        yield running


# --- the contract's success path -----------------------------------------------------------


@pytest.mark.parametrize("output_format, pil_format", [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_success_round_trip(server, session, output_format, pil_format):
    response = post(
        session,
        server,
        output_format=output_format,
        seed="1234",
        control_strength="0.6",
        negative_prompt="fog",
    )
    assert response.status_code == 200
    payload = response.json()
    assert set(payload) == {"code", "message", "data"}
    assert payload["code"] == 0 and payload["message"] == "success"
    assert set(payload["data"]) == {"image", "seed"}
    assert payload["data"]["seed"] == 1234
    request_id = response.headers["x-request-id"]
    assert len(request_id) == 32 and int(request_id, 16) >= 0
    assert response.headers["content-type"] == "application/json"
    image = decoded(response)
    assert image.format == pil_format
    assert (image.width, image.height) == (256, 192)


def test_default_format_is_png(server, session):
    assert decoded(post(session, server)).format == "PNG"


@pytest.mark.parametrize("seed", ["0", None])
def test_seed_zero_or_missing_picks_a_random_seed(server, session, seed):
    seeds = {post(session, server, seed=seed).json()["data"]["seed"] for _ in range(3)}
    assert all(isinstance(s, int) and 1 <= s <= 4294967294 for s in seeds)
    assert len(seeds) == 3  # three draws from ~4.3e9 values: a repeat means it is not random


def test_extreme_seeds_are_echoed(server, session):
    for seed in ("1", "4294967294"):
        assert post(session, server, seed=seed).json()["data"]["seed"] == int(seed)


def test_generation_is_deterministic_and_depends_on_every_input(server, session):
    base = dict(prompt="a red barn", seed="77", control_strength="0.7", output_format="png")

    def image_bytes(**changes: str) -> bytes:
        fields = {**base, **changes}
        image = fields.pop("image", IMAGE)
        return base64.b64decode(post(session, server, image=image, **fields).json()["data"]["image"])

    reference = image_bytes()
    assert image_bytes() == reference
    variants = [
        image_bytes(prompt="a blue barn"),
        image_bytes(seed="78"),
        image_bytes(negative_prompt="people"),
        image_bytes(control_strength="0.3"),
        image_bytes(image=encode(shapes_image(shift=20))),
    ]
    for variant in variants:
        assert variant != reference
    assert image_bytes(output_format="webp") == image_bytes(output_format="webp")


def test_output_keeps_the_input_edges(server, session):
    source = shapes_image(320, 240)
    response = post(session, server, image=encode(source), seed="5", control_strength="0.7")
    output = np.asarray(decoded(response).convert("RGB"))
    kept = correlation(edge_strength(source), edge_strength(output))
    # The control: the same scene with its shapes moved 40 px. A stand-in that ignored the
    # input would score alike on both.
    moved = correlation(edge_strength(shapes_image(320, 240, shift=40)), edge_strength(output))
    # Why blur, and why 0.6: the stand-in draws the input's edges as outlines, so the output's
    # own gradients sit on both sides of each input edge, 1-2 px away; a 7 px box blur makes
    # that offset irrelevant. What remains is a correlation of ~0.9 for the real input and ~0.3
    # for the moved one (their edges partly overlap); 0.6 sits between them with room on both
    # sides for changes to noise, colours or encoder.
    assert kept > 0.6, kept
    assert moved < kept - 0.3, (kept, moved)


def test_control_strength_zero_lets_go_of_the_structure(server, session):
    source = shapes_image(320, 240)
    output = np.asarray(
        decoded(post(session, server, image=encode(source), seed="5", control_strength="0")).convert("RGB")
    )
    # "0 is the least influence": only the seed's smooth texture is left (measured ~0.02).
    assert abs(correlation(edge_strength(source), edge_strength(output))) < 0.2


def test_control_strength_one_draws_edges_at_full_contrast(server, session):
    source = shapes_image()
    output = np.asarray(
        decoded(post(session, server, image=encode(source), control_strength="1", seed="9")).convert("L"),
        dtype=np.float32,
    )
    # Flat areas (far from any edge) and the strongest edge pixels should be far apart in value.
    assert np.percentile(output, 99.5) - np.median(output) > 100


def test_accepts_jpeg_and_webp_input_and_chunked_upload(server, session):
    for fmt in ("JPEG", "WEBP"):
        response = post(
            session, server, image=encode(shapes_image(), fmt), content_type=f"image/{fmt.lower()}"
        )
        assert response.status_code == 200, response.text
    body, content_type = requests.models.RequestEncodingMixin._encode_files(
        {"image": ("a.png", IMAGE, "image/png")}, {"prompt": "x"}
    )
    chunks = (body[i : i + 4096] for i in range(0, len(body), 4096))  # a generator: sent chunked
    response = session.post(
        server.url + ENDPOINT_PATH,
        data=chunks,
        timeout=10,
        headers={"authorization": KEY, "content-type": content_type},
    )
    assert response.status_code == 200, response.text
    assert server.requests[-1].headers.get("transfer-encoding") == "chunked"
    assert server.requests[-1].image_bytes == IMAGE


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, reason",
    [
        ({"prompt": None}, "prompt: is required"),
        ({"prompt": ""}, "prompt: must be 1 to 10000 characters"),
        ({"prompt": "x" * 10001}, "prompt: must be 1 to 10000 characters"),
        ({"control_strength": "1.01"}, "control_strength: must be a number between 0 and 1"),
        ({"control_strength": "-0.1"}, "control_strength: must be a number between 0 and 1"),
        ({"control_strength": "strong"}, "control_strength: must be a number between 0 and 1"),
        ({"control_strength": "nan"}, "control_strength: must be a number between 0 and 1"),
        ({"seed": "-1"}, "seed: must be an integer between 0 and 4294967294"),
        ({"seed": "4294967295"}, "seed: must be an integer between 0 and 4294967294"),
        ({"seed": "1.5"}, "seed: must be an integer between 0 and 4294967294"),
        ({"seed": "12abc"}, "seed: must be an integer between 0 and 4294967294"),
        ({"output_format": "gif"}, "output_format: must be one of jpeg, png, webp"),
        ({"output_format": "PNG"}, "output_format: must be one of jpeg, png, webp"),
        ({"negative_prompt": "n" * 10001}, "negative_prompt: must be at most 10000 characters"),
        ({"image": None}, "image: is required"),
        ({"image": b"GIF89a not really"}, "image: could not be decoded"),
        ({"image": encode(shapes_image(), "GIF")}, "image: could not be decoded"),
        ({"image": IMAGE[: len(IMAGE) // 2]}, "image: could not be decoded"),
        ({"image": blank_png(63, 200)}, "image: every side must be at least 64 pixels"),
        ({"image": blank_png(64, 161)}, "image: aspect ratio must be between 1:2.5 and 2.5:1"),
        ({"image": blank_png(3073, 3072)}, "image: must have 4096 to 9437184 pixels"),
        ({"image": png_claiming_size(5000, 5000)}, "image: must have 4096 to 9437184 pixels"),
        ({"image": png_claiming_size(40000, 40000)}, "image: must have 4096 to 9437184 pixels"),
    ],
)
def test_invalid_requests_get_400_naming_the_field(server, session, fields, reason):
    fields = dict(fields)
    image = fields.pop("image", IMAGE)
    response = post(session, server, image=image, **fields)
    assert response.status_code == 400
    payload = response.json()
    assert payload["code"] == -1 and payload["name"] == "bad_request"
    assert payload["message"].startswith(reason), payload
    assert payload["errors"] == [payload["message"]]
    assert server.credits_spent == 0


def test_limits_are_inclusive(server, session):
    for width, height in ((64, 64), (64, 160), (160, 64)):
        assert post(session, server, image=blank_png(width, height)).status_code == 200, (width, height)


def test_body_that_is_not_multipart_is_400(server, session):
    response = session.post(
        server.url + ENDPOINT_PATH, json={"prompt": "x"}, headers={"authorization": KEY}, timeout=10
    )
    assert response.status_code == 400
    assert response.json()["message"] == "content-type: must be multipart/form-data"
    broken = session.post(
        server.url + ENDPOINT_PATH,
        data=b"--nope\r\nno headers",
        headers={"authorization": KEY, "content-type": "multipart/form-data; boundary=nope"},
        timeout=10,
    )
    assert broken.status_code == 400
    assert broken.json()["message"].startswith("body: malformed multipart/form-data")


def test_request_over_10_mib_is_413_and_the_connection_stays_usable(server, session):
    oversized = post(session, server, image=b"\0" * (10 * MIB + 1))
    assert oversized.status_code == 413
    assert oversized.json()["name"] == "payload_too_large"
    assert server.requests[-1].body_size > 10 * MIB  # drained, so keep-alive framing holds
    assert post(session, server).status_code == 200
    # Exactly 10 MiB of body is allowed through to validation.
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    body = head + b"\0" * (10 * MIB - len(head) - len(tail)) + tail
    assert len(body) == 10 * MIB
    response = session.post(
        server.url + ENDPOINT_PATH,
        data=body,
        timeout=10,
        headers={"authorization": KEY, "content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert response.status_code == 400 and response.json()["message"].startswith(
        "image: could not be decoded"
    )


def test_routes_methods_and_health(server, session):
    missing = session.get(server.url + "/api/control/other", timeout=10)
    assert missing.status_code == 404 and missing.json()["name"] == "not_found"
    wrong_method = session.get(server.url + ENDPOINT_PATH, timeout=10)
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    for path in ("/", "/health"):
        health = session.get(server.url + path, timeout=10)
        assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert [r.status for r in server.requests] == [404, 405, 200, 200]


# --- auth ----------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, "", "sk-wrong", "Bearer " + KEY, KEY + " ", KEY[:-1]])
def test_wrong_or_missing_key_is_401(server, session, key):
    response = post(session, server, key=key)
    assert response.status_code == 401
    assert response.json() == {
        "code": -1,
        "message": "Invalid or missing API key.",
        "name": "unauthorized",
        "errors": ["authorization header is missing or invalid"],
    }


def test_right_key_is_200_and_no_key_needed_without_one(server, session):
    assert post(session, server, key=KEY).status_code == 200
    with StandInServer() as open_server:
        assert post(session, open_server, key=None).status_code == 200


def test_the_key_never_reaches_the_log(server, session, caplog):
    caplog.set_level("DEBUG", logger="structure_api.standin")
    post(session, server)
    post(session, server, key="sk-wrong-key-in-log?")
    assert caplog.records, "the stand-in logs requests at INFO/DEBUG"
    assert KEY not in caplog.text and "sk-wrong-key-in-log" not in caplog.text


# --- scripted faults -----------------------------------------------------------------------


def test_scripted_responses_come_in_order_then_normal_behaviour(server, session):
    server.script(
        Respond(503, headers={"Retry-After": "7", "X-Custom": "yes"}),
        Respond(200, body={"code": -1, "message": "busy"}),
        Respond(502),
        Respond(418, body="teapot", headers={"Content-Type": "text/x-tea"}),
        Respond(500, body=b"<html>oops</html>"),
    )
    first = post(session, server)
    assert (
        first.status_code == 503
        and first.headers["retry-after"] == "7"
        and first.headers["x-custom"] == "yes"
    )
    assert first.json()["name"] == "service_unavailable" and first.json()["code"] == -1
    second = post(session, server)
    assert second.status_code == 200 and second.json() == {"code": -1, "message": "busy"}
    third = post(session, server)
    assert third.status_code == 502 and third.headers["content-type"] == "text/html"
    assert "502 Bad Gateway" in third.text
    fourth = post(session, server)
    assert (fourth.status_code, fourth.text, fourth.headers["content-type"]) == (418, "teapot", "text/x-tea")
    assert post(session, server).content == b"<html>oops</html>"
    assert post(session, server).json()["code"] == 0
    assert [r.status for r in server.requests] == [503, 200, 502, 418, 500, 200]
    assert [r.fault for r in server.requests] == ["503", "200", "502", "418", "500", None]
    assert server.credits_spent == 6  # scripted answers are never charged


def test_hostile_scripted_bodies_are_sent_verbatim(server, session):
    nested = b"[" * 100_000  # would blow the recursion limit of anything that parsed it
    server.script(Respond(200, body=nested), Respond(200, body=b"\xff\xfe not text"))
    assert post(session, server).content == nested
    assert post(session, server).content == b"\xff\xfe not text"


def test_scripted_faults_apply_before_auth_and_skip_health_checks(server, session):
    server.script(Respond(402))
    assert session.get(server.url + "/health", timeout=10).status_code == 200
    assert post(session, server, key=None).status_code == 402
    assert server.pending_faults == 0


def test_default_bodies_are_json_except_gateway_pages(server, session):
    statuses = [200, 400, 401, 402, 403, 404, 413, 422, 429, 500, 503, 507]
    server.script(*(Respond(s) for s in statuses))
    for status in statuses:
        payload = post(session, server).json()
        assert payload["code"] == -1 and isinstance(payload["message"], str) and payload["errors"], status
    assert post(session, server).status_code == 200  # script exhausted
    server.script(Respond(504))
    assert "<html>" in post(session, server).text


def test_respond_with_delay(server, session):
    server.script(Respond(429, delay=0.3, headers={"Retry-After": "0"}))
    started = time.monotonic()
    response = post(session, server)
    assert response.status_code == 429 and time.monotonic() - started >= 0.3


def test_drop_closes_after_reading_the_request(server, session):
    server.script(Drop())
    with pytest.raises(requests.exceptions.ConnectionError):
        post(session, server, seed="3")
    recorded = server.requests[0]
    assert (recorded.status, recorded.fault) == (0, "drop")
    assert recorded.fields["seed"] == "3" and recorded.image_bytes == IMAGE
    assert post(session, server).status_code == 200  # the client's pool recovers with a new connection


def test_drop_before_read_closes_without_reading_the_body(server, session):
    server.script(DropBeforeRead())
    with pytest.raises(requests.exceptions.ConnectionError):
        # Large enough that the upload cannot fit in socket buffers before the close.
        post(session, server, image=b"\0" * (8 * MIB))
    recorded = server.requests[0]
    assert (recorded.status, recorded.body_size, recorded.fields, recorded.fault) == (
        0,
        0,
        {},
        "drop_before_read",
    )
    assert post(session, server).status_code == 200


def test_truncate_announces_the_full_length_and_sends_half(server, session):
    body = {"code": 0, "message": "success", "data": {"image": "A" * 10000, "seed": 1}}
    server.script(Truncate(body=body))
    response = session.post(
        server.url + ENDPOINT_PATH,
        files={"image": ("a.png", IMAGE)},
        data={"prompt": "x"},
        headers={"authorization": KEY},
        timeout=10,
        stream=True,
    )
    assert response.status_code == 200
    assert int(response.headers["content-length"]) > 10000
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        _ = response.content
    assert server.requests[0].status == 200


def test_hang_never_answers_and_stop_releases_it_fast():
    outcome: list[object] = []
    server = StandInServer().start()
    server.script(Hang(), Hang())

    def client() -> None:
        with requests.Session() as http:
            http.trust_env = False
            try:
                outcome.append(post(http, server, key=None, timeout=30))
            except requests.exceptions.RequestException as exc:
                outcome.append(exc)

    clients = [threading.Thread(target=client) for _ in range(2)]
    for thread in clients:
        thread.start()
    assert wait_for(lambda: len(server.requests) == 2)
    time.sleep(0.2)
    assert outcome == [] and [r.status for r in server.requests] == [0, 0]
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 1.0
    for thread in clients:
        thread.join(5)
    assert len(outcome) == 2 and all(isinstance(o, requests.exceptions.ConnectionError) for o in outcome)


def test_hang_meets_the_client_read_timeout(server, session):
    server.script(Hang())
    with pytest.raises(requests.exceptions.ReadTimeout):
        post(session, server, timeout=(5, 0.3))
    assert post(session, server).status_code == 200


@pytest.mark.parametrize("declared_length", [None, str(10**10)])
def test_stream_sends_a_huge_body_until_the_client_stops_reading(server, session, declared_length):
    produced: list[int] = []

    def endless():
        for index in range(2000):  # ~2 GB if nobody stopped reading
            produced.append(index)
            yield b"{" * MIB

    headers = {"Content-Length": declared_length} if declared_length else {}
    server.script(Stream(chunks=endless, headers=headers))
    response = session.post(
        server.url + ENDPOINT_PATH,
        files={"image": ("a.png", IMAGE)},
        data={"prompt": "x"},
        headers={"authorization": KEY},
        timeout=10,
        stream=True,
    )
    if declared_length:
        assert response.headers["content-length"] == declared_length
    else:
        assert response.headers["transfer-encoding"] == "chunked"
    received = 0
    for chunk in response.iter_content(256 * 1024):
        received += len(chunk)
        if received >= 4 * MIB:
            break
    response.close()
    assert received >= 4 * MIB
    # Once the client hangs up, the handler gets a broken pipe and stops producing.
    assert wait_for(lambda: not conn_threads(server), timeout=5)
    assert len(produced) < 200


def test_stream_with_a_finite_body_ends_cleanly(server, session):
    server.script(Stream(chunks=lambda: [b'{"code": 0,', b' "message": "x"}']))
    response = post(session, server)
    assert response.json() == {"code": 0, "message": "x"}


def test_passthrough_answers_normally_after_the_delay(server, session):
    server.script(Passthrough(delay=0.4, headers={"X-Slow": "1"}))
    started = time.monotonic()
    response = post(session, server, seed="8")
    elapsed = time.monotonic() - started
    assert response.status_code == 200 and response.json()["data"]["seed"] == 8
    assert response.headers["x-slow"] == "1"
    assert elapsed >= 0.4
    assert server.requests[0].fault == "passthrough" and server.requests[0].status == 200
    assert server.credits_spent == 6


def test_faults_reject_what_they_cannot_play(server):
    with pytest.raises(ValueError):
        Respond(42)
    with pytest.raises(ValueError):
        Drop(delay=-1)
    with pytest.raises(TypeError):
        server.script("explode")
    with pytest.raises(TypeError, match="Respond"):
        Fault(status=503)


# --- recording ------------------------------------------------------------------------------


def test_requests_are_recorded_with_fields_image_headers_and_status(server, session):
    before = time.monotonic()
    post(
        session,
        server,
        filename="photo.png",
        content_type="image/png",
        prompt="héllo ☃",
        seed="42",
        negative_prompt="rain",
    )
    post(session, server, seed="bad")
    first, second = server.requests
    assert first.method == "POST" and first.path == ENDPOINT_PATH
    assert first.headers["authorization"] == KEY  # names lower-cased
    assert first.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert first.fields == {"prompt": "héllo ☃", "seed": "42", "negative_prompt": "rain"}
    assert (first.image_bytes, first.image_filename, first.image_content_type) == (
        IMAGE,
        "photo.png",
        "image/png",
    )
    assert first.body_size == int(first.headers["content-length"])
    assert before <= first.received_at <= second.received_at <= time.monotonic()
    assert (first.status, first.fault, second.status) == (200, None, 400)
    assert server.credits_spent == 6
    server.script(Respond(500))
    server.clear()
    assert server.requests == [] and server.pending_faults == 0
    assert post(session, server).status_code == 200


def test_max_records_keeps_only_the_newest(session):
    with StandInServer(max_records=2) as server:
        for seed in ("1", "2", "3"):
            post(session, server, key=None, seed=seed)
        assert [r.fields["seed"] for r in server.requests] == ["2", "3"]
        server.clear()
        for seed in ("4", "5", "6"):
            post(session, server, key=None, seed=seed)
        assert [r.fields["seed"] for r in server.requests] == ["5", "6"]
    with StandInServer(max_records=0) as server:
        assert post(session, server, key=None).status_code == 200
        assert server.requests == [] and server.credits_spent == 6


# --- load behaviour -------------------------------------------------------------------------


def test_concurrent_requests_are_served_in_parallel():
    results: list[int] = []

    def one_request() -> None:
        with requests.Session() as http:
            http.trust_env = False
            results.append(post(http, server, key=None).status_code)

    with StandInServer(latency=0.5) as server:
        threads = [threading.Thread(target=one_request) for _ in range(8)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        elapsed = time.monotonic() - started
    assert results == [200] * 8
    assert elapsed < 1.5, elapsed  # 8 x 0.5 s serially would be 4 s


def test_fault_rate_gives_the_expected_share_of_seeded_faults(session):
    small = blank_png(64, 64)

    def run(seed: int) -> tuple[list[str | None], list[requests.Response]]:
        with StandInServer(fault_rate=0.3, fault_seed=seed) as server:
            responses = [post(session, server, image=small, seed="1") for _ in range(200)]
            return [r.fault for r in server.requests], responses

    faults, responses = run(11)
    share = sum(f is not None for f in faults) / len(faults)
    # 200 draws at p=0.3: the standard deviation is ~0.032, so +-0.1 is three of them.
    assert 0.2 <= share <= 0.4, share
    assert set(faults) - {None} <= set(FAULT_KINDS) and len(set(faults) - {None}) >= 4
    for fault, response in zip(faults, responses, strict=True):
        if fault is None:
            assert response.status_code == 200 and response.json()["code"] == 0
        elif fault == "code-1":
            assert response.status_code == 200 and response.json()["code"] == -1
        else:
            assert response.status_code == int(fault)
            if fault == "429":
                assert response.headers["retry-after"] == "0"
    assert run(11)[0] == faults  # same seed, same sequence


# --- lifecycle --------------------------------------------------------------------------------


def test_stop_leaves_no_threads_behind():
    before = set(threading.enumerate())
    server = StandInServer().start()
    idle = requests.Session()
    idle.trust_env = False
    # A keep-alive connection left open, a hung request and a slow one are all in flight at stop().
    assert post(idle, server, key=None).status_code == 200
    server.script(Hang(), Respond(200, delay=30))
    stuck = [
        threading.Thread(
            target=lambda: pytest.raises(
                requests.exceptions.RequestException, post, requests.Session(), server, key=None
            )
        )
        for _ in range(2)
    ]
    for thread in stuck:
        thread.start()
    assert wait_for(lambda: len(server.requests) == 3)
    assert len(conn_threads(server)) == 3
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 1.0
    server.stop()  # idempotent
    for thread in stuck:
        thread.join(5)
    idle.close()
    leftover = [t for t in set(threading.enumerate()) - before if t.is_alive()]
    assert leftover == []
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(server.url + "/health", timeout=2, proxies={"http": None})
    with pytest.raises(RuntimeError):
        server.start()


def test_stop_without_start_releases_the_port():
    server = StandInServer()
    assert server.url == f"http://127.0.0.1:{server.port}" and server.port > 0
    server.stop()


def test_refuses_to_listen_on_all_interfaces():
    for host in ("0.0.0.0", "::", ""):
        with pytest.raises(ValueError):
            StandInServer(host=host)


def test_serve_calls_ready_and_stops_on_keyboard_interrupt(session):
    seen: list[object] = []

    def ready(url: str) -> None:
        def probe() -> None:
            seen.append(session.get(url + "/health", timeout=5).status_code)
            _thread.interrupt_main()  # what Ctrl-C does

        threading.Thread(target=probe).start()

    before = set(threading.enumerate())
    started = time.monotonic()
    # interrupt_main() does nothing while SIGINT is ignored, as it is for a background job
    # (`pytest &`): give this test Python's own Ctrl-C handler, whatever it inherited.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        serve(port=0, ready=ready)
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert seen == [200]
    assert time.monotonic() - started < 5
    assert wait_for(lambda: not [t for t in set(threading.enumerate()) - before if t.is_alive()], timeout=2)
