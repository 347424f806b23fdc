"""The result store's folder: the on-disk entry format, its fsync'd writes and guarded reads, the sweep.

An entry is ONE file ``<entry_id>.result``: the magic line, a header line of JSON, then the image
bytes, written to a ``.tmp-`` file, fsync'd and renamed into place (then the folder fsync'd), so a
crash leaves either the whole entry or a temp file the sweep removes. Delivery is an empty
``<entry_id>.delivered`` marker; ``.locks/`` holds the per-key payment locks and the per-entry claim
locks (``<entry_id>.claim``). Reads never follow links nor open anything but regular files.
Nothing here holds state: :class:`~structure_api.store.ResultStore` decides what to read and write.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .files import write_atomically

if sys.platform == "win32":
    import msvcrt

    fcntl = None
else:
    import fcntl

    msvcrt = None

# Flags that only some platforms have are 0 where they are missing (Windows has neither): reads still
# refuse anything but a regular file (_open_regular's fstat), and Windows makes descriptors
# non-inheritable by default.
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_BINARY = getattr(os, "O_BINARY", 0)  # Windows: a raw os.write never turns b"\n" into b"\r\n"
# msvcrt locks a byte range: one byte, and the waiting side polls at this pace (msvcrt has no blocking lock
# that waits for ever).
_WINDOWS_LOCK_POLL_SECONDS = 0.02

RESULT_SUFFIX = ".result"
DELIVERED_SUFFIX = ".delivered"
TEMP_PREFIX = ".tmp-"
LOCK_DIR = ".locks"
_MAGIC = b"AITHRIVING-RESULT-1\n"
# The largest image the service returns is ~28 MB; a file far past that is not one of ours.
MAX_ENTRY_BYTES = 64 * 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024
# A crashed writer leaves a temp file (or a half entry of the two-file layout); one this old is nobody's
# write in progress (a write takes well under a second).
ORPHAN_AGE_SECONDS = 600.0
# A lock file not used for a day, and held by nobody, is swept.
LOCK_AGE_SECONDS = 86400.0
_KEY_HEX = 64


@dataclass
class EntryHeader:
    """What a ``.result`` file's header line says, plus where the image bytes start."""

    key: str
    aliases: tuple[str, ...]
    seed: int
    format: str
    size: int
    sha256: str
    paid_at: float
    label: str
    offset: int
    free: bool = False  # made by a stand-in: cost nothing


def entry_head(
    *,
    key: str,
    aliases: tuple[str, ...],
    entry_id: str,
    seed: int,
    format: str,
    data: bytes,
    paid_at: float,
    label: str,
    free: bool = False,
) -> bytes:
    """Return the bytes a ``.result`` file starts with: the magic line and the header line for ``data``."""
    header = {
        "key": key,
        "aliases": list(aliases),
        "entry_id": entry_id,
        "seed": seed,
        "format": format,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "paid_at": paid_at,
        "label": label[:1000],
    }
    if free:  # only then: an entry of the service reads as it always did
        header["free"] = True
    return _MAGIC + json.dumps(header, ensure_ascii=True).encode() + b"\n"


def durable_write(path: Path, head: bytes, data: bytes) -> None:
    """Write head+data to a temp file (its prefix known to the sweep), fsync, rename it to ``path``."""
    write_atomically(path, (head, data), private=True, temp_prefix=TEMP_PREFIX, sync_folder=True)


def probe_writable(directory: Path) -> None:
    """Create the folder and a temp file in it; raises OSError when the folder cannot be written."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=TEMP_PREFIX)
    os.close(fd)
    os.unlink(tmp)


def read_header(path: Path) -> EntryHeader | None:
    """Read the header of a ``.result`` file, or None when it is not one of ours (or cannot be read)."""
    try:
        with _open_regular(path) as handle:
            head = handle.read(MAX_HEADER_BYTES)
    except OSError:
        return None
    if not head.startswith(_MAGIC):
        return None
    end = head.find(b"\n", len(_MAGIC))
    if end < 0:
        return None
    try:
        meta = json.loads(head[len(_MAGIC) : end])
        header = EntryHeader(
            key=str(meta["key"]),
            aliases=tuple(str(a) for a in meta.get("aliases", ())),
            seed=int(meta["seed"]),
            format=str(meta["format"]),
            size=int(meta["size"]),
            sha256=str(meta["sha256"]),
            paid_at=float(meta["paid_at"]),
            label=str(meta.get("label", "")),
            offset=end + 1,
            free=meta.get("free") is True,
        )
    except (ValueError, KeyError, TypeError):
        return None
    return header if 0 < header.size <= MAX_ENTRY_BYTES else None


def read_entry_data(path: Path, header: EntryHeader) -> bytes | None:
    """Read a ``.result`` file's image bytes, or None when missing or damaged (they count as absent)."""
    try:
        with _open_regular(path) as handle:
            handle.seek(header.offset)
            data = handle.read(header.size + 1)
    except OSError:
        return None
    if len(data) != header.size or hashlib.sha256(data).hexdigest() != header.sha256:
        return None
    return data


