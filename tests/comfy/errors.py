"""The harness's exceptions: one root, a set-up branch and a server branch."""

from __future__ import annotations

from typing import Any


class ComfyHarnessError(RuntimeError):
    """Something in the ComfyUI test harness failed."""


class ComfySetupError(ComfyHarnessError):
    """Fetching ComfyUI or building its venv failed."""


class ComfyServerError(ComfyHarnessError):
    """The ComfyUI server did not start, died, or answered with an error."""


class PromptRejected(ComfyServerError):
    """POST /prompt answered 400: the graph did not validate."""

    def __init__(self, message: str, *, error: Any, node_errors: Any) -> None:
        super().__init__(message)
        self.error = error
        self.node_errors = node_errors


class PromptTimeout(ComfyServerError):
    """A queued prompt did not finish in time."""
