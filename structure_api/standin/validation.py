"""The checks the service makes on a parsed form, in its order, with the contract's figures."""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass

from PIL import Image

from ..contract import (
    FORM_FIELDS,
    MAX_ASPECT,
    MAX_PIXELS,
    MIN_PIXELS,
    MIN_SIDE,
    UPLOAD_FORMATS,
    FormField,
    FormParams,
)
from .multipart import Form, InvalidUpload

# --- validation ------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """A request the stand-in will answer: the decoded upload and the form's values (seed 0: pick one)."""

    pixels: Image.Image
    form: FormParams


def _read_text(field: FormField, text: str) -> str:
    if field.required and not 1 <= len(text) <= field.max_chars:
        raise InvalidUpload(f"{field.name}: must be 1 to {field.max_chars} characters")
    if len(text) > field.max_chars:
        raise InvalidUpload(f"{field.name}: must be at most {field.max_chars} characters")
    return text


def _read_number(field: FormField, text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and field.minimum <= value <= field.maximum):
        raise InvalidUpload(f"{field.name}: must be a number between {field.minimum:g} and {field.maximum:g}")
    return value


def _read_integer(field: FormField, text: str) -> int:
    # Digits only (no sign, no exponent), no more of them than the largest value has.
    text = text.strip()
    if (
        not re.fullmatch(rf"[0-9]{{1,{len(str(field.maximum))}}}", text)
        or not field.minimum <= int(text) <= field.maximum
    ):
        raise InvalidUpload(f"{field.name}: must be an integer between {field.minimum} and {field.maximum}")
    return int(text)


def _read_choice(field: FormField, text: str) -> str:
    if text not in field.choices:
        # Upstream lists the choices alphabetically.
        raise InvalidUpload(f"{field.name}: must be one of {', '.join(sorted(field.choices))}")
    return text


_READERS = {"text": _read_text, "number": _read_number, "integer": _read_integer, "choice": _read_choice}


def form_to_job(form: Form) -> Job:
    """Check as the service does, in the contract's field order, then the image; raise InvalidUpload naming
    the first failing field."""
    for name in form.undecodable:
        raise InvalidUpload(f"{name}: must be UTF-8 text")
    values = {}
    for field in FORM_FIELDS:
        text = form.fields.get(field.name)
        if text is None and field.required:
            raise InvalidUpload(f"{field.name}: is required")
        values[field.name] = field.default if text is None else _READERS[field.kind](field, text)
    if form.image_bytes is None:
        raise InvalidUpload("image: is required")
    return Job(decode_upload(form.image_bytes), FormParams(**values))


def decode_upload(data: bytes) -> Image.Image:
    """Open an uploaded image, checking the limits from its header before any pixel is decoded."""
    if not data:
        raise InvalidUpload("image: is empty")
    try:
        # Only the header is read here; the size check below runs before load(), so a small file
        # announcing a huge canvas (a decompression bomb) is refused without decoding it.
        image = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
    except Image.DecompressionBombError:
        raise InvalidUpload(f"image: must have {MIN_PIXELS} to {MAX_PIXELS} pixels") from None
    except Exception:
        raise InvalidUpload("image: could not be decoded as PNG, JPEG or WebP") from None
    width, height = image.size
    if width < MIN_SIDE or height < MIN_SIDE:
        raise InvalidUpload(f"image: every side must be at least {MIN_SIDE} pixels (got {width}x{height})")
    if not MIN_PIXELS <= width * height <= MAX_PIXELS:
        raise InvalidUpload(f"image: must have {MIN_PIXELS} to {MAX_PIXELS} pixels (got {width * height})")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise InvalidUpload(
            f"image: aspect ratio must be between 1:{MAX_ASPECT:g} and {MAX_ASPECT:g}:1 "
            f"(got {width}x{height})"
        )
    try:
        image.load()
    except Exception:
        raise InvalidUpload("image: could not be decoded (damaged or truncated file)") from None
    return image
