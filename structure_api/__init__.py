"""Client, local stand-in and CLI for the AIThriving Structure endpoint; usable without ComfyUI."""

__version__ = "0.1.0"

from .config import APIKey, load_api_key, resolve_base_url  # noqa: E402
from .errors import *  # noqa: E402,F401,F403
from .retry import RetryPolicy  # noqa: E402
from .client import (  # noqa: E402
    CREDITS_PER_IMAGE,
    ProgressEvent,
    StructureClient,
    StructureRequest,
    StructureResult,
)

__all__ = [
    "APIKey", "load_api_key", "resolve_base_url", "RetryPolicy", "CREDITS_PER_IMAGE",
    "ProgressEvent", "StructureClient", "StructureRequest", "StructureResult",
]
