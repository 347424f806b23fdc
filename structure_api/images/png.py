"""The PNG writer of the upload: one filter for all rows, zlib tuned for photographic content."""

from __future__ import annotations

import struct
import zlib

import numpy as np

from .arrays import check_rgb8

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_FILTER_UP = 2
_FILTER_AVERAGE = 3
# Rows are filtered and compressed a block of about this many bytes at a time, so the
# temporaries stay in cache and no full-size filtered copy of the image ever exists.
_PNG_BLOCK_BYTES = 1 << 18
# Below this compressed/raw ratio the picture is flat or synthetic (line art, masks, graphics),
# where LZ77 matches pay off and a second, matching pass is worth its time.
_FLAT_RATIO = 0.15


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(payload, zlib.crc32(kind)))
    )


def _png_idat(rows: np.ndarray, png_filter: int, level: int, strategy: int) -> list[bytes]:
    """Yield the zlib stream of the filtered scanlines of ``rows`` (``[H, W*3]`` uint8), one filter."""
    height, stride = rows.shape
    per_block = max(1, _PNG_BLOCK_BYTES // (stride + 1))
    lines = np.empty((per_block, stride + 1), dtype=np.uint8)
    lines[:, 0] = png_filter
    prediction = np.empty((per_block, stride), dtype=np.uint16) if png_filter == _FILTER_AVERAGE else None
    compressor = zlib.compressobj(level, zlib.DEFLATED, 15, 9, strategy)
    parts = []
    for start in range(0, height, per_block):
        stop = min(height, start + per_block)
        count = stop - start
        current = rows[start:stop]
        body = lines[:count, 1:]
        above = rows[start - 1 : stop - 1] if start else None  # the row above the image is zeros
        if png_filter == _FILTER_UP:
            if above is None:
                body[0] = current[0]
                np.subtract(current[1:], current[:-1], out=body[1:])
            else:
                np.subtract(current, above, out=body)
        else:
            # Average: x - floor((left + up) / 2), in uint16 so the sum cannot overflow; the
            # final cast wraps modulo 256 exactly as the PNG filter arithmetic requires.
            guess = prediction[:count]
            guess[:, :3] = 0
            guess[:, 3:] = current[:, :-3]
            if above is None:
                np.add(guess[1:], current[:-1], out=guess[1:])
            else:
                np.add(guess, above, out=guess)
            np.right_shift(guess, 1, out=guess)
            np.subtract(current, guess, out=body, casting="unsafe")
        parts.append(compressor.compress(lines[:count]))
    parts.append(compressor.flush())
    return parts


def encode_png(pixels: np.ndarray) -> bytes:
    """``[H, W, 3]`` uint8 as a lossless 8-bit RGB PNG, tuned for speed on photographic content.

    Pillow's PNG writer tries every filter on every row, which costs more than the whole
    compression this needs. Photos (smooth shading plus sensor or diffusion noise) compress
    best per unit of time with one Average filter on all rows and zlib level 1 with the RLE
    strategy: the noise defeats long LZ77 matches, so searching for them is wasted work.
    Flat, synthetic pictures get a second pass (Up filter, level 4, LZ77 matching) and the
    smaller result is kept.
    """
    pixels = check_rgb8(pixels)
    height, width, _ = pixels.shape
    rows = np.ascontiguousarray(pixels).reshape(height, width * 3)
    idat = _png_idat(rows, _FILTER_AVERAGE, 1, zlib.Z_RLE)
    idat_length = sum(map(len, idat))
    if idat_length < _FLAT_RATIO * height * (width * 3 + 1):
        second = _png_idat(rows, _FILTER_UP, 4, zlib.Z_DEFAULT_STRATEGY)
        if sum(map(len, second)) < idat_length:
            idat, idat_length = second, sum(map(len, second))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    # The IDAT chunk is assembled from the compressor's pieces in the one final join, so the
    # compressed image (up to ~25 MB) is copied once, not once per layer of wrapping.
    crc = zlib.crc32(b"IDAT")
    for piece in idat:
        crc = zlib.crc32(piece, crc)
    return b"".join(
        (
            PNG_SIGNATURE,
            _png_chunk(b"IHDR", header),
            struct.pack(">I", idat_length),
            b"IDAT",
            *idat,
            struct.pack(">I", crc),
            _png_chunk(b"IEND", b""),
        )
    )
