"""StructureClient: one session, explicit timeouts, validation before I/O, typed errors, safe retries."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import re
import threading
import time
import unicodedata
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Union
from urllib.parse import urlsplit

import requests

from .config import STANDIN_HEADER, APIKey, check_key_may_travel, load_api_key, resolve_base_url
from .errors import (
    APIError,
    AuthenticationError,
    CancelledError,
    ContentModerationError,
    GenerationFailedError,
    InsufficientCreditsError,
    InvalidRequestError,
    MalformedResponseError,
    RateLimitError,
    RequestTooLargeError,
    ServiceError,
    StructureError,
    UnexpectedRedirectError,
)
from .contract import (  # noqa: F401  (the contract's names stay importable from here)
    CREDITS_PER_IMAGE,
    DEFAULT_CONTROL_STRENGTH,
    ENDPOINT_PATH,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MIN_SIDE,
    OUTPUT_FORMATS,
    StructureRequest,
    check_image_limits,
    validate_parameters,
    validate_prompt,
)
from .images import (
    ImageSize,
    decode_base64,
    decode_image,
    detect_format,
    image_header_size,
)
from .ratelimit import Pacer, PacerSlot, rate_limit_from_env, shared_pacer
from .retry import RetryPolicy, next_delay, parse_retry_after
from .store import ResultStore, StoredResult
from .transport import (  # noqa: F401  (the limits' defaults stay importable from here)
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_READ_TIMEOUT,
    MAX_RESPONSE_BYTES,
    MIN_BODY_RATE,
    Transport,
    TransportLimits,
)

log = logging.getLogger("structure_api")

# Every answer of the contract is one small JSON object (its one big value, the base64 image,
# holds no JSON punctuation). Parsing makes a Python object per value, so 60 MiB of "{}," would
# take over 1.5 GB: a body with more separators than this is not parsed at all.
MAX_JSON_SEPARATORS = 10_000


# --- request and result --------------------------------------------------------------

@dataclass(frozen=True)
class StructureResult:
    """A generated image: its pixels ``[H, W, 3]`` uint8, the raw bytes, the seed and format."""

    pixels: object  # numpy.ndarray, kept untyped so this module's signature needs no numpy import
    data: bytes
    seed: int
    format: str
    request_id: Optional[str]
    attempts: int
    credits: int = CREDITS_PER_IMAGE
    # The store's entry for this answer: hand it to ``store.mark_delivered`` once delivered.
    stored: Optional[StoredResult] = None

    def __repr__(self) -> str:
        shape = getattr(self.pixels, "shape", None)
        return f"StructureResult(seed={self.seed}, format={self.format!r}, shape={shape}, attempts={self.attempts})"


@dataclass(frozen=True)
class ProgressEvent:
    """What a request is doing now, for progress displays."""

    stage: str  # "pacing" (waiting to start, under the rate limit) | "uploading" | "waiting" | "retrying" | "done"
    attempt: int
    message: str
    delay: Optional[float] = None


ProgressCallback = Callable[[ProgressEvent], None]


# --- answer parsing ------------------------------------------------------------------

def _server_reason(payload: object) -> Optional[str]:
    """The service's own words from either error shape (vendor ``message`` or upstream ``errors``)."""
    if not isinstance(payload, dict):
        return None
    pieces: list[str] = []
    message = payload.get("message")
    if isinstance(message, str) and message.strip() and message.strip().lower() != "success":
        pieces.append(message.strip().rstrip("."))
    errors = payload.get("errors")
    if isinstance(errors, list):
        for item in errors[:5]:
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


class _Redactor:
    """Keeps the key (and runaway text) out of anything a person will read."""

    def __init__(self, key: Optional[APIKey]) -> None:
        self._secret = key.reveal() if key is not None else None

    def __call__(self, text: str, limit: int = 300) -> str:
        if self._secret and self._secret in text:
            text = text.replace(self._secret, "****")
        text = " ".join(text.split())
        text = "".join(ch for ch in text if unicodedata.category(ch) != "Cc")
        if len(text) > limit:
            text = text[: limit - 1] + "…"
        return text.rstrip(".")


