"""Image conversions for the Structure client: tensors to upload bytes and answers back to pixels.

An IMAGE batch is ``[B, H, W, C]`` float in 0..1, a torch tensor or a numpy array; one image
is ``[H, W, C]``. Inside this module pixels travel as ``[H, W, 3]`` uint8 numpy arrays.
torch is never imported at module level: a tensor can only exist if torch is already loaded,
so tensors are recognised through ``sys.modules`` and torch is imported only to make one.
"""

from __future__ import annotations

import binascii
import io
import math
import struct
import sys
import zlib
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .contract import (  # noqa: F401  (the limits stay importable from here)
    FORM_HEADROOM_BYTES,
    MAX_ASPECT,
    MAX_PIXELS,
    MAX_REQUEST_BYTES,
    MIN_PIXELS,
    MIN_SIDE,
)
from .errors import InvalidImageError, MalformedResponseError


_MIME_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


@dataclass(frozen=True)
class ImageSize:
    """A width and height in pixels."""

    width: int
    height: int

    @property
    def pixels(self) -> int:
        """Total number of pixels."""
        return self.width * self.height

    @classmethod
    def of(cls, pixels: Any) -> "ImageSize":
        """The size of an ``[H, W, ...]`` array or tensor."""
        height, width = (int(side) for side in tuple(pixels.shape)[:2])
        return cls(width=width, height=height)

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


# --- tensors and arrays in, uint8 RGB out ----------------------------------------------

def _is_torch_tensor(obj: object) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def _who(index: Optional[int]) -> str:
    return "The image" if index is None else f"Image {index + 1} of the batch"


# Float images are quantized a block of rows of about this many bytes at a time: the float32
# scratch stays in cache, and no full-size float copy exists (50 MB for one 2048x2048 image).
_QUANTIZE_BLOCK_BYTES = 1 << 18


