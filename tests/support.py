"""Helpers shared by the tests: the canary key and synthetic images."""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

# Recognisable, so a leak is easy to grep for; never a real key.
TEST_KEY = "sk-test-LEAKCANARY-7f3a9c2e51d84b06"


def photo_like(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients, a few shapes with hard edges, and mild noise: ``[H, W, 3]`` uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([x / max(1, width - 1), y / max(1, height - 1), 0.5 + 0.0 * x], axis=-1)
    cy, cx = height / 2, width / 2
    r = min(width, height) / 4
    image[((y - cy) ** 2 + (x - cx) ** 2) < r * r] = (0.9, 0.2, 0.1)
    image[int(height * 0.1) : int(height * 0.3), int(width * 0.6) : int(width * 0.9)] = (0.1, 0.1, 0.8)
    image += rng.normal(0, 0.02, image.shape).astype(np.float32)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(path: Path, pixels: np.ndarray) -> Path:
    path.write_bytes(png_bytes(pixels))
    return path


class RecordingSleep:
    """An injected sleep that records each wait and returns at once; ``clock`` moves by the waits."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)

    @property
    def total(self) -> float:
        return sum(self.calls)

    def clock(self) -> float:
        """Real monotonic time plus every wait recorded so far: waits take no real time, yet time passes."""
        return time.monotonic() + self.total


@contextlib.contextmanager
def client_factory(api_key: str, base_url: str, sleep: RecordingSleep) -> Iterator[Callable[..., object]]:
    """Yields ``factory(**overrides)`` making clients with recorded waits (on their clock) and zero jitter."""
    from structure_api import StructureClient

    clients = []

    def factory(**overrides):
        options = dict(api_key=api_key, base_url=base_url, sleep=sleep, clock=sleep.clock, jitter=lambda: 0.0)
        options.update(overrides)
        client = StructureClient(**options)
        clients.append(client)
        return client

    try:
        yield factory
    finally:
        for client in clients:
            client.close()


def under_wine() -> bool:
    """True when this is Windows Python running under Wine (the Windows lane of .ci/run)."""
    import sys

    if sys.platform != "win32":
        return False
    import ctypes

    return hasattr(ctypes.WinDLL("ntdll"), "wine_get_version")