def _error_for_status(
    status: int, payload: object, body: bytes, headers: Mapping[str, str], request_id: Optional[str],
    redact: _Redactor, now: float,
) -> APIError:
    reason = _server_reason(payload)
    reason = redact(reason) if reason else None
    said = f"; the service said: {reason}" if reason else ""
    if payload is None and not _is_blank(body):
        said = "; the answer was not JSON (an error page from a proxy or gateway?)"
    kwargs = dict(http_status=status, body=body, headers=headers, request_id=request_id, reason=reason)
    name = payload.get("name") if isinstance(payload, dict) else None
    moderated = name == "content_moderation" or (reason is not None and "moderat" in reason.lower())
    if moderated and status in (400, 403, 422):
        return ContentModerationError(
            f"The service refused the prompt or image on content-moderation grounds (HTTP {status}){said}; "
            "change the prompt or image.", **kwargs)
    if status in (401, 403):
        return AuthenticationError(
            f"The service rejected the API key (HTTP {status}){said}; check AITHRIVING_API_KEY or your key file.",
            **kwargs)
    if status == 402:
        return InsufficientCreditsError(
            f"Your account is out of credits (HTTP 402){said}; add credits at aithriving.com and run again.",
            **kwargs)
    if status in (400, 422):
        return InvalidRequestError(
            f"The service rejected the request (HTTP {status}){said or '; it gave no reason'}.", **kwargs)
    if status == 413:
        return RequestTooLargeError(
            f"The request is over the service's 10 MiB limit (HTTP 413){said}; use a smaller image.", **kwargs)
    if status == 429:
        retry_after = parse_retry_after(headers.get("retry-after"), now)
        # parse_retry_after never returns more than a day, so the ceiling cannot overflow.
        wait = f"wait {math.ceil(retry_after)} s" if retry_after else "wait a minute"
        return RateLimitError(
            f"The service is limiting the request rate (HTTP 429){said}; {wait} and run again, "
            "or lower AITHRIVING_RATE_LIMIT if other programs use the same key.", retry_after=retry_after, **kwargs)
    if status >= 500:
        return ServiceError(
            f"The service failed (HTTP {status}){said}; nothing was charged, try again in a few minutes.",
            **kwargs)
    return APIError(f"The service answered with an unexpected HTTP {status}{said}.", **kwargs)


# --- the client ----------------------------------------------------------------------

