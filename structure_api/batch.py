"""Run many requests with bounded concurrency: results by index, cache first, cancel at once."""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, Optional

from .cache import ResultCache, cache_key
from .client import ProgressEvent, StructureClient, StructureRequest, StructureResult
from .errors import (
    AuthenticationError,
    BatchError,
    CancelledError,
    ConfigurationError,
    InsufficientCreditsError,
    StructureError,
)
from .images import decode_image

ENV_MAX_CONCURRENCY = "AITHRIVING_MAX_CONCURRENCY"
DEFAULT_MAX_CONCURRENCY = 4
# Errors that every later request would hit as well: stop sending rather than pile them up.
_FATAL_FOR_BATCH = (AuthenticationError, InsufficientCreditsError, ConfigurationError)


def max_concurrency_from_env(default: int = DEFAULT_MAX_CONCURRENCY) -> int:
    """AITHRIVING_MAX_CONCURRENCY as a number from 1 to 32, else ``default``."""
    value = os.environ.get(ENV_MAX_CONCURRENCY, "").strip()
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        raise ConfigurationError(f"{ENV_MAX_CONCURRENCY} must be a whole number from 1 to 32; got {value!r}.") from None
    if not 1 <= number <= 32:
        raise ConfigurationError(f"{ENV_MAX_CONCURRENCY} must be from 1 to 32; got {number}.")
    return number


@dataclass(frozen=True)
class BatchProgress:
    """A snapshot for progress displays."""

    done: int
    total: int
    credits: int
    message: str
    index: Optional[int] = None


@dataclass
class BatchReport:
    """What happened to each image of a batch."""

    total: int
    seeds: dict[int, int] = field(default_factory=dict)
    failures: dict[int, StructureError] = field(default_factory=dict)
    from_cache: set[int] = field(default_factory=set)
    credits: int = 0
    cancelled: bool = False

    @property
    def done(self) -> int:
        return len(self.seeds)

    def raise_for_failures(self, noun: str = "image", *, resumable: bool = False) -> None:
        """Raise one BatchError naming each failed item (1-based) and why.

        ``resumable``: the paid results are in the cache under a fixed seed, so say that a re-run
        pays only for the failed items.
        """
        if not self.failures:
            return
        if self.total == 1:
            error = next(iter(self.failures.values()))
            raise error
        items = sorted(self.failures.items())
        shown = "; ".join(f"{noun} {index + 1}: {str(error).rstrip('.')}" for index, error in items[:5])
        more = f"; and {len(items) - 5} more" if len(items) > 5 else ""
        paid = ""
        if self.done:
            again = "; they are cached, so a re-run with the same seed pays only for the failed ones" if resumable else ""
            paid = f" ({self.done} succeeded, {self.credits} credits spent{again})"
        raise BatchError(f"{len(items)} of {self.total} {noun}s failed{paid}: {shown}{more}",
                         failures=self.failures)


def generate_with_cache(
    client: StructureClient,
    request: StructureRequest,
    cache: Optional[ResultCache],
    *,
    on_progress: Optional[Callable[[ProgressEvent], None]] = None,
    cancel: Optional[threading.Event] = None,
) -> tuple[StructureResult, bool]:
    """A fixed-seed request already paid for comes from the cache; returns (result, from_cache)."""
    request.validate()
    if cache is not None and request.seed != 0:
        key = cache_key(request.image.data, request.form_fields(), client.endpoint)
        hit = cache.get(key)
        if hit is not None:
            try:
                pixels = decode_image(hit.data)
            except StructureError:
                pixels = None
            if pixels is not None:
                return StructureResult(pixels=pixels, data=hit.data, seed=hit.seed, format=hit.format,
                                       request_id=None, attempts=0, credits=0), True
    result = client.generate(request, on_progress=on_progress, cancel=cancel)
    if cache is not None:
        # Stored under the seed actually used, so re-running a random-seed result with that
        # seed fixed costs nothing; a request with seed 0 is never looked up.
        paid_for = dataclasses.replace(request, seed=result.seed)
        key = cache_key(paid_for.image.data, paid_for.form_fields(), client.endpoint)
        cache.put(key, result.data, result.seed, result.format)
    return result, False


