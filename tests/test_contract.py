"""The texts that cannot import structure_api/contract.py (web UI, locales, help pages, README) agree with it.

Each figure of the contract is found by its unit in every language the pack ships (credits, px,
pixels, megapixels, characters, MiB, n:1, the default strength, the largest seed) and compared with
the contract: a changed figure that a text did not follow fails here.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from structure_api import client, contract, images, standin
from structure_api import request as request_module

REPO = Path(__file__).resolve().parents[1]
JS_FILES = sorted(REPO.glob("web/*.js"))
# Of docs/, architecture.md states the contract's figures; reliability.md and benchmarks.md report the
# inputs tests send (a 10001-character prompt, one over the limit) and settings measured ("default 8").
DOCS = [REPO / "docs" / "architecture.md"]
TEXT_FILES = sorted(
    [REPO / "README.md", *DOCS, *REPO.glob("web/docs/**/*.md"), *REPO.glob("locales/*/*.json")]
)
ALL_FILES = [*JS_FILES, *TEXT_FILES]

# A number as the texts write it: 10000, 10,000, 10 000 (also with a no-break space), 9.4, 9,4.
NUMBER = r"(\d{1,3}(?:[,  \u202f]\d{3})+|\d+(?:[.,]\d+)?)"


def _value(text: str) -> float:
    """A number as written in any of the pack's languages."""
    if re.fullmatch(r"\d{1,3}(?:[,  \u202f]\d{3})+", text):
        return float(re.sub(r"[,  \u202f]", "", text))
    return float(text.replace(",", "."))


def _mentions(pattern: str, files: list[Path]) -> list[tuple[str, float, str]]:
    found = []
    for path in files:
        source = path.read_text(encoding="utf-8")
        for match in re.finditer(pattern, source, flags=re.IGNORECASE):
            line = source.count("\n", 0, match.start()) + 1
            found.append((f"{path.relative_to(REPO)}:{line}", _value(match.group(1)), match.group(0)))
    return found


def _assert_all(pattern: str, files: list[Path], allowed, what: str, *, at_least: int = 1) -> None:
    found = _mentions(pattern, files)
    assert len(found) >= at_least, f"no mention of {what} found: the pattern no longer matches the texts"
    wrong = [(where, said) for where, value, said in found if not allowed(value)]
    assert not wrong, f"{what} disagrees with structure_api/contract.py: {wrong}"


def test_old_names_are_the_contract_itself() -> None:
    """Modules that used to define the figures re-export the contract's objects, not copies."""
    assert client.StructureRequest is request_module.StructureRequest
    assert client.validate_params is contract.validate_params
    assert client.CREDITS_PER_IMAGE == standin.CREDITS_PER_IMAGE == contract.CREDITS_PER_IMAGE
    assert client.MAX_SEED == contract.MAX_SEED and client.OUTPUT_FORMATS is contract.OUTPUT_FORMATS
    assert standin.ENDPOINT_PATH == client.ENDPOINT_PATH == contract.ENDPOINT_PATH
    for name in ("MIN_SIDE", "MIN_PIXELS", "MAX_PIXELS", "MAX_ASPECT", "MAX_REQUEST_BYTES"):
        assert getattr(images, name) == getattr(contract, name), name


def test_form_fields_hold_the_figures() -> None:
    fields = {field.name: field for field in contract.FORM_FIELDS}
    assert [
        name
        for name, _ in request_module.StructureRequest(
            image=None,
            prompt="x",
            seed=1,  # type: ignore[arg-type]
            negative_prompt="n",
        ).form_fields()
    ] == list(fields)
    assert fields["prompt"].required and fields["prompt"].max_chars == contract.MAX_PROMPT_CHARS
    assert fields["seed"].maximum == contract.MAX_SEED
    assert fields["control_strength"].default == contract.DEFAULT_CONTROL_STRENGTH
    assert fields["output_format"].choices == contract.OUTPUT_FORMATS