def scan_folder(directory: Path) -> tuple[dict[str, tuple[int, int]], set[str]]:
    """List regular ``.result`` files (name -> (mtime_ns, size)) and delivered markers' entry ids, at once."""
    results: dict[str, tuple[int, int]] = {}
    markers: set[str] = set()
    try:
        with os.scandir(directory) as listing:
            for item in listing:
                name = item.name
                if name.endswith(DELIVERED_SUFFIX):
                    markers.add(name[: -len(DELIVERED_SUFFIX)])
                elif name.endswith(RESULT_SUFFIX):
                    try:
                        info = item.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    # Links, pipes, devices and folders are not entries: never opened.
                    if stat.S_ISREG(info.st_mode) and info.st_size <= MAX_ENTRY_BYTES + MAX_HEADER_BYTES:
                        results[name] = (info.st_mtime_ns, info.st_size)
    except OSError:
        pass
    return results, markers


def mark_delivered_on_disk(directory: Path, entry_id: str) -> None:
    """Create the entry's empty delivered marker; a folder that cannot be written simply does not get one."""
    try:
        fd = os.open(
            directory / (entry_id + DELIVERED_SUFFIX),
            os.O_WRONLY | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC,
            0o644,
        )
        os.close(fd)
    except OSError:
        pass


def remove_entry(directory: Path, entry_id: str) -> None:
    """Remove an entry's result file, then its delivered marker."""
    for suffix in (RESULT_SUFFIX, DELIVERED_SUFFIX):
        _unlink_quietly(directory / (entry_id + suffix))


def touch_entry(directory: Path, entry_id: str) -> None:
    """Mark an entry recently used (trimming spares it); a read-only folder simply cannot record it."""
    try:
        os.utime(directory / (entry_id + RESULT_SUFFIX))
    except OSError:
        pass


# --- the per-key lock file ---------------------------------------------------------------


def can_lock_across_processes(key: str) -> bool:
    """Tell whether ``key`` can have a lock file (a request key, so a safe file name)."""
    return _is_key(key)


def open_key_lock(directory: Path, key: str) -> int | None:
    """Open ``key``'s lock file under ``.locks``: its descriptor, or None when it cannot be opened."""
    try:
        lock_dir = directory / LOCK_DIR
        lock_dir.mkdir(exist_ok=True)
        return os.open(lock_dir / key, os.O_RDWR | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC | _O_BINARY, 0o644)
    except OSError:
        return None


def hold_key_lock(fd: int) -> None:
    """Block until this process holds the lock file exclusively; release_key_lock drops it."""
    if msvcrt is not None:
        os.lseek(fd, 0, os.SEEK_SET)
        while True:
            try:
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
                break
            except OSError:  # held by another process (or handle)
                time.sleep(_WINDOWS_LOCK_POLL_SECONDS)
    else:
        fcntl.flock(fd, fcntl.LOCK_EX)
    _touch(fd)


def release_key_lock(fd: int) -> None:
    """Let go of the lock and close ``fd`` (Windows wants a range unlocked before its file is closed)."""
    try:
        if msvcrt is not None:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    except OSError:
        pass
    finally:
        os.close(fd)  # on POSIX, closing drops the flock


def _touch(fd: int) -> None:
    """Mark the lock file in use, so the sweep leaves it alone."""
    try:
        if os.utime in os.supports_fd:
            os.utime(fd)
        else:  # Windows: no utime on a descriptor; a byte written (the range is ours) updates the time
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, b"\0")
    except OSError:
        pass


# Held (flock) by the process an entry is handed out to, until it is delivered or released: a
# seed-0 result is then handed out once across processes, and a crashed holder's lock goes with it.
CLAIM_SUFFIX = ".claim"
CLAIM_HELD_ELSEWHERE = -1


def try_claim_lock(directory: Path, entry_id: str) -> int | None:
    """Take ``entry_id``'s claim lock without waiting: its descriptor, CLAIM_HELD_ELSEWHERE when another
    process holds it, or None when claims cannot be locked here (the file cannot be opened)."""
    try:
        lock_dir = directory / LOCK_DIR
        lock_dir.mkdir(exist_ok=True)
        flags = os.O_RDWR | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC | _O_BINARY
        fd = os.open(lock_dir / (entry_id + CLAIM_SUFFIX), flags, 0o644)
    except OSError:
        return None
    try:
        if msvcrt is not None:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return CLAIM_HELD_ELSEWHERE
    return fd


