"""Run many requests with bounded concurrency: results by index, result store first, cancel at once."""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, Optional

from .client import ProgressEvent, StructureClient, StructureRequest, StructureResult
from .errors import (
    AuthenticationError,
    BatchError,
    CancelledError,
    ConfigurationError,
    InsufficientCreditsError,
    ResultMayBeBilledError,
    StructureError,
)
from .images import decode_image
from .store import ResultStore, StoredResult

ENV_MAX_CONCURRENCY = "AITHRIVING_MAX_CONCURRENCY"
# 8 in flight: a batch of 8 takes about one image's time, and 8 is far below the service's rate
# limit (150 requests in 10 s), which the pacer enforces on its own.
DEFAULT_MAX_CONCURRENCY = 8
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
    # What the message says, as a word a display can translate: a ProgressEvent stage ("pacing",
    # "uploading", "waiting", "retrying"), "failed" or "done" (the batch's count of done images).
    stage: str = ""


@dataclass
class BatchReport:
    """What happened to each image of a batch."""

    total: int
    seeds: dict[int, int] = field(default_factory=dict)
    failures: dict[int, StructureError] = field(default_factory=dict)
    from_cache: set[int] = field(default_factory=set)  # served by the result store, free
    stored: dict[int, StoredResult] = field(default_factory=dict)  # the store's entry of each finished image
    credits: int = 0
    cancelled: bool = False
    may_be_charged: int = 0  # answers lost after their upload completed
    not_sent: int = 0        # left unsent after an error every later request would share

    @property
    def done(self) -> int:
        return len(self.seeds)

    @property
    def paid(self) -> int:
        """Images paid for in this run."""
        return self.done - len(self.from_cache)

    def release(self, store: ResultStore) -> None:
        """Give every kept or claimed result back undelivered (the batch is not delivered): a re-run takes them."""
        for entry in self.stored.values():
            store.release(entry)

    def mark_delivered(self, store: ResultStore) -> None:
        """Record every result of the batch as delivered."""
        for entry in self.stored.values():
            store.mark_delivered(entry)

    def raise_for_failures(self, noun: str = "image", *, store: Optional[ResultStore] = None) -> None:
        """Raise one BatchError naming each failed item (1-based) and why, and saying what was kept.

        ``store``: where the finished items were kept; a re-run then pays only for the failed items.
        """
        if not self.failures:
            return
        if self.total == 1:
            error = next(iter(self.failures.values()))
            raise error
        items = sorted(self.failures.items())
        shown = "; ".join(f"{noun} {index + 1}: {str(error).rstrip('.')}" for index, error in items[:5])
        more = f"; and {len(items) - 5} more" if len(items) > 5 else ""
        raise BatchError(f"{len(items)} of {self.total} {noun}s failed: {shown}{more}. {self.kept_sentence(noun, store)}",
                         failures=dict(self.failures))

    def kept_sentence(self, noun: str = "image", store: Optional[ResultStore] = None) -> str:
        """What was paid, what was kept where, and what a re-run will pay: every word true."""
        parts = []
        plural = lambda n, word=noun: f"{n} {word}{'s' if n != 1 else ''}"  # noqa: E731
        if self.paid and not self.credits:
            parts.append(f"{plural(self.paid)} {'was' if self.paid == 1 else 'were'} made free by the local stand-in")
        elif self.paid:
            parts.append(f"{plural(self.paid)} {'was' if self.paid == 1 else 'were'} paid for "
                         f"({self.credits} credits)")
        else:
            parts.append("Nothing was paid for")
        if self.from_cache:
            parts.append(f"{plural(len(self.from_cache))} came free from the result store")
        sentence = ", ".join(parts)
        if self.done and store is not None and len(self.stored) == self.done:
            if all(store.on_disk(entry) for entry in self.stored.values()):
                where = f"in the result store ({store.directory})"
                again = "so queuing again pays only for the failed ones"
            else:
                where = f"in memory only, because {store.memory_reason}"
                again = "so queuing again in this same process pays only for the failed ones"
            if self.paid and not self.credits and not self.from_cache:
                again = ""  # a stand-in made them: nothing was paid, so nothing about paying again is true
            kept = f"; {'it is' if self.done == 1 else f'all {self.done} are'} kept {where}"
            sentence += f"{kept}, {again}" if again else kept
        elif self.done:
            sentence += "; they were not kept, so queuing again pays for them again"
        if self.may_be_charged:
            sentence += (f". {plural(self.may_be_charged, 'request')} may have been charged without an answer "
                         "arriving; queuing again sends them again")
        if self.not_sent:
            sentence += f". {plural(self.not_sent)} {'was' if self.not_sent == 1 else 'were'} not sent"
        return sentence + "."


