"""The generate, results and serve commands (batch has its own module)."""

from __future__ import annotations

import argparse
import errno
import sys
import time

from ..contract import CREDITS_PER_IMAGE
from ..files import (
    FileAccessError,
    check_output_file,
    check_writable_folder,
    export_path,
    read_input_image,
    write_atomically,
)
from ..paid import deliver
from ..store import ResultStore
from .target import RequestTarget, check_params, credits_text, structure_request, write_result


def cmd_generate(args: argparse.Namespace) -> int:
    """Everything about the files is checked before the request, because the answer is paid for."""
    check_params(args, "png" if args.format is None else args.format)
    output_format = check_output_file(args.output, args.format)
    image = read_input_image(args.input)
    with RequestTarget.open(args) as target:
        result, from_store = target.generate(
            structure_request(args, image, args.seed, output_format), str(args.output)
        )
        write_result(args.output, image, result, output_format, target)
    # Seed 0 in a result: the service picked one and did not say which.
    seed = f"seed {result.seed}" if result.seed else "seed unknown"
    print(
        f"{seed} · {credits_text(result, from_store)} · wrote {args.output} "
        f"({image.size.width}x{image.size.height} {output_format})"
    )
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    """List the results kept and never delivered (paid, or free from a stand-in), or --export them."""
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
            kept = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.paid_at))
            cost = "free (stand-in)" if entry.free else "paid"
            print(
                f"{entry.entry_id[:12]}  {kept}  {cost}  seed {entry.seed}  {entry.format}  "
                f"{len(entry.data) // 1024} KB  for {entry.label or '(no label)'}"
            )
        print(
            f"{_count_by_cost(waiting)} not delivered, in {store.directory}; "
            "`structure-api results --export DIR` writes them out."
        )
        return 0
    taken: set[str] = set()
    for entry in waiting:
        path = export_path(
            args.export, label=entry.label, format=entry.format, entry_id=entry.entry_id, taken=taken
        )
        try:
            write_atomically(path, entry.data)
        except OSError as error:
            raise FileAccessError(
                f"Could not write {path} ({error.strerror or type(error).__name__}); the result "
                f"stays in the result store ({store.directory})."
            ) from None
        deliver(store, entry)
        print(f"wrote {path} (seed {entry.seed}, for {entry.label or '(no label)'})")
    # The service's own bytes: at the size that was sent, which differs from the input's when it was fitted.
    sender = "the service" if not any(entry.free for entry in waiting) else "the service (or stand-in)"
    print(f"exported {len(waiting)} result(s) to {args.export}, exactly as {sender} sent them.")
    return 0


def _count_by_cost(entries: list) -> str:
    """'3 paid result(s)', '2 free result(s) from a stand-in', or both: what the store's entries cost."""
    free = sum(1 for entry in entries if entry.free)
    paid = len(entries) - free
    parts = [f"{paid} paid result(s)"] if paid else []
    parts += [f"{free} free result(s) from a stand-in"] if free else []
    return " and ".join(parts)


# Windows' own codes: WSAEADDRINUSE, and WSAEACCES, which a bind gets for a port another program holds
# exclusively (SO_EXCLUSIVEADDRUSE) or that the system reserved.
_WSAEACCES = 10013
_WSAEADDRINUSE = 10048


def _port_taken(error: OSError) -> bool:
    """Tell whether a bind failed because another program has (or the system reserved) the port."""
    codes = {getattr(error, "winerror", None), error.errno}
    if sys.platform == "win32":
        return bool(codes & {errno.EADDRINUSE, _WSAEADDRINUSE, _WSAEACCES})
    return errno.EADDRINUSE in codes


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the stand-in until Ctrl-C."""
    from ..standin import serve

    api_key = None
    if args.require_key:
        from ..config import load_api_key

        api_key = load_api_key().reveal()

    def ready(url: str) -> None:
        key = "<your key>" if args.require_key else "stand-in"
        # The address ends the first line: scripts (benchmarks/servers.py) read it from there.
        print(f"Structure stand-in listening on {url}", flush=True)
        print(
            "  (answers like the real service, with generated images; free: no credits are spent)", flush=True
        )
        print("Point ComfyUI or structure-api at it by setting both variables:", flush=True)
        print(f"  export AITHRIVING_BASE_URL={url}", flush=True)
        print(f"  export AITHRIVING_API_KEY={key}", flush=True)

    try:
        server = serve(
            host=args.host,
            port=args.port,
            api_key=api_key,
            latency=args.latency,
            ready=ready,
            rate_limit=args.rate_limit,
            lockout=args.lockout,
        )
    except OSError as error:
        if _port_taken(error):
            raise FileAccessError(
                f"Port {args.port} is already in use; choose another with --port, "
                "or leave --port out to take a free one."
            ) from None
        raise FileAccessError(
            f"Cannot listen on {args.host}:{args.port}: {error.strerror or type(error).__name__}."
        ) from None
    limited = server.rate_limit
    refused = f", {limited.refused} refused with 429 in {limited.lockouts} lock-out(s)" if limited else ""
    print(f"stopped: {server.credits_spent // CREDITS_PER_IMAGE} image(s) generated{refused}", flush=True)
    return 0
