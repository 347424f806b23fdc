"""The one exception hierarchy of the Structure client.

``str(err)`` is always one sentence a person can act on; raw material (HTTP status,
body, headers, request id) lives in attributes. The API key never appears in any of it.

The tree:

* StructureError
  + ConfigurationError - the client is not set up to make requests.
    - MissingAPIKeyError
    - InsecureURLError
  + InputError (also a ValueError) - nothing was sent.
    - InvalidImageError
  + APIError - the service answered with an error.
    - AuthenticationError (401/403)
    - ContentModerationError
    - InsufficientCreditsError (402)
    - InvalidRequestError (400/422)
    - RequestTooLargeError (413)
    - RateLimitError (429)
    - ServiceError (5xx)
    - GenerationFailedError (``code: -1``)
    - UnexpectedRedirectError
    - MalformedResponseError
  + TransportError - no complete answer arrived.
    - APIConnectionError
    - APITimeoutError
    - ResultMayBeBilledError
  + CancelledError
  + BatchError - some images of a batch failed.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any


class StructureError(Exception):
    """Root of every error this package raises.

    A subclass with details of its own declares each as a class attribute holding its default
    (``retry_after: Optional[float] = None``); the constructor takes them as keywords.
    """

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        request_id: str | None = None,
        reason: str | None = None,
        **details: Any,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.http_status = http_status
        self.body = body
        self.headers = dict(headers or {})
        self.request_id = request_id
        self.reason = reason  # the server's own words, when it gave any
        for name, value in details.items():
            if not _declares(type(self), name):
                raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument {name!r}")
            setattr(self, name, value)

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        status = f", http_status={self.http_status}" if self.http_status is not None else ""
        return f"{type(self).__name__}({self.message!r}{status})"


def _declares(cls: type, name: str) -> bool:
    """Tell whether ``cls`` or one of its StructureError bases declares the detail ``name``."""
    return not name.startswith("_") and any(
        name in vars(base)
        for base in cls.__mro__
        if issubclass(base, StructureError) and base is not StructureError
    )


# --- before any request -------------------------------------------------------------


class ConfigurationError(StructureError):
    """The client is not set up to make requests."""


class MissingAPIKeyError(ConfigurationError):
    """No API key was found in the environment or the key file."""


class InsecureURLError(ConfigurationError):
    """The key would travel in clear text to a host that is not this machine."""


class InputError(StructureError, ValueError):
    """A parameter or image is outside what the service accepts; nothing was sent."""


class InvalidImageError(InputError):
    """The input image cannot be sent as it is (shape, size, values)."""


# --- the service answered with an error ----------------------------------------------


class APIError(StructureError):
    """The service (or something in front of it) answered with an error."""


class AuthenticationError(APIError):
    """401/403: the key is missing, wrong or revoked."""


class ContentModerationError(APIError):
    """The service refused the prompt or image on content grounds."""


class InsufficientCreditsError(APIError):
    """402: the account has no credits left."""


class InvalidRequestError(APIError):
    """400/422: the service rejected the parameters or the image."""


class RequestTooLargeError(APIError):
    """413: the request is over the service's size limit (``contract.MAX_REQUEST_BYTES``)."""


class RateLimitError(APIError):
    """429: too many requests; ``retry_after`` holds the server's hint in seconds."""

    retry_after: float | None = None


class ServiceError(APIError):
    """5xx: the service failed; the request was not charged."""


class GenerationFailedError(APIError):
    """The service answered ``code: -1``: it could not produce an image."""


class UnexpectedRedirectError(APIError):
    """The service answered with a redirect, which the client never follows with the key."""


class MalformedResponseError(APIError):
    """The answer is not what the contract promises (not JSON, fields missing, bad image)."""

    # An image the answer carried that is not fit to use (answers.ImageAnswer): kept, not used.
    answer: Any | None = None


# --- transport ---------------------------------------------------------------------


class TransportError(StructureError):
    """The request did not get a complete answer.

    ``request_delivered`` is False when the whole request provably never reached the
    service (so sending it again cannot charge twice), True when it may have.
    """

    request_delivered: bool = True


class APIConnectionError(TransportError):
    """The service could not be reached or dropped the connection."""


class APITimeoutError(TransportError):
    """The service did not answer in time."""


class ResultMayBeBilledError(TransportError):
    """The upload completed but the answer was lost: the service may have charged for it."""


class CancelledError(StructureError):
    """The caller cancelled the work before it finished."""


class BatchError(StructureError):
    """Some images of a batch failed; ``failures`` maps each image index (0-based) to its error."""

    failures: Mapping[int, StructureError] = MappingProxyType({})