def run_batch(
    client: StructureClient,
    count: int,
    make_request: Callable[[int], StructureRequest],
    *,
    on_result: Callable[[int, StructureResult], None],
    cache: Optional[ResultCache] = None,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    on_progress: Optional[Callable[[BatchProgress], None]] = None,
    should_cancel: Optional[Callable[[], bool]] = None,
    poll_interval: float = 0.1,
) -> BatchReport:
    """Run ``count`` requests, at most ``max_concurrency`` at once, and report each by index.

    ``make_request(i)`` builds request i in the worker (so at most ``max_concurrency``
    encoded images exist at once); ``on_result(i, result)`` runs in the worker as each
    finishes (so results can go straight into an output buffer); ``on_progress`` is
    called on the caller's thread. ``should_cancel`` is
    polled every ``poll_interval`` s; when it returns True, open connections are closed
    and the call returns with ``cancelled`` set.
    """
    report = BatchReport(total=count)
    lock = threading.Lock()
    cancel = threading.Event()
    stop_sending: list[StructureError] = []
    # Workers queue progress; the caller's thread delivers it, because UI hooks (ComfyUI's
    # progress bar, terminal output) expect to be called from the thread that runs the job.
    progress_queue: "queue.SimpleQueue[BatchProgress]" = queue.SimpleQueue()
    notify = progress_queue.put

    def deliver_progress() -> None:
        while True:
            try:
                progress = progress_queue.get_nowait()
            except queue.Empty:
                return
            if on_progress is not None:
                on_progress(progress)

    def snapshot(message: str, index: Optional[int] = None) -> BatchProgress:
        return BatchProgress(done=report.done, total=count, credits=report.credits, message=message, index=index)

    def work(index: int) -> None:
        if cancel.is_set():
            return
        if stop_sending:
            with lock:
                report.failures[index] = CancelledError(
                    f"not sent, because an earlier image failed with: {stop_sending[0]}")
            return
        try:
            request = make_request(index)

            def relay(event: ProgressEvent) -> None:
                if event.stage in ("uploading", "waiting", "retrying"):
                    with lock:
                        progress = snapshot(f"image {index + 1}: {event.message}", index)
                    notify(progress)

            result, cached = generate_with_cache(client, request, cache, on_progress=relay, cancel=cancel)
            on_result(index, result)
        except StructureError as error:
            if cancel.is_set() and isinstance(error, CancelledError):
                return
            with lock:
                report.failures[index] = error
                if isinstance(error, _FATAL_FOR_BATCH) and not stop_sending:
                    stop_sending.append(error)
                progress = snapshot(f"image {index + 1} failed", index)
            notify(progress)
            return
        with lock:
            report.seeds[index] = result.seed
            report.credits += result.credits
            if cached:
                report.from_cache.add(index)
            progress = snapshot(f"done {report.done} of {count}", index)
        notify(progress)

    if count <= 0:
        return report
    workers = max(1, min(max_concurrency, count))
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="structure")
    try:
        pending: set[Future] = {executor.submit(work, index) for index in range(count)}
        while pending:
            finished, pending = wait(pending, timeout=poll_interval, return_when=FIRST_COMPLETED)
            deliver_progress()
            for future in finished:
                future.result()  # a bug in on_result/make_request must surface, not vanish
            if should_cancel is not None and pending and should_cancel():
                cancel.set()
                client.abort()
                report.cancelled = True
                for future in pending:
                    future.cancel()
                # The aborted sockets end in-flight work at once; give it a moment to finish
                # so no worker outlives the call, without ever holding the caller long.
                wait(pending, timeout=0.5)
                break
    except BaseException:
        # Anything escaping here (a progress hook that raises on interrupt, as ComfyUI's
        # does, or Ctrl-C) must not leave requests running or the caller waiting on them.
        cancel.set()
        client.abort()
        report.cancelled = True
        raise
    finally:
        # After a cancel the aborted sockets make in-flight workers end at once; a short join
        # keeps threads from outliving the call without ever blocking the caller for long.
        executor.shutdown(wait=not report.cancelled, cancel_futures=True)
    deliver_progress()
    return report
