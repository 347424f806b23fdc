"""The behaviour that makes the batch path fast and lean (the figures themselves are in benchmarks/).

No timings are asserted here: only what holds on any machine. Memory bounds use tracemalloc,
which is exact and deterministic for what it sees (Python objects and numpy buffers). Torch-free, so the
Windows lane runs it; tests/test_performance_behaviour_torch.py holds the tensor cases.
"""

from __future__ import annotations

import base64
import io
import json
import re
import struct
import threading
import time
import tracemalloc
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from structure_api.client import StructureClient, StructureRequest
from structure_api.images import decode_image, encode_upload, to_uint8_rgb
from structure_api.pipeline import StructureParams, generate_images
from structure_api.standin import Respond
from support import TEST_KEY, photo_like


def colour_of(seed: int) -> tuple[int, int, int]:
    """The flat colour the answering server paints for ``seed``: tells which request an answer belongs to."""
    return (seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256


class AnsweringServer:
    """A real HTTP server on loopback that answers every request with a flat PNG in the seed's colour.

    It counts the requests it is handling at once (from the first byte read to the answer sent)
    and waits ``delay(seed)`` before answering, so answers can be made to arrive out of order.
    """

    def __init__(self, delay: Callable[[int], float]) -> None:
        self.in_flight = 0
        self.most_in_flight = 0
        self.requests = 0
        lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                with lock:
                    owner.in_flight += 1
                    owner.requests += 1
                    owner.most_in_flight = max(owner.most_in_flight, owner.in_flight)
                try:
                    body = self.rfile.read(int(self.headers["content-length"]))
                    seed = int(re.search(rb'name="seed"\r\n\r\n(\d+)', body).group(1))
                    png_start = body.index(b"\x89PNG")
                    width, height = struct.unpack(">II", body[png_start + 16 : png_start + 24])
                    time.sleep(delay(seed))
                    buffer = io.BytesIO()
                    Image.new("RGB", (width, height), colour_of(seed)).save(buffer, format="PNG")
                    answer = json.dumps(
                        {
                            "code": 0,
                            "message": "success",
                            "data": {"image": base64.b64encode(buffer.getvalue()).decode(), "seed": seed},
                        }
                    ).encode()
                finally:
                    with lock:
                        owner.in_flight -= 1
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> AnsweringServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def params(seed: int = 1) -> StructureParams:
    return StructureParams(prompt="a test picture", seed=seed)


@pytest.mark.parametrize("concurrency", [1, 3])
def test_numpy_batch_in_flight_never_exceeds_max_concurrency_and_reaches_it(concurrency):
    images = np.broadcast_to(photo_like(64, 64).astype(np.float32) / 255, (10, 64, 64, 3))
    with (
        AnsweringServer(delay=lambda seed: 0.05) as server,
        StructureClient(api_key=TEST_KEY, base_url=server.url) as client,
    ):
        generate_images(images, params(), client=client, max_concurrency=concurrency)
    assert server.requests == 10
    assert server.most_in_flight == concurrency


def test_numpy_answers_arriving_out_of_order_land_in_their_own_slot():
    count = 6
    with (
        AnsweringServer(delay=lambda seed: 0.04 * (count - seed)) as server,
        StructureClient(api_key=TEST_KEY, base_url=server.url) as client,
    ):
        result = generate_images(
            np.zeros((count, 40, 48, 3), np.float32), params(seed=1), client=client, max_concurrency=count
        )
    output = result.images
    assert isinstance(output, np.ndarray) and output.dtype == np.float32 and output.flags.c_contiguous
    assert output.shape == (count, 40, 48, 3)
    for index in range(count):
        expected = np.array(colour_of(index + 1), dtype=np.float32) / np.float32(255)
        assert np.array_equal(output[index], np.broadcast_to(expected, (40, 48, 3))), index


def _traced_peak(call: Callable[[], object]) -> tuple[int, object]:
    """Peak of tracemalloc's traced memory during ``call`` beyond what was traced before it."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = call()
        return tracemalloc.get_traced_memory()[1] - before, result
    finally:
        tracemalloc.stop()


def test_batch_path_makes_no_copy_of_the_whole_batch():
    """96 images, 2 at a time: beyond the output, memory is bounded by what 2 images in flight hold.

    A copy of the whole batch anywhere (a stacked uint8 batch: 10.6 MB, a float one: 42 MB, or
    the results gathered and stacked at the end) would break the bound; what 2 images in flight
    and the HTTP plumbing hold (read buffers of 256 KiB and the like) stays near 3 MB.
    """
    count, side = 96, 192
    images = np.full((count, side, side, 3), 0.5, dtype=np.float32)  # numpy in: numpy out, traced
    batch_uint8_bytes = count * side * side * 3
    output_bytes = 4 * batch_uint8_bytes
    with (
        AnsweringServer(delay=lambda seed: 0.0) as server,
        StructureClient(api_key=TEST_KEY, base_url=server.url) as client,
    ):
        generate_images(images[:1], params(), client=client, max_concurrency=2)  # warm-up
        peak, result = _traced_peak(
            lambda: generate_images(images, params(), client=client, max_concurrency=2)
        )
    assert isinstance(result.images, np.ndarray) and result.images.shape == images.shape
    assert peak - output_bytes < batch_uint8_bytes / 2, peak - output_bytes


def test_float_to_uint8_needs_no_full_size_float_scratch():
    image = np.random.default_rng(0).random((1024, 1024, 3), dtype=np.float32)  # 12.6 MB
    peak, pixels = _traced_peak(lambda: to_uint8_rgb(image))
    # The uint8 result (3.1 MB) plus a block-sized scratch; a float32 copy would be 12.6 MB more.
    assert peak < pixels.nbytes + 512 * 1024, peak


def test_decoding_copies_the_pixels_out_of_pillow_once():
    png = encode_upload(photo_like(512, 512)).data
    peak, pixels = _traced_peak(lambda: decode_image(png))
    assert pixels.flags.writeable and pixels.flags.c_contiguous
    # The result (786 KB), one transfer block and Pillow's reads of the PNG; tobytes + np.array
    # would hold three copies of the pixels.
    assert peak < 2 * pixels.nbytes, peak


def test_answer_with_base64_broken_into_lines_still_decodes(standin, make_client):
    """The base64 is decoded where it lies; the copy without line breaks is only the fallback."""
    pixels = photo_like(64, 64)
    text = base64.encodebytes(encode_upload(pixels).data).decode()  # a line break every 76 characters
    assert "\n" in text
    standin.script(Respond(200, body={"code": 0, "message": "success", "data": {"image": text, "seed": 5}}))
    request = StructureRequest(image=encode_upload(pixels), prompt="p")
    result = make_client().generate(request)
    assert np.array_equal(result.pixels, pixels) and result.seed == 5
