"""The ``structure-api`` command: generate, batch, results, serve.

``args`` builds the command line, ``target`` is where requests go and how results are written,
``commands`` holds generate, results and serve, ``batch`` the batch command, ``exits`` the exit statuses.

Exit status: 0 done, 1 something failed while running or a file cannot work (input, output, port),
2 an option's value cannot work (argparse's check or ours: the same one ``error:`` line either way),
130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator, Sequence

from ..errors import CancelledError, StructureError
from .args import build_parser
from .exits import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, UsageError

__all__ = ["main", "build_parser", "EXIT_FAILED", "EXIT_USAGE", "EXIT_INTERRUPTED", "UsageError"]


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


def _what_an_interrupt_left(args: argparse.Namespace) -> str:
    """Say what a Ctrl-C cost, truly for each command: only a request to the paid service can be charged."""
    if args.command == "serve":
        return "the stand-in stopped (it charges nothing)"
    if args.command == "results":
        return "this command sends no request, so nothing was charged; what was not exported yet stays kept"
    if getattr(args, "offline", False):
        return "nothing more was written (the stand-in charges nothing)"
    return (
        "nothing more was written (a request in flight may have been charged if its upload had finished; "
        "any answer that arrived is kept: see `structure-api results`)"
    )


def _survive_any_console() -> None:
    """Make stdout and stderr write what their encoding cannot hold as escapes instead of failing.

    Redirected on Windows they encode with the ANSI code page (cp932, cp874...), strictly: a file name
    or a sign outside it would end the command with UnicodeEncodeError, after it paid.
    """
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None and getattr(stream, "errors", "strict") == "strict":
            try:
                reconfigure(errors="backslashreplace")
            except (ValueError, OSError):
                pass


def _ctrl_break_as_ctrl_c() -> None:
    """On Windows, Ctrl-Break ends a program at once by default: make it a Ctrl-C, said and handled as one."""
    if (
        sys.platform == "win32"
        and threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGBREAK) is signal.SIG_DFL
    ):
        signal.signal(signal.SIGBREAK, signal.default_int_handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; expected failures print one line on stderr and return non-zero."""
    _survive_any_console()
    _ctrl_break_as_ctrl_c()
    args = build_parser().parse_args(argv)
    try:
        with _verbose_log(args.verbose):
            return args.run(args)
    except (KeyboardInterrupt, CancelledError):
        print(f"interrupted: {_what_an_interrupt_left(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except StructureError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILED
