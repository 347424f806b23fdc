"""Where a key's rate budget lives: the result store's folder (the machine's processes), or Redis (a farm).

The pacer (``ratelimit.py``) keeps its state, the recent request starts, the pause after a 429 and
the probe, in a book. By default the book is a small file (with a lock file) in the result
store's folder, so every process that uses that folder (ComfyUI instances, ``structure-api``
runs: the default folder is the same for all of them) draws from one budget per key and sees one
pause. With
``AITHRIVING_REDIS_URL`` the book is one value in Redis, shared by every machine that points at
it; the Redis client is the package's optional ``redis`` extra (README: Running many workers).

A book that cannot work (the folder cannot be written, Redis cannot be used) is never a reason
to send unpaced: the pacer falls back to the next one (Redis -> the folder -> this process only)
and says so once. A budget is named by a hash of the key and the endpoint, never by the key.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
import random
import re
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from ._constants import ENV_STORE_DIR
from .config import APIKey, default_store_dir
from .errors import ConfigurationError
from .ratelimit import BudgetUnavailable, MemoryBook, PacerState

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]
    import msvcrt

log = logging.getLogger("structure_api")

ENV_REDIS_URL = "AITHRIVING_REDIS_URL"
PACING_FOLDER = ".pacing"
# A process waits this long for another's turn at the state before the budget counts as broken.
_LOCK_TIMEOUT_SECONDS = 30.0
# The state of a full window of 150 is about 10 KB; a file past this is not ours and counts as empty.
_MAX_STATE_BYTES = 256 * 1024 * 1024
# A budget unchanged this long holds nothing that still counts: its files are swept.
_SWEEP_AFTER_SECONDS = 86400.0
_BUDGET_NAME = re.compile(r"[0-9a-f]{16}")
# Windows refuses to remove a file that is open: a book keeping its files open would pin the store's
# folder (never swept, never removable) for the process's life. There each change opens them and closes
# them again; on POSIX they stay open (benchmarks/shared_budget.py measures that path).
_KEEP_OPEN = fcntl is not None
_FLAGS = (
    os.O_RDWR
    | os.O_CREAT
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)
# Redis: how long one command may take, and how long an unused budget is kept.
_REDIS_TIMEOUT_SECONDS = 3.0
_REDIS_KEEP_SECONDS = 86400
_REDIS_TRIES = 200
REDIS_KEY_PREFIX = "aithriving:pacer:"
T = TypeVar("T")


def budget_id(key: APIKey | str, endpoint: str) -> str:
    """Name a budget: 16 hex digits of a hash of the endpoint and the key (the key cannot be read back)."""
    raw = key.reveal() if isinstance(key, APIKey) else key
    digest = hashlib.sha256(b"aithriving-rate-budget\0" + endpoint.encode() + b"\0" + raw.encode())
    return digest.hexdigest()[:16]


def budget_name(key: APIKey | str, endpoint: str, environ: Mapping[str, str] | None = None) -> str:
    """Tell one process's budgets apart: the budget's id and where its book is configured to be."""
    env = os.environ if environ is None else environ
    return f"{budget_id(key, endpoint)} {env.get(ENV_REDIS_URL, '').strip()} {default_store_dir(env)}"


class FolderBook:
    """A budget shared by the processes of one machine: a file in the store's folder, changed under a lock.

    Each change reads the state, applies the change and writes it back while holding an exclusive
    lock on a lock file next to it (``flock`` on POSIX, ``msvcrt.locking`` on Windows, where the two
    files are open only during a change, so the folder can always be swept and removed); nothing is
    fsync'd: a crash can only forget the last few starts, which the margin covers, and a state
    file that cannot be read counts as empty. (SQLite was measured against this and starved one
    process for seconds under contention: docs/architecture.md.)
    """

    shared = True

    def __init__(self, directory: Path, budget: str) -> None:
        folder = Path(directory) / PACING_FOLDER
        self.name = f"the result store's folder {directory}"
        self.where = f"shared through {self.name}"
        self.path = folder / f"{budget}.json"
        self._lock_path = folder / f"{budget}.lock"
        self._lock_fd = self._state_fd = -1
        try:
            folder.mkdir(parents=True, exist_ok=True)
            _sweep_budgets(folder, keep=budget)
            if _KEEP_OPEN:
                self._open()
            self.update(lambda state, now: None, 0.0)  # a folder that reads but cannot write fails here
        except OSError as error:
            self.close()
            raise BudgetUnavailable(error.strerror or type(error).__name__) from None

    def _open(self) -> None:
        self._lock_fd = os.open(self._lock_path, _FLAGS, 0o644)
        self._state_fd = os.open(self.path, _FLAGS, 0o644)

    def update(self, change: Callable[[PacerState, float], T], now: float) -> T:
        """Apply ``change`` to the budget at the wall-clock time, under the lock (``now`` is not used)."""
        try:
            if not _KEEP_OPEN:
                return self._update_opening(change)
            for attempt in range(3):
                with _locked(self._lock_fd):
                    linked = os.fstat(self._lock_fd).st_nlink and os.fstat(self._state_fd).st_nlink
                    if linked or attempt == 2:  # (a file system that counts no links: use it as it is)
                        return self._apply(change, self._state_fd)
                # Swept (unused for a day) while this process kept it open: open the budget's files anew.
                self.close()
                self._open()
            raise AssertionError("unreachable")
        except OSError as error:
            raise BudgetUnavailable(error.strerror or type(error).__name__) from None

    def _update_opening(self, change: Callable[[PacerState, float], T]) -> T:
        """Open the lock file, lock it, open the state, apply ``change``, and close both again."""
        lock_fd = os.open(self._lock_path, _FLAGS, 0o644)
        try:
            with _locked(lock_fd):
                # Opened under the lock: a sweep (which deletes the state under it) is over or not begun.
                state_fd = os.open(self.path, _FLAGS, 0o644)
                try:
                    return self._apply(change, state_fd)
                finally:
                    os.close(state_fd)
        finally:
            os.close(lock_fd)

    def _apply(self, change: Callable[[PacerState, float], T], fd: int) -> T:
        size = os.fstat(fd).st_size
        before = b""
        if size <= _MAX_STATE_BYTES:
            os.lseek(fd, 0, os.SEEK_SET)
            chunks = []
            while size > 0:  # a large limit (AITHRIVING_RATE_LIMIT) makes a large window
                chunk = os.read(fd, size)
                if not chunk:
                    break
                chunks.append(chunk)
                size -= len(chunk)
            before = b"".join(chunks)
        state = PacerState.from_json(before)
        result = change(state, time.time())
        after = state.to_json()
        if after != before or not before:
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, after)
            os.ftruncate(fd, len(after))
        return result

    def close(self) -> None:
        """Close the files."""
        for fd in (self._lock_fd, self._state_fd):
            if fd >= 0:
                os.close(fd)
        self._lock_fd = self._state_fd = -1


def _sweep_budgets(folder: Path, keep: str) -> None:
    """Remove the files of budgets unchanged for a day that nobody holds (a stand-in's port, an old key)."""
    now = time.time()
    try:
        with os.scandir(folder) as listing:
            names = [entry.name for entry in listing]
    except OSError:
        return
    for name in names:
        budget = name[:-5]
        if not name.endswith(".json") or budget == keep or not _BUDGET_NAME.fullmatch(budget):
            continue
        try:
            if now - os.stat(folder / name, follow_symlinks=False).st_mtime <= _SWEEP_AFTER_SECONDS:
                continue
            fd = os.open(folder / f"{budget}.lock", _FLAGS, 0o644)
        except OSError:
            continue
        swept = False
        try:
            with _locked(fd, wait=False):
                (folder / name).unlink()
                swept = True
                if _KEEP_OPEN:  # POSIX removes an open file: under the lock, so no holder gets another
                    (folder / f"{budget}.lock").unlink()
        except OSError:  # held by someone, or (Windows) open elsewhere: it stays
            pass
        finally:
            os.close(fd)
        if swept and not _KEEP_OPEN:
            # Windows removes only a file nobody has open: a lock file someone opened meanwhile stays.
            with contextlib.suppress(OSError):
                (folder / f"{budget}.lock").unlink()


@contextlib.contextmanager
def _locked(fd: int, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on the file ``fd`` for the block, across processes (``wait=False``: or
    raise OSError at once when another holds it)."""
    if fcntl is not None:
        # The kernel queues waiters: nobody starves.
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        return
    # Windows: msvcrt's blocking mode retries once a second; short tries keep a wait to milliseconds.
    deadline = time.monotonic() + (_LOCK_TIMEOUT_SECONDS if wait else 0.0)
    while True:
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.0005 + random.random() * 0.001)
    try:
        yield
    finally:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


# Compare-and-set in one step: the new state is written only if the budget still holds what the
# change was computed from; either way Redis's time comes back, and on a miss the current state.
_COMPARE_AND_SET = """
local current = redis.call('GET', KEYS[1]) or ''
local now = redis.call('TIME')
if current == ARGV[1] then
  if ARGV[2] ~= ARGV[1] then redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3]) end
  return {1, '', now[1], now[2]}
