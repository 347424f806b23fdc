"""Every text the pack's JavaScript shows is translated: English, French and Spanish (locales/<lang>/).

web/aithriving_i18n.js holds the English texts as a JSON block (its built-in fallback); the other
scripts show text only through t("key") / text("key") or, for settings, the frontend's own lookup of
settings.json. This reads the scripts as text: it checks that the block and locales/en say the same,
that every other language has every key with the same {placeholders}, that every key the code asks
for exists, and that no sentence is left in the code outside the block (a new toast written in English
fails here).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WEB = REPO / "web"
SCRIPTS = sorted(WEB.glob("*.js"))
I18N_SCRIPT = WEB / "aithriving_i18n.js"
LANGUAGES = ["en", "fr", "es"]
TRANSLATED = ["fr", "es"]
STRINGS_KEY = "aithrivingStructure"
NODE_TEXTS_KEY = "aithrivingStructureNode"  # nodes.py's texts (progress on the node, errors)
# The same in every language: the brand.
SAME_EVERYWHERE = {
    f"{STRINGS_KEY}.toastSummary",
    "settingsCategories.AIThriving",
    f"{NODE_TEXTS_KEY}.progress",
}

BLOCK = re.compile(r"// ENGLISH BEGIN\nexport const ENGLISH = (\{.*?\n\});\n// ENGLISH END\n", re.S)
STRING_LITERAL = re.compile(r"""(["'`])((?:\\.|(?!\1).)*)\1""", re.S)
# A sentence or phrase: two words with a space between them.
PROSE = re.compile(r"[A-Za-z\u00C0-\u024F]{2,}[,.:;!?\u2026]*\s+[A-Za-z\u00C0-\u024F]{2,}")
CSS_CLASSES = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)+( [a-z][a-z0-9]*(-[a-z0-9]+)+)*")


def english() -> dict:
    """The built-in English texts (the JSON block of web/aithriving_i18n.js)."""
    match = BLOCK.search(I18N_SCRIPT.read_text(encoding="utf-8"))
    assert match, "web/aithriving_i18n.js has no ENGLISH BEGIN/END block"
    return json.loads(match.group(1))


def locale(language: str, name: str) -> dict:
    return json.loads((REPO / "locales" / language / f"{name}.json").read_text(encoding="utf-8"))


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def messages(language: str, *, node: bool = False) -> dict[str, str]:
    """What this pack adds to the frontend's messages in one language (main.json's keys and settings.json).

    node: also the node's own texts (progress and errors, shown by nodes.py through the server).
    """
    main = locale(language, "main")
    tree = {
        STRINGS_KEY: main[STRINGS_KEY],
        "settingsCategories": main["settingsCategories"],
        "settings": locale(language, "settings"),
    }
    if node:
        tree[NODE_TEXTS_KEY] = main[NODE_TEXTS_KEY]
    return flatten(tree)


def code_of(path: Path) -> str:
    """The script without comments and without the English block (string contents kept)."""
    text = BLOCK.sub("", path.read_text(encoding="utf-8"))
    out, i = [], 0
    while i < len(text):  # drop comments, but not "//" inside a string
        if text[i] in "\"'`":
            match = STRING_LITERAL.match(text, i)
            out.append(match.group(0))
            i = match.end()
        elif text.startswith("//", i):
            i = text.find("\n", i) if "\n" in text[i:] else len(text)
        elif text.startswith("/*", i):
            i = text.index("*/", i) + 2
        elif text[i] == "/" and re.search(r"[(,=:!&|?{};]\s*$", "".join(out[-1:]) or "("):
            # a regex literal
            match = re.compile(r"/(?:\\.|\[(?:\\.|[^\]])*\]|[^/\n])+/[a-z]*").match(text, i)
            out.append('""' if match else "/")
            i = match.end() if match else i + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def test_the_english_block_is_what_locales_en_says():
    built_in = english()
    assert set(built_in) == {STRINGS_KEY, "settingsCategories", "settings"}
    assert messages("en") == flatten(built_in)
    # The badge texts (estimate, last run) are still there, with what they need.
    assert built_in[STRINGS_KEY]["lastRun"] == "Last run: {credits} credits"


