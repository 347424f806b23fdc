"""The command line: the parser, its value types and the options the commands share."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .._version import __version__
from ..batch import DEFAULT_MAX_CONCURRENCY
from ..client import DEFAULT_READ_TIMEOUT
from ..contract import (
    DEFAULT_CONTROL_STRENGTH,
    LOCKOUT_SECONDS,
    MAX_CONTROL_STRENGTH,
    MAX_SEED,
    MIN_CONTROL_STRENGTH,
    OUTPUT_FORMATS,
    PROMPT_RANGE_TEXT,
)
from ..errors import StructureError
from .batch import cmd_batch
from .commands import cmd_generate, cmd_results, cmd_serve
from .exits import EXIT_USAGE

MAX_CONCURRENCY = 32


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
        raise argparse.ArgumentTypeError(
            f"must be a whole number from {low} to {high}, not {text!r}"
        ) from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be from {low} to {high}, not {value}")
    return value


def _strength(text: str) -> float:
    return _number(
        text,
        low=MIN_CONTROL_STRENGTH,
        high=MAX_CONTROL_STRENGTH,
        what=f"between {MIN_CONTROL_STRENGTH:g} and {MAX_CONTROL_STRENGTH:g}",
    )


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
    from ..ratelimit import parse_rate_limit

    try:
        return parse_rate_limit(text, source="--rate-limit")
    except StructureError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _lockout(text: str) -> float:
    return _number(text, low=0.0, high=86400.0, what="between 0 and 86400 seconds")


def _concurrency(text: str) -> int:
    return _whole(text, low=1, high=MAX_CONCURRENCY)


def _host(text: str) -> str:
    from ..standin.server import check_listen_address

    try:
        check_listen_address(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).rstrip(".")) from None
    return text


def _port(text: str) -> int:
    return _whole(text, low=0, high=65535)


class _OldSpelling(argparse.Action):
    """Set a flag given by its old name, and say its new name on stderr."""

    def __init__(self, option_strings: Sequence[str], dest: str, new: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)
        self.new = new

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        print(
            f"structure-api: {option_string} is now {self.new}; the old name goes in the next release",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, True)


def _add_generation_options(sub: argparse.ArgumentParser) -> None:
    """Add the options generate and batch share."""
    sub.add_argument("--prompt", required=True, help=f"what the output should show ({PROMPT_RANGE_TEXT})")
    sub.add_argument("--negative-prompt", default="", help="what the output should not show")
    sub.add_argument(
        "--control-strength",
        type=_strength,
        default=DEFAULT_CONTROL_STRENGTH,
        help=f"{MIN_CONTROL_STRENGTH:g}..{MAX_CONTROL_STRENGTH:g}, how closely to follow the "
        "input's structure (default %(default)s)",
    )
    sub.add_argument(
        "--seed", type=_seed, default=0, help=f"0..{MAX_SEED}; 0 lets the service pick (default)"
    )
    sub.add_argument(
        "--offline",
        action="store_true",
        help="use an in-process stand-in instead of the paid service (no key needed)",
    )
    sub.add_argument(
        "--no-store",
        action="store_true",
        help="keep paid results in memory for this command only, not in the result store",
    )
    # The old spellings, for one release.
    sub.add_argument("--local", action=_OldSpelling, dest="offline", new="--offline", help=argparse.SUPPRESS)
    sub.add_argument(
        "--no-cache", action=_OldSpelling, dest="no_store", new="--no-store", help=argparse.SUPPRESS
    )
    sub.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_READ_TIMEOUT,
        help="seconds to wait for each answer (default %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of ``structure-api``."""
    parser = _Parser(
        prog="structure-api",
        description="Generate images that keep the structure of an input image (AIThriving Structure).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log each request, retry and answer (status, request id, time) to stderr",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = commands.add_parser("generate", help="generate one image")
    gen.add_argument("input", type=Path, metavar="INPUT", help="input image (PNG, JPEG or WebP)")
    gen.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        metavar="OUTPUT",
        help="where to write the result: a .png, .jpg or .webp file",
    )
    gen.add_argument(
        "--format",
        choices=OUTPUT_FORMATS,
        default=None,
        help="output format (default: from the output file's extension, which must agree)",
    )
    _add_generation_options(gen)
    gen.set_defaults(run=cmd_generate)

    bat = commands.add_parser("batch", help="generate one image per file in a folder (resumable)")
    bat.add_argument("input_dir", type=Path, metavar="INPUT_DIR")
    bat.add_argument("-o", "--output-dir", type=Path, required=True, metavar="OUTPUT_DIR")
    bat.add_argument("--format", choices=OUTPUT_FORMATS, default=None, help="output format (default png)")
    bat.add_argument(
        "--concurrency",
        type=_concurrency,
        default=None,
        help=f"requests at once, 1 to {MAX_CONCURRENCY} "
        f"(default: AITHRIVING_MAX_CONCURRENCY or {DEFAULT_MAX_CONCURRENCY})",
    )
    _add_generation_options(bat)
    bat.set_defaults(run=cmd_batch)

    res = commands.add_parser("results", help="list paid results never written out, or --export them")
    res.add_argument(
        "--export",
        type=Path,
        default=None,
        metavar="DIR",
        help="write every paid result not yet delivered into DIR, exactly as the service sent it",
    )
    res.set_defaults(run=cmd_results)

    srv = commands.add_parser("serve", help="run the stand-in server for offline work and tests")
    srv.add_argument("--port", type=_port, default=0, help="port, 0 to 65535 (default 0: a free one)")
    srv.add_argument(
        "--host",
        type=_host,
        default="127.0.0.1",
        metavar="ADDRESS",
        help="the address to listen on (default 127.0.0.1: this machine only); never all interfaces",
    )
    srv.add_argument(
        "--latency",
        type=_latency,
        default=0.0,
        help="seconds from reading a request to its answer, rendering included",
    )
    srv.add_argument(
        "--rate-limit",
        type=_rate_limit,
        default=None,
        metavar="N/SECONDS",
        help="model the service's limit, e.g. 150/10: past N requests in SECONDS, 429s (default: none)",
    )
    srv.add_argument(
        "--lockout",
        type=_lockout,
        default=LOCKOUT_SECONDS,
        metavar="SECONDS",
        help="how long 429s last once --rate-limit is passed (default %(default)g, as the service)",
    )
    srv.add_argument(
        "--require-key",
        action="store_true",
        help="check the authorization header against your configured key",
    )
    srv.set_defaults(run=cmd_serve)
    return parser