def drop_claim_lock(directory: Path, entry_id: str, fd: int, *, remove: bool) -> None:
    """Let go of a claim lock; ``remove`` (delivered or gone: nobody claims it again) deletes its file."""
    path = directory / LOCK_DIR / (entry_id + CLAIM_SUFFIX)
    if remove and msvcrt is None:
        _unlink_quietly(path)
    release_key_lock(fd)
    if remove and msvcrt is not None:
        _unlink_quietly(path)  # Windows removes no file that is open


# --- the sweep ---------------------------------------------------------------------------


def sweep_folder(directory: Path) -> None:
    """Remove what crashed writers left: temp files, delivered markers without a result, and the
    half entries of the two-file layout (``<key>.img`` without ``<key>.json`` and the reverse)."""
    now = time.time()
    try:
        with os.scandir(directory) as listing:
            items = list(listing)
    except OSError:
        return
    names = {item.name for item in items}
    for item in items:
        try:
            info = item.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISREG(info.st_mode) and _is_orphan(
            item.name, names, old=now - info.st_mtime > ORPHAN_AGE_SECONDS
        ):
            _unlink_quietly(directory / item.name)
    _sweep_locks(directory, now)
    # Complete entries of the two-file layout (delivered results, fixed seed) move into one file each.
    for item in items:
        name = item.name
        if name.endswith(".json") and _is_key(name[:-5]) and name[:-5] + ".img" in names:
            _migrate_legacy(directory, name[:-5])


def _is_orphan(name: str, names: set[str], *, old: bool) -> bool:
    if name.startswith(TEMP_PREFIX):
        return old
    if name.endswith(DELIVERED_SUFFIX):
        return name[: -len(DELIVERED_SUFFIX)] + RESULT_SUFFIX not in names
    if name.endswith(".img") and _is_key(name[:-4]):
        return old and name[:-4] + ".json" not in names
    if name.endswith(".json") and _is_key(name[:-5]):
        return old and name[:-5] + ".img" not in names
    return False


def _sweep_locks(directory: Path, now: float) -> None:
    """Remove per-key lock files unused for a day that nobody holds (one is left per key ever paid)."""
    try:
        with os.scandir(directory / LOCK_DIR) as listing:
            items = list(listing)
    except OSError:
        return
    for item in items:
        try:
            info = item.stat(follow_symlinks=False)
            claim = item.name.endswith(CLAIM_SUFFIX)
            if claim and (directory / (item.name[: -len(CLAIM_SUFFIX)] + RESULT_SUFFIX)).exists():
                continue  # its entry is still there: the claim may be taken again
            if (
                not (_is_key(item.name) or claim)
                or not stat.S_ISREG(info.st_mode)
                or now - info.st_mtime <= LOCK_AGE_SECONDS
            ):
                continue
        except OSError:
            continue
        _remove_unheld_lock(item.path)


def _remove_unheld_lock(path: str) -> None:
    """Remove a lock file unless someone holds (or, on Windows, has open) it."""
    if fcntl is None:
        # Windows refuses to remove a file anyone has open: a holder (or a waiter) keeps it.
        _unlink_quietly(Path(path))
    else:
        try:
            fd = os.open(path, os.O_RDWR | _O_NOFOLLOW | _O_CLOEXEC)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while someone is paying under it
            os.unlink(path)
        except OSError:
            pass
        finally:
            os.close(fd)


def _migrate_legacy(directory: Path, key: str) -> None:
    meta_path, image_path = directory / f"{key}.json", directory / f"{key}.img"
    try:
        with _open_regular(meta_path) as handle:
            meta = json.loads(handle.read(MAX_HEADER_BYTES))
        with _open_regular(image_path) as handle:
            data = handle.read(MAX_ENTRY_BYTES + 1)
        if len(data) != meta["size"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise ValueError("damaged")
        entry_id = uuid.uuid4().hex
        head = entry_head(
            key=key,
            aliases=(),
            entry_id=entry_id,
            seed=int(meta["seed"]),
            format=str(meta["format"]),
            data=data,
            paid_at=image_path.stat().st_mtime,
            label="kept by an earlier version",
        )
        durable_write(directory / (entry_id + RESULT_SUFFIX), head, data)
        os.close(os.open(directory / (entry_id + DELIVERED_SUFFIX), os.O_WRONLY | os.O_CREAT, 0o644))
    except (OSError, ValueError, KeyError, TypeError):
        return  # left as it is: a read-only folder simply is not migrated
    _unlink_quietly(meta_path)
    _unlink_quietly(image_path)


# --- guarded file access -----------------------------------------------------------------


def _is_key(text: str) -> bool:
    return len(text) == _KEY_HEX and all(ch in "0123456789abcdef" for ch in text)


@contextlib.contextmanager
def _open_regular(path: Path) -> Iterator[os.FileIO]:
    """Open for reading without following links or blocking on a pipe; refuse anything not a regular file."""
    flags = os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK | _O_CLOEXEC
    fd = os.open(path, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        handle = os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise
    with handle:
        yield handle


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
