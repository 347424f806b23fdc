"""The ``structure-api`` command: generate, batch, serve."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterator, Optional, Sequence

from . import __version__
from .batch import BatchProgress, generate_stored, max_concurrency_from_env, run_batch
from .store import ResultStore
from .client import (
    DEFAULT_CONTROL_STRENGTH,
    DEFAULT_READ_TIMEOUT,
    OUTPUT_FORMATS,
    StructureClient,
    StructureRequest,
    StructureResult,
    check_image_limits,
    validate_parameters,
)
from .errors import CancelledError, InputError, InvalidImageError, StructureError
from .images import (
    EncodedImage,
    FitPlan,
    ImageSize,
    decode_image,
    detect_format,
    encode_upload,
    fit_to_limits,
    restore_from_fit,
)
from .pipeline import batch_seeds

# The user's own files: large camera photos are fine (they are fitted), decompression bombs are not.
MAX_INPUT_PIXELS = 150_000_000
INPUT_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
_SUFFIX_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
_FORMAT_SUFFIX = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
_MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class CommandError(Exception):
    """An expected failure of a command: printed as one line, exit status 1."""


# --- preparing inputs and writing outputs ----------------------------------------------

class PreparedImage:
    """An input file ready to send, and how to bring the result back to its size."""

    def __init__(self, path: Path) -> None:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CommandError(f"Cannot read {path}: {exc.strerror or exc}.") from None
        try:
            pixels = decode_image(data, max_pixels=MAX_INPUT_PIXELS)
        except StructureError:
            raise CommandError(
                f"{path} is not an image this tool can read (PNG, JPEG or WebP of at most "
                f"{MAX_INPUT_PIXELS // 1_000_000} megapixels).") from None
        height, width = pixels.shape[:2]
        self.size = ImageSize(width=width, height=height)
        fmt = detect_format(data)
        original = EncodedImage(data=data, format=fmt, mime_type=_MIME[fmt], size=self.size) if fmt else None
        self.plan: Optional[FitPlan] = None
        try:
            if original is None:
                raise InputError("not a format the service takes")
            check_image_limits(original)
            self.upload = original  # already acceptable: send the file as it is
        except InputError:
            fitted, plan = fit_to_limits(pixels)
            self.plan = plan if plan.changed else None
            self.upload = encode_upload(fitted)


def _write_output(path: Path, prepared: PreparedImage, result: StructureResult, output_format: str) -> ImageSize:
    """Write the server's bytes when they already fit; otherwise restore the input's size first."""
    height, width = result.pixels.shape[:2]
    if prepared.plan is None and ImageSize(width=width, height=height) == prepared.size \
            and result.format == output_format:
        data = result.data
    else:
        plan = prepared.plan or FitPlan.identity(prepared.size)
        data = _encode_file(restore_from_fit(result.pixels, plan), output_format)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target and rename, so an interrupted run never leaves a half file
    # that `batch` would take for a finished one.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return prepared.size


def _encode_file(pixels, output_format: str) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    options = {"png": {}, "jpeg": {"quality": 95}, "webp": {"quality": 95}}[output_format]
    Image.fromarray(pixels).save(buffer, format=output_format.upper(), **options)
    return buffer.getvalue()


def _format_for(output: Path, requested: Optional[str]) -> str:
    if requested:
        return requested
    return _SUFFIX_FORMATS.get(output.suffix.lower(), "png")


# --- client set-up ---------------------------------------------------------------------

@contextlib.contextmanager
def _client(args: argparse.Namespace) -> Iterator[StructureClient]:
    """A client for the real service, or for an in-process stand-in with --local."""
    if args.local:
        from .standin import StandInServer

        with StandInServer(free=True) as server:
            print(f"using the local stand-in at {server.url} (no key, no credits)", file=sys.stderr)
            with StructureClient(api_key="local-stand-in", base_url=server.url,
                                 read_timeout=args.timeout) as client:
                yield client
        return
    with StructureClient.from_env(read_timeout=args.timeout) as client:
        yield client


def _store(args: argparse.Namespace) -> ResultStore:
    # The stand-in's images are never mixed with paid ones (its key includes its address), but
    # --local and --no-cache keep them only for this run.
    return ResultStore(None) if args.no_cache or args.local else ResultStore.from_env()


def _credits(result_credits: int, cached: bool, local: bool) -> str:
    if local:
        return "0 credits (local stand-in)"
    return "0 credits (from the local cache)" if cached else f"{result_credits} credits"


# --- commands --------------------------------------------------------------------------

def cmd_generate(args: argparse.Namespace) -> int:
    output_format = _format_for(args.output, args.format)
    validate_parameters(args.prompt, args.control_strength, args.negative_prompt, args.seed, output_format)
    prepared = PreparedImage(args.input)
    request = StructureRequest(
        image=prepared.upload, prompt=args.prompt, control_strength=args.control_strength,
        negative_prompt=args.negative_prompt, seed=args.seed, output_format=output_format)
    store = _store(args)
    with _client(args) as client:
        result, cached = generate_stored(client, request, store, label=str(args.output))
    size = _write_output(args.output, prepared, result, output_format)
    if result.stored is not None:
        store.mark_delivered(result.stored)
    print(f"seed {result.seed} · {_credits(result.credits, cached, args.local)} · wrote {args.output} "
          f"({size.width}x{size.height} {output_format})")
    return 0


class _ProgressLine:
    """A one-line progress bar on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.tty = sys.stderr.isatty()
        self.last_done = -1

    def __call__(self, progress: BatchProgress) -> None:
        if progress.done == self.last_done and not self.tty:
            return
        self.last_done = progress.done
        width = 24
        filled = int(width * progress.done / max(1, self.total))
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {progress.done}/{self.total} "
                f"· {progress.credits} credits · {progress.message}")
        if self.tty:
            sys.stderr.write("\r" + line[:120].ljust(120))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def cmd_batch(args: argparse.Namespace) -> int:
    output_format = args.format or "png"
    validate_parameters(args.prompt, args.control_strength, args.negative_prompt, args.seed, output_format)
    if not args.input_dir.is_dir():
        raise CommandError(f"{args.input_dir} is not a folder.")
    inputs = sorted(p for p in args.input_dir.iterdir() if p.is_file() and p.suffix.lower() in INPUT_SUFFIXES)
    if not inputs:
        raise CommandError(f"{args.input_dir} holds no .png, .jpg or .webp images.")
    seeds = batch_seeds(args.seed, len(inputs))
    targets = [args.output_dir / (p.stem + _FORMAT_SUFFIX[output_format]) for p in inputs]
    todo = [i for i, target in enumerate(targets) if not (target.is_file() and target.stat().st_size > 0)]
    skipped = len(inputs) - len(todo)
    if skipped:
        print(f"skipping {skipped} image(s) already in {args.output_dir}", file=sys.stderr)
    prepared: dict[int, PreparedImage] = {}
    concurrency = args.concurrency or max_concurrency_from_env()

    def make_request(slot: int) -> StructureRequest:
        index = todo[slot]
        try:
            image = PreparedImage(inputs[index])
        except CommandError as error:
            raise InvalidImageError(str(error)) from None
        prepared[slot] = image
        return StructureRequest(
            image=image.upload, prompt=args.prompt, control_strength=args.control_strength,
            negative_prompt=args.negative_prompt, seed=seeds[index], output_format=output_format)

    store = _store(args)

    def on_result(slot: int, result: StructureResult) -> None:
        _write_output(targets[todo[slot]], prepared.pop(slot), result, output_format)
        if result.stored is not None:
            store.mark_delivered(result.stored)

    progress = _ProgressLine(len(todo))
    cancelled = threading.Event()
    with _client(args) as client:
        try:
            report = run_batch(client, len(todo), make_request, on_result=on_result, store=store,
                               label=lambda slot: str(targets[todo[slot]]),
                               max_concurrency=concurrency, on_progress=progress,
                               should_cancel=cancelled.is_set)
        except KeyboardInterrupt:
            cancelled.set()
            client.abort()
            raise
        finally:
            progress.close()
    for slot, error in sorted(report.failures.items()):
        print(f"failed: {inputs[todo[slot]].name}: {error}", file=sys.stderr)
    credits = 0 if args.local else report.credits  # the stand-in charges nothing
    print(f"done {report.done}, failed {len(report.failures)}, skipped {skipped}, credits {credits}")
    return 1 if report.failures else 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .standin import serve

    api_key = None
    if args.require_key:
        from .config import load_api_key

        api_key = load_api_key().reveal()

    def ready(url: str) -> None:
        print(f"Structure stand-in listening on {url}", flush=True)
        print(f"  export AITHRIVING_BASE_URL={url}", flush=True)
        print("  (answers like the real service, with generated images; no credits are spent)", flush=True)

    server = serve(host=args.host, port=args.port, api_key=api_key, latency=args.latency, ready=ready,
                   rate_limit=args.rate_limit, lockout=args.lockout)
    limited = server.rate_limit
    refused = f", {limited.refused} refused with 429 in {limited.lockouts} lock-out(s)" if limited else ""
    print(f"stopped: {server.credits_spent // 6} image(s) generated{refused}", flush=True)
    return 0


