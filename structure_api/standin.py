"""A local stand-in for the Structure endpoint: same contract, generated images, scriptable faults.

It serves ``POST /api/control/structure`` on loopback so workflows can be tried offline without
spending credits, and so tests can talk real HTTP to something that can also misbehave on cue
(``StandInServer.script``). The images it returns are not AI generations: they are the input's
edge map painted in two colours derived from the prompt and seed, so the structure is visibly kept.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import io
import ipaddress
import json
import logging
import math
import random
import re
import secrets
import socket
import socketserver
import threading
import time
import uuid
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesHeaderParser
from email import policy as email_policy
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterable, Optional, Union
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

from .contract import (  # noqa: F401  (ENDPOINT_PATH and CREDITS_PER_IMAGE stay importable from here)
    CREDITS_PER_IMAGE,
    DEFAULT_CONTROL_STRENGTH,
    DEFAULT_OUTPUT_FORMAT,
    ENDPOINT_PATH,
    MAX_ASPECT,
    MAX_CONTROL_STRENGTH,
    MAX_PIXELS,
    MAX_PROMPT_CHARS,
    MAX_REQUEST_BYTES,
    MAX_SEED,
    MIN_CONTROL_STRENGTH,
    MIN_PIXELS,
    MIN_SIDE,
    OUTPUT_FORMATS,
    UPLOAD_FORMATS,
)
from .ratelimit import RateLimit
from .standin_ratelimit import UpstreamRateLimit

__all__ = ["Fault", "RecordedRequest", "StandInServer", "serve", "ENDPOINT_PATH", "FAULT_KINDS"]

log = logging.getLogger("structure_api.standin")

HEALTH_PATHS = ("/", "/health")
# A free stand-in marks every answer with this header (config.STANDIN_HEADER, kept in step by a test): the
# client then counts its results as 0 credits, so nothing shown for a free image claims credits were spent.
STANDIN_HEADER = "X-AIThriving-Stand-In"
STANDIN_HEADER_VALUE = "free"
# An over-limit body up to this size is read and thrown away so the client sees the 413 on a
# healthy connection; beyond it the connection is closed instead of reading the rest.
_DRAIN_LIMIT = 32 * 1024 * 1024
# Scripted faults read bodies up to this size (tests of oversized uploads), then stop reading.
_FAULT_READ_LIMIT = 64 * 1024 * 1024
# How long stop() waits for handler threads; hung and delayed handlers wake at once on stop.
_JOIN_TIMEOUT = 2.0
# Idle keep-alive connections are closed after this long, so `serve` does not pile up threads.
_IDLE_TIMEOUT = 300.0

# The faults a fault_rate draw picks from: retryable statuses or a failed generation.
FAULT_KINDS = ("429", "500", "502", "503", "504", "code-1")

_ACTIONS = ("respond", "drop", "drop_before_read", "truncate", "hang", "stream")
_WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


@dataclass
class Fault:
    """One scripted answer, used for the next request instead of the normal behaviour."""

    status: int = 200
    body: Union[bytes, str, dict, None] = None  # dict -> JSON; None -> default body for the status
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering (after reading the request)
    # "respond" | "drop" (close after reading the request, no answer) | "drop_before_read" (close
    # before reading the body) | "truncate" (announce the full Content-Length, send half, close)
    # | "hang" (read the request, never answer until the server stops) | "stream" (send
    # body_chunks() chunked, or raw under a Content-Length given in headers)
    action: str = "respond"
    body_chunks: Optional[Callable[[], Iterable[bytes]]] = None  # for action="stream"
    passthrough: bool = False  # answer normally (generate the image), but after `delay`

    def __post_init__(self) -> None:
        if self.action not in _ACTIONS:
            raise ValueError(f"Fault action must be one of {', '.join(_ACTIONS)}; got {self.action!r}.")
        if not 100 <= int(self.status) <= 599:
            raise ValueError(f"Fault status must be an HTTP status 100..599; got {self.status!r}.")
        if self.delay < 0 or not math.isfinite(self.delay):
            raise ValueError(f"Fault delay must be a finite number of seconds >= 0; got {self.delay!r}.")

    @property
    def label(self) -> str:
        """What RecordedRequest.fault says for this fault."""
        if self.passthrough:
            return "passthrough"
        return str(self.status) if self.action == "respond" else self.action


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the stand-in saw it, and the status it answered with (0 if it never answered)."""

    method: str
    path: str  # the request target as sent, query string included
    headers: dict[str, str]  # names lower-cased
    fields: dict[str, str]  # text form fields
    image_bytes: Optional[bytes]
    image_filename: Optional[str]
    image_content_type: Optional[str]
    body_size: int  # bytes of body actually read
    received_at: float  # time.monotonic() when the request head had been read
    status: int
    fault: Optional[str] = None  # "503", "code-1", "drop", "passthrough", ... or None for normal behaviour


