"""On-disk cache of paid results, so identical fixed-seed requests are never paid twice.

Keyed by a hash of the uploaded bytes, every parameter and the service address (a result
of the local stand-in must never stand in for a paid one); never by the API key.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from .errors import ConfigurationError

ENV_CACHE_DIR = "AITHRIVING_CACHE_DIR"
ENV_CACHE_MAX_MB = "AITHRIVING_CACHE_MAX_MB"
DEFAULT_MAX_BYTES = 1024 * 1024 * 1024
_DISABLED_VALUES = {"", "0", "off", "none", "false", "no"}


@dataclass(frozen=True)
class CachedResult:
    """A result read back from the cache."""

    data: bytes
    seed: int
    format: str


def cache_key(image_bytes: bytes, fields: list[tuple[str, str]], service_url: str) -> str:
    """Hex digest identifying one request; the form fields are hashed in order."""
    digest = hashlib.sha256()
    digest.update(b"structure-cache-v1\0")
    digest.update(service_url.encode() + b"\0")
    for name, value in fields:
        digest.update(name.encode() + b"=" + value.encode("utf-8") + b"\0")
    digest.update(hashlib.sha256(image_bytes).digest())
    return digest.hexdigest()


def default_cache_dir(environ: Optional[Mapping[str, str]] = None) -> Optional[Path]:
    """The cache folder from AITHRIVING_CACHE_DIR (``off`` disables), else the user cache folder."""
    env = os.environ if environ is None else environ
    if ENV_CACHE_DIR in env:
        value = env[ENV_CACHE_DIR].strip()
        return None if value.lower() in _DISABLED_VALUES else Path(value).expanduser()
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "aithriving" / "structure"


class ResultCache:
    """Files ``<key>.img`` + ``<key>.json`` in one folder, trimmed to ``max_bytes`` oldest-first."""

    def __init__(self, directory: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> Optional["ResultCache"]:
        """The configured cache, or None when it is turned off."""
        env = os.environ if environ is None else environ
        directory = default_cache_dir(env)
        if directory is None:
            return None
        max_mb = env.get(ENV_CACHE_MAX_MB, "").strip()
        try:
            max_bytes = int(float(max_mb) * 1024 * 1024) if max_mb else DEFAULT_MAX_BYTES
        except (ValueError, OverflowError):
            raise ConfigurationError(f"{ENV_CACHE_MAX_MB} must be a number of megabytes; got {max_mb!r}.") from None
        return None if max_bytes <= 0 else cls(directory, max_bytes)

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.directory / f"{key}.img", self.directory / f"{key}.json"

    def get(self, key: str) -> Optional[CachedResult]:
        """The stored result for ``key``, or None; a damaged entry counts as absent."""
        image_path, meta_path = self._paths(key)
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            data = image_path.read_bytes()
            if len(data) != meta["size"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
                return None
            os.utime(meta_path)  # recently used entries survive trimming
            return CachedResult(data=data, seed=int(meta["seed"]), format=str(meta["format"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: str, data: bytes, seed: int, format: str) -> None:
        """Store a result atomically; a cache that cannot be written never fails the caller's work."""
        if len(data) > self.max_bytes:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            image_path, meta_path = self._paths(key)
            meta = {"seed": seed, "format": format, "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest()}
            _atomic_write(image_path, data)
            _atomic_write(meta_path, json.dumps(meta).encode())
            self._trim()
        except OSError:
            pass

    def _trim(self) -> None:
        with self._lock:
            entries = []
            total = 0
            for meta_path in self.directory.glob("*.json"):
                image_path = meta_path.with_suffix(".img")
                try:
                    size = image_path.stat().st_size + meta_path.stat().st_size
                    entries.append((meta_path.stat().st_mtime, meta_path, image_path, size))
                except OSError:
                    continue
                total += size
            entries.sort()
            for _, meta_path, image_path, size in entries:
                if total <= self.max_bytes:
                    break
                for path in (meta_path, image_path):
                    try:
                        path.unlink()
                    except OSError:
                        pass
                total -= size


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
