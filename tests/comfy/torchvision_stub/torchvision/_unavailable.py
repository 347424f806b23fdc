"""The shared piece of the import-only torchvision stand-in: every attribute use fails loudly."""

from __future__ import annotations


class TorchvisionUnavailable(AttributeError):
    """Raised on any use of the stand-in: there is no CPU build of torchvision on this machine."""


def missing(module: str, name: str) -> TorchvisionUnavailable:
    """The error for ``module.name``; an AttributeError so hasattr() and ``from x import y`` stay sane."""
    return TorchvisionUnavailable(
        f"{module}.{name} is not available: this 'torchvision' is an import-only stand-in used by the "
        "ComfyUI test harness (tests/comfy/torchvision_stub), because no CPU build of torchvision installs here"
    )