def test_every_form_field_is_a_parameter_of_the_request_and_the_node() -> None:
    # A field added to FORM_FIELDS without its attribute (or the other way round) fails here.
    from structure_api.pipeline import StructureParams

    def names(cls: type) -> list[str]:
        return [field.name for field in dataclasses.fields(cls)]

    assert names(contract.FormParams) == list(contract.FIELD_NAMES)
    assert names(request_module.StructureRequest) == list(contract.FIELD_NAMES) + ["image"]
    assert names(StructureParams) == list(contract.FIELD_NAMES) + ["outside_limits"]
    for field in contract.FORM_FIELDS:
        if not field.required:
            assert getattr(contract.FormParams, field.name) == field.default, field.name


def test_the_web_extension_takes_the_price_from_the_server() -> None:
    """The cost badge's price comes from the node's schema (the image input's credits_per_image)."""
    source = (REPO / "web" / "aithriving_structure.js").read_text(encoding="utf-8")
    assert re.search(r"CREDITS_PER_IMAGE\s*=\s*\d", source) is None, "the price is restated in the JS"
    assert "credits_per_image" in source
    nodes = (REPO / "nodes.py").read_text(encoding="utf-8")
    assert 'extra_dict={"credits_per_image": CREDITS_PER_IMAGE}' in nodes


def test_no_js_file_states_a_limit() -> None:
    for path in JS_FILES:
        source = path.read_text(encoding="utf-8")
        # (The prompt length is checked by its unit in test_field_figures_agree: 10000 is also a z-index.)
        for figure in (contract.MAX_SEED, contract.MAX_PIXELS):
            assert str(figure) not in source, f"{path.name} restates {figure}"


def test_credit_figures_agree() -> None:
    # Per image: exactly the price. Any other sum: nothing (free, from the store, offline) or a whole number
    # of images.
    per_image = rf"{NUMBER}\s*(?:credits?|crédits?|créditos?)\s*(?:per image|par image|por imagen)"
    _assert_all(
        per_image,
        ALL_FILES,
        lambda value: value == contract.CREDITS_PER_IMAGE,
        "the price per image",
        at_least=3,
    )
    any_sum = rf"{NUMBER}\s*(?:credits?|crédits?|créditos?)\b"
    _assert_all(
        any_sum,
        ALL_FILES,
        lambda value: value % contract.CREDITS_PER_IMAGE == 0,
        "a sum of credits",
        at_least=10,
    )
    times = rf"{NUMBER}\s*×\s*\*N\*"
    _assert_all(times, TEXT_FILES, lambda value: value == contract.CREDITS_PER_IMAGE, "the price in 6 × N")


def test_image_limits_agree() -> None:
    _assert_all(
        rf"{NUMBER}\s+px\b", TEXT_FILES, lambda value: value == contract.MIN_SIDE, "the smallest side"
    )
    _assert_all(
        rf"{NUMBER}\s*pixels\b", TEXT_FILES, lambda value: value == contract.MAX_PIXELS, "the most pixels"
    )
    _assert_all(
        rf"{NUMBER}\s*(?:megapixels|mégapixels|megapíxeles)",
        ALL_FILES,
        lambda value: value == round(contract.MAX_PIXELS / 1e6, 1),
        "the most megapixels",
    )
    _assert_all(
        rf"{NUMBER}\s*:\s*1\b", TEXT_FILES, lambda value: value == contract.MAX_ASPECT, "the widest aspect"
    )
    _assert_all(
        rf"(?<![\d.:])1\s*:\s*{NUMBER}",
        TEXT_FILES,
        lambda value: value == contract.MAX_ASPECT,
        "the tallest aspect",
    )
    _assert_all(
        rf"{NUMBER}\s*MiB\b",
        TEXT_FILES,
        lambda value: value == contract.MAX_REQUEST_BYTES / 2**20,
        "the request size limit",
    )


