"""StructureClient: one session, explicit timeouts, validation before I/O, typed errors, safe retries.

The client is HTTP plus typed errors: retries, pacing, progress and cancel. Under it, ``transport.py``
sends the upload and reads the body (the one place transport exceptions become ours), and
``answers.py`` reads the answer in steps. It returns the checked, undecoded answer and knows nothing
of the result store: ``paid.py`` keeps each answer there, in the same thread, before it is decoded.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import requests
from urllib3.connection import HTTPConnection

from ._constants import DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT, MAX_RESPONSE_BYTES, MIN_BODY_RATE
from .answers import ImageAnswer, Redactor, image_answer, refuse_redirect
from .answers import StructureResult as StructureResult  # importable from here too
from .config import APIKey, check_base_url, check_key_may_travel, load_api_key, resolve_base_url
from .contract import (  # noqa: F401  (the contract's names stay importable from here)
    CREDITS_PER_IMAGE,
    DEFAULT_CONTROL_STRENGTH,
    ENDPOINT_PATH,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MIN_SIDE,
    OUTPUT_FORMATS,
    validate_params,
    validate_prompt,
)
from .errors import CancelledError, RateLimitError, StructureError
from .ratebudget import budget_name, make_book
from .ratelimit import Pacer, PacerSlot, rate_limit_from_env, shared_pacer
from .request import StructureRequest, check_image_limits  # noqa: F401  (importable from here too)
from .retry import RetryPolicy, next_delay
from .transport import Transport, TransportLimits

log = logging.getLogger("structure_api")
# One shared default: RetryPolicy is frozen.
DEFAULT_RETRY_POLICY = RetryPolicy()


@dataclass(frozen=True)
class ProgressEvent:
    """What a request is doing now, for progress displays."""

    # "pacing" (waiting to start, under the rate limit) | "uploading" | "waiting" | "retrying" | "done"
    stage: str
    attempt: int
    message: str
    delay: float | None = None


ProgressCallback = Callable[[ProgressEvent], None]


class StructureClient:
    """Client for ``POST /api/control/structure``; safe to share between threads."""

    def __init__(
        self,
        api_key: APIKey | str | None = None,
        base_url: str | None = None,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        retry_policy: RetryPolicy = DEFAULT_RETRY_POLICY,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
        sleep: Callable[[float], None] | None = None,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        pacer: Pacer | None = None,
        min_body_rate: float = MIN_BODY_RATE,
    ) -> None:
        # Configuration problems surface here, before any socket is opened.
        # Checked as AITHRIVING_BASE_URL is: a port out of range fails here, not after five retries.
        self.base_url = check_base_url(base_url) if base_url else resolve_base_url()
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
        self.pacer = pacer if pacer is not None else _default_pacer(self.endpoint, key, clock, sleep)
        self._redact = Redactor(key)
        self._aborted = threading.Event()
        self._transport = Transport(key, limits, clock)

    @classmethod
    def from_env(cls, **kwargs) -> StructureClient:
        """Build a client configured from AITHRIVING_API_KEY / _API_KEY_FILE / _BASE_URL."""
        return cls(**kwargs)

    def __repr__(self) -> str:
        return f"StructureClient(base_url={self.base_url!r})"

    def __enter__(self) -> StructureClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def limits(self) -> TransportLimits:
        """The timeouts, the answer's size cap and the minimum rate its body must arrive at."""
        return self._transport.limits

    @property
    def session(self) -> requests.Session:
        """The one ``requests.Session`` this client sends through: for proxies, certificates, extra headers.

        The key is never in it as text: it is added to each request by the session's ``auth``, whose
        repr hides it. Mounting another adapter loses what the client's own gives: a cancel that breaks
        a waiting connection, and the deadline for the answer's headers.
        """
        return self._transport.session

    @property
    def connections(self) -> tuple[HTTPConnection, ...]:
        """The HTTP connections this client opened that are still alive (pooled or in use), a snapshot.

        For diagnostics, such as checking that requests reuse one keep-alive connection; ``close()``
        closes them, ``abort()`` breaks them.
        """
        return tuple(self._transport.connections)

    def close(self) -> None:
        """Release the session and close every connection this client opened."""
        self._transport.close()

    def abort(self) -> None:
        """Cancel: break every open connection so waiting calls end now with CancelledError."""
        self._aborted.set()
        self._transport.abort()

    def stop_uploads(self) -> None:
        """Stop the uploads still going out (free to stop); requests whose upload is complete carry on.

        Pair it with the ``cancel`` event of each call, which stops pacer waits and retries.
        """
        self._transport.stop_uploads()

    # -- public call -------------------------------------------------------------

    def generate(
        self,
        request: StructureRequest,
        *,
        on_progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        **removed: object,
    ) -> ImageAnswer:
        """Send one request (retried only when it cannot double-charge); return the checked, undecoded answer.

        Nothing here keeps the answer: to keep every paid image in the result store before it is
        decoded, go through ``structure_api.paid.fetch_or_pay``. A MalformedResponseError whose
        ``answer`` is set carries an image the service sent but that is not fit to use.
        """
        if removed:
            raise TypeError(
                f"StructureClient.generate() no longer takes {', '.join(sorted(removed))}: keeping paid "
                "results is structure_api.paid.fetch_or_pay(client, request, store, label=...)'s job."
            )
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
                answer = self._attempt(request, attempt, _marking_sent(notify, slot))
            except StructureError as error:
                slot.finish(rate_limited=isinstance(error, RateLimitError))
                if self._cancelled(cancel):
                    raise CancelledError("The request was cancelled.") from error
                delay = self._retry_delay(error, attempt, started)
                if delay is None:
                    raise
                self._wait_to_retry(error, attempt, delay, notify, cancel)
                continue
            except BaseException:
                slot.finish(rate_limited=False)
                raise
            slot.finish(rate_limited=False)
            notify(ProgressEvent("done", attempt, "done"))
            return answer

    # -- internals ---------------------------------------------------------------

    def _cancelled(self, cancel: threading.Event | None) -> bool:
        return self._aborted.is_set() or (cancel is not None and cancel.is_set())

    def _check_cancel(self, cancel: threading.Event | None) -> None:
        if self._cancelled(cancel):
            raise CancelledError("The request was cancelled.")

    def _retry_delay(self, error: StructureError, attempt: int, started: float) -> float | None:
        """How long to wait before the next attempt, or None to give up (the retry policy decides)."""
        rate_limited = isinstance(error, RateLimitError)
        streak, limited_for = self.pacer.note_rate_limited() if rate_limited else (None, 0.0)
        delay = next_delay(
            self.retry_policy,
            error,
            attempt,
            self._clock() - started,
            now=self._wall_clock(),
            jitter=self._jitter,
            rate_limit_streak=streak,
            rate_limited_for=limited_for,
        )
        if delay is None and rate_limited:
            self.pacer.give_up(limited_for)
        return delay

    def _wait_to_retry(
        self,
        error: StructureError,
        attempt: int,
        delay: float,
        notify: ProgressCallback,
        cancel: threading.Event | None,
    ) -> None:
        log.info("attempt %d failed (%s); retrying in %.1f s", attempt, type(error).__name__, delay)
        notify(ProgressEvent("retrying", attempt, _retry_message(error, delay), delay))
        if isinstance(error, RateLimitError):
            # Every request of the process waits this out in its next _start_slot, this one too.
            self.pacer.pause(delay)
        else:
            self._wait(delay, cancel)

    def _wait(self, delay: float, cancel: threading.Event | None) -> None:
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

    def _start_slot(
        self, attempt: int, notify: ProgressCallback, cancel: threading.Event | None
    ) -> PacerSlot:
        """Wait for the pacer to let this attempt start (the rate limit's window, a pause after a 429)."""
        return self.pacer.acquire(
            wait=lambda seconds: self._wait(seconds, cancel),
            check_cancel=lambda: self._check_cancel(cancel),
            on_wait=lambda message, seconds: notify(ProgressEvent("pacing", attempt, message, seconds)),
        )

    def _attempt(self, request: StructureRequest, attempt: int, notify: ProgressCallback) -> ImageAnswer:
        response = self._transport.post(
            self.endpoint,
            request,
            attempt,
            on_sent=lambda: notify(ProgressEvent("waiting", attempt, "waiting for the service")),
        )
        try:
            return self._parse(response, request, attempt)
        finally:
            response.close()

    def _parse(self, response: requests.Response, request: StructureRequest, attempt: int) -> ImageAnswer:
        """Check the answer in steps (``answers.py``): return its image's bytes undecoded, or raise."""
        status = response.status_code
        headers = {k.lower(): v for k, v in response.headers.items()}
        refuse_redirect(status, headers)
        # The body goes straight into the call, so nothing holds it once the image's bytes are out of
        # it: the pixels are decoded later, the moment a request needs the most memory, without it.
        return image_answer(
            status,
            headers,
            self._transport.read_body(response),
            request,
            self._redact,
            self._wall_clock(),
            attempt,
        )


def _default_pacer(
    endpoint: str, key: APIKey, clock: Callable[[], float], sleep: Callable[[float], None] | None
) -> Pacer:
    """Return the process's pacer for ``endpoint`` and ``key``, drawing from the budget other processes share
    (``ratebudget.py``); a client on injected time gets one of its own."""
    limit = rate_limit_from_env()
    if sleep is None and clock is time.monotonic:
        return shared_pacer(endpoint, limit, budget_name(key, endpoint), lambda: make_book(key, endpoint))
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


def _retry_message(error: StructureError, delay: float) -> str:
    if isinstance(error, RateLimitError):
        return f"rate limited; retrying in {delay:.0f} s"
    if error.http_status:
        return f"service error {error.http_status}; retrying in {delay:.0f} s"
    return f"connection failed; retrying in {delay:.0f} s"