@dataclass
class _Entry:
    """The mutable record of a request in flight; snapshots turn it into a RecordedRequest."""

    method: str
    path: str
    headers: dict[str, str]
    received_at: float
    fault: Optional[str]
    fields: dict[str, str] = field(default_factory=dict)
    image_bytes: Optional[bytes] = None
    image_filename: Optional[str] = None
    image_content_type: Optional[str] = None
    body_size: int = 0
    status: int = 0

    def freeze(self) -> RecordedRequest:
        return RecordedRequest(
            method=self.method, path=self.path, headers=dict(self.headers), fields=dict(self.fields),
            image_bytes=self.image_bytes, image_filename=self.image_filename,
            image_content_type=self.image_content_type, body_size=self.body_size,
            received_at=self.received_at, status=self.status, fault=self.fault)


class _BadRequest(Exception):
    """A request the stand-in answers with 400 and this reason."""


# --- answer bodies -------------------------------------------------------------------

_GATEWAY_PAGE = (
    "<html>\r\n<head><title>{status} {phrase}</title></head>\r\n<body>\r\n"
    "<center><h1>{status} {phrase}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)

_DEFAULT_ERRORS: dict[int, tuple[str, str, str]] = {
    # status: (name, message, errors[0])
    200: ("generation_failed", "Generation failed, please try again.", "the generation did not produce an image"),
    400: ("bad_request", "Invalid parameters.", "the request is invalid"),
    401: ("unauthorized", "Invalid or missing API key.", "authorization header is missing or invalid"),
    402: ("payment_required", "Insufficient credits.", "your account does not have enough credits"),
    403: ("content_moderation", "Your request was flagged by our content moderation system.",
          "the prompt or image was flagged by content moderation"),
    404: ("not_found", "Not found.", "no such endpoint"),
    405: ("method_not_allowed", "Method not allowed.", "only POST is accepted"),
    413: ("payload_too_large", f"Request body is larger than {MAX_REQUEST_BYTES // 2**20} MiB.",
          f"the request must be at most {MAX_REQUEST_BYTES // 2**20} MiB"),
    422: ("invalid_input", "Unsupported input.", "the input could not be processed"),
    429: ("rate_limited", "Too many requests, please slow down.", "you have exceeded the rate limit"),
    500: ("internal_error", "Internal server error.", "an unexpected error occurred"),
    503: ("service_unavailable", "Service temporarily unavailable.", "the service is overloaded"),
}


def error_payload(message: str, name: str, errors: Optional[list[str]] = None) -> dict:
    """The JSON error body the stand-in uses: vendor ``code``/``message`` plus upstream ``name``/``errors``."""
    return {"code": -1, "message": message, "name": name, "errors": errors if errors is not None else [message]}


def default_body(status: int) -> tuple[bytes, str]:
    """The body and content type the stand-in sends for `status` when a Fault gives no body."""
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
    return _json_bytes(error_payload(message, name, [reason])), "application/json"


def _json_bytes(payload: object) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode("utf-8")


def _body_bytes(body: Union[bytes, str, dict, list, None], status: int) -> tuple[bytes, str]:
    if body is None:
        return default_body(status)
    if isinstance(body, (dict, list)):
        return _json_bytes(body), "application/json"
    if isinstance(body, str):
        return body.encode("utf-8"), "text/plain; charset=utf-8"
    data = bytes(body)
    # A guess from the first byte only: scripted bodies are often deliberately broken JSON.
    looks_json = data.lstrip()[:1] in (b"{", b"[")
    return data, "application/json" if looks_json else "application/octet-stream"


# --- multipart parsing ---------------------------------------------------------------

@dataclass
class _Form:
    fields: dict[str, str]
    undecodable: list[str]  # text fields that were not UTF-8
    image_bytes: Optional[bytes]
    image_filename: Optional[str]
    image_content_type: Optional[str]


def _header_params(value: str) -> Message:
    message = Message()
    message["content-type"] = value
    return message


def parse_multipart(body: bytes, content_type: str) -> _Form:
    """Split a multipart/form-data body; raise _BadRequest when it is not one."""
    header = _header_params(content_type or "")
    if header.get_content_type() != "multipart/form-data":
        raise _BadRequest("content-type: must be multipart/form-data")
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not 1 <= len(boundary) <= 200:
        raise _BadRequest("content-type: multipart/form-data needs a boundary")
    delimiter = b"--" + boundary.encode("latin-1", "replace")
    form = _Form({}, [], None, None, None)
    position = body.find(delimiter)
    if position < 0:
        raise _BadRequest("body: malformed multipart/form-data (no boundary found)")
    head_parser = BytesHeaderParser(policy=email_policy.HTTP)
    while True:
        position += len(delimiter)
        if body[position:position + 2] == b"--":
            return form
        line_end = body.find(b"\r\n", position)
        if line_end < 0:
            raise _BadRequest("body: malformed multipart/form-data (truncated)")
        start = line_end + 2
        end = body.find(b"\r\n" + delimiter, start)
        if end < 0:
            raise _BadRequest("body: malformed multipart/form-data (missing closing boundary)")
        head_end = body.find(b"\r\n\r\n", start, end + 2)
        if head_end < 0:
            raise _BadRequest("body: malformed multipart/form-data (part without headers)")
        part_head = head_parser.parsebytes(body[start:head_end + 4])
        content = body[head_end + 4:end]
        _add_part(form, part_head, content)
        position = end + 2


def _add_part(form: _Form, head: Message, content: bytes) -> None:
    name = head.get_param("name", header="content-disposition")
    if not isinstance(name, str):
        return
    filename = head.get_filename()
    if name == "image":
        if form.image_bytes is None:
            form.image_bytes = content
            form.image_filename = filename
            form.image_content_type = head.get("content-type")
        return
    if filename is not None or name in form.fields:
        return  # other file parts are ignored; for repeated fields the first one counts
    try:
        form.fields[name] = content.decode("utf-8")
    except UnicodeDecodeError:
        form.fields[name] = content.decode("utf-8", "replace")
        form.undecodable.append(name)


# --- validation ------------------------------------------------------------------------

@dataclass(frozen=True)
class _Job:
    pixels: Image.Image
    prompt: str
    negative_prompt: str
    control_strength: float
    seed: int  # 0 = pick one
    output_format: str


_SEED_TEXT = re.compile(r"[0-9]{1,10}")


def validate_form(form: _Form) -> _Job:
    """The checks the service makes, in a fixed order; raise _BadRequest naming the first failing field."""
    for name in form.undecodable:
        raise _BadRequest(f"{name}: must be UTF-8 text")
    prompt = form.fields.get("prompt")
    if prompt is None:
        raise _BadRequest("prompt: is required")
    if not 1 <= len(prompt) <= MAX_PROMPT_CHARS:
        raise _BadRequest(f"prompt: must be 1 to {MAX_PROMPT_CHARS} characters")
    strength_text = form.fields.get("control_strength")
    control_strength = DEFAULT_CONTROL_STRENGTH
    if strength_text is not None:
        try:
            control_strength = float(strength_text.strip())
        except ValueError:
            control_strength = math.nan
        if not (math.isfinite(control_strength) and MIN_CONTROL_STRENGTH <= control_strength <= MAX_CONTROL_STRENGTH):
            raise _BadRequest(f"control_strength: must be a number between {MIN_CONTROL_STRENGTH:g} and "
                              f"{MAX_CONTROL_STRENGTH:g}")
    negative_prompt = form.fields.get("negative_prompt", "")
    if len(negative_prompt) > MAX_PROMPT_CHARS:
        raise _BadRequest(f"negative_prompt: must be at most {MAX_PROMPT_CHARS} characters")
    seed_text = form.fields.get("seed")
    seed = 0
    if seed_text is not None:
        seed_text = seed_text.strip()
        if not _SEED_TEXT.fullmatch(seed_text) or int(seed_text) > MAX_SEED:
            raise _BadRequest(f"seed: must be an integer between 0 and {MAX_SEED}")
        seed = int(seed_text)
    output_format = form.fields.get("output_format", DEFAULT_OUTPUT_FORMAT)
    if output_format not in OUTPUT_FORMATS:
        # Upstream lists the formats alphabetically.
        raise _BadRequest(f"output_format: must be one of {', '.join(sorted(OUTPUT_FORMATS))}")
    if form.image_bytes is None:
        raise _BadRequest("image: is required")
    pixels = decode_upload(form.image_bytes)
    return _Job(pixels, prompt, negative_prompt, control_strength, seed, output_format)


def decode_upload(data: bytes) -> Image.Image:
    """Open an uploaded image, checking the limits from its header before any pixel is decoded."""
    if not data:
        raise _BadRequest("image: is empty")
    try:
        # Only the header is read here; the size check below runs before load(), so a small file
        # announcing a huge canvas (a decompression bomb) is refused without decoding it.
        image = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
    except Image.DecompressionBombError:
        raise _BadRequest(f"image: must have {MIN_PIXELS} to {MAX_PIXELS} pixels") from None
    except Exception:
        raise _BadRequest("image: could not be decoded as PNG, JPEG or WebP") from None
    width, height = image.size
    if width < MIN_SIDE or height < MIN_SIDE:
        raise _BadRequest(f"image: every side must be at least {MIN_SIDE} pixels (got {width}x{height})")
    if not MIN_PIXELS <= width * height <= MAX_PIXELS:
        raise _BadRequest(f"image: must have {MIN_PIXELS} to {MAX_PIXELS} pixels (got {width * height})")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise _BadRequest(f"image: aspect ratio must be between 1:{MAX_ASPECT:g} and {MAX_ASPECT:g}:1 "
                          f"(got {width}x{height})")
    try:
        image.load()
    except Exception:
        raise _BadRequest("image: could not be decoded (damaged or truncated file)") from None
    return image


# --- the generated image ---------------------------------------------------------------

def _hsv_to_rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    sector = (hue % 1.0) * 6.0
    index = int(sector) % 6
    fraction = sector - int(sector)
    p = value * (1 - saturation)
    q = value * (1 - saturation * fraction)
    t = value * (1 - saturation * (1 - fraction))
    rgb = [(value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q)][index]
    return np.array(rgb, dtype=np.float32)


def edge_map(luminance: np.ndarray) -> np.ndarray:
    """Gradient magnitude of a ``[H, W]`` float image in 0..1 (central differences), same shape."""
    gx = np.zeros_like(luminance)
    gy = np.zeros_like(luminance)
    gx[:, 1:-1] = luminance[:, 2:] - luminance[:, :-2]
    gy[1:-1, :] = luminance[2:, :] - luminance[:-2, :]
    return np.sqrt(gx * gx + gy * gy)


def structure_edges(image: Image.Image) -> np.ndarray:
    """The input's structure as ``[H, W]`` float32 in 0..1: the strongest colour-channel gradient, thickened."""
    rgb = np.asarray(image.convert("RGB"))
    strongest = None
    for channel in range(3):
        magnitude = edge_map(rgb[:, :, channel].astype(np.float32) * np.float32(1 / 255))
        strongest = magnitude if strongest is None else np.maximum(strongest, magnitude, out=strongest)
    # A step between 0 and 1 gives a central difference of 1; 0.3 already counts as a full edge.
    # Gradients under 0.08 (sensor noise and JPEG ringing; the max over channels and the dilation
    # below both raise the noise floor) are dropped so flat areas stay flat.
    strongest -= np.float32(0.08)
    edges = np.clip(strongest * np.float32(1 / 0.22), 0, 1)
    # One pixel of dilation, so outlines stay visible when a large output is viewed scaled down.
    thick = edges.copy()
    np.maximum(thick[1:, :], edges[:-1, :], out=thick[1:, :])
    np.maximum(thick[:-1, :], edges[1:, :], out=thick[:-1, :])
    np.maximum(thick[:, 1:], edges[:, :-1], out=thick[:, 1:])
    np.maximum(thick[:, :-1], edges[:, 1:], out=thick[:, :-1])
    return thick


def render_structure(
    image: Image.Image, prompt: str, negative_prompt: str, control_strength: float, seed: int, output_format: str
) -> bytes:
    """The stand-in's "generation": the input's edges in prompt/seed colours, encoded in `output_format`.

    Deterministic for its arguments; the output has the input's width and height.
    """
    edges = structure_edges(image)
    luminance = np.asarray(image.convert("L"), dtype=np.float32) * np.float32(1 / 255)
    height, width = luminance.shape

    digest = hashlib.sha256(f"{prompt}\x00{seed}".encode("utf-8", "surrogatepass")).digest()
    hue = int.from_bytes(digest[0:2], "big") / 65536
    if negative_prompt:
        shift = hashlib.sha256(negative_prompt.encode("utf-8", "surrogatepass")).digest()
        hue += (shift[0] / 255 - 0.5) * 0.1  # a slight hue shift, at most +-0.05
    background = _hsv_to_rgb(hue, 0.5 + digest[2] / 255 * 0.4, 0.15 + digest[3] / 255 * 0.2)
    foreground = _hsv_to_rgb(hue + 0.5, 0.3 + digest[4] / 255 * 0.4, 0.85 + digest[5] / 255 * 0.15)

    # The seed's own "texture": one slow diagonal wave, so low control_strength looks like a new image.
    fx = 0.5 + digest[6] / 255 * 2.5
    fy = 0.5 + digest[7] / 255 * 2.5
    phase = digest[8] / 255 * 2 * math.pi
    xs = np.sin(2 * math.pi * fx * np.arange(width, dtype=np.float32) / width + phase)
    ys = np.cos(2 * math.pi * fy * np.arange(height, dtype=np.float32) / height)
    texture = 0.25 + 0.25 * (0.5 * ys[:, None] + 0.5 * xs[None, :])  # 0 .. 0.5

    strength = np.float32(control_strength)
    # Everything taken from the input scales with strength: at 1 the edges reach the foreground
    # colour (full contrast) over a faint shading of the input; at 0 only the seed's texture is left.
    weight = strength * (edges + np.float32(0.25) * luminance) + (np.float32(1) - strength) * texture
    levels = np.clip(weight * 255 + 0.5, 0, 255).astype(np.uint8)
    ramp = np.linspace(0.0, 1.0, 256, dtype=np.float32)[:, None]
    palette = np.clip((background + (foreground - background) * ramp) * 255 + 0.5, 0, 255).astype(np.uint8)
    output = Image.fromarray(palette[levels], mode="RGB")

    buffer = io.BytesIO()
    if output_format == "jpeg":
        output.save(buffer, format="JPEG", quality=90)
    elif output_format == "webp":
        output.save(buffer, format="WEBP", quality=90, method=2)
    else:
        output.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


# --- the HTTP side -----------------------------------------------------------------------

class _Stopped(Exception):
    """The server is stopping while this handler waited; the connection is dropped."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "StructureStandIn/1.0"
    timeout = _IDLE_TIMEOUT
    disable_nagle_algorithm = True  # header and body go out as two writes; no delayed-ACK stalls
    server: "_HTTPServer"

    # Every method goes through one place; routing and 405s are decided there.
    def do_GET(self) -> None:
        self._exchange()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        # Only the request line and status reach the log, never headers (the key lives there).
        log.debug("%s %s", self.address_string(), format % args)

    def log_request(self, code: object = "-", size: object = "-") -> None:
        log.info("%s %s -> %s", self.command, urlsplit(self.path).path, getattr(code, "value", code))

    # --- one request -------------------------------------------------------------------

    def _exchange(self) -> None:
        owner = self.server.standin
        received_at = time.monotonic()
        self._declared_too_large = False
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        route = urlsplit(self.path).path
        is_health = self.command in ("GET", "HEAD") and route in HEALTH_PATHS
        fault: Optional[Fault] = None
        if not is_health:
            fault = owner._take_fault(api_call=(self.command == "POST" and route == ENDPOINT_PATH))
        entry = _Entry(self.command, self.path, headers, received_at, fault.label if fault else None)

        try:
            if fault is not None and fault.action == "drop_before_read":
                owner._record(entry)
                self._drop()
                return
            limit = _FAULT_READ_LIMIT if fault is not None and not fault.passthrough else _DRAIN_LIMIT
            body = self._read_body(limit)
            entry.body_size = len(body) if body is not None else 0
            form: Union[_Form, _BadRequest, None] = None
            if body is not None and headers.get("content-type", "").lower().startswith("multipart/"):
                try:
                    form = parse_multipart(body, headers["content-type"])
                except _BadRequest as problem:
                    form = problem
                if isinstance(form, _Form):
                    entry.fields = dict(form.fields)
                    entry.image_bytes = form.image_bytes
                    entry.image_filename = form.image_filename
                    entry.image_content_type = form.image_content_type
            owner._record(entry)

            if fault is not None and not fault.passthrough:
                self._play(fault, entry)
                return
            if is_health:
                self._send(entry, 200, _json_bytes({"status": "ok"}), "application/json")
                return
            if owner.rate_limit is not None and self.command == "POST" and route == ENDPOINT_PATH \
                    and not owner.rate_limit.admit():
                # Over the limit or locked out: 429 at once, no Retry-After, nothing charged (as upstream).
                body_bytes, content_type = default_body(429)
                self._send(entry, 429, body_bytes, content_type, {"x-request-id": uuid.uuid4().hex})
                return
            try:
                status, payload, extra = owner._answer(self.command, route, headers, body, form)
            except Exception:
                log.exception("the stand-in failed to answer %s %s", self.command, route)
                status, payload, extra = 500, error_payload(
                    "Internal server error.", "internal_error", ["the stand-in failed; see its log"]), {}
            extra.setdefault("x-request-id", uuid.uuid4().hex)
            if fault is not None:
                extra.update(fault.headers)
            self._wait(owner.latency + (fault.delay if fault is not None else 0.0))
            if status == 200 and payload.get("code") == 0:
                owner._charge()
            self._send(entry, status, _json_bytes(payload), "application/json", extra)
        except _Stopped:
            self._drop()

    def _read_body(self, limit: int) -> Optional[bytes]:
        """The whole request body, or None (and the connection marked for closing) when over `limit`."""
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            return self._read_chunked(limit)
        declared = self.headers.get("content-length")
        if declared is None:
            return b""
        if not declared.strip().isdigit():
            self.close_connection = True
            return b""
        size = int(declared)
        if size > limit:
            self.close_connection = True
            self._declared_too_large = True
            return None
        data = self.rfile.read(size)
        if len(data) < size:
            raise _Stopped  # the client went away mid-upload; nobody is left to answer
        return data

    def _read_chunked(self, limit: int) -> Optional[bytes]:
        parts: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1024)
            if not line:
                raise _Stopped
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                return b"".join(parts)
            if size == 0:
                while self.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            total += size
            if total > limit:
                self.close_connection = True
                self._declared_too_large = True
                return None
            parts.append(self.rfile.read(size))
            self.rfile.readline(8)

    def _wait(self, seconds: float) -> None:
        if seconds > 0 and self.server.standin._stopping.wait(seconds):
            raise _Stopped

    def _drop(self) -> None:
        """Close the connection without an answer."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _send(
        self, entry: _Entry, status: int, body: bytes, content_type: str,
        headers: Optional[dict[str, str]] = None, *, announced_length: Optional[int] = None,
    ) -> None:
        """Write one answer: status, merged headers (the caller's win), a correct Content-Length, body."""
        merged = {"Content-Type": content_type, "Content-Length": str(len(body) if announced_length is None
                                                                       else announced_length)}
        if self.server.standin.free:
            merged[STANDIN_HEADER] = STANDIN_HEADER_VALUE
        for name, value in (headers or {}).items():
            for existing in [k for k in merged if k.lower() == name.lower()]:
                del merged[existing]
            merged[name] = value
        length = next((v for k, v in merged.items() if k.lower() == "content-length"), None)
        if length != str(len(body)) or getattr(self, "_declared_too_large", False):
            self.close_connection = True  # the framing is off on purpose, or the body was not read
        if self.close_connection:
            merged["Connection"] = "close"
        entry.status = status
        self.send_response(status)
        for name, value in merged.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD" and status not in (204, 304):
            self.wfile.write(body)

    def _play(self, fault: Fault, entry: _Entry) -> None:
        """Answer with a scripted fault instead of the normal behaviour."""
        if fault.action in ("drop", "hang"):
            if fault.action == "hang":
                self.server.standin._stopping.wait()
            else:
                self._wait(fault.delay)
            self._drop()
            return
        self._wait(fault.delay)
        if fault.action == "stream":
            self._stream(fault, entry)
            return
        body, content_type = _body_bytes(fault.body, fault.status)
        if fault.action == "truncate":
            self.close_connection = True
            self._send(entry, fault.status, body[: len(body) // 2], content_type, fault.headers,
                       announced_length=len(body))
            self._drop()
            return
        self._send(entry, fault.status, body, content_type, fault.headers)

    def _stream(self, fault: Fault, entry: _Entry) -> None:
        if fault.body_chunks is not None:
            chunks: Iterable[bytes] = fault.body_chunks()
        elif fault.body is None or isinstance(fault.body, (bytes, str, dict)):
            chunks = [_body_bytes(fault.body, fault.status)[0]]
        else:
            chunks = fault.body
        names = {name.lower() for name in fault.headers}
        chunked = "content-length" not in names
        self.close_connection = True
        entry.status = fault.status
        self.send_response(fault.status)
        if "content-type" not in names:
            self.send_header("Content-Type", "application/json")
        if self.server.standin.free and STANDIN_HEADER.lower() not in names:
            self.send_header(STANDIN_HEADER, STANDIN_HEADER_VALUE)
        for name, value in fault.headers.items():
            self.send_header(name, value)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        stopping = self.server.standin._stopping
        try:
            for chunk in chunks:
                if stopping.is_set():
                    break
                if not chunk:
                    continue
                if chunked:
                    self.wfile.write(b"%x\r\n" % len(chunk) + bytes(chunk) + b"\r\n")
                else:
                    self.wfile.write(bytes(chunk))
            else:
                if chunked:
                    self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass  # the client stopped reading, as a careful client should
        finally:
            close = getattr(chunks, "close", None)
            if callable(close):
                close()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # threads are tracked and joined by StandInServer.stop instead
    request_queue_size = 128
    allow_reuse_address = True

    def __init__(self, address: tuple, standin: "StandInServer", family: int) -> None:
        self.address_family = family
        self.standin = standin
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn), which can stall for seconds.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[0], self.server_address[1]

    def process_request(self, request: socket.socket, client_address: tuple) -> None:
        owner = self.standin
        with owner._lock:
            if owner._stopping.is_set():
                self.shutdown_request(request)
                return
            thread = threading.Thread(
                target=self._serve_connection, args=(request, client_address),
                name=f"standin-{self.server_port}-conn", daemon=True)
            owner._threads.add(thread)
            owner._connections.add(request)
        thread.start()

    def _serve_connection(self, request: socket.socket, client_address: tuple) -> None:
        owner = self.standin
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            with owner._lock:
                # Removed before closing, so stop() never shuts down a closed (reused) descriptor.
                owner._connections.discard(request)
            self.shutdown_request(request)
            with owner._lock:
                owner._threads.discard(threading.current_thread())

    def handle_error(self, request: object, client_address: object) -> None:
        import sys

        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError, _Stopped)) or self.standin._stopping.is_set():
            log.debug("connection from %s ended: %r", client_address, error)
        else:
            log.exception("stand-in handler failed for %s", client_address)


