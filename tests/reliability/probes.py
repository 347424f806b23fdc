"""Helpers of the reliability suite: the canary key, leak search, memory and resource probes, image files.

Named apart from tests/support.py (the helpers of the whole suite, photo_like among them).
"""

from __future__ import annotations

import base64
import gc
import io
import os
import re
import threading
import tracemalloc
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from support import photo_like  # noqa: F401  (one copy, in tests/support.py; re-exported for this suite)

# Recognisable, so a leak is easy to find; never a real key. Different from tests/conftest.py's,
# so this suite proves its own claims.
CANARY_KEY = "sk-live-RELIABILITY-CANARY-3b9e07d1c5a84f26"
MiB = 2**20


# --- finding the key ------------------------------------------------------------------------


def _base64_needles(secret: bytes) -> list[bytes]:
    """Pieces of base64 that appear whatever the key's alignment inside a longer base64 text."""
    needles = []
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + secret)
        # The first and last 4-character groups may mix in neighbouring bytes; the middle cannot.
        needles.append(encoded[4:-4])
    return needles


_NEEDLES = [CANARY_KEY.encode()] + _base64_needles(CANARY_KEY.encode())


def _png_texts(data: bytes) -> Iterable[bytes]:
    """Decoded payloads of every tEXt, zTXt and iTXt chunk (compressed ones inflated)."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return
    position = 8
    while position + 8 <= len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        kind = data[position + 4 : position + 8]
        payload = data[position + 8 : position + 8 + length]
        position += 12 + length
        if kind == b"tEXt":
            yield payload
        elif kind == b"zTXt":
            _, _, rest = payload.partition(b"\0")
            try:
                yield zlib.decompress(rest[1:])
            except zlib.error:
                yield rest
        elif kind == b"iTXt":
            keyword, _, rest = payload.partition(b"\0")
            compressed = rest[:1] == b"\1"
            rest = rest[2:]
            _language, _, rest = rest.partition(b"\0")
            _translated, _, text = rest.partition(b"\0")
            if compressed:
                try:
                    text = zlib.decompress(text)
                except zlib.error:
                    pass
            yield text


def key_found_in(data: bytes | str | None) -> bool:
    """True when the canary key is in ``data``: as is, as base64, or inside a PNG's (compressed) text
    chunks."""
    if data is None:
        return False
    blob = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if any(needle in blob for needle in _NEEDLES):
        return True
    return any(any(needle in text for needle in _NEEDLES) for text in _png_texts(blob))


def files_with_key(root: Path) -> list[Path]:
    """Every file under ``root`` (symlinks not followed) that holds the key."""
    found = []
    for directory, _dirs, files in os.walk(root, followlinks=False):
        for name in files:
            path = Path(directory) / name
            if path.is_symlink():
                continue
            try:
                if key_found_in(path.read_bytes()):
                    found.append(path)
            except OSError:
                continue
    return found


def count_files(root: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(root, followlinks=False))


# --- messages ---------------------------------------------------------------------------------

_RAW_MARKUP = re.compile(r"<\s*(html|body|head|title|h1|center|hr|!doctype)\b", re.IGNORECASE)


def message_problems(text: str) -> list[str]:
    """Why ``text`` is not a clean user-facing message: empty, several lines, the key, raw HTML."""
    problems = []
    if not text.strip():
        problems.append("empty")
    if "\n" in text or "\r" in text:
        problems.append("more than one line")
    if text != text.strip():
        problems.append("surrounding whitespace")
    if key_found_in(text):
        problems.append("holds the key")
    if _RAW_MARKUP.search(text):
        problems.append("holds raw HTML")
    if len(text) > 600:
        problems.append(f"{len(text)} characters long")
    return problems


# --- memory -----------------------------------------------------------------------------------


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} missing from /proc/self/status")


@dataclass
class MemoryUse:
    """Peaks seen by MemoryProbe, in bytes."""

    traced_peak: int = 0  # Python allocations (bytes, str, lists, numpy buffers) traced by tracemalloc
    rss_growth: int = 0  # peak resident set size (VmHWM) above the resident size at the start; all allocators


class MemoryProbe:
    """Measure the peak memory of a block: tracemalloc's peak and the kernel's VmHWM.

    VmHWM is reset through /proc/self/clear_refs (Linux >= 4.0) at the start, so it counts every
    allocation of the block (Pillow's C buffers included), not only Python objects. Memory freed
    earlier but still resident can be reused without raising it, so it is a lower bound; the
    tracemalloc figure is exact for what it sees.
    """

    def __enter__(self) -> MemoryUse:
        gc.collect()
        self.use = MemoryUse()
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        self._rss_start = _status_kib("VmRSS") * 1024
        self._was_tracing = tracemalloc.is_tracing()
        if self._was_tracing:
            tracemalloc.reset_peak()
        else:
            tracemalloc.start()
        self._traced_start = tracemalloc.get_traced_memory()[0]
        return self.use

    def __exit__(self, *exc: object) -> None:
        current, peak = tracemalloc.get_traced_memory()
        if not self._was_tracing:
            tracemalloc.stop()
        self.use.traced_peak = max(0, peak - self._traced_start)
        self.use.rss_growth = max(0, _status_kib("VmHWM") * 1024 - self._rss_start)


# --- threads and sockets ---------------------------------------------------------------------


def open_sockets() -> int:
    """Sockets this process holds open, from /proc/self/fd."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                count += 1
        except OSError:
            continue  # the descriptor listdir itself used, closed meanwhile
    return count


def live_threads() -> list[str]:
    return sorted(thread.name for thread in threading.enumerate())


def settle(predicate, timeout: float = 3.0) -> bool:
    """Wait (polling the real clock) until ``predicate()`` is true; threads end asynchronously."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        gc.collect()
        time.sleep(0.02)
    return True


# --- images -----------------------------------------------------------------------------------


def image_file_bytes(pixels: np.ndarray, fmt: str = "PNG", mode: str | None = None, **options) -> bytes:
    from PIL import Image

    image = Image.fromarray(pixels) if mode is None else Image.fromarray(pixels, mode=mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