class StructureClient:
    """Client for ``POST /api/control/structure``; safe to share between threads."""

    def __init__(
        self,
        api_key: Union[APIKey, str, None] = None,
        base_url: Optional[str] = None,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        retry_policy: RetryPolicy = RetryPolicy(),
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
        sleep: Optional[Callable[[float], None]] = None,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        pacer: Optional[Pacer] = None,
        min_body_rate: float = MIN_BODY_RATE,
    ) -> None:
        # Configuration problems surface here, before any socket is opened.
        self.base_url = (base_url or resolve_base_url()).rstrip("/")
        key = load_api_key() if api_key is None else api_key
        key = key if isinstance(key, APIKey) else APIKey(key)
        check_key_may_travel(self.base_url)
        self.endpoint = self.base_url + ENDPOINT_PATH
        limits = TransportLimits(connect_timeout, read_timeout, max_response_bytes, min_body_rate)
        self.retry_policy = retry_policy
        self._clock = clock
        self._wall_clock = wall_clock
        self._jitter = jitter
        self._sleep = sleep
        self.pacer = pacer if pacer is not None else _default_pacer(self.endpoint, clock, sleep)
        self._redact = _Redactor(key)
        self._aborted = threading.Event()
        self._transport = Transport(key, limits, clock)

    @classmethod
    def from_env(cls, **kwargs) -> "StructureClient":
        """A client configured from AITHRIVING_API_KEY / _API_KEY_FILE / _BASE_URL."""
        return cls(**kwargs)

    def __repr__(self) -> str:
        return f"StructureClient(base_url={self.base_url!r})"

    def __enter__(self) -> "StructureClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the session and close every connection this client opened."""
        self._transport.close()

    def abort(self) -> None:
        """Cancel: break every open connection so waiting calls end now with CancelledError."""
        self._aborted.set()
        self._transport.abort()

    # -- public call -------------------------------------------------------------

    def generate(
        self,
        request: StructureRequest,
        *,
        on_progress: Optional[ProgressCallback] = None,
        cancel: Optional[threading.Event] = None,
        store: Optional[ResultStore] = None,
        label: str = "",
        decode: bool = True,
    ) -> StructureResult:
        """Send one request (retrying only when it cannot double-charge) and return the decoded result.

        With a ``store``, an answer carrying an image is kept there (under ``label``) the moment its
        bytes are read and checked, before its pixels are decoded: whatever fails later, it is not lost.
        ``decode=False`` leaves ``pixels`` None, for a caller that decodes straight into its own buffer.
        """
        request.validate()
        notify = on_progress or (lambda event: None)
        started = self._clock()
        attempt = 0
        while True:
            attempt += 1
            self._check_cancel(cancel)
            slot = self._start_slot(attempt, notify, cancel)
            notify(ProgressEvent("uploading", attempt, "uploading"))
            try:
                result = self._attempt(request, attempt, _marking_sent(notify, slot), store, label, decode)
            except StructureError as error:
                rate_limited = isinstance(error, RateLimitError)
                slot.finish(rate_limited=rate_limited)
                if self._aborted.is_set() or (cancel is not None and cancel.is_set()):
                    raise CancelledError("The request was cancelled.") from error
                streak, limited_for = self.pacer.note_rate_limited() if rate_limited else (None, 0.0)
                delay = next_delay(
                    self.retry_policy, error, attempt, self._clock() - started,
                    now=self._wall_clock(), jitter=self._jitter,
                    rate_limit_streak=streak, rate_limited_for=limited_for,
                )
                if delay is None:
                    if rate_limited:
                        self.pacer.give_up(limited_for)
                    raise
                log.info("attempt %d failed (%s); retrying in %.1f s", attempt, type(error).__name__, delay)
                notify(ProgressEvent("retrying", attempt, _retry_message(error, delay), delay))
                if rate_limited:
                    # Every request of the process waits this out in its next _start_slot, this one too.
                    self.pacer.pause(delay)
                else:
                    self._wait(delay, cancel)
                continue
            except BaseException:
                slot.finish(rate_limited=False)
                raise
            slot.finish(rate_limited=False)
            notify(ProgressEvent("done", attempt, "done"))
            return result

    # -- internals ---------------------------------------------------------------

    def _check_cancel(self, cancel: Optional[threading.Event]) -> None:
        if self._aborted.is_set() or (cancel is not None and cancel.is_set()):
            raise CancelledError("The request was cancelled.")

    def _wait(self, delay: float, cancel: Optional[threading.Event]) -> None:
        if self._sleep is not None:
            self._sleep(delay)
        else:
            # Slices, so that abort() and the caller's cancel both end the wait within a quarter second.
            until = time.monotonic() + delay
            event = cancel if cancel is not None else self._aborted
            while not self._aborted.is_set() and not event.is_set():
                left = until - time.monotonic()
                if left <= 0:
                    break
                event.wait(min(left, 0.25))
        self._check_cancel(cancel)

    def _start_slot(self, attempt: int, notify: ProgressCallback, cancel: Optional[threading.Event]) -> PacerSlot:
        """Wait for the pacer to let this attempt start (the rate limit's window, a pause after a 429)."""
        return self.pacer.acquire(
            wait=lambda seconds: self._wait(seconds, cancel),
            check_cancel=lambda: self._check_cancel(cancel),
            on_wait=lambda message, seconds: notify(ProgressEvent("pacing", attempt, message, seconds)))

    def _attempt(self, request: StructureRequest, attempt: int, notify: ProgressCallback,
                 store: Optional[ResultStore], label: str, decode: bool = True) -> StructureResult:
        response = self._transport.post(
            self.endpoint, request, attempt,
            on_sent=lambda: notify(ProgressEvent("waiting", attempt, "waiting for the service")))
        try:
            return self._parse(response, request, attempt, store, label, decode)
        finally:
            response.close()

    def _parse(self, response: requests.Response, request: StructureRequest, attempt: int,
               store: Optional[ResultStore] = None, label: str = "", decode: bool = True) -> StructureResult:
        status = response.status_code
        headers = {k.lower(): v for k, v in response.headers.items()}
        if 300 <= status < 400:
            target = urlsplit(headers.get("location", "")).hostname or "another address"
            raise UnexpectedRedirectError(
                f"The service answered with a redirect (HTTP {status}) to {target}; it was not followed, so the "
                "key was not sent there: check AITHRIVING_BASE_URL.", http_status=status, headers=headers)
        body = self._transport.read_body(response)
        separators = _json_separators(body)
        image_text: Optional[memoryview] = None
        if separators > MAX_JSON_SEPARATORS:
            payload = None
        elif status == 200:
            payload, image_text = _parse_answer(body)
        else:
            payload = _parse_json(body)
        request_id = headers.get("x-request-id") or (
            payload.get("id") if isinstance(payload, dict) and isinstance(payload.get("id"), str) else None)
        if status != 200:
            raise _error_for_status(status, payload, body, headers, request_id, self._redact, self._wall_clock())
        kwargs = dict(http_status=status, body=body, headers=headers, request_id=request_id)
        if payload is None:
            if separators > MAX_JSON_SEPARATORS:
                raise MalformedResponseError(
                    f"The service's answer was not JSON of any shape the service sends ({separators:,} separators "
                    f"where a real answer has a handful); it was not parsed and no image came back; {_MAY_BE_CHARGED}",
                    **kwargs)
            kind = "empty" if _is_blank(body) else "not JSON"
            raise MalformedResponseError(f"The service's answer was {kind}; no image came back; {_MAY_BE_CHARGED}",
                                         **kwargs)
        if not isinstance(payload, dict):
            raise MalformedResponseError(
                f"The service's answer was JSON but not an object; no image came back; {_MAY_BE_CHARGED}", **kwargs)
        code = payload.get("code")
        if code != 0:
            reason = _server_reason(payload)
            reason = self._redact(reason) if reason else None
            said = f": {reason}" if reason else " and gave no reason"
            if reason and "moderat" in reason.lower():
                raise ContentModerationError(
                    f"The service refused the prompt or image on content-moderation grounds{said}.",
                    reason=reason, **kwargs)
            raise GenerationFailedError(f"The service could not generate the image{said}.", reason=reason, **kwargs)
        data = payload.get("data")
        if not isinstance(data, dict) or not isinstance(data.get("image"), str):
            raise MalformedResponseError(
                f"The service's answer has no image in it (data.image missing); {_MAY_BE_CHARGED}", **kwargs)
        seed = self._answer_seed(data.get("seed"), request.seed)
        try:
            raw = decode_base64(image_text if image_text is not None else data["image"])
        except MalformedResponseError as error:
            raise MalformedResponseError(
                f"{error.message.rstrip('.')}; the service may have charged for it.", **kwargs) from None
        # The answer's text (the body, and the parsed copy of its base64) is not needed any more:
        # let it go before the pixels are decoded, the moment this request needs the most memory.
        del payload, data, body, image_text
        kwargs.pop("body", None)
        actual_format, answer_size = self._check_answer_image(raw, request, kwargs)
        stored = None
        if store is not None:
            aliases = ()
            if request.seed == 0 and 1 <= seed <= MAX_SEED:
                # A random-seed result also answers the same request with that seed fixed.
                aliases = (store.key_for(dataclasses.replace(request, seed=seed), self.endpoint),)
            stored = store.keep(store.key_for(request, self.endpoint), raw, seed=seed, format=actual_format,
                                label=label, aliases=aliases)
        try:
            pixels = decode_image(raw) if decode else None
        except MalformedResponseError as error:
            if stored is not None:
                store.discard(stored)  # unusable bytes would only be served again
            raise MalformedResponseError(
                f"{error.message.rstrip('.')} ({answer_size.width}x{answer_size.height} {actual_format}); the "
                "service may have charged for it.", **kwargs) from None
        if actual_format != request.output_format:
            log.warning("asked for %s, the service returned %s; using it as is", request.output_format, actual_format)
        # The local stand-in charges nothing and says so; the real service sends no such header.
        credits = 0 if STANDIN_HEADER.lower() in headers else CREDITS_PER_IMAGE
        return StructureResult(pixels=pixels, data=raw, seed=seed, format=actual_format, request_id=request_id,
                               attempts=attempt, credits=credits, stored=stored)

    def _answer_seed(self, value: object, requested: int) -> int:
        """The seed the answer reports; a missing or odd one (null, text, negative) costs the image nothing."""
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_SEED:
            return value
        if isinstance(value, str) and value.strip().isdigit() and int(value) <= MAX_SEED:
            return int(value)
        log.info("the service's answer reports the seed as %.40r; using %d (the request's) instead", value, requested)
        return requested

    def _check_answer_image(self, raw: bytes, request: StructureRequest, kwargs: dict) -> tuple[str, ImageSize]:
        """The answer's format and declared size, refusing what is not an image near the request's size."""
        try:
            size = image_header_size(raw)
        except MalformedResponseError as error:
            raise MalformedResponseError(
                f"{error.message.rstrip('.')}; the service may have charged for it, but there is nothing to keep.",
                **kwargs) from None
        sent = request.image.size
        if not _near_size(size, sent):
            raise MalformedResponseError(
                f"The service returned a {size.width}x{size.height} image for a {sent.width}x{sent.height} request, "
                "far from the size it produces; the service may have charged for it, but it was not used.",
                **kwargs)
        return detect_format(raw) or request.output_format, size


