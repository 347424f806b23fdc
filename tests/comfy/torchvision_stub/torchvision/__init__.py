"""Import-only stand-in for torchvision, on PYTHONPATH only for the ComfyUI server the tests start.

ComfyUI imports torchvision at start-up (model code imports ``torchvision.transforms`` at module
level) but no node the tests run uses it. Importing works; using any attribute raises.
"""

from . import models, transforms
from ._unavailable import missing

__version__ = "0.0.0+harness.stub"


def __getattr__(name: str):
    raise missing(__name__, name)
