"""The Structure endpoint's contract, written once: path, fields, image limits, billing, validation.

Every other place that states one of these figures (the client, the stand-in, the CLI's help,
the node's schema and tooltips, the web UI through the node's schema) takes it from here;
tests/test_contract.py checks the texts that cannot import it (locales, help pages, README).
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import InputError

ENDPOINT_PATH = "/api/control/structure"

# --- billing -------------------------------------------------------------------------

# Charged per successful result; a failed one is free.
CREDITS_PER_IMAGE = 6

# --- the rate limit --------------------------------------------------------------------

# At most this many requests start in any RATE_LIMIT_SECONDS; past that, every request is
# answered 429 (never charged) for LOCKOUT_SECONDS.
RATE_LIMIT_REQUESTS = 150
RATE_LIMIT_SECONDS = 10.0
LOCKOUT_SECONDS = 60.0

# --- the stand-in's free mark ------------------------------------------------------------

# A free stand-in marks every answer with this header; the client then counts its results as 0
# credits, so nothing shown for a free image claims credits were spent. The service never sends it.
STANDIN_HEADER = "X-AIThriving-Stand-In"
STANDIN_HEADER_VALUE = "free"

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
    default: str | float | int | None
    minimum: float | int | None = None
    maximum: float | int | None = None
    choices: tuple[str, ...] = ()
    max_chars: int | None = None
    omit_when_empty: bool = False

    def check(self, value: object) -> None:
        """Raise InputError when `value` is outside what the service accepts for this field."""
        _CHECKS[self.kind](self, value)

    def form_value(self, value: object) -> str | None:
        """Return the field's text in the form, or None when it is left out."""
        if self.omit_when_empty and not (value.strip() if isinstance(value, str) else value):
            return None
        return _format_number(value) if self.kind == "number" else str(value)


FORM_FIELDS = (
    FormField("prompt", "text", True, None, max_chars=MAX_PROMPT_CHARS),
    FormField(
        "control_strength",
        "number",
        False,
        DEFAULT_CONTROL_STRENGTH,
        minimum=MIN_CONTROL_STRENGTH,
        maximum=MAX_CONTROL_STRENGTH,
    ),
    FormField("negative_prompt", "text", False, "", max_chars=MAX_PROMPT_CHARS, omit_when_empty=True),
    FormField("seed", "integer", False, 0, minimum=0, maximum=MAX_SEED, omit_when_empty=True),
    FormField("output_format", "choice", False, DEFAULT_OUTPUT_FORMAT, choices=OUTPUT_FORMATS),
)
FIELD_NAMES = tuple(field.name for field in FORM_FIELDS)
# The fields the result store's key has always hashed as the form sends them (defaults included).
# A field added later enters the key only when its value is not its default, so the results
# users already keep (fixed seeds above all) still match the requests that paid for them.
KEY_FIELDS_V1 = ("prompt", "control_strength", "negative_prompt", "seed", "output_format")

# --- the answer --------------------------------------------------------------------------

# Every answer is one JSON object: the vendor's ``code`` (0: an image came back) and ``message``;
# on success ``data.image`` (base64) and ``data.seed``; on failure the upstream's ``name`` and
# ``errors``. The stand-in writes it with AnswerBody; answers.py reads it with AnswerBody.from_json.
SUCCESS_CODE = 0
FAILURE_CODE = -1
SUCCESS_MESSAGE = "success"


