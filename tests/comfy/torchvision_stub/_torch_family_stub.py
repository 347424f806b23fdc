"""Import-only stand-ins for torchvision and torchaudio, for the ComfyUI servers the tests start.

Neither has a CPU build that installs here, yet ComfyUI imports both at start-up, and 0.33.0 imports
many of their submodules (``torchvision.ops``, ``torchvision.transforms.functional``,
``torchaudio.functional``, ...). ``stub_package`` makes every ``torchvision.*`` / ``torchaudio.*``
submodule importable through a meta-path finder, and every public name in them a placeholder class:
importing, annotating and subclassing work; calling or instantiating raises ``TorchFamilyUnavailable``.
The nodes that really use them fail when run, never silently; none of the tests runs them.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

STUBBED = ("torchvision", "torchaudio")


class TorchFamilyUnavailable(RuntimeError):
    """Raised on any use of a stand-in: no CPU build of torchvision or torchaudio installs here."""


def _unavailable(name: str) -> TorchFamilyUnavailable:
    top = name.split(".", 1)[0]
    return TorchFamilyUnavailable(
        f"{name} is not available: this '{top}' is an import-only stand-in used by the ComfyUI test "
        f"harness (tests/comfy/torchvision_stub), because no CPU build of {top} installs here"
    )


class _Placeholder(type):
    """The metaclass of placeholders: attribute chains give more placeholders, a call raises."""

    def __getattr__(cls, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return placeholder(f"{cls.__module__}.{cls.__qualname__}.{name}")

    def __call__(cls, *args, **kwargs):
        # A subclass defined in ComfyUI's code is named after the placeholder it derives from.
        stub = next(
            c for c in cls.__mro__ if type(c) is _Placeholder and c.__module__.partition(".")[0] in STUBBED
        )
        raise _unavailable(f"{stub.__module__}.{stub.__qualname__}")


_PLACEHOLDERS: dict[str, type] = {}


def placeholder(qualified: str) -> type:
    """The placeholder class standing for `qualified` (one per name)."""
    if qualified not in _PLACEHOLDERS:
        module, _, name = qualified.rpartition(".")
        _PLACEHOLDERS[qualified] = _Placeholder(name, (), {"__module__": module, "__qualname__": name})
    return _PLACEHOLDERS[qualified]


def module_getattr(module_name: str):
    """A module-level ``__getattr__``: a placeholder for every public name, AttributeError for dunders."""

    def __getattr__(name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        return placeholder(f"{module_name}.{name}")

    return __getattr__


class _StubLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = types.ModuleType(spec.name, f"Import-only stand-in for {spec.name}.")
        module.__getattr__ = module_getattr(spec.name)
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


class _StubFinder(importlib.abc.MetaPathFinder):
    """Finds every submodule of a stubbed package that no file provides (it runs after the path finder)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] not in STUBBED or "." not in fullname:
            return None
        return importlib.machinery.ModuleSpec(fullname, _StubLoader(), is_package=True)


def stub_package(name: str):
    """Make `name`'s submodules importable (once per process); the package's module ``__getattr__``."""
    if not any(isinstance(finder, _StubFinder) for finder in sys.meta_path):
        sys.meta_path.append(_StubFinder())
    return module_getattr(name)
