"""One request to the service: the encoded image and the form's values, checked against the contract.

A module of its own because it joins the contract (the figures) and the images (the encoded upload):
``images`` imports the contract's limits, so the contract cannot import ``images``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .contract import (
    FORM_HEADROOM_BYTES,
    MAX_ASPECT,
    MAX_PIXELS,
    MAX_REQUEST_BYTES,
    MIN_PIXELS,
    MIN_SIDE,
    FormParams,
)
from .errors import InputError
from .images import EncodedImage


def check_image_limits(image: EncodedImage) -> None:
    """Raise InputError when the encoded image breaks one of the service's limits."""
    width, height = image.size.width, image.size.height
    if width < MIN_SIDE or height < MIN_SIDE:
        raise InputError(f"The image is {width}x{height} pixels; every side must be at least {MIN_SIDE}.")
    if not MIN_PIXELS <= width * height <= MAX_PIXELS:
        raise InputError(
            f"The image has {width * height} pixels; the service accepts {MIN_PIXELS} to {MAX_PIXELS}."
        )
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise InputError(
            f"The image is {width}x{height}; its aspect ratio must be within "
            f"1:{MAX_ASPECT:g} and {MAX_ASPECT:g}:1."
        )
    if len(image.data) > MAX_REQUEST_BYTES - FORM_HEADROOM_BYTES:
        raise InputError(
            f"The encoded image is {len(image.data) / 2**20:.1f} MiB; the whole request must stay under "
            f"{MAX_REQUEST_BYTES // 2**20} MiB."
        )


@dataclass(frozen=True, kw_only=True)
class StructureRequest(FormParams):
    """One generation: the encoded image and the form parameters."""

    image: EncodedImage

    def validate(self) -> None:
        """Raise InputError naming the first parameter outside what the service accepts."""
        self.validate_form()
        check_image_limits(self.image)
