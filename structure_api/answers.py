"""The service's answer, read in named steps: redirect, JSON, status, shape, seed, image; pure parsing.

Nothing here keeps or stores anything: ``image_answer`` returns the checked, undecoded image (or
raises the error the answer stands for, carrying any image it held), and ``paid.py`` keeps it in the
result store before anything decodes it. HTTP itself (sending, reading the body) is ``transport.py``'s.
The reader is tolerant where a field is cosmetic (an odd seed, ``"code": "0"``, URL-safe base64, a
BOM, a raw image body, any 2xx): an image that can be used is never thrown away for its wrapping.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from . import errors
from .config import APIKey
from .contract import CREDITS_PER_IMAGE, MAX_REQUEST_BYTES, MAX_SEED, MIN_SIDE, STANDIN_HEADER, AnswerBody
from .images import ImageSize, decode_base64, decode_image, detect_format, image_header_size
from .request import StructureRequest
from .retry import parse_retry_after

log = logging.getLogger("structure_api")

# Every answer of the contract is one small JSON object (its one big value, the base64 image,
# holds no JSON punctuation). Parsing makes a Python object per value, so 60 MiB of "{}," would
# take over 1.5 GB: a body with more separators than this is not parsed at all.
MAX_JSON_SEPARATORS = 10_000
# The longest seed text worth reading: MAX_SEED has 10 digits (int() refuses over 4300 anyway).
_MAX_SEED_DIGITS = 12
_BOM = b"\xef\xbb\xbf"


def _may_be_charged(status: int) -> str:
    """Return the clause ending every failure of a 2xx answer: nobody can tell whether it was billed."""
    return f"the service may have charged for it (HTTP {status}), so the request was not sent again."


@dataclass(frozen=True)
class StructureResult:
    """A generated image: its pixels ``[H, W, 3]`` uint8, the raw bytes, the seed and format."""

    pixels: object  # numpy.ndarray, kept untyped so this module's signature needs no numpy import
    data: bytes
    seed: int
    format: str
    request_id: str | None
    attempts: int
    credits: int = CREDITS_PER_IMAGE
    # The result store's entry (a store.StoredResult): delivered or released through paid.PaidResult.
    stored: object = None

    def __repr__(self) -> str:
        shape = getattr(self.pixels, "shape", None)
        return (
            f"StructureResult(seed={self.seed}, format={self.format!r}, shape={shape}, "
            f"attempts={self.attempts})"
        )


@dataclass(frozen=True)
class ImageAnswer:
    """A 2xx answer's image: its bytes checked to be an image near the request's size, not decoded.

    ``seed`` is the one the service reports; when it reported none that can be read, the request's
    (0: unknown) and ``seed_known`` is False. ``pixels`` decodes the image on first use.
    """

    data: bytes
    seed: int
    format: str
    size: ImageSize
    request_id: str | None
    credits: int
    attempts: int = 1
    seed_known: bool = True
    http_status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def raw(self) -> bytes:
        """The image file's bytes as the service sent them (``data``)."""
        return self.data

    @functools.cached_property
    def pixels(self) -> object:
        """Decode the image to ``[H, W, 3]`` uint8 on first use (MalformedResponseError if it cannot)."""
        return decode_answer(self)

    def error_fields(self) -> dict:
        """Collect what an error about this answer carries: its status, headers and request id."""
        return dict(http_status=self.http_status, headers=self.headers, request_id=self.request_id)


class Redactor:
    """Keeps the key (and runaway text) out of anything a person will read."""

    def __init__(self, key: APIKey | None) -> None:
        self._secret = key.reveal() if key is not None else None

    def __repr__(self) -> str:
        return "Redactor('****')"

    def __call__(self, text: str, limit: int = 300) -> str:
        if self._secret and self._secret in text:
            text = text.replace(self._secret, "****")
        text = " ".join(text.split())
        text = "".join(ch for ch in text if unicodedata.category(ch) != "Cc")
        if len(text) > limit:
            text = text[: limit - 1] + "…"
        return text.rstrip(".")


# --- the steps, in the order they run ----------------------------------------------------


def refuse_redirect(status: int, headers: Mapping[str, str]) -> None:
    """Refuse a redirect: following it would send the key to wherever it points."""
    if 300 <= status < 400:
        target = urlsplit(headers.get("location", "")).hostname or "another address"
        raise errors.UnexpectedRedirectError(
            f"The service answered with a redirect (HTTP {status}) to {target}; it was not followed, so the "
            "key was not sent there: check AITHRIVING_BASE_URL.",
            http_status=status,
            headers=headers,
        )


