"""The result store: every answer the service may have charged for, kept before anything can drop it.

One entry per paid answer, keyed by the request's identity (a hash of the uploaded bytes, every
form field and the service address; never the API key). An entry records the seed the service
used, the format detected from the bytes, when it was kept and whether it has been delivered
(written by the CLI, returned by the node). A re-run takes undelivered results first:

- a fixed seed is served from the store every time (delivered or not);
- seed 0 hands each undelivered result out once, to one process at a time (a claim lock under
  ``.locks`` is held until the result is delivered or released, and dies with its process); after
  that seed 0 pays for fresh images.

On disk (``store_disk.py`` owns the format) an entry is ONE file ``<entry_id>.result`` (a magic line, a
header line of JSON, then the image bytes) written to a temp file, fsync'd and renamed into place, so a
crash leaves either the whole entry or a temp file the next sweep removes. Delivery is an empty
``<entry_id>.delivered`` marker, so a store that can be read but not written still serves what it holds.
When the folder cannot be written (read-only, full, not a folder, smaller than one result) results are
kept in memory for the life of the process; :meth:`ResultStore.from_env` hands every caller of one
process the same store object, so a ComfyUI re-run after a failed batch still finds them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from ._constants import DEFAULT_STORE_MAX_BYTES, ENV_STORE_MAX_MB, MEMORY_STORE_BYTES
from ._constants import ENV_STORE_DIR as ENV_STORE_DIR  # importable from here too
from .config import default_store_dir as default_store_dir  # where the folder is: configuration
from .errors import ConfigurationError
from .request import StructureRequest
from .store_disk import (  # noqa: F401  (the file names stay importable from here)
    CLAIM_HELD_ELSEWHERE,
    DELIVERED_SUFFIX,
    MAX_ENTRY_BYTES,
    RESULT_SUFFIX,
    TEMP_PREFIX,
    EntryHeader,
    can_lock_across_processes,
    drop_claim_lock,
    durable_write,
    entry_head,
    hold_key_lock,
    mark_delivered_on_disk,
    open_key_lock,
    probe_writable,
    read_entry_data,
    read_header,
    release_key_lock,
    remove_entry,
    scan_folder,
    sweep_folder,
    touch_entry,
    try_claim_lock,
)

log = logging.getLogger("structure_api")

DEFAULT_MAX_BYTES = DEFAULT_STORE_MAX_BYTES


@dataclass(frozen=True)
class StoredResult:
    """One paid answer the store holds."""

    key: str  # request identity: sha256 over upload bytes, every form field, endpoint; never the key
    entry_id: str  # unique per paid answer (a seed-0 key may hold several undelivered answers)
    data: bytes  # image file bytes exactly as the service sent them
    seed: int  # seed the service used
    format: str  # "png" | "jpeg" | "webp", detected from the bytes
    delivered: bool
    paid_at: float  # time.time() when kept
    label: str  # caller's free text, e.g. the CLI's intended output path or "ComfyUI node 5, image 3"
    free: bool = False  # made by a stand-in (its answer carried the free mark): it cost nothing

    def __repr__(self) -> str:
        return (
            f"StoredResult(entry_id={self.entry_id!r}, seed={self.seed}, format={self.format!r}, "
            f"bytes={len(self.data)}, delivered={self.delivered}, label={self.label!r})"
        )


def request_key(image_bytes: bytes, fields: list[tuple[str, str]], endpoint: str) -> str:
    """Hex digest identifying one request; the form fields are hashed in order."""
    # The digest's label stays as first written, so entries kept by earlier versions keep serving
    # fixed-seed re-runs.
    digest = hashlib.sha256()
    digest.update(b"structure-cache-v1\0")
    digest.update(endpoint.encode() + b"\0")
    for name, value in fields:
        digest.update(name.encode() + b"=" + value.encode("utf-8") + b"\0")
    digest.update(hashlib.sha256(image_bytes).digest())
    return digest.hexdigest()


def _max_bytes_from_env(environ: Mapping[str, str] | None = None) -> int:
    """AITHRIVING_CACHE_MAX_MB in bytes (0 or less: nothing kept on disk), else the default."""
    env = os.environ if environ is None else environ
    max_mb = env.get(ENV_STORE_MAX_MB, "").strip()
    if not max_mb:
        return DEFAULT_MAX_BYTES
    try:
        value = float(max_mb)
        if value != value:  # NaN
            raise ValueError
        return max(0, int(min(value, 2.0**40) * 1024 * 1024))
    except (ValueError, OverflowError):
        raise ConfigurationError(
            f"{ENV_STORE_MAX_MB} must be a number of megabytes; got {max_mb!r}."
        ) from None


_SHARED: dict[tuple[str | None, int], ResultStore] = {}
_SHARED_LOCK = threading.Lock()


def _forget_shared_stores() -> None:
    """Drop the process's shared stores (tests start each case from an empty process state)."""
    with _SHARED_LOCK:
        _SHARED.clear()


