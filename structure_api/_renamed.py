"""Old spellings of public names: each still works for one release and warns (DeprecationWarning)."""

from __future__ import annotations

import warnings


def warn_renamed(old: str, new: str) -> None:
    """Warn that ``old`` is now called ``new``, pointing at the caller's caller."""
    warnings.warn(
        f"{old} is now {new}; the old name goes in the next release.", DeprecationWarning, stacklevel=3
    )