def image_answer(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    request: StructureRequest,
    redact: Redactor,
    now: float,
    attempt: int = 1,
) -> ImageAnswer:
    """Return the answer's image bytes, checked, or raise the error the answer stands for.

    ``headers`` are lower-cased; ``now`` is the wall clock, for a Retry-After date. An image that is
    not fit to use (far from the request's size) comes back on the error's ``answer``, to be kept.
    Once this returns, the body is no longer needed: the caller passes it straight in, so nothing
    holds it while the pixels are decoded, the moment a request needs the most memory.
    """
    if body[:3] == _BOM:
        body = body[3:]  # a BOM before the JSON says nothing about the answer
    success = 200 <= status < 300
    fields = dict(http_status=status, body=body, headers=headers, request_id=headers.get("x-request-id"))
    if success and detect_format(body) is not None:
        # An image file's bytes, not JSON (whatever the Content-Type says): it has no seed to report.
        raw, seed, seed_known = bytes(body), request.seed, False
        log.info(
            "the service answered with a raw %s body (%s); its seed is unknown",
            detect_format(body),
            headers.get("content-type", "no Content-Type"),
        )
    else:
        separators = _json_separators(body)
        payload, image_text = _payload(success, body, separators)
        answer = AnswerBody.from_json(payload) if isinstance(payload, dict) else None
        if fields["request_id"] is None and answer is not None and isinstance(answer.request_id, str):
            fields["request_id"] = answer.request_id
        if not success:
            raise error_for_status(status, payload, body, headers, fields["request_id"], redact, now)
        _check_image_answer(payload, answer, separators, redact, fields)
        seed, seed_known = _answer_seed(answer.seed, request.seed)
        try:
            raw = decode_base64(image_text if image_text is not None else answer.image)
        except errors.MalformedResponseError as error:
            raise errors.MalformedResponseError(
                f"{error.message.rstrip('.')}; the service may have charged for it (HTTP {status}).", **fields
            ) from None
        # The answer's text (the body, and the parsed copy of its base64) is not needed any more.
        del payload, answer, image_text
    del body
    fields.pop("body", None)
    actual_format, size = _check_answer_image(raw, request, fields)
    # The stand-in charges nothing and says so; the real service sends no such header.
    credits = 0 if STANDIN_HEADER.lower() in headers else CREDITS_PER_IMAGE
    answer = ImageAnswer(
        data=raw,
        seed=seed,
        format=actual_format,
        size=size,
        request_id=fields["request_id"],
        credits=credits,
        attempts=attempt,
        seed_known=seed_known,
        http_status=status,
        headers=headers,
    )
    if actual_format != request.output_format:
        log.warning(
            "asked for %s, the service returned %s; using it as is", request.output_format, actual_format
        )
    sent = request.image.size
    if not _near_size(size, sent):
        raise errors.MalformedResponseError(
            f"The service returned a {size.width}x{size.height} image for a {sent.width}x{sent.height} "
            "request, far from the size it produces; the service may have charged for it, but it was not "
            "used.",
            answer=answer,
            **fields,
        )
    return answer


def decode_answer(answer: ImageAnswer) -> object:
    """Decode the answer's pixels, ``[H, W, 3]`` uint8; a MalformedResponseError says it may be charged."""
    try:
        return decode_image(answer.data)
    except errors.MalformedResponseError as error:
        raise errors.MalformedResponseError(
            f"{error.message.rstrip('.')} ({answer.size.width}x{answer.size.height} {answer.format}); the "
            "service may have charged for it.",
            **answer.error_fields(),
        ) from None


def _payload(success: bool, body: bytes, separators: int) -> tuple[object, memoryview | None]:
    """Parse the answer's JSON (None: not JSON, or too many values) and cut a success's base64 out."""
    if separators > MAX_JSON_SEPARATORS:
        return None, None
    if success:
        return _parse_answer(body)
    return _parse_json(body), None


