"""Run many requests with bounded concurrency: results by index, result store first, cancel at once."""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from ._constants import DEFAULT_MAX_CONCURRENCY, ENV_MAX_CONCURRENCY
from ._renamed import warn_renamed
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
from .paid import deliver, fetch_or_pay, release
from .store import ResultStore, StoredResult

log = logging.getLogger("structure_api")

# After a cancel, how long the call waits for the requests it stopped to end (they end at once: their
# sockets are shut) before it returns, leaving the requests whose upload was complete to finish alone.
_STOP_GRACE = 0.5
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
        raise ConfigurationError(
            f"{ENV_MAX_CONCURRENCY} must be a whole number from 1 to 32; got {value!r}."
        ) from None
    if not 1 <= number <= 32:
        raise ConfigurationError(f"{ENV_MAX_CONCURRENCY} must be from 1 to 32; got {number}.")
    return number


class InFlightLimit:
    """How many requests of this process are in flight, over all nodes and batches: each takes a slot first.

    A slot is held from encoding the upload to decoding the answer, so the uploads and answers held
    in memory are bounded by the limit too, however many batches run side by side.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._in_use = 0
        self.peak = 0  # the most slots ever held at once (for tests and benchmarks)

    @property
    def in_use(self) -> int:
        """Slots held now."""
        with self._changed:
            return self._in_use

    def acquire(self, limit: int, cancel: threading.Event, poll: float = 0.1) -> bool:
        """Wait for a slot while fewer than ``limit`` are held; False when ``cancel`` is set first."""
        with self._changed:
            while self._in_use >= limit:
                if cancel.is_set():
                    return False
                self._changed.wait(poll)
            if cancel.is_set():
                return False
            self._in_use += 1
            self.peak = max(self.peak, self._in_use)
            return True

    def release(self) -> None:
        """Give a slot back."""
        with self._changed:
            self._in_use -= 1
            self._changed.notify_all()


_PROCESS_IN_FLIGHT = InFlightLimit()


def process_in_flight() -> InFlightLimit:
    """Return the one in-flight limit of this process, shared by every batch (every ComfyUI node run)."""
    return _PROCESS_IN_FLIGHT


class Background:
    """The requests a cancelled batch left running because their upload was complete (the service is
    making, and charging for, their images): each answer goes into the result store when it arrives."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._lock = threading.Lock()
        self._finished = threading.Event()
        self._callbacks: list[Callable[[], None]] = []
        self.kept = 0  # answers that arrived and were kept for a re-run

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every one has ended (answered or failed); True when they have."""
        return self._finished.wait(timeout)

    @property
    def finished(self) -> bool:
        """True once every one has ended."""
        return self._finished.is_set()

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on another thread) once every one has ended; at once if they have."""
        with self._lock:
            if not self._finished.is_set():
                self._callbacks.append(callback)
                return
        callback()

    def _finish(self) -> None:
        with self._lock:
            self._finished.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # a clean-up that fails must not hide the others
                log.exception("clean-up after the requests left in flight failed")


@dataclass(frozen=True)
class BatchProgress:
    """A snapshot for progress displays."""

    done: int
    total: int
    credits: int
    message: str
    index: int | None = None
    # What the message says, as a word a display can translate: a ProgressEvent stage ("pacing",
    # "uploading", "waiting", "retrying"), "failed" or "done" (the batch's count of done images).
    stage: str = ""


