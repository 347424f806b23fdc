"""Helpers shared by the pipeline tests (torch and numpy): batches whose order can be checked, edge maps."""

from __future__ import annotations

import numpy as np


def edges(pixels: np.ndarray, block: int = 8) -> np.ndarray:
    """Gradient magnitude of luminance, pooled over 8x8 blocks.

    Pooling, because the stand-in draws edges a few pixels wide (it blurs them), so a
    pixel-exact comparison would punish a faithful result for its line width.
    """
    gray = pixels[..., :3].astype(np.float32).mean(axis=-1)
    gy, gx = np.gradient(gray)
    magnitude = np.hypot(gx, gy)
    h, w = (magnitude.shape[0] // block) * block, (magnitude.shape[1] // block) * block
    return magnitude[:h, :w].reshape(h // block, block, w // block, block).mean(axis=(1, 3))


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two arrays of one size."""
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def distinct_numpy_batch(count: int, width: int = 96, height: int = 80) -> np.ndarray:
    """Each image has its own layout (a square at a different place), so order can be checked."""
    batch = np.zeros((count, height, width, 3), np.float32)
    for i in range(count):
        batch[i, ..., 2] = 0.3
        x0 = 4 + (i * 7) % (width - 30)
        y0 = 4 + (i * 5) % (height - 30)
        batch[i, y0 : y0 + 24, x0 : x0 + 24, :] = 0.9
    return batch