# --- the public server -----------------------------------------------------------------

def _check_host(host: str) -> int:
    bare = host.strip("[]")
    if host in _WILDCARD_HOSTS:
        raise ValueError(
            f"The stand-in does not listen on all interfaces ({host!r}); give a specific address such as 127.0.0.1.")
    try:
        return socket.AF_INET6 if ipaddress.ip_address(bare).version == 6 else socket.AF_INET
    except ValueError:
        return socket.AF_INET  # a host name such as "localhost"


class StandInServer:
    """The stand-in on a background thread: ``with StandInServer() as server: ... server.url``."""

    def __init__(
        self, *, api_key: Optional[str] = None, host: str = "127.0.0.1", port: int = 0,
        latency: float = 0.0, fault_rate: float = 0.0, fault_seed: int = 0, max_records: Optional[int] = None,
        free: bool = False,
        rate_limit: Union[RateLimit, str, UpstreamRateLimit, None] = None, lockout: float = 60.0,
    ) -> None:
        """Bind to host:port at once (port 0 picks a free one); start() begins answering.

        free marks every answer as free of charge (STANDIN_HEADER), as `serve`, `--local` and the
        node's offline mode want; without it the stand-in plays the paid service, as billing tests want.

        max_records keeps only the newest N recorded requests (each holds its upload, up to
        10 MiB); None keeps all, as tests want, 0 keeps none, as a long-running `serve` wants.
        rate_limit (such as "150/10") and lockout model the upstream's limit: past it, 429s
        without Retry-After for ``lockout`` seconds, never charged (``rate_limit.refused`` counts them).
        """
        if latency < 0 or not math.isfinite(latency):
            raise ValueError(f"latency must be a finite number of seconds >= 0; got {latency!r}.")
        if not 0.0 <= fault_rate <= 1.0:
            raise ValueError(f"fault_rate must be between 0 and 1; got {fault_rate!r}.")
        if api_key is not None and not api_key:
            raise ValueError("api_key must be a non-empty string, or None for no key check.")
        family = _check_host(host)
        self._api_key = api_key.encode("utf-8") if api_key is not None else None
        self.free = bool(free)
        self.latency = float(latency)
        self.fault_rate = float(fault_rate)
        if rate_limit is None or isinstance(rate_limit, UpstreamRateLimit):
            self.rate_limit = rate_limit
        else:
            self.rate_limit = UpstreamRateLimit(rate_limit, lockout)
        self._random = random.Random(fault_seed)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._faults: collections.deque[Fault] = collections.deque()
        if max_records is not None and max_records < 0:
            raise ValueError(f"max_records must be >= 0 or None; got {max_records!r}.")
        self._max_records = max_records
        self._records: collections.deque[_Entry] = collections.deque(maxlen=max_records)
        self._credits = 0
        self._threads: set[threading.Thread] = set()
        self._connections: set[socket.socket] = set()
        self._serve_thread: Optional[threading.Thread] = None
        self._stopped = False
        # Bound here, so url and port are known before start(); start() begins answering.
        self._httpd = _HTTPServer((host.strip("[]"), port), self, family)
        self.port: int = self._httpd.server_address[1]
        bound = self._httpd.server_address[0]
        self.host: str = bound
        self.url: str = f"http://[{bound}]:{self.port}" if family == socket.AF_INET6 else f"http://{bound}:{self.port}"

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else ("running" if self._serve_thread else "bound")
        return f"StandInServer(url={self.url!r}, {state}, key={'required' if self._api_key else 'none'})"

    @property
    def endpoint(self) -> str:
        """The full URL of the Structure endpoint on this server."""
        return self.url + ENDPOINT_PATH

    def start(self) -> "StandInServer":
        """Serve in a background daemon thread; returns self."""
        with self._lock:
            if self._stopped:
                raise RuntimeError("This stand-in was stopped; create a new StandInServer.")
            if self._serve_thread is None:
                self._serve_thread = threading.Thread(
                    target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                    name=f"standin-{self.port}-accept", daemon=True)
                self._serve_thread.start()
        return self

    def stop(self) -> None:
        """Stop answering, drop open connections, wake hung handlers and join every thread; idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._stopping.set()
            serve_thread = self._serve_thread
        if serve_thread is not None:
            self._httpd.shutdown()
            serve_thread.join(_JOIN_TIMEOUT)
        self._httpd.server_close()
        with self._lock:
            for connection in list(self._connections):
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            threads = list(self._threads)
        deadline = time.monotonic() + _JOIN_TIMEOUT
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        leftover = [thread.name for thread in threads if thread.is_alive()]
        if leftover:
            log.warning("stand-in stopped with %d handler thread(s) still running", len(leftover))

    def __enter__(self) -> "StandInServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def script(self, *faults: Fault) -> None:
        """Queue faults: the next requests answer with them in order, then normal behaviour resumes."""
        for fault in faults:
            if not isinstance(fault, Fault):
                raise TypeError(f"script() takes Fault objects, not {type(fault).__name__}.")
        with self._lock:
            self._faults.extend(faults)

    @property
    def pending_faults(self) -> int:
        """How many scripted faults have not been used yet."""
        with self._lock:
            return len(self._faults)

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request so far (health checks included), in arrival order; see max_records."""
        with self._lock:
            return [entry.freeze() for entry in self._records]

    def clear(self) -> None:
        """Forget recorded requests and queued faults (credits_spent is kept)."""
        with self._lock:
            self._records = collections.deque(maxlen=self._max_records)
            self._faults.clear()

    @property
    def credits_spent(self) -> int:
        """What the real service would have charged: CREDITS_PER_IMAGE per successful generation."""
        with self._lock:
            return self._credits

    # --- used by the handler -------------------------------------------------------------

    def _take_fault(self, *, api_call: bool) -> Optional[Fault]:
        with self._lock:
            if self._faults:
                return self._faults.popleft()
            if not api_call or self.fault_rate <= 0 or self._random.random() >= self.fault_rate:
                return None
            kind = self._random.choice(FAULT_KINDS)
        return _random_fault(kind)

    def _record(self, entry: _Entry) -> None:
        with self._lock:
            self._records.append(entry)

    def _charge(self) -> None:
        with self._lock:
            self._credits += CREDITS_PER_IMAGE

    def _answer(
        self, method: str, route: str, headers: dict[str, str], body: Optional[bytes],
        form: Union[_Form, _BadRequest, None],
    ) -> tuple[int, dict, dict[str, str]]:
        """The normal behaviour: (status, JSON payload, extra headers)."""
        if route != ENDPOINT_PATH:
            return 404, error_payload("Not found.", "not_found", [f"{route}: no such endpoint"]), {}
        if method != "POST":
            return 405, error_payload("Method not allowed.", "method_not_allowed",
                                      [f"{method}: only POST is accepted"]), {"Allow": "POST"}
        if self._api_key is not None:
            # http.server decodes header bytes as latin-1; encoding back gives the bytes as sent.
            given = headers.get("authorization", "").encode("latin-1", "replace")
            if not hmac.compare_digest(given, self._api_key):
                return 401, error_payload("Invalid or missing API key.", "unauthorized",
                                          ["authorization header is missing or invalid"]), {}
        if body is None or len(body) > MAX_REQUEST_BYTES:
            return 413, error_payload(f"Request body is larger than {MAX_REQUEST_BYTES // 2**20} MiB.",
                                      "payload_too_large", [f"body: must be at most {MAX_REQUEST_BYTES} bytes"]), {}
        try:
            if form is None:
                raise _BadRequest("content-type: must be multipart/form-data")
            if isinstance(form, _BadRequest):
                raise form
            job = validate_form(form)
        except _BadRequest as problem:
            reason = str(problem)
            return 400, error_payload(reason, "bad_request", [reason]), {}
        seed = job.seed or secrets.randbelow(MAX_SEED) + 1
        image = render_structure(job.pixels, job.prompt, job.negative_prompt, job.control_strength, seed,
                                 job.output_format)
        encoded = base64.b64encode(image).decode("ascii")
        return 200, {"code": 0, "message": "success", "data": {"image": encoded, "seed": seed}}, {}