@dataclass
class BatchReport:
    """What happened to each image of a batch."""

    total: int
    seeds: dict[int, int] = field(default_factory=dict)
    failures: dict[int, StructureError] = field(default_factory=dict)
    from_store: set[int] = field(default_factory=set)  # served by the result store, free
    stored: dict[int, StoredResult] = field(default_factory=dict)  # the store's entry of each finished image
    credits: int = 0
    cancelled: bool = False
    may_be_charged: int = 0  # answers lost after their upload completed
    not_sent: int = 0  # left unsent after an error every later request would share
    stopped: set[int] = field(default_factory=set)  # stopped before the upload was complete: not charged
    # After a cancel: the requests left to finish on their own, their upload being complete (None: none).
    background: Background | None = None

    @property
    def in_flight(self) -> int:
        """Requests a cancel left running (their upload was complete, so they may be charged)."""
        return self.background.count if self.background is not None else 0

    @property
    def from_cache(self) -> set[int]:  # old spelling, for one release
        """Return ``from_store`` (the old spelling of its name)."""
        warn_renamed("BatchReport.from_cache", "BatchReport.from_store")
        return self.from_store

    @property
    def done(self) -> int:
        return len(self.seeds)

    @property
    def paid(self) -> int:
        """Images paid for in this run."""
        return self.done - len(self.from_store)

    def release(self, store: ResultStore) -> None:
        """Give every kept or claimed result back undelivered (the batch is not delivered) for a re-run."""
        for entry in self.stored.values():
            release(store, entry)

    def mark_delivered(self, store: ResultStore) -> None:
        """Record every result of the batch as delivered."""
        for entry in self.stored.values():
            deliver(store, entry)

    def raise_for_failures(self, noun: str = "image", *, store: ResultStore | None = None) -> None:
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
        raise BatchError(
            f"{len(items)} of {self.total} {noun}s failed: {shown}{more}. {self.kept_sentence(noun, store)}",
            failures=dict(self.failures),
        )

    def in_flight_sentence(self, store: ResultStore | None = None, *, free: bool = False) -> str:
        """After a cancel: how many requests were left in flight, what they may cost, where answers go."""
        count = self.in_flight
        if not count:
            return ""
        one = count == 1
        requests_text = f"{count} request{'' if one else 's'}"
        they, them = ("it", "it") if one else ("they", "them")
        if free:
            verb = "finishes" if one else "finish"
            return f"{requests_text} in flight to the stand-in {verb} in the background (free)."
        if store is None or store.persistent:
            where = "in the result store"
        elif store.directory is None:
            where = "in memory by this process (the result store is off)"
        else:
            where = "in memory by this process (the result store cannot be written)"
        results = "its result is" if one else "their results are"
        return (
            f"{requests_text} {'was' if one else 'were'} in flight with the upload complete, so the "
            f"service may charge for {them}; {results} kept {where} when {they} "
            f"{'arrives' if one else 'arrive'}, and queuing the same again gets {them} free."
        )

    def kept_sentence(self, noun: str = "image", store: ResultStore | None = None) -> str:
        """Say what was paid, what was kept where, and what a re-run will pay: every word true."""
        parts = []

        def plural(n: int, word: str = noun) -> str:
            return f"{n} {word}{'s' if n != 1 else ''}"

        if self.paid and not self.credits:
            parts.append(
                f"{plural(self.paid)} {'was' if self.paid == 1 else 'were'} made free by the stand-in"
            )
        elif self.paid:
            parts.append(
                f"{plural(self.paid)} {'was' if self.paid == 1 else 'were'} paid for ({self.credits} credits)"
            )
        else:
            parts.append("Nothing was paid for")
        if self.from_store:
            parts.append(f"{plural(len(self.from_store))} came free from the result store")
        sentence = ", ".join(parts)
        if self.done and store is not None and len(self.stored) == self.done:
            if all(store.on_disk(entry) for entry in self.stored.values()):
                where = f"in the result store ({store.directory})"
                again = "so queuing again pays only for the failed ones"
            else:
                where = f"in memory only, because {store.memory_reason}"
                again = "so queuing again in this same process pays only for the failed ones"
            if self.paid and not self.credits and not self.from_store:
                again = ""  # a stand-in made them: nothing was paid, so nothing about paying again is true
            kept = f"; {'it is' if self.done == 1 else f'all {self.done} are'} kept {where}"
            sentence += f"{kept}, {again}" if again else kept
        elif self.done:
            sentence += "; they were not kept, so queuing again pays for them again"
        if self.may_be_charged:
            sentence += (
                f". {plural(self.may_be_charged, 'request')} may have been charged without an answer "
                "arriving; queuing again sends them again"
            )
        if self.not_sent:
            sentence += f". {plural(self.not_sent)} {'was' if self.not_sent == 1 else 'were'} not sent"
        return sentence + "."


