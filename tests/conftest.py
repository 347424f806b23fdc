"""Shared fixtures: a clean environment for every test, and a real stand-in server on loopback."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest

# Recognisable, so a leak is easy to grep for; never a real key.
TEST_KEY = "sk-test-LEAKCANARY-7f3a9c2e51d84b06"

_CLEARED = (
    "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy", "no_proxy",
    "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
    "AITHRIVING_API_KEY", "AITHRIVING_API_KEY_FILE", "AITHRIVING_BASE_URL", "AITHRIVING_CACHE_DIR",
    "AITHRIVING_CACHE_MAX_MB", "AITHRIVING_MAX_CONCURRENCY",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No proxy, key, key file, base URL or cache of the developer's machine reaches a test."""
    for name in _CLEARED:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path_factory.mktemp("home")
    # A key file path that does not exist, so ~/.config/aithriving/api_key is never read.
    monkeypatch.setenv("AITHRIVING_API_KEY_FILE", str(home / "no-such-key-file"))
    monkeypatch.setenv("AITHRIVING_CACHE_DIR", "off")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))


@pytest.fixture
def standin():
    """A stand-in server on 127.0.0.1 that requires TEST_KEY."""
    from structure_api.standin import StandInServer

    with StandInServer(api_key=TEST_KEY) as server:
        yield server


class RecordingSleep:
    """An injected sleep that records the waits instead of waiting."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


@pytest.fixture
def sleeps() -> RecordingSleep:
    return RecordingSleep()


@pytest.fixture
def make_client(standin, sleeps):
    """Factory for clients of the stand-in with no real sleeping and zero jitter."""
    from structure_api import StructureClient

    clients = []

    def factory(**kwargs):
        options = dict(api_key=TEST_KEY, base_url=standin.url, sleep=sleeps, jitter=lambda: 0.0)
        options.update(kwargs)
        client = StructureClient(**options)
        clients.append(client)
        return client

    yield factory
    for client in clients:
        client.close()


def photo_like(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients, a few shapes with hard edges, and mild noise: ``[H, W, 3]`` uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([x / max(1, width - 1), y / max(1, height - 1), 0.5 + 0.0 * x], axis=-1)
    cy, cx = height / 2, width / 2
    r = min(width, height) / 4
    image[((y - cy) ** 2 + (x - cx) ** 2) < r * r] = (0.9, 0.2, 0.1)
    image[int(height * 0.1):int(height * 0.3), int(width * 0.6):int(width * 0.9)] = (0.1, 0.1, 0.8)
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
