"""Decoding the service's answer: format sniffing, guards against cut-short files and bombs, pixels out."""

from __future__ import annotations

import binascii
import contextlib
import io
import struct
from collections.abc import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..contract import MAX_PIXELS
from ..errors import MalformedResponseError
from .arrays import ImageSize, uint8_to_float
from .png import PNG_SIGNATURE

# Pixels are copied out of Pillow in pieces of about this many bytes, so no piece list exists.
_COPY_BLOCK_BYTES = 1 << 18


def detect_format(data: bytes) -> str | None:
    """'png', 'jpeg' or 'webp' from the magic bytes, else None."""
    head = bytes(data[:12])
    if head.startswith(PNG_SIGNATURE):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(head) == 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def _looks_truncated(data: bytes, fmt: str | None) -> bool:
    # Pillow refuses truncated files only while ImageFile.LOAD_TRUNCATED_IMAGES is False, a
    # global that other ComfyUI nodes are known to switch on; check the ends ourselves.
    if fmt == "png":
        return b"IEND" not in data[-1024:]
    if fmt == "jpeg":
        return b"\xff\xd9" not in data[-1024:]
    if fmt == "webp":
        return len(data) < 12 or int.from_bytes(data[4:8], "little") + 8 > len(data)
    return False


def _png_declared_size(data: bytes) -> ImageSize | None:
    if detect_format(data) == "png" and len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return ImageSize(width=width, height=height)
    return None


def _bomb_error(size: ImageSize | None) -> MalformedResponseError:
    if size is None:
        return MalformedResponseError(
            "The service returned an image larger than any it can produce; it was not decoded."
        )
    return MalformedResponseError(
        f"The service returned an image of {size.width} x {size.height} pixels, larger than any it can "
        "produce; it was not decoded."
    )


_NOT_AN_IMAGE = "The service's answer held bytes that are not an image."
# What Pillow's format plugins raise on broken input, besides the OSError family.
_PILLOW_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
)


def _copy_rgb(image: Image.Image, flat: np.ndarray) -> bool:
    """Copy an RGB-mode image's pixels into ``flat`` (uint8, or float32 scaled to 0..1) piece by piece.

    What Image.tobytes does, without its list of pieces, their join and the copy np.array(image)
    then makes: the pixels go from Pillow's buffer to their destination once. Returns False
    when this Pillow lacks the encoder interface.
    """
    getencoder = getattr(Image, "_getencoder", None)
    if getencoder is None:
        return False
    width, height = image.size
    encoder = getencoder("RGB", "raw", "RGB")
    scale = flat.dtype != np.uint8
    try:
        encoder.setimage(image.im, (0, 0, width, height))
        position, status = 0, 0
        while not status:
            _, status, chunk = encoder.encode(max(_COPY_BLOCK_BYTES, width * 4))
            piece = np.frombuffer(chunk, dtype=np.uint8)
            if position + len(piece) > flat.size:
                raise MalformedResponseError(_NOT_AN_IMAGE)
            if scale:
                # Division (not multiplication by 1/255): v/255 correctly rounded, as uint8_to_float does.
                np.divide(
                    piece, np.float32(255), out=flat[position : position + len(piece)], dtype=np.float32
                )
            else:
                flat[position : position + len(piece)] = piece
            position += len(piece)
    finally:
        encoder.cleanup()
    if status < 0 or position != flat.size:
        raise MalformedResponseError(_NOT_AN_IMAGE)
    return True


