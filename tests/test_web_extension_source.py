"""The pack's frontend code (web/*.js) uses no API the newest frontend marks deprecated, and names itself
as the Registry's lint wants. The browser tests (tests/browser) run the same code on every frontend of
the matrix; this catches what a run cannot always see: frontend 1.58 prints each deprecation warning
once per page, so a use the core made first hides ours.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "web").glob("*.js"))

# What frontend 1.58 deprecates (warnDeprecated in its litegraph build) and what replaces it.
DEPRECATED = {
    r"\.link\b(?!s)": "slot.link: use node.isInputConnected(slot) / node.getInputLink(slot)",
    r"\.badgePosition\b": "LGraphNode.badgePosition: badges always render top-right",
    r"\bLiteGraph\.graphs?\b": "LiteGraph.graph: use app.graph",
}


def code_of(path: Path) -> str:
    """The script without its comments and string contents (what runs, not what is said about it)."""
    text = path.read_text()
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r"//[^\n]*", " ", text)
    return re.sub(r"(['\"`])(?:\\.|(?!\1).)*\1", '""', text)


def test_there_are_scripts_to_check():
    assert SCRIPTS, "web/ has no .js files"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_no_deprecated_frontend_api(script: Path):
    code = code_of(script)
    found = [message for pattern, message in DEPRECATED.items() if re.search(pattern, code)]
    assert not found, f"{script.name} uses {found}"


def test_the_check_sees_a_deprecated_read():
    # The pattern matches what it is meant to and leaves the replacements alone.
    assert re.search(r"\.link\b(?!s)", "if (input.link != null) {}")
    assert not re.search(r"\.link\b(?!s)", "node.getInputLink(0); graph.links; node.isInputConnected(1)")


def test_extension_names_are_under_the_display_name_namespace():
    # comfy-test lint: every registerExtension name starts with the pack's DisplayName, lowercased and
    # stripped to letters and digits, then "." (or is exactly that), so no other pack can collide.
    display_name = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["comfy"]["DisplayName"]
    namespace = re.sub(r"[^a-z0-9]", "", display_name.lower())
    names = []
    for script in SCRIPTS:
        names += re.findall(r"registerExtension\(\{\s*name:\s*['\"]([^'\"]+)['\"]", script.read_text())
    assert names
    assert [n for n in names if not (n == namespace or n.startswith(namespace + "."))] == []
