"""The checks the service makes on a parsed form, in its order, with the contract's figures."""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass

from PIL import Image

from ..contract import (
    DEFAULT_CONTROL_STRENGTH,
    DEFAULT_OUTPUT_FORMAT,
    MAX_ASPECT,
    MAX_CONTROL_STRENGTH,
    MAX_PIXELS,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MIN_CONTROL_STRENGTH,
    MIN_PIXELS,
    MIN_SIDE,
    OUTPUT_FORMATS,
    UPLOAD_FORMATS,
)
from .multipart import BadRequest, Form


# --- validation ------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    pixels: Image.Image
    prompt: str
    negative_prompt: str
    control_strength: float
    seed: int  # 0 = pick one
    output_format: str


_SEED_TEXT = re.compile(r"[0-9]{1,10}")


def validate_form(form: Form) -> Job:
    """The checks the service makes, in a fixed order; raise BadRequest naming the first failing field."""
    for name in form.undecodable:
        raise BadRequest(f"{name}: must be UTF-8 text")
    prompt = form.fields.get("prompt")
    if prompt is None:
        raise BadRequest("prompt: is required")
    if not 1 <= len(prompt) <= MAX_PROMPT_CHARS:
        raise BadRequest(f"prompt: must be 1 to {MAX_PROMPT_CHARS} characters")
    strength_text = form.fields.get("control_strength")
    control_strength = DEFAULT_CONTROL_STRENGTH
    if strength_text is not None:
        try:
            control_strength = float(strength_text.strip())
        except ValueError:
            control_strength = math.nan
        if not (math.isfinite(control_strength) and MIN_CONTROL_STRENGTH <= control_strength <= MAX_CONTROL_STRENGTH):
            raise BadRequest(f"control_strength: must be a number between {MIN_CONTROL_STRENGTH:g} and "
                              f"{MAX_CONTROL_STRENGTH:g}")
    negative_prompt = form.fields.get("negative_prompt", "")
    if len(negative_prompt) > MAX_PROMPT_CHARS:
        raise BadRequest(f"negative_prompt: must be at most {MAX_PROMPT_CHARS} characters")
    seed_text = form.fields.get("seed")
    seed = 0
    if seed_text is not None:
        seed_text = seed_text.strip()
        if not _SEED_TEXT.fullmatch(seed_text) or int(seed_text) > MAX_SEED:
            raise BadRequest(f"seed: must be an integer between 0 and {MAX_SEED}")
        seed = int(seed_text)
    output_format = form.fields.get("output_format", DEFAULT_OUTPUT_FORMAT)
    if output_format not in OUTPUT_FORMATS:
        # Upstream lists the formats alphabetically.
        raise BadRequest(f"output_format: must be one of {', '.join(sorted(OUTPUT_FORMATS))}")
    if form.image_bytes is None:
        raise BadRequest("image: is required")
    pixels = decode_upload(form.image_bytes)
    return Job(pixels, prompt, negative_prompt, control_strength, seed, output_format)


def decode_upload(data: bytes) -> Image.Image:
    """Open an uploaded image, checking the limits from its header before any pixel is decoded."""
    if not data:
        raise BadRequest("image: is empty")
    try:
        # Only the header is read here; the size check below runs before load(), so a small file
        # announcing a huge canvas (a decompression bomb) is refused without decoding it.
        image = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
    except Image.DecompressionBombError:
        raise BadRequest(f"image: must have {MIN_PIXELS} to {MAX_PIXELS} pixels") from None
    except Exception:
        raise BadRequest("image: could not be decoded as PNG, JPEG or WebP") from None
    width, height = image.size
    if width < MIN_SIDE or height < MIN_SIDE:
        raise BadRequest(f"image: every side must be at least {MIN_SIDE} pixels (got {width}x{height})")
    if not MIN_PIXELS <= width * height <= MAX_PIXELS:
        raise BadRequest(f"image: must have {MIN_PIXELS} to {MAX_PIXELS} pixels (got {width * height})")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise BadRequest(f"image: aspect ratio must be between 1:{MAX_ASPECT:g} and {MAX_ASPECT:g}:1 "
                          f"(got {width}x{height})")
    try:
        image.load()
    except Exception:
        raise BadRequest("image: could not be decoded (damaged or truncated file)") from None
    return image
