"""What a pixel array is here, and the conversions between IMAGE tensors, uint8 RGB and float batches.

An IMAGE batch is ``[B, H, W, C]`` float in 0..1, a torch tensor or a numpy array; one image
is ``[H, W, C]``. Inside this package pixels travel as ``[H, W, 3]`` uint8 numpy arrays.
torch is never imported at module level: a tensor can only exist if torch is already loaded,
so tensors are recognised through ``sys.modules`` and torch is imported only to make one.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidImageError


@dataclass(frozen=True)
class ImageSize:
    """A width and height in pixels."""

    width: int
    height: int

    @property
    def pixels(self) -> int:
        """Total number of pixels."""
        return self.width * self.height

    @classmethod
    def of(cls, pixels: Any) -> ImageSize:
        """Return the size of an ``[H, W, ...]`` array or tensor."""
        height, width = (int(side) for side in tuple(pixels.shape)[:2])
        return cls(width=width, height=height)

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


# --- tensors and arrays in, uint8 RGB out ----------------------------------------------


def _is_torch_tensor(obj: object) -> bool:
    """Tell whether ``obj`` is a torch tensor, without importing torch (not loaded: nothing is one)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def _who(index: int | None) -> str:
    return "The image" if index is None else f"Image {index + 1} of the batch"


# Float images are quantized a block of rows of about this many bytes at a time: the float32
# scratch stays in cache, and no full-size float copy exists (50 MB for one 2048x2048 image).
_QUANTIZE_BLOCK_BYTES = 1 << 18


def _quantize(values: np.ndarray, scale: float) -> np.ndarray:
    """``values * scale`` rounded into uint8 0..255, NaN and -inf to 0, +inf to 255."""
    height, width, channels = values.shape
    result = np.empty(values.shape, dtype=np.uint8)
    per_block = max(1, _QUANTIZE_BLOCK_BYTES // (width * channels * 4))
    buffer = np.empty((min(per_block, height), width, channels), dtype=np.float32)
    for start in range(0, height, per_block):
        stop = min(height, start + per_block)
        scratch = buffer[: stop - start]
        with np.errstate(over="ignore", invalid="ignore"):
            np.multiply(values[start:stop], np.float32(scale), out=scratch, dtype=np.float32)
        # fmax/fmin return the non-NaN operand, so these two passes also send NaN to 0 and
        # +/-inf to the ends, without the temporaries np.nan_to_num would allocate.
        np.fmax(scratch, np.float32(0), out=scratch)
        np.fmin(scratch, np.float32(255), out=scratch)
        np.rint(scratch, out=result[start:stop], casting="unsafe")
    return result


def to_uint8_rgb(image: Any, *, index: int | None = None) -> np.ndarray:
    """One ``[H, W, C]`` image (torch or numpy, float 0..1 or integer) as contiguous ``[H, W, 3]`` uint8.

    Floats are clamped to 0..1 and rounded (NaN and -inf to 0, +inf to 1). uint8 is taken as
    0..255, uint16 as 0..65535, bool as 0/1; other integers are taken as 0..255 levels and
    clamped. One channel is grey; two are grey plus alpha; four are RGBA; alpha is dropped.
    ``index`` (0-based) only names the image in error messages. A uint8 RGB input that is
    already contiguous comes back as is (sharing memory), since nothing here writes to it.
    """
    if _is_torch_tensor(image):
        import torch

        tensor = image.detach()
        if tensor.dtype in (torch.float16, torch.bfloat16):
            # numpy has no bfloat16; widening in torch is exact for both half types.
            tensor = tensor.to(device="cpu", dtype=torch.float32)
        elif tensor.device.type != "cpu":
            tensor = tensor.cpu()
        array = tensor.numpy()
    else:
        array = np.asarray(image)

    who = _who(index)
    if array.ndim != 3:
        raise InvalidImageError(f"{who} has shape {list(array.shape)}; expected [height, width, channels].")
    height, width, channels = array.shape
    if height == 0 or width == 0:
        raise InvalidImageError(f"{who} is {width}x{height} pixels; it needs at least one pixel each side.")
    if channels not in (1, 2, 3, 4):
        raise InvalidImageError(f"{who} has {channels} channels; expected 1, 3 or 4.")

    # Grey (with or without alpha) is quantized as one channel and widened at the end: a third of the work.
    colour = array[:, :, :1] if channels <= 2 else array[:, :, :3]
    kind = array.dtype.kind
    if kind == "f":
        pixels = _quantize(colour, 255.0)
    elif array.dtype == np.uint8:
        pixels = np.ascontiguousarray(colour)
    elif kind == "b":
        pixels = colour.astype(np.uint8)
        pixels *= 255
    elif array.dtype == np.uint16:
        pixels = _quantize(colour, 255.0 / 65535.0)
    elif kind in "iu":
        pixels = np.clip(colour, 0, 255).astype(np.uint8)
    else:
        raise InvalidImageError(
            f"{who} holds values of type {array.dtype}; expected floats in 0..1 or integers."
        )
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    return pixels


def check_rgb8(pixels: Any, what: str = "The image") -> np.ndarray:
    """``pixels`` if it is a non-empty ``[H, W, 3]`` uint8 array, else InvalidImageError naming ``what``."""
    if (
        not isinstance(pixels, np.ndarray)
        or pixels.dtype != np.uint8
        or pixels.ndim != 3
        or pixels.shape[2] != 3
        or pixels.shape[0] == 0
        or pixels.shape[1] == 0
    ):
        shape = list(getattr(pixels, "shape", ()))
        dtype = getattr(pixels, "dtype", type(pixels).__name__)
        raise InvalidImageError(
            f"{what} must be a [height, width, 3] uint8 array; got shape {shape} of {dtype}."
        )
    return pixels


# --- back to float batches -------------------------------------------------------------


def uint8_to_float(pixels: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Convert ``[H, W, 3]`` uint8 to float32 0..1, into ``out`` (e.g. a slice of a batch) if given."""
    pixels = check_rgb8(pixels)
    if out is None:
        out = np.empty(pixels.shape, dtype=np.float32)
    elif out.shape != pixels.shape:
        raise ValueError(f"out has shape {list(out.shape)}; expected {list(pixels.shape)}.")
    # Division (not multiplication by 1/255) so that v/255 is the correctly rounded float and
    # to_uint8_rgb brings back exactly v; dtype= makes numpy cast in small chunks, not a full copy.
    np.divide(pixels, np.float32(255), out=out, dtype=np.float32)
    return out


def new_output_batch(count: int, size: ImageSize, like: Any = None) -> Any:
    """Allocate a zeroed float32 ``[count, H, W, 3]`` batch: torch (CPU) when ``like`` is, else numpy."""
    shape = (count, size.height, size.width, 3)
    if _is_torch_tensor(like):
        import torch

        return torch.zeros(shape, dtype=torch.float32)
    return np.zeros(shape, dtype=np.float32)


def as_numpy(batch: Any) -> np.ndarray:
    """Return a writable numpy view of a batch from ``new_output_batch`` (shares memory with a tensor)."""
    if _is_torch_tensor(batch):
        return batch.detach().numpy()
    array = np.asarray(batch)
    if not array.flags.writeable:
        raise ValueError("The batch is read-only.")
    return array
