"""Synthetic, photo-like test content: smooth shading plus sensor-like noise, made without any download."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
from PIL import Image

# Noise of about 3 levels of 255, as in a well-exposed photo or a diffusion model's output.
# It is what makes a photo expensive to compress losslessly; with less of it every
# encoder looks faster and every PNG smaller than on real pictures.
NOISE_SIGMA = 0.012


def photo_like(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A ``[height, width, 3]`` float32 picture in 0..1: gradients, soft and hard-edged shapes, noise."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    ys = (np.arange(height, dtype=f32) / f32(height))[:, None]
    xs = (np.arange(width, dtype=f32) / f32(width))[None, :]
    vignette = f32(1) - f32(0.35) * ((xs - f32(0.5)) ** 2 + (ys - f32(0.5)) ** 2)
    # Hard edges, as objects in a photo have: a tilted horizon and a disc.
    slope, level = f32(rng.uniform(-0.3, 0.3)), f32(rng.uniform(0.4, 0.7))
    below_horizon = (ys > level + slope * (xs - f32(0.5))).astype(f32)
    cx, cy, radius = (f32(value) for value in rng.uniform(0.25, 0.75, 3) * (1, 1, 0.4))
    disc = (((xs - cx) ** 2 + (ys - cy) ** 2) < radius**2).astype(f32)
    picture = np.empty((height, width, 3), dtype=f32)
    for channel in range(3):
        fx, fy, phase = (
            f32(value) for value in (rng.uniform(0.3, 1.6), rng.uniform(0.3, 1.6), rng.uniform(0, 2 * np.pi))
        )
        shading = f32(0.45) + f32(0.2) * np.sin(f32(2 * np.pi) * (fx * xs + fy * ys) + phase)
        for _ in range(3):  # soft shapes; the Gaussian is separable, so two 1-D curves suffice
            bx, by = rng.uniform(0.1, 0.9, 2)
            spread = f32(2 * rng.uniform(0.05, 0.2) ** 2)
            weight = f32(rng.uniform(-0.25, 0.25))
            shading = shading + weight * (
                np.exp(-((ys - f32(by)) ** 2) / spread) * np.exp(-((xs - f32(bx)) ** 2) / spread)
            )
        shading = shading + f32(rng.uniform(-0.2, 0.2)) * below_horizon + f32(rng.uniform(-0.3, 0.3)) * disc
        np.multiply(shading, vignette, out=picture[:, :, channel])
    picture += rng.standard_normal(picture.shape, dtype=f32) * f32(NOISE_SIGMA)
    np.clip(picture, f32(0), f32(1), out=picture)
    return picture


def to_uint8(picture: np.ndarray) -> np.ndarray:
    """float 0..1 to uint8, rounded."""
    return np.rint(np.clip(picture, 0.0, 1.0) * 255.0).astype(np.uint8)


def service_png(width: int, height: int, seed: int) -> bytes:
    """A PNG as a service would return it: a photo-like picture saved by Pillow at its default settings."""
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(photo_like(width, height, seed)), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def response_json(png: bytes, seed: int = 123456) -> bytes:
    """The service's success answer around ``png``, byte for byte as its JSON shape has it."""
    payload = {
        "code": 0,
        "message": "success",
        "data": {"image": base64.b64encode(png).decode("ascii"), "seed": seed},
    }
    return json.dumps(payload, separators=(",", ":")).encode("ascii")