def _rgb_pixels(image: Image.Image) -> np.ndarray:
    """Copy an RGB-mode image's pixels out of Pillow once, into a new writable ``[H, W, 3]`` uint8 array."""
    width, height = image.size
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    if not _copy_rgb(image, pixels.reshape(-1)):  # a future Pillow without it: the plain, slower way
        return np.array(image, dtype=np.uint8)
    return pixels


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode == "RGB":
        return _rgb_pixels(image)
    if mode.startswith("I;16") or mode == "I":
        # Pillow's own I -> RGB conversion clips at 255 instead of scaling 16 bits down.
        wide = np.asarray(image).astype(np.int64)
        grey = ((np.clip(wide, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode in ("P", "PA"):
        # Through RGBA so a palette with transparency converts without Pillow's warning.
        return np.ascontiguousarray(np.asarray(image.convert("RGBA"))[:, :, :3])
    return _rgb_pixels(image.convert("RGB"))


@contextlib.contextmanager
def _opened(data: bytes) -> Iterator[Image.Image]:
    """Open the bytes with Pillow (nothing decoded until ``load``); errors become MalformedResponseError."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            yield image
    except Image.DecompressionBombError:
        # Pillow's own, coarser guard fired first (its limit is a global we leave alone).
        raise _bomb_error(_png_declared_size(data)) from None
    except UnidentifiedImageError:
        raise MalformedResponseError(_NOT_AN_IMAGE) from None
    except MemoryError:
        raise MalformedResponseError("The service's answer held an image too large to decode.") from None
    except _PILLOW_ERRORS:
        raise MalformedResponseError(_NOT_AN_IMAGE) from None


def _refuse_cut_short(data: bytes, fmt: str | None) -> None:
    if _looks_truncated(data, fmt):
        raise MalformedResponseError("The service's answer held an image that is cut short.")


def _declared_size(image: Image.Image, max_pixels: int) -> ImageSize:
    """Read the header's size (Image.open decodes no pixels); refuse it when empty or over ``max_pixels``."""
    width, height = image.size
    if width < 1 or height < 1:
        raise MalformedResponseError(_NOT_AN_IMAGE)
    if width * height > max_pixels:
        raise _bomb_error(ImageSize(width=width, height=height))
    return ImageSize(width=width, height=height)


def decode_image(data: bytes, *, max_pixels: int = 4 * MAX_PIXELS) -> np.ndarray:
    """Image bytes (PNG, JPEG, WebP or anything Pillow opens) to ``[H, W, 3]`` uint8; alpha is dropped.

    The declared size is checked against ``max_pixels`` before any pixel is decoded, so a
    decompression bomb costs nothing.
    """
    if not data:
        raise MalformedResponseError("The service's answer held an empty image.")
    _refuse_cut_short(data, detect_format(data))
    with _opened(data) as image:
        _declared_size(image, max_pixels)
        image.load()
        return _to_rgb_array(image)


def image_header_size(data: bytes, *, max_pixels: int = 4 * MAX_PIXELS) -> ImageSize:
    """Read the size a PNG, JPEG or WebP declares, checking it is one, whole and no bomb; decode no pixel."""
    fmt = detect_format(data)
    if fmt is None:
        raise MalformedResponseError(
            "The service's answer held bytes that are not an image (not PNG, JPEG or WebP)."
        )
    _refuse_cut_short(data, fmt)
    with _opened(data) as image:
        return _declared_size(image, max_pixels)


_NOT_BASE64 = "The service's answer held an image that is not valid base64."


def decode_image_into(data: bytes, out: np.ndarray, *, max_pixels: int = 4 * MAX_PIXELS) -> None:
    """Decode image bytes straight into ``out``, a float32 ``[H, W, 3]`` slice of size the image's own.

    No uint8 copy of the image is made: an RGB image's pixels go from Pillow's buffer to ``out``
    (for a 2048x2048 answer, 12 MB less per image than decode_image + uint8_to_float).
    """
    size = image_header_size(data, max_pixels=max_pixels)
    if out.shape != (size.height, size.width, 3) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(
            f"out has shape {list(out.shape)}; expected [{size.height}, {size.width}, 3] float32."
        )
    with _opened(data) as image:
        image.load()
        if image.mode != "RGB" or not _copy_rgb(image, out.reshape(-1)):
            uint8_to_float(_to_rgb_array(image), out=out)


_URL_SAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")


def _decode_url_safe(b64: str | bytes | memoryview) -> bytes | None:
    """URL-safe base64 (``-`` and ``_``, padding optional) to bytes; None when it is not that either."""
    text = b64.encode("ascii", "replace") if isinstance(b64, str) else bytes(b64)
    text = b"".join(text.split()).translate(_URL_SAFE_TO_STANDARD)
    text += b"=" * (-len(text) % 4)
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError):
        return None


def decode_base64(b64: str | bytes | memoryview) -> bytes:
    """Base64, standard or URL-safe (a ``data:image/...;base64,`` URL too; line breaks allowed), to bytes."""
    if isinstance(b64, memoryview) and bytes(b64[:5]).lower() == b"data:":
        b64 = bytes(b64)  # rare: a data URL is cut apart as bytes
    if (b64[:5].lower() if isinstance(b64, str) else bytes(b64[:5]).lower()) in ("data:", b"data:"):
        head, comma, b64 = b64.partition("," if isinstance(b64, str) else b",")
        if not comma or not head.lower().endswith(";base64" if isinstance(head, str) else b";base64"):
            raise MalformedResponseError(_NOT_BASE64)
    try:
        try:
            # Decoded where it lies; only base64 broken into lines pays for a copy without them.
            raw = binascii.a2b_base64(b64, strict_mode=True)
        except binascii.Error:
            text = bytes(b64) if isinstance(b64, memoryview) else b64
            raw = binascii.a2b_base64(
                "".join(text.split()) if isinstance(text, str) else b"".join(text.split()), strict_mode=True
            )
    except (binascii.Error, ValueError):
        raw = _decode_url_safe(b64)
        if raw is None:
            raise MalformedResponseError(_NOT_BASE64) from None
    if not raw:
        raise MalformedResponseError("The service's answer held an empty image.")
    return raw
