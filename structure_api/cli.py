"""The ``structure-api`` command: generate, batch, results, serve.

Exit status: 0 done, 1 something failed while running, 2 a bad command line (argparse's or
ours: the same one ``error:`` line either way), 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import math
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, NoReturn, Optional, Sequence

from . import __version__
from .batch import DEFAULT_MAX_CONCURRENCY, BatchProgress, BatchReport, generate_stored, \
    max_concurrency_from_env, run_batch
from .client import DEFAULT_READ_TIMEOUT, StructureClient, StructureResult
from .contract import (
    CREDITS_PER_IMAGE,
    DEFAULT_CONTROL_STRENGTH,
    MAX_CONTROL_STRENGTH,
    MAX_SEED,
    MIN_CONTROL_STRENGTH,
    OUTPUT_FORMATS,
    PROMPT_RANGE_TEXT,
    StructureRequest,
    validate_parameters,
)
from .errors import CancelledError, InputError, StructureError
from .files import (
    FORMAT_SUFFIXES,
    FileAccessError,
    FolderLock,
    InputImage,
    batch_outputs,
    check_output_file,
    check_writable_folder,
    list_input_images,
    read_input_image,
    result_file_bytes,
    write_atomically,
)
from .pipeline import batch_seeds
from .store import ResultStore, StoredResult

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
MAX_CONCURRENCY = 32


class UsageError(Exception):
    """A value on the command line that cannot work: exit status 2, like argparse's own refusals."""


# --- where requests go -----------------------------------------------------------------------

class RequestTarget:
    """Where requests go (the paid service, or a stand-in in this process) and the store that keeps what they paid."""

    def __init__(self, client: StructureClient, store: ResultStore, *, free: bool = False) -> None:
        self.client = client
        self.store = store
        self.free = free  # a stand-in: nothing it does can cost anything

    @classmethod
    @contextlib.contextmanager
    def open(cls, args: argparse.Namespace) -> Iterator["RequestTarget"]:
        """The target the options choose: ``--local`` for an in-process stand-in, else the configured service."""
        if args.local:
            from .standin import StandInServer

            # free=True: its answers say so, and the client counts them as 0 credits.
            with StandInServer(free=True) as server:
                print(f"using the local stand-in at {server.url} (no key, no credits)", file=sys.stderr)
                with StructureClient(api_key="local-stand-in", base_url=server.url,
                                     read_timeout=args.timeout) as client:
                    # Kept for this run only: the next run's stand-in has another address anyway.
                    yield cls(client, ResultStore(None), free=True)
            return
        with StructureClient.from_env(read_timeout=args.timeout) as client:
            yield cls(client, ResultStore(None) if args.no_cache else ResultStore.from_env())

    def generate(self, request: StructureRequest, label: str) -> tuple[StructureResult, bool]:
        """One request through the store: a result paid before and not delivered (or a fixed seed's) is free."""
        result, from_store = generate_stored(self.client, request, self.store, label=label)
        assert result is not None  # only claim_only can come back empty
        return result, from_store

    def delivered(self, result: StructureResult) -> None:
        """The result's file is written: the store stops offering it."""
        if result.stored is not None:
            self.store.mark_delivered(result.stored)

    def undelivered(self, result: StructureResult) -> None:
        """The result's file could not be written: the store offers it again (to a re-run, or ``results``)."""
        if result.stored is not None:
            self.store.release(result.stored)

    def kept_sentence(self, result: StructureResult) -> str:
        """What became of a result that may have been paid for but could not be written: every word true."""
        entry = result.stored
        if result.attempts == 0:  # served by the store: no request was made this time
            paid = "it was paid for in an earlier run"
        elif result.credits:
            paid = f"it was paid for ({result.credits} credits)"
        else:
            paid = "it was free (a stand-in)"
        if entry is not None and self.store.on_disk(entry):
            return (f"{paid} and is kept in the result store ({self.store.directory}): "
                    "`structure-api results --export DIR` writes it out, and running the same command again "
                    "delivers it without paying")
        if entry is not None:
            return (f"{paid} and is kept in memory only (the result store is off or cannot be written), so it is "
                    f"lost when this command ends; its seed was {result.seed}")
        return f"{paid} and was not kept; its seed was {result.seed}"