end
return {0, current, now[1], now[2]}
"""


class RedisBook:
    """A budget shared by every machine pointing at one Redis: one value, changed by a compare-and-set script.

    A change is computed here from the state last seen and written by a Lua script only if the
    budget still holds that state; otherwise the script returns the current one and the change is
    computed again. Uncontended, that is one round trip. Times are Redis's own (``TIME``, carried
    over as an offset to this machine's clock), so machines whose clocks differ agree on the window.
    """

    shared = True

    def __init__(self, url: str, budget: str) -> None:
        _check_redis_url(url)
        self.name = f"Redis at {_redis_location(url)}"
        self.where = f"shared through {self.name}"
        try:
            import redis  # the optional extra: imported only when a Redis URL is set
        except ImportError:
            raise BudgetUnavailable(
                "the redis package is not installed: it is the optional redis extra of aithriving-structure, "
                "see the README's Running many workers"
            ) from None
        self._errors: tuple = (redis.RedisError, OSError)
        self.key = REDIS_KEY_PREFIX + budget
        self._known = b""  # the state as last seen in Redis ("": none)
        try:
            self._redis = redis.Redis.from_url(
                url, socket_timeout=_REDIS_TIMEOUT_SECONDS, socket_connect_timeout=_REDIS_TIMEOUT_SECONDS
            )
            self._offsets: collections.deque = collections.deque(maxlen=64)  # (round trip, offset)
            asked = time.time()
            seconds, micros = self._redis.time()
            self._note_time(asked, seconds, micros)
            self._script = self._redis.register_script(_COMPARE_AND_SET)
        except self._errors as error:
            raise BudgetUnavailable(f"{type(error).__name__}: {_short(error)}") from None

    def update(self, change: Callable[[PacerState, float], T], now: float) -> T:
        """Apply ``change`` to the budget at Redis's time, atomically (``now`` is not used)."""
        before = self._known
        for _ in range(_REDIS_TRIES):
            state = PacerState.from_json(before or None)
            result = change(state, time.time() + self._offset)
            after = state.to_json()
            asked = time.time()
            try:
                done, current, seconds, micros = self._script(
                    keys=[self.key], args=[before, after, _REDIS_KEEP_SECONDS]
                )
            except self._errors as error:
                raise BudgetUnavailable(f"{type(error).__name__}: {_short(error)}") from None
            self._note_time(asked, seconds, micros)
            if done:
                self._known = after
                return result
            before = current  # another process changed it: compute the change again on what it holds
        raise BudgetUnavailable(f"the budget changed under every one of {_REDIS_TRIES} tries")

    def _note_time(self, asked: float, seconds: object, micros: object) -> None:
        """Redis's time as an offset from this clock, from the quickest of the recent round trips
        (a slow one, on a busy machine, would put the offset off by up to its length)."""
        answered = time.time()
        self._offsets.append((answered - asked, int(seconds) + int(micros) / 1e6 - (asked + answered) / 2))
        self._offset = min(self._offsets)[1]

    def close(self) -> None:
        """Close the connections to Redis."""
        self._redis.close()