def generate_stored(
    client: StructureClient,
    request: StructureRequest,
    store: ResultStore,
    *,
    label: str = "",
    on_progress: Optional[Callable[[ProgressEvent], None]] = None,
    cancel: Optional[threading.Event] = None,
    claim_only: bool = False,
    decode: bool = True,
) -> tuple[Optional[StructureResult], bool]:
    """The store's result for ``request`` if it holds one (free), else a paid one the client kept there.

    Returns (result, from_store); (None, False) when ``claim_only`` and the store holds nothing.
    The result's ``stored`` entry is handed out to the caller: ``store.mark_delivered`` it once
    delivered, or ``store.release`` it when giving up. ``decode=False``: ``pixels`` stays None (the
    caller decodes ``data`` itself, and discards the entry from the store if that fails).
    """
    request.validate()
    key = store.key_for(request, client.endpoint)
    hit = _claim_decoded(store, key, request.seed, decode)
    if hit is not None or claim_only:
        return hit, hit is not None
    if request.seed == 0:
        # Random means random: identical seed-0 requests of one batch are paid side by side.
        return client.generate(request, on_progress=on_progress, cancel=cancel, store=store, label=label,
                               decode=decode), False
    with store.paying(key):
        # Another thread or process may have paid for it while this one waited for the lock.
        hit = _claim_decoded(store, key, request.seed, decode)
        if hit is not None:
            return hit, True
        return client.generate(request, on_progress=on_progress, cancel=cancel, store=store, label=label,
                               decode=decode), False


def _claim_decoded(store: ResultStore, key: str, seed: int, decode: bool = True) -> Optional[StructureResult]:
    while True:
        entry = store.claim(key, seed)
        if entry is None:
            return None
        try:
            pixels = decode_image(entry.data) if decode else None
        except StructureError:
            store.discard(entry)  # unusable: never served again
            continue
        return StructureResult(pixels=pixels, data=entry.data, seed=entry.seed, format=entry.format,
                               request_id=None, attempts=0, credits=0, stored=entry)