def _write_result(path: Path, image: InputImage, result: StructureResult, output_format: str,
                  target: RequestTarget) -> None:
    try:
        write_atomically(path, result_file_bytes(result.pixels, result.data, image, output_format))
    except (OSError, StructureError) as error:
        target.undelivered(result)
        reason = (error.strerror or type(error).__name__) if isinstance(error, OSError) else str(error).rstrip(".")
        raise FileAccessError(f"Could not write {path} ({reason}) after the service answered; "
                              f"{target.kept_sentence(result)}.") from None
    target.delivered(result)


def _check_parameters(args: argparse.Namespace, output_format: str) -> None:
    try:
        validate_parameters(args.prompt, args.control_strength, args.negative_prompt, args.seed, output_format)
    except InputError as error:
        raise UsageError(str(error)) from None


def _request(args: argparse.Namespace, image: InputImage, seed: int, output_format: str) -> StructureRequest:
    return StructureRequest(image=image.upload, prompt=args.prompt, control_strength=args.control_strength,
                            negative_prompt=args.negative_prompt, seed=seed, output_format=output_format)


def _credits_text(result: StructureResult, from_store: bool) -> str:
    if from_store:
        return "0 credits (kept from an earlier run)"
    return f"{result.credits} credits" if result.credits else "0 credits (free stand-in)"


# --- commands --------------------------------------------------------------------------

def cmd_generate(args: argparse.Namespace) -> int:
    """Everything about the files is checked before the request, because the answer is paid for."""
    _check_parameters(args, "png" if args.format is None else args.format)
    output_format = check_output_file(args.output, args.format)
    image = read_input_image(args.input)
    with RequestTarget.open(args) as target:
        result, from_store = target.generate(_request(args, image, args.seed, output_format), str(args.output))
        _write_result(args.output, image, result, output_format, target)
    print(f"seed {result.seed} · {_credits_text(result, from_store)} · wrote {args.output} "
          f"({image.size.width}x{image.size.height} {output_format})")
    return 0


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
        line = (f"[{'#' * filled}{'.' * (bar - filled)}] {progress.done}/{self.total} "
                f"· {progress.credits} credits · {progress.message}")
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
            sys.stderr.write("\nstopping: no new requests; the ones in flight finish, because the service is already "
                             "making them (Ctrl-C again to drop them: they may still be charged)\n")
        elif not self.drop_in_flight.is_set():
            self.drop_in_flight.set()
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator["_Interrupts"]:
        """Handle SIGINT for the block, unless it was ignored (nohup, a background job): then it stays so."""
        inherited = signal.getsignal(signal.SIGINT)
        if threading.current_thread() is not threading.main_thread() or inherited is signal.SIG_IGN:
            yield self
            return
        signal.signal(signal.SIGINT, self)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, inherited)


class _BatchFiles:
    """The files side of one batch run: which inputs still need a result, reading them, writing results."""

    def __init__(self, args: argparse.Namespace, inputs: list[Path], targets: list[Path],
                 output_format: str, target: RequestTarget, interrupts: _Interrupts) -> None:
        self.args = args
        self.interrupts = interrupts
        self.inputs = inputs
        self.targets = targets
        self.output_format = output_format
        self.target = target
        self.seeds = batch_seeds(args.seed, len(inputs))
        # An output that exists (and is not empty) is finished: that is what makes a run resumable.
        self.todo = [i for i, path in enumerate(targets) if not (path.is_file() and path.stat().st_size > 0)]
        self._images: dict[int, InputImage] = {}
        self._lock = threading.Lock()
        self.started: set[int] = set()
        self.not_written: dict[int, FileAccessError] = {}

    def make_request(self, slot: int) -> StructureRequest:
        if self.interrupts.stop_sending.is_set():
            raise CancelledError("not sent: the run was interrupted")
        index = self.todo[slot]
        image = read_input_image(self.inputs[index])
        with self._lock:
            self._images[slot] = image
            self.started.add(slot)
        return _request(self.args, image, self.seeds[index], self.output_format)

    def on_result(self, slot: int, result: StructureResult) -> None:
        with self._lock:
            image = self._images.pop(slot)
        try:
            _write_result(self.targets[self.todo[slot]], image, result, self.output_format, self.target)
        except FileAccessError as error:
            # Paid for, so it counts as done for the credits; reported apart as not written.
            with self._lock:
                self.not_written[slot] = error

    def name(self, slot: int) -> str:
        return self.inputs[self.todo[slot]].name

    def label(self, slot: int) -> str:
        """What the store records with a result: the output it was meant for."""
        return str(self.targets[self.todo[slot]])