def _quantize(values: np.ndarray, scale: float) -> np.ndarray:
    """``values * scale`` rounded into uint8 0..255, NaN and -inf to 0, +inf to 255."""
    height, width, channels = values.shape
    result = np.empty(values.shape, dtype=np.uint8)
    per_block = max(1, _QUANTIZE_BLOCK_BYTES // (width * channels * 4))
    buffer = np.empty((min(per_block, height), width, channels), dtype=np.float32)
    for start in range(0, height, per_block):
        stop = min(height, start + per_block)
        scratch = buffer[:stop - start]
        with np.errstate(over="ignore", invalid="ignore"):
            np.multiply(values[start:stop], np.float32(scale), out=scratch, dtype=np.float32)
        # fmax/fmin return the non-NaN operand, so these two passes also send NaN to 0 and
        # +/-inf to the ends, without the temporaries np.nan_to_num would allocate.
        np.fmax(scratch, np.float32(0), out=scratch)
        np.fmin(scratch, np.float32(255), out=scratch)
        np.rint(scratch, out=result[start:stop], casting="unsafe")
    return result


def to_uint8_rgb(image: Any, *, index: Optional[int] = None) -> np.ndarray:
    """One ``[H, W, C]`` image (torch or numpy, float 0..1 or integer) as contiguous ``[H, W, 3]`` uint8.

    Floats are clamped to 0..1 and rounded (NaN and -inf to 0, +inf to 1). uint8 is taken as
    0..255, uint16 as 0..65535, bool as 0/1; other integers are taken as 0..255 levels and
    clamped. One channel is grey; two are grey plus alpha; four are RGBA; alpha is dropped.
    ``index`` (0-based) only names the image in error messages. A uint8 RGB input that is
    already contiguous comes back as is (sharing memory), since nothing here writes to it.
    """
    if _is_torch_tensor(image):
        import torch

        tensor = image.detach()
        if tensor.dtype in (torch.float16, torch.bfloat16):
            # numpy has no bfloat16; widening in torch is exact for both half types.
            tensor = tensor.to(device="cpu", dtype=torch.float32)
        elif tensor.device.type != "cpu":
            tensor = tensor.cpu()
        array = tensor.numpy()
    else:
        array = np.asarray(image)

    who = _who(index)
    if array.ndim != 3:
        raise InvalidImageError(f"{who} has shape {list(array.shape)}; expected [height, width, channels].")
    height, width, channels = array.shape
    if height == 0 or width == 0:
        raise InvalidImageError(f"{who} is {width}x{height} pixels; it needs at least one pixel each side.")
    if channels not in (1, 2, 3, 4):
        raise InvalidImageError(f"{who} has {channels} channels; expected 1, 3 or 4.")

    # Grey (with or without alpha) is quantized as one channel and widened at the end: a third of the work.
    colour = array[:, :, :1] if channels <= 2 else array[:, :, :3]
    kind = array.dtype.kind
    if kind == "f":
        pixels = _quantize(colour, 255.0)
    elif array.dtype == np.uint8:
        pixels = np.ascontiguousarray(colour)
    elif kind == "b":
        pixels = colour.astype(np.uint8)
        pixels *= 255
    elif array.dtype == np.uint16:
        pixels = _quantize(colour, 255.0 / 65535.0)
    elif kind in "iu":
        pixels = np.clip(colour, 0, 255).astype(np.uint8)
    else:
        raise InvalidImageError(f"{who} holds values of type {array.dtype}; expected floats in 0..1 or integers.")
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    return pixels


def _check_rgb8(pixels: Any, what: str = "The image") -> np.ndarray:
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 3 \
            or pixels.shape[2] != 3 or pixels.shape[0] == 0 or pixels.shape[1] == 0:
        shape = list(getattr(pixels, "shape", ()))
        dtype = getattr(pixels, "dtype", type(pixels).__name__)
        raise InvalidImageError(f"{what} must be a [height, width, 3] uint8 array; got shape {shape} of {dtype}.")
    return pixels


# --- fitting into the service's limits, and back -----------------------------------------

@dataclass(frozen=True)
class FitPlan:
    """What ``fit_to_limits`` did: the original size, the size sent, and where the content sits in it.

    The content box (``content_left``, ``content_top``, ``content``) is the part of the sent
    image that holds the original picture, scaled; the rest is padding.
    """

    original: ImageSize
    sent: ImageSize
    content_left: int
    content_top: int
    content: ImageSize

    @classmethod
    def identity(cls, size: ImageSize) -> "FitPlan":
        """The plan for an image sent as it is."""
        return cls(original=size, sent=size, content_left=0, content_top=0, content=size)

    @property
    def padded(self) -> bool:
        """True when the sent image has padding around the content."""
        return self.content != self.sent

    @property
    def scaled(self) -> bool:
        """True when the content was resized."""
        return self.content != self.original

    @property
    def changed(self) -> bool:
        """True when the sent image differs from the original in any way."""
        return self.padded or self.scaled

def _canvas_size(width: int, height: int) -> ImageSize:
    """Scale a canvas whose aspect is already within limits so its side and pixel counts are too."""
    if width * height > MAX_PIXELS:
        scale = math.sqrt(MAX_PIXELS / (width * height))
        # The epsilon keeps e.g. 3073 * (3072/3073) from flooring to 3071 on a rounding error;
        # the loops below guarantee the limits whatever the floats did.
        new_width = max(1, math.floor(width * scale + 1e-9))
        new_height = max(1, math.floor(height * scale + 1e-9))
        while new_width * new_height > MAX_PIXELS:
            if new_width * height > new_height * width:
                new_width -= 1
            else:
                new_height -= 1
        if 2 * new_width > 5 * new_height:
            new_width = 5 * new_height // 2
        if 2 * new_height > 5 * new_width:
            new_height = 5 * new_width // 2
        return ImageSize(width=new_width, height=new_height)
    short, long_ = min(width, height), max(width, height)
    if short < MIN_SIDE:
        # Short side to exactly MIN_SIDE, long side rounded to keep the ratio (integer
        # arithmetic): as the aspect is at most 2.5 it stays at most 160, far under MAX_PIXELS.
        new_long = max(MIN_SIDE, (2 * long_ * MIN_SIDE + short) // (2 * short))
        if width <= height:
            return ImageSize(width=MIN_SIDE, height=new_long)
        return ImageSize(width=new_long, height=MIN_SIDE)
    return ImageSize(width=width, height=height)


def plan_fit(size: ImageSize) -> FitPlan:
    """The plan ``fit_to_limits`` follows for an image of ``size``, computed without pixels."""
    width, height = size.width, size.height
    if width < 1 or height < 1:
        raise InvalidImageError(f"The image is {size} pixels; it needs at least one pixel each side.")
    # 1. Pad the short side until the aspect is exactly at the limit (ceil(2/5 of the long side)).
    canvas_width, canvas_height = width, height
    if 2 * width > 5 * height:
        canvas_height = -(-2 * width // 5)
    elif 2 * height > 5 * width:
        canvas_width = -(-2 * height // 5)
    # 2./3. Scale the padded canvas down or up into the pixel and side limits.
    sent = _canvas_size(canvas_width, canvas_height)
    content_width = sent.width if canvas_width == width else \
        min(sent.width, max(1, round(width * sent.width / canvas_width)))
    content_height = sent.height if canvas_height == height else \
        min(sent.height, max(1, round(height * sent.height / canvas_height)))
    return FitPlan(
        original=size,
        sent=sent,
        content_left=(sent.width - content_width) // 2,
        content_top=(sent.height - content_height) // 2,
        content=ImageSize(width=content_width, height=content_height),
    )


def _resize(pixels: np.ndarray, size: ImageSize, box: Optional[tuple[float, float, float, float]] = None
            ) -> np.ndarray:
    """Resample ``[H, W, 3]`` uint8 (or the ``box`` of it) to ``size``: Lanczos down, bicubic up."""
    source_area = pixels.shape[0] * pixels.shape[1] if box is None else (box[2] - box[0]) * (box[3] - box[1])
    shrinking = size.pixels < source_area
    resample = Image.Resampling.LANCZOS if shrinking else Image.Resampling.BICUBIC
    image = Image.fromarray(pixels, mode="RGB") if pixels.flags.c_contiguous else \
        Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")
    # reducing_gap lets Pillow box-reduce large shrinks first: much faster, visually the same.
    resized = image.resize((size.width, size.height), resample, box=box,
                           reducing_gap=3.0 if shrinking else None)
    return np.array(resized, dtype=np.uint8)


def fit_to_limits(pixels: np.ndarray) -> tuple[np.ndarray, FitPlan]:
    """Fit ``[H, W, 3]`` uint8 into the service's limits; returns the image to send and the plan to undo it.

    An aspect beyond 2.5:1 is padded (never cropped, so no content is lost) symmetrically to
    exactly 2.5:1 by replicating the edge pixels: the service keeps the input's edges, and a
    flat colour band would hand it a hard artificial edge to build on. Then an image over
    MAX_PIXELS is scaled down (Lanczos) and one with a side under MIN_SIDE scaled up (bicubic),
    keeping the aspect. An image that already fits is returned as the same object.
    """
    pixels = _check_rgb8(pixels)
    plan = plan_fit(ImageSize.of(pixels))
    if not plan.changed:
        return pixels, plan
    content = _resize(pixels, plan.content) if plan.scaled else pixels
    if plan.padded:
        bottom = plan.sent.height - plan.content.height - plan.content_top
        right = plan.sent.width - plan.content.width - plan.content_left
        content = np.pad(content, ((plan.content_top, bottom), (plan.content_left, right), (0, 0)), mode="edge")
    return content, plan


def restore_from_fit(pixels: np.ndarray, plan: FitPlan) -> np.ndarray:
    """Undo ``fit_to_limits`` on the service's result: crop the padding, resize to the original ``[H, W, 3]``.

    A result whose size differs from the size sent is taken as the same picture at another
    scale: the content box is mapped onto it, so the image is resampled only once.
    """
    pixels = _check_rgb8(pixels, "The result image")
    result = ImageSize.of(pixels)
    if result == plan.original and not plan.changed:
        return pixels
    left, top = plan.content_left, plan.content_top
    if result == plan.sent and plan.content == plan.original:
        # Padding only: an exact crop, no resampling.
        return np.ascontiguousarray(pixels[top:top + plan.content.height, left:left + plan.content.width])
    scale_x = result.width / plan.sent.width
    scale_y = result.height / plan.sent.height
    box = (left * scale_x, top * scale_y,
           (left + plan.content.width) * scale_x, (top + plan.content.height) * scale_y)
    return _resize(pixels, plan.original, box=box)


# --- encoding the upload ---------------------------------------------------------------

@dataclass(frozen=True)
class EncodedImage:
    """An image encoded for the upload."""

    data: bytes
    format: str  # 'png', 'jpeg' or 'webp'
    mime_type: str
    size: ImageSize

    @property
    def filename(self) -> str:
        """The file name sent in the multipart form, e.g. ``image.png``."""
        return f"image.{_EXTENSIONS.get(self.format, self.format)}"


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_FILTER_UP = 2
_FILTER_AVERAGE = 3
# Rows are filtered and compressed a block of about this many bytes at a time, so the
# temporaries stay in cache and no full-size filtered copy of the image ever exists.
_PNG_BLOCK_BYTES = 1 << 18
# Below this compressed/raw ratio the picture is flat or synthetic (line art, masks, graphics),
# where LZ77 matches pay off and a second, matching pass is worth its time.
_FLAT_RATIO = 0.15


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(payload, zlib.crc32(kind)))


def _png_idat(rows: np.ndarray, png_filter: int, level: int, strategy: int) -> list[bytes]:
    """zlib stream, in pieces, of the filtered scanlines of ``rows`` (``[H, W*3]`` uint8), one filter for all rows."""
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
        above = rows[start - 1:stop - 1] if start else None  # the row above the image is zeros
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
    pixels = _check_rgb8(pixels)
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
    return b"".join((_PNG_SIGNATURE, _png_chunk(b"IHDR", header), struct.pack(">I", idat_length), b"IDAT",
                     *idat, struct.pack(">I", crc), _png_chunk(b"IEND", b"")))


def _pillow_encode(pixels: np.ndarray, fmt: str, **options: Any) -> Optional[bytes]:
    buffer = io.BytesIO()
    try:
        Image.fromarray(np.ascontiguousarray(pixels), mode="RGB").save(buffer, format=fmt, **options)
    except (OSError, ValueError):
        return None  # e.g. a side beyond the 65500 px JPEG can hold
    return buffer.getvalue()


def encode_image(pixels: np.ndarray, fmt: str) -> bytes:
    """``[H, W, 3]`` uint8 as a file in ``fmt``: lossless PNG, or JPEG / WebP at quality 95."""
    pixels = _check_rgb8(pixels)
    if fmt == "png":
        return encode_png(pixels)
    if fmt not in ("jpeg", "webp"):
        raise ValueError(f"fmt must be png, jpeg or webp; got {fmt!r}.")
    data = _pillow_encode(pixels, fmt.upper(), quality=95)
    if data is None:
        raise InvalidImageError(f"The {ImageSize.of(pixels)} image cannot be written as {fmt}; use png.")
    return data


# Fallbacks when the PNG is too big, best first. 4:4:4 chroma keeps colour edges sharp, which
# the service follows. Lossless WebP is not tried: on noisy photos it came out only 5-20%
# smaller than this PNG while taking 10x its time (1.2 s for 2048x2048), so it rarely rescues
# an upload and always costs; JPEG at quality 95 takes ~40 ms and is visually lossless.
_JPEG_STEPS = ((95, 0), (95, 2), (90, 2), (85, 2), (75, 2), (60, 2))


def encode_upload(pixels: np.ndarray, max_bytes: int = MAX_REQUEST_BYTES - FORM_HEADROOM_BYTES) -> EncodedImage:
    """Encode ``[H, W, 3]`` uint8 for the upload: lossless PNG, else the best JPEG within ``max_bytes``."""
    pixels = _check_rgb8(pixels)
    size = ImageSize.of(pixels)
    png = encode_png(pixels)
    if len(png) <= max_bytes:
        return EncodedImage(data=png, format="png", mime_type=_MIME_TYPES["png"], size=size)
    for quality, subsampling in _JPEG_STEPS:
        jpeg = _pillow_encode(pixels, "JPEG", quality=quality, subsampling=subsampling)
        if jpeg is not None and len(jpeg) <= max_bytes:
            return EncodedImage(data=jpeg, format="jpeg", mime_type=_MIME_TYPES["jpeg"], size=size)
    raise InvalidImageError(
        f"The {size} image does not fit in {max_bytes / 2**20:.2f} MiB even as a JPEG; use a smaller image.")


# --- decoding the answer ---------------------------------------------------------------

def detect_format(data: bytes) -> Optional[str]:
    """'png', 'jpeg' or 'webp' from the magic bytes, else None."""
    head = bytes(data[:12])
    if head.startswith(_PNG_SIGNATURE):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(head) == 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def _looks_truncated(data: bytes, fmt: Optional[str]) -> bool:
    # Pillow refuses truncated files only while ImageFile.LOAD_TRUNCATED_IMAGES is False, a
    # global that other ComfyUI nodes are known to switch on; check the ends ourselves.
    if fmt == "png":
        return b"IEND" not in data[-1024:]
    if fmt == "jpeg":
        return b"\xff\xd9" not in data[-1024:]
    if fmt == "webp":
        return len(data) < 12 or int.from_bytes(data[4:8], "little") + 8 > len(data)
    return False


def _png_declared_size(data: bytes) -> Optional[ImageSize]:
    if detect_format(data) == "png" and len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return ImageSize(width=width, height=height)
    return None


def _bomb_error(size: Optional[ImageSize]) -> MalformedResponseError:
    if size is None:
        return MalformedResponseError(
            "The service returned an image larger than any it can produce; it was not decoded.")
    return MalformedResponseError(
        f"The service returned an image of {size.width} x {size.height} pixels, larger than any it can produce; "
        "it was not decoded.")


_NOT_AN_IMAGE = "The service's answer held bytes that are not an image."
# What Pillow's format plugins raise on broken input, besides the OSError family.
_PILLOW_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, KeyError, TypeError,
                  ZeroDivisionError)


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
            _, status, chunk = encoder.encode(max(_PNG_BLOCK_BYTES, width * 4))
            piece = np.frombuffer(chunk, dtype=np.uint8)
            if position + len(piece) > flat.size:
                raise MalformedResponseError(_NOT_AN_IMAGE)
            if scale:
                # Division (not multiplication by 1/255): v/255 correctly rounded, as uint8_to_float does.
                np.divide(piece, np.float32(255), out=flat[position:position + len(piece)], dtype=np.float32)
            else:
                flat[position:position + len(piece)] = piece
            position += len(piece)
    finally:
        encoder.cleanup()
    if status < 0 or position != flat.size:
        raise MalformedResponseError(_NOT_AN_IMAGE)
    return True


def _rgb_pixels(image: Image.Image) -> np.ndarray:
    """An RGB-mode image's pixels as a new writable ``[H, W, 3]`` uint8 array, copied out of Pillow once."""
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


def decode_image(data: bytes, *, max_pixels: int = 4 * MAX_PIXELS) -> np.ndarray:
    """Image bytes (PNG, JPEG, WebP or anything Pillow opens) to ``[H, W, 3]`` uint8; alpha is dropped.

    The declared size is checked against ``max_pixels`` before any pixel is decoded, so a
    decompression bomb costs nothing.
    """
    if not data:
        raise MalformedResponseError("The service's answer held an empty image.")
    fmt = detect_format(data)
    if _looks_truncated(data, fmt):
        raise MalformedResponseError("The service's answer held an image that is cut short.")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size  # from the header only: Image.open decodes no pixels
            if width < 1 or height < 1:
                raise MalformedResponseError(_NOT_AN_IMAGE)
            if width * height > max_pixels:
                raise _bomb_error(ImageSize(width=width, height=height))
            image.load()
            return _to_rgb_array(image)
    except Image.DecompressionBombError:
        # Pillow's own, coarser guard fired first (its limit is a global we leave alone).
        raise _bomb_error(_png_declared_size(data)) from None
    except UnidentifiedImageError:
        raise MalformedResponseError(_NOT_AN_IMAGE) from None
    except MemoryError:
        raise MalformedResponseError("The service's answer held an image too large to decode.") from None
    except _PILLOW_ERRORS:
        raise MalformedResponseError(_NOT_AN_IMAGE) from None


def image_header_size(data: bytes, *, max_pixels: int = 4 * MAX_PIXELS) -> ImageSize:
    """The size a PNG, JPEG or WebP declares, after checking it is one, not cut short and not a bomb; no pixel is decoded."""
    fmt = detect_format(data)
    if fmt is None:
        raise MalformedResponseError("The service's answer held bytes that are not an image (not PNG, JPEG or WebP).")
    if _looks_truncated(data, fmt):
        raise MalformedResponseError("The service's answer held an image that is cut short.")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size  # from the header only
    except Image.DecompressionBombError:
        raise _bomb_error(_png_declared_size(data)) from None
    except UnidentifiedImageError:
        raise MalformedResponseError(_NOT_AN_IMAGE) from None
    except _PILLOW_ERRORS:
        raise MalformedResponseError(_NOT_AN_IMAGE) from None
    if width < 1 or height < 1:
        raise MalformedResponseError(_NOT_AN_IMAGE)
    if width * height > max_pixels:
        raise _bomb_error(ImageSize(width=width, height=height))
    return ImageSize(width=width, height=height)


_NOT_BASE64 = "The service's answer held an image that is not valid base64."


def decode_image_into(data: bytes, out: np.ndarray, *, max_pixels: int = 4 * MAX_PIXELS) -> None:
    """Decode image bytes straight into ``out``, a float32 ``[H, W, 3]`` slice of size the image's own.

    No uint8 copy of the image is made: an RGB image's pixels go from Pillow's buffer to ``out``
    (for a 2048x2048 answer, 12 MB less per image than decode_image + uint8_to_float).
    """
    size = image_header_size(data, max_pixels=max_pixels)
    if out.shape != (size.height, size.width, 3) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out has shape {list(out.shape)}; expected [{size.height}, {size.width}, 3] float32.")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.mode != "RGB" or not _copy_rgb(image, out.reshape(-1)):
                uint8_to_float(_to_rgb_array(image), out=out)
    except Image.DecompressionBombError:
        raise _bomb_error(_png_declared_size(data)) from None
    except UnidentifiedImageError:
        raise MalformedResponseError(_NOT_AN_IMAGE) from None
    except MemoryError:
        raise MalformedResponseError("The service's answer held an image too large to decode.") from None
    except _PILLOW_ERRORS:
        raise MalformedResponseError(_NOT_AN_IMAGE) from None


def decode_base64(b64: Union[str, bytes, memoryview]) -> bytes:
    """Strict base64 (optionally a ``data:image/...;base64,`` URL, with line breaks) to bytes."""
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
            raw = binascii.a2b_base64("".join(text.split()) if isinstance(text, str) else b"".join(text.split()),
                                      strict_mode=True)
    except (binascii.Error, ValueError):
        raise MalformedResponseError(_NOT_BASE64) from None
    if not raw:
        raise MalformedResponseError("The service's answer held an empty image.")
    return raw


# --- back to float batches -------------------------------------------------------------

def uint8_to_float(pixels: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """``[H, W, 3]`` uint8 to float32 0..1, written into ``out`` (e.g. a slice of an output batch) if given."""
    pixels = _check_rgb8(pixels)
    if out is None:
        out = np.empty(pixels.shape, dtype=np.float32)
    elif out.shape != pixels.shape:
        raise ValueError(f"out has shape {list(out.shape)}; expected {list(pixels.shape)}.")
    # Division (not multiplication by 1/255) so that v/255 is the correctly rounded float and
    # to_uint8_rgb brings back exactly v; dtype= makes numpy cast in small chunks, not a full copy.
    np.divide(pixels, np.float32(255), out=out, dtype=np.float32)
    return out


def new_output_batch(count: int, size: ImageSize, like: Any = None) -> Any:
    """A zeroed float32 ``[count, H, W, 3]`` batch: a CPU torch tensor when ``like`` is one, else numpy."""
    shape = (count, size.height, size.width, 3)
    if _is_torch_tensor(like):
        import torch

        return torch.zeros(shape, dtype=torch.float32)
    return np.zeros(shape, dtype=np.float32)


def as_numpy(batch: Any) -> np.ndarray:
    """A writable numpy view of a batch from ``new_output_batch`` (shares memory with a tensor)."""
    if _is_torch_tensor(batch):
        return batch.detach().numpy()
    array = np.asarray(batch)
    if not array.flags.writeable:
        raise ValueError("The batch is read-only.")
    return array