@pytest.mark.parametrize("language", TRANSLATED)
def test_every_text_is_translated_with_the_same_placeholders(language):
    theirs, ours = messages(language, node=True), messages("en", node=True)
    assert sorted(theirs) == sorted(ours), f"{language}: keys differ from English"
    for key, text in theirs.items():
        assert text.strip(), (language, key)
        placeholders = set(re.findall(r"\{(\w+)\}", text))
        assert placeholders == set(re.findall(r"\{(\w+)\}", ours[key])), (language, key)
        if key not in SAME_EVERYWHERE:
            assert text != ours[key], f"{language}: {key} is the English text"


def test_every_key_the_code_asks_for_exists_and_every_text_is_used():
    keys = set(english()[STRINGS_KEY])
    asked, literals = set(), set()
    for script in SCRIPTS:
        code = code_of(script)
        asked |= set(re.findall(r"\b(?:t|text)\(\s*[\"'](\w+)[\"']", code))
        literals |= {m.group(2) for m in STRING_LITERAL.finditer(code)}
    assert asked and not asked - keys, f"asked for but not in the English block: {sorted(asked - keys)}"
    assert not keys - literals, f"never used: {sorted(keys - literals)}"


def test_every_setting_has_its_name_and_tooltip_in_settings_json():
    code = code_of(WEB / "aithriving_setup.js")
    constants = dict(re.findall(r"const (\w+) = \"([^\"]+)\";", code))
    ids = [constants.get(name, name.strip("\"'")) for name in re.findall(r"\bid:\s*(\w+|\"[^\"]+\")", code)]
    assert len(ids) == 2
    for language in LANGUAGES:
        settings = locale(language, "settings")
        assert sorted(settings) == sorted(i.replace(".", "_") for i in ids), language
        for entry in settings.values():
            assert set(entry) == {"name", "tooltip"}
    # The categories the settings sit in (id "A.B.C": category A, group B) are translated too.
    categories = {part for i in ids for part in i.split(".")[:2]}
    assert categories == set(english()["settingsCategories"])


def unshown(text: str) -> bool:
    """True for a string literal that is not a text for the user: a log line, CSS classes, code words."""
    return text.startswith("[aithriving") or CSS_CLASSES.fullmatch(text) is not None or not PROSE.search(text)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_no_text_outside_the_translations(script):
    found = [m.group(2) for m in STRING_LITERAL.finditer(code_of(script)) if not unshown(m.group(2))]
    assert not found, f"{script.name} shows text that is not in web/aithriving_i18n.js's block: {found}"


def test_the_check_finds_a_text_written_into_the_code(tmp_path):
    sample = tmp_path / "sample.js"
    sample.write_text(
        '// a comment with words\nconst a = "p-button p-button-secondary";\n'
        'console.warn("[aithriving.setup] some words", e);\nconst b = /a b/;\n'
        'toast({summary: t("toastSummary"), detail: "Set it in Settings now."});\n'
    )
    found = [m.group(2) for m in STRING_LITERAL.finditer(code_of(sample)) if not unshown(m.group(2))]
    assert found == ["Set it in Settings now."]


def test_every_node_text_nodes_py_asks_for_is_in_english():
    source = (REPO / "nodes.py").read_text(encoding="utf-8")
    asked = set(re.findall(r"\bwords(?:\.progress)?\(\s*\"(\w+)\"", source))
    asked |= set(re.findall(r"\bself\(\s*\"(\w+)\"", source))
    asked |= set(re.findall(r"\"(\w+)\" if total == 1 else \"(\w+)\"", source)[0])
    asked |= {"stage" + stage.capitalize() for stage in ("pacing", "uploading", "waiting", "retrying")}
    english = locale("en", "main")[NODE_TEXTS_KEY]
    assert len(asked) > 10 and not asked - set(english), sorted(asked - set(english))
    assert not set(english) - asked, f"never used: {sorted(set(english) - asked)}"
