"""Fitting an image into the service's limits (pad to the aspect, scale to the limits), and back."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..contract import MAX_PIXELS, MIN_SIDE
from ..errors import InvalidImageError
from .arrays import ImageSize, check_rgb8


@dataclass(frozen=True)
class FitPlan:
    """What ``fit_to_limits`` did: the original size, the size sent, and where the content sits in it.

    The content box (``content_left``, ``content_top``, ``content``) is the part of the sent
    image that holds the original picture, scaled; the rest is padding.
    """

    original: ImageSize
    sent: ImageSize
    content_left: int
    content_top: int
    content: ImageSize

    @classmethod
    def identity(cls, size: ImageSize) -> FitPlan:
        """Plan to send an image as it is."""
        return cls(original=size, sent=size, content_left=0, content_top=0, content=size)

    @property
    def padded(self) -> bool:
        """True when the sent image has padding around the content."""
        return self.content != self.sent

    @property
    def scaled(self) -> bool:
        """True when the content was resized."""
        return self.content != self.original

    @property
    def changed(self) -> bool:
        """True when the sent image differs from the original in any way."""
        return self.padded or self.scaled


def _canvas_size(width: int, height: int) -> ImageSize:
    """Scale a canvas whose aspect is already within limits so its side and pixel counts are too."""
    if width * height > MAX_PIXELS:
        scale = math.sqrt(MAX_PIXELS / (width * height))
        # The epsilon keeps e.g. 3073 * (3072/3073) from flooring to 3071 on a rounding error;
        # the loops below guarantee the limits whatever the floats did.
        new_width = max(1, math.floor(width * scale + 1e-9))
        new_height = max(1, math.floor(height * scale + 1e-9))
        while new_width * new_height > MAX_PIXELS:
            if new_width * height > new_height * width:
                new_width -= 1
            else:
                new_height -= 1
        if 2 * new_width > 5 * new_height:
            new_width = 5 * new_height // 2
        if 2 * new_height > 5 * new_width:
            new_height = 5 * new_width // 2
        return ImageSize(width=new_width, height=new_height)
    short, long_ = min(width, height), max(width, height)
    if short < MIN_SIDE:
        # Short side to exactly MIN_SIDE, long side rounded to keep the ratio (integer
        # arithmetic): as the aspect is at most 2.5 it stays at most 160, far under MAX_PIXELS.
        new_long = max(MIN_SIDE, (2 * long_ * MIN_SIDE + short) // (2 * short))
        if width <= height:
            return ImageSize(width=MIN_SIDE, height=new_long)
        return ImageSize(width=new_long, height=MIN_SIDE)
    return ImageSize(width=width, height=height)


def plan_fit(size: ImageSize) -> FitPlan:
    """Plan what ``fit_to_limits`` does to an image of ``size``, without pixels."""
    width, height = size.width, size.height
    if width < 1 or height < 1:
        raise InvalidImageError(f"The image is {size} pixels; it needs at least one pixel each side.")
    # 1. Pad the short side until the aspect is exactly at the limit (ceil(2/5 of the long side)).
    canvas_width, canvas_height = width, height
    if 2 * width > 5 * height:
        canvas_height = -(-2 * width // 5)
    elif 2 * height > 5 * width:
        canvas_width = -(-2 * height // 5)
    # 2./3. Scale the padded canvas down or up into the pixel and side limits.
    sent = _canvas_size(canvas_width, canvas_height)
    content_width = (
        sent.width
        if canvas_width == width
        else min(sent.width, max(1, round(width * sent.width / canvas_width)))
    )
    content_height = (
        sent.height
        if canvas_height == height
        else min(sent.height, max(1, round(height * sent.height / canvas_height)))
    )
    return FitPlan(
        original=size,
        sent=sent,
        content_left=(sent.width - content_width) // 2,
        content_top=(sent.height - content_height) // 2,
        content=ImageSize(width=content_width, height=content_height),
    )


def _resize(
    pixels: np.ndarray, size: ImageSize, box: tuple[float, float, float, float] | None = None
) -> np.ndarray:
    """Resample ``[H, W, 3]`` uint8 (or the ``box`` of it) to ``size``: Lanczos down, bicubic up."""
    source_area = pixels.shape[0] * pixels.shape[1] if box is None else (box[2] - box[0]) * (box[3] - box[1])
    shrinking = size.pixels < source_area
    resample = Image.Resampling.LANCZOS if shrinking else Image.Resampling.BICUBIC
    image = (
        Image.fromarray(pixels, mode="RGB")
        if pixels.flags.c_contiguous
        else Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")
    )
    # reducing_gap lets Pillow box-reduce large shrinks first: much faster, visually the same.
    resized = image.resize(
        (size.width, size.height), resample, box=box, reducing_gap=3.0 if shrinking else None
    )
    return np.array(resized, dtype=np.uint8)


def fit_to_limits(pixels: np.ndarray) -> tuple[np.ndarray, FitPlan]:
    """Fit ``[H, W, 3]`` uint8 into the service's limits; returns the image to send and the plan to undo it.

    An aspect beyond MAX_ASPECT is padded (never cropped, so no content is lost) symmetrically to
    exactly MAX_ASPECT by replicating the edge pixels: the service keeps the input's edges, and a
    flat colour band would hand it a hard artificial edge to build on. Then an image over
    MAX_PIXELS is scaled down (Lanczos) and one with a side under MIN_SIDE scaled up (bicubic),
    keeping the aspect. An image that already fits is returned as the same object.
    """
    pixels = check_rgb8(pixels)
    plan = plan_fit(ImageSize.of(pixels))
    if not plan.changed:
        return pixels, plan
    content = _resize(pixels, plan.content) if plan.scaled else pixels
    if plan.padded:
        bottom = plan.sent.height - plan.content.height - plan.content_top
        right = plan.sent.width - plan.content.width - plan.content_left
        content = np.pad(
            content, ((plan.content_top, bottom), (plan.content_left, right), (0, 0)), mode="edge"
        )
    return content, plan


def restore_from_fit(pixels: np.ndarray, plan: FitPlan) -> np.ndarray:
    """Undo ``fit_to_limits`` on the service's result: crop the padding, resize to the original ``[H, W, 3]``.

    A result whose size differs from the size sent is taken as the same picture at another
    scale: the content box is mapped onto it, so the image is resampled only once.
    """
    pixels = check_rgb8(pixels, "The result image")
    result = ImageSize.of(pixels)
    if result == plan.original and not plan.changed:
        return pixels
    left, top = plan.content_left, plan.content_top
    if result == plan.sent and plan.content == plan.original:
        # Padding only: an exact crop, no resampling.
        return np.ascontiguousarray(pixels[top : top + plan.content.height, left : left + plan.content.width])
    scale_x = result.width / plan.sent.width
    scale_y = result.height / plan.sent.height
    box = (
        left * scale_x,
        top * scale_y,
        (left + plan.content.width) * scale_x,
        (top + plan.content.height) * scale_y,
    )
    return _resize(pixels, plan.original, box=box)
