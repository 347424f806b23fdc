"""Compressed answers: the client undoes at most one content coding, and never past the response cap.

urllib3 undoes any chain of codings without bounding what a coded byte becomes, so the transport
reads the body as sent and decodes it itself. Each hostile case is played by the real stand-in
(a raw answer with the Content-Encoding header set), with memory measured around the call.
"""

from __future__ import annotations

import gzip
import zlib

import pytest

from structure_api import StructureRequest
from structure_api.client import MAX_RESPONSE_BYTES
from structure_api.errors import ResultMayBeBilledError, ServiceError, StructureError
from structure_api.standin import Respond

from .probes import MemoryProbe, MiB, b64, image_file_bytes, message_problems, photo_like

# Refused while reading: never more than a cap's worth decoded, plus Python's own allocations.
TRACED_BOUND = MAX_RESPONSE_BYTES + 16 * MiB
RSS_BOUND = MAX_RESPONSE_BYTES + 64 * MiB


def _gzip_of_zeros(size: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(64 * MiB)
    parts = [packer.compress(block) for _ in range(size // len(block))]
    return b"".join(parts) + packer.flush()


@pytest.fixture(scope="module")
def gigabyte_gzip() -> bytes:
    """1 GiB of zeros, gzip'd once (about 1 MB)."""
    return _gzip_of_zeros(1024 * MiB)


def _answer(seed: int = 7) -> bytes:
    image = image_file_bytes(photo_like(96, 64), "PNG")
    head = b'{"code":0,"message":"success","data":{"seed":%d,"image":"' % seed
    return head + b64(image).encode() + b'"}}'


def _generate(client, upload):
    return client.generate(StructureRequest(image=upload, prompt="a quiet harbour", seed=7))


def hostile_bodies(gigabyte: bytes) -> dict[str, tuple[str, bytes, str]]:
    triple = gzip.compress(gzip.compress(gigabyte, 9), 9)
    return {
        f"{len(triple)}-byte answer coded 'gzip, gzip, gzip' (1 GiB once decoded)": (
            "gzip, gzip, gzip",
            triple,
            "compressed 3 times over",
        ),
        f"{len(gigabyte) // 1000} KB gzip answer that decodes to 1 GiB": (
            "gzip",
            gigabyte,
            "grows past 64 MiB when decompressed",
        ),
        "answer coded 'br' (never asked for)": ("br", b"\x1b\x00\x00", "cannot undo"),
        "answer coded 'gzip' that is not gzip data": ("gzip", b"plain text, not gzip", "not valid gzip data"),
        "gzip answer cut off in its middle": (
            "gzip",
            gzip.compress(_answer())[:60],
            "ends before its gzip data",
        ),
    }


CASES = ["triple", "bomb", "br", "garbage", "cut"]


@pytest.mark.parametrize("case", CASES)
def test_hostile_content_coding_is_refused_with_memory_bounded(
    case, service, new_client, small_upload, ledger, gigabyte_gzip
):
    scenario, (coding, body, words) = list(hostile_bodies(gigabyte_gzip).items())[CASES.index(case)]
    service.script(
        Respond(200, body=body, headers={"Content-Encoding": coding, "Content-Type": "application/json"})
    )
    client = new_client()
    with MemoryProbe() as memory:
        with pytest.raises(StructureError) as caught:
            _generate(client, small_upload)
    error = caught.value
    observed = (
        f"{type(error).__name__}: {error} (traced {memory.traced_peak / MiB:.1f} MiB, "
        f"RSS +{memory.rss_growth / MiB:.1f} MiB)"
    )
    ledger.row(
        "hostile",
        scenario,
        f"ResultMayBeBilledError naming the coding; traced < "
        f"{TRACED_BOUND / MiB:.0f} MiB, RSS < +{RSS_BOUND / MiB:.0f} MiB; not sent again",
        observed,
        requests=len(service.requests),
    )
    ledger.count("faults_survived")
    assert isinstance(error, ResultMayBeBilledError), observed
    assert words in str(error) and "may have charged" in str(error), observed
    assert message_problems(str(error)) == [], observed
    assert memory.traced_peak < TRACED_BOUND, observed
    assert memory.rss_growth < RSS_BOUND, observed
    assert len(service.requests) == 1, "an answer that may have been charged must not be asked for again"


@pytest.mark.parametrize(
    "coding, pack",
    [
        ("gzip", lambda data: gzip.compress(data)),
        ("deflate", zlib.compress),
        ("deflate", lambda data: zlib.compress(data)[2:-4]),  # raw deflate, as some servers send it
        ("identity", lambda data: data),
    ],
    ids=["gzip", "deflate-zlib", "deflate-raw", "identity"],
)
def test_one_content_coding_is_undone(coding, pack, service, new_client, small_upload):
    service.script(
        Respond(
            200,
            body=pack(_answer(seed=41)),
            headers={"Content-Encoding": coding, "Content-Type": "application/json"},
        )
    )
    # Not a row of the report: its hostile section counts refusals, and this answer is a good one.
    result = _generate(new_client(), small_upload)
    assert result.seed == 41 and result.pixels.shape[:2] == (64, 96)
    # Only the codings the client undoes are asked for.
    assert service.requests[0].headers.get("accept-encoding") == "gzip, deflate"


def test_error_status_with_a_coding_chain_is_still_the_error(service, new_client, small_upload):
    """A 503 whose body is coded twice: the status decides (retried, then success); nothing is decoded."""
    service.script(
        Respond(503, body=gzip.compress(gzip.compress(b"busy")), headers={"Content-Encoding": "gzip, gzip"}),
        Respond(503),
        Respond(503),
        Respond(503),
        Respond(503),
    )
    with pytest.raises(ServiceError) as caught:
        _generate(new_client(), small_upload)
    assert len(service.requests) == 5
    assert "nothing was charged" in str(caught.value)
