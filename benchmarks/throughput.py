"""Throughput at the service's own limit: ``structure-api batch`` against a stand-in that locks out like the
upstream.

300 small images through the CLI at 32 in flight, against ``structure-api serve --latency 2
--rate-limit 150/10 --lockout 60`` (both in processes of their own). With the pacer every image
should arrive with no 429 at close to 15 images/s; without it (``AITHRIVING_RATE_LIMIT=off``)
the batch runs into the lock-out, and the row says what that costs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .content import photo_like
from .servers import ROOT, standin

LIMIT_REQUESTS = 150
LIMIT_SECONDS = 10.0
LOCKOUT_SECONDS = 60.0
LATENCY = 2.0
CONCURRENCY = 32
# The unpaced run waits out a 60 s lock-out (its 429s, free, are retried for 150 s); past this
# it is stopped and reported as such.
RUN_TIMEOUT = 300.0
_GENERATED = re.compile(r"stopped: (\d+) image\(s\) generated")
_STOPPED = re.compile(r"stopped: (\d+) image\(s\) generated, (\d+) refused with 429 in (\d+) lock-out")
_SUMMARY = re.compile(r"done (\d+), failed (\d+), skipped (\d+)")


@dataclass
class ThroughputRun:
    """One CLI batch against the limited stand-in."""

    label: str
    paced: bool
    images: int
    delivered: int  # output files written
    failed: int
    generated: int  # answers the stand-in generated (6 credits each on the real service)
    refused_429: int  # 429s the stand-in answered (free)
    lockouts: int
    seconds: float  # wall time of the whole `structure-api batch` process, start-up included
    timed_out: bool
    limited: bool = True  # False: the stand-in had no limit (the ceiling the batch could reach)

    @property
    def per_second(self) -> float:
        return self.delivered / self.seconds

    @property
    def ratio_to_limit(self) -> float:
        return self.per_second / (LIMIT_REQUESTS / LIMIT_SECONDS)


def _inputs(folder: Path, count: int, side: int) -> None:
    for index in range(count):
        pixels = (np.clip(photo_like(side, side, seed=index), 0, 1) * 255 + 0.5).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{index:04d}.png", compress_level=1)


def _run(label: str, paced: bool, inputs: Path, work: Path, limited: bool = True) -> ThroughputRun:
    output = work / f"out-{label}"
    limit = f"{LIMIT_REQUESTS}/{LIMIT_SECONDS:g}"
    options = ("--rate-limit", limit, "--lockout", repr(LOCKOUT_SECONDS)) if limited else ()
    with standin(LATENCY, *options) as server:
        env = {name: value for name, value in os.environ.items() if not name.startswith("AITHRIVING_")}
        env.update(
            AITHRIVING_BASE_URL=server.url,
            AITHRIVING_API_KEY="benchmark",
            AITHRIVING_CACHE_DIR=str(work / f"store-{label}"),
            AITHRIVING_RATE_LIMIT=limit if paced else "off",
        )
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        command = [
            sys.executable,
            "-m",
            "structure_api",
            "batch",
            str(inputs),
            "-o",
            str(output),
            "--prompt",
            "a benchmark picture",
            "--seed",
            "1",
            "--concurrency",
            str(CONCURRENCY),
        ]
        started = time.perf_counter()
        timed_out = False
        try:
            finished = subprocess.run(
                command,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=RUN_TIMEOUT,
            )
            stdout = finished.stdout
        except subprocess.TimeoutExpired as expired:
            timed_out = True
            stdout = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        seconds = time.perf_counter() - started
    summary = _SUMMARY.search(stdout)
    stopped = next((m for m in map(_STOPPED.search, server.final_output) if m), None)
    generated = next((m for m in map(_GENERATED.search, server.final_output) if m), None)
    if generated is None:
        raise RuntimeError(f"the stand-in did not sum up its run: {server.final_output!r}")
    delivered = len([p for p in output.iterdir() if p.suffix == ".png"]) if output.is_dir() else 0
    return ThroughputRun(
        label=label,
        paced=paced,
        images=len(list(inputs.iterdir())),
        delivered=delivered,
        failed=int(summary.group(2)) if summary else -1,
        generated=int(generated.group(1)),
        refused_429=int(stopped.group(2)) if stopped else 0,
        lockouts=int(stopped.group(3)) if stopped else 0,
        seconds=seconds,
        timed_out=timed_out,
        limited=limited,
    )


def measure_throughput(count: int = 300, side: int = 96, with_unpaced: bool = True) -> list[ThroughputRun]:
    """The paced run and (``with_unpaced``) the same batch against an unlimited stand-in and with the pacer
    off."""
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        inputs = work / "in"
        inputs.mkdir()
        _inputs(inputs, count, side)
        runs.append(_run("paced", True, inputs, work))
        if with_unpaced:
            runs.append(_run("ceiling", False, inputs, work, limited=False))
            # The stand-in of the first run is gone, and its window with it: the second starts fresh.
            runs.append(_run("unpaced", False, inputs, work))
    return runs


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.throughput [COUNT]``: this benchmark alone, printed (nothing written)."""
    count = int((argv or sys.argv[1:] or ["300"])[0])
    for run in measure_throughput(count, with_unpaced="--paced-only" not in (argv or sys.argv[1:])):
        print(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