def cmd_batch(args: argparse.Namespace) -> int:
    """One request per image of a folder; everything that can be checked is checked before the first."""
    output_format = args.format or "png"
    _check_parameters(args, output_format)
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
                report = run_batch(target.client, len(files.todo), files.make_request, on_result=files.on_result,
                                   store=target.store, label=files.label, max_concurrency=concurrency,
                                   on_progress=progress, should_cancel=interrupts.drop_in_flight.is_set)
            finally:
                progress.close()
    return _summarise(report, files, skipped, target)


def _summarise(report: BatchReport, files: _BatchFiles, skipped: int, target: RequestTarget) -> int:
    interrupted = files.interrupts.stop_sending.is_set()
    not_sent = {slot for slot, error in report.failures.items()
                if interrupted and isinstance(error, CancelledError) and slot not in files.started}
    for slot, error in sorted(report.failures.items()):
        if slot not in not_sent:
            print(f"failed: {files.name(slot)}: {error}", file=sys.stderr)
    for slot, error in sorted(files.not_written.items()):
        print(f"not written: {files.name(slot)}: {error}", file=sys.stderr)
    written = report.done - len(files.not_written)
    if interrupted:
        unreadable = [slot for slot in report.failures if slot not in files.started and slot not in not_sent]
        left = len(files.todo) - len(files.started) - len(unreadable)
        dropped = len(files.started - set(report.seeds) - set(report.failures))
        stopped = (f"; {dropped} request(s) in flight were dropped, and the service may have charged for those "
                   "whose upload had finished" if dropped and not target.free else "")
        print(f"interrupted: {written} of {len(files.todo)} image(s) done and written, {report.credits} credits "
              f"paid for them, {left} not sent{stopped}; run the same command again to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"done {written}, failed {len(report.failures) + len(files.not_written)}, skipped {skipped}, "
          f"credits {report.credits}")
    return EXIT_FAILED if report.failures or files.not_written else 0


def _export_name(entry: StoredResult, folder: Path, taken: set[str]) -> Path:
    """A file name for an exported result: its intended output's name, with the extension of its real format."""
    stem = re.sub(r"[^\w.-]+", "_", Path(entry.label).stem).strip("._")[:80] if entry.label else ""
    suffix = FORMAT_SUFFIXES.get(entry.format, "." + entry.format)
    name = f"{stem or 'result'}{suffix}"
    if name.lower() in taken or (folder / name).exists():
        name = f"{stem or 'result'}-{entry.entry_id[:8]}{suffix}"
    taken.add(name.lower())
    return folder / name