@dataclass(eq=False)
class _BatchRun:
    """One run of :func:`run_batch`: the shared state of its workers, behind one lock."""

    client: StructureClient
    count: int
    make_request: Callable[[int], StructureRequest]
    on_result: Callable[[int, StructureResult], None]
    store: ResultStore
    label: Callable[[int], str]
    decode: bool = True
    report: BatchReport = field(init=False)
    lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    cancel: threading.Event = field(init=False, default_factory=threading.Event)
    # Set with stop_reason: later requests would fail (or charge) too.
    stop_sending: threading.Event = field(init=False, default_factory=threading.Event)
    stop_reason: Optional[StructureError] = field(init=False, default=None)
    # Workers queue progress; the caller's thread delivers it, because UI hooks (ComfyUI's
    # progress bar, terminal output) expect to be called from the thread that runs the job.
    progress: "queue.SimpleQueue[BatchProgress]" = field(init=False, default_factory=queue.SimpleQueue)

    def __post_init__(self) -> None:
        self.report = BatchReport(total=self.count)

    def snapshot(self, message: str, index: Optional[int] = None, stage: str = "") -> BatchProgress:
        return BatchProgress(done=self.report.done, total=self.count, credits=self.report.credits,
                             message=message, index=index, stage=stage)

    def deliver_progress(self, on_progress: Optional[Callable[[BatchProgress], None]]) -> None:
        while True:
            try:
                progress = self.progress.get_nowait()
            except queue.Empty:
                return
            if on_progress is not None:
                on_progress(progress)

    def _stop(self, error: StructureError) -> None:
        if not self.stop_sending.is_set():
            self.stop_reason = error
            self.stop_sending.set()

    def work(self, index: int) -> None:
        if self.cancel.is_set():
            return
        try:
            request = self.make_request(index)

            def relay(event: ProgressEvent) -> None:
                if event.stage in ("pacing", "uploading", "waiting", "retrying"):
                    with self.lock:
                        progress = self.snapshot(f"image {index + 1}: {event.message}", index, event.stage)
                    self.progress.put(progress)

            # After a stop, what the store holds is still served (it is free); nothing is sent.
            stopped = self.stop_sending.is_set()
            result, from_store = generate_stored(self.client, request, self.store, label=self.label(index),
                                                 on_progress=relay, cancel=self.cancel, claim_only=stopped,
                                                 decode=self.decode)
            del request  # its upload bytes are not needed any more
            if result is None:
                with self.lock:
                    self.report.failures[index] = CancelledError(
                        f"not sent, because an earlier image failed with: {str(self.stop_reason).rstrip('.')}")
                    self.report.not_sent += 1
                return
            if result.stored is not None:
                entry = result.stored
                if self.store.on_disk(entry):
                    # The report only needs its identity; the bytes live on disk (a batch of 16 large
                    # answers would otherwise hold all 16 until the batch ends).
                    entry = dataclasses.replace(entry, data=b"")
                with self.lock:
                    self.report.stored[index] = entry  # before on_result: kept whatever it does
            self.on_result(index, result)
        except StructureError as error:
            if self.cancel.is_set() and isinstance(error, CancelledError):
                return
            with self.lock:
                self.report.failures[index] = error
                if isinstance(error, ResultMayBeBilledError):
                    self.report.may_be_charged += 1
                if isinstance(error, _FATAL_FOR_BATCH + (ResultMayBeBilledError,)):
                    self._stop(error)
                progress = self.snapshot(f"image {index + 1} failed", index, "failed")
            self.progress.put(progress)
            return
        with self.lock:
            self.report.seeds[index] = result.seed
            self.report.credits += result.credits
            if from_store:
                self.report.from_cache.add(index)
            progress = self.snapshot(f"done {self.report.done} of {self.count}", index, "done")
        self.progress.put(progress)

    def run(self, max_concurrency: int, on_progress: Optional[Callable[[BatchProgress], None]],
            should_cancel: Optional[Callable[[], bool]], poll_interval: float) -> BatchReport:
        report = self.report
        workers = max(1, min(max_concurrency, self.count))
        executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="structure")
        try:
            pending: set[Future] = {executor.submit(self.work, index) for index in range(self.count)}
            while pending:
                finished, pending = wait(pending, timeout=poll_interval, return_when=FIRST_COMPLETED)
                self.deliver_progress(on_progress)
                for future in finished:
                    future.result()  # a bug in on_result/make_request must surface, not vanish
                if should_cancel is not None and pending and should_cancel():
                    self.cancel.set()
                    self.client.abort()
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
            self.cancel.set()
            self.client.abort()
            report.cancelled = True
            raise
        finally:
            # After a cancel the aborted sockets make in-flight workers end at once; a short join
            # keeps threads from outliving the call without ever blocking the caller for long.
            executor.shutdown(wait=not report.cancelled, cancel_futures=True)
        self.deliver_progress(on_progress)
        return report


def run_batch(
    client: StructureClient,
    count: int,
    make_request: Callable[[int], StructureRequest],
    *,
    on_result: Callable[[int, StructureResult], None],
    store: Optional[ResultStore] = None,
    label: Optional[Callable[[int], str]] = None,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    on_progress: Optional[Callable[[BatchProgress], None]] = None,
    should_cancel: Optional[Callable[[], bool]] = None,
    poll_interval: float = 0.1,
    decode: bool = True,
) -> BatchReport:
    """Run ``count`` requests, at most ``max_concurrency`` at once, through the result store; report each by index.

    ``make_request(i)`` builds request i in the worker (so at most ``max_concurrency``
    encoded images exist at once); ``on_result(i, result)`` runs in the worker as each
    finishes (so results can go straight into an output buffer); ``on_progress`` is
    called on the caller's thread. ``should_cancel`` is polled every ``poll_interval`` s;
    when it returns True, open connections are closed and the call returns with
    ``cancelled`` set. Every result is kept in ``store`` (default: ``ResultStore.from_env()``)
    and handed out to the caller: ``report.mark_delivered(store)`` or ``report.release(store)``.
    ``decode=False``: results reach ``on_result`` with ``pixels`` None (see :func:`generate_stored`).
    """
    if count <= 0:
        return BatchReport(total=max(count, 0))
    if store is None:
        store = ResultStore.from_env()
    run = _BatchRun(client, count, make_request, on_result, store, label or (lambda index: f"image {index + 1}"),
                    decode)
    return run.run(max_concurrency, on_progress, should_cancel, poll_interval)
