"""The Structure endpoint's contract, written once: path, fields, image limits, billing, validation.

Every other place that states one of these figures (the client, the stand-in, the CLI's help,
the node's schema and tooltips, the web UI through the node's schema) takes it from here;
tests/test_contract.py checks the texts that cannot import it (locales, help pages, README).
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union

from .errors import InputError

if TYPE_CHECKING:  # images imports this module for the limits; the request only needs the type
    from .images import EncodedImage

ENDPOINT_PATH = "/api/control/structure"

# --- billing -------------------------------------------------------------------------

# Charged per successful result; a failed one is free.
CREDITS_PER_IMAGE = 6

# --- the form's fields -----------------------------------------------------------------

MAX_PROMPT_CHARS = 10000
MIN_CONTROL_STRENGTH = 0.0
MAX_CONTROL_STRENGTH = 1.0
DEFAULT_CONTROL_STRENGTH = 0.7
# 0 (or no seed field) asks the service to pick one.
MAX_SEED = 4294967294
OUTPUT_FORMATS = ("png", "jpeg", "webp")
DEFAULT_OUTPUT_FORMAT = "png"


@dataclass(frozen=True)
class FormField:
    """One text field of the multipart form: its name, whether it is required, its range and default."""

    name: str
    kind: str  # "text" | "number" | "integer" | "choice"
    required: bool
    default: Union[str, float, int, None]
    minimum: Union[float, int, None] = None
    maximum: Union[float, int, None] = None
    choices: tuple[str, ...] = ()
    max_chars: Optional[int] = None


FORM_FIELDS = (
    FormField("prompt", "text", True, None, max_chars=MAX_PROMPT_CHARS),
    FormField("control_strength", "number", False, DEFAULT_CONTROL_STRENGTH,
              minimum=MIN_CONTROL_STRENGTH, maximum=MAX_CONTROL_STRENGTH),
    FormField("negative_prompt", "text", False, "", max_chars=MAX_PROMPT_CHARS),
    FormField("seed", "integer", False, 0, minimum=0, maximum=MAX_SEED),
    FormField("output_format", "choice", False, DEFAULT_OUTPUT_FORMAT, choices=OUTPUT_FORMATS),
)

# --- the input image's limits ----------------------------------------------------------

MIN_SIDE = 64
MIN_PIXELS = 4096
MAX_PIXELS = 9_437_184
MAX_ASPECT = 2.5
MAX_REQUEST_BYTES = 10 * 1024 * 1024
# The multipart form around the image (boundaries, prompt, other fields) needs room too.
FORM_HEADROOM_BYTES = 64 * 1024
# The formats the service decodes from the image part (PIL's names).
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP")

# The limits in words, for tooltips and help, made from the figures above.
LIMITS_BROKEN_TEXT = (
    f"a side under {MIN_SIDE} px, over {MAX_PIXELS / 1e6:.1f} megapixels, or wider than {MAX_ASPECT:g}:1")
PROMPT_RANGE_TEXT = f"1 to {MAX_PROMPT_CHARS} characters"
SEED_RANGE_TEXT = f"0..{MAX_SEED}"

# --- validation ------------------------------------------------------------------------

_ALLOWED_CONTROL_CHARS = {"\t", "\n", "\r"}


def _check_text(name: str, value: object, *, required: bool) -> str:
    if not isinstance(value, str):
        raise InputError(f"{name} must be text, not {type(value).__name__}.")
    if required and not value.strip():
        raise InputError(f"{name} is empty: describe what the image should show.")
    if len(value) > MAX_PROMPT_CHARS:
        raise InputError(f"{name} is {len(value)} characters long; the service accepts at most {MAX_PROMPT_CHARS}.")
    for position, ch in enumerate(value):
        category = unicodedata.category(ch)
        if ch not in _ALLOWED_CONTROL_CHARS and category in ("Cc", "Cs"):
            kind = "control character" if category == "Cc" else "invalid character (a lone surrogate)"
            raise InputError(f"{name} contains the {kind} U+{ord(ch):04X} at position {position + 1}; remove it.")
    return value


def validate_prompt(prompt: str) -> None:
    """Raise InputError when the prompt is blank, over MAX_PROMPT_CHARS characters or holds control characters."""
    _check_text("prompt", prompt, required=True)


def validate_parameters(
    prompt: str, control_strength: float, negative_prompt: str, seed: int, output_format: str
) -> None:
    """Raise InputError naming the first form parameter outside what the service accepts."""
    _check_text("prompt", prompt, required=True)
    _check_text("negative_prompt", negative_prompt, required=False)
    if isinstance(control_strength, bool) or not isinstance(control_strength, (int, float)) \
            or not math.isfinite(control_strength):
        raise InputError(f"control_strength must be a number between {MIN_CONTROL_STRENGTH:g} and "
                         f"{MAX_CONTROL_STRENGTH:g}, not {control_strength!r}.")
    if not MIN_CONTROL_STRENGTH <= control_strength <= MAX_CONTROL_STRENGTH:
        raise InputError(f"control_strength must be between {MIN_CONTROL_STRENGTH:g} and {MAX_CONTROL_STRENGTH:g}; "
                         f"got {control_strength}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed must be a whole number between 0 and {MAX_SEED}, not {seed!r}.")
    if not 0 <= seed <= MAX_SEED:
        raise InputError(f"seed must be between 0 and {MAX_SEED}; got {seed}.")
    if output_format not in OUTPUT_FORMATS:
        raise InputError(f"output_format must be one of {', '.join(OUTPUT_FORMATS)}; got {output_format!r}.")


def check_image_limits(image: "EncodedImage") -> None:
    """Raise InputError when the encoded image breaks one of the service's limits."""
    width, height = image.size.width, image.size.height
    if width < MIN_SIDE or height < MIN_SIDE:
        raise InputError(f"The image is {width}x{height} pixels; every side must be at least {MIN_SIDE}.")
    if not MIN_PIXELS <= width * height <= MAX_PIXELS:
        raise InputError(
            f"The image has {width * height} pixels; the service accepts {MIN_PIXELS} to {MAX_PIXELS}."
        )
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise InputError(f"The image is {width}x{height}; its aspect ratio must be within "
                         f"1:{MAX_ASPECT:g} and {MAX_ASPECT:g}:1.")
    if len(image.data) > MAX_REQUEST_BYTES - FORM_HEADROOM_BYTES:
        raise InputError(
            f"The encoded image is {len(image.data) / 2**20:.1f} MiB; the whole request must stay under "
            f"{MAX_REQUEST_BYTES // 2**20} MiB."
        )


# --- the request -----------------------------------------------------------------------

@dataclass(frozen=True)
class StructureRequest:
    """One generation: the encoded image and the form parameters."""

    image: "EncodedImage"
    prompt: str
    control_strength: float = DEFAULT_CONTROL_STRENGTH
    negative_prompt: str = ""
    seed: int = 0
    output_format: str = DEFAULT_OUTPUT_FORMAT

    def validate(self) -> None:
        """Raise InputError naming the first parameter outside what the service accepts."""
        validate_parameters(self.prompt, self.control_strength, self.negative_prompt, self.seed, self.output_format)
        check_image_limits(self.image)

    def form_fields(self) -> list[tuple[str, str]]:
        """The text fields of the multipart form, in the contract's order; empty optionals are left out."""
        fields = [("prompt", self.prompt), ("control_strength", _format_number(self.control_strength))]
        if self.negative_prompt.strip():
            fields.append(("negative_prompt", self.negative_prompt))
        if self.seed:
            fields.append(("seed", str(self.seed)))
        fields.append(("output_format", self.output_format))
        return fields


def _format_number(value: float) -> str:
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text