def _near_size(answer: ImageSize, sent: ImageSize) -> bool:
    """True when an answer's size is the request's up to rounding (the service works in multiples of 64)."""
    if answer.width < MIN_SIDE or answer.height < MIN_SIDE:
        return False
    return all(abs(got - want) <= max(MIN_SIDE, want // 8)
               for got, want in ((answer.width, sent.width), (answer.height, sent.height)))


def _default_pacer(endpoint: str, clock: Callable[[], float], sleep: Optional[Callable[[float], None]]) -> Pacer:
    """The process's pacer for ``endpoint``; a client on injected time gets one of its own."""
    limit = rate_limit_from_env()
    if sleep is None and clock is time.monotonic:
        return shared_pacer(endpoint, limit)
    # A client on injected time (tests) cannot share the process's real-time window;
    # with real waits its pacer keeps real time whatever the client's clock says.
    return Pacer(limit, clock=clock if sleep is not None else time.monotonic)


def _marking_sent(notify: ProgressCallback, slot: PacerSlot) -> ProgressCallback:
    """``notify``, also telling the pacer when the upload is out (the "waiting" event)."""
    def relay(event: ProgressEvent) -> None:
        if event.stage == "waiting":
            slot.sent()
        notify(event)
    return relay


# Every failure of an HTTP 200 answer after the upload: nobody can tell whether it was billed.
_MAY_BE_CHARGED = "the service may have charged for it (HTTP 200), so the request was not sent again."


def _is_blank(body: bytes) -> bool:
    # isspace() scans without copying; strip() would copy a body of up to 64 MiB.
    return not body or body.isspace()


def _json_separators(body: bytes) -> int:
    """Commas, colons and opening brackets: at least the number of values JSON parsing would create, less one."""
    # One pass deleting the four from 256 KiB slices takes half the time of four count() passes
    # over a body of up to 64 MiB, and holds one slice at a time.
    kept = 0
    for start in range(0, len(body), _SCAN_SLICE_BYTES):
        kept += len(body[start:start + _SCAN_SLICE_BYTES].translate(None, b",:[{"))
    return len(body) - kept


_SCAN_SLICE_BYTES = 256 * 1024


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


def _parse_answer(body: bytes) -> tuple[object, Optional[memoryview]]:
    """A success answer parsed without a text copy of its image: (payload, the base64 bytes or None).

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


def _retry_message(error: StructureError, delay: float) -> str:
    if isinstance(error, RateLimitError):
        return f"rate limited; retrying in {delay:.0f} s"
    if error.http_status:
        return f"service error {error.http_status}; retrying in {delay:.0f} s"
    return f"connection failed; retrying in {delay:.0f} s"
