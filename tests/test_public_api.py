"""The package's public names: each imports, and docs/architecture.md lists exactly ``__all__``."""

import re
from pathlib import Path

import structure_api

ARCHITECTURE = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"


def test_every_public_name_imports() -> None:
    missing = [name for name in structure_api.__all__ if getattr(structure_api, name, None) is None]
    assert missing == []
    assert len(set(structure_api.__all__)) == len(structure_api.__all__)


def test_architecture_lists_the_public_api() -> None:
    text = ARCHITECTURE.read_text(encoding="utf-8")
    # The list runs from the paragraph naming __all__ to the line naming this test.
    section = text[text.index("(`__all__`"):text.index("`tests/test_public_api.py`")]
    listed = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", section)) - {"__all__"}
    # Names given only as what comes from structure_api.standin are not top-level exports.
    listed -= {"Respond", "Drop", "Hang"}
    assert listed == set(structure_api.__all__)