@dataclass(frozen=True)
class AnswerBody:
    """The service's answer: ``image`` (base64) and ``seed`` on success, ``name`` and ``errors`` else."""

    code: object  # SUCCESS_CODE on success; read as sent, so "0" and 0.0 are seen for what they are
    message: object = None
    image: object = None
    seed: object = None
    name: object = None
    errors: object = None
    request_id: object = None

    @classmethod
    def success(cls, image: str, seed: int) -> AnswerBody:
        """Build a success: the image as base64 text, and the seed the service used."""
        return cls(code=SUCCESS_CODE, message=SUCCESS_MESSAGE, image=image, seed=seed)

    @classmethod
    def failure(cls, message: str, name: str, errors: list[str] | None = None) -> AnswerBody:
        """Build a failure: the vendor's message, and the upstream's name and reasons."""
        reasons = errors if errors is not None else [message]
        return cls(code=FAILURE_CODE, message=message, name=name, errors=reasons)

    @classmethod
    def from_json(cls, payload: Mapping[str, object]) -> AnswerBody:
        """Read the fields of a parsed answer object, as sent (nothing is checked here)."""
        data = payload.get("data")
        data = data if isinstance(data, Mapping) else {}
        return cls(
            code=payload.get("code"),
            message=payload.get("message"),
            image=data.get("image"),
            seed=data.get("seed"),
            name=payload.get("name"),
            errors=payload.get("errors"),
            request_id=payload.get("id"),
        )

    def to_json(self) -> dict:
        """Return the answer as the service sends it."""
        if self.image is not None:
            data = {"image": self.image, "seed": self.seed}
            return {"code": self.code, "message": self.message, "data": data}
        body = {"code": self.code, "message": self.message, "name": self.name, "errors": self.errors}
        if self.request_id is not None:
            body["id"] = self.request_id
        return body

    @property
    def succeeded(self) -> bool:
        """True when ``code`` says an image came back: 0, also sent as "0" or 0.0."""
        code = self.code
        if isinstance(code, str):
            return code.strip() == str(SUCCESS_CODE)
        return not isinstance(code, bool) and isinstance(code, (int, float)) and code == SUCCESS_CODE


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
    f"a side under {MIN_SIDE} px, over {MAX_PIXELS / 1e6:.1f} megapixels, or wider than {MAX_ASPECT:g}:1"
)
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
        raise InputError(
            f"{name} is {len(value)} characters long; the service accepts at most {field.max_chars}."
        )
    for position, ch in enumerate(value):
        category = unicodedata.category(ch)
        if ch not in _ALLOWED_CONTROL_CHARS and category in ("Cc", "Cs"):
            kind = "control character" if category == "Cc" else "invalid character (a lone surrogate)"
            raise InputError(
                f"{name} contains the {kind} U+{ord(ch):04X} at position {position + 1}; remove it."
            )


def _check_number(field: FormField, value: object) -> None:
    low, high = f"{field.minimum:g}", f"{field.maximum:g}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{field.name} must be a number between {low} and {high}, not {value!r}.")
    if not field.minimum <= value <= field.maximum:
        raise InputError(f"{field.name} must be between {low} and {high}; got {value}.")


def _check_integer(field: FormField, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(
            f"{field.name} must be a whole number between {field.minimum} and {field.maximum}, not {value!r}."
        )
    if not field.minimum <= value <= field.maximum:
        raise InputError(f"{field.name} must be between {field.minimum} and {field.maximum}; got {value}.")


def _check_choice(field: FormField, value: object) -> None:
    if value not in field.choices:
        raise InputError(f"{field.name} must be one of {', '.join(field.choices)}; got {value!r}.")


_CHECKS = {"text": _check_text, "number": _check_number, "integer": _check_integer, "choice": _check_choice}


def validate_prompt(prompt: str) -> None:
    """Raise InputError when the prompt is blank, over MAX_PROMPT_CHARS or holds control characters."""
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
    # strict=False: the positional values may stop early, the later fields then keep their defaults.
    validate_form({**dict(zip(FIELD_NAMES, args, strict=False)), **kwargs})


# --- the form's values -----------------------------------------------------------------------


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

    def key_fields(self) -> list[tuple[str, str]]:
        """Return the fields the store's key hashes: as the form sends them, less newer ones at default."""
        fields = []
        for field in FORM_FIELDS:
            value = getattr(self, field.name)
            if field.name not in KEY_FIELDS_V1 and value == field.default:
                continue
            text = field.form_value(value)
            if text is not None:
                fields.append((field.name, text))
        return fields

    def form_fields(self) -> list[tuple[str, str]]:
        """List the multipart form's text fields, in the contract's order; empty optionals are left out."""
        fields = []
        for field in FORM_FIELDS:
            text = field.form_value(getattr(self, field.name))
            if text is not None:
                fields.append((field.name, text))
        return fields


def _format_number(value: float) -> str:
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text
