"""Image conversions for the Structure client: tensors to upload bytes and answers back to pixels.

An IMAGE batch is ``[B, H, W, C]`` float in 0..1, a torch tensor or a numpy array; one image
is ``[H, W, C]``. Inside this package pixels travel as ``[H, W, 3]`` uint8 numpy arrays.
Each step has its module; every name is importable from here:

- ``arrays``: ``ImageSize``, tensors and arrays to uint8 RGB and back to float batches;
- ``fit``: fitting into the contract's limits (``plan_fit``, ``fit_to_limits``) and back
(``restore_from_fit``);
- ``png``: the fast PNG writer; ``encode``: the upload (``encode_upload``) and output files
(``encode_image``);
- ``decode``: the answer's bytes to pixels, guarded against cut-short files and decompression bombs.
"""

from ..contract import (  # noqa: F401  (the limits stay importable from here)
    FORM_HEADROOM_BYTES,
    MAX_ASPECT,
    MAX_PIXELS,
    MAX_REQUEST_BYTES,
    MIN_PIXELS,
    MIN_SIDE,
)
from .arrays import ImageSize, as_numpy, new_output_batch, to_uint8_rgb, uint8_to_float
from .decode import decode_base64, decode_image, decode_image_into, detect_format, image_header_size
from .encode import EncodedImage, encode_image, encode_upload
from .fit import FitPlan, fit_to_limits, plan_fit, restore_from_fit
from .png import encode_png

__all__ = [
    "ImageSize",
    "as_numpy",
    "new_output_batch",
    "to_uint8_rgb",
    "uint8_to_float",
    "FitPlan",
    "plan_fit",
    "fit_to_limits",
    "restore_from_fit",
    "EncodedImage",
    "encode_png",
    "encode_image",
    "encode_upload",
    "detect_format",
    "image_header_size",
    "decode_image",
    "decode_image_into",
    "decode_base64",
]
