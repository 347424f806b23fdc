"""``python -m benchmarks``: measure everything in one run, print the report and write docs/benchmarks.md."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .servers import ROOT

DEFAULT_OUTPUT = ROOT / "docs" / "benchmarks.md"
# Repeats per image side: enough for a stable median, few enough that the naive path's 2048px
# PNG (about a second each) keeps the whole run near a minute and a half on 2 cores.
REPEATS = {512: 15, 1024: 9, 2048: 5}
QUICK_REPEATS = {512: 3, 1024: 3, 2048: 1}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help="where to write the report (default: docs/benchmarks.md)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run with few repeats; its report is marked as such and not written",
    )
    args = parser.parse_args(argv)
    # The servers it starts stop on Ctrl-C (SIGINT): started in the background of a shell, this process
    # and so its children would ignore it, and every server would wait out its kill timeout.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    # The default settings are what is measured: none of the machine's own settings apply.
    for name in ("AITHRIVING_MAX_CONCURRENCY", "AITHRIVING_RATE_LIMIT", "AITHRIVING_REDIS_URL"):
        os.environ.pop(name, None)

    from . import report
    from .batch_time import measure_batch
    from .graphs import measure_graphs
    from .memory import measure_memory
    from .overhead import measure_size
    from .processes import measure_processes
    from .throughput import measure_throughput

    started = time.perf_counter()
    repeats = QUICK_REPEATS if args.quick else REPEATS
    sizes = []
    for side, count in repeats.items():
        print(f"per-image overhead at {side}x{side} ({count} repeats)...", file=sys.stderr, flush=True)
        sizes.append(measure_size(side, count))
    print("batch of 8 against the stand-in at 1 s latency...", file=sys.stderr, flush=True)
    batch = measure_batch(repeats=1 if args.quick else 5)
    print(
        "300 images through structure-api batch against the rate-limited stand-in, with and without the "
        "pacer (the run without waits out a 60 s lock-out)...",
        file=sys.stderr,
        flush=True,
    )
    throughput = measure_throughput(count=60 if args.quick else 300, with_unpaced=not args.quick)
    print(
        "graphs in a real ComfyUI: four Structure nodes vs one, and beside a 2 s local node...",
        file=sys.stderr,
        flush=True,
    )
    graphs = measure_graphs(repeats=1 if args.quick else 3)
    print(
        "3 structure-api batch processes x 150 images at once against the rate-limited stand-in: one "
        "store folder, Redis, and without sharing (which waits out a 60 s lock-out)...",
        file=sys.stderr,
        flush=True,
    )
    processes = measure_processes(per_process=40 if args.quick else 150, with_unshared=not args.quick)
    memory = []
    for concurrency in (4, 8):
        print(f"memory of 16 images at 2048x2048, {concurrency} at once...", file=sys.stderr, flush=True)
        memory.append(measure_memory(concurrency=concurrency))
    text = report.render(
        sizes,
        batch,
        memory,
        throughput,
        seconds=time.perf_counter() - started,
        quick=args.quick,
        graphs=graphs,
        processes=processes,
    )
    print(text)
    if not args.quick:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8")
        print(f"written to {args.output}", file=sys.stderr)
    return 0 if report.all_targets_met(sizes, batch, memory, throughput, processes, graphs) else 1


if __name__ == "__main__":
    sys.exit(main())
