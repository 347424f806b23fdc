"""Import-only stand-in for torchvision, on PYTHONPATH only for the ComfyUI server the tests start.

Every submodule imports and every name in it is a placeholder that raises when used (see
``_torch_family_stub``): no CPU build of torchvision installs here.
"""

from _torch_family_stub import stub_package

__version__ = "0.0.0+harness.stub"
__getattr__ = stub_package(__name__)
