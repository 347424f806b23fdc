"""The batch command: one request per image of a folder, resumable, with Ctrl-C handling and progress."""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..batch import BatchProgress, BatchReport, max_concurrency_from_env, run_batch
from ..client import StructureResult
from ..errors import CancelledError
from ..files import (
    FileAccessError,
    FolderLock,
    InputImage,
    batch_outputs,
    check_writable_folder,
    is_finished_output,
    list_input_images,
    read_input_image,
)
from ..pipeline import batch_seeds
from ..request import StructureRequest
from .exits import EXIT_FAILED, EXIT_INTERRUPTED
from .target import RequestTarget, check_params, structure_request, write_result


class _ProgressLine:
    """A one-line progress bar on stderr, as wide as the terminal (plain lines when stderr is not one)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.tty = sys.stderr.isatty()
        self.last_done = -1

    def __call__(self, progress: BatchProgress) -> None:
        if progress.done == self.last_done and not self.tty:
            return
        self.last_done = progress.done
        bar = 24
        filled = int(bar * progress.done / max(1, self.total))
        line = (
            f"[{'#' * filled}{'.' * (bar - filled)}] {progress.done}/{self.total} "
            f"· {progress.credits} credits · {progress.message}"
        )
        if self.tty:
            # One column short of the width: writing the last column wraps on some terminals.
            width = max(20, shutil.get_terminal_size().columns - 1)
            sys.stderr.write("\r" + line[:width].ljust(width))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


class _Interrupts:
    """Ctrl-C during a batch. The first stops sending: requests in flight finish, since the service is
    already making (and charging for) them. The second drops those too; a third exits at once."""

    def __init__(self) -> None:
        self.stop_sending = threading.Event()
        self.drop_in_flight = threading.Event()

    def __call__(self, signum: int, frame: object) -> None:
        if not self.stop_sending.is_set():
            self.stop_sending.set()
            sys.stderr.write(
                "\nstopping: no new requests; the ones in flight finish, because the service is already "
                "making them (Ctrl-C again to drop them: they may still be charged)\n"
            )
        elif not self.drop_in_flight.is_set():
            self.drop_in_flight.set()
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Interrupts]:
        """Handle Ctrl-C (Ctrl-Break on Windows) for the block, unless ignored (nohup, a background job)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        inherited = {}
        for signum in _interrupt_signals():
            handler = signal.getsignal(signum)
            if handler is not signal.SIG_IGN:
                inherited[signum] = handler
                signal.signal(signum, self)
        try:
            yield self
        finally:
            for signum, handler in inherited.items():
                signal.signal(signum, handler)


def _interrupt_signals() -> list[int]:
    """SIGINT, and on Windows SIGBREAK: Ctrl-Break, the one a program can send to another's process group."""
    return [signal.SIGINT, *([signal.SIGBREAK] if sys.platform == "win32" else [])]


@dataclass
class _BatchFiles:
    """The files side of one batch run: which inputs still need a result, reading them, writing results."""

    args: argparse.Namespace
    inputs: list[Path]
    targets: list[Path]
    output_format: str
    target: RequestTarget
    interrupts: _Interrupts
    seeds: list[int] = field(init=False)
    todo: list[int] = field(init=False)  # indexes of the inputs still to do; a slot is a position in it
    started: set[int] = field(init=False, default_factory=set)
    not_written: dict[int, FileAccessError] = field(init=False, default_factory=dict)
    _images: dict[int, InputImage] = field(init=False, default_factory=dict)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.seeds = batch_seeds(self.args.seed, len(self.inputs))
        # A finished output is what makes a run resumable.
        self.todo = [i for i, path in enumerate(self.targets) if not is_finished_output(path)]

    def make_request(self, slot: int) -> StructureRequest:
        if self.interrupts.stop_sending.is_set():
            raise CancelledError("not sent: the run was interrupted")
        index = self.todo[slot]
        image = read_input_image(self.inputs[index])
        with self._lock:
            self._images[slot] = image
            self.started.add(slot)
        return structure_request(self.args, image, self.seeds[index], self.output_format)

    def on_result(self, slot: int, result: StructureResult) -> None:
        with self._lock:
            image = self._images.pop(slot)
        try:
            write_result(self.targets[self.todo[slot]], image, result, self.output_format, self.target)
        except FileAccessError as error:
            # Paid for, so it counts as done for the credits; reported apart as not written.
            with self._lock:
                self.not_written[slot] = error

    def name(self, slot: int) -> str:
        return self.inputs[self.todo[slot]].name

    def label(self, slot: int) -> str:
        """Label a result for the store with the output it was meant for."""
        return str(self.targets[self.todo[slot]])


def cmd_batch(args: argparse.Namespace) -> int:
    """One request per image of a folder; everything that can be checked is checked before the first."""
    output_format = args.format or "png"
    check_params(args, output_format)
    inputs = list_input_images(args.input_dir)
    targets = batch_outputs(inputs, args.input_dir, args.output_dir, output_format)
    check_writable_folder(args.output_dir)
    concurrency = args.concurrency or max_concurrency_from_env()
    with FolderLock(args.output_dir), RequestTarget.open(args) as target:
        interrupts = _Interrupts()
        files = _BatchFiles(args, inputs, targets, output_format, target, interrupts)
        skipped = len(inputs) - len(files.todo)
        if skipped:
            print(f"skipping {skipped} image(s) already in {args.output_dir}", file=sys.stderr)
        progress = _ProgressLine(len(files.todo))
        with interrupts.installed():
            try:
                report = run_batch(
                    target.client,
                    len(files.todo),
                    files.make_request,
                    on_result=files.on_result,
                    store=target.store,
                    label=files.label,
                    max_concurrency=concurrency,
                    on_progress=progress,
                    should_stop_sending=interrupts.stop_sending.is_set,
                    should_cancel=interrupts.drop_in_flight.is_set,
                    keep_in_flight=False,
                )  # the second Ctrl-C drops what is in flight
            finally:
                progress.close()
    return _summarise(report, files, skipped, target)


def _summarise(report: BatchReport, files: _BatchFiles, skipped: int, target: RequestTarget) -> int:
    interrupted = files.interrupts.stop_sending.is_set()
    not_sent = {
        slot
        for slot, error in report.failures.items()
        if interrupted and isinstance(error, CancelledError) and slot not in files.started
    }
    for slot, error in sorted(report.failures.items()):
        if slot not in not_sent:
            print(f"failed: {files.name(slot)}: {error}", file=sys.stderr)
    for slot, error in sorted(files.not_written.items()):
        print(f"not written: {files.name(slot)}: {error}", file=sys.stderr)
    written = report.done - len(files.not_written)
    if interrupted:
        unreadable = [slot for slot in report.failures if slot not in files.started and slot not in not_sent]
        # Stopped before its upload was complete: not sent, as far as the service knows.
        left = len(files.todo) - len(files.started) - len(unreadable) + len(report.stopped & files.started)
        dropped = len(files.started - set(report.seeds) - set(report.failures) - report.stopped)
        stopped = (
            f"; {dropped} request(s) in flight were dropped, and the service may have charged for those "
            "whose upload had finished"
            if dropped and not target.free
            else ""
        )
        print(
            f"interrupted: {written} of {len(files.todo)} image(s) done and written, {report.credits} "
            f"credits paid for them, {left} not sent{stopped}; run the same command again to continue",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    print(
        f"done {written}, failed {len(report.failures) + len(files.not_written)}, skipped {skipped}, "
        f"credits {report.credits}"
    )
    return EXIT_FAILED if report.failures or files.not_written else 0