def generate_stored(
    client: StructureClient, request: StructureRequest, store: ResultStore, **options: object
) -> tuple[StructureResult | None, bool]:
    """Run :func:`paid.fetch_or_pay` and return ``(result, from_store)``; deprecated, for one release."""
    warnings.warn(
        "structure_api.batch.generate_stored is deprecated: use structure_api.fetch_or_pay, whose "
        "PaidResult delivers or releases the result",
        DeprecationWarning,
        stacklevel=2,
    )
    paid = fetch_or_pay(client, request, store, **options)  # type: ignore[arg-type]
    return (paid.result, paid.from_store) if paid is not None else (None, False)


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
    # Set by a cancel or a stop: nothing more is sent (pacer waits and retries end, uploads stop).
    halt: threading.Event = field(init=False, default_factory=threading.Event)
    # Set with stop_reason: later requests would fail (or charge) too.
    stop_sending: threading.Event = field(init=False, default_factory=threading.Event)
    stop_reason: StructureError | None = field(init=False, default=None)
    slots: InFlightLimit = field(default_factory=process_in_flight)
    limit: int = field(init=False, default=DEFAULT_MAX_CONCURRENCY)
    # Indexes whose request is being made (slot taken), and those of them whose upload is complete.
    sending: set[int] = field(init=False, default_factory=set)
    sent: set[int] = field(init=False, default_factory=set)
    # What a cancel leaves running (report.background once the call returns).
    left_running: Background = field(init=False, default_factory=lambda: Background(0))
    # Workers queue progress; the caller's thread delivers it, because UI hooks (ComfyUI's
    # progress bar, terminal output) expect to be called from the thread that runs the job.
    progress: queue.SimpleQueue[BatchProgress] = field(init=False, default_factory=queue.SimpleQueue)

    def __post_init__(self) -> None:
        self.report = BatchReport(total=self.count)

    def snapshot(self, message: str, index: int | None = None, stage: str = "") -> BatchProgress:
        return BatchProgress(
            done=self.report.done,
            total=self.count,
            credits=self.report.credits,
            message=message,
            index=index,
            stage=stage,
        )

    def deliver_progress(self, on_progress: Callable[[BatchProgress], None] | None) -> None:
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
        if self.halt.is_set() or not self.slots.acquire(self.limit, self.halt):
            return
        try:
            self._work(index)
        finally:
            self.slots.release()
            with self.lock:
                self.sending.discard(index)
                self.sent.discard(index)

    def _work(self, index: int) -> None:
        if self.halt.is_set():
            return
        with self.lock:
            self.sending.add(index)
        try:
            request = self.make_request(index)

            def relay(event: ProgressEvent) -> None:
                if event.stage == "waiting":
                    with self.lock:
                        self.sent.add(index)  # the upload is complete: a cancel lets it finish
                if event.stage in ("pacing", "uploading", "waiting", "retrying"):
                    with self.lock:
                        progress = self.snapshot(f"image {index + 1}: {event.message}", index, event.stage)
                    self.progress.put(progress)

            # After a stop, what the store holds is still served (it is free); nothing is sent.
            stopped = self.stop_sending.is_set()
            paid = fetch_or_pay(
                self.client,
                request,
                self.store,
                label=self.label(index),
                on_progress=relay,
                cancel=self.halt,
                claim_only=stopped,
                decode=self.decode,
            )
            del request  # its upload bytes are not needed any more
            if paid is None:
                with self.lock:
                    self.report.failures[index] = CancelledError(
                        f"not sent, because an earlier image failed with: {str(self.stop_reason).rstrip('.')}"
                    )
                    self.report.not_sent += 1
                return
            result, from_store = paid.result, paid.from_store
            with self.lock:
                if self.cancel.is_set():
                    # It landed after the caller went: kept for a re-run, which takes it free.
                    if paid.entry is not None:
                        paid.release()
                        self.left_running.kept += 1
                    return
                if paid.entry is not None:
                    entry = paid.entry
                    if self.store.on_disk(entry):
                        # The report only needs its identity; the bytes live on disk (a batch of 16 large
                        # answers would otherwise hold all 16 until the batch ends).
                        entry = dataclasses.replace(entry, data=b"")
                    self.report.stored[index] = entry  # before on_result: kept whatever it does
            paid.use(lambda kept: self.on_result(index, kept))
        except StructureError as error:
            if self.halt.is_set() and isinstance(error, CancelledError):
                with self.lock:
                    if index not in self.sent:
                        self.report.stopped.add(index)  # before its upload was complete: nothing charged
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
                self.report.from_store.add(index)
            progress = self.snapshot(f"done {self.report.done} of {self.count}", index, "done")
        self.progress.put(progress)

    def _cancel(self, pending: set[Future], keep_in_flight: bool) -> None:
        """Stop sending; drop or leave running the requests whose upload is complete; return at once."""
        with self.lock:
            self.cancel.set()  # under the lock: a result either made it into the report or is released
            self.halt.set()
            self.report.cancelled = True
        if keep_in_flight:
            self.client.stop_uploads()
        else:
            self.client.abort()
        for future in pending:
            future.cancel()
        # The stopped requests end at once (their sockets are shut); wait for them, never long.
        deadline = time.monotonic() + _STOP_GRACE
        while time.monotonic() < deadline:
            with self.lock:
                if self.sending <= self.sent:
                    break
            time.sleep(0.01)

    def run(
        self,
        max_concurrency: int,
        on_progress: Callable[[BatchProgress], None] | None,
        should_cancel: Callable[[], bool] | None,
        poll_interval: float,
        keep_in_flight: bool = True,
        should_stop_sending: Callable[[], bool] | None = None,
    ) -> BatchReport:
        report = self.report
        self.limit = max_concurrency
        workers = max(1, min(max_concurrency, self.count))
        executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="structure")
        pending: set[Future] = set()
        try:
            pending = {executor.submit(self.work, index) for index in range(self.count)}
            while pending:
                finished, pending = wait(pending, timeout=poll_interval, return_when=FIRST_COMPLETED)
                self.deliver_progress(on_progress)
                for future in finished:
                    future.result()  # a bug in on_result/make_request must surface, not vanish
                if should_stop_sending is not None and not self.halt.is_set() and should_stop_sending():
                    self.halt.set()
                    self.client.stop_uploads()
                if should_cancel is not None and pending and should_cancel():
                    self._cancel(pending, keep_in_flight)
                    break
        except BaseException:
            # Anything escaping here (a progress hook that raises on interrupt, as ComfyUI's
            # does, or Ctrl-C) must not leave requests running unseen or the caller waiting on them.
            self._cancel(pending, keep_in_flight)
            self._leave_running(executor)
            raise
        self._leave_running(executor)
        self.deliver_progress(on_progress)
        return report

    def _leave_running(self, executor: ThreadPoolExecutor) -> None:
        """Shut the workers' pool; after a cancel, what is still running finishes in the background."""
        if not self.report.cancelled:
            executor.shutdown(wait=True)
            return
        executor.shutdown(wait=False, cancel_futures=True)
        with self.lock:
            running = len(self.sending)
            if not running:
                return
            background = self.left_running
            background.count = running
            self.report.background = background

        def settle() -> None:
            executor.shutdown(wait=True)
            if background.kept:
                log.info(
                    "%d answer(s) that arrived after the cancel are kept in the result store for a re-run",
                    background.kept,
                )
            background._finish()

        threading.Thread(target=settle, name="structure-settle", daemon=True).start()
        _notice_at_exit(background)