def cmd_results(args: argparse.Namespace) -> int:
    """List the results paid for and never delivered, or write them out with --export."""
    store = ResultStore.from_env()
    if store.directory is None:
        print("The result store is off (AITHRIVING_CACHE_DIR=off), so nothing is kept between runs.")
        return 0
    waiting = store.undelivered()
    if args.export is not None:
        check_writable_folder(args.export)
    if not waiting:
        print(f"No paid results are waiting in {store.directory}: every one kept there was delivered.")
        return 0
    if args.export is None:
        for entry in waiting:
            paid = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.paid_at))
            print(f"{entry.entry_id[:12]}  {paid}  seed {entry.seed}  {entry.format}  {len(entry.data) // 1024} KB"
                  f"  for {entry.label or '(no label)'}")
        print(f"{len(waiting)} paid result(s) not delivered, in {store.directory}; "
              "`structure-api results --export DIR` writes them out.")
        return 0
    taken: set[str] = set()
    for entry in waiting:
        path = _export_name(entry, args.export, taken)
        try:
            write_atomically(path, entry.data)
        except OSError as error:
            raise FileAccessError(f"Could not write {path} ({error.strerror or type(error).__name__}); the result "
                                  f"stays in the result store ({store.directory}).") from None
        store.mark_delivered(entry)
        print(f"wrote {path} (seed {entry.seed}, for {entry.label or '(no label)'})")
    # The service's own bytes: at the size that was sent, which differs from the input's when it was fitted.
    print(f"exported {len(waiting)} result(s) to {args.export}, exactly as the service sent them.")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the stand-in until Ctrl-C."""
    from .standin import serve

    api_key = None
    if args.require_key:
        from .config import load_api_key

        api_key = load_api_key().reveal()

    def ready(url: str) -> None:
        key = "<your key>" if args.require_key else "local"
        # The address ends the first line: scripts (benchmarks/servers.py) read it from there.
        print(f"Structure stand-in listening on {url}", flush=True)
        print("  (answers like the real service, with generated images; free: no credits are spent)", flush=True)
        print("Point ComfyUI or structure-api at it by setting both variables:", flush=True)
        print(f"  export AITHRIVING_BASE_URL={url}", flush=True)
        print(f"  export AITHRIVING_API_KEY={key}", flush=True)

    try:
        server = serve(host=args.host, port=args.port, api_key=api_key, latency=args.latency, ready=ready,
                       rate_limit=args.rate_limit, lockout=args.lockout)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise FileAccessError(f"Port {args.port} is already in use; choose another with --port, "
                                  "or leave --port out to take a free one.") from None
        raise FileAccessError(f"Cannot listen on {args.host}:{args.port}: "
                              f"{error.strerror or type(error).__name__}.") from None
    limited = server.rate_limit
    refused = f", {limited.refused} refused with 429 in {limited.lockouts} lock-out(s)" if limited else ""
    print(f"stopped: {server.credits_spent // CREDITS_PER_IMAGE} image(s) generated{refused}", flush=True)
    return 0


# --- argument parsing ------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse, but its refusals are the same one ``error:`` line as ours."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
        self.exit(EXIT_USAGE)


def _number(text: str, *, low: float, high: float, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number {what}, not {text!r}") from None
    if not (math.isfinite(value) and low <= value <= high):
        raise argparse.ArgumentTypeError(f"must be {what}, not {text}")
    return value


def _whole(text: str, *, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number from {low} to {high}, not {text!r}") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be from {low} to {high}, not {value}")
    return value


def _strength(text: str) -> float:
    return _number(text, low=MIN_CONTROL_STRENGTH, high=MAX_CONTROL_STRENGTH,
                   what=f"between {MIN_CONTROL_STRENGTH:g} and {MAX_CONTROL_STRENGTH:g}")


def _seed(text: str) -> int:
    return _whole(text, low=0, high=MAX_SEED)


def _seconds(text: str) -> float:
    value = _number(text, low=0.0, high=math.inf, what="a positive number of seconds")
    if value == 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


def _latency(text: str) -> float:
    return _number(text, low=0.0, high=3600.0, what="from 0 to 3600 seconds")


def _rate_limit(text: str):
    from .ratelimit import parse_rate_limit

    try:
        return parse_rate_limit(text, source="--rate-limit")
    except StructureError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _lockout(text: str) -> float:
    return _number(text, low=0.0, high=86400.0, what="between 0 and 86400 seconds")


def _concurrency(text: str) -> int:
    return _whole(text, low=1, high=MAX_CONCURRENCY)


def _port(text: str) -> int:
    return _whole(text, low=0, high=65535)


def _add_generation_options(sub: argparse.ArgumentParser) -> None:
    """The options generate and batch share."""
    sub.add_argument("--prompt", required=True, help=f"what the output should show ({PROMPT_RANGE_TEXT})")
    sub.add_argument("--negative-prompt", default="", help="what the output should not show")
    sub.add_argument("--control-strength", type=_strength, default=DEFAULT_CONTROL_STRENGTH,
                     help=f"{MIN_CONTROL_STRENGTH:g}..{MAX_CONTROL_STRENGTH:g}, how closely to follow the "
                          "input's structure (default %(default)s)")
    sub.add_argument("--seed", type=_seed, default=0,
                     help=f"0..{MAX_SEED}; 0 lets the service pick (default)")
    sub.add_argument("--local", action="store_true",
                     help="use an in-process local stand-in instead of the paid service (no key needed)")
    sub.add_argument("--no-cache", action="store_true",
                     help="keep paid results in memory for this command only, not in the result store")
    sub.add_argument("--timeout", type=_seconds, default=DEFAULT_READ_TIMEOUT,
                     help="seconds to wait for each answer (default %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``structure-api``."""
    parser = _Parser(
        prog="structure-api",
        description="Generate images that keep the structure of an input image (AIThriving Structure).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log each request, retry and answer (status, request id, time) to stderr")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = commands.add_parser("generate", help="generate one image")
    gen.add_argument("input", type=Path, metavar="INPUT", help="input image (PNG, JPEG or WebP)")
    gen.add_argument("-o", "--output", type=Path, required=True, metavar="OUTPUT",
                     help="where to write the result: a .png, .jpg or .webp file")
    gen.add_argument("--format", choices=OUTPUT_FORMATS, default=None,
                     help="output format (default: from the output file's extension, which must agree)")
    _add_generation_options(gen)
    gen.set_defaults(run=cmd_generate)

    bat = commands.add_parser("batch", help="generate one image per file in a folder (resumable)")
    bat.add_argument("input_dir", type=Path, metavar="INPUT_DIR")
    bat.add_argument("-o", "--output-dir", type=Path, required=True, metavar="OUTPUT_DIR")
    bat.add_argument("--format", choices=OUTPUT_FORMATS, default=None, help="output format (default png)")
    bat.add_argument("--concurrency", type=_concurrency, default=None,
                     help=f"requests at once, 1 to {MAX_CONCURRENCY} "
                          f"(default: AITHRIVING_MAX_CONCURRENCY or {DEFAULT_MAX_CONCURRENCY})")
    _add_generation_options(bat)
    bat.set_defaults(run=cmd_batch)

    res = commands.add_parser("results", help="list paid results never written out, or --export them")
    res.add_argument("--export", type=Path, default=None, metavar="DIR",
                     help="write every paid result not yet delivered into DIR, exactly as the service sent it")
    res.set_defaults(run=cmd_results)

    srv = commands.add_parser("serve", help="run the local stand-in server for offline work and tests")
    srv.add_argument("--port", type=_port, default=0, help="port, 0 to 65535 (default 0: a free one)")
    srv.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    srv.add_argument("--latency", type=_latency, default=0.0, help="seconds to wait before each answer")
    srv.add_argument("--rate-limit", type=_rate_limit, default=None, metavar="N/SECONDS",
                     help="model the service's limit, e.g. 150/10: past N requests in SECONDS, 429s (default: none)")
    srv.add_argument("--lockout", type=_lockout, default=60.0, metavar="SECONDS",
                     help="how long 429s last once --rate-limit is passed (default %(default)g, as the service)")
    srv.add_argument("--require-key", action="store_true",
                     help="check the authorization header against your configured key")
    srv.set_defaults(run=cmd_serve)
    return parser


@contextlib.contextmanager
def _verbose_log(verbose: bool) -> Iterator[None]:
    """With -v, this package's records (never another library's) go to stderr for the command's life."""
    if not verbose:
        yield
        return
    logger = logging.getLogger("structure_api")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; expected failures print one line on stderr and return non-zero."""
    args = build_parser().parse_args(argv)
    try:
        with _verbose_log(args.verbose):
            return args.run(args)
    except (KeyboardInterrupt, CancelledError):
        print("interrupted: nothing more was written (a request in flight may have been charged if its upload "
              "had finished; any answer that arrived is kept: see `structure-api results`)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except StructureError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILED
