"""Three processes, one key: ``structure-api batch`` x 3 at once against a stand-in that locks out.

Three runs of 150 small images each, all at the same moment, against ``structure-api serve
--latency 2 --rate-limit 150/10 --lockout 60`` (a process of its own), sharing the key's rate
budget three ways:

- **one machine**: the three share one result store folder (the default: nothing to configure);
- **Redis**: each has a folder of its own (three "machines") and ``AITHRIVING_REDIS_URL`` points
  all three at one ``redis-server``;
- **without sharing** (the comparison): separate folders, no Redis; each process paces as if
  it owned the whole limit.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .servers import ROOT, redis_server, standin
from .throughput import LATENCY, LIMIT_REQUESTS, LIMIT_SECONDS, LOCKOUT_SECONDS, _inputs

PROCESSES = 3
PER_PROCESS = 150
# 16 in flight per process, 48 in all: at 2 s an answer, enough to start 24 requests a second.
CONCURRENCY = 16
RUN_TIMEOUT = 400.0
RATIO_TARGET = 0.9
_STOPPED = re.compile(r"stopped: (\d+) image\(s\) generated(?:, (\d+) refused with 429 in (\d+) lock-out)?")
_FALLBACK = ("counted in this process only", "cannot be used", "stopped working")


@dataclass
class ProcessesRun:
    """Three CLI batches at once against one limited stand-in."""

    label: str
    images: int
    delivered: int = 0
    failed_processes: int = 0
    generated: int = 0  # answers the stand-in generated: each image paid once when equal to images
    refused_429: int = 0
    lockouts: int = 0
    seconds: float = 0.0  # from starting the three processes to the last one's exit
    timed_out: bool = False
    fallbacks: list[str] = field(default_factory=list)  # a process said its budget was not shared
    not_run: str | None = None

    @property
    def per_second(self) -> float:
        return self.delivered / self.seconds if self.seconds else 0.0

    @property
    def ratio_to_limit(self) -> float:
        return self.per_second / (LIMIT_REQUESTS / LIMIT_SECONDS)

    @property
    def ok(self) -> bool:
        """All delivered, each paid once, no 429, at >= 0.9x the limit's rate, the budget shared."""
        return (
            self.not_run is None
            and not self.timed_out
            and self.failed_processes == 0
            and self.delivered == self.images
            and self.generated == self.images
            and self.refused_429 == 0
            and not self.fallbacks
            and self.ratio_to_limit >= RATIO_TARGET
        )