# --- argument parsing ------------------------------------------------------------------

def _strength(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1, not {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {text}")
    return value


def _seed(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None


def _rate_limit(text: str):
    from .ratelimit import parse_rate_limit

    try:
        return parse_rate_limit(text, source="--rate-limit")
    except StructureError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _lockout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, not {text!r}") from None
    if not 0.0 <= value <= 86400.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 86400 seconds, not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``structure-api``."""
    parser = argparse.ArgumentParser(
        prog="structure-api",
        description="Generate images that keep the structure of an input image (AIThriving Structure).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log requests and retries to stderr")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_generation_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--prompt", required=True, help="what the output should show (1 to 10000 characters)")
        sub.add_argument("--negative-prompt", default="", help="what the output should not show")
        sub.add_argument("--control-strength", type=_strength, default=DEFAULT_CONTROL_STRENGTH,
                         help="0..1, how closely to follow the input's structure (default %(default)s)")
        sub.add_argument("--seed", type=_seed, default=0, help="0..4294967294; 0 lets the service pick (default)")
        sub.add_argument("--format", choices=OUTPUT_FORMATS, default=None,
                         help="output format (default: from the output file's extension, else png)")
        sub.add_argument("--local", action="store_true",
                         help="use an in-process local stand-in instead of the paid service (no key needed)")
        sub.add_argument("--no-cache", action="store_true",
                         help="do not reuse or store paid results in the local cache")
        sub.add_argument("--timeout", type=float, default=DEFAULT_READ_TIMEOUT,
                         help="seconds to wait for each answer (default %(default)s)")

    gen = commands.add_parser("generate", help="generate one image")
    gen.add_argument("input", type=Path, metavar="INPUT", help="input image (PNG, JPEG or WebP)")
    gen.add_argument("-o", "--output", type=Path, required=True, metavar="OUTPUT", help="where to write the result")
    add_generation_options(gen)
    gen.set_defaults(run=cmd_generate)

    bat = commands.add_parser("batch", help="generate one image per file in a folder (resumable)")
    bat.add_argument("input_dir", type=Path, metavar="INPUT_DIR")
    bat.add_argument("-o", "--output-dir", type=Path, required=True, metavar="OUTPUT_DIR")
    bat.add_argument("--concurrency", type=int, default=None,
                     help="requests at once (default: AITHRIVING_MAX_CONCURRENCY or 8)")
    add_generation_options(bat)
    bat.set_defaults(run=cmd_batch)

    srv = commands.add_parser("serve", help="run the local stand-in server for offline work and tests")
    srv.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    srv.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    srv.add_argument("--latency", type=float, default=0.0, help="seconds to wait before each answer")
    srv.add_argument("--rate-limit", type=_rate_limit, default=None, metavar="N/SECONDS",
                     help="model the service's limit, e.g. 150/10: past N requests in SECONDS, 429s (default: none)")
    srv.add_argument("--lockout", type=_lockout, default=60.0, metavar="SECONDS",
                     help="how long 429s last once --rate-limit is passed (default %(default)g, as the service)")
    srv.add_argument("--require-key", action="store_true",
                     help="check the authorization header against your configured key")
    srv.set_defaults(run=cmd_serve)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; expected failures print one line on stderr and return non-zero."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except (KeyboardInterrupt, CancelledError):
        print("cancelled", file=sys.stderr)
        return 130
    except (StructureError, CommandError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