def _check_redis_url(url: str) -> None:
    """Refuse an AITHRIVING_REDIS_URL that is not a redis://, rediss:// or unix:// address (one sentence)."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # a port that is not a number raises here
    except ValueError:
        parts = None
    if (
        parts is None
        or parts.scheme not in ("redis", "rediss", "unix")
        or (parts.scheme != "unix" and not parts.hostname)
        or (parts.scheme == "unix" and not parts.path)
    ):
        # The value is not repeated: it may hold a password.
        raise ConfigurationError(
            f"{ENV_REDIS_URL} must be an address such as redis://host:6379/0 (or rediss://, unix://); "
            f"the value set ({len(url)} characters) is not one."
        )


def _redis_location(url: str) -> str:
    """host:port/db of a Redis URL, without any user name or password, for messages."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname}:{parts.port or 6379}{parts.path or '/0'}"


def make_book(key: APIKey | str, endpoint: str, environ: Mapping[str, str] | None = None) -> Any:
    """Open the book a process's pacer for this key uses: Redis if set and reachable, else the store's folder,
    else this process's memory (each fallback is said once, in one line)."""
    env = os.environ if environ is None else environ
    budget = budget_id(key, endpoint)
    redis_url = env.get(ENV_REDIS_URL, "").strip()
    if redis_url:
        try:
            return RedisBook(redis_url, budget)
        except BudgetUnavailable as error:
            log.warning(
                "Redis at %s cannot be used (%s); the rate budget is shared through the result "
                "store's folder instead, by this machine's processes only.",
                _redis_location(redis_url),
                error,
            )
    directory = default_store_dir(env)
    if directory is None:
        return MemoryBook(f"counted in this process only: {ENV_STORE_DIR} is off")
    try:
        return FolderBook(directory, budget)
    except BudgetUnavailable as error:
        log.warning(
            "The rate budget cannot be shared through %s (%s); it is counted in this process only, "
            "so other processes using the same key are not counted.",
            directory,
            error,
        )
        return MemoryBook(f"counted in this process only: {directory} cannot be written")


def _short(error: BaseException) -> str:
    return str(error).splitlines()[0][:200] if str(error) else type(error).__name__
