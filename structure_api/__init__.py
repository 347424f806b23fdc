"""Client, local stand-in and CLI for the AIThriving Structure endpoint; usable without ComfyUI.

What other code should import is exported here (``__all__``); the modules behind it may move.
docs/architecture.md shows which module owns each step from an IMAGE tensor to a request and back.
"""

from typing import Any

from ._version import __version__ as __version__

from .config import APIKey, load_api_key, resolve_base_url
from .contract import CREDITS_PER_IMAGE, ENDPOINT_PATH, validate_parameters
from .errors import *  # noqa: F401,F403  (every error class; __all__ below names them)
from .retry import RetryPolicy
from .answers import ImageAnswer
from .client import ProgressEvent, StructureClient, StructureResult
from .request import StructureRequest
from .images import (
    EncodedImage,
    ImageSize,
    as_numpy,
    decode_image,
    encode_upload,
    fit_to_limits,
    restore_from_fit,
    to_uint8_rgb,
    uint8_to_float,
)
from .store import ResultStore, StoredResult
from .batch import BatchProgress, BatchReport
from .pipeline import BatchResult, StructureParams, generate_images
from .paid import PaidResult, fetch_or_pay

__all__ = [
    # configuration and the contract
    "APIKey", "load_api_key", "resolve_base_url", "RetryPolicy", "CREDITS_PER_IMAGE", "ENDPOINT_PATH",
    "validate_parameters",
    # the client and its request types
    "StructureClient", "StructureRequest", "StructureResult", "ImageAnswer", "ProgressEvent",
    # the paid-result protocol: every paid answer kept before it is decoded, handed out once
    "fetch_or_pay", "PaidResult",
    # a batch of images, as the node runs it
    "generate_images", "StructureParams", "BatchResult", "BatchProgress", "BatchReport",
    # the result store
    "ResultStore", "StoredResult",
    # the local stand-in (imported on first use: it is a whole HTTP server)
    "StandInServer", "Fault",
    # image conversions
    "EncodedImage", "ImageSize", "as_numpy", "to_uint8_rgb", "uint8_to_float", "encode_upload", "decode_image",
    "fit_to_limits", "restore_from_fit",
    # errors
    "StructureError", "ConfigurationError", "MissingAPIKeyError", "InsecureURLError", "InputError",
    "InvalidImageError", "APIError", "AuthenticationError", "ContentModerationError", "InsufficientCreditsError",
    "InvalidRequestError", "RequestTooLargeError", "RateLimitError", "ServiceError", "GenerationFailedError",
    "UnexpectedRedirectError", "MalformedResponseError", "TransportError", "APIConnectionError",
    "APITimeoutError", "ResultMayBeBilledError", "CancelledError", "BatchError",
]

_LAZY = {"StandInServer": "standin", "Fault": "standin"}


def __getattr__(name: str) -> Any:
    """The stand-in's names, imported when first asked for (the node and client never need them)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
