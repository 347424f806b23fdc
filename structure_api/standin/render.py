"""The stand-in's images: the input's edge map in two colours from the prompt and seed (structure kept)."""

from __future__ import annotations

import hashlib
import io
import math

import numpy as np
from PIL import Image

# --- the generated image ---------------------------------------------------------------


def _hsv_to_rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    sector = (hue % 1.0) * 6.0
    index = int(sector) % 6
    fraction = sector - int(sector)
    p = value * (1 - saturation)
    q = value * (1 - saturation * fraction)
    t = value * (1 - saturation * (1 - fraction))
    rgb = [(value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q)][index]
    return np.array(rgb, dtype=np.float32)


def edge_map(luminance: np.ndarray) -> np.ndarray:
    """Gradient magnitude of a ``[H, W]`` float image in 0..1 (central differences), same shape."""
    gx = np.zeros_like(luminance)
    gy = np.zeros_like(luminance)
    gx[:, 1:-1] = luminance[:, 2:] - luminance[:, :-2]
    gy[1:-1, :] = luminance[2:, :] - luminance[:-2, :]
    return np.sqrt(gx * gx + gy * gy)


def structure_edges(image: Image.Image) -> np.ndarray:
    """Extract the input's structure, ``[H, W]`` float32 in 0..1: the strongest channel gradient, widened."""
    rgb = np.asarray(image.convert("RGB"))
    strongest = None
    for channel in range(3):
        magnitude = edge_map(rgb[:, :, channel].astype(np.float32) * np.float32(1 / 255))
        strongest = magnitude if strongest is None else np.maximum(strongest, magnitude, out=strongest)
    # A step between 0 and 1 gives a central difference of 1; 0.3 already counts as a full edge.
    # Gradients under 0.08 (sensor noise and JPEG ringing; the max over channels and the dilation
    # below both raise the noise floor) are dropped so flat areas stay flat.
    strongest -= np.float32(0.08)
    edges = np.clip(strongest * np.float32(1 / 0.22), 0, 1)
    # One pixel of dilation, so outlines stay visible when a large output is viewed scaled down.
    thick = edges.copy()
    np.maximum(thick[1:, :], edges[:-1, :], out=thick[1:, :])
    np.maximum(thick[:-1, :], edges[1:, :], out=thick[:-1, :])
    np.maximum(thick[:, 1:], edges[:, :-1], out=thick[:, 1:])
    np.maximum(thick[:, :-1], edges[:, 1:], out=thick[:, :-1])
    return thick


def render_structure(
    image: Image.Image,
    prompt: str,
    negative_prompt: str,
    control_strength: float,
    seed: int,
    output_format: str,
) -> bytes:
    """Make the stand-in's "generation": the input's edges in prompt/seed colours, encoded in `output_format`.

    Deterministic for its arguments; the output has the input's width and height.
    """
    edges = structure_edges(image)
    luminance = np.asarray(image.convert("L"), dtype=np.float32) * np.float32(1 / 255)
    height, width = luminance.shape

    digest = hashlib.sha256(f"{prompt}\x00{seed}".encode("utf-8", "surrogatepass")).digest()
    hue = int.from_bytes(digest[0:2], "big") / 65536
    if negative_prompt:
        shift = hashlib.sha256(negative_prompt.encode("utf-8", "surrogatepass")).digest()
        hue += (shift[0] / 255 - 0.5) * 0.1  # a slight hue shift, at most +-0.05
    background = _hsv_to_rgb(hue, 0.5 + digest[2] / 255 * 0.4, 0.15 + digest[3] / 255 * 0.2)
    foreground = _hsv_to_rgb(hue + 0.5, 0.3 + digest[4] / 255 * 0.4, 0.85 + digest[5] / 255 * 0.15)

    # The seed's own "texture": one slow diagonal wave, so low control_strength looks like a new image.
    fx = 0.5 + digest[6] / 255 * 2.5
    fy = 0.5 + digest[7] / 255 * 2.5
    phase = digest[8] / 255 * 2 * math.pi
    xs = np.sin(2 * math.pi * fx * np.arange(width, dtype=np.float32) / width + phase)
    ys = np.cos(2 * math.pi * fy * np.arange(height, dtype=np.float32) / height)
    texture = 0.25 + 0.25 * (0.5 * ys[:, None] + 0.5 * xs[None, :])  # 0 .. 0.5

    strength = np.float32(control_strength)
    # Everything taken from the input scales with strength: at 1 the edges reach the foreground
    # colour (full contrast) over a faint shading of the input; at 0 only the seed's texture is left.
    weight = strength * (edges + np.float32(0.25) * luminance) + (np.float32(1) - strength) * texture
    levels = np.clip(weight * 255 + 0.5, 0, 255).astype(np.uint8)
    ramp = np.linspace(0.0, 1.0, 256, dtype=np.float32)[:, None]
    palette = np.clip((background + (foreground - background) * ramp) * 255 + 0.5, 0, 255).astype(np.uint8)
    output = Image.fromarray(palette[levels], mode="RGB")

    buffer = io.BytesIO()
    if output_format == "jpeg":
        output.save(buffer, format="JPEG", quality=90)
    elif output_format == "webp":
        output.save(buffer, format="WEBP", quality=90, method=2)
    else:
        output.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
