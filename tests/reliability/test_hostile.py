"""Hostile answers: decompression bombs, bodies of hundreds of MiB, huge or deeply nested JSON.

Each must be refused with a clear MalformedResponseError (or a timeout) while memory stays
bounded. The bounds asserted here, per call:

- an answer the client refuses by size or shape never costs more than the response cap
  (64 MiB, ``MAX_RESPONSE_BYTES``) plus 16 MiB of Python allocations (tracemalloc), and the
  process's peak resident size grows by less than the cap plus 64 MiB;
- a well-formed answer under the cap whose image turns out not to be one: three times the cap
  plus 16 MiB (the body, json's decoded text of it and the image string live together);
- a decompression bomb is refused from its header: under 16 MiB traced and 64 MiB resident,
  although decoding it would take from 192 MiB to 28 GiB.
"""

from __future__ import annotations

import base64
import json
import struct
import time
import zlib

import pytest

from structure_api import StructureRequest
from structure_api.client import MAX_RESPONSE_BYTES
from structure_api.errors import MalformedResponseError, ResultMayBeBilledError, StructureError
from structure_api.paid import fetch_or_pay
from structure_api.standin import Raw, Respond, Stream
from structure_api.store import ResultStore

from .probes import MemoryProbe, MiB, b64, image_file_bytes, message_problems, photo_like