def _run(label: str, work: Path, inputs: list[Path], per_process: int, env_for) -> ProcessesRun:
    run = ProcessesRun(label=label, images=PROCESSES * per_process)
    limit = f"{LIMIT_REQUESTS}/{LIMIT_SECONDS:g}"
    with standin(LATENCY, "--rate-limit", limit, "--lockout", repr(LOCKOUT_SECONDS)) as server:
        base = {name: value for name, value in os.environ.items() if not name.startswith("AITHRIVING_")}
        base.update(AITHRIVING_BASE_URL=server.url, AITHRIVING_API_KEY="benchmark")
        base["PYTHONPATH"] = str(ROOT) + (os.pathsep + base["PYTHONPATH"] if base.get("PYTHONPATH") else "")
        processes = []
        started = time.perf_counter()
        for index, folder in enumerate(inputs):
            command = [
                sys.executable,
                "-m",
                "structure_api",
                "batch",
                str(folder),
                "-o",
                str(work / f"out-{label}-{index}"),
                "--prompt",
                "a benchmark picture",
                "--seed",
                str(1 + index * per_process),
                "--concurrency",
                str(CONCURRENCY),
            ]
            processes.append(
                subprocess.Popen(
                    command,
                    cwd=ROOT,
                    env={**base, **env_for(index)},
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        deadline = started + RUN_TIMEOUT
        for process in processes:
            try:
                _, stderr = process.communicate(timeout=max(1.0, deadline - time.perf_counter()))
            except subprocess.TimeoutExpired:
                run.timed_out = True
                process.kill()
                _, stderr = process.communicate()
            run.failed_processes += process.returncode != 0
            run.fallbacks += [line for line in stderr.splitlines() if any(text in line for text in _FALLBACK)]
        run.seconds = time.perf_counter() - started
    stopped = next((m for m in map(_STOPPED.search, server.final_output) if m), None)
    if stopped is None:
        raise RuntimeError(f"the stand-in did not sum up its run: {server.final_output!r}")
    run.generated = int(stopped.group(1))
    run.refused_429 = int(stopped.group(2) or 0)
    run.lockouts = int(stopped.group(3) or 0)
    run.delivered = sum(len(list((work / f"out-{label}-{i}").glob("*.png"))) for i in range(PROCESSES))
    return run


def measure_processes(per_process: int = PER_PROCESS, with_unshared: bool = True) -> list[ProcessesRun]:
    """The one-machine row, the Redis row and (``with_unshared``) the row without sharing."""
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        inputs = []
        for index in range(PROCESSES):
            inputs.append(work / f"in{index}")
            inputs[-1].mkdir()
            _inputs(inputs[-1], per_process, 96)
        # Each row starts from empty folders (and a fresh stand-in): nothing is served from a store.
        runs.append(
            _run(
                "machine",
                work,
                inputs,
                per_process,
                lambda i: {"AITHRIVING_CACHE_DIR": str(work / "store-machine")},
            )
        )
        try:
            with redis_server() as url:
                runs.append(
                    _run(
                        "redis",
                        work,
                        inputs,
                        per_process,
                        lambda i: {
                            "AITHRIVING_CACHE_DIR": str(work / f"store-redis-{i}"),
                            "AITHRIVING_REDIS_URL": url,
                        },
                    )
                )
        except (ImportError, RuntimeError) as error:
            runs.append(ProcessesRun(label="redis", images=PROCESSES * per_process, not_run=str(error)))
        if with_unshared:
            runs.append(
                _run(
                    "unshared",
                    work,
                    inputs,
                    per_process,
                    lambda i: {"AITHRIVING_CACHE_DIR": str(work / f"store-unshared-{i}")},
                )
            )
    return runs


_NAMES = {
    "machine": "one machine: one store folder (the default)",
    "redis": 'three "machines": a folder each, one Redis (`AITHRIVING_REDIS_URL`)',
    "unshared": "without sharing: a folder each, no Redis (comparison)",
}


def target_rows(runs: list[ProcessesRun]) -> list[str]:
    """The report's target rows (one machine, Redis)."""
    rows = []
    for run in runs:
        if run.label == "unshared":
            continue
        head = (
            f"| {PROCESSES} processes × {run.images // PROCESSES} images at once, {_NAMES[run.label]}, "
            f"stand-in limited to {LIMIT_REQUESTS}/{LIMIT_SECONDS:g} with a {LOCKOUT_SECONDS:g} s "
            f"lock-out: all delivered, each paid once, no 429, ≥ {RATIO_TARGET}x of "
            f"{LIMIT_REQUESTS / LIMIT_SECONDS:g}/s in all"
        )
        if run.not_run:
            rows.append(f"{head} | not run: {run.not_run} | NOT MET |")
            continue
        rows.append(
            f"{head} | {run.delivered}/{run.images} delivered, {run.generated} generated, "
            f"{run.refused_429} 429s, {run.per_second:.2f}/s = {run.ratio_to_limit:.2f}x "
            f"| {'met' if run.ok else 'NOT MET'} |"
        )
    return rows


def section(runs: list[ProcessesRun]) -> list[str]:
    """The report's section: the table and how it was measured."""
    lines = [
        "## One key, three processes",
        "",
        f"{PROCESSES} runs of `structure-api batch --concurrency {CONCURRENCY}`, each on a folder of its "
        f"own {runs[0].images // PROCESSES} photo-like PNGs of 96² and started at the same moment, against "
        f"one stand-in (`structure-api serve --latency {LATENCY:g} --rate-limit "
        f"{LIMIT_REQUESTS}/{LIMIT_SECONDS:g} --lockout {LOCKOUT_SECONDS:g}`, a process of its own) with the "
        "same key. The wall time runs from starting the three to the last one's exit (Python's start-up "
        "included); the counts of images generated and of 429s are the stand-in's own.",
        "",
        "| sharing | delivered | processes failed | images generated | 429s answered | lock-outs "
        "| wall time (s) | images/s in all | vs the limit's 15/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        if run.not_run:
            lines.append(f"| {_NAMES[run.label]} | not run: {run.not_run} | | | | | | | |")
            continue
        stopped = " (stopped: took too long)" if run.timed_out else ""
        lines.append(
            f"| {_NAMES[run.label]}{stopped} | {run.delivered}/{run.images} "
            f"| {run.failed_processes} | {run.generated} | {run.refused_429} | {run.lockouts} "
            f"| {run.seconds:.1f} | {run.per_second:.2f} | {run.ratio_to_limit:.2f}x |"
        )
    said = [f"- {_NAMES[run.label]}: a process said: {line}" for run in runs for line in run.fallbacks[:3]]
    lines += ["", *said] if said else []
    lines += [
        "",
        "Shared, the three draw from one window of request starts (150 in any 10.5 s: the margin is 5 % "
        "while other processes' starts are in it) and see one pause "
        "after a 429; without sharing each believes it owns the whole limit, so together they send three "
        "times the limit, trip the lock-out and wait it out.",
        "",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.processes [PER_PROCESS]``: these rows alone, printed (nothing written)."""
    args = argv if argv is not None else sys.argv[1:]
    count = int(args[0]) if args and args[0].isdigit() else PER_PROCESS
    for run in measure_processes(count, with_unshared="--shared-only" not in args):
        print(run, f"{run.per_second:.2f}/s = {run.ratio_to_limit:.2f}x", "ok" if run.ok else "NOT MET")
    return 0


if __name__ == "__main__":
    sys.exit(main())