def _check_image_answer(
    payload: object, answer: AnswerBody | None, separators: int, redact: Redactor, fields: dict
) -> None:
    """Raise the error a success answer's shape or ``code`` stands for, unless it holds an image to read."""
    status = fields["http_status"]
    if payload is None:
        if separators > MAX_JSON_SEPARATORS:
            raise errors.MalformedResponseError(
                f"The service's answer was not JSON of any shape the service sends ({separators:,} "
                "separators where a real answer has a handful); it was not parsed and no image came back; "
                f"{_may_be_charged(status)}",
                **fields,
            )
        kind = "empty" if _is_blank(fields["body"]) else "not JSON"
        raise errors.MalformedResponseError(
            f"The service's answer was {kind}; no image came back; {_may_be_charged(status)}", **fields
        )
    if answer is None:
        raise errors.MalformedResponseError(
            f"The service's answer was JSON but not an object; no image came back; {_may_be_charged(status)}",
            **fields,
        )
    has_image = isinstance(answer.image, str)
    numeric_code = isinstance(answer.code, (int, float)) and not isinstance(answer.code, bool)
    if not answer.succeeded and (numeric_code or not has_image):
        reason = _server_reason(payload)
        reason = redact(reason) if reason else None
        said = f": {reason}" if reason else " and gave no reason"
        if _mentions_moderation(reason):
            raise errors.ContentModerationError(
                f"The service refused the prompt or image on content-moderation grounds{said}.",
                reason=reason,
                **fields,
            )
        raise errors.GenerationFailedError(
            f"The service could not generate the image{said}.", reason=reason, **fields
        )
    if not answer.succeeded:
        log.info("the service's answer holds an image under the code %.40r; reading the image", answer.code)
    if not has_image:
        raise errors.MalformedResponseError(
            f"The service's answer has no image in it (data.image missing); {_may_be_charged(status)}",
            **fields,
        )


def _answer_seed(value: object, requested: int) -> tuple[int, bool]:
    """Return the seed the answer reports and True; for a missing or odd one (null, "²", 5000 digits),
    the request's and False.

    A seed is cosmetic: it never costs the image. The request's seed stands in (0: unknown).
    """
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_SEED:
        return value, True
    if isinstance(value, str):
        text = value.strip()
        if 0 < len(text) <= _MAX_SEED_DIGITS and text.isascii() and text.isdigit() and int(text) <= MAX_SEED:
            return int(text), True
    known = f"using {requested} (the request's) instead" if requested else "the seed is unknown"
    log.info("the service's answer reports the seed as %.40r; %s", value, known)
    return requested, False


def _check_answer_image(raw: bytes, request: StructureRequest, fields: dict) -> tuple[str, ImageSize]:
    """Read the answer's format and declared size, refusing what is not an image."""
    try:
        size = image_header_size(raw)
    except errors.MalformedResponseError as error:
        raise errors.MalformedResponseError(
            f"{error.message.rstrip('.')}; the service may have charged for it "
            f"(HTTP {fields['http_status']}), but there is nothing to keep.",
            **fields,
        ) from None
    return detect_format(raw) or request.output_format, size