CAP = MAX_RESPONSE_BYTES
REFUSED_TRACED_BOUND = CAP + 16 * MiB
REFUSED_RSS_BOUND = CAP + 64 * MiB
# A well-formed answer under the cap is parsed: the body, json's decoded copy of it and the
# image string are alive together for a moment.
WELL_FORMED_BOUND = 3 * CAP + 16 * MiB
BOMB_TRACED_BOUND = 16 * MiB
BOMB_RSS_BOUND = 64 * MiB


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_bomb(width: int, height: int, *, real: bool) -> bytes:
    """A PNG of ``width`` x ``height`` black RGB pixels: really compressed (``real``) or a forged header."""
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    if real:
        compressor = zlib.compressobj(9)
        row = b"\0" * (1 + 3 * width)
        rows_per_block = max(1, (4 * MiB) // len(row))
        block = row * rows_per_block
        parts = []
        for start in range(0, height, rows_per_block):
            count = min(rows_per_block, height - start)
            parts.append(compressor.compress(block if count == rows_per_block else row * count))
        parts.append(compressor.flush())
        idat = b"".join(parts)
    else:
        idat = zlib.compress(b"\0" * (1 + 3 * width) * 4)  # a few rows; the rest never exists
    return b"\x89PNG\r\n\x1a\n" + header + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def jpeg_with_size(width: int, height: int) -> bytes:
    """A valid small JPEG whose frame header (SOF0) is rewritten to claim ``width`` x ``height``."""
    data = bytearray(image_file_bytes(photo_like(64, 64), "JPEG", quality=80))
    at = data.index(b"\xff\xc0")
    data[at + 5 : at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def success_body(image: bytes) -> dict:
    return {"code": 0, "message": "success", "data": {"image": b64(image), "seed": 7}}


def generate(client, upload) -> tuple[StructureError, float]:
    started = time.monotonic()
    with pytest.raises(StructureError) as caught:
        client.generate(StructureRequest(image=upload, prompt="a quiet harbour", seed=7))
    return caught.value, time.monotonic() - started


def mib(value: int) -> str:
    return f"{value / MiB:.1f} MiB"


@pytest.fixture(scope="module")
def real_bomb() -> bytes:
    # 8000 x 8000 RGB: 183 MiB of pixels in ~190 KB; over the client's 37.7 MP guard, under Pillow's own.
    return png_bomb(8000, 8000, real=True)


BOMBS = {
    "PNG bomb, 8000x8000 really compressed (183 MiB decoded from 0.2 MB)": ("real", "8000 x 8000"),
    "PNG header forged to 100000x100000 (28 GiB decoded)": ("forged-png", "100000 x 100000"),
    "JPEG frame header forged to 9000x9000 (81 MP: over the client's guard, under Pillow's)": (
        "forged-jpeg",
        "9000 x 9000",
    ),
    "JPEG frame header forged to 65000x65000 (Pillow's own guard fires first)": (
        "forged-jpeg-huge",
        "larger than any it can produce",
    ),
}


@pytest.mark.parametrize("scenario", list(BOMBS))
def test_decompression_bomb_is_refused_from_its_header(
    scenario, service, new_client, small_upload, ledger, real_bomb
):
    kind, words = BOMBS[scenario]
    image = {
        "real": real_bomb,
        "forged-png": png_bomb(100000, 100000, real=False),
        "forged-jpeg": jpeg_with_size(9000, 9000),
        "forged-jpeg-huge": jpeg_with_size(65000, 65000),
    }[kind]
    service.script(Respond(200, body=success_body(image)))
    client = new_client()
    with MemoryProbe() as memory:
        error, seconds = generate(client, small_upload)
    observed = (
        f"{type(error).__name__}: {error} (traced {mib(memory.traced_peak)}, RSS +{mib(memory.rss_growth)})"
    )
    named = "naming the size" if " x " in words else "(Pillow's guard does not report the size)"
    ledger.row(
        "hostile",
        scenario,
        f"MalformedResponseError {named}; traced < {mib(BOMB_TRACED_BOUND)}, RSS < +{mib(BOMB_RSS_BOUND)}",
        observed,
        requests=len(service.requests),
        seconds=seconds,
    )
    ledger.count("faults_survived")
    assert isinstance(error, MalformedResponseError) and words in str(error), observed
    assert "larger than any it can produce" in str(error)
    assert message_problems(str(error)) == []
    assert memory.traced_peak < BOMB_TRACED_BOUND, observed
    assert memory.rss_growth < BOMB_RSS_BOUND, observed
    assert len(service.requests) == 1 and seconds < 5


def _repeat(piece: bytes, total: int):
    """A body_chunks factory: ``piece`` repeated in 1 MiB chunks up to ``total`` bytes."""
    chunk = piece * max(1, MiB // len(piece))

    def chunks():
        sent = 0
        while sent < total:
            yield chunk
            sent += len(chunk)

    return chunks


def _json_chunks(head: bytes, piece: bytes, total: int, tail: bytes):
    body = _repeat(piece, total)

    def chunks():
        yield head
        yield from body()
        yield tail

    return chunks


def _distinct_keys(count: int):
    per_chunk = 50_000
    # One template of 50000 keys, made distinct per chunk by bytes.replace (C speed, not a Python loop).
    template = b"".join(b'"k@@@@%05d":1,' % i for i in range(per_chunk))

    def chunks():
        yield b'{"code":0,'
        for chunk in range(-(-count // per_chunk)):
            yield template.replace(b"@@@@", b"%04d" % chunk)
        yield b'"z":0}'

    return chunks


HUGE = {
    # scenario: (the fault, words in the message, traced bound, RSS bound)
    "body of 500 MiB, chunked, no Content-Length": (
        Stream(status=200, chunks=_repeat(b"x", 500 * MiB)),
        "passed 64 MiB",
        REFUSED_TRACED_BOUND,
        REFUSED_RSS_BOUND,
    ),
    "body of 500 MiB announced by Content-Length": (
        Stream(status=200, headers={"Content-Length": str(500 * MiB)}, chunks=_repeat(b"x", 500 * MiB)),
        "500 MiB",
        1 * MiB,
        16 * MiB,
    ),
    "error page of 500 MiB on HTTP 502": (
        Stream(
            status=502,
            headers={"Content-Type": "text/html"},
            chunks=_repeat(b"<p>bad gateway</p>", 500 * MiB),
        ),
        "passed 64 MiB",
        REFUSED_TRACED_BOUND,
        REFUSED_RSS_BOUND,
    ),
    "JSON array of 20 million empty objects (60 MiB)": (
        Stream(status=200, chunks=_json_chunks(b"[", b"{},", 60 * MiB, b"{}]")),
        "JSON",
        REFUSED_TRACED_BOUND,
        REFUSED_RSS_BOUND,
    ),
    "JSON object with 2 million distinct keys (32 MiB)": (
        Stream(status=200, chunks=_distinct_keys(2_000_000)),
        "JSON",
        REFUSED_TRACED_BOUND,
        REFUSED_RSS_BOUND,
    ),
    "60 MiB of text that is not JSON (under the 64 MiB cap)": (
        Stream(status=200, chunks=_repeat(b"lorem ipsum ", 60 * MiB)),
        "not JSON",
        REFUSED_TRACED_BOUND,
        REFUSED_RSS_BOUND,
    ),
    "JSON nested 10 million levels deep (10 MiB of '[')": (
        Stream(status=200, chunks=_repeat(b"[", 10 * MiB)),
        "JSON",
        REFUSED_TRACED_BOUND,
        REFUSED_RSS_BOUND,
    ),
    "JSON nested 5000 levels deep (10 KB)": (
        Respond(200, body=b"[" * 5000 + b"]" * 5000),
        "JSON",
        16 * MiB,
        64 * MiB,
    ),
    "well-formed answer whose image is 60 MiB of base64 that is no image": (
        Stream(
            status=200,
            chunks=_json_chunks(
                b'{"code":0,"message":"success","data":{"seed":7,"image":"', b"AAAA", 60 * MiB, b'"}}'
            ),
        ),
        "not an image",
        WELL_FORMED_BOUND,
        WELL_FORMED_BOUND,
    ),
}


@pytest.mark.parametrize("scenario", list(HUGE))
def test_huge_or_deep_answers_are_refused_with_memory_bounded(
    scenario, service, new_client, small_upload, ledger
):
    fault, words, traced_bound, rss_bound = HUGE[scenario]
    service.script(fault)
    client = new_client()
    with MemoryProbe() as memory:
        error, seconds = generate(client, small_upload)
    observed = (
        f"{type(error).__name__}: {error} (traced {mib(memory.traced_peak)}, RSS +{mib(memory.rss_growth)})"
    )
    ledger.row(
        "hostile",
        scenario,
        f"MalformedResponseError; traced < {mib(traced_bound)}, RSS < +{mib(rss_bound)}",
        observed,
        requests=len(service.requests),
        seconds=seconds,
    )
    ledger.count("faults_survived")
    assert isinstance(error, MalformedResponseError), observed
    assert words in str(error), observed
    assert message_problems(str(error)) == [], observed
    if 200 <= getattr(fault, "status", 200) < 300:
        assert "may have charged" in str(error), observed  # a 2xx may have been billed, whatever its body
    assert memory.traced_peak < traced_bound, observed
    assert memory.rss_growth < rss_bound, observed
    assert len(service.requests) == 1, "a hostile answer must not be fetched again"
    assert seconds < 20


def test_answer_dripping_forever_is_cut_off(service, new_client, small_upload, ledger):
    """A server that keeps the answer alive with a byte every 20 ms is cut off by the minimum body rate.

    Each chunk arrives well within the socket's read timeout, so only the client's own rate check
    (at least min_body_rate over each read-timeout window) can end it. Its clock is injected: every
    reading advances it by 0.25 s, so the first window closes after a few chunks instead of a real second.
    """

    def drip():
        for _ in range(1000):  # 20 s at most; the client must stop long before
            time.sleep(0.02)  # the server side of the scenario: a slow, never-ending answer
            yield b" "

    ticks = iter(range(10**6))
    service.script(Stream(status=200, chunks=drip))
    client = new_client(read_timeout=0.5, clock=lambda: next(ticks) * 0.25)
    with MemoryProbe() as memory:
        error, seconds = generate(client, small_upload)
    observed = f"{type(error).__name__}: {error} (after {seconds:.2f} s of real time)"
    ledger.row(
        "hostile",
        "answer that drips one byte every 20 ms, forever (read timeout 0.5 s, clock injected)",
        "ResultMayBeBilledError once a read-timeout window brings less than the minimum rate (16 KiB/s); "
        "never re-sent (a 200 may have been charged)",
        observed,
        requests=len(service.requests),
        seconds=seconds,
    )
    ledger.count("faults_survived")
    assert isinstance(error, ResultMayBeBilledError) and "below the 16 KiB/s" in str(error), observed
    assert "may have charged" in str(error)
    assert message_problems(str(error)) == []
    assert seconds < 2, observed
    assert len(service.requests) == 1
    assert memory.traced_peak < 16 * MiB


# --- odd answers that carry a paid image: read tolerantly, kept before anything else ------------------------


def _answer_json(image_text: str, seed: object = 7, code: object = 0) -> bytes:
    data = {"image": image_text, "seed": seed}
    return json.dumps({"code": code, "message": "success", "data": data}).encode()


def _raw_http(*status_lines: bytes, body: bytes) -> bytes:
    """Informational answers (status line and headers each) and then a 200 carrying ``body`` as JSON."""
    final = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n" % len(body)
    )
    return b"".join(status_lines) + final + body


def _url_safe(image: bytes) -> str:
    return base64.urlsafe_b64encode(image).decode("ascii").rstrip("=")


ODD = {
    # scenario: (the answer, given the image's bytes; the request's seed; the seed the result must report)
    'seed given as "²" (a digit to str.isdigit, not to int)': (
        lambda image: Respond(200, body=_answer_json(b64(image), seed="²")),
        7,
        7,
    ),
    "seed given as a 5000-digit string": (
        lambda image: Respond(200, body=_answer_json(b64(image), seed="9" * 5000)),
        7,
        7,
    ),
    "seed given as a 5000-digit string, for a seed-0 request (seed unknown: 0)": (
        lambda image: Respond(200, body=_answer_json(b64(image), seed="9" * 5000)),
        0,
        0,
    ),
    '"code": "0" as a string': (
        lambda image: Respond(200, body=_answer_json(b64(image), seed=11, code="0")),
        7,
        11,
    ),
    "URL-safe base64, unpadded": (
        lambda image: Respond(200, body=_answer_json(_url_safe(image), seed=12)),
        7,
        12,
    ),
    "raw PNG body with Content-Type image/png (no JSON: the seed asked for stands)": (
        lambda image: Respond(200, body=image, headers={"Content-Type": "image/png"}),
        7,
        7,
    ),
    "raw PNG body with Content-Type image/png, for a seed-0 request": (
        lambda image: Respond(200, body=image, headers={"Content-Type": "image/png"}),
        0,
        0,
    ),
    "raw PNG body with Content-Type application/octet-stream": (lambda image: Respond(200, body=image), 7, 7),
    "103 Early Hints before the 200": (
        lambda image: Raw(
            _raw_http(
                b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
                body=_answer_json(b64(image), seed=13),
            )
        ),
        7,
        13,
    ),
    "two 102 Processing before the 200": (
        lambda image: Raw(
            _raw_http(
                b"HTTP/1.1 102 Processing\r\n\r\n",
                b"HTTP/1.1 102 Processing\r\n\r\n",
                body=_answer_json(b64(image), seed=14),
            )
        ),
        7,
        14,
    ),
    "203 Non-Authoritative Information (a proxy's copy of the 200)": (
        lambda image: Respond(203, body=_answer_json(b64(image), seed=15)),
        7,
        15,
    ),
    "UTF-8 BOM before the JSON": (
        lambda image: Respond(200, body=b"\xef\xbb\xbf" + _answer_json(b64(image), seed=16)),
        7,
        16,
    ),
}


@pytest.mark.parametrize("scenario", list(ODD))
def test_odd_answer_with_an_image_is_kept_and_used(
    scenario, service, new_client, small_upload, ledger, tmp_path
):
    make, seed, expected_seed = ODD[scenario]
    image = image_file_bytes(photo_like(96, 64, seed=5))
    assert "+" in b64(image) or "/" in b64(image)  # so that the URL-safe alphabet differs
    service.script(make(image))
    store = ResultStore(tmp_path / "store")
    request = StructureRequest(image=small_upload, prompt="a quiet harbour", seed=seed)
    started = time.monotonic()
    try:
        outcome = fetch_or_pay(new_client(), request, store)
    except StructureError as error:  # recorded, then failed on below
        outcome = error
    seconds = time.monotonic() - started
    kept = store.undelivered()
    observed = (
        f"{type(outcome).__name__}: {outcome}"
        if isinstance(outcome, StructureError)
        else f"image used ({outcome.result.pixels.shape[1]}x{outcome.result.pixels.shape[0]}), seed "
        f"{outcome.result.seed}, {len(kept)} kept undelivered until delivered"
    )
    ledger.row(
        "odd",
        scenario,
        f"the image is kept in the store, then used; seed {expected_seed}"
        f"{' (unknown)' if expected_seed == 0 else ''}; nothing re-sent",
        observed,
        requests=len(service.requests),
        seconds=seconds,
    )
    ledger.count("faults_survived")
    assert not isinstance(outcome, StructureError), observed
    assert outcome.result.pixels.shape == (64, 96, 3) and outcome.result.seed == expected_seed
    assert [entry.data for entry in kept] == [image] and kept[0].seed == expected_seed
    outcome.deliver()
    assert store.undelivered() == [] and len(service.requests) == 1


def test_image_far_from_the_request_size_is_kept_for_export_not_used(
    service, new_client, small_upload, ledger, tmp_path
):
    image = image_file_bytes(photo_like(600, 400, seed=5))
    service.script(Respond(200, body=_answer_json(b64(image), seed=17)))
    store = ResultStore(tmp_path / "store")
    request = StructureRequest(image=small_upload, prompt="a quiet harbour", seed=17)
    with pytest.raises(MalformedResponseError) as caught:
        fetch_or_pay(new_client(), request, store)
    message = str(caught.value)
    kept = store.undelivered()
    ledger.row(
        "odd",
        "a decodable 600x400 image answering a 96x64 request",
        "not used; kept in the store (exportable), never served for the request; the error says it "
        "may have been charged and where it is kept",
        f"{type(caught.value).__name__}: {message}",
        requests=len(service.requests),
    )
    ledger.count("faults_survived")
    assert "may have charged" in message and "results --export" in message and message_problems(message) == []
    assert [entry.data for entry in kept] == [image]
    # A re-run does not take it for the request (it pays again, as the error implies: nothing was used).
    assert store.claim(store.key_for(request, new_client().endpoint), 17) is None
