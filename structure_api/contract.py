"""The Structure endpoint's contract, written once: path, fields, image limits, billing, validation.

Every other place that states one of these figures (the client, the stand-in, the CLI's help,
the node's schema and tooltips, the web UI through the node's schema) takes it from here;
tests/test_contract.py checks the texts that cannot import it (locales, help pages, README).
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Optional, Union

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
    """One text field of the multipart form: its name, whether it is required, its range and default.

    ``omit_when_empty``: an optional field left out of the form when its value says "none" (blank text,
    seed 0), so the service applies its own default.
    """

    name: str
    kind: str  # "text" | "number" | "integer" | "choice"
    required: bool
    default: Union[str, float, int, None]
    minimum: Union[float, int, None] = None
    maximum: Union[float, int, None] = None
    choices: tuple[str, ...] = ()
    max_chars: Optional[int] = None
    omit_when_empty: bool = False

    def check(self, value: object) -> None:
        """Raise InputError when `value` is outside what the service accepts for this field."""
        _CHECKS[self.kind](self, value)

    def form_value(self, value: object) -> Optional[str]:
        """Return the field's text in the form, or None when it is left out."""
        if self.omit_when_empty and not (value.strip() if isinstance(value, str) else value):
            return None
        return _format_number(value) if self.kind == "number" else str(value)


FORM_FIELDS = (
    FormField("prompt", "text", True, None, max_chars=MAX_PROMPT_CHARS),
    FormField("control_strength", "number", False, DEFAULT_CONTROL_STRENGTH,
              minimum=MIN_CONTROL_STRENGTH, maximum=MAX_CONTROL_STRENGTH),
    FormField("negative_prompt", "text", False, "", max_chars=MAX_PROMPT_CHARS, omit_when_empty=True),
    FormField("seed", "integer", False, 0, minimum=0, maximum=MAX_SEED, omit_when_empty=True),
    FormField("output_format", "choice", False, DEFAULT_OUTPUT_FORMAT, choices=OUTPUT_FORMATS),
)
FIELD_NAMES = tuple(field.name for field in FORM_FIELDS)

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

# --- validation ------------------------------------------------------------------------

_ALLOWED_CONTROL_CHARS = {"\t", "\n", "\r"}


def _check_text(field: FormField, value: object) -> None:
    name = field.name
    if not isinstance(value, str):
        raise InputError(f"{name} must be text, not {type(value).__name__}.")
    if field.required and not value.strip():
        raise InputError(f"{name} is empty: describe what the image should show.")
    if field.max_chars is not None and len(value) > field.max_chars:
        raise InputError(f"{name} is {len(value)} characters long; the service accepts at most {field.max_chars}.")
    for position, ch in enumerate(value):
        category = unicodedata.category(ch)
        if ch not in _ALLOWED_CONTROL_CHARS and category in ("Cc", "Cs"):
            kind = "control character" if category == "Cc" else "invalid character (a lone surrogate)"
            raise InputError(f"{name} contains the {kind} U+{ord(ch):04X} at position {position + 1}; remove it.")


def _check_number(field: FormField, value: object) -> None:
    low, high = f"{field.minimum:g}", f"{field.maximum:g}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{field.name} must be a number between {low} and {high}, not {value!r}.")
    if not field.minimum <= value <= field.maximum:
        raise InputError(f"{field.name} must be between {low} and {high}; got {value}.")


def _check_integer(field: FormField, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{field.name} must be a whole number between {field.minimum} and {field.maximum}, "
                         f"not {value!r}.")
    if not field.minimum <= value <= field.maximum:
        raise InputError(f"{field.name} must be between {field.minimum} and {field.maximum}; got {value}.")


def _check_choice(field: FormField, value: object) -> None:
    if value not in field.choices:
        raise InputError(f"{field.name} must be one of {', '.join(field.choices)}; got {value!r}.")


_CHECKS = {"text": _check_text, "number": _check_number, "integer": _check_integer, "choice": _check_choice}


def validate_prompt(prompt: str) -> None:
    """Raise InputError when the prompt is blank, over MAX_PROMPT_CHARS characters or holds control characters."""
    FORM_FIELDS[0].check(prompt)


def validate_form(values: Mapping[str, object]) -> None:
    """Raise InputError naming the first form field (in FORM_FIELDS order) outside what the service accepts.

    A field missing from `values` counts as its default (for the prompt: none, refused).
    """
    for field in FORM_FIELDS:
        field.check(values.get(field.name, field.default))


def validate_params(*args: object, **kwargs: object) -> None:
    """validate_form for values given in FORM_FIELDS order (prompt, control_strength, negative_prompt,
    seed, output_format) or by name."""
    validate_form({**dict(zip(FIELD_NAMES, args)), **kwargs})


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

@dataclass(frozen=True, kw_only=True)
class FormParams:
    """The form's values, one attribute per FORM_FIELDS entry (tests/test_contract.py keeps them in step)."""

    prompt: str
    control_strength: float = DEFAULT_CONTROL_STRENGTH
    negative_prompt: str = ""
    seed: int = 0
    output_format: str = DEFAULT_OUTPUT_FORMAT

    def form_values(self) -> dict[str, object]:
        """Return the form's values by field name."""
        return {name: getattr(self, name) for name in FIELD_NAMES}

    def validate_form(self) -> None:
        """Raise InputError naming the first form value outside what the service accepts."""
        validate_form(self.form_values())

    def form_fields(self) -> list[tuple[str, str]]:
        """List the multipart form's text fields, in the contract's order; empty optionals are left out."""
        fields = []
        for field in FORM_FIELDS:
            text = field.form_value(getattr(self, field.name))
            if text is not None:
                fields.append((field.name, text))
        return fields


@dataclass(frozen=True, kw_only=True)
class StructureRequest(FormParams):
    """One generation: the encoded image and the form parameters."""

    image: "EncodedImage"

    def validate(self) -> None:
        """Raise InputError naming the first parameter outside what the service accepts."""
        self.validate_form()
        check_image_limits(self.image)


def _format_number(value: float) -> str:
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text