def _near_size(answer: ImageSize, sent: ImageSize) -> bool:
    """Tell whether an answer's size is the request's up to rounding (the service rounds to 64)."""
    if answer.width < MIN_SIDE or answer.height < MIN_SIDE:
        return False
    return all(
        abs(got - want) <= max(MIN_SIDE, want // 8)
        for got, want in ((answer.width, sent.width), (answer.height, sent.height))
    )


# --- error answers: HTTP status -> error class and sentence ----------------------------

# Each sentence is filled in with {status}, {said} (the service's words, or a note that the answer
# was not JSON), {gave} ({said}, or that it gave no reason) and, for 429, {wait}.
_STATUS_ERRORS: dict[int, tuple[type[errors.APIError], str]] = {
    400: (errors.InvalidRequestError, "The service rejected the request (HTTP {status}){gave}."),
    401: (
        errors.AuthenticationError,
        "The service rejected the API key (HTTP {status}){said}; check AITHRIVING_API_KEY or your key file.",
    ),
    402: (
        errors.InsufficientCreditsError,
        "Your account is out of credits (HTTP 402){said}; add credits at aithriving.com and run again.",
    ),
    413: (
        errors.RequestTooLargeError,
        f"The request is over the service's {MAX_REQUEST_BYTES // 2**20} MiB limit (HTTP 413){{said}}; "
        "use a smaller image.",
    ),
    429: (
        errors.RateLimitError,
        "The service is limiting the request rate (HTTP 429){said}; {wait} and run again, "
        "or lower AITHRIVING_RATE_LIMIT if other programs use the same key.",
    ),
}
_STATUS_ERRORS[403] = _STATUS_ERRORS[401]
_STATUS_ERRORS[422] = _STATUS_ERRORS[400]
# A moderation refusal comes as one of these; it wins over what the status alone would mean.
_MODERATION_STATUSES = (400, 403, 422)
_MODERATED = (
    errors.ContentModerationError,
    "The service refused the prompt or image on content-moderation grounds (HTTP {status}){said}; "
    "change the prompt or image.",
)
_SERVER_FAILED = (
    errors.ServiceError,
    "The service failed (HTTP {status}){said}; nothing was charged, try again in a few minutes.",
)
_UNEXPECTED = (errors.APIError, "The service answered with an unexpected HTTP {status}{said}.")


def error_for_status(
    status: int,
    payload: object,
    body: bytes,
    headers: Mapping[str, str],
    request_id: str | None,
    redact: Redactor,
    now: float,
) -> errors.APIError:
    """Build the error an answer with an error status stands for, with its sentence from the table."""
    reason = _server_reason(payload)
    reason = redact(reason) if reason else None
    said = f"; the service said: {reason}" if reason else ""
    if payload is None and not _is_blank(body):
        said = "; the answer was not JSON (an error page from a proxy or gateway?)"
    name = payload.get("name") if isinstance(payload, dict) else None
    if (name == "content_moderation" or _mentions_moderation(reason)) and status in _MODERATION_STATUSES:
        kind, sentence = _MODERATED
    else:
        kind, sentence = _STATUS_ERRORS.get(status) or (_SERVER_FAILED if status >= 500 else _UNEXPECTED)
    words = dict(status=status, said=said, gave=said or "; it gave no reason")
    extra = {}
    if kind is errors.RateLimitError:
        retry_after = parse_retry_after(headers.get("retry-after"), now)
        # parse_retry_after never returns more than a day, so the ceiling cannot overflow.
        words["wait"] = f"wait {math.ceil(retry_after)} s" if retry_after else "wait a minute"
        extra["retry_after"] = retry_after
    return kind(
        sentence.format(**words),
        http_status=status,
        body=body,
        headers=headers,
        request_id=request_id,
        reason=reason,
        **extra,
    )


def _mentions_moderation(reason: str | None) -> bool:
    return reason is not None and "moderat" in reason.lower()


def _server_reason(payload: object) -> str | None:
    """Return the service's own words from either error shape (vendor ``message`` or upstream ``errors``)."""
    if not isinstance(payload, dict):
        return None
    pieces: list[str] = []
    message = payload.get("message")
    if isinstance(message, str) and message.strip() and message.strip().lower() != "success":
        pieces.append(message.strip().rstrip("."))
    errors_list = payload.get("errors")
    if isinstance(errors_list, list):
        for item in errors_list[:5]:
            if isinstance(item, str) and item.strip().rstrip(".") and item.strip().rstrip(".") not in pieces:
                pieces.append(item.strip().rstrip("."))
    if not pieces:
        for key in ("error", "detail", "name"):
            value = payload.get(key)
            if isinstance(value, str) and value.strip():
                pieces.append(value.strip())
                break
    if not pieces:
        return None
    return "; ".join(pieces)


# --- JSON without needless copies ----------------------------------------------------------


def _is_blank(body: bytes) -> bool:
    # isspace() scans without copying; strip() would copy a body of up to 64 MiB.
    return not body or body.isspace()


_SCAN_SLICE_BYTES = 256 * 1024


def _json_separators(body: bytes) -> int:
    """Count commas, colons and opening brackets: at least the values JSON parsing would create, less one."""
    # One pass deleting the four from 256 KiB slices takes half the time of four count() passes
    # over a body of up to 64 MiB, and holds one slice at a time.
    kept = 0
    for start in range(0, len(body), _SCAN_SLICE_BYTES):
        kept += len(body[start : start + _SCAN_SLICE_BYTES].translate(None, b",:[{"))
    return len(body) - kept


_JSON_CONTAINER_START = re.compile(rb"[ \t\r\n]*[\[{]")


def _parse_json(body: bytes) -> object:
    # json.loads decodes the whole body to text before it looks at it; a body that cannot be an
    # object or array (an HTML page, plain text) is not worth that copy.
    if _is_blank(body) or not _JSON_CONTAINER_START.match(body):
        return None
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


_IMAGE_VALUE_START = re.compile(rb'"image"[ \t\r\n]*:[ \t\r\n]*"')


def _parse_answer(body: bytes) -> tuple[object, memoryview | None]:
    """Parse a success answer without a text copy of its image: return (payload, the base64 bytes or None).

    json.loads would turn the base64 (a third larger than the image) into a str of the same size;
    instead the value is cut out of the body, the small rest parsed, and the base64 decoded straight
    from the body. Anything unusual (an escape in the value, more than one image key, a rest that
    is not the expected shape) takes the plain json path.
    """
    match = _IMAGE_VALUE_START.search(body)
    if match is not None and _IMAGE_VALUE_START.search(body, match.end()) is None:
        start = match.end()
        end = body.find(b'"', start)
        if end > start and body.find(b"\\", start, end) < 0:
            rest = _parse_json(body[:start] + body[end:])
            data = rest.get("data") if isinstance(rest, dict) else None
            if isinstance(data, dict) and data.get("image") == "":
                return rest, memoryview(body)[start:end]
    return _parse_json(body), None