def _random_fault(kind: str) -> Fault:
    if kind == "429":
        return _Labelled(status=429, headers={"Retry-After": "0"}, label_text=kind)
    if kind == "code-1":
        return _Labelled(status=200, body=error_payload(
            "Generation failed, please try again.", "generation_failed",
            ["the generation did not produce an image"]), label_text=kind)
    return _Labelled(status=int(kind), label_text=kind)


@dataclass
class _Labelled(Fault):
    """A fault drawn by fault_rate; records its kind ("503", "code-1") as the label."""

    label_text: str = ""

    @property
    def label(self) -> str:
        return self.label_text


def serve(
    host: str = "127.0.0.1", port: int = 0, api_key: Optional[str] = None, latency: float = 0.0,
    ready: Optional[Callable[[str], None]] = None, rate_limit: Union[RateLimit, str, None] = None,
    lockout: float = 60.0,
) -> "StandInServer":
    """Run the stand-in until interrupted (Ctrl-C); calls ready(url) once it is listening; returns it, stopped."""
    # Nobody reads the records of a long-running stand-in, and each would hold an upload.
    server = StandInServer(api_key=api_key, host=host, port=port, latency=latency, max_records=0, free=True,
                           rate_limit=rate_limit, lockout=lockout)
    try:
        server.start()
        if ready is not None:
            ready(server.url)
        while not server._stopping.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return server
