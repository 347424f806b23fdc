"""The stand-in's answer bodies: the service's error shapes, a gateway's HTML page, scripted bodies."""

from __future__ import annotations

import json
import re
from http import HTTPStatus

from ..contract import MAX_REQUEST_BYTES, AnswerBody

# --- answer bodies -------------------------------------------------------------------

_GATEWAY_PAGE = (
    "<html>\r\n<head><title>{status} {phrase}</title></head>\r\n<body>\r\n"
    "<center><h1>{status} {phrase}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)

_DEFAULT_ERRORS: dict[int, tuple[str, str, str]] = {
    # status: (name, message, errors[0])
    200: (
        "generation_failed",
        "Generation failed, please try again.",
        "the generation did not produce an image",
    ),
    400: ("bad_request", "Invalid parameters.", "the request is invalid"),
    401: ("unauthorized", "Invalid or missing API key.", "authorization header is missing or invalid"),
    402: ("payment_required", "Insufficient credits.", "your account does not have enough credits"),
    403: (
        "content_moderation",
        "Your request was flagged by our content moderation system.",
        "the prompt or image was flagged by content moderation",
    ),
    404: ("not_found", "Not found.", "no such endpoint"),
    405: ("method_not_allowed", "Method not allowed.", "only POST is accepted"),
    413: (
        "payload_too_large",
        f"Request body is larger than {MAX_REQUEST_BYTES // 2**20} MiB.",
        f"the request must be at most {MAX_REQUEST_BYTES // 2**20} MiB",
    ),
    422: ("invalid_input", "Unsupported input.", "the input could not be processed"),
    429: ("rate_limited", "Too many requests, please slow down.", "you have exceeded the rate limit"),
    500: ("internal_error", "Internal server error.", "an unexpected error occurred"),
    503: ("service_unavailable", "Service temporarily unavailable.", "the service is overloaded"),
}


def error_payload(message: str, name: str, errors: list[str] | None = None) -> dict:
    """Build the stand-in's JSON error body: vendor ``code``/``message`` plus upstream ``name``/``errors``."""
    return AnswerBody.failure(message, name, errors).to_json()


def success_payload(image: str, seed: int) -> dict:
    """Build the JSON body of a success: the image as base64 text and the seed used."""
    return AnswerBody.success(image, seed).to_json()


def default_body(status: int) -> tuple[bytes, str]:
    """Return the body and content type the stand-in sends for `status` when a Fault gives no body."""
    if status in (204, 304) or status < 200:
        return b"", "text/plain"
    if status in (502, 504):
        # What a gateway in front of the service sends: HTML, not JSON.
        phrase = HTTPStatus(status).phrase
        return _GATEWAY_PAGE.format(status=status, phrase=phrase).encode(), "text/html"
    if status in _DEFAULT_ERRORS:
        name, message, reason = _DEFAULT_ERRORS[status]
    else:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = f"HTTP {status}"
        name = re.sub(r"[^a-z0-9]+", "_", phrase.lower()).strip("_")
        message, reason = phrase + ".", phrase.lower()
    return json_bytes(error_payload(message, name, [reason])), "application/json"


def json_bytes(payload: object) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode("utf-8")


def body_bytes(body: bytes | str | dict | list | None, status: int) -> tuple[bytes, str]:
    if body is None:
        return default_body(status)
    if isinstance(body, (dict, list)):
        return json_bytes(body), "application/json"
    if isinstance(body, str):
        return body.encode("utf-8"), "text/plain; charset=utf-8"
    data = bytes(body)
    # A guess from the first byte only: scripted bodies are often deliberately broken JSON.
    looks_json = data.lstrip()[:1] in (b"{", b"[")
    return data, "application/json" if looks_json else "application/octet-stream"
