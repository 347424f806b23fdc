"""Per-image client overhead, three paths side by side on the same inputs.

Upload: IMAGE tensor (one ``[H, W, 3]`` float32 image of a batch) to the image bytes of the request.
Download: the service's answer (HTTP body with JSON whose ``data.image`` is a base64 PNG) to the
image in the output IMAGE tensor. The multipart framing is left out of every path (the pack's
costs nothing: it points at the encoded bytes).

- pack:  what the node's batch path runs (``to_uint8_rgb``, ``fit_to_limits``, ``encode_upload``;
  then ``StructureClient``'s answer parsing, ``restore_from_fit``, ``uint8_to_float`` into the output slice).
- naive: what existing packs do (torch to PIL, PNG at Pillow's defaults; ``response.json()``,
  ``base64.b64decode``, decode through RGBA, ``/ 255`` in numpy, alpha dropped, ``torch.from_numpy``).
- floor: float to uint8 plus the cheapest lossless encoding (PNG with stored, uncompressed zlib
  blocks); base64 decode plus Pillow's image decode, nothing else.
"""

from __future__ import annotations

import base64
import binascii
import gc
import io
import statistics
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import requests
import torch
import urllib3
from PIL import Image
from requests.structures import CaseInsensitiveDict

from structure_api.client import StructureClient, StructureRequest
from structure_api.images import (
    FitPlan,
    ImageSize,
    as_numpy,
    decode_image,
    encode_upload,
    fit_to_limits,
    new_output_batch,
    restore_from_fit,
    to_uint8_rgb,
    uint8_to_float,
)

from .content import photo_like, response_json, service_png

PATHS = ("pack", "naive", "floor")


# --- the three upload paths --------------------------------------------------------------


def upload_pack(image: torch.Tensor) -> bytes:
    pixels, _plan = fit_to_limits(to_uint8_rgb(image))
    return encode_upload(pixels).data


def upload_naive(image: torch.Tensor) -> bytes:
    picture = Image.fromarray(np.clip(255.0 * image.cpu().numpy(), 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(payload, zlib.crc32(kind)))
    )


def upload_floor(image: torch.Tensor) -> bytes:
    pixels = to_uint8_rgb(image)
    height, width, _ = pixels.shape
    lines = np.empty((height, width * 3 + 1), dtype=np.uint8)
    lines[:, 0] = 0  # filter "none"
    lines[:, 1:] = pixels.reshape(height, width * 3)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _chunk(b"IHDR", header),
            _chunk(b"IDAT", zlib.compress(lines, 0)),
            _chunk(b"IEND", b""),
        )
    )


# --- the three download paths ------------------------------------------------------------


def http_response(body: bytes) -> requests.Response:
    """A ``requests.Response`` as it stands when the headers are in and the body is still to be read."""
    response = requests.Response()
    response.status_code = 200
    response.headers = CaseInsensitiveDict(
        {"content-type": "application/json", "content-length": str(len(body))}
    )
    # The client reads the body through urllib3's response (read1), as from a socket.
    response.raw = urllib3.HTTPResponse(
        body=io.BytesIO(body),
        headers=dict(response.headers),
        status=200,
        preload_content=False,
        decode_content=False,
    )
    response.encoding = None
    return response


class DownloadPack:
    """The client's answer handling plus the pipeline's write into the output tensor."""

    def __init__(self, size: ImageSize, request: StructureRequest) -> None:
        # No socket is opened: only the answer-parsing code of the client is used.
        self.client = StructureClient(api_key="benchmark", base_url="http://127.0.0.1:9")
        self.request = request
        self.plan = FitPlan.identity(size)
        self.output = new_output_batch(1, size, like=torch.empty(0))
        self.output_pixels = as_numpy(self.output)

    def __call__(self, body: bytes) -> torch.Tensor:
        result = self.client._parse(http_response(body), self.request, 1)
        uint8_to_float(restore_from_fit(result.pixels, self.plan), out=self.output_pixels[0])
        return self.output


def download_naive(body: bytes) -> torch.Tensor:
    payload = http_response(body).json()
    raw = base64.b64decode(payload["data"]["image"])
    picture = Image.open(io.BytesIO(raw)).convert("RGBA")
    array = np.array(picture).astype(np.float32) / 255.0
    return torch.from_numpy(array)[None, :, :, :3]


def download_floor(b64: bytes) -> Image.Image:
    raw = binascii.a2b_base64(b64)
    picture = Image.open(io.BytesIO(raw))
    picture.load()
    return picture


# --- measuring ---------------------------------------------------------------------------


@dataclass
class SizeResult:
    """Median times (seconds) per path and direction at one image size, and the upload sizes."""

    side: int
    repeats: int
    upload: dict[str, float]
    download: dict[str, float]
    upload_bytes: dict[str, int]
    response_bytes: int

    def total(self, path: str) -> float:
        return self.upload[path] + self.download[path]


def _time(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def _check_lossless(side: int, image: torch.Tensor, uploads: dict[str, bytes]) -> None:
    rounded = to_uint8_rgb(image)
    truncated = np.clip(255.0 * image.numpy(), 0, 255).astype(np.uint8)  # the naive path truncates
    for path, data in uploads.items():
        if not np.array_equal(decode_image(data), truncated if path == "naive" else rounded):
            raise AssertionError(f"the {path} upload at {side}px does not decode to the input's pixels")


def measure_size(side: int, repeats: int, seed: int = 0) -> SizeResult:
    """Run every path ``repeats`` times on one ``side`` x ``side`` image, interleaved, and keep the
    medians."""
    image = torch.from_numpy(photo_like(side, side, seed))
    png = service_png(side, side, seed + 1000)
    body = response_json(png)
    b64 = base64.b64encode(png)
    size = ImageSize(width=side, height=side)

    uploads = {"pack": upload_pack(image), "naive": upload_naive(image), "floor": upload_floor(image)}
    _check_lossless(side, image, uploads)
    request = StructureRequest(image=encode_upload(to_uint8_rgb(image)), prompt="benchmark")
    download_pack = DownloadPack(size, request)
    download_pack(body)  # warm: first use loads Pillow's plugins
    expected = torch.from_numpy(decode_image(png).astype(np.float32) / np.float32(255))
    if not torch.equal(download_pack(body)[0], expected) or not torch.equal(
        download_naive(body)[0], expected
    ):
        raise AssertionError(f"a download path at {side}px does not give the answer's pixels")

    upload_calls = {
        "pack": lambda: upload_pack(image),
        "naive": lambda: upload_naive(image),
        "floor": lambda: upload_floor(image),
    }
    download_calls = {
        "pack": lambda: download_pack(body),
        "naive": lambda: download_naive(body),
        "floor": lambda: download_floor(b64),
    }
    up: dict[str, list[float]] = {path: [] for path in PATHS}
    down: dict[str, list[float]] = {path: [] for path in PATHS}
    for repeat in range(repeats):
        # Rotate the order so a slow moment of the machine does not always fall on one path.
        order = PATHS[repeat % 3 :] + PATHS[: repeat % 3]
        for path in order:
            gc.collect()
            up[path].append(_time(upload_calls[path]))
            gc.collect()
            down[path].append(_time(download_calls[path]))
    return SizeResult(
        side=side,
        repeats=repeats,
        upload={path: statistics.median(times) for path, times in up.items()},
        download={path: statistics.median(times) for path, times in down.items()},
        upload_bytes={path: len(data) for path, data in uploads.items()},
        response_bytes=len(body),
    )