class ResultStore:
    """Paid results in one folder (or only in memory), shared safely by threads and processes."""

    def __init__(self, directory: Path | None, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.max_bytes = max_bytes
        self._lock = threading.RLock()
        self._memory: dict[str, tuple[StoredResult, tuple[str, ...]]] = {}  # entry_id -> (entry, aliases)
        self._handed_out: set[str] = set()  # entry ids in use by a caller of this process
        self._delivered_here: set[str] = set()  # delivered, but the marker could not be written
        self._headers: dict[str, tuple[int, int, EntryHeader | None]] = {}  # name -> (mtime_ns, size, header)
        self._key_locks: dict[str, threading.Lock] = {}
        self._claims: dict[str, int] = {}  # entry id -> the claim lock's descriptor, while handed out here
        self._disk_ok: bool | None = None if self.directory is not None and max_bytes > 0 else False
        self._swept = False
        self._warned = False

    def __repr__(self) -> str:
        where = str(self.directory) if self.directory is not None else "memory"
        return f"ResultStore({where!r}, persistent={self.persistent})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ResultStore:
        """Return the store AITHRIVING_CACHE_DIR / _CACHE_MAX_MB set; one object per process and folder."""
        env = os.environ if environ is None else environ
        directory = default_store_dir(env)
        max_bytes = _max_bytes_from_env(env)
        if directory is None:
            max_bytes = 0
        ident = (str(directory.resolve()) if directory is not None else None, max_bytes)
        with _SHARED_LOCK:
            store = _SHARED.get(ident)
            if store is None:
                store = _SHARED[ident] = cls(directory, max_bytes)
            return store

    # -- where results go ---------------------------------------------------------

    @property
    def persistent(self) -> bool:
        """True only while results actually reach disk."""
        with self._lock:
            if self._disk_ok is None:
                self._disk_ok = self._probe()
            return bool(self._disk_ok)

    def on_disk(self, entry: StoredResult) -> bool:
        """Tell whether this entry is in the folder (it outlives the process) rather than only in memory."""
        with self._lock:
            return self.directory is not None and entry.entry_id not in self._memory

    @property
    def location(self) -> str:
        """Where kept results live, for messages: the folder, or 'memory'."""
        return str(self.directory) if self.persistent else "memory"

    @property
    def memory_reason(self) -> str:
        """Why a result of this store is kept in memory only, truly: off, set to keep nothing, or failing."""
        if self.directory is None:
            return "the result store is off"
        if self.max_bytes <= 0:
            return f"the result store is set to keep nothing on disk ({ENV_STORE_MAX_MB})"
        with self._lock:
            failed = self._disk_ok is False and self._warned
        return (
            "the result store cannot be written"
            if failed
            else f"the result is larger than the result store's limit ({ENV_STORE_MAX_MB})"
        )

    def _probe(self) -> bool:
        assert self.directory is not None
        try:
            probe_writable(self.directory)
            return True
        except OSError as error:
            self._warn_memory(error)
            return False

    def _warn_memory(self, error: OSError) -> None:
        if not self._warned:
            self._warned = True
            log.warning(
                "The result store %s cannot be written (%s); paid results are kept in memory until "
                "this process exits.",
                self.directory,
                error.strerror or type(error).__name__,
            )

    # -- identity -----------------------------------------------------------------

    def key_for(self, request: StructureRequest, endpoint: str) -> str:
        """Return the request's identity: upload bytes, the form's fields (a newer one when set), endpoint."""
        return request_key(request.image.data, request.key_fields(), endpoint)

    # -- taking results out -------------------------------------------------------

    def claim(self, key: str, seed: int) -> StoredResult | None:
        """Return what to deliver instead of paying: fixed seed -> the stored result, every time; seed 0 ->
        one undelivered result, handed out once (until :meth:`release` gives it back)."""
        with self._lock:
            candidates = self._entries_for(key, include_aliases=seed != 0)
            if seed != 0:
                # An undelivered one first, so it counts as delivered when this one is.
                candidates.sort(key=lambda item: (item[1].delivered, -item[1].paid_at))
                for entry_id, _ in candidates:
                    found = self._load(entry_id)
                    if found is not None:
                        self._touch(entry_id)
                        return found
                return None
            candidates.sort(key=lambda item: item[1].paid_at)
            for entry_id, meta in candidates:
                if meta.delivered or entry_id in self._handed_out or not self._take_claim(entry_id):
                    continue
                # Read after the claim: another process may have delivered it meanwhile.
                found = self._load(entry_id)
                if found is not None and not found.delivered:
                    self._handed_out.add(entry_id)
                    return found
                self._drop_claim(entry_id, remove=False)
            return None

    def _take_claim(self, entry_id: str) -> bool:
        """Hold ``entry_id``'s claim lock (across processes); False when another process holds it."""
        if self.directory is None or entry_id in self._memory or entry_id in self._claims:
            return True
        fd = try_claim_lock(self.directory, entry_id)
        if fd == CLAIM_HELD_ELSEWHERE:
            return False
        if fd is not None:
            self._claims[entry_id] = fd
        return True  # held, or claims cannot be locked here: handed out within this process only

    def _drop_claim(self, entry_id: str, *, remove: bool) -> None:
        fd = self._claims.pop(entry_id, None)
        if fd is not None and self.directory is not None:
            drop_claim_lock(self.directory, entry_id, fd, remove=remove)

    def release(self, entry: StoredResult) -> None:
        """Give a claimed or kept result back undelivered (its batch failed): a re-run may claim it."""
        with self._lock:
            self._handed_out.discard(entry.entry_id)
            self._drop_claim(entry.entry_id, remove=False)

    def undelivered(self) -> list[StoredResult]:
        """Paid, never delivered, oldest first: what ``structure-api results`` lists."""
        with self._lock:
            entries = [
                self._load(entry_id) for entry_id, meta in self._all_meta().items() if not meta.delivered
            ]
        found = [entry for entry in entries if entry is not None]
        return sorted(found, key=lambda entry: entry.paid_at)

    # -- putting results in -------------------------------------------------------

    def keep(
        self,
        key: str,
        data: bytes,
        *,
        seed: int,
        format: str,
        label: str = "",
        aliases: tuple[str, ...] = (),
        free: bool = False,
    ) -> StoredResult:
        """Keep a paid answer, durable (fsync'd) before return; in memory when the disk fails; never
        raises for disk trouble. ``aliases``: more keys it answers (a seed-0 result under the seed it
        got). The result is handed out to the caller until delivered or released."""
        entry = StoredResult(
            key=key,
            entry_id=uuid.uuid4().hex,
            data=data,
            seed=int(seed),
            format=format,
            delivered=False,
            paid_at=time.time(),
            label=label,
            free=free,
        )
        with self._lock:
            self._handed_out.add(entry.entry_id)
        if self._write(entry, aliases):
            return entry
        with self._lock:
            self._memory[entry.entry_id] = (entry, tuple(aliases))
        return entry

    def mark_delivered(self, entry: StoredResult) -> None:
        """Record that the caller delivered this result (wrote it, returned it)."""
        with self._lock:
            self._handed_out.discard(entry.entry_id)
            held = self._memory.get(entry.entry_id)
            if held is not None:
                self._memory[entry.entry_id] = (dataclasses.replace(held[0], delivered=True), held[1])
                self._trim_memory()
                return
            self._delivered_here.add(entry.entry_id)
        if self.directory is not None:
            # Remembered in memory above, so a store that cannot write the marker still knows.
            mark_delivered_on_disk(self.directory, entry.entry_id)
        with self._lock:
            self._drop_claim(entry.entry_id, remove=True)

    def discard(self, entry: StoredResult) -> None:
        """Remove an entry whose bytes turned out to be unusable (the image does not decode)."""
        with self._lock:
            self._handed_out.discard(entry.entry_id)
            self._memory.pop(entry.entry_id, None)
            self._headers.pop(entry.entry_id + RESULT_SUFFIX, None)
        if self.directory is not None:
            remove_entry(self.directory, entry.entry_id)
        with self._lock:
            self._drop_claim(entry.entry_id, remove=True)

    @contextlib.contextmanager
    def paying(self, key: str) -> Iterator[None]:
        """Hold a lock per key while paying, across threads and processes (for fixed seeds: whoever
        waits then finds the result in the store instead of paying again)."""
        with self._lock:
            thread_lock = self._key_locks.setdefault(key, threading.Lock())
        with thread_lock:
            handle = self._open_lock_file(key)
            try:
                if handle is not None:
                    hold_key_lock(handle)
                yield
            finally:
                if handle is not None:
                    release_key_lock(handle)

    def _open_lock_file(self, key: str) -> int | None:
        if self.directory is None or not can_lock_across_processes(key) or not self.persistent:
            return None
        return open_key_lock(self.directory, key)

    # -- disk ---------------------------------------------------------------------

    def _write(self, entry: StoredResult, aliases: tuple[str, ...]) -> bool:
        if self.directory is None or self.max_bytes <= 0:
            return False
        head = entry_head(
            key=entry.key,
            aliases=aliases,
            entry_id=entry.entry_id,
            seed=entry.seed,
            format=entry.format,
            data=entry.data,
            paid_at=entry.paid_at,
            label=entry.label,
            free=entry.free,
        )
        if len(head) + len(entry.data) > self.max_bytes or len(entry.data) > MAX_ENTRY_BYTES:
            log.warning(
                "A result of %d bytes is larger than the result store's limit (%s); it is kept in "
                "memory until this process exits.",
                len(entry.data),
                ENV_STORE_MAX_MB,
            )
            with self._lock:
                self._disk_ok = False
            return False
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._sweep_once()
            with self._lock:
                self._take_claim(entry.entry_id)  # before the file appears: no other process may claim it
            durable_write(self.directory / (entry.entry_id + RESULT_SUFFIX), head, entry.data)
        except OSError as error:
            with self._lock:
                self._disk_ok = False
                self._drop_claim(entry.entry_id, remove=True)
            self._warn_memory(error)
            return False
        with self._lock:
            self._disk_ok = True
        self._trim()
        return True

    def _scan(self) -> tuple[dict[str, tuple[int, int]], set[str]]:
        """Regular ``.result`` files (name -> (mtime_ns, size)) and delivered markers, by one listing."""
        if self.directory is None:
            return {}, set()
        self._sweep_once()
        return scan_folder(self.directory)

    def _disk_meta(self) -> dict[str, tuple[EntryHeader, bool]]:
        files, markers = self._scan()
        found: dict[str, tuple[EntryHeader, bool]] = {}
        for name, (mtime, size) in files.items():
            cached = self._headers.get(name)
            if cached is not None and cached[0] == mtime and cached[1] == size:
                header = cached[2]
            else:
                header = read_header(self.directory / name)
                self._headers[name] = (mtime, size, header)
            if header is None:
                continue
            entry_id = name[: -len(RESULT_SUFFIX)]
            found[entry_id] = (header, entry_id in markers or entry_id in self._delivered_here)
        for name in [n for n in self._headers if n not in files]:
            del self._headers[name]
        return found

    def _all_meta(self) -> dict[str, _Meta]:
        metas: dict[str, _Meta] = {}
        for entry_id, (header, delivered) in self._disk_meta().items():
            metas[entry_id] = _Meta(header.key, header.aliases, header.paid_at, delivered)
        for entry_id, (entry, aliases) in self._memory.items():
            metas[entry_id] = _Meta(entry.key, aliases, entry.paid_at, entry.delivered)
        return metas

    def _entries_for(self, key: str, *, include_aliases: bool) -> list[tuple[str, _Meta]]:
        return [
            (entry_id, meta)
            for entry_id, meta in self._all_meta().items()
            if meta.key == key or (include_aliases and key in meta.aliases)
        ]

    def _load(self, entry_id: str) -> StoredResult | None:
        held = self._memory.get(entry_id)
        if held is not None:
            return held[0]
        if self.directory is None:
            return None
        path = self.directory / (entry_id + RESULT_SUFFIX)
        cached = self._headers.get(path.name)
        header = cached[2] if cached is not None else read_header(path)
        data = read_entry_data(path, header) if header is not None else None
        if data is None:
            return None  # absent, or damaged: counts as absent
        delivered = (
            entry_id in self._delivered_here or (self.directory / (entry_id + DELIVERED_SUFFIX)).exists()
        )
        return StoredResult(
            key=header.key,
            entry_id=entry_id,
            data=data,
            seed=header.seed,
            format=header.format,
            delivered=delivered,
            paid_at=header.paid_at,
            label=header.label,
            free=header.free,
        )

    def _touch(self, entry_id: str) -> None:
        # Recently used entries survive trimming.
        if self.directory is not None and entry_id not in self._memory:
            touch_entry(self.directory, entry_id)

    def _trim(self) -> None:
        """Remove delivered results, least recently used first, while the folder is over ``max_bytes``.

        Undelivered results are never trimmed: they are paid for and nobody has them yet.
        """
        with self._lock:
            files, markers = self._scan()
            total = sum(size for _, size in files.values())
            if total <= self.max_bytes:
                return
            delivered = sorted(
                (mtime, name, size)
                for name, (mtime, size) in files.items()
                if name[: -len(RESULT_SUFFIX)] in markers
                or name[: -len(RESULT_SUFFIX)] in self._delivered_here
            )
            for _, name, size in delivered:
                if total <= self.max_bytes:
                    break
                entry_id = name[: -len(RESULT_SUFFIX)]
                if entry_id in self._handed_out:
                    continue
                remove_entry(self.directory, entry_id)
                self._headers.pop(name, None)
                total -= size

    def _trim_memory(self) -> None:
        delivered = sorted(
            (entry.paid_at, entry_id, len(entry.data))
            for entry_id, (entry, _) in self._memory.items()
            if entry.delivered
        )
        total = sum(size for _, _, size in delivered)
        for _, entry_id, size in delivered:
            if total <= MEMORY_STORE_BYTES:
                break
            del self._memory[entry_id]
            total -= size

    def _sweep_once(self) -> None:
        """Sweep the folder of what crashed writers left, once per store object."""
        if self._swept or self.directory is None:
            return
        self._swept = True
        sweep_folder(self.directory)


@dataclass(frozen=True)
class _Meta:
    key: str
    aliases: tuple[str, ...]
    paid_at: float
    delivered: bool
