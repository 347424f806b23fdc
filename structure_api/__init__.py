"""Client, stand-in and CLI for the AIThriving Structure endpoint; usable without ComfyUI.

What other code should import is exported here (``__all__``); the modules behind it may move.
docs/architecture.md shows which module owns each step from an IMAGE tensor to a request and back.
"""

from typing import Any

from ._version import __version__ as __version__
from .answers import ImageAnswer
from .batch import BatchProgress, BatchReport
from .client import ProgressEvent, StructureClient, StructureResult
from .config import APIKey, load_api_key, resolve_base_url
from .contract import CREDITS_PER_IMAGE, ENDPOINT_PATH, validate_params
from .errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AuthenticationError,
    BatchError,
    CancelledError,
    ConfigurationError,
    ContentModerationError,
    GenerationFailedError,
    InputError,
    InsecureURLError,
    InsufficientCreditsError,
    InvalidImageError,
    InvalidRequestError,
    MalformedResponseError,
    MissingAPIKeyError,
    RateLimitError,
    RequestTooLargeError,
    ResultMayBeBilledError,
    ServiceError,
    StructureError,
    TransportError,
    UnexpectedRedirectError,
)
from .images import EncodedImage, ImageSize, encode_upload
from .paid import PaidResult, fetch_or_pay
from .pipeline import BatchResult, StructureParams, generate_images
from .request import StructureRequest
from .retry import RetryPolicy
from .store import ResultStore, StoredResult

__all__ = [
    # configuration and the contract
    "APIKey",
    "load_api_key",
    "resolve_base_url",
    "RetryPolicy",
    "CREDITS_PER_IMAGE",
    "ENDPOINT_PATH",
    "validate_params",
    # the client and its request types
    "StructureClient",
    "StructureRequest",
    "StructureResult",
    "ImageAnswer",
    "ProgressEvent",
    # the paid-result protocol: every paid answer kept before it is decoded, handed out once
    "fetch_or_pay",
    "PaidResult",
    # a batch of images, as the node runs it
    "generate_images",
    "StructureParams",
    "BatchResult",
    "BatchProgress",
    "BatchReport",
    # the result store
    "ResultStore",
    "StoredResult",
    # the stand-in (imported on first use: it is a whole HTTP server)
    "StandInServer",
    "Fault",
    # the image a request carries
    "EncodedImage",
    "ImageSize",
    "encode_upload",
    # errors
    "StructureError",
    "ConfigurationError",
    "MissingAPIKeyError",
    "InsecureURLError",
    "InputError",
    "InvalidImageError",
    "APIError",
    "AuthenticationError",
    "ContentModerationError",
    "InsufficientCreditsError",
    "InvalidRequestError",
    "RequestTooLargeError",
    "RateLimitError",
    "ServiceError",
    "GenerationFailedError",
    "UnexpectedRedirectError",
    "MalformedResponseError",
    "TransportError",
    "APIConnectionError",
    "APITimeoutError",
    "ResultMayBeBilledError",
    "CancelledError",
    "BatchError",
]

_LAZY = {"StandInServer": "standin", "Fault": "standin"}
_RENAMED = {"validate_parameters": "validate_params"}  # old spelling: new name, for one release
# Image internals once exported here: still importable from structure_api.images, and from here for one
# release.
_MOVED = {
    name: "images"
    for name in (
        "as_numpy",
        "to_uint8_rgb",
        "uint8_to_float",
        "decode_image",
        "fit_to_limits",
        "restore_from_fit",
    )
}


def __getattr__(name: str) -> Any:
    """Import the stand-in's names when first asked for (the node and client never need them)."""
    if name in _RENAMED:
        from ._renamed import warn_renamed

        warn_renamed(f"structure_api.{name}", f"structure_api.{_RENAMED[name]}")
        return globals()[_RENAMED[name]]
    if name in _MOVED:
        import importlib

        from ._renamed import warn_renamed

        warn_renamed(f"structure_api.{name}", f"structure_api.{_MOVED[name]}.{name}")
        return getattr(importlib.import_module(f".{_MOVED[name]}", __name__), name)
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
