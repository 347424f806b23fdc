"""Import-only stand-in for torchvision.models: any attribute use raises."""

from ._unavailable import missing


def __getattr__(name: str):
    raise missing(__name__, name)
