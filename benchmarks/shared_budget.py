"""The two candidates for a rate budget shared by the processes of one machine, side by side.

``python -m benchmarks.shared_budget``: each candidate keeps the pacer's state (a full window: 150
starts) in a folder and applies one change to it at a time, across processes; measured is how
many changes per second one process, and three at once, get through. The pacer makes three
changes per request (start, upload sent, answer), and the service allows 15 requests/s, so 45
changes/s is the need.

- ``lockfile``: what ``ratebudget.FolderBook`` does: the state in a JSON file, read and rewritten
  under an exclusive lock on a lock file (``fcntl.flock`` on POSIX, ``msvcrt.locking`` on Windows);
- ``sqlite``: the state as one row of a database, changed in a ``BEGIN IMMEDIATE`` transaction (no
  fsync), with SQLite's default rollback journal and with WAL (``sqlite-wal``).
"""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from structure_api.ratebudget import FolderBook
from structure_api.ratelimit import PacerState

WINDOW = 150
SECONDS = 3.0


class SqliteBook:
    """The other candidate: the state as one row of an SQLite database, changed in a ``BEGIN IMMEDIATE``."""

    def __init__(self, directory: Path, budget: str, wal: bool) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.budget = budget
        self._db = sqlite3.connect(str(directory / "budgets.sqlite3"), timeout=30.0, isolation_level=None)
        self._db.execute("PRAGMA synchronous=OFF")
        if wal:
            self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS budget (id TEXT PRIMARY KEY, state BLOB NOT NULL)")

    def update(self, change: Callable[[PacerState, float], object], now: float) -> object:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            row = self._db.execute("SELECT state FROM budget WHERE id = ?", (self.budget,)).fetchone()
            before = row[0] if row else None
            state = PacerState.from_json(before)
            result = change(state, time.time())
            after = state.to_json()
            if after != before:
                self._db.execute(
                    "INSERT OR REPLACE INTO budget (id, state) VALUES (?, ?)", (self.budget, after)
                )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return result


def _full_window(state: PacerState, now: float) -> None:
    """One start into a window kept at 150 starts: the size of the state when the pacer is busiest."""
    state.slots[os.urandom(8).hex()] = [now, now]
    while len(state.slots) > WINDOW:
        del state.slots[next(iter(state.slots))]


def _make(kind: str, folder: Path):
    if kind == "lockfile":
        return FolderBook(folder / "lockfile", "budget")
    return SqliteBook(folder / kind, "budget", wal=kind == "sqlite-wal")


def _worker(kind: str, folder: str, barrier, seconds: float, results) -> None:
    book = _make(kind, Path(folder))
    barrier.wait()  # every process ready: the race starts together
    start_at = time.time()
    count = 0
    latencies = []
    while time.time() < start_at + seconds:
        began = time.perf_counter()
        book.update(_full_window, 0.0)
        latencies.append(time.perf_counter() - began)
        count += 1
    latencies.sort()
    if not latencies:
        results.put((0, seconds, seconds))
        return
    results.put((count, latencies[len(latencies) // 2], latencies[-1]))


def measure(kind: str, processes: int, seconds: float = SECONDS) -> tuple[float, float, float]:
    """(changes/s in all, the worst process's median ms, the longest single wait ms) for ``processes``."""
    with tempfile.TemporaryDirectory() as folder:
        _make(kind, Path(folder))  # created once, before the race
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        barrier = context.Barrier(processes)
        workers = [
            context.Process(target=_worker, args=(kind, folder, barrier, seconds, results))
            for _ in range(processes)
        ]
        for worker in workers:
            worker.start()
        figures = [results.get(timeout=60) for _ in workers]
        for worker in workers:
            worker.join()
    total = sum(count for count, _, _ in figures)
    return total / seconds, max(m for _, m, _ in figures) * 1000, max(p for _, _, p in figures) * 1000


def main() -> int:
    print(f"changes/s to a 150-start window kept in a folder ({SECONDS:g} s each); the pacer needs 45/s")
    for kind in sys.argv[1:] or ("sqlite", "sqlite-wal", "lockfile"):
        for processes in (1, 3):
            rate, median, longest = measure(kind, processes)
            print(
                f"{kind:11} {processes} process(es): {rate:7.0f} changes/s, median {median:.2f} ms, "
                f"longest {longest:.0f} ms",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