def _notice_at_exit(background: Background) -> None:
    """Say at exit, if Python is quitting while these requests still run, why it waits for them.

    Python waits for the pool's threads when it exits (ComfyUI quit right after a Cancel), which is
    what lets paid answers reach the store; without a word it looks like a hang. threading's exit
    hooks run before that wait, the newest first (CPython 3.9+; elsewhere nothing is said).
    """
    register = getattr(threading, "_register_atexit", None)
    if register is None:
        return
    held = weakref.ref(background)

    def notice() -> None:
        left = held()
        if left is not None and not left.finished:
            log.warning(
                "Waiting for the requests left in flight after a cancel (%d when it was pressed): the "
                "service may charge for them, and their answers go into the result store as they "
                "arrive, at most a read timeout from now.",
                left.count,
            )

    try:
        register(notice)
    except RuntimeError:  # Python is already exiting
        pass


def run_batch(
    client: StructureClient,
    count: int,
    make_request: Callable[[int], StructureRequest],
    *,
    on_result: Callable[[int, StructureResult], None],
    store: ResultStore | None = None,
    label: Callable[[int], str] | None = None,
    max_concurrency: int | None = None,
    on_progress: Callable[[BatchProgress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    poll_interval: float = 0.1,
    decode: bool = True,
    keep_in_flight: bool = True,
    in_flight: InFlightLimit | None = None,
    should_stop_sending: Callable[[], bool] | None = None,
) -> BatchReport:
    """Run ``count`` requests through the result store, a few at once; report each by index.

    A request starts only while fewer than ``max_concurrency`` (default AITHRIVING_MAX_CONCURRENCY)
    requests of the whole process are in flight (``in_flight``: the process's :class:`InFlightLimit`).
    ``make_request(i)`` builds request i in the worker once it has its slot (so the encoded images
    are bounded too); ``on_result(i, result)`` runs in the worker as each finishes (so results can
    go straight into an output buffer); ``on_progress`` is called on the caller's thread.
    ``should_cancel`` is polled every ``poll_interval`` s; when it returns True, nothing more is sent,
    uploads still going out are stopped and the call returns within about half a second with
    ``cancelled`` set. Requests whose upload was complete are left to finish (``keep_in_flight``,
    ``report.background``): the service is making their images, so their answers are kept in the
    store, undelivered, for a re-run; ``keep_in_flight=False`` drops them too. ``should_stop_sending``
    (polled likewise) stops sending the same way but waits for the requests in flight and delivers
    them; ``report.stopped`` lists what was stopped before its upload was complete. Every result is
    kept in ``store`` (default: ``ResultStore.from_env()``) and handed out to the caller:
    ``report.mark_delivered(store)`` or ``report.release(store)``.
    ``decode=False``: results reach ``on_result`` with ``pixels`` None (see :func:`paid.fetch_or_pay`);
    an ``on_result`` that raises MalformedResponseError (the bytes do not decode) discards the result.
    """
    if count <= 0:
        return BatchReport(total=max(count, 0))
    if max_concurrency is None:
        max_concurrency = max_concurrency_from_env()
    if store is None:
        store = ResultStore.from_env()
    run = _BatchRun(
        client,
        count,
        make_request,
        on_result,
        store,
        label or (lambda index: f"image {index + 1}"),
        decode,
        slots=in_flight or process_in_flight(),
    )
    return run.run(
        max_concurrency, on_progress, should_cancel, poll_interval, keep_in_flight, should_stop_sending
    )