def test_field_figures_agree() -> None:
    _assert_all(
        rf"{NUMBER}\s*(?:characters|caractères|caracteres)",
        ALL_FILES,
        lambda value: value == contract.MAX_PROMPT_CHARS,
        "the prompt length",
    )
    _assert_all(r"\b(\d{9,})\b", TEXT_FILES, lambda value: value == contract.MAX_SEED, "the largest seed")
    _assert_all(
        rf"(?:default|défaut|defecto)\s*:?\s*{NUMBER}",
        TEXT_FILES,
        lambda value: value == contract.DEFAULT_CONTROL_STRENGTH,
        "the default control strength",
    )


@pytest.mark.parametrize(
    "text, value",
    [("10,000", 10000), ("10 000", 10000), ("9,4", 9.4), ("2.5", 2.5), ("9 437 184", 9437184), ("6", 6)],
)
def test_numbers_are_read_as_written(text: str, value: float) -> None:
    assert _value(text) == value


PRODUCT_SOURCES = sorted(
    path
    for path in [
        *REPO.glob("structure_api/**/*.py"),
        REPO / "nodes.py",
        REPO / "server_routes.py",
        REPO / "__init__.py",
    ]
    if path != REPO / "structure_api" / "contract.py"
)


def test_no_product_source_restates_a_figure() -> None:
    """Code, messages, comments and docstrings name the contract's constants instead of their values.

    (Other figures with the same units, such as 0 credits or a 64 MiB reading limit, are not the contract's.)
    """
    figures = {
        rf"{NUMBER}\s*px\b": contract.MIN_SIDE,
        rf"{NUMBER}\s*pixels\b": contract.MAX_PIXELS,
        rf"{NUMBER}\s*megapixels\b": round(contract.MAX_PIXELS / 1e6, 1),
        rf"{NUMBER}\s*MiB\b": contract.MAX_REQUEST_BYTES / 2**20,
        rf"{NUMBER}\s*credits?\b": contract.CREDITS_PER_IMAGE,
        rf"{NUMBER}\s*characters\b": contract.MAX_PROMPT_CHARS,
        rf"{NUMBER}\s*:\s*1\b": contract.MAX_ASPECT,
        r"\b(\d[\d_]{8,})\b": contract.MAX_SEED,
    }
    found = [
        (where, said)
        for pattern, figure in figures.items()
        for where, value, said in _mentions(pattern, PRODUCT_SOURCES)
        if value == figure
    ]
    found += [
        (where, said)
        for where, value, said in _mentions(r"\b(\d[\d_]{6,})\b", PRODUCT_SOURCES)
        if value in (contract.MAX_PIXELS, contract.MAX_REQUEST_BYTES)
    ]
    assert len(PRODUCT_SOURCES) > 20
    assert not found, f"figures of structure_api/contract.py written again: {found}"


def test_the_rate_limit_and_lock_out_are_the_contracts() -> None:
    """The upstream's rate limit and lock-out are written once, in contract.py; the rest name them."""
    from structure_api import ratelimit
    from structure_api.standin import upstream_limit

    limit = ratelimit.RateLimit(contract.RATE_LIMIT_REQUESTS, contract.RATE_LIMIT_SECONDS)
    assert ratelimit.DEFAULT_RATE_LIMIT == limit
    lockouts = (ratelimit.UPSTREAM_LOCKOUT_SECONDS, upstream_limit.DEFAULT_LOCKOUT_SECONDS)
    assert lockouts == (contract.LOCKOUT_SECONDS,) * 2
    assert (standin.STANDIN_HEADER, standin.STANDIN_HEADER_VALUE) == (
        contract.STANDIN_HEADER,
        contract.STANDIN_HEADER_VALUE,
    )
    lockout = re.escape(repr(contract.LOCKOUT_SECONDS))
    written = [
        (where, said)
        for where, _, said in _mentions(rf"\b({lockout})\b", PRODUCT_SOURCES)
        if not where.startswith("structure_api/contract.py")
    ]
    assert written == [], f"the lock-out {contract.LOCKOUT_SECONDS} is written again instead of named"
